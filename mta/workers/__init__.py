"""Worker processes: more SMTP receivers on the same ports and the same spool.

One Python process runs on one core.  With ``workers: N`` (N > 0), ``mta
serve`` starts N worker processes.  Each one binds the listeners that offer
no AUTH with ``SO_REUSEPORT``, so the kernel spreads new connections over
them; receives mail with the same session code and policy; stores it
durably in the main process's spool shard (queue ids are unique, and a
worker only ever adds new messages, see ``Spool.attach``); and only then
announces the stored record, and every mail event, to the main process over
a socket pair, one JSON line each.

The main process does everything else for all mail: scheduling and delivery,
the AUTH listeners (so that brute-force throttling and account limits count
every attempt in one place), health and metrics (worker events feed the
same counters and webhooks; their sessions, spool commits and store
durations are added to the gauges, counters and histogram), the control socket, the drain and the identity checks.

The pieces: ``supervisor`` (the main process's side: start, feed, watch,
restart, stop), ``child`` (the body of ``mta worker``) and ``channel`` (the
line protocol between them).

Failure: a worker that cannot start its listeners stops ``mta serve`` from
starting (``WorkerError``).  A worker that exits while the server runs is logged
(``worker_exited``) and started again after a second.  A message a worker
stored but could not announce before it died is on disk all the same: the
main process looks for such messages in ``incoming/`` after a worker exits
and every ``RESCAN`` seconds.  When the main process goes away, the workers
see the end of the channel and stop: they never run on their own.
"""

from __future__ import annotations

from mta.config import Config, ListenerConfig


def shared(config: Config) -> list[ListenerConfig]:
    """The listeners every worker serves: those without AUTH."""
    return [item for item in config.listeners if item.auth is None]
