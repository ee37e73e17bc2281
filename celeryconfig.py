"""Celery configuration for the demo: broker, results, queues, routes, limits, beat, tuning.

    python -m celeryconfig          # print the effective configuration (passwords masked)

Every URL can be overridden from the environment, so the same code runs against RabbitMQ,
Redis, Amazon SQS, Docker, or the embedded file-based stack that ``run_demo.py`` falls back to
(``python run_demo.py --broker redis --backend postgresql`` sets them for you):

    CELERY_BROKER_URL       default amqp://guest:guest@localhost:5672//; or
                            redis://localhost:6379/0, sqs://KEY:SECRET@ (Amazon),
                            sqs://KEY:SECRET@127.0.0.1:PORT (a local SQS-compatible server),
                            filesystem:// (no server: message files in CELERY_FS_ROOT)
    CELERY_RESULT_BACKEND   default redis://localhost:6379/0; or rpc://, file:///ABSOLUTE/PATH,
                            db+postgresql+psycopg://USER:PASSWORD@localhost:5432/DATABASE
    CELERY_FS_ROOT          folder for the filesystem:// broker (default: celery-fs in the
                            current folder; folders are created when missing)
    CELERY_RESULT_SENTINEL_MASTER  with sentinel:// result URLs: the name the sentinels
                            monitor (default mymaster; docs/cluster.md)
    CELERY_RESULT_KEYPREFIX optional prefix for every result key in Redis (isolates test runs)
    CELERY_BROKER_PREFIX    optional prefix for the broker's Redis keys or SQS queue names (ditto)

What each broker and backend can and cannot do (chords on rpc://, remote control on SQS, the
direction of priorities) is a table in stack/capabilities.py.
"""
import os
import sys
from datetime import timedelta

from celery.schedules import crontab
from kombu import Exchange, Queue

broker_url = os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost:5672//")
result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://localhost:6379/0")

# --- The demo's extras, where stack/ is beside this file -------------------------------------
# Celery and kombu load each of them by the name given here: a worker's start-up checks and
# workarounds for two Celery bugs (stack/worker_signals.py); a file:// result and a
# filesystem:// message that are never read half-written (stack/embedded.py). A copy of
# tasks.py and this file without stack/ runs the same tasks without them.
HERE = os.path.dirname(os.path.abspath(__file__))
EXTRAS = os.path.isdir(os.path.join(HERE, "stack"))
if EXTRAS:
    # `celery -A tasks ...` has this folder on sys.path only while it imports tasks.py and
    # this file; Celery and kombu import the names below later, when they first need them.
    # (Celery's cwd_in_path then removes only the entry it put in.)
    if sys.path.count(HERE) < 2:
        sys.path.append(HERE)
    imports = ("stack.worker_signals",)  # a worker imports these as it starts
    override_backends = {"file": "stack.embedded:AtomicFileBackend",  # file:// URLs get it
                         # rpc:// without a declare that retries for ever (stack/celery_gaps.py)
                         "rpc": "stack.celery_gaps:RPCBackend"}


def _folder(path, used_for, setting):
    """Create the folder ``path`` if it is not there; stop in one line if it cannot be used."""
    if not path:
        raise SystemExit(f"no folder given for {used_for}: set {setting}")
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"no permission to write in {path}")
    except OSError as exc:
        problem = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            problem = "a file is in the way"
        raise SystemExit(f"cannot use the folder {path} for {used_for} ({problem}); "
                         f"fix it, or choose another folder with {setting}") from None
    return path


# The filesystem transport (pure Python, no server) keeps its messages in folders, created
# here; the control folder gives it fanout, which inspect/control/revoke and events (Flower)
# need. Every process must use the same folders: run each command from this folder, or set
# CELERY_FS_ROOT to the same absolute path everywhere.
if broker_url.startswith("filesystem://"):
    _root = os.path.abspath(os.environ.get("CELERY_FS_ROOT", "celery-fs"))
    broker_transport_options = {
        "data_folder_in": _folder(os.path.join(_root, "messages"), "the broker's messages",
                                  "CELERY_FS_ROOT"),
        "data_folder_out": os.path.join(_root, "messages"),
        "control_folder": _folder(os.path.join(_root, "control"), "the broker's control messages",
                                  "CELERY_FS_ROOT"),
        "polling_interval": 0.1,  # the default (1 s) adds a second to every hop of a chain
    }
    if EXTRAS:  # kombu's transport, but a message file is never seen half-written
        broker_transport = "stack.embedded:FilesystemTransport"

