"""The process model: a supervisor owning the listening sockets and N shared-nothing workers.

* :mod:`server.process.supervisor`: ``run_supervisor(config, config_source)``, what ``sluice serve`` runs;
* :mod:`server.process.worker`: one worker process (``python -m server.process.worker``);
* :mod:`server.process.slots`: the slots and worker processes the supervisor tracks;
* :mod:`server.process.sockets`: one SO_REUSEPORT socket per slot, or systemd socket activation;
* :mod:`server.process.instance`: at most one Sluice per address and per store file on a host;
* :mod:`server.process.signals`: signals that arrive outside trio's receiver, recorded;
* :mod:`server.process.backoff`: the restart policy for crashed workers;
* :mod:`server.process.sdnotify`: a minimal systemd ``sd_notify`` client;
* :mod:`server.process.drain`: draining one worker.
"""
