"""The harness under demos.py: the registry, the Context a lesson receives, waiting with a
deadline, the diagnosis of a task nobody picked up, and the Outcome of a run.

demos.py holds the lessons themselves, each declaring what it needs of the stack
(``@demo(needs=...)``, features from stack/capabilities.py); everything a lesson calls that is
not Celery itself (``wait``, ``check``, ``ctx.cannot(...)``) is here, so that a lesson reads as
what it teaches. It knows no lesson by name: client_fixed.py, complete_demo.py and the tests
run the lessons through ``demos.DEMOS`` and ``run()``.
"""
import errno
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from celery.states import PROPAGATE_STATES

from . import capabilities
from .capabilities import decide, offers_of
from .deadlines import missing_folder, service_fault
from .processes import worker_command
from .services import HERE

__all__ = ["DEMOS", "NEEDS", "BECAUSE", "DEADLINES", "DemoFailed", "demo", "unsupported",
           "describe", "Context", "check", "unconsumed_queues", "start_worker_hint",
           "why_pending", "wait", "wait_state", "Outcome", "run", "count", "deadline_for"]

DEMOS = {}  # name -> function, in the order a reader should meet them
NEEDS = {}  # name -> the features of stack/capabilities.py it needs
BECAUSE = {}  # name -> why it needs them, where the feature alone does not say
DEADLINES = {}  # name -> seconds it may take, where the default (10 s) is too short
DEFAULT_DEADLINE = 10


class DemoFailed(AssertionError):
    """A demo whose outcome was not what it teaches; the message says what went wrong."""


def demo(func=None, *, needs=(), because=""):
    """Register a demo: ``@demo``, or ``@demo(needs=("chords",))`` when it needs more of the
    stack than a broker and a result backend (``because``: why, when that is not obvious)."""
    def register(func):
        name = func.__name__.removeprefix("demo_")
        DEMOS[name], NEEDS[name] = func, capabilities.known(needs)  # a typo fails here
        BECAUSE[name] = because
        return func
    return register(func) if func else register


def unsupported(name, offers):
    """None when a stack with ``offers`` can run demo ``name``, else the reason it cannot."""
    why = decide(NEEDS[name], offers)
    return f"{why} ({BECAUSE[name]})" if why and BECAUSE[name] else why


def describe(name):
    """The first line of a demo's docstring: what it shows."""
    return (DEMOS[name].__doc__ or "").strip().split("\n")[0]


@dataclass
class Context:
    """What a demo needs to know about the stack it runs on."""
    app: object
    offers: object = None                 # stack.offers_of(app, pool): what this stack can do
    deadline: float = 0.0                 # monotonic time by which the current demo must end
    on_progress: object = None            # callback(current, total) for the progress demo
    http_host: str = "127.0.0.1"          # where workers reach the flaky HTTP server
    http_bind: str = "127.0.0.1"          # where it listens (0.0.0.0 when workers are elsewhere)
    notes: list = field(default_factory=list)

    def __post_init__(self):
        if self.offers is None:
            self.offers = offers_of(self.app)

    def remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoFailed("the demo ran out of time")
        return left

    def cannot(self, feature):
        """Why this stack cannot do ``feature`` (a FEATURES name), or None when it can: for a
        lesson that shows a smaller variant rather than nothing."""
        return decide((feature,), self.offers)

    @property
    def priority(self):
        """(urgent, routine, how this broker orders them): RabbitMQ hands out the highest
        number first, Redis the lowest (0 is the most urgent)."""
        urgent, routine = self.offers.broker.priority_levels()
        return urgent, routine, self.offers.broker.priority

    def worker_slots(self, queue):
        """How many tasks of ``queue`` the workers take at once (pool slots + prefetch), asked
        with `inspect stats` and `inspect active_queues`."""
        stats = self.app.control.inspect(timeout=1.0).stats() or {}
        queues = self.app.control.inspect(timeout=1.0).active_queues() or {}
        return sum(s["pool"].get("max-concurrency", 1) + s.get("prefetch_count", 1)
                   for name, s in stats.items()
                   if queue in {q["name"] for q in queues.get(name, [])})

    def in_another_process(self, code, *args):
        """Run ``python -c CODE ARGS`` in the project folder with this process's environment
        (broker, backend, key prefix), as a second terminal would; the CompletedProcess."""
        return subprocess.run([sys.executable, "-c", code, *args], cwd=HERE,
                              capture_output=True, text=True, timeout=self.remaining())


def check(condition, message):
    if not condition:
        raise DemoFailed(message)


