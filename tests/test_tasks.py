"""Every task and every configured feature, through real in-process workers.

Each test takes the `live` fixture: workers on a throw-away RabbitMQ vhost with results in
Redis, or on the embedded stack (filesystem:// + file://) where there is no RabbitMQ.
(complete_demo.py runs the catalogue on memory://: test_config.py.) revoke(terminate=True)
needs prefork pool processes: test_clients.py runs it on real workers.
"""
import time
from contextlib import contextmanager

import pytest
from celery import chord

import demos
import stack
import tasks


@contextmanager
def paused(app, queues):
    """Workers stop consuming ``queues`` (Celery's cancel_consumer), then each gets back its own."""
    before = app.control.inspect(timeout=1).active_queues() or {}
    owners = {q: [w for w, consumed in before.items() if q in {c["name"] for c in consumed}]
              for q in queues}
    # `limit` = the number of replies to expect, so the call returns as soon as all have answered
    for queue, workers in owners.items():
        app.control.cancel_consumer(queue, destination=workers, reply=True, timeout=2,
                                    limit=len(workers))
    try:
        yield
    finally:
        for queue, workers in owners.items():
            app.control.add_consumer(queue, destination=workers, reply=True, timeout=2,
                                     limit=len(workers))


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_demo(live, name):
    """The catalogue that client_fixed.py and complete_demo.py run: each demo checks itself;
    one the stack cannot carry is reported unsupported with the capability table's reason."""
    ctx = live.context()
    outcome = demos.run(ctx, name, demos.deadline_for(name))
    why = stack.decide(demos.NEEDS[name], ctx.offers)
    assert (outcome.status, outcome.detail if why else "") == (
        ("unsupported", why) if why else ("passed", "")), outcome.detail


def test_add_returns_the_sum(live):
    assert tasks.add.delay(2, 3).get(timeout=10) == 5


def test_add_refuses_what_is_not_a_number_and_the_worker_goes_on(live):
    bad = tasks.add.delay("a", [])
    with pytest.raises(TypeError, match=r"add\(\) takes two numbers, got 'a' and \[\]"):
        bad.get(timeout=10)
    assert bad.state == "FAILURE"
    assert tasks.add.delay(1, 1).get(timeout=10) == 2


def test_progress_is_reported_step_by_step(live):
    steps = []
    ctx = live.context(on_progress=lambda current, total: steps.append((current, total)))
    outcome = demos.run(ctx, "progress", 15)
    assert outcome.ok, outcome.detail
    assert all(total == 5 for _, total in steps), steps
    currents = [current for current, _ in steps]
    # 5 steps of 0.3 s polled every 0.05 s: most are seen; "step by step" = several, in order
    assert len(currents) >= 3 and currents == sorted(set(currents)), currents
    assert currents[-1] >= 4, currents


def test_routing_puts_each_message_in_its_queue_on_the_broker(live):
    """With consumers paused, the broker itself shows where each message landed."""
    app = live.app
    queues = [q.name for q in app.conf.task_queues]
    # beat keeps sending check_system to "celery", so that queue holds one message or more
    expected = lambda counts: counts["celery"] >= 1 and all(  # noqa: E731
        counts[q] == 1 for q in ("fast_queue", "slow_queue", "network_queue"))
    with demos.FlakyServer(failures=0) as server:
        with paused(app, queues):
            sent = {"fast_queue": tasks.fast_task.delay("x"),
                    "slow_queue": tasks.slow_task.delay(1, 0.01),
                    "network_queue": tasks.fetch_url.delay(server.url),
                    "celery": tasks.add.delay(1, 2)}
            with app.connection_for_write() as conn:
                channel = conn.default_channel
                counts = lambda: {q: channel.queue_declare(q, passive=True).message_count  # noqa: E731
                                  for q in queues}
                stack.eventually(lambda: expected(counts()), "each message in its queue", 5,
                                 interval=0.1)
        # consumers are back: every message runs, on the worker of its queue
        results = {queue: result.get(timeout=10) for queue, result in sent.items()}
    assert results["celery"] == 3 and results["fast_queue"] == "fast: x"
    assert results["network_queue"]["status"] == 200 and results["slow_queue"]["steps"] == 1
    assert {queue: sent[queue].queue for queue in sent} == {q: q for q in sent}


