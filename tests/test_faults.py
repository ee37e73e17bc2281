"""Faults the demo stack survives: killed workers, dropped connections, missing services.

    pytest tests/test_faults.py -s       # -s prints the numbers each test measured

Every test runs real `celery -A tasks worker` processes on a throw-away stack (the `stack_env`
fixture: a RabbitMQ vhost and Redis key prefix, or the embedded stack), with a client in this
process configured for the same stack. Logs go to the test's tmp_path; the tail of each is
printed when a test fails. Killing a whole worker and dropping broker connections need RabbitMQ.
"""
import os
import signal
import time

import pytest

import demos
import stack
from helpers import (HOST, client_app, print_logs_if_failed, python, start_worker,
                      wait_for_log, worker_until_exit, worker_without)

NO_BROKER = "amqp://guest:s3cret@127.0.0.1:1//"  # nothing listens on port 1: refused at once


# --- Helpers ---------------------------------------------------------------------------------
def active_on(app, node, timeout=20):
    """The tasks a worker's pool children are running, once they run at least one."""
    def running():
        replies = app.control.inspect(timeout=0.5, destination=[node]).active() or {}
        return [task for task in replies.get(node, []) if task.get("worker_pid")]
    return stack.eventually(running, f"{node} running a task", timeout, interval=0)


class Cluster:
    def __init__(self, env, procs, app):
        self.env, self.procs, self.app = env, procs, app

    def queue_counts(self, name):
        """(ready, unacknowledged) messages of a queue, as the broker counts them."""
        if self.env.is_rabbit:
            return self.env.admin.queue_counts(self.env.vhost, name)
        # filesystem://: a message file is removed when a worker takes it, acked or not
        with self.app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(name, passive=True).message_count, 0

    def queue_is_empty(self, name, timeout=10):
        """True once the queue holds no message, ready or unacknowledged (a late ack reaches
        the broker just after the result reaches Redis, hence the wait)."""
        try:
            return stack.eventually(lambda: self.queue_counts(name) == (0, 0),
                                    f"queue {name} empty", timeout, interval=0.2)
        except TimeoutError:
            print(f"{name}: (ready, unacked) = {self.queue_counts(name)}")
            return False

    def add_works(self, node_hint=""):
        assert self.app.send_task("tasks.add", (20, 22)).get(timeout=20) == 42, node_hint


@pytest.fixture
def cluster(stack_env, tmp_path, request):
    procs = stack.Processes(tmp_path, stack_env)
    app = client_app(stack_env)
    failed_before = request.session.testsfailed
    try:
        yield Cluster(stack_env, procs, app)
    finally:
        procs.stop_all()
        app.close()
        print_logs_if_failed(request, failed_before, procs)


@pytest.fixture(scope="module", autouse=True)
def worker_without_broker(tmp_path_factory):
    """Started when the module starts: its first retries (12 s) overlap the other tests."""
    with worker_without(tmp_path_factory.mktemp("no-broker"), "nobroker", NO_BROKER) as worker:
        yield worker


# --- A worker killed mid-task -------------------------------------------------------------------
def test_a_late_ack_task_survives_its_worker_being_killed(cluster):
    """slow_task has acks_late=True: RabbitMQ hands a dead worker's messages to another worker.

    And reject_on_worker_lost=True: when only the pool child running it dies, the worker puts
    the message back itself (without it, the task would be marked FAILED with WorkerLostError).
    """
    cluster.env.only_rabbit("the filesystem transport deletes a message when a worker takes "
                            "it, so a killed worker's unacknowledged messages are gone")
    app, sent = cluster.app, 6
    victim = start_worker(cluster.procs, "slowA", "slow_queue", "-c", "2")
    start_worker(cluster.procs, "slowB", "slow_queue", "-c", "2")
    stack.wait_for_workers(app, [f"slowA@{HOST}", f"slowB@{HOST}"], 30)

    results = [app.send_task("tasks.slow_task", (4, 0.5)) for _ in range(sent)]
    on_victim = {task["id"] for task in active_on(app, f"slowA@{HOST}")}
    os.killpg(victim.pid, signal.SIGKILL)  # the whole worker: main process and pool children
    killed_at = time.monotonic()

    # Now kill only the pool child running one of slowB's tasks: the worker survives it
    child = active_on(app, f"slowB@{HOST}")[0]
    os.kill(child["worker_pid"], signal.SIGKILL)

    values = [r.get(timeout=60) for r in results]
    recovered_in = time.monotonic() - killed_at
    assert all(v["steps"] == 4 for v in values)
    assert {r.id for r in results if r.worker == f"slowB@{HOST}"} >= on_victim | {child["id"]}
    assert cluster.queue_is_empty("slow_queue")
    print(f"\nlate ack: sent={sent} completed={len(values)} killed_worker_had={len(on_victim)} "
          f"killed_child_had=1 all_done_in={recovered_in:.1f}s after the SIGKILL")


