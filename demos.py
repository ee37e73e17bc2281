"""The lessons: one small function per Celery feature, in the order a reader should meet them.

Each lesson sends its tasks, waits for them with a deadline (``wait``: never a bare ``.get()``),
checks the outcome (``check``) and returns one line saying what it showed. ``@demo(needs=...)``
says what it needs of the stack beyond a broker and a result backend (chords, priority, remote
control, ...; stack/capabilities.py lists them): a stack that cannot carry it does not run it
and says why. The harness behind ``demo``, ``wait`` and the ``ctx`` each lesson receives is
stack/lessons.py; you need not open it to read a lesson.

``client_fixed.py`` runs the lessons against the real stack, ``complete_demo.py`` against
in-process workers, and the tests against both. Not a script: import it.
"""
import time

from celery import chain, chord, group

import tasks
from stack import FlakyServer  # noqa: F401 - the retry demo's server, also demos.FlakyServer
from stack.lessons import DEADLINES, DemoFailed, check, demo, wait, wait_state
# What the runners (client_fixed.py, complete_demo.py, run_demo.py, the tests) use, as demos.NAME
from stack.lessons import (DEMOS, NEEDS, Context, Outcome, count, deadline_for,  # noqa: F401
                           describe, run, start_worker_hint, unconsumed_queues, unsupported)


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
    cannot = ctx.cannot("shared_results")
    if cannot:  # cache+memory:// (complete_demo.py): say so, rather than pretend
        return f"{' -> '.join(seen)}; no lookup by id in another process here: {cannot}"
    # the same environment (broker, backend, key prefix) as this process: as another terminal
    done = ctx.in_another_process(LOOKUP, result.id, "5")
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
    cannot = ctx.cannot("time_limits")
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
    # Five gaps of 0.2 s: about 1 s. The worker spaces the tasks out as it hands them to its
    # pool; each task notes when it started, a little later, by an amount that varies with the
    # machine's load (0.80 s seen on a busy CI run). Unthrottled, all six start within
    # milliseconds, so most of the second is proof enough.
    check(spread >= 0.6, f"6 tasks at 5/s should take about 1 s, took {spread:.2f}s")
    return f"6 tasks under rate_limit 5/s ran over {spread:.2f}s (about 0.2 s apart)"


@demo(needs=("result_polling",), because="this demo reads beat's latest run from the result "
                                         "backend; beat itself works")
def demo_periodic(ctx):
    """beat sends tasks.check_system on a schedule; a worker runs it."""
    # each run stores its report under one known task id, in its own state "CHECKED"
    latest = ctx.app.AsyncResult(tasks.LATEST_CHECK)
    since = time.time()
    while True:  # until a run that started after this demo did
        meta = latest.backend.get_task_meta(latest.id, cache=False)  # each run overwrites it
        if meta["status"] == "CHECKED" and meta["result"]["checked_at"] > since:
            break
        if ctx.deadline - time.monotonic() < 0.3:
            raise DemoFailed("beat did not send tasks.check_system in time: is "
                             "`celery -A tasks beat` running (exactly one)?")
        time.sleep(0.2)
    return (f"beat sent tasks.check_system (every 3 s), a worker ran it "
            f"{meta['result']['checked_at'] - since:.1f}s into this demo: "
            f"AsyncResult({latest.id!r}) holds the latest run")


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
    logged = wait(ctx, result, "celery")
    check(logged == 3, f"log_work(3) returned {logged!r}")
    return (f"log_work logged 3 lines; the default worker's log (-l INFO) shows "
            f"`tasks.log_work[{result.id[:8]}...]: working on item 1 of 3`")


@demo(needs=("priority", "remote_control"))  # counts the worker slots with `inspect stats`
def demo_priority(ctx):
    """An urgent task overtakes routine ones waiting in the queue (RabbitMQ: 9, Redis: 0)."""
    # priority_task goes to priority_queue, the one queue declared with x-max-priority
    # (celeryconfig.py). Keep every worker slot of that queue busy, so the next tasks wait in
    # the broker, where RabbitMQ hands out the highest priority first.
    slots = ctx.worker_slots("priority_queue")
    # RabbitMQ hands out the highest number first; Redis the lowest (0 is the most urgent).
    urgent, routine, direction = ctx.priority
    blockers = [tasks.priority_task.apply_async(("blocker", 0.5), priority=urgent)
                for _ in range(slots + 2)]
    low = [tasks.priority_task.apply_async((f"low{i}",), priority=routine) for i in range(8)]
    high = tasks.priority_task.apply_async(("high",), priority=urgent)
    for result in blockers + low + [high]:
        wait(ctx, result, "priority_queue")
    order = [r.result["label"] for r in sorted(low + [high], key=lambda r: r.result["ran_at"])]
    rank = order.index("high")
    # Tasks that start in the same instant on several pool slots may swap places, so the check
    # is that "high" overtook most of the 8 tasks queued before it (FIFO would put it last).
    check(rank <= 3, f"priority {urgent} should overtake the priority {routine} tasks "
                     f"({direction}), ran {order}")
    return (f"8 tasks of priority {routine}, then 1 of priority {urgent} "
            f"({direction}): it started after only {rank} of them")


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
    cannot = ctx.cannot("terminate")
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
    known = max(len(names) for names in registered.values()) if registered else 0
    return f"{len(queues)} workers answered; queues {sorted(consumed)}; {known} tasks registered"


# How long each lesson may take, where the default (10 s) is too short: its tasks' own
# durations (slow steps, retries' backoff, beat's 3 s schedule) plus the worker's latency.
DEADLINES.update({"progress": 15, "retry": 20, "periodic": 12, "priority": 20, "revoke": 20,
                  "states": 15, "chunks": 20, "time_limit": 15})
