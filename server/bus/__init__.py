"""The notice bus between the workers of one host: each worker's commits reach the others' hubs.

* :mod:`server.bus.local`: over Unix datagrams in the supervisor's runtime directory
  (:mod:`server.bus.local_send`, :mod:`server.bus.local_dir`, :mod:`server.bus.local_wire`,
  :mod:`server.bus.local_interest`);
* :mod:`server.bus.reconcile`: repair of missed notices from the store, for any bus;
* :mod:`server.bus.stats`: the counters a bus keeps (``sluice_bus_*``).
"""
