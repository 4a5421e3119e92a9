"""Servers the load test compares Sluice against, speaking the subset of the wire contract it uses.

* :mod:`loadtest.baselines.uvicorn_app`: a plain ASGI SSE pub/sub app served by uvicorn.
* :mod:`loadtest.baselines.nchan`: nginx with the nchan pub/sub module.

Neither imports anything from the ``server`` package.
"""
