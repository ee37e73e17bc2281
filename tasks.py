"""The Celery app and every task of the demo: read this file first.

    celery -A tasks worker -l INFO                          # a worker for the default queue
    celery -A tasks worker -Q slow_queue -n slow@%h -l INFO # a worker for one queue
    celery -A tasks beat -l INFO                            # the periodic scheduler (only one!)

Run these from the folder that holds this file (or add ``--workdir PATH``): ``-A tasks``
imports this module by name. Where each task goes is set in ``celeryconfig.task_routes``.
"""
import platform
import time

import requests
from celery import Celery, Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.signals import worker_init
from celery.utils.log import get_task_logger
from kombu.utils.url import maybe_sanitize_url

# Imported here, not in the hook below: `celery -A tasks worker` finds this folder's modules
# only while it imports this one
from stack.services import MissingDriver, check_driver

app = Celery("tasks")
app.config_from_object("celeryconfig")

# A task logger prefixes each line with the task's name and id: "tasks.log_work[3f2c...]: ..."
logger = get_task_logger(__name__)


@worker_init.connect
def refuse_to_start_without_result_backend(sender, **kwargs):
    """Stop a worker whose broker or result backend has no driver installed (one line naming
    the package, not a traceback), or whose Redis result backend is down: it would run tasks
    and lose every result."""
    url = str(sender.app.conf.result_backend or "")
    try:
        check_driver(str(sender.app.conf.broker_url), "broker")
        check_driver(url, "result backend")
    except MissingDriver as exc:
        raise SystemExit(f"cannot start: {exc}")
    if not url.startswith(("redis://", "rediss://")):
        return
    try:
        sender.app.backend.client.ping()
    except Exception as exc:  # SystemExit: Celery logs and ignores other errors in signal handlers
        raise SystemExit(f"cannot reach the result backend at {maybe_sanitize_url(url)}: {exc}")


@worker_init.connect
def work_around_celery_gaps(sender, **kwargs):
    """A worker must notice a dead broker connection and survive reconnecting to it, also to
    another node of a cluster: Celery 5.7 bugs, worked around in stack/celery_gaps.py (each
    names its upstream issue)."""
    from stack.celery_gaps import (bound_event_retries, declare_queues_before_delay_binding,
                                   delayed_delivery_on_current_node, track_only_live_children)
    bound_event_retries()
    track_only_live_children()
    delayed_delivery_on_current_node()
    declare_queues_before_delay_binding()


# --- Basics ---------------------------------------------------------------------------------
@app.task(name="tasks.add")
def add(x, y):
    """Add two numbers; anything else is refused with a clear message (not a deep TypeError)."""
    for value in (x, y):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"add() takes two numbers, got {x!r} and {y!r}")
    return x + y


@app.task(name="tasks.take_time")
def take_time(seconds=1.0):
    """Sleep ``seconds``: long enough to be seen STARTED (celeryconfig.task_track_started)."""
    time.sleep(seconds)
    return {"slept": seconds}


@app.task(name="tasks.fast_task")
def fast_task(message="ping"):
    """A task that returns at once: routed to fast_queue."""
    return f"fast: {message}"


@app.task(name="tasks.slow_task", bind=True, acks_late=True, reject_on_worker_lost=True)
def slow_task(self, duration=10, step_seconds=1.0):
    """Work in ``duration`` steps of ``step_seconds``, reporting PROGRESS after each one.

    acks_late + reject_on_worker_lost: if the worker dies mid-task the message goes back to
    the queue and another worker runs it (so the task must be safe to run twice).
    """
    started = time.monotonic()
    for step in range(1, duration + 1):
        time.sleep(step_seconds)
        self.update_state(state="PROGRESS", meta={"current": step, "total": duration})
    return {"steps": duration, "seconds": round(time.monotonic() - started, 2)}


# --- Canvas building blocks: group, chain, chord and the nested workflow --------------------
@app.task(name="tasks.process_data")
def process_data(value):
    return {"value": value, "doubled": value * 2}


@app.task(name="tasks.validate_data")
def validate_data(record):
    if record["doubled"] < 0:
        raise ValueError(f"negative values are not allowed: {record}")
    return {**record, "valid": True}


@app.task(name="tasks.save_result")
def save_result(record):
    return {**record, "saved": True}


@app.task(name="tasks.multiply")
def multiply(x, y):
    """A tiny task: what chunks and starmap are for (see demos.demo_chunks)."""
    return x * y


@app.task(name="tasks.combine_results")
def combine_results(records):
    return {"count": len(records), "total": sum(r["doubled"] for r in records)}


@app.task(name="tasks.send_notification")
def send_notification(summary):
    return f"report ready: {summary['count']} items, total {summary['total']}"


# --- Retries: network calls fail, and retrying with backoff is the cure ----------------------
class ServerBusy(Exception):
    """A 5xx answer: worth retrying (a 4xx is not: asking again will not help)."""


