"""The interfaces core defines and the outer layers implement.

* :mod:`server.core.ports.store`: the replay log (:class:`~server.core.ports.store.Store`), its
  notices, errors and retention; implemented under ``server/store/``.

Only ``server/app.py`` picks the concrete implementations.
"""
