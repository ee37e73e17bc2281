"""Find and check brokers and result backends: masked URLs, one clear error when one is down.

Owns: the default URLs, ServiceUnavailable and MissingDriver, check_driver / check_broker (with
login_refused: the fix for a refused login) / check_backend (with sentinel_primary: the Redis
that the sentinels name; backend_unreachable: its one line) / check_services / reachable,
error_text, and forget_pending_results (a client's clean exit from a Redis result backend).
"""
import re
import importlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from kombu.utils.url import maybe_sanitize_url

HERE = Path(__file__).resolve().parent.parent  # the project folder: where `-A tasks` works
DEFAULT_BROKER = "amqp://guest:guest@localhost:5672//"
DEFAULT_BACKEND = "redis://localhost:6379/0"
# What run_demo.py --broker KIND / --backend KIND use when CELERY_BROKER_URL /
# CELERY_RESULT_BACKEND name another kind (sqs starts a local server; file and embedded live
# in the run folder). The PostgreSQL user and password are docker-compose.yml's; a server with
# trust authentication on localhost (a distribution's default) ignores the password.
BROKER_URLS = {"rabbitmq": DEFAULT_BROKER, "redis": "redis://localhost:6379/0"}
BACKEND_URLS = {"redis": DEFAULT_BACKEND, "rpc": "rpc://",
                "postgresql": "db+postgresql+psycopg://postgres:postgres@localhost:5432/postgres"}
START_HINT = ("start one with `docker compose up -d rabbitmq redis`, use your distribution's "
              "packages (rabbitmq-server, redis-server), or run `python run_demo.py`, which "
              "falls back to an embedded stack that needs no server")
SQS_HINT = ("check the endpoint and the keys in the URL; for a local SQS-compatible server run "
            "`python -m moto.server -H 127.0.0.1 -p 4566` (URL sqs://KEY:SECRET@127.0.0.1:4566), "
            "or `python run_demo.py --broker sqs`, which starts and stops one")


class ServiceUnavailable(RuntimeError):
    """A broker or result backend that cannot be reached; the message says how to fix it."""


class MissingDriver(ServiceUnavailable):
    """A URL whose client library is not installed; the message names the package."""


# The pip package for a module a driver imports, where the two names differ
PACKAGES = {"MySQLdb": "mysqlclient", "psycopg": "'psycopg[binary]'",
            "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL", "sqlalchemy": "SQLAlchemy",
            "botocore": "boto3"}


def check_driver(url, role="broker"):
    """Raise MissingDriver, in one line naming the package to install, unless ``url``'s
    client library imports. Costs no connection: run it before anything else."""
    from . import capabilities
    table = capabilities.BROKERS if role == "broker" else capabilities.BACKENDS
    entry = capabilities.component(url, table)
    what = f"the {role} {mask(url)}"

    def missing(module):
        module = module.split(".")[0]
        package = PACKAGES.get(module, module)
        everything = (f"; all it needs: {entry.install}"
                      if module in entry.modules and entry.install else "")
        return MissingDriver(f"{what} needs the Python package {package}, which is not "
                             f"installed: pip install {package}{everything}")
    try:
        for module in entry.modules:
            importlib.import_module(module)
        if entry.probe == "sql":  # SQLAlchemy imports the database driver the URL names
            from sqlalchemy.engine import make_url
            make_url(str(url)[3:]).get_dialect().import_dbapi()
        elif role == "broker":
            from kombu import Connection
            Connection(url).transport  # noqa: B018 - imports the transport's library
    except ImportError as exc:
        raise missing(exc.name or str(exc)) from None


def mask(url):
    """The URL with its password replaced, safe to print or log; each URL of a ";" list (a
    broker failover list, sentinel:// results), where kombu's masks only the first."""
    if not isinstance(url, str):  # None, or a URL object kombu masks itself
        return maybe_sanitize_url(url)
    return ";".join(maybe_sanitize_url(part) for part in url.split(";"))