@app.task(name="tasks.fetch_url", bind=True,
          autoretry_for=(requests.ConnectionError, requests.Timeout, ServerBusy),
          max_retries=3, retry_backoff=True, retry_jitter=False)
def fetch_url(self, url):
    """GET ``url``; retried after 1 s, 2 s, 4 s on network errors and 5xx answers."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"fetch_url needs an http:// or https:// URL, got {url!r}")
    response = requests.get(url, timeout=(3, 10))  # (connect, read): never wait forever
    if response.status_code >= 500:
        raise ServerBusy(f"{url} answered {response.status_code}")
    response.raise_for_status()
    return {"url": url, "status": response.status_code, "bytes": len(response.content),
            "attempts": self.request.retries + 1}


# --- Time limits: a soft one the task can catch, a hard one that kills it --------------------
# Enforced by the prefork pool only: a worker with --pool=solo or threads ignores them.
@app.task(name="tasks.time_limited", soft_time_limit=1, time_limit=2)
def time_limited(seconds, clean_up=True):
    """Work for ``seconds``. At 1 s, SoftTimeLimitExceeded is raised in here: with ``clean_up``
    the task stops and returns what it did; without, it carries on until the hard limit (2 s)
    kills its pool process and the task fails with TimeLimitExceeded."""
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            time.sleep(0.05)  # one step of the work
    except SoftTimeLimitExceeded:
        if clean_up:
            return {"finished": False, "stopped_after": round(time.monotonic() - started, 2)}
        while time.monotonic() - started < seconds:  # ignores the warning: killed at 2 s
            time.sleep(0.05)
    return {"finished": True, "seconds": round(time.monotonic() - started, 2)}


# --- Rate limits: the limit itself is in celeryconfig.task_annotations -----------------------
@app.task(name="tasks.limited_task")
def limited_task(data):
    return {"data": data, "ran_at": time.time()}


# --- Periodic tasks: scheduled by beat from celeryconfig.beat_schedule -----------------------
# Nobody reads these results: ignore_result saves a Redis write per run.
@app.task(name="tasks.generate_report", ignore_result=True)
def generate_report():
    return {"report": "daily", "generated_at": time.time()}


@app.task(name="tasks.check_system", ignore_result=True)
def check_system():
    return {"host": platform.node(), "checked_at": time.time()}


# --- A Task subclass with hooks, and callbacks with link / link_error -----------------------
HOOK_CALLS = []  # (hook, task_id) seen by this process: the tests read it with in-process workers


class CallbackTask(Task):
    """Base class whose hooks run in the worker after each outcome of the task."""

    def on_success(self, retval, task_id, args, kwargs):
        HOOK_CALLS.append(("on_success", task_id))
        logger.info("CallbackTask.on_success: %s[%s] returned %r", self.name, task_id, retval)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        HOOK_CALLS.append(("on_failure", task_id))
        logger.error("CallbackTask.on_failure: %s[%s] raised %r", self.name, task_id, exc)

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        HOOK_CALLS.append(("on_retry", task_id))
        logger.warning("CallbackTask.on_retry: %s[%s] will retry after %r", self.name, task_id, exc)


@app.task(name="tasks.important_task", base=CallbackTask, bind=True, max_retries=1)
def important_task(self, outcome="succeed"):
    """``outcome`` is "succeed", "fail", or "retry" (fail once, then succeed)."""
    if outcome == "fail":
        raise RuntimeError("important_task was asked to fail")
    if outcome == "retry" and self.request.retries == 0:
        raise self.retry(exc=RuntimeError("first attempt fails"), countdown=0.1)
    return {"outcome": outcome, "attempts": self.request.retries + 1}


@app.task(name="tasks.success_callback")
def success_callback(result):
    """Linked with ``link=``: receives the parent's return value."""
    return f"callback got {result!r}"


@app.task(name="tasks.failure_callback")
def failure_callback(task_id):
    """Linked with ``link_error=``: receives the id of the task that failed."""
    failed = AsyncResult(task_id, app=app)
    return f"task {task_id} failed with {failed.result!r}"


# --- Logging from a task, and a task that does not need the app ------------------------------
# @shared_task registers the task with every Celery app, without importing one: how a reusable
# module or a Django app defines tasks. Its log lines go to the worker's log.
@shared_task(name="tasks.log_work")
def log_work(items=3):
    for item in range(1, items + 1):
        logger.info("working on item %d of %d", item, items)
    return items


# --- Priority, expiry and revoke demos -------------------------------------------------------
@app.task(name="tasks.priority_task")
def priority_task(label, hold=0.0):
    time.sleep(hold)  # blockers hold a worker slot so that later tasks queue up in the broker
    return {"label": label, "ran_at": time.time()}
