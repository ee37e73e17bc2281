"""The Celery app and every task of the demo: read this file first.

    celery -A tasks worker -l INFO                          # a worker for the default queue
    celery -A tasks worker -Q slow_queue -n slow@%h -l INFO # a worker for one queue
    celery -A tasks beat -l INFO                            # the periodic scheduler (only one!)

Run these from the folder that holds this file (or add ``--workdir PATH``): ``-A tasks``
imports this module by name. Where each task goes is set in ``celeryconfig.task_routes``.
This file and celeryconfig.py need nothing else of this repository: what the demo adds to a
worker (start-up checks, workarounds for Celery bugs) Celery loads from stack/ by the names
celeryconfig gives, only where stack/ is there.
"""
import platform
import time

import requests
from celery import Celery, Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.utils.log import get_task_logger

app = Celery("tasks")
# broker, results, queues, routes...: celeryconfig.py. Read now (force), not when first needed:
# else a result looked up first gets Celery's own class, not the configured override_backends.
app.config_from_object("celeryconfig", force=True)


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
# Nobody reads this result: ignore_result saves a Redis write per run.
@app.task(name="tasks.generate_report", ignore_result=True)
def generate_report():
    return {"report": "daily", "generated_at": time.time()}


# Each run also keeps its report under one task id that anyone can look up (the `periodic`
# demo does), in a state of its own: Celery never overwrites a SUCCESS result.
LATEST_CHECK = "check-system-latest"


@app.task(name="tasks.check_system", bind=True, ignore_result=True)
def check_system(self):
    report = {"host": platform.node(), "checked_at": time.time()}
    self.update_state(task_id=LATEST_CHECK, state="CHECKED", meta=report)
    return report


# --- A Task subclass with hooks, and callbacks with link / link_error -----------------------
# A task logger prefixes each line with the task's name and id: "tasks.log_work[3f2c...]: ..."
logger = get_task_logger(__name__)
HOOK_CALLS = []  # (hook, task_id) seen by this process: the tests read it with in-process workers


class CallbackTask(Task):
    """Base class whose hooks run in the worker after each outcome of the task."""

    # INFO: the worker itself logs each failure and retry, at the level it deserves
    def on_success(self, retval, task_id, args, kwargs):
        HOOK_CALLS.append(("on_success", task_id))
        logger.info("CallbackTask.on_success: %s[%s] returned %r", self.name, task_id, retval)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        HOOK_CALLS.append(("on_failure", task_id))
        logger.info("CallbackTask.on_failure: %s[%s] raised %r", self.name, task_id, exc)

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        HOOK_CALLS.append(("on_retry", task_id))
        logger.info("CallbackTask.on_retry: %s[%s] will retry after %r", self.name, task_id, exc)


# throws: the failure this task is asked for is expected, so the worker logs it as one INFO
# line ("raised expected: RuntimeError(...)"), not as an ERROR with a traceback
@app.task(name="tasks.important_task", base=CallbackTask, bind=True, max_retries=1,
          throws=(RuntimeError,))
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
