"""The catalogue of demos: one small function per Celery feature.

Each demo declares what it needs of the stack (``@demo(needs=...)``: chords, priority, remote
control, ...; the features are listed in stack/capabilities.py), sends its tasks, waits for them
with a deadline (never a bare ``.get()``), checks the outcome and returns one line saying what
it showed; it raises ``DemoFailed`` otherwise. A demo the stack cannot carry is not run: its
outcome is "unsupported", with the reason (``stack.decide``).
``client_fixed.py`` runs them against the real stack, ``complete_demo.py`` against in-process
workers, and the tests against both. Not a script: import it.
"""
import subprocess
import sys
import time
from dataclasses import dataclass, field

from celery import chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from celery.states import PROPAGATE_STATES

import stack
import tasks
from stack import FlakyServer  # noqa: F401 - the retry demo's server, also demos.FlakyServer

DEMOS = {}  # name -> function, in the order a reader should meet them
NEEDS = {}  # name -> the features of stack/capabilities.py it needs
BECAUSE = {}  # name -> why it needs them, where the feature alone does not say


class DemoFailed(AssertionError):
    """A demo whose outcome was not what it teaches; the message says what went wrong."""


def demo(func=None, *, needs=(), because=""):
    """Register a demo: ``@demo``, or ``@demo(needs=("chords",))`` when it needs more of the
    stack than a broker and a result backend (``because``: why, when that is not obvious)."""
    def register(func):
        name = func.__name__.removeprefix("demo_")
        DEMOS[name], NEEDS[name] = func, stack.capabilities.known(needs)  # a typo fails here
        BECAUSE[name] = because
        return func
    return register(func) if func else register


def unsupported(name, offers):
    """None when a stack with ``offers`` can run demo ``name``, else the reason it cannot."""
    why = stack.decide(NEEDS[name], offers)
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
            self.offers = stack.offers_of(self.app)

    def remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DemoFailed("the demo ran out of time")
        return left


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
    return f"`{' '.join(stack.worker_command(queue))}`"


def why_pending(app, queue, offers=None):
    """Explain a task that nobody picked up: the usual cause is a queue with no worker."""
    offers = offers or stack.offers_of(app)
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


# --- The demos ---------------------------------------------------------------------------
@demo
def demo_basic(ctx):
    """delay() a task and get() its result with a timeout."""
    result = tasks.add.delay(2, 3)
    value = wait(ctx, result, "celery")
    check(value == 5, f"add(2, 3) returned {value!r}")
    return f"add.delay(2, 3) -> {value} (task {result.id[:8]}, state {result.state})"


# Another process looks the task up by its id alone, as a web request handler would
LOOKUP = ("import sys; from celery.result import AsyncResult; import tasks; "
          "result = AsyncResult(sys.argv[1], app=tasks.app); "
          "print(result.state, result.get(timeout=float(sys.argv[2])))")


@demo(needs=("result_polling",))
def demo_states(ctx):
    """Follow a task PENDING -> STARTED -> SUCCESS, then look it up by id in another process."""
    # countdown: the worker holds it 0.3 s before it starts, so PENDING is always seen first
    result = tasks.take_time.apply_async((0.5,), countdown=0.3)
    seen = [result.state]
    while seen[-1] not in ("SUCCESS", "FAILURE"):
        ctx.remaining()
        time.sleep(0.02)
        if result.state != seen[-1]:
            seen.append(result.state)
    wait(ctx, result, "celery")
    check(seen == ["PENDING", "STARTED", "SUCCESS"], f"states seen: {seen}")
    cannot = stack.decide(("shared_results",), ctx.offers)
    if cannot:  # cache+memory:// (complete_demo.py): say so, rather than pretend
        return f"{' -> '.join(seen)}; no lookup by id in another process here: {cannot}"
    # the same environment (broker, backend, key prefix) as this process: as another terminal
    done = subprocess.run([sys.executable, "-c", LOOKUP, result.id, "5"], cwd=stack.HERE,
                          capture_output=True, text=True, timeout=ctx.remaining())
    answer = done.stdout.strip()
    check(done.returncode == 0 and answer == "SUCCESS {'slept': 0.5}",
          f"another process looking up {result.id} got {answer!r} {done.stderr[-300:]!r}")
    return f"{' -> '.join(seen)}; another process: AsyncResult('{result.id[:8]}...') -> {answer}"


