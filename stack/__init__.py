"""Plumbing a learner never has to open: services, processes, the embedded stack, compose.

Used by run_demo.py, complete_demo.py, benchmark.py and the tests, so the path a user runs is
the path the tests check. It knows nothing about the demos themselves. One concern a module:

    capabilities.py  what each broker, result backend and pool can do, and decide()
    services.py    find and check brokers and result backends (masked URLs, clear errors,
                   the fix for a queue RabbitMQ refuses to redeclare)
    processes.py   worker command lines, process groups with logs, waiting for workers, web.py
    embedded.py    the no-install stack: safe filesystem:// transport, in-process workers
    compose.py     docker compose up/stop and the compose broker's URL
    localsqs.py    a local SQS-compatible server (moto) and a run's SQS queues
    testing.py     throw-away vhosts and Redis key prefixes for tests and benchmarks
    flaky.py       a local HTTP server that fails N times, then answers (the retry demo)
    hosts.py       network-namespace "hosts" on this machine (root only; not imported here:
    brokerhost.py  `python -m stack.hosts`), the broker host's own RabbitMQ and Redis,
    cluster.py     a RabbitMQ cluster of three broker hosts (docs/cluster.md)
    faults.py      FaultProxy: forward, freeze or cut the TCP connections to a service
    resolve.py     the one resolver: defaults, environment, --broker/--backend, auto fallback
    deadlines.py   a client facing a failed service: name it, stop on a signal or deadline, leave
    celery_gaps.py Celery and kombu bugs worked around, each with its upstream issue (installed
                   by worker_signals.py in workers and beat, by install_client_workarounds in
                   this project's clients, or loaded by name from celeryconfig; not imported
                   here)
    worker_signals.py  a worker's start-up checks and the workarounds, as signal handlers:
                   celeryconfig's ``imports`` names it (not imported here)
    lessons.py     the harness under demos.py: registry, Context, wait, Outcome (imported by
                   demos.py, not here: its names are the lessons' own)

``import stack`` gives all of them, so scripts write ``stack.check_broker(...)``.
"""
from . import capabilities  # noqa: F401
from .capabilities import decide, offers_for, offers_of  # noqa: F401
from .services import *  # noqa: F401,F403
from .processes import *  # noqa: F401,F403
from .embedded import *  # noqa: F401,F403
from .compose import *  # noqa: F401,F403
from .localsqs import *  # noqa: F401,F403
from .testing import *  # noqa: F401,F403
from .flaky import *  # noqa: F401,F403
from .faults import *  # noqa: F401,F403
from .deadlines import *  # noqa: F401,F403
from .resolve import *  # noqa: F401,F403