def test_rate_limit_spaces_tasks_out(live):
    results = [tasks.limited_task.delay(i) for i in range(6)]
    ran_at = sorted(r.get(timeout=15)["ran_at"] for r in results)
    gaps = [b - a for a, b in zip(ran_at, ran_at[1:])]
    assert ran_at[-1] - ran_at[0] >= 0.8, gaps  # 5/s: about 0.2 s between tasks
    assert tasks.app.conf.task_annotations["tasks.limited_task"]["rate_limit"] == "5/s"


def test_retry_counts_attempts_then_succeeds(live):
    with demos.FlakyServer(failures=2) as server:
        answer = tasks.fetch_url.delay(server.url).get(timeout=15)
    assert answer["attempts"] == 3 and answer["status"] == 200
    assert server.requests == 3


def test_retry_gives_up_after_max_retries(live):
    with demos.FlakyServer(failures=100) as server:
        result = tasks.fetch_url.delay(server.url)
        with pytest.raises(tasks.ServerBusy):
            result.get(timeout=20)  # backoff 1 + 2 + 4 s
    assert server.requests == 1 + tasks.fetch_url.max_retries


def test_malformed_url_fails_at_once_without_retry(live):
    started = time.monotonic()
    result = tasks.fetch_url.delay("not a url")
    with pytest.raises(ValueError, match="fetch_url needs an http:// or https:// URL, got 'not a url'"):
        result.get(timeout=10)
    assert result.state == "FAILURE" and result.retries == 0
    assert time.monotonic() - started < 5  # "at once": a first retry alone would wait 1 s + hops


def test_chord_combines_its_header_results(live):
    header = [tasks.process_data.s(i) for i in range(10)]
    summary = chord(header)(tasks.combine_results.s()).get(timeout=15)
    assert summary == {"count": 10, "total": 90}


def test_link_and_link_error_run_their_callbacks(live):
    on_success, on_error = tasks.success_callback.s(), tasks.failure_callback.s()
    ok_result, err_result = on_success.freeze(), on_error.freeze()
    tasks.important_task.apply_async(("succeed",), link=on_success)
    failing = tasks.important_task.apply_async(("fail",), link_error=on_error)
    assert ok_result.get(timeout=10) == "callback got {'outcome': 'succeed', 'attempts': 1}"
    assert err_result.get(timeout=10) == (
        f"task {failing.id} failed with RuntimeError('important_task was asked to fail')")


def test_callback_task_hooks_run_in_the_worker(live):
    ok = tasks.important_task.delay("succeed")
    bad = tasks.important_task.delay("fail")
    retried = tasks.important_task.delay("retry")
    ok.get(timeout=10)
    bad.get(timeout=10, propagate=False)
    assert retried.get(timeout=10) == {"outcome": "retry", "attempts": 2}
    # In-process workers: the hooks run in this process. Celery stores a result before it
    # calls on_success/on_failure, so get() can return before the hook ran: wait for them.
    expected = {("on_success", ok.id), ("on_failure", bad.id), ("on_retry", retried.id),
                ("on_success", retried.id)}
    stack.eventually(lambda: expected <= set(tasks.HOOK_CALLS),
                     f"the hooks {expected - set(tasks.HOOK_CALLS)} to run", 10, interval=0.05)


def test_beat_schedule_names_real_tasks(live):
    """That beat fires is the `periodic` demo above; here, that the schedule is sound."""
    schedule = tasks.app.conf.beat_schedule
    assert {entry["task"] for entry in schedule.values()} == {"tasks.check_system",
                                                              "tasks.generate_report"}
    assert all(entry["task"] in tasks.app.tasks for entry in schedule.values())


def test_a_queue_without_worker_is_named_not_left_pending(live):
    with demos.FlakyServer(failures=0) as server:
        with paused(live.app, ["network_queue"]):
            ctx = live.context()
            ctx.deadline = time.monotonic() + 3
            pending = tasks.fetch_url.delay(server.url)
            with pytest.raises(demos.DemoFailed, match="no worker consumes queue 'network_queue'"
                                                       ".*celery -A tasks worker -Q network_queue"):
                demos.wait(ctx, pending, "network_queue")
        # once a worker consumes the queue again, the waiting message runs
        assert pending.get(timeout=20)["status"] == 200
