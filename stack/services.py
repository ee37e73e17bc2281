"""Find and check brokers and result backends: masked URLs, one clear error when one is down.

Owns: the default URLs, ServiceUnavailable, check_broker (with login_refused: the fix for a
refused login) / check_backend / reachable, and
forget_pending_results (a client's clean exit from a Redis result backend).
"""
from pathlib import Path
from urllib.parse import unquote, urlparse

from kombu.utils.url import maybe_sanitize_url

HERE = Path(__file__).resolve().parent.parent  # the project folder: where `-A tasks` works
DEFAULT_BROKER = "amqp://guest:guest@localhost:5672//"
DEFAULT_BACKEND = "redis://localhost:6379/0"
START_HINT = ("start one with `docker compose up -d rabbitmq redis`, use your distribution's "
              "packages (rabbitmq-server, redis-server), or run `python run_demo.py`, which "
              "falls back to an embedded stack that needs no server")



class ServiceUnavailable(RuntimeError):
    """A broker or result backend that cannot be reached; the message says how to fix it."""


def mask(url):
    """The URL with its password replaced, safe to print or log."""
    return maybe_sanitize_url(url)


# --- Is a service there? -------------------------------------------------------------------
def check_broker(url, timeout=3.0):
    """Raise ServiceUnavailable unless the broker answers within ``timeout`` seconds."""
    if url.startswith(("memory://", "filesystem://")):
        return
    from kombu import Connection
    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except Exception as exc:  # every failure here means the same to the user ...
        refused = login_refused(url, exc)  # ... except a broker that answers and says no
        raise ServiceUnavailable(refused or (
            f"cannot reach the broker at {mask(url)} ({exc.__class__.__name__}: {exc}); "
            f"{START_HINT}")) from None


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


def check_backend(url, timeout=3.0):
    """Raise ServiceUnavailable unless a Redis result backend answers (others need no server)."""
    if not url.startswith(("redis://", "rediss://")):
        return
    import redis
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except Exception as exc:
        raise ServiceUnavailable(
            f"cannot reach the result backend at {mask(url)} ({exc.__class__.__name__}: {exc}); "
            f"{START_HINT}") from None


def reachable(broker, backend, timeout=2.0):
    try:
        check_broker(broker, timeout)
        check_backend(backend, timeout)
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

