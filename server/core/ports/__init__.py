"""The interfaces core defines and the outer layers implement.

* :mod:`server.core.ports.store`: the replay log (:class:`~server.core.ports.store.Store`), its
  notices, errors and retention; implemented under ``server/store/``;
* :mod:`server.core.ports.bus`: the notice bus between a host's workers
  (:class:`~server.core.ports.bus.Bus`) and what it delivers to
  (:class:`~server.core.ports.bus.Receiver`, the hub); implemented under ``server/bus/``.

Only ``server/app.py`` picks the concrete implementations.
"""