@demo(needs=("result_polling",))
def demo_progress(ctx):
    """Follow a long task's PROGRESS state (update_state meta) until it succeeds."""
    result = tasks.slow_task.delay(5, step_seconds=0.3)
    seen = []
    while not result.ready():
        ctx.remaining()
        # State and meta from ONE read: read apart, the task may finish in between and
        # `result.info` is then its return value (a SQL backend is slow enough to show it)
        meta = result.backend.get_task_meta(result.id)
        if meta["status"] == "PROGRESS" and (not seen or seen[-1] != meta["result"]["current"]):
            seen.append(meta["result"]["current"])
            if ctx.on_progress:
                ctx.on_progress(meta["result"]["current"], meta["result"]["total"])
        time.sleep(0.05)
    summary = wait(ctx, result, "slow_queue")
    check(seen and seen == sorted(seen), f"PROGRESS steps seen out of order: {seen}")
    check(summary["steps"] == 5, f"slow_task returned {summary!r}")
    return f"PROGRESS steps seen: {seen}, then SUCCESS {summary}"


@demo
def demo_routing(ctx):
    """task_routes send each task to its own queue, consumed by its own worker."""
    sent = {"fast_queue": tasks.fast_task.delay("routed"),
            "slow_queue": tasks.slow_task.delay(1, step_seconds=0.05),
            "celery": tasks.add.delay(1, 1)}
    seen = []
    for queue, result in sent.items():
        wait(ctx, result, queue)
        # result_extended=True stores the queue a task was delivered from and the worker
        check(result.queue == queue, f"{result.name} came from {result.queue}, not {queue}")
        seen.append(f"{result.name} -> {queue} ({result.worker})")
    return ", ".join(seen)


@demo(needs=("chords",))
def demo_canvas(ctx):
    """group (parallel), chain (pipeline) and chord (parallel, then a callback)."""
    doubled = wait(ctx, group(tasks.process_data.s(i) for i in range(4)).delay(), "celery")
    check([r["doubled"] for r in doubled] == [0, 2, 4, 6], f"group gave {doubled}")
    saved = wait(ctx, chain(tasks.process_data.s(5), tasks.validate_data.s(),
                            tasks.save_result.s()).delay(), "celery")
    check(saved == {"value": 5, "doubled": 10, "valid": True, "saved": True}, f"chain: {saved}")
    summary = wait(ctx, chord((tasks.process_data.s(i) for i in range(1, 4)),
                              tasks.combine_results.s()).delay(), "celery")
    check(summary == {"count": 3, "total": 12}, f"chord gave {summary}")
    return f"group -> {len(doubled)} results; chain -> saved={saved['saved']}; chord -> {summary}"


@demo(needs=("chords",))  # a group followed by a task is a chord
def demo_workflow(ctx):
    """Canvas primitives nested: a group of chains, then combine, then notify."""
    pipelines = group(chain(tasks.process_data.s(i), tasks.validate_data.s(),
                            tasks.save_result.s()) for i in range(1, 4))
    workflow = pipelines | tasks.combine_results.s() | tasks.send_notification.s()
    message = wait(ctx, workflow.delay(), "celery")
    check(message == "report ready: 3 items, total 12", f"workflow gave {message!r}")
    return f"group of 3 chains | combine | notify -> {message!r}"


@demo
def demo_chunks(ctx):
    """Many tiny tasks: one message each, in chunks of 10, or all in one starmap (timed)."""
    pairs = [(i, i) for i in range(100)]
    expected = [x * y for x, y in pairs]
    timings = {}
    for label, signature in (
            ("group of 100 tasks", group(tasks.multiply.s(x, y) for x, y in pairs)),
            ("chunks of 10 (10 tasks)", tasks.multiply.chunks(pairs, 10)),
            ("starmap (1 task)", tasks.multiply.starmap(pairs))):
        started = time.monotonic()
        value = wait(ctx, signature.delay(), "celery")
        timings[label] = time.monotonic() - started
        flat = [v for chunk in value for v in chunk] if label.startswith("chunks") else value
        check(flat == expected, f"{label} returned {flat[:5]}...")
    each = timings["group of 100 tasks"]
    parts = ", ".join(f"{label} {seconds:.2f}s" for label, seconds in timings.items())
    return (f"100 multiplications: {parts}; chunks were "
            f"{each / timings['chunks of 10 (10 tasks)']:.0f}x faster than a task each")


@demo
def demo_retry(ctx):
    """autoretry_for with exponential backoff against a flaky HTTP server."""
    with FlakyServer(failures=2, host=ctx.http_host, bind=ctx.http_bind) as server:
        result = tasks.fetch_url.delay(server.url)
        answer = wait(ctx, result, "network_queue")
    check(answer["attempts"] == 3 and server.requests == 3,
          f"expected 3 attempts (2 failures + 1 success), got {answer} / {server.requests} requests")
    return f"fetch_url failed twice with 503, retried after 1 s and 2 s, succeeded: {answer['status']}"


