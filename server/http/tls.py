"""TLS for the engine: one server context offering HTTP/2 and HTTP/1.1 by ALPN, and the answer
to plaintext on a TLS port (refused unless the server is told to serve it beside TLS)."""

from __future__ import annotations

import ssl

ALPN_PROTOCOLS = ["h2", "http/1.1"]
TLS_REQUIRED_BODY = b'{"error":"tls_required","message":"this port serves HTTPS only"}'
TLS_REQUIRED_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%b" % (len(TLS_REQUIRED_BODY), TLS_REQUIRED_BODY)
)
"""The fixed answer to a plaintext HTTP/1.1 request on a TLS port that does not serve plaintext
(the connection then closes); an h2c prior-knowledge preface gets no answer, only the close."""


def make_server_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side context loaded with ``certfile``/``keyfile`` (PEM), TLS 1.2 or newer, offering
    ALPN ``h2`` then ``http/1.1``, without TLS compression and with the RFC 9113 cipher rules."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    # HTTP/2 over TLS 1.2 needs an ephemeral key exchange and an AEAD cipher (RFC 9113, 9.2.2).
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.load_cert_chain(certfile, keyfile)
    return context


def reload_certificate(context: ssl.SSLContext, certfile: str, keyfile: str | None = None) -> None:
    """Load a new certificate and key into a live ``context``: handshakes from now on present the
    new certificate, connections already established keep theirs (nothing is dropped).

    The pair is first checked in a throwaway context, so a bad or mismatched pair raises
    (``OSError``/``ssl.SSLError``) and leaves ``context`` as it was."""
    make_server_ssl_context(certfile, keyfile)
    context.load_cert_chain(certfile, keyfile)
