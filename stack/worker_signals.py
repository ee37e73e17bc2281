"""What the demo adds to the start of a worker (and beat), as Celery signal handlers.

Loaded by Celery itself: celeryconfig names this module in ``imports`` (only where stack/ is
there), and a worker imports those modules as it starts, before it sends ``worker_init``. A
copy of tasks.py and celeryconfig.py without stack/ starts its workers without these checks.
"""
from celery.signals import beat_init, worker_init

from .capabilities import BACKENDS, REDIS_PROBES, component, sentinel_master
from .celery_gaps import (bound_event_retries, declare_queues_before_delay_binding,
                          delayed_delivery_on_current_node, install_client_workarounds,
                          track_only_live_children)
from .deadlines import raise_on_alarms
from .services import MissingDriver, backend_unreachable, check_driver

__all__ = ["refuse_to_start_without_result_backend", "work_around_celery_gaps",
           "send_like_the_demos_clients", "publish_fails_at_once_on_alarms"]


@worker_init.connect
def refuse_to_start_without_result_backend(sender, **kwargs):
    """Stop a worker whose broker or result backend has no driver installed (one line naming
    the package, not a traceback), or whose Redis (or Redis Sentinel) result backend is down:
    it would run tasks and lose every result."""
    url = str(sender.app.conf.result_backend or "")
    try:
        check_driver(str(sender.app.conf.broker_url), "broker")
        check_driver(url, "result backend")
    except MissingDriver as exc:
        raise SystemExit(f"cannot start: {exc}")
    if component(url, BACKENDS).probe not in REDIS_PROBES:
        return
    try:  # the app's own client: its settings (TLS, the sentinels' master_name) apply
        sender.app.backend.client.ping()
    except Exception as exc:  # SystemExit: Celery logs and ignores other errors in signal handlers
        master = sentinel_master(sender.app.conf.result_backend_transport_options)
        raise SystemExit(f"cannot start: {backend_unreachable(url, exc, master)}")


@worker_init.connect
def work_around_celery_gaps(sender, **kwargs):
    """A worker must notice a dead broker connection and survive reconnecting to it, also to
    another node of a cluster: Celery 5.7 bugs, worked around in stack/celery_gaps.py (each
    names its upstream issue)."""
    bound_event_retries()
    track_only_live_children()
    delayed_delivery_on_current_node()
    declare_queues_before_delay_binding()


@worker_init.connect
@beat_init.connect
def send_like_the_demos_clients(sender, **kwargs):
    """A worker (a retry's countdown) and beat send tasks too: the same workarounds as a client
    (a failover list of brokers, quorum queues)."""
    install_client_workarounds(sender.app)


@worker_init.connect
@beat_init.connect
def publish_fails_at_once_on_alarms(sender, **kwargs):
    """A publish during RabbitMQ's memory or disk alarm raises at once, naming the alarm
    (stack/deadlines.py), instead of waiting for the read timeout."""
    raise_on_alarms(sender.app)
