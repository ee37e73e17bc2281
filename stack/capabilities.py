"""What each broker, result backend and worker pool can carry, as data, and the one decision.

Owns: the table of brokers and result backends (their URL schemes, what each lacks and why,
the direction of priorities, the pip package of their driver, which system it is and how a
user checks it), what RabbitMQ's quorum queues take away (QUORUM_LACKS),
``offers_for(broker, backend, pool, queue_type)`` (``offers_of(app)`` reads them from a Celery
app) and ``decide(needs, offers)``, the one function that says whether something that needs
some features can run on a stack ("None": it runs) or not (the reason, for the user). It is the
one place that reads URL schemes: elsewhere ``is_kind(url, "redis")``,
``component(url, BROKERS).probe`` and ``how_to_check``.

It knows nothing of the demos: each demo declares what it needs (``@demo(needs=...)`` in
demos.py), and client_fixed.py, complete_demo.py, run_demo.py and the tests all ask
``decide``. What a component does not list under ``lacks`` it offers. The facts come from
running each combination for real (docs/configuration.md, tests/test_stacks.py).
"""
import os
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

# Every feature a demo may need, and who provides it.
FEATURES = {
    "chords": "result backend: a chord's callback runs once every header task stored its result",
    "result_polling": "result backend: the caller and other tasks read a task's state and "
                      "result by polling (PROGRESS and STARTED included)",
    "shared_results": "result backend: another process (a second terminal, a web request, "
                      "Flower) looks a result up by its task id",
    "revoked_state": "result backend: a REVOKED state set by a worker reaches the caller",
    "remote_control": "broker: broadcast to every worker (inspect, ping, revoke, stats)",
    "events": "broker: workers' task events (Flower, `celery events`)",
    "priority": "broker: urgent messages are handed out before waiting ones",
    "terminate": "worker pool: revoke(terminate=True) stops a running task",
    "time_limits": "worker pool: soft and hard time limits interrupt a running task",
    "global_qos": "broker: one prefetch limit shared by all the queues a worker consumes",
}

HIGHER_FIRST = "higher number first"  # RabbitMQ: 0..x-max-priority, 9 beats 1
LOWER_FIRST = "0 is the most urgent"  # Redis: bucketed by priority_steps (0, 3, 6, 9)


@dataclass(frozen=True)
class Component:
    """One broker, result backend or worker pool, and what it cannot do (with the reason)."""
    kind: str                      # the name run_demo.py's --broker / --backend take
    role: str                      # "broker", "result backend" or "pool"
    schemes: tuple = ()            # URL schemes that select it
    lacks: dict = field(default_factory=dict)  # feature -> why not, as the user reads it
    priority: str = ""             # HIGHER_FIRST, LOWER_FIRST, or "" (no priorities)
    drops_expired: bool = False    # the broker itself discards a message whose `expires` passed
    modules: tuple = ()            # what must import for its driver ...
    install: str = ""              # ... and the pip command that installs it
    system: str = ""               # the system a failure message names: "RabbitMQ", "Redis" ...
    probe: str = ""                # how stack.services checks it answers: "kombu" (connect),
    #                                "redis" (PING), "sentinel" (ask for the primary, PING it),
    #                                "sql" (SELECT 1), "folder", "" (nothing)
    check: str = ""                # how the user checks it; {url} {host} {port} {folder}
    #                                {endpoint} {master} are filled in by how_to_check()

    def offers(self, feature):
        return feature not in self.lacks

    def priority_levels(self):
        """(urgent, routine) priorities for this broker's direction."""
        return (0, 9) if self.priority == LOWER_FIRST else (9, 1)

    def how_to_check(self, url, folder=None, master=None):
        """The check a failure message tells the user to run, for this component at ``url``
        (masked; of a ";" list, the first URL); ``folder``: the filesystem transport's folder,
        from its transport options; ``master``: the name Redis Sentinel monitors
        (sentinel_master())."""
        from kombu.utils.url import maybe_sanitize_url
        url = str(url or "").split(";")[0]
        parsed = urlparse(url)
        try:
            host, port = parsed.hostname or "localhost", parsed.port
        except ValueError:  # a port that is not a number: the URL itself is the problem
            host, port = parsed.hostname or "localhost", None
        endpoint = f"http://{host}:{port}" if parsed.hostname and port else ""
        folder = folder or (parsed.path if self.probe == "folder" else "")
        return self.check.format(url=maybe_sanitize_url(url), host=host,
                                 port=port or DEFAULT_PORTS.get(self.kind, ""), folder=folder,
                                 endpoint=f" --endpoint-url {endpoint}" if endpoint else "",
                                 master=master or sentinel_master())