@demo
def demo_time_limit(ctx):
    """A soft time limit the task catches (SoftTimeLimitExceeded), a hard one that kills it."""
    cannot = stack.decide(("time_limits",), ctx.offers)
    if cannot:
        # Threads (and solo) workers cannot interrupt a task: show that, rather than pretend
        value = wait(ctx, tasks.time_limited.delay(1.5), "celery")
        check(value["finished"], f"time_limited(1.5) returned {value}")
        return (f"not enforced here: time_limited ran {value['seconds']}s, past its 1 s soft limit; "
                f"time limits need workers with the prefork pool (python run_demo.py)")
    soft = tasks.time_limited.delay(5)                  # stops itself at the soft limit (1 s)
    hard = tasks.time_limited.delay(5, clean_up=False)  # killed at the hard limit (2 s)
    value = wait(ctx, soft, "celery")
    check(not value["finished"] and value["stopped_after"] < 2,
          f"time_limited(5) should stop itself after 1 s, returned {value}: is the worker "
          f"running the prefork pool (not --pool=solo/threads)?")
    wait(ctx, hard, "celery", propagate=False)
    error = type(hard.result).__name__
    check(hard.state == "FAILURE" and error == "TimeLimitExceeded",
          f"time_limited(5, clean_up=False) ended {hard.state} ({hard.result!r})")
    return (f"soft limit: the task caught SoftTimeLimitExceeded and stopped after "
            f"{value['stopped_after']}s; hard limit: killed at 2 s -> FAILURE {error}")


@demo
def demo_rate_limit(ctx):
    """A rate_limit of 5/s spaces tasks out, enforced by the worker."""
    results = [tasks.limited_task.delay(i) for i in range(6)]
    ran_at = sorted(wait(ctx, r, "celery")["ran_at"] for r in results)
    spread = ran_at[-1] - ran_at[0]
    check(spread >= 0.8, f"6 tasks at 5/s should take about 1 s, took {spread:.2f}s")
    return f"6 tasks under rate_limit 5/s ran over {spread:.2f}s (about 0.2 s apart)"


@demo(needs=("remote_control",), because="this demo counts beat's runs with `inspect stats`; "
                                         "beat itself works")
def demo_periodic(ctx):
    """beat sends tasks.check_system on a schedule; a worker runs it."""
    def runs():
        stats = ctx.app.control.inspect(timeout=1.0).stats() or {}
        return sum(s.get("total", {}).get("tasks.check_system", 0) for s in stats.values())
    before = runs()
    while runs() <= before:
        if ctx.deadline - time.monotonic() < 1.5:
            raise DemoFailed("beat did not send tasks.check_system in time: is "
                             "`celery -A tasks beat` running (exactly one)?")
        time.sleep(0.5)
    return f"beat sent tasks.check_system (every 3 s); workers have run it {runs()} times"


@demo(needs=("result_polling",))  # failure_callback, a task, reads the failed task's result
def demo_callbacks(ctx):
    """link / link_error callbacks and a Task subclass's on_success/on_failure/on_retry hooks."""
    on_success = tasks.success_callback.s()
    success_result = on_success.freeze()  # a known id, so we can wait for the callback itself
    tasks.important_task.apply_async(("succeed",), link=on_success)
    said = wait(ctx, success_result, "celery")
    on_error = tasks.failure_callback.s()
    error_result = on_error.freeze()
    failing = tasks.important_task.apply_async(("fail",), link_error=on_error)
    wait(ctx, failing, "celery", propagate=False)
    check(failing.state == "FAILURE", f"important_task('fail') ended {failing.state}")
    reported = wait(ctx, error_result, "celery")
    retried = wait(ctx, tasks.important_task.delay("retry"), "celery")
    check("'attempts': 1" in said and "RuntimeError" in reported and retried["attempts"] == 2,
          f"callbacks said {said!r} / {reported!r} / {retried!r}")
    return "link -> success_callback, link_error -> failure_callback, on_retry -> 2 attempts"


@demo
def demo_logging(ctx):
    """A task logs with get_task_logger: its lines, with task name and id, are in the worker's log."""
    result = tasks.log_work.delay(3)
    count = wait(ctx, result, "celery")
    check(count == 3, f"log_work(3) returned {count!r}")
    return (f"log_work logged 3 lines; the default worker's log (-l INFO) shows "
            f"`tasks.log_work[{result.id[:8]}...]: working on item 1 of 3`")


