"""The embedded broker stays fast: broadcasts stop going to the mailboxes of workers that left.

    pytest tests/test_embedded_pidbox.py

On kombu's filesystem transport a broadcast (ping, inspect, revoke) writes one message file per
queue bound to the `celery.pidbox` exchange. kombu never unbinds a worker's mailbox, so every
worker that ever ran kept receiving files that nobody reads, and each read of the folder got
slower (`benchmark.py --broker embedded --repeat 3` slowed down round after round).
stack/embedded.py unbinds a mailbox when its worker stops cleanly, and drops one that nobody
has read for ``stale_after`` seconds (a worker that was killed).
"""
import json
import os
import signal
import socket
import time
from pathlib import Path

from helpers import client_app, start_worker

import stack

HOST = socket.gethostname()


def mailboxes(root):
    """The queues bound to the broadcast exchange, from the transport's own table."""
    table = Path(root) / "control" / "celery.pidbox.exchange"
    return sorted(queue for _, _, queue in json.loads(table.read_text() or "[]"))


def waiting(root, queue):
    """Message files waiting in ``queue``."""
    return [n for n in os.listdir(Path(root) / "messages") if n.endswith(f".{queue}.msg")]


def mailbox(name):
    return f"{name}@{HOST}.celery.pidbox"


def embedded_workers(tmp_path, *names, **transport_options):
    env = stack.embedded_env(tmp_path / "stack")
    groups = {name: stack.Processes(tmp_path / name, env) for name in names}
    for name, procs in groups.items():
        start_worker(procs, name, "celery")
    app = client_app(env)
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **transport_options}
    stack.wait_for_workers(app, [f"{n}@{HOST}" for n in names], 60)
    return env["CELERY_FS_ROOT"], app, groups


def test_a_worker_that_stops_cleanly_unbinds_its_mailbox(tmp_path):
    root, app, groups = embedded_workers(tmp_path, "leaves", "stays")
    try:
        assert {mailbox("leaves"), mailbox("stays")} <= set(mailboxes(root))
        groups["leaves"].stop_all(grace=20)  # SIGTERM: a warm shutdown
        assert groups["leaves"].exited()[0][1] == 0, groups["leaves"].log_tail("leaves")
        assert mailbox("leaves") not in mailboxes(root)
        assert mailbox("stays") in mailboxes(root)
        replies = app.control.ping(timeout=2)
        assert [list(r) for r in replies] == [[f"stays@{HOST}"]]
        assert waiting(root, mailbox("leaves")) == [], "a broadcast went to the gone worker"
    finally:
        for procs in groups.values():
            procs.stop_all()


def test_the_mailbox_of_a_killed_worker_is_dropped_once_nobody_reads_it(tmp_path):
    root, app, groups = embedded_workers(tmp_path, "killed", "alive", stale_after=3.0)
    try:
        killed = groups["killed"].started[0][1]
        os.killpg(killed.pid, signal.SIGKILL)  # no clean shutdown: its binding stays behind
        killed.wait(timeout=10)
        assert mailbox("killed") in mailboxes(root)
        assert len(app.control.ping(timeout=1)) == 1
        assert len(waiting(root, mailbox("killed"))) == 1, "the broadcast reached the mailbox"
        time.sleep(4)  # nobody reads it: older than stale_after (the live worker read its own)
        assert len(app.control.ping(timeout=1)) == 1
        assert mailbox("killed") not in mailboxes(root)
        assert waiting(root, mailbox("killed")) == [], "its messages are deleted with it"
        assert mailbox("alive") in mailboxes(root), "a worker that reads its mailbox keeps it"
    finally:
        for procs in groups.values():
            procs.stop_all()