def sentinel_master(transport_options=None):
    """The name of the primary that Redis Sentinel monitors: ``master_name`` of an app's
    result_backend_transport_options, else what celeryconfig.py reads from the environment."""
    return ((transport_options or {}).get("master_name")
            or os.environ.get("CELERY_RESULT_SENTINEL_MASTER", "mymaster"))


SQS_INSTALL = "pip install 'kombu[sqs]' (boto3 and pycurl)"
DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379, "rabbitmq": 5672, "sentinel": 26379}
RABBITMQ_CHECK = "`rabbitmq-diagnostics status`"
REDIS_CHECK = "`redis-cli -u {url} ping`"
FOLDER_CHECK = "`ls -ld {folder}` (the folder must exist)"
# Redis underneath (plain, or the primary that Redis Sentinel names): redis-py's clients, its
# exceptions and the redis_socket_* timeouts
REDIS_PROBES = ("redis", "sentinel")
BROKERS = (
    Component("rabbitmq", "broker", ("amqp", "amqps", "pyamqp"), priority=HIGHER_FIRST,
              drops_expired=True, system="RabbitMQ", probe="kombu", check=RABBITMQ_CHECK),
    Component("redis", "broker", ("redis", "rediss"), priority=LOWER_FIRST, system="Redis",
              probe="kombu", check=REDIS_CHECK),
    Component("sqs", "broker", ("sqs",), lacks={
        "remote_control": "Amazon SQS has no fanout exchange, so Celery has no remote control "
                          "there: no inspect, ping, stats or revoke broadcast",
        "events": "Celery sends no worker events over SQS, so Flower and `celery events` see "
                  "nothing",
        "priority": "SQS queues have no priorities: every message waits its turn (FIFO)",
    }, modules=("boto3", "pycurl"), install=SQS_INSTALL, system="SQS", probe="kombu",
              check="`aws sqs list-queues{endpoint}` (the endpoint and the keys in the URL)"),
    Component("embedded", "broker", ("filesystem",), lacks={
        "priority": "kombu's filesystem transport delivers in FIFO order: no priorities",
    }, system="kombu's filesystem transport", probe="folder", check=FOLDER_CHECK),
    Component("memory", "broker", ("memory",), lacks={
        "priority": "kombu's memory transport delivers in FIFO order: no priorities",
        "events": "memory:// lives inside one process: Flower cannot see it",
    }, system="memory:// (this process)"),
)
BACKENDS = (
    Component("redis", "result backend", ("redis", "rediss"), system="Redis", probe="redis",
              check=REDIS_CHECK),
    # Redis with a replica and sentinels that promote it (docs/cluster.md, section 10): Redis
    # underneath, so it offers all Redis does; the sentinels name the primary to use
    Component("sentinel", "result backend", ("sentinel",), system="Redis Sentinel",
              probe="sentinel", check="`redis-cli -h {host} -p {port} sentinel "
                                      "get-master-addr-by-name {master}`"),
    Component("postgresql", "result backend",
              ("db+postgresql", "db+postgresql+psycopg", "db+postgresql+psycopg2"),
              modules=("sqlalchemy",), install="pip install SQLAlchemy 'psycopg[binary]'",
              system="PostgreSQL", probe="sql", check="`pg_isready -h {host} -p {port}`"),
    Component("database", "result backend", ("db+sqlite", "db+mysql", "db+mysql+pymysql"),
              modules=("sqlalchemy",), install="pip install SQLAlchemy", system="the database",
              probe="sql", check="the database server that {url} names"),
    # rpc:// results travel through the broker: a failure there is the broker's (diagnose())
    Component("rpc", "result backend", ("rpc",), system="the broker (rpc:// results)", lacks={
        "chords": "rpc:// cannot run chords: it sends results only to the caller, so no "
                  "worker can collect the header's results",
        "result_polling": "rpc:// sends each state and result only to the caller, as "
                          "messages: no task (such as a link_error callback) can read another "
                          "task's result, and after a first get() the caller no longer sees "
                          "states such as PROGRESS by polling",
        "shared_results": "rpc:// sends each result only to the caller: no other process can "
                          "look it up by its id",
        "revoked_state": "rpc:// sends a REVOKED state only to the caller, which no longer "
                         "sees states by polling after its first get(): a revoked or expired "
                         "task stays PENDING there",
    }),
    Component("file", "result backend", ("file",), system="the results folder", probe="folder",
              check=FOLDER_CHECK),
    Component("memory", "result backend", ("cache+memory",), lacks={
        "shared_results": "cache+memory:// lives inside one process: no other process can look "
                          "a result up by its id",
    }, system="cache+memory:// (this process)"),
)
# CELERY_QUEUE_TYPE=quorum (celeryconfig.py, docs/cluster.md): RabbitMQ 3.x quorum queues are
# replicated over the cluster's nodes, and give up these. (Countdown, ETA and retries still
# work: Celery 5.5+ routes them through its native delayed delivery, over topic exchanges.)
QUORUM_LACKS = {
    "priority": "quorum queues on RabbitMQ 3.x have no priorities (x-max-priority is a classic "
                "queue's argument): every message waits its turn (FIFO)",
    "global_qos": "quorum queues refuse a prefetch limit shared by a channel's consumers "
                  "(global QoS); Celery sees the quorum queues and limits each consumer "
                  "instead, so a worker consuming N queues may hold N times its prefetch",
}