def test_an_early_ack_task_is_lost_with_its_worker(cluster):
    """The default (acks_late=False) acknowledges a message when the task starts: a dead
    pool child is at least reported (WorkerLostError), a dead worker loses the task silently."""
    app = cluster.app
    worker = start_worker(cluster.procs, "early", "celery", "-c", "1")
    stack.wait_for_workers(app, [f"early@{HOST}"], 30)

    # 1. The pool child dies: the worker survives and marks the task FAILURE
    # priority_task is a plain task that holds its slot; sent to `celery`, the worker's queue
    reported = app.send_task("tasks.priority_task", ("reported", 60), queue="celery")
    os.kill(active_on(app, f"early@{HOST}")[0]["worker_pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    reported.get(timeout=30, propagate=False)
    reported_in = time.monotonic() - killed_at
    assert reported.state == "FAILURE"
    assert "Worker exited prematurely: signal 9 (SIGKILL)" in str(reported.result)
    cluster.add_works("the worker goes on after losing a pool child")

    # 2. The whole worker dies: nobody will ever run or report the task
    lost = app.send_task("tasks.priority_task", ("lost", 60), queue="celery")
    active_on(app, f"early@{HOST}")
    # The ack leaves when the child accepts the task, but not with the inspect reply: the
    # broker must have it before the kill, which drops what the worker's sockets had not sent
    assert cluster.queue_is_empty("celery"), "the message is acked when the task starts"
    os.killpg(worker.pid, signal.SIGKILL)
    start_worker(cluster.procs, "early2", "celery", "-c", "1")
    stack.wait_for_workers(app, [f"early2@{HOST}"], 30)
    cluster.add_works("a new worker serves the queue")  # with -c 1 it would wait behind `lost`
    assert lost.state == "STARTED" and lost.info["hostname"] == f"early@{HOST}"
    assert cluster.queue_is_empty("celery"), "the message was acked at the start: it is gone"
    active = app.control.inspect(timeout=2, destination=[f"early2@{HOST}"]).active() or {}
    assert active.get(f"early2@{HOST}") == [], f"early2 must answer, running nothing: {active}"
    print(f"\nearly ack: sent=2 completed=0 child_kill_reported_as=WorkerLostError "
          f"in {reported_in:.1f}s; worker_kill_left_state={lost.state} forever, queue empty")


# --- The broker connection drops ----------------------------------------------------------------
def test_workers_and_client_reconnect_after_the_broker_drops_their_connections(cluster):
    cluster.env.only_rabbit("closing clients' connections is a RabbitMQ admin call")
    app = cluster.app
    start_worker(cluster.procs, "drop", "celery,slow_queue", "-c", "2")
    stack.wait_for_workers(app, [f"drop@{HOST}"], 30)
    slow = [app.send_task("tasks.slow_task", (6, 0.5)) for _ in range(2)]
    before = [app.send_task("tasks.add", (i, i)) for i in range(10)]
    # The drop must hit a running task, or the test proves nothing about one
    stack.eventually(lambda: slow[0].state == "PROGRESS", "slow_task running", 20, interval=0.05)

    # Only this test's vhost: other vhosts on the broker belong to someone else
    admin = cluster.env.admin
    # the worker's (consumer, control, events) and the client's; the management API lists
    # them only after its next statistics sample, rabbitmqctl at once
    ours = stack.eventually(lambda: len(admin.connections(cluster.env.vhost)) >= 3 and
                            admin.connections(cluster.env.vhost),
                            "the worker's and the client's connections listed", 15)
    for name in ours:
        admin.close_connection(name, "test: broker connection dropped")
    dropped_at = time.monotonic()

    after = [app.send_task("tasks.add", (i, 1)) for i in range(10)]  # the client reconnects
    stack.wait_for_workers(app, [f"drop@{HOST}"], 30)  # a ping goes through the broker
    reconnected_in = time.monotonic() - dropped_at
    values = [r.get(timeout=30) for r in before + after] + [r.get(timeout=60) for r in slow]
    total_in = time.monotonic() - dropped_at
    assert values[10:20] == list(range(1, 11)) and all(s.state == "SUCCESS" for s in slow)
    log = (cluster.procs.run_dir / "drop.log").read_text(errors="replace")
    assert "Connection to broker lost" in log and "CONNECTION_FORCED" in log
    restarted = log.count("cannot be acknowledged after a connection loss")
    print(f"\nconnection drop: connections_closed={len(ours)} sent={len(values)} "
          f"completed={len(values)} worker_reconnected_in={reconnected_in:.1f}s "
          f"all_done_in={total_in:.1f}s late_ack_tasks_restarted={restarted}")


# --- A worker that stops consuming a queue ------------------------------------------------------
def test_a_queue_nobody_consumes_is_named_within_the_deadline(cluster):
    app = cluster.app
    start_worker(cluster.procs, "net", "network_queue", "-c", "1")
    stack.wait_for_workers(app, [f"net@{HOST}"], 30)
    app.control.cancel_consumer("network_queue", destination=[f"net@{HOST}"], reply=True)

    with demos.FlakyServer(failures=0) as server:
        result = app.send_task("tasks.fetch_url", (server.url,))
        ctx = demos.Context(app=app, deadline=time.monotonic() + 4)
        started = time.monotonic()
        with pytest.raises(demos.DemoFailed) as failed:
            demos.wait(ctx, result, "network_queue")
        reported_in = time.monotonic() - started
        assert reported_in < 4 + 5, f"named after {reported_in:.1f}s, the deadline was 4 s"
        said = str(failed.value)
        assert f"no worker consumes queue 'network_queue' (workers: net@{HOST})" in said
        assert "celery -A tasks worker -Q network_queue" in said
        assert result.state == "PENDING"

        # The message waited in the queue: consuming again delivers it
        app.control.add_consumer("network_queue", destination=[f"net@{HOST}"], reply=True)
        assert result.get(timeout=20)["status"] == 200
    print(f"\nno consumer: sent=1 reported_in={reported_in:.1f}s (deadline 4s), "
          f"completed=1 after add_consumer")


# --- No broker, no result backend ---------------------------------------------------------------
def test_a_worker_without_broker_keeps_retrying_and_logs_each_attempt(worker_without_broker):
    """The promise: a worker waits for its broker as long as it takes (a restart, an upgrade),
    saying so once per attempt with a capped backoff; it never gives up by itself. (It used to
    exit after 5 retries, ~30 s: a routine broker restart stopped every worker for good.)"""
    proc, log_path, _ = worker_without_broker
    assert wait_for_log(log_path, "Cannot connect to amqp://guest:**@127.0.0.1:1//", 15)
    # kombu's backoff: 2 s, 4 s, 6 s, ... capped at 30 s; the module's other tests ran meanwhile
    assert wait_for_log(log_path, "Trying again in 6.00 seconds... (3/None)", 30)
    assert proc.poll() is None, "the worker gave up on its broker"
    log = log_path.read_text(errors="replace")
    attempts = log.count("Cannot connect to amqp://guest:**@127.0.0.1:1//")
    assert "Unrecoverable error" not in log and "s3cret" not in log
    print(f"\nno broker: the worker is still retrying after {attempts} attempts, one log line each")


def test_a_worker_without_result_backend_exits_at_once(stack_env, tmp_path):
    env = {**stack_env, "CELERY_RESULT_BACKEND": "redis://:hunter2@127.0.0.1:1/0"}
    code, exited_in, log = worker_until_exit(tmp_path, env, "nobackend")
    assert code != 0
    assert exited_in < 20, f"exited after {exited_in:.1f}s"  # no broker-style retries
    assert "cannot reach the result backend at redis://:**@127.0.0.1:1/0" in log
    assert "hunter2" not in log
    print(f"\nno result backend: worker exit code {code} after {exited_in:.1f}s")


def test_a_client_without_broker_or_backend_fails_in_seconds(stack_env):
    no_broker = python("-c", "import tasks; tasks.add.delay(1, 2)",
                       env={**stack_env, "CELERY_BROKER_URL": NO_BROKER})
    assert no_broker.returncode != 0
    assert "kombu.exceptions.OperationalError: [Errno 111] Connection refused" in no_broker.stderr
    assert "s3cret" not in no_broker.output
    assert no_broker.seconds < 20, f"{no_broker.seconds:.1f}s"

    # The message reaches the broker (this test's stack); only the result cannot be read
    no_backend = python("-c", "import tasks; tasks.add.delay(1, 2).get(timeout=10)",
                        env={**stack_env, "CELERY_RESULT_BACKEND": "redis://:hunter2@127.0.0.1:1/0"})
    assert no_backend.returncode != 0
    assert "Retry limit exceeded while trying to reconnect to the Celery result store" \
        in no_backend.stderr
    assert "hunter2" not in no_backend.output
    assert no_backend.seconds < 30, f"{no_backend.seconds:.1f}s"
    print(f"\nclient: no broker -> OperationalError in {no_broker.seconds:.1f}s; "
          f"no result backend -> RuntimeError in {no_backend.seconds:.1f}s")