@demo(needs=("priority", "remote_control"))  # counts the worker slots with `inspect stats`
def demo_priority(ctx):
    """An urgent task overtakes routine ones waiting in the queue (RabbitMQ: 9, Redis: 0)."""
    # Keep every worker slot of the default queue busy, so the next tasks wait in the broker,
    # where RabbitMQ hands out the highest priority first.
    stats = ctx.app.control.inspect(timeout=1.0).stats() or {}
    queues = ctx.app.control.inspect(timeout=1.0).active_queues() or {}
    slots = sum(s["pool"].get("max-concurrency", 1) + s.get("prefetch_count", 1)
                for name, s in stats.items()
                if "celery" in {q["name"] for q in queues.get(name, [])})
    # RabbitMQ hands out the highest number first; Redis the lowest (0 is the most urgent).
    urgent, routine = ctx.offers.broker.priority_levels()
    blockers = [tasks.priority_task.apply_async(("blocker", 0.5), priority=urgent)
                for _ in range(slots + 2)]
    low = [tasks.priority_task.apply_async((f"low{i}",), priority=routine) for i in range(8)]
    high = tasks.priority_task.apply_async(("high",), priority=urgent)
    for result in blockers + low + [high]:
        wait(ctx, result, "celery")
    order = [r.result["label"] for r in sorted(low + [high], key=lambda r: r.result["ran_at"])]
    rank = order.index("high")
    # Tasks that start in the same instant on several pool slots may swap places, so the check
    # is that "high" overtook most of the 8 tasks queued before it (FIFO would put it last).
    check(rank <= 3, f"priority {urgent} should overtake the priority {routine} tasks "
                     f"({ctx.offers.broker.kind}: {ctx.offers.broker.priority}), ran {order}")
    return (f"8 tasks of priority {routine}, then 1 of priority {urgent} "
            f"({ctx.offers.broker.priority}): it started after only {rank} of them")


@demo(needs=("revoked_state",))
def demo_expires(ctx):
    """A task whose `expires` passes before it runs is REVOKED, never run."""
    # The worker receives the message at once but holds it until its countdown; by then
    # `expires` has passed, so it is revoked instead of run.
    result = tasks.add.apply_async((1, 1), countdown=2, expires=1)
    state = wait_state(ctx, result, ("REVOKED", "SUCCESS", "FAILURE"), "celery")
    check(state == "REVOKED", f"a task that expired before it could run ended {state}")
    return "add(1, 1) with countdown=2, expires=1 -> REVOKED, never run"


@demo(needs=("remote_control", "revoked_state"))  # revoke() is a broadcast to every worker
def demo_revoke(ctx):
    """revoke() a waiting task, and revoke(terminate=True) a running one."""
    queued = tasks.add.apply_async((2, 2), countdown=2)
    queued.revoke()
    state = wait_state(ctx, queued, ("REVOKED", "SUCCESS"), "celery")
    check(state == "REVOKED", f"a revoked task still ran ({state})")
    cannot = stack.decide(("terminate",), ctx.offers)
    if cannot:
        ctx.notes.append(f"revoke: only the waiting task; {cannot}")
        return f"revoke() of a waiting task -> REVOKED (not terminate: {cannot})"
    running = tasks.slow_task.delay(40, step_seconds=0.25)
    wait_state(ctx, running, ("PROGRESS",), "slow_queue")
    running.revoke(terminate=True, signal="SIGTERM")
    state = wait_state(ctx, running, ("REVOKED", "SUCCESS", "FAILURE"), "slow_queue")
    check(state == "REVOKED", f"terminated slow_task ended {state}")
    return "revoke() of a waiting task and revoke(terminate=True) of a running one -> REVOKED"


@demo(needs=("remote_control",))
def demo_inspect(ctx):
    """app.control.inspect(): which workers are up, what they consume and know."""
    inspect = ctx.app.control.inspect(timeout=1.0)
    queues = inspect.active_queues() or {}
    check(queues, "no worker answered `inspect active_queues`")
    registered = inspect.registered() or {}
    consumed = {q["name"] for qs in queues.values() for q in qs}
    missing = {q.name for q in ctx.app.conf.task_queues} - consumed
    check(not missing, f"no worker consumes {sorted(missing)}")
    count = max(len(names) for names in registered.values()) if registered else 0
    return f"{len(queues)} workers answered; queues {sorted(consumed)}; {count} tasks registered"


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
        fault = stack.service_fault(exc, ctx.app) or ""  # ... unless a service stopped answering
        detail, status = fault or f"{exc.__class__.__name__}: {exc}", "failed"
    return Outcome(name, status, round(time.monotonic() - started, 2), detail, fault)


def count(outcomes):
    """'12 passed, 0 failed, 1 unsupported': the summary line of every runner."""
    statuses = [o.status for o in outcomes]
    return ", ".join(f"{statuses.count(s)} {s}" for s in ("passed", "failed", "unsupported"))


DEADLINES = {"progress": 15, "retry": 20, "periodic": 12, "priority": 20, "revoke": 20,
             "states": 15, "chunks": 20, "time_limit": 15}


def deadline_for(name):
    return DEADLINES.get(name, 10)
