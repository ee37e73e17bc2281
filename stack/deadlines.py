"""What a client does when a service fails in the middle of a run: name it, stop, leave at once.

Owns: PublishersBlocked, ``on_connection_blocked`` and ``raise_on_alarms`` (RabbitMQ's
memory/disk alarm), ``service_fault`` (turns an exception from kombu, py-amqp, redis-py,
SQLAlchemy, botocore or a missing folder into one line naming the service, the system behind it
and how to check it: the capability table, stack/capabilities.py, knows both), ``abandon_connections`` (drop every
broker and Redis connection without a goodbye: a frozen peer never answers one), and
ClientGuard (Ctrl-C, SIGTERM and a hard deadline end a client even while it is blocked on a
socket). The timeouts themselves are settings, in celeryconfig.py ("timeouts and reconnection,
by role"); this module only reacts when one of them fires.
"""
import json
import os
import signal
import socket
import time
import sys
import urllib.request
from base64 import b64encode
from urllib.parse import urlparse

from .capabilities import BACKENDS, BROKERS, REDIS_PROBES, component, is_kind, sentinel_master
from .services import error_text, mask

__all__ = ["PublishersBlocked", "on_connection_blocked", "raise_on_alarms", "rabbitmq_alarms",
           "service_fault", "missing_folder", "abandon_connections", "exit_now", "ClientGuard"]


class PublishersBlocked(RuntimeError):
    """RabbitMQ sent connection.blocked: it accepts no message until its alarm clears."""


class _OnBlocked:
    """py-amqp's ``on_blocked`` callback, which ``raise_on_alarms`` gives an app's connections.

    RabbitMQ stops reading from every publishing connection while a memory or disk alarm is
    on, and tells clients that asked (py-amqp does) with connection.blocked. Without this
    callback py-amqp ignores the notice and a publish waits for a confirm that cannot come.
    Raising here ends that publish at once with the cause (not a retryable connection error:
    retrying cannot help until someone frees memory or disk). py-amqp drops the reason text
    RabbitMQ sends, so ``service_fault`` asks the management API which alarm it is.

    An object rather than a function because `celery inspect stats` sends the transport
    options as JSON: kombu's encoder calls ``__json__``.
    """

    def __call__(self, reason):
        raise PublishersBlocked(f"RabbitMQ is blocking publishers ({reason})")

    def __json__(self):
        return "stack.deadlines.on_connection_blocked"

    __repr__ = __json__


on_connection_blocked = _OnBlocked()


def raise_on_alarms(app):
    """Give ``app``'s RabbitMQ connections ``on_connection_blocked``: a client (ClientGuard),
    a worker and beat (stack/worker_signals.py) call it. Not in celeryconfig: a callable is
    no setting that a copy of celeryconfig.py without stack/ could name."""
    if is_kind(app.conf.broker_url, "rabbitmq"):
        app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}),
                                             "on_blocked": on_connection_blocked}