def unconsumed_queues(app, queues):
    """Ask the workers what they consume: (names of the workers that answered, the queues of
    ``queues`` that none of them consumes). A task sent to such a queue stays PENDING,
    silently: the broker keeps it until a worker consumes that queue."""
    replies = app.control.inspect(timeout=1.0).active_queues() or {}
    consumed = {q["name"] for consumed in replies.values() for q in consumed}
    return sorted(replies), [queue for queue in queues if queue not in consumed]


def start_worker_hint(queue):
    return f"`{' '.join(worker_command(queue))}`"


def why_pending(app, queue, offers=None):
    """Explain a task that nobody picked up: the usual cause is a queue with no worker."""
    offers = offers or offers_of(app)
    if not offers.offers("remote_control"):  # cannot ask the workers (SQS)
        return (f"this broker cannot ask workers what they consume ({offers.broker.kind}: no "
                f"remote control); is a worker running for queue {queue!r}? "
                f"{start_worker_hint(queue)}")
    workers, missing = unconsumed_queues(app, [queue])
    if not workers:
        return (f"no worker is running at all; start one for queue {queue!r}: "
                f"{start_worker_hint(queue)}")
    if missing:
        return (f"no worker consumes queue {queue!r} (workers: {', '.join(workers)}); "
                f"start one: {start_worker_hint(queue)}")
    dropped = (", or the broker dropped the message (RabbitMQ discards a message whose "
               "`expires` passed)") if offers.broker.drops_expired else ""
    return f"workers consume {queue!r} but did not finish in time: they may be busy{dropped}"


def wait(ctx, result, queue, timeout=None, propagate=True):
    """``result.get`` with a deadline; a task still PENDING at the deadline is diagnosed.

    A task that failed in the worker raises DemoFailed naming its exception, not the exception
    itself: a task's requests.ConnectionError (an OSError) must not read as a broker fault.
    """
    limit = min(timeout or ctx.remaining(), ctx.remaining())
    try:
        if not isinstance(result, AsyncResult):  # a group's GroupResult has no single state
            return result.get(timeout=limit, propagate=propagate, interval=0.05)
        value = result.get(timeout=limit, propagate=False, interval=0.05)
        # state comes from the result get() just cached: no second round trip
        if propagate and result.state in PROPAGATE_STATES:
            raise DemoFailed(f"the task failed in the worker: {type(value).__name__}: {value}")
        return value
    except CeleryTimeout:
        # Stop waiting for it now: Redis results stay subscribed until the task ends, and
        # unsubscribing at interpreter exit fails ("Exception ignored in AsyncResult.__del__")
        result.backend.remove_pending_result(result)
        lost = missing_folder(ctx.app)
        if lost:  # the embedded stack's folder is gone: a service fault (service_fault names it)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), lost[1]) from None
        if result.state == "PENDING":
            raise DemoFailed(f"still PENDING after {limit:.0f}s: "
                             f"{why_pending(ctx.app, queue, ctx.offers)}") from None
        raise DemoFailed(f"not finished after {limit:.0f}s (state {result.state})") from None


def wait_state(ctx, result, states, queue):
    while result.state not in states:
        if ctx.deadline - time.monotonic() < 0.2:
            why = (why_pending(ctx.app, queue, ctx.offers) if result.state == "PENDING"
                   else result.state)
            raise DemoFailed(f"expected {'/'.join(states)}, still {result.state}: {why}")
        time.sleep(0.05)
    return result.state


@dataclass
class Outcome:
    name: str
    status: str        # "passed", "failed" or "unsupported" (this stack cannot carry it)
    seconds: float
    detail: str
    fault: str = ""  # set when a service (broker, result backend) failed: the run should stop

    @property
    def ok(self):
        """Not a failure: passed, or unsupported with its reason."""
        return self.status != "failed"

    def as_dict(self):
        return {**vars(self), "ok": self.ok}


def run(ctx, name, deadline_s):
    """Run one demo with its own deadline; never raises, returns an Outcome."""
    why = unsupported(name, ctx.offers)
    if why:
        return Outcome(name, "unsupported", 0.0, why)
    ctx.deadline = time.monotonic() + deadline_s
    started = time.monotonic()
    fault = ""
    try:
        detail, status = DEMOS[name](ctx), "passed"
    except Exception as exc:  # a demo's failure is reported, and the next demo still runs
        fault = service_fault(exc, ctx.app) or ""  # ... unless a service stopped answering
        detail, status = fault or f"{exc.__class__.__name__}: {exc}", "failed"
    return Outcome(name, status, round(time.monotonic() - started, 2), detail, fault)


def count(outcomes):
    """'12 passed, 0 failed, 1 unsupported': the summary line of every runner."""
    statuses = [o.status for o in outcomes]
    return ", ".join(f"{statuses.count(s)} {s}" for s in ("passed", "failed", "unsupported"))


def deadline_for(name):
    return DEADLINES.get(name, DEFAULT_DEADLINE)
