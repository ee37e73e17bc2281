"""Workarounds for gaps in Celery 5.7, each in one function or class, each with its issue.

Two are the worker's, installed at worker_init (a worker's start, stack/worker_signals.py), and
only there. Two bound a client's waits, and every process that uses the result backend loads
them by the name celeryconfig gives: RPCBackend (``override_backends``) and
``fail_fast_table_creation`` (``database_engine_callback``). Remove each when the Celery
release that fixes it is pinned.

One more gap is worked around where no module of stack/ is loaded yet, in tasks.py:
celeryconfig's ``override_backends`` reaches Celery's loader only once the configuration is
read, but ``app.backend`` does not read it first (celery/celery#7270): a bare ``import tasks;
AsyncResult(id, app=tasks.app).state`` got Celery's FilesystemBackend, not AtomicFileBackend.
tasks.py reads its configuration at once (``config_from_object(..., force=True)``).
"""
import functools

from celery.backends import rpc
from celery._state import task_join_will_block
from kombu.common import maybe_declare

__all__ = ["bound_event_retries", "track_only_live_children", "RPCBackend",
           "fail_fast_table_creation"]

# One quick retry for an event the worker sends: see bound_event_retries
EVENT_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 1,
                      "interval_max": 1}


def bound_event_retries():
    """Give the events a worker sends with retry=True a bounded retry policy.

    Celery gap: the worker's event heartbeat (``-E``, every 2 s) publishes with retry=True and
    no retry policy (added in celery/celery#4804 for celery/celery#4758), so kombu reconnects
    for ever *inside the worker's event loop* while the broker is frozen. The loop then never
    runs its AMQP heartbeat check, and the worker never notices its dead connection (measured:
    still stuck after 60 s). With one quick retry the loop stays free; the event connection is
    rebuilt anyway when the consumer reconnects. Called at worker_init.
    """
    from celery.events.dispatcher import EventDispatcher
    send = EventDispatcher.send
    if getattr(send, "bounded", False):
        return

    @functools.wraps(send)
    def bounded_send(self, type, *args, retry=False, retry_policy=None, **fields):
        if retry and retry_policy is None:
            retry_policy = EVENT_RETRY_POLICY
        return send(self, type, *args, retry=retry, retry_policy=retry_policy, **fields)

    bounded_send.bounded = True
    EventDispatcher.send = bounded_send


def track_only_live_children():
    """Let a prefork worker reconnect after a child process it no longer tracks has exited.

    Celery gap (a sibling of celery/celery#9250, whose fix, celery/celery#10318, catches
    AttributeError only): when a pool child exits, AsynPool untracks it by setting its
    ``_sentinel_poll`` to None. If the consumer restarts (a lost broker connection) before the
    pool has dropped that child, ``register_with_event_loop`` tracks it again, hands None to
    the hub, and the worker stops with ``ValueError: file descriptor is None`` instead of
    reconnecting (seen in tests/test_hosts.py: a worker whose host was cut twice). A child
    that was untracked has exited: there is nothing to track, so skip it.
    """
    from celery.concurrency.asynpool import AsynPool
    track = AsynPool._track_child_process
    if getattr(track, "skips_untracked", False):
        return

    @functools.wraps(track)
    def track_live(self, proc, hub):
        if getattr(proc, "_sentinel_poll", 0) is None:  # untracked: the child has exited
            return
        return track(self, proc, hub)

    track_live.skips_untracked = True
    AsynPool._track_child_process = track_live


class RPCBackend(rpc.RPCBackend):
    """Celery's rpc:// result backend, but declaring a reply queue gives up like a publish does.

    Celery gap (the rpc:// side of celery/celery#4296 and #6911, "apply_async waits forever
    when the broker is down"): before each send, ``on_task_call`` declares the caller's reply
    queue with ``maybe_declare(retry=True)`` and no retry policy, so kombu reconnects for ever.
    The queue is one per thread (``app.thread_oid``): the first send from any thread but the
    main one (web.py's thread pool) hung for good on a frozen broker or on SQS. This one
    retries as the client's publish does (``task_publish_retry_policy``), then raises.
    """

    def on_task_call(self, producer, task_id):
        if not task_join_will_block():
            maybe_declare(self.binding(producer.channel), retry=True,
                          **(self.app.conf.task_publish_retry_policy or {}))


_answering_databases = set()  # the URLs whose database answered this process once


def fail_fast_table_creation(engine):
    """Connect once before Celery creates its tables: a database that does not answer fails in
    one ``connect_timeout``, not in eleven.

    Celery gap: the database backend creates its tables (at setup, and in each process's first
    use) in a loop that retries ``create_all`` ten times on any DatabaseError, connection
    failures included (celery/backends/database/session.py, PREPARE_MODELS_MAX_RETRIES; the
    retries are meant for two processes creating the same table). With PostgreSQL frozen and
    ``connect_timeout`` 3 s that was 35 s, twice over with ``result_backend_max_retries``
    (measured: 69 s). Celery calls this for every engine it creates, before that loop (the
    ``database_engine_callback`` setting); after the first answer it costs nothing.
    """
    url = str(engine.url)
    if url not in _answering_databases:
        with engine.connect():
            pass
        _answering_databases.add(url)