POOLS = (
    Component("prefork", "pool"),
    Component("threads", "pool", lacks={
        "terminate": "revoke(terminate=True) needs the prefork pool; these workers run threads",
        "time_limits": "time limits need the prefork pool; these workers run threads, which "
                       "cannot interrupt a task",
    }),
    Component("solo", "pool", lacks={
        "terminate": "revoke(terminate=True) needs the prefork pool; this worker runs solo",
        "time_limits": "time limits need the prefork pool; this worker runs solo",
    }),
)


def scheme(url):
    return urlparse(str(url or "")).scheme.lower()


def component(url, table):
    """The table's entry for ``url``; an unknown scheme lacks nothing we know of."""
    wanted = scheme(url)
    for entry in table:
        if wanted in entry.schemes:
            return entry
    if wanted.startswith("db+"):  # any other SQLAlchemy URL: db+oracle://, ...
        return Component("database", table[0].role, (wanted,), modules=("sqlalchemy",),
                         install="pip install SQLAlchemy", system="the database", probe="sql",
                         check="the database server that {url} names")
    return Component(wanted or "unknown", table[0].role, (wanted,))


def broker_kind(url):
    return component(url, BROKERS).kind


def backend_kind(url):
    return component(url, BACKENDS).kind


def is_kind(url, kind, role="broker"):
    """True when ``url`` is a ``kind`` broker (or result backend), by this table: the one
    place that reads URL schemes."""
    return (broker_kind if role == "broker" else backend_kind)(url) == kind


@dataclass(frozen=True)
class Offers:
    """What one stack (broker + result backend + worker pool) offers."""
    broker: Component
    backend: Component
    pool: Component

    def lacks(self, feature):
        """Why this stack cannot provide ``feature``, or None when it can."""
        for part in (self.broker, self.backend, self.pool):
            if feature in part.lacks:
                return part.lacks[feature]
        return None

    def offers(self, feature):
        return self.lacks(feature) is None

    def name(self):
        return f"{self.broker.kind} + {self.backend.kind} results"

    def missing(self):
        """[(feature, why)] of everything this stack cannot do, in FEATURES order."""
        return [(f, self.lacks(f)) for f in FEATURES if self.lacks(f)]


def offers_for(broker_url, backend_url, pool="prefork", queue_type="classic"):
    """What this broker, result backend and pool offer; ``queue_type`` "quorum": RabbitMQ's
    queues are quorum queues (QUORUM_LACKS)."""
    pools = {p.kind: p for p in POOLS}
    broker = component(broker_url, BROKERS)
    if queue_type == "quorum" and broker.kind == "rabbitmq":
        broker = replace(broker, lacks={**broker.lacks, **QUORUM_LACKS}, priority="")
    return Offers(broker, component(backend_url, BACKENDS), pools.get(pool, Component(pool, "pool")))


def queue_type(queues):
    """"quorum" when any of these kombu Queues is declared as a quorum queue, else "classic"."""
    quorum = any((q.queue_arguments or {}).get("x-queue-type") == "quorum" for q in queues or ())
    return "quorum" if quorum else "classic"


def offers_of(app, pool="prefork"):
    """offers_for the broker, result backend and queues a Celery app is configured with."""
    conf = app.conf
    return offers_for(conf.broker_url, conf.result_backend, pool, queue_type(conf.task_queues))


def decide(needs, offers):
    """None when a stack with ``offers`` can run something that ``needs`` these features;
    otherwise the reason it cannot, e.g. "rpc:// cannot run chords: it sends results ..."."""
    known(needs)
    for feature in needs:
        why = offers.lacks(feature)
        if why:
            return why
    return None


def known(needs):
    """Raise ValueError for a feature not in FEATURES: a typo must not skip a demo silently."""
    unknown = set(needs) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown feature(s) {sorted(unknown)}; known: {sorted(FEATURES)}")
    return tuple(needs)