# file:// results: one file per task in this folder, created here
if result_backend.startswith("file://"):
    _folder(result_backend.removeprefix("file://localhost").removeprefix("file://"),
            "the results", "CELERY_RESULT_BACKEND=file:///ABSOLUTE/PATH")

# memory:// (complete_demo.py, tests) lives in one process; polling it often costs nothing.
if broker_url.startswith("memory://"):
    broker_transport_options = {"polling_interval": 0.05}

# A RabbitMQ cluster: CELERY_BROKER_URL lists its nodes, separated by ";" (docs/cluster.md), and
# kombu moves on to the next when one fails. (kombu gaps made a send wait up to a minute, then
# 20 s, on a node that was cut off: the demo's clients and workers work around them with a
# deadline of 14 s per send, stack/celery_gaps.py.)

# RabbitMQ: a publish returns only once the broker confirms it holds the message. Without
# confirms, a message the broker refuses (bigger than its max_message_size, 128 MiB) is dropped
# silently and its task stays PENDING forever; with them apply_async raises PRECONDITION_FAILED.
# The price: about twice the client CPU per message (benchmark.py: 157 vs 70 us per send).
# The socket timeouts are explained in the section "Timeouts and reconnection, by role" below.
if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
    broker_transport_options = {
        "confirm_publish": True,
        # py-amqp sets these as SO_RCVTIMEO / SO_SNDTIMEO on the broker socket: no read or
        # write, including the wait for a publisher confirm and a channel/connection close,
        # blocks longer. A healthy RabbitMQ answers in milliseconds; 6 s is far above that
        # and well below every demo's deadline (10 s). Celery has no setting for kombu's
        # per-publish confirm_timeout (apply_async(confirm_timeout=...) only), so the read
        # timeout is what bounds the confirm wait: it is a socket read like any other.
        "read_timeout": 6,
        "write_timeout": 6,
    }
    # [client] A failover list: a connection that is not open yet (the pool's, after a node
    # failed) tries the next node when one does not answer, for up to 7 s: two connect
    # timeouts and a little. kombu's default gives that whole search one connect timeout
    # (3 s), so it never got past a node that was cut off: measured, 13 sends in a row failed
    # after 3 s each, on the same dead node, while two nodes were serving.
    if ";" in broker_url:
        broker_transport_options["connect_retries_timeout"] = 7

# Redis as the broker. A message a worker has taken but not yet acknowledged goes back to the
# queue after `visibility_timeout`: a late-ack task (tasks.slow_task) that runs longer than that,
# or a countdown/eta further ahead, is delivered again and RUNS TWICE. Keep it above your
# longest task and countdown (kombu's default is the same hour; it is here to be seen).
# Priorities work, but 0 is the MOST urgent (the opposite of RabbitMQ), and each queue is split
# into one list per step of `priority_steps`: priorities 1-3 share a list, and so on.
if broker_url.startswith(("redis://", "rediss://")):
    broker_transport_options = {"visibility_timeout": 3600, "priority_steps": [0, 3, 6, 9],
                                "queue_order_strategy": "priority",
                                # one Redis command, as for the results below: without it a
                                # publish to a frozen Redis waits forever (tests/test_diagnosis.py)
                                "socket_timeout": 5}
    if os.environ.get("CELERY_BROKER_PREFIX"):  # every key and channel, so runs never mix
        broker_transport_options["global_keyprefix"] = os.environ["CELERY_BROKER_PREFIX"]

