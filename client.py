"""A first walk through Celery's client API, top to bottom: read it, then run it.

    python client.py      # with the stack up: `python run_demo.py --keep-running` in another
                          # terminal, or a broker, Redis, a worker per queue (see tasks.py) and beat

Every wait below has a timeout, and that is the first lesson. This file is the plain version;
``client_fixed.py`` runs the same features with the guards a real client needs, because:
- ``result.get()`` without a timeout waits forever when no worker ever runs the task;
- a task routed to a queue that no worker consumes stays PENDING, silently: the broker keeps
  the message and nothing says why. client_fixed.py names the queue and the command that
  starts its worker;
- RabbitMQ drops a message whose ``expires`` passed before a worker got it: PENDING forever;
- with the ``rpc://`` result backend, PROGRESS states are lost after an earlier ``.get()`` in
  the same process and chords do not work: this demo keeps results in Redis (or files);
- a client with no broker would retry for a while: both scripts check it first and say so;
- a broker or Redis can also stop answering in the middle of a run: the socket timeouts in
  celeryconfig.py turn that into an error that names the service, in seconds.
"""
import os
import sys
import time

from celery import chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeout

import stack
import tasks
from stack import FlakyServer  # a local HTTP server that answers 503 twice, then 200

TIMEOUT = 10  # seconds; no wait in this file is longer
HARD_DEADLINE = 150  # seconds for the whole walk (about 15 s when all is well)


def step(title):
    print(f"\n== {title}")


def wait_for_state(result, states, timeout=TIMEOUT):
    """Poll ``result.state``: the way to follow a task without blocking on it."""
    deadline = time.monotonic() + timeout
    while result.state not in states:
        if time.monotonic() > deadline:
            raise CeleryTimeout(f"task {result.id} still {result.state} after {timeout}s")
        time.sleep(0.1)
    return result.state


def walk_through():
    step("1. delay() sends a task; get(timeout=...) waits for its result")
    result = tasks.add.delay(4, 4)
    print(f"sent task {result.id}, state {result.state}")
    print("add(4, 4) =", result.get(timeout=TIMEOUT))

    step("2. apply_async() takes options: countdown, expires, priority, queue, ...")
    result = tasks.add.apply_async((10, 20), countdown=1, expires=60, priority=5)
    print("add(10, 20), started after a 1 s countdown =", result.get(timeout=TIMEOUT))

    step("3. Progress: slow_task reports a custom PROGRESS state; the caller polls it")
    result = tasks.slow_task.delay(5, step_seconds=0.3)
    deadline, seen = time.monotonic() + TIMEOUT, None
    while not result.ready() and time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)  # state and info read together
        if meta["status"] == "PROGRESS" and meta["result"] != seen:
            seen = meta["result"]
            print(f"  step {seen['current']} of {seen['total']}")
        time.sleep(0.05)
    print("slow_task returned", result.get(timeout=TIMEOUT))

    step("4. Routing: celeryconfig.task_routes sends each task to its own queue")
    for result in (tasks.fast_task.delay("hello"), tasks.add.delay(1, 2)):
        result.get(timeout=TIMEOUT)
        print(f"  {result.name} ran on {result.worker}, taken from queue {result.queue}")

    step("5. Canvas: group (in parallel), chain (one after another), chord (group + callback)")
    print("group:", group(tasks.process_data.s(i) for i in range(3)).delay().get(timeout=TIMEOUT))
    pipeline = chain(tasks.process_data.s(5), tasks.validate_data.s(), tasks.save_result.s())
    print("chain:", pipeline.delay().get(timeout=TIMEOUT))
    summary = chord((tasks.process_data.s(i) for i in range(1, 4)), tasks.combine_results.s())
    print("chord:", summary.delay().get(timeout=TIMEOUT))

    step("6. Retry: fetch_url retries after 1 s and 2 s while the server answers 503")
    with FlakyServer(failures=2, host=os.environ.get("DEMO_HTTP_HOST", "127.0.0.1"),
                     bind=os.environ.get("DEMO_HTTP_BIND", "127.0.0.1")) as server:
        print(tasks.fetch_url.delay(server.url).get(timeout=20))

    step("7. Callbacks: link= runs on success, link_error= on failure")
    callback = tasks.success_callback.s()
    called = callback.freeze()  # gives the callback an id we can wait for
    tasks.important_task.apply_async(("succeed",), link=callback)
    print(called.get(timeout=TIMEOUT))
    errback = tasks.failure_callback.s()
    reported = errback.freeze()
    failing = tasks.important_task.apply_async(("fail",), link_error=errback)
    failing.get(timeout=TIMEOUT, propagate=False)  # propagate=False: return the error, don't raise
    print(f"important_task('fail') ended {failing.state};", reported.get(timeout=TIMEOUT))

    step("8. Revoke: cancel a task that has not run yet")
    result = tasks.add.apply_async((1, 1), countdown=3)
    result.revoke()  # revoke(terminate=True) would also stop one that is running
    print("add(1, 1) with countdown=3, revoked at once ->",
          wait_for_state(result, {"REVOKED", "SUCCESS"}))

    step("9. Inspect: ask the running workers what they consume")
    active = tasks.app.control.inspect(timeout=1.0).active_queues() or {}
    for worker, queues in sorted(active.items()):
        print(f"  {worker}: {', '.join(q['name'] for q in queues)}")


def main():
    # Ctrl-C and SIGTERM work even while a call waits on a frozen socket, and no run of this
    # file lasts longer than HARD_DEADLINE, whatever the broker or Redis do (stack/deadlines.py)
    guard = stack.ClientGuard(tasks.app, hard_deadline=HARD_DEADLINE).install()
    try:  # fail in seconds, with the URL and a hint, when there is nothing to talk to
        stack.check_services(tasks.app.conf.broker_url, tasks.app.conf.result_backend)
    except stack.ServiceUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        walk_through()
    except CeleryTimeout as exc:
        print(f"\nno result in time ({str(exc).rstrip('.')}). Is a worker running for every queue? "
              "`python client_fixed.py` says which queue has none.", file=sys.stderr)
        stack.forget_pending_results(tasks.app)  # the task may still run; we stop waiting
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted ({guard.stopped})", file=sys.stderr)
        stack.exit_now(130)  # no goodbye to a service that may be frozen
    except Exception as exc:  # a broker or Redis that fails mid-run: one line, no traceback
        fault = stack.service_fault(exc, tasks.app)
        if fault is None:
            raise
        print(f"\nerror: {fault}", file=sys.stderr)
        stack.exit_now(2)
    print("\nDone: every step finished.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