# --- Is a service there? -------------------------------------------------------------------
def check_broker(url, timeout=3.0):
    """Raise ServiceUnavailable unless the broker answers within ``timeout`` seconds."""
    check_driver(url, "broker")
    from . import capabilities
    entry = capabilities.component(url, capabilities.BROKERS)
    if entry.probe != "kombu":  # memory:// and filesystem:// have no server to ask
        return
    from kombu import Connection
    options = {}
    if entry.kind == "sqs":  # boto3 retries for minutes by default: one short try here
        options = {"region": "us-east-1", "client-config": {
            "connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}}}
    try:
        with Connection(url, connect_timeout=timeout, transport_options=options) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except Exception as exc:  # every failure here means the same to the user ...
        refused = login_refused(url, exc)  # ... except a broker that answers and says no
        hint = SQS_HINT if entry.kind == "sqs" else START_HINT
        raise ServiceUnavailable(refused or (
            f"cannot reach the broker at {mask(url)} ({exc.__class__.__name__}: {exc}); "
            f"check {entry.system} with {entry.how_to_check(url)}; {hint}")) from None


def login_refused(url, exc):
    """The fix for a RabbitMQ that refused the login or the vhost, else None.

    guest/guest works only from the broker's own machine (RabbitMQ's loopback_users): a
    worker or client on another host gets ACCESS_REFUSED and needs a user of its own.
    """
    text = str(exc)
    if "ACCESS_REFUSED" not in text and "NOT_ALLOWED" not in text:
        return None
    parsed = urlparse(url)
    user, vhost = unquote(parsed.username or "guest"), unquote(parsed.path[1:] or "/")
    create = ("on the broker host create a user and a vhost for the demo: "
              "`rabbitmqctl add_user celery PASSWORD`, `rabbitmqctl add_vhost celery-demo`, "
              "`rabbitmqctl set_permissions -p celery-demo celery '.*' '.*' '.*'`, then use "
              f"CELERY_BROKER_URL=amqp://celery:PASSWORD@{parsed.hostname}:{parsed.port or 5672}"
              "/celery-demo (docs/more-machines.md)")
    if "NOT_ALLOWED" in text:
        return (f"the broker at {mask(url)} let {user!r} log in but refused the vhost {vhost!r} "
                f"(NOT_ALLOWED): the vhost does not exist or the user has no permission on it; "
                f"`rabbitmqctl add_vhost {vhost}` and `rabbitmqctl set_permissions -p {vhost} "
                f"{user} '.*' '.*' '.*'` on the broker host fix it")
    if user == "guest" and parsed.hostname not in ("localhost", "127.0.0.1", "::1"):
        return (f"the broker at {mask(url)} refused the login of 'guest' (ACCESS_REFUSED): "
                f"RabbitMQ lets guest log in only from the broker's own machine (localhost), "
                f"not from another host; "
                f"{create}")
    return (f"the broker at {mask(url)} refused the login of {user!r} (ACCESS_REFUSED): wrong "
            f"user name or password, or the user does not exist; {create}")


def queue_conflict(text):
    """The fix for RabbitMQ's "inequivalent arg" refusal found in ``text``, else None.

    RabbitMQ refuses to declare an existing queue with other arguments (PRECONDITION_FAILED).
    Both ways happen: a queue an older version of the demo declared with x-max-priority (now
    only priority_queue has it), or priority_queue declared without it by another client.
    """
    found = re.search(r"inequivalent arg '([^']+)' for queue '([^']+)' in vhost '([^']*)': "
                      r"received (none|the value '[^']*') .*?but current is (none|the value '[^']*')",
                      text)
    if not found:
        return None
    arg, queue, vhost, wanted, current = (part.replace("the value ", "") for part in found.groups())
    older = ("an older version of this demo declared it" if wanted == "none" else
             "a client with other settings declared it")
    where = "" if vhost == "/" else f" -p {vhost}"
    return (f"RabbitMQ already has queue {queue!r} with {arg} {current}, and this project "
            f"declares it with {wanted} ({older}): delete it, which drops the messages in it, "
            f"with `rabbitmqctl delete_queue{where} {queue}`, then start again "
            f"(docs/troubleshooting.md)")


def check_backend(url, timeout=3.0, master=None):
    """Raise ServiceUnavailable unless the result backend's driver is installed and, for
    Redis, Redis Sentinel and SQL databases, the server answers within ``timeout`` seconds
    (per connection: Sentinel asks each sentinel in turn). ``master``: the name the sentinels
    monitor (capabilities.sentinel_master)."""
    check_driver(url, "result backend")
    from . import capabilities
    entry = capabilities.component(url, capabilities.BACKENDS)
    if entry.probe == "sql":
        return check_database(url, timeout)
    if entry.probe not in capabilities.REDIS_PROBES:  # rpc:// is the broker's; file://
        return                                         # and memory have no server
    import redis
    try:
        if entry.probe == "redis":
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout,
                                          socket_timeout=timeout)
        else:
            client = sentinel_primary(url, master or capabilities.sentinel_master(), timeout)
        client.ping()
    except Exception as exc:
        raise ServiceUnavailable(backend_unreachable(url, exc, master)) from None


def sentinel_primary(url, master, timeout):
    """A client of the primary that the sentinels of ``url`` (sentinel:// URLs separated by
    ";", as Celery takes them) name for ``master``; every connection bounded by ``timeout``."""
    import redis
    from kombu.utils.url import url_to_parts
    from redis.sentinel import Sentinel
    urls = [url_to_parts(part) for part in str(url).split(";")]
    # one try per connection (retry None): redis-py's default retries took 4 s for each
    # sentinel that refused
    limits = {"socket_connect_timeout": timeout, "socket_timeout": timeout, "retry": None}
    host, port = Sentinel([(u.hostname or "localhost", u.port or 26379) for u in urls],
                          sentinel_kwargs=limits).discover_master(master)
    first = urls[0]  # its password and database are the Redis servers', as Celery reads them
    return redis.Redis(host, port, username=first.username, password=first.password,
                       db=int(first.path or 0), **limits)


def backend_unreachable(url, exc, master=None):
    """The one line for a result backend that does not answer a start-up check: the masked
    URL(s), the system, the user's check, and where to get one."""
    from . import capabilities
    entry = capabilities.component(url, capabilities.BACKENDS)
    hint = START_HINT if entry.probe == "redis" else "docs/cluster.md, section 10 sets one up"
    return (f"cannot reach the result backend at {mask(url)} ({error_text(exc)}); check "
            f"{entry.system} with {entry.how_to_check(url, master=master)}; {hint}")


def error_text(exc):
    """"Type: message" of ``exc``, for a one-line message. redis-py's MasterNotFoundError
    appends the repr of the client of each sentinel it asked (over 1,000 characters each);
    Celery's "Retry limit exceeded ..." spans lines."""
    text = " ".join(str(exc).split(" : <redis.")[0].split())
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def check_database(url, timeout=3.0):
    """A SQLAlchemy result backend (db+postgresql+psycopg://...) answers ``SELECT 1``."""
    import sqlalchemy
    from . import capabilities
    entry = capabilities.component(url, capabilities.BACKENDS)
    args = {"connect_timeout": max(1, int(timeout))} if entry.kind == "postgresql" else {}
    engine = sqlalchemy.create_engine(url[3:], connect_args=args,
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        start = ("; start PostgreSQL with `docker compose up -d postgres` or your "
                 "distribution's postgresql package" if entry.kind == "postgresql" else "")
        raise ServiceUnavailable(
            f"cannot reach the result backend at {mask(url)} ({exc.__class__.__name__}: "
            f"{first}); check {entry.system} with {entry.how_to_check(url)}{start}") from None
    finally:
        engine.dispose()


def check_services(broker, backend, timeout=3.0):
    """check_broker and check_backend, but both drivers first: a missing package is named
    even when the other service is down too (it is the one thing the user must fix here)."""
    check_driver(broker, "broker")
    check_driver(backend, "result backend")
    check_broker(broker, timeout)
    check_backend(backend, timeout)


def reachable(broker, backend, timeout=2.0):
    try:
        check_services(broker, backend, timeout)
        return True
    except ServiceUnavailable:
        return False



def forget_pending_results(app):
    """Stop waiting for results whose get() timed out, while the interpreter is still whole.

    A Redis result backend keeps each of them subscribed until its task ends; left to the
    interpreter's exit, unsubscribing prints "Exception ignored in: <function
    AsyncResult.__del__ ...> ImportError: sys.meta_path is None, Python is likely shutting down".
    """
    for mapping in getattr(app.backend, "_pending_results", ()):  # only async backends
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                app.backend.remove_pending_result(result)