# Amazon SQS (or a local SQS-compatible server: `python run_demo.py --broker sqs` starts one).
# SQS has no fanout exchange, so Celery has no remote control there (no inspect, ping, revoke
# broadcast) and no events (no Flower). visibility_timeout means the same as on Redis.
if broker_url.startswith("sqs://"):
    broker_transport_options = {
        "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "visibility_timeout": 3600,
        # Long polling: a receive waits up to 2 s on the server and returns as soon as a
        # message arrives; on Amazon, 10-20 s costs fewer requests, but a worker's warm
        # shutdown then waits that long for its last poll.
        "wait_time_seconds": 2,
        "polling_interval": 0,
        "queue_name_prefix": os.environ.get("CELERY_BROKER_PREFIX", ""),
        # botocore's defaults (60 s, several retries) would hide a missing endpoint for minutes.
        # A read gives up after 4 s, above the 2 s long poll a worker's receive waits, and is
        # not repeated by botocore: a client's publish retries already (task_publish_retry_policy,
        # each retry listing the queues again), so a frozen endpoint fails a send in about 20 s.
        # (10 s and 2 attempts per read made that 2 minutes: tests/test_diagnosis.py.)
        "client-config": {"connect_timeout": 3, "read_timeout": 4,
                          "retries": {"total_max_attempts": 1}},
    }

# --- Serialization: JSON only. Pickle lets whoever can publish a message run code. ----------
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# --- Queues and routes ----------------------------------------------------------------------
# Every queue but one is declared exactly as Celery declares a queue it has never heard of
# (a direct exchange of the queue's name, no arguments), so any client with Celery's default
# settings, or a client in another language, can declare it too and call these workers
# (docs/other-applications.md). RabbitMQ refuses to redeclare a queue with other arguments
# (PRECONDITION_FAILED): the one queue with arguments, priority_queue, is ours alone, and
# docs/troubleshooting.md says what to do about a queue an older version of this demo declared.
#
# CELERY_QUEUE_TYPE=quorum declares every queue as a quorum queue (replicated over a RabbitMQ
# cluster, docs/cluster.md). Quorum queues on RabbitMQ 3.x have no priorities, and Celery's
# native delayed delivery (countdown, ETA, retry on quorum queues) routes through topic
# exchanges only, so that mode uses topic exchanges. Every client of a quorum-queue broker must
# declare the same: the queue type is a declare-time argument, like x-max-priority.
QUEUE_TYPE = os.environ.get("CELERY_QUEUE_TYPE", "classic")
if QUEUE_TYPE not in ("classic", "quorum"):
    raise SystemExit(f"CELERY_QUEUE_TYPE must be 'classic' or 'quorum', not {QUEUE_TYPE!r}")
MAX_PRIORITY = 10
QUEUE_NAMES = ("celery", "fast_queue", "slow_queue", "network_queue", "priority_queue")


def _queue(name):
    if QUEUE_TYPE == "quorum":
        return Queue(name, Exchange(name, type="topic"), routing_key=name,
                     queue_arguments={"x-queue-type": "quorum"})
    arguments = {"x-max-priority": MAX_PRIORITY} if name == "priority_queue" else None
    return Queue(name, Exchange(name, type="direct"), routing_key=name,
                 queue_arguments=arguments)


task_queues = tuple(_queue(name) for name in QUEUE_NAMES)
task_default_queue = "celery"
task_default_exchange = "celery"
task_default_routing_key = "celery"
task_routes = {
    "tasks.fast_task": {"queue": "fast_queue"},
    "tasks.slow_task": {"queue": "slow_queue"},
    "tasks.fetch_url": {"queue": "network_queue"},
    "tasks.priority_task": {"queue": "priority_queue"},
    # everything else (add, canvas steps, callbacks, beat jobs) goes to the default "celery" queue
}

# --- Rate limits ----------------------------------------------------------------------------
# 5 per second shows the throttling within a couple of seconds (the classic "10/m" would make
# the demo wait a minute). Rate limits are enforced by each worker on its own, not globally.
task_annotations = {"tasks.limited_task": {"rate_limit": "5/s"}}

