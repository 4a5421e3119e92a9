"""The native HTTP engine: HTTP/1.1 (llhttp via httptools), HTTP/2 (h2) and WebSocket (wsproto) on trio.

Entry point: :func:`server.http.server.serve_http`; the contract handlers see is
:mod:`server.http.base`.
"""
