"""What a client does when a service fails in the middle of a run: name it, stop, leave at once.

Owns: PublishersBlocked and ``on_connection_blocked`` (RabbitMQ's memory/disk alarm, wired in
celeryconfig), ``service_fault`` (turns an exception from kombu, py-amqp or redis-py into one
line naming the service, its masked URL and what to do), ``abandon_connections`` (drop every
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

from kombu.utils.url import maybe_sanitize_url

__all__ = ["PublishersBlocked", "on_connection_blocked", "rabbitmq_alarms", "service_fault",
           "abandon_connections", "exit_now", "ClientGuard"]


class PublishersBlocked(RuntimeError):
    """RabbitMQ sent connection.blocked: it accepts no message until its alarm clears."""


class _OnBlocked:
    """py-amqp's ``on_blocked`` callback (broker_transport_options in celeryconfig).

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


def rabbitmq_alarms(broker_url, timeout=2.0):
    """["memory"], ["disk"], both, [] or None (unknown) from RabbitMQ's management API."""
    parsed = urlparse(broker_url)
    if parsed.scheme not in ("amqp", "amqps", "pyamqp"):
        return None
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


def _is_backend_error(exc):
    from celery.exceptions import BackendError  # what result_backend_always_retry raises
    module = type(exc).__module__ or ""
    return (isinstance(exc, BackendError) or module.startswith("redis")
            or "result store" in str(exc))


def service_fault(exc, app):
    """One line naming the failed service and what to do, or None if ``exc`` is no service fault."""
    from amqp.exceptions import AMQPError
    from kombu.exceptions import KombuError
    broker = "; ".join(maybe_sanitize_url(url) for url in str(app.conf.broker_url).split(";"))
    backend = maybe_sanitize_url(str(app.conf.result_backend))
    cause = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, PublishersBlocked):
        alarms = rabbitmq_alarms(app.conf.broker_url)
        kind = " and ".join(f"{a} alarm" for a in alarms) if alarms else "memory or disk alarm"
        return (f"RabbitMQ is blocking publishers: {kind} — free memory or disk, see "
                f"`rabbitmq-diagnostics alarms` (broker {broker})")
    if _is_backend_error(exc):
        timeout = app.conf.redis_socket_timeout
        return (f"the result backend (Redis) at {backend} stopped answering within {timeout:g} s "
                f"({cause}); check it with `redis-cli -u {backend} ping`")
    if isinstance(exc, (KombuError, AMQPError, OSError, socket.timeout)):
        alarms = rabbitmq_alarms(app.conf.broker_url)
        if alarms:  # a publish that timed out because of an alarm we were not told about
            return service_fault(PublishersBlocked(), app)
        timeout = (app.conf.broker_transport_options or {}).get("read_timeout")
        within = f" within {timeout:g} s" if timeout else ""
        return (f"the broker at {broker} stopped answering{within} ({cause}); check it with "
                f"`rabbitmq-diagnostics status` (or restart it); workers reconnect by themselves")
    return None


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
    """SIGINT, SIGTERM and a hard deadline stop a client, even while it waits on a socket.

    Each raises KeyboardInterrupt in the main thread wherever it is (Python interrupts a
    blocking recv for a signal handler), after abandoning the connections so that no finally
    block on the way out waits for a frozen peer. ``stopped`` says why, also when a finally
    block on the way swallowed the KeyboardInterrupt: check it between steps.
    """

    def __init__(self, app, hard_deadline=None):
        self.app, self.stopped = app, None
        self.hard_deadline = hard_deadline

    def install(self):
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