# --- Periodic tasks (run by exactly one `celery -A tasks beat`) ------------------------------
beat_schedule = {
    "check-system-every-3-seconds": {"task": "tasks.check_system", "schedule": timedelta(seconds=3)},
    "generate-report-every-minute": {"task": "tasks.generate_report", "schedule": crontab()},
}

# --- States, events and results -------------------------------------------------------------
task_track_started = True          # STARTED state, so a caller sees a task has been picked up
worker_send_task_events = True     # Flower and `celery events` need these
task_send_sent_event = True        # shows tasks in Flower before any worker picks them up
result_expires = 3600              # results are deleted after an hour; nobody reads them later
result_extended = True             # store name/args with results, so Flower and inspect show them

# --- Timeouts and reconnection, by role ------------------------------------------------------
# Two kinds of process read this file, and they must behave oppositely when a service fails:
# - a CLIENT (client.py, client_fixed.py, run_demo.py, benchmark.py, your web app: anything
#   that sends tasks and reads results) must answer its user within a deadline, so every wait
#   is bounded and a failure is an exception naming the service (stack/deadlines.py turns it
#   into one line). Clients read the settings marked [client] (and the socket timeouts above).
# - a WORKER or BEAT must wait for its broker as long as it takes, and serve again once it is
#   back: a routine broker restart must not take the fleet down. Celery reads the settings
#   marked [worker] only in the worker's consumer and in beat, never in a client, so this
#   one file serves both roles without any switch.
broker_connection_timeout = 3                # [both] seconds for one TCP connect + handshake
broker_connection_retry_on_startup = True    # [worker] wait for a broker that is starting ...
broker_connection_max_retries = None         # [worker] ... and for one that restarts, forever:
# each attempt logs "Cannot connect to amqp://...: Trying again in N seconds... (k/None)";
# kombu's backoff is 2 s, then 2 s longer each time, capped at 30 s. (It used to be 5: a
# worker exited for good after ~30 s, so a 45 s broker restart stopped every worker.)
broker_heartbeat = 10                        # [worker] AMQP heartbeat, in seconds. A worker
# that hears nothing for two intervals (20 s, checked every 10/3 s) drops the connection and
# reconnects; RabbitMQ closes the connection of a worker it has not heard from for two
# intervals (a host that vanished: no FIN, no RST) within about 20-30 s, and redelivers the
# unacknowledged late-ack tasks that worker held (docs/more-machines.md relies on this). The
# cost: one small frame every 5 s per connection. The default, 120 s, would take 4-6 minutes.
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                             "interval_max": 1}  # [client] a client with no broker fails in seconds
redis_socket_connect_timeout = 3             # [both] seconds to connect to Redis
redis_socket_timeout = 5                     # [both] one Redis command: milliseconds when
# healthy; 5 s means "Redis stopped answering" (10 s with the one retry of
# result_backend_always_retry below). It used to be 30 s: a frozen Redis turned a 10 s
# deadline into 30-40 s.
redis_backend_health_check_interval = 10     # [both] PING a connection idle this long before
# using it, so a connection that died quietly (Redis restarted) is replaced, not read from.
result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}  # [both] total seconds
# of reconnecting for one result write/read before giving up

# PostgreSQL results (SQLAlchemy): tables celery_taskmeta/celery_tasksetmeta are created on first
# use; a server that does not answer fails a connect within 3 s instead of the OS's minutes.
if result_backend.startswith("db+postgresql"):
    database_engine_options = {"connect_args": {"connect_timeout": 3}, "pool_pre_ping": True}
    if EXTRAS:  # one connect before Celery's table creation, which retries ten times
        database_engine_callback = "stack.celery_gaps:fail_fast_table_creation"

