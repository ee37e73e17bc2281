"""Workarounds for gaps in Celery 5.7, each in one function or class, each with its issue.

The worker's are installed at worker_init (a worker's start, stack/worker_signals.py);
sub_second_countdowns and failover_without_goodbye, which clients need too, by
``install_client_workarounds`` (quorum queues; a failover list of brokers), which this
project's clients call (stack.ClientGuard, stack/cluster.py) and workers and beat too. Two
bound a client's waits, and every process that uses the result backend loads them by the name
celeryconfig gives: RPCBackend (``override_backends``) and ``fail_fast_table_creation``
(``database_engine_callback``). Remove each when the Celery release that fixes it is pinned.

A further gap is worked around where no module of stack/ is loaded yet, in tasks.py:
celeryconfig's ``override_backends`` reaches Celery's loader only once the configuration is
read, but ``app.backend`` does not read it first (celery/celery#7270): a bare ``import tasks;
AsyncResult(id, app=tasks.app).state`` got Celery's FilesystemBackend, not AtomicFileBackend.
tasks.py reads its configuration at once (``config_from_object(..., force=True)``).
"""
import functools
import socket
import threading
import time

from amqp.exceptions import MessageNacked
from celery.backends import rpc
from celery._state import task_join_will_block
from kombu.common import maybe_declare
from kombu.exceptions import OperationalError