def rabbitmq_alarms(broker_url, timeout=2.0):
    """["memory"], ["disk"], both, [] or None (unknown) from RabbitMQ's management API."""
    if not is_kind(broker_url, "rabbitmq"):
        return None
    parsed = urlparse(broker_url)
    auth = b64encode(f"{parsed.username or 'guest'}:{parsed.password or 'guest'}".encode())
    request = urllib.request.Request(f"http://{parsed.hostname or 'localhost'}:15672/api/nodes",
                                     headers={"Authorization": f"Basic {auth.decode()}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            nodes = json.load(answer)
    except (OSError, ValueError):
        return None  # no management plugin, or it does not answer either
    found = [kind for kind, key in (("memory", "mem_alarm"), ("disk", "disk_free_alarm"))
             if any(node.get(key) for node in nodes)]
    return found


# The modules whose exceptions come from a result backend's driver, or from SQS's
BACKEND_DRIVERS = ("sqlalchemy", "psycopg", "psycopg2", "pymysql", "MySQLdb")
SQS_DRIVERS = ("botocore", "boto3")


def _folders(app):
    """[(role, folder)] of the folders the stack lives in: kombu's filesystem transport's and
    the file:// result backend's."""
    broker, backend = app.conf.broker_url, app.conf.result_backend
    folders = []
    if component(broker, BROKERS).probe == "folder":
        options = app.conf.broker_transport_options or {}
        folders += [("broker", options[key]) for key in
                    ("data_folder_out", "data_folder_in", "control_folder") if options.get(key)]
    if component(backend, BACKENDS).probe == "folder":
        folders.append(("result backend", urlparse(str(backend)).path))
    return folders


def missing_folder(app):
    """(role, folder) of the first folder of the stack that is gone, or None."""
    return next(((role, folder) for role, folder in _folders(app)
                 if not os.path.isdir(folder)), None)


def _failed_role(exc, app):
    """Which service ``exc`` comes from ("broker" / "result backend", and the folder it
    lacks, if that is what failed), by the capability table; None: not a service's fault."""
    from amqp.exceptions import AMQPError
    from celery.exceptions import BackendError  # what result_backend_always_retry raises
    from kombu.exceptions import KombuError
    broker = component(app.conf.broker_url, BROKERS)
    backend = component(app.conf.result_backend, BACKENDS)
    module = type(exc).__module__ or ""
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename:
        filename = os.fsdecode(filename)
        for role, folder in _folders(app):
            if filename.startswith(folder.rstrip("/") + "/") or filename == folder:
                return role, folder
    if module.startswith("redis"):  # Redis (or its sentinels: redis.sentinel's
        # MasterNotFoundError) answers as the result backend, or as the broker
        return ("result backend" if backend.probe in REDIS_PROBES
                or broker.kind != "redis" else "broker"), None
    if module.startswith(BACKEND_DRIVERS) or isinstance(exc, BackendError) \
            or "result store" in str(exc):
        return "result backend", None
    if module.startswith(SQS_DRIVERS) or isinstance(
            exc, (KombuError, AMQPError, OSError, socket.timeout)):
        return "broker", None
    return None, None


def _within(exc, timeout):
    """" within N s" for "stopped answering": the deadline that gave up (``exc.seconds``: a
    send's deadline in stack/celery_gaps.py, a request's in web.py), else the read ``timeout``
    that fired; "" when the service refused the connection, which waits for nothing."""
    seen, hops = exc, 0
    while seen is not None and hops < 10:  # kombu and Celery wrap the socket's error
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return ""
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    waited = getattr(exc, "seconds", None) or timeout
    return f" within {waited:g} s" if waited else ""


def service_fault(exc, app):
    """One line naming the failed service, the system behind it and how to check it (from the
    capability table), or None if ``exc`` is no service fault."""
    broker_url, backend_url = app.conf.broker_url, app.conf.result_backend
    broker, backend = mask(str(broker_url)), mask(str(backend_url))
    cause = error_text(exc)
    if isinstance(exc, PublishersBlocked):
        alarms = rabbitmq_alarms(broker_url)
        kind = " and ".join(f"{a} alarm" for a in alarms) if alarms else "memory or disk alarm"
        return (f"RabbitMQ is blocking publishers: {kind} — free memory or disk, see "
                f"`rabbitmq-diagnostics alarms` (broker {broker})")
    role, folder = _failed_role(exc, app)
    if role is None:
        return None
    if folder:  # the filesystem transport's or the file:// backend's folder is gone
        part = component(broker_url if role == "broker" else backend_url,
                         BROKERS if role == "broker" else BACKENDS)
        url = broker if role == "broker" else backend
        return (f"the {role} ({part.system}) at {url} cannot use its folder {folder} "
                f"({cause}); check it with {part.how_to_check(url, folder)}")
    if role == "result backend":
        part = component(backend_url, BACKENDS)
        if part.kind == "rpc":  # rpc:// results travel through the broker: check that
            role = "broker"
        else:
            # one command's bound; celeryconfig gives the sentinels' connections the same
            within = _within(exc, app.conf.redis_socket_timeout
                             if part.probe in REDIS_PROBES else None)
            master = sentinel_master(app.conf.result_backend_transport_options)
            return (f"the result backend ({part.system}) at {backend} stopped answering{within} "
                    f"({cause}); check it with {part.how_to_check(backend_url, master=master)}")
    part = component(broker_url, BROKERS)
    folder = next((f for role, f in _folders(app) if role == "broker"), None)
    if part.kind == "rabbitmq" and rabbitmq_alarms(broker_url):
        # a publish that timed out because of an alarm we were not told about
        return service_fault(PublishersBlocked(), app)
    within = _within(exc, (app.conf.broker_transport_options or {}).get("read_timeout"))
    results = (" (the rpc:// results travel through it)"
               if component(backend_url, BACKENDS).kind == "rpc" else "")
    return (f"the broker at {broker}{results} stopped answering{within} ({cause}); check "
            f"{part.system or 'it'} with {part.how_to_check(broker_url, folder) or 'its tools'} "
            f"(or restart it); workers reconnect by themselves")


def abandon_connections(app):
    """Drop the app's broker and Redis connections without a close handshake.

    A polite close waits for the peer's answer (py-amqp Channel.close, Connection.close): with
    a frozen broker that is one read timeout per channel, in a finally block or at exit. The
    pool's ``force_close_all`` collects each connection: it closes the socket, nothing more.
    """
    try:
        if app._pool is not None:
            app._pool.force_close_all()
            app._pool = None
    except Exception:  # noqa: BLE001 - we are leaving; nothing here may stop that
        pass
    try:  # the pubsub connection that result.get() listens on comes from this pool too
        app.backend.client.connection_pool.disconnect()
    except Exception:  # noqa: BLE001 - not Redis, or nothing connected yet
        pass


def exit_now(code):
    """End the process at once with ``code``, after a fault or a signal.

    A normal exit runs clean-up that talks to the services: AsyncResult.__del__ unsubscribes
    from Redis, kombu closes channels politely. With a frozen service each of those waits for
    a timeout (or fails with "Exception ignored ... Python is likely shutting down"), so after
    a fault we flush our output and leave without it; the sockets close with the process.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class ClientGuard:
    """SIGINT, SIGTERM and a hard deadline stop a client, even while it waits on a socket;
    and a RabbitMQ alarm ends a publish at once (``on_connection_blocked``).

    Each raises KeyboardInterrupt in the main thread wherever it is (Python interrupts a
    blocking recv for a signal handler), after abandoning the connections so that no finally
    block on the way out waits for a frozen peer. ``stopped`` says why, also when a finally
    block on the way swallowed the KeyboardInterrupt: check it between steps.
    """

    def __init__(self, app, hard_deadline=None):
        self.app, self.stopped = app, None
        self.hard_deadline = hard_deadline

    def install(self):
        from .celery_gaps import install_client_workarounds
        raise_on_alarms(self.app)
        install_client_workarounds(self.app)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        if self.hard_deadline:
            signal.signal(signal.SIGALRM, self._stop)
            signal.setitimer(signal.ITIMER_REAL, self.hard_deadline)
        return self

    def _stop(self, signum, frame):
        if self.stopped:  # a second Ctrl-C while we already leave: keep leaving
            return
        self.stopped = ("the hard deadline passed" if signum == signal.SIGALRM
                        else f"{signal.Signals(signum).name} received")
        self.stopped_at = time.monotonic()
        abandon_connections(self.app)
        raise KeyboardInterrupt

    def disarm(self):
        """Stop the hard deadline, and ignore further signals while the summary is written."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