# A Redis connection that an outage broke (the broker host was cut off, then came back) fails
# on its next use with "Error 32 while writing to socket. Broken pipe": a task would fail in
# the worker for nothing. One retry opens a new connection; a Redis that is really down still
# fails at once. (tests/test_hosts.py: the broker host cut for 20 s, then every demo again.)
result_backend_always_retry = True
result_backend_max_retries = 1
# Redis Sentinel (docs/cluster.md, section 10): CELERY_RESULT_BACKEND lists the sentinels,
# sentinel://:PASSWORD@HOST:PORT/DB separated by ";", and Celery asks them which Redis is the
# primary of the group named here (the name in `sentinel monitor NAME ...`): the URL cannot
# carry it, so it has a setting of its own.
# [both] While the primary is gone and the sentinels promote its replica (about 2 s after it
# stopped answering for down-after-milliseconds), every Redis command is refused. A worker
# storing a result reads the old one first, and only Celery's retries of the whole store
# (above) cover that read: one retry, 0-20 ms later, lost the results of tasks that finished
# during the failover (measured: 3 of 100). Twelve retries, each 0 to 2 s after the last
# (random, growing), span a failover many times over; a Redis that is really gone fails later.
if result_backend.startswith("sentinel://"):
    result_backend_transport_options["master_name"] = os.environ.get(
        "CELERY_RESULT_SENTINEL_MASTER", "mymaster")
    # [both] Celery gives the connections to the sentinels themselves no options (redis-py
    # copies the socket timeouts to them only when sentinel_kwargs is absent): a frozen
    # sentinel blocked a client for ever, and each one that refused took 4 s of redis-py's
    # retries (retry None: one try; Celery's retries above come on top).
    result_backend_transport_options["sentinel_kwargs"] = {
        "socket_connect_timeout": redis_socket_connect_timeout,
        "socket_timeout": redis_socket_timeout, "retry": None}
    result_backend_max_retries = 12
    result_backend_base_sleep_between_retries_ms = 100
    result_backend_max_sleep_between_retries_ms = 2000
# Several demo runs (or test runs) can share one Redis when each has its own key prefix.
if os.environ.get("CELERY_RESULT_KEYPREFIX"):
    result_backend_transport_options["global_keyprefix"] = os.environ["CELERY_RESULT_KEYPREFIX"]

# --- Tuning knobs (see benchmark.py and docs/performance.md) --------------------------------
worker_concurrency = None          # None = one process per CPU; raise it for I/O-bound work
worker_prefetch_multiplier = 1     # 1 = fair for long tasks; 64 for tiny ones (the fast_queue worker)
task_acks_late = False             # True re-runs tasks whose worker died, but needs idempotent tasks
broker_pool_limit = 10             # connections a client keeps open; raise for many threads
task_compression = None            # "gzip" when payloads are large (> tens of kB)
result_compression = None          # the same for large results
worker_max_tasks_per_child = 1000  # recycles a child process to contain memory leaks
worker_cancel_long_running_tasks_on_connection_loss = True  # late-ack tasks are redelivered anyway


def masked(url):
    """``url`` with every password replaced: each URL of a ";" list (a failover list, the
    sentinels), where kombu's maybe_sanitize_url masks only the first."""
    from kombu.utils.url import maybe_sanitize_url
    return ";".join(maybe_sanitize_url(part) for part in url.split(";"))


def summary():
    """The effective settings as printable lines, with passwords masked."""
    names = sorted(k for k in globals()
                   if k[0].islower() and k not in ("summary", "effective_pair"))
    lines = []
    for name in names:
        value = globals()[name]
        if callable(value) or type(value).__name__ == "module":
            continue
        if name in ("broker_url", "result_backend"):
            value = masked(value)
        lines.append(f"{name} = {value!r}")
    return lines


def effective_pair():
    """Which broker and result backend this configuration uses, and what they cannot do
    (stack/capabilities.py: one of the extras)."""
    # Only called where stack/ sits beside this file (EXTRAS, in __main__ below): a copy of
    # this file alone never reaches this import, and `python -m celeryconfig` prints the rest.
    from stack import capabilities
    offers = capabilities.offers_for(broker_url, result_backend, queue_type=QUEUE_TYPE)
    lines = [f"# broker: {offers.broker.kind} ({masked(broker_url)}); "
             f"result backend: {offers.backend.kind} ({masked(result_backend)})"]
    lines += [f"#   cannot: {feature}: {why}" for feature, why in offers.missing()]
    return lines


if __name__ == "__main__":
    print("\n".join((effective_pair() if EXTRAS else []) + summary()))