__all__ = ["bound_event_retries", "track_only_live_children", "sub_second_countdowns",
           "delayed_delivery_on_current_node", "declare_queues_before_delay_binding",
           "failover_without_goodbye", "sends_within_deadline", "install_client_workarounds",
           "RPCBackend",
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


def sub_second_countdowns():
    """Let a countdown under one second work on quorum queues (native delayed delivery).

    Celery gap (no upstream issue found; reproduction in docs/cluster.md): with quorum queues,
    ``apply_async(countdown=0.3)`` and ``self.retry(countdown=0.1)`` raise
    ``ValueError: countdown must be a positive number``: Celery passes ``int(countdown)``, 0,
    to kombu's ``calculate_routing_key``, which refuses it. A routing key of 28 zero bits
    passes every delay level at once; the message still carries its ETA, and the worker holds
    it for the rest of the second, as it does on classic queues.
    """
    import celery.app.base as base
    from kombu.transport.native_delayed_delivery import MAX_NUMBER_OF_BITS_TO_USE as BITS
    calculate = base.calculate_routing_key
    if getattr(calculate, "allows_zero", False):
        return

    @functools.wraps(calculate)
    def calculate_routing_key(countdown, routing_key):
        if countdown == 0:  # the key of 1 s with its last bit cleared (prefix stripping kept)
            return "0." * BITS + calculate(1, routing_key)[2 * BITS:]
        return calculate(countdown, routing_key)

    calculate_routing_key.allows_zero = True
    base.calculate_routing_key = calculate_routing_key


def delayed_delivery_on_current_node():
    """Set up native delayed delivery over the consumer's own broker only, not every URL.

    Celery gap (celery/celery#9960, #9912, #10111; the failover hangs of #3921 and #4075):
    with a failover list (``amqp://a;amqp://b;amqp://c``), the DelayedDelivery consumer step
    declares its exchanges and queues on *every* URL of the list, retrying each. With one node
    cut off (no FIN), each attempt waits on that node longer than the heartbeat, the
    consumer's own connection is dropped, the consumer restarts and starts over: measured,
    0 consumers for 4+ minutes, until the node came back. The topology lives in the cluster,
    not on a node, so declaring it once, on the node the consumer is connected to, is enough.
    """
    from celery.worker.consumer.delayed_delivery import DelayedDelivery
    start = DelayedDelivery.start
    if getattr(start, "current_node_only", False):
        return

    @functools.wraps(start)
    def start_on_current_node(self, c):
        if c.connection is not None and c.connection.connected:
            here = c.connection.as_uri(include_password=True)
            self._validate_broker_urls = lambda urls: {here}  # this step's list of URLs
        return start(self, c)

    start_on_current_node.current_node_only = True
    DelayedDelivery.start = start_on_current_node


def declare_queues_before_delay_binding():
    """Declare each queue (and its exchange) before binding it for native delayed delivery.

    Celery gap (celery/celery#9960; its fix, celery/celery#9959, goes on to the next queue but
    still leaves this one unbound): a worker binds *every* queue of ``task_queues`` to the
    delayed delivery exchange, and a queue no worker has declared yet fails with
    ``NOT_FOUND - no exchange 'fast_queue'``: the worker logs "Failed to setup delayed
    delivery ... will not be available", and a countdown task sent to that queue before its
    own worker starts is dropped when it is due (no binding routes it). Declaring is what a
    client does before it publishes; it changes nothing for a queue that exists.
    """
    from celery.worker.consumer import delayed_delivery as step
    bind = step.bind_queue_to_native_delayed_delivery_exchange
    if getattr(bind, "declares", False):
        return

    @functools.wraps(bind)
    def declare_and_bind(connection, queue, *args, **kwargs):
        queue.bind(connection.default_channel).declare()
        return bind(connection, queue, *args, **kwargs)

    declare_and_bind.declares = True
    step.bind_queue_to_native_delayed_delivery_exchange = declare_and_bind


def failover_without_goodbye():
    """When kombu fails over to the next broker of the list, drop the old connection at once.

    kombu gap (the client half of celery/celery#3921 and #4075): on a connection error kombu
    switches to the next URL (``Connection.maybe_switch_next`` -> ``switch``), and ``switch``
    first closes the old connection politely: py-amqp sends Close and waits for CloseOk, on a
    node that was cut off and never answers, then the channel's close the same way. Measured:
    one ``apply_async`` blocked 60.5 s there before it failed. A connection we are leaving
    because it failed needs no goodbye: ``collect()`` closes the socket without a handshake
    (what kombu itself does after a fork), and the switch goes on at once.
    """
    from kombu import Connection
    switch = Connection.switch
    if getattr(switch, "without_goodbye", False):
        return

    @functools.wraps(switch)
    def switch_at_once(self, conn_str):
        if self._connection is not None:
            self._default_channel = None  # its close would wait on the dead node too
            self.collect()
        return switch(self, conn_str)

    switch_at_once.without_goodbye = True
    Connection.switch = switch_at_once


# One send (the task's message and its task-sent event) ends within this many seconds: the 15 s
# that docs/cluster.md promises, less a second of slack for a loaded machine. A node cut off
# costs the cluster net_ticktime (10 s) and a little more before a queue it led confirms again
# (measured without a deadline: sends confirmed after 14.5 s and 20.4 s).
SEND_DEADLINE = 14.0
RETRIES_WITHIN_DEADLINE = 20  # the deadline, not this, ends a send that keeps failing
_send = threading.local()  # the deadline of the send this thread is in, if any


class SendDeadlineExceeded(OperationalError):
    """No node of the failover list confirmed the message in time: kombu's error for a broker
    that failed, which the project's one-line diagnosis turns into a line naming the broker,
    and which kombu's retry loop does not retry."""


def _drop_socket(connection, lock, state):
    """At the deadline: shut the socket a send is blocked on (a confirm, a declare, a channel
    open), so that its read returns at once; the send then gives up (past_deadline)."""
    with lock:
        if state["done"]:
            return
        state["expired"] = True
        sock = getattr(getattr(connection._connection, "transport", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: nothing blocks on it


def sends_within_deadline(seconds=SEND_DEADLINE):
    """End every send of a task within ``seconds``: it succeeds, or it raises
    SendDeadlineExceeded naming the nodes it tried.

    kombu/Celery gap (celery/kombu#1024, celery/celery#4627): ``task_publish_retry_policy``
    bounds how many times a send is tried, not how long: each attempt may connect (3 s on a
    cut-off node), open a channel and declare the queue (each waiting up to the 6 s read
    timeout: a node's declare waits until the cluster has declared the cut node down), then
    wait up to 6 s for the publisher confirm. Measured after a node was cut off: 20.4 s for
    one ``apply_async``, over three attempts. Here a send (``Celery.send_task``, which
    ``apply_async`` calls) sets a deadline; each of its publishes (the task, its task-sent
    event) arms a timer that shuts the socket it waits on at the deadline, and kombu's retry
    callback gives up before a connect that could end after it. Within the deadline a send is
    retried as often as it takes (a nack, from a node whose queue has no leader yet, half a
    second later): the deadline, not a count, ends it. A message whose confirm came too late
    may still be in the queue: the task can run although its send failed (tests/test_cluster.py
    counts those).
    """
    from celery import Celery
    from kombu import Producer
    send_task, publish = Celery.send_task, Producer.publish
    if getattr(send_task, "within_deadline", False):
        return

    @functools.wraps(send_task)
    def send_task_within(self, *args, **kwargs):
        if getattr(_send, "deadline", None) is not None:  # a send inside a send: the outer one
            return send_task(self, *args, **kwargs)
        _send.deadline, _send.tried = time.monotonic() + seconds, []
        try:
            return send_task(self, *args, **kwargs)
        finally:
            _send.deadline = None

    @functools.wraps(publish)
    def publish_within(self, *args, retry=False, retry_policy=None, **kwargs):
        deadline = getattr(_send, "deadline", None)
        if deadline is None:
            return publish(self, *args, retry=retry, retry_policy=retry_policy, **kwargs)
        connection = self.connection
        lock, state = threading.Lock(), {"done": False, "expired": False}

        def give_up(exc):
            tried = ", ".join(dict.fromkeys(_send.tried)) or connection.host
            error = SendDeadlineExceeded(f"no node confirmed the message (tried {tried}; last "
                                         f"{type(exc).__name__}: {exc})".replace(": )", ")"))
            error.seconds = seconds
            return error

        def past_deadline(exc, interval):
            """kombu calls this before each reconnect and each further connect attempt: no
            connect starts that could outlast the deadline (one to a cut-off node takes the
            whole connect timeout). A node that nacked the message has no leader for the
            queue yet (the old one was lost): ask again half a second later, not at once."""
            if time.monotonic() + connection.connect_timeout >= deadline or state["expired"]:
                raise give_up(exc) from exc
            _send.tried.append(connection.host)  # the node that failed, or the one tried next
            if isinstance(exc, MessageNacked):
                time.sleep(0.5)

        policy = dict(retry_policy or {}, errback=past_deadline,
                      on_revive=lambda channel: _send.tried.append(connection.host),
                      max_retries=RETRIES_WITHIN_DEADLINE)
        _send.tried.append(connection.host)
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), _drop_socket,
                                (connection, lock, state))
        timer.daemon = True
        timer.start()
        try:
            return publish(self, *args, retry=retry, retry_policy=policy, **kwargs)
        except SendDeadlineExceeded:
            raise
        except Exception as exc:
            if state["expired"] or time.monotonic() >= deadline:
                raise give_up(exc) from exc
            raise
        finally:
            with lock:
                state["done"] = True
            timer.cancel()

    send_task_within.within_deadline = True
    Celery.send_task, Producer.publish = send_task_within, publish_within


def install_client_workarounds(app):
    """The workarounds a process that sends tasks needs, by ``app``'s configuration: a
    failover list of brokers (failover_without_goodbye, sends_within_deadline), quorum queues
    (sub_second_countdowns).
    Called by this project's clients (stack.ClientGuard, the tests' and hosts' client apps) and,
    at worker_init and beat_init, by stack/worker_signals.py. Not from celeryconfig.py, which
    must stand alone: a plain copy of it goes without them (docs/cluster.md says what that
    costs)."""
    from .capabilities import queue_type
    if ";" in str(app.conf.broker_url):
        failover_without_goodbye()
        sends_within_deadline()
    if queue_type(app.conf.task_queues) == "quorum":
        sub_second_countdowns()


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
