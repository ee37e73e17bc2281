"""Bad input the demo refuses with a clear error, while its worker keeps serving; and security.

    pytest tests/test_bad_input.py -s    # -s prints the numbers each test measured

One real `celery -A tasks worker` process serves the whole module, on a throw-away stack: on
RabbitMQ a vhost that it reaches as a throw-away user with a password (so the tests can check
that the password never shows), else the embedded stack. After each refusal, a following `add`
proves the worker still serves.
"""
import time
import uuid
from urllib.parse import urlparse

from contextlib import ExitStack

import pytest
from kombu import Exchange, Queue

import stack
from helpers import (HOST, client_app, python, start_worker, throwaway_stack, wait_for_log,
                      worker_until_exit, worker_without)

UNRESOLVABLE = "amqp://guest:guest@nonexistent.invalid:5672//"  # .invalid never resolves


# --- Helpers ---------------------------------------------------------------------------------
class Served:
    def __init__(self, env, app, log, password):
        self.env, self.app, self.log, self.password = env, app, log, password

    def still_serves(self):
        assert self.app.send_task("tasks.add", (20, 22)).get(timeout=20) == 42

    def log_text(self):
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """One worker for celery, fast_queue and network_queue; on RabbitMQ as its own user."""
    with throwaway_stack(tmp_path_factory.mktemp("stack")) as base, ExitStack() as cleanup:
        env, password = base, None
        if base.is_rabbit:
            user, password = cleanup.enter_context(stack.throwaway_user(base.admin, base.vhost))
            parsed = urlparse(base["CELERY_BROKER_URL"])
            netloc = f"{user}:{password}@{parsed.hostname}:{parsed.port or 5672}"
            env = type(base)({**base, "CELERY_BROKER_URL": parsed._replace(netloc=netloc).geturl()})
            env.kind, env.admin, env.vhost = base.kind, base.admin, base.vhost
        procs = stack.Processes(tmp_path_factory.mktemp("bad-input"), env)
        app = client_app(env)
        failed_before = request.session.testsfailed
        try:
            start_worker(procs, "serve", "celery,fast_queue,network_queue", "-c", "2")
            stack.wait_for_workers(app, [f"serve@{HOST}"], 30, procs)
            yield Served(env, app, procs.run_dir / "serve.log", password)
        finally:
            procs.stop_all()
            app.close()
            if request.session.testsfailed > failed_before:
                print(f"--- serve.log ---\n{stack.tail(procs.run_dir / 'serve.log', 40)}")


@pytest.fixture(scope="module", autouse=True)
def worker_with_unresolvable_broker(tmp_path_factory):
    """Started when the module starts: its first retries (6 s) overlap the other tests."""
    with worker_without(tmp_path_factory.mktemp("unresolvable"), "unresolvable",
                        UNRESOLVABLE) as worker:
        yield worker


# --- Wrong arguments ----------------------------------------------------------------------------
def test_add_refuses_what_is_not_a_number(served):
    result = served.app.send_task("tasks.add", ("a", []))
    with pytest.raises(TypeError, match=r"add\(\) takes two numbers, got 'a' and \[\]"):
        result.get(timeout=20)
    served.still_serves()


def test_a_wrong_argument_count_is_refused_before_sending_or_by_the_worker(served):
    # tasks.add.delay() checks the call against add's signature before anything is sent
    proc = python("-c", "import tasks; tasks.add.delay(1)", env=served.env)
    seconds = proc.seconds
    assert proc.returncode != 0
    assert "TypeError: add() missing 1 required positional argument: 'y'" in proc.stderr
    # send_task() knows only the name, so the worker finds out, fails the task and goes on
    result = served.app.send_task("tasks.add", (1,))
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'y'"):
        result.get(timeout=20)
    served.still_serves()
    print(f"\nadd(1): client-side TypeError in {seconds:.1f}s (no message sent); "
          f"via send_task: FAILURE TypeError from the worker")


def test_an_unknown_task_name_is_logged_and_discarded(served):
    result = served.app.send_task("tasks.no_such_task", (1,))
    assert wait_for_log(served.log, "Received unregistered task of type 'tasks.no_such_task'", 15)
    assert "The message has been ignored and discarded." in served.log_text()
    served.still_serves()
    # Celery 5.7 also records the failure, so a caller is not left PENDING
    assert result.state == "FAILURE" and type(result.result).__name__ == "NotRegistered"


# --- Bad URLs for fetch_url -------------------------------------------------------------------
def test_a_malformed_url_fails_at_once_without_retries(served):
    started = time.monotonic()
    result = served.app.send_task("tasks.fetch_url", ("not a url",))
    result.get(timeout=20, propagate=False)
    seconds = time.monotonic() - started
    assert result.state == "FAILURE" and "not a url" in str(result.result)
    assert result.retries == 0
    assert seconds < 5, f"{seconds:.1f}s"  # "at once": the first retry alone waits 1 s
    served.still_serves()
    print(f"\nfetch_url('not a url'): FAILURE {type(result.result).__name__} after "
          f"{result.retries} retries in {seconds:.2f}s")


def test_an_unreachable_url_is_retried_three_times_then_fails(served):
    started = time.monotonic()
    result = served.app.send_task("tasks.fetch_url", ("http://127.0.0.1:1/",))
    result.get(timeout=40, propagate=False)  # backoff 1 + 2 + 4 s
    seconds = time.monotonic() - started
    assert result.state == "FAILURE" and type(result.result).__name__ == "ConnectionError"
    assert result.retries == 3
    served.still_serves()
    print(f"\nfetch_url('http://127.0.0.1:1/'): FAILURE ConnectionError after "
          f"{result.retries} retries in {seconds:.1f}s")


# --- Payload size -----------------------------------------------------------------------------
def test_a_few_megabytes_pass(served):
    started = time.monotonic()
    answer = served.app.send_task("tasks.fast_task", ("x" * (5 << 20),)).get(timeout=60)
    five_mb_s = time.monotonic() - started
    assert len(answer) == len("fast: ") + (5 << 20)
    served.still_serves()
    print(f"\npayload: 5 MiB round trip in {five_mb_s:.1f}s")


def test_more_than_the_broker_allows_is_refused(served):
    # RabbitMQ refuses messages over max_message_size (128 MiB by default). Publisher
    # confirms (celeryconfig) turn that into an error; without them it is dropped silently.
    served.env.only_rabbit("max_message_size and publisher confirms are RabbitMQ's")
    proc = python("-c", "import tasks; tasks.fast_task.delay('x' * (129 << 20))",
                  env=served.env, timeout=120)
    assert proc.returncode != 0
    assert "PRECONDITION_FAILED - message size" in proc.stderr
    assert "is larger than configured max size 134217728" in proc.stderr
    served.still_serves()
    print(f"\npayload: 129 MiB refused by the broker (PRECONDITION_FAILED) in {proc.seconds:.1f}s")


# --- Messages the worker must not trust -------------------------------------------------------
def test_a_pickle_message_is_refused_and_the_worker_goes_on(served):
    with served.app.connection_for_write() as conn:
        conn.Producer(serializer="pickle").publish(
            ((2, 2), {}, {}), exchange=Exchange("celery", "direct"), routing_key="celery",
            headers={"task": "tasks.add", "id": "pickled-task", "argsrepr": "(2, 2)"})
    assert wait_for_log(served.log, "ContentDisallowed: Refusing to deserialize untrusted "
                                    "content of type pickle", 15)
    served.still_serves()


OLDER_CELERY = ("PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'celery' in "
                "vhost '{vhost}': received none but current is the value '10' of type 'signedint'")
PLAIN_PRIORITY = ("PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue "
                  "'priority_queue' in vhost '{vhost}': received the value '10' of type "
                  "'signedint' but current is none")


@pytest.mark.parametrize("queue, arguments, refusal", [
    ("celery", {"x-max-priority": 10}, OLDER_CELERY),  # as an older version of the demo left it
    ("priority_queue", None, PLAIN_PRIORITY),            # as a client with default settings would
], ids=["celery-with-priorities", "priority_queue-without"])
def test_a_queue_declared_with_other_arguments_stops_the_worker_until_deleted(
        stack_env, tmp_path, queue, arguments, refusal):
    stack_env.only_rabbit("x-max-priority and PRECONDITION_FAILED are RabbitMQ's")
    app = client_app(stack_env)
    with app.connection_for_write() as conn:
        Queue(queue, Exchange(queue, "direct"), routing_key=queue,
              queue_arguments=arguments)(conn.default_channel).declare()
    procs = stack.Processes(tmp_path, stack_env)
    try:
        started = time.monotonic()
        code = start_worker(procs, "old", queue).wait(timeout=60)
        failed_in = time.monotonic() - started
        log = (tmp_path / "old.log").read_text(errors="replace")
        assert code != 0
        assert refusal.format(vhost=stack_env.vhost) in log
        # what run_demo.py prints: the queue, and the command that deletes it in this vhost
        hint = stack.queue_conflict(log)
        assert f"`rabbitmqctl delete_queue -p {stack_env.vhost} {queue}`" in hint
        assert "drops the messages" in hint

        # The fix: delete the old queue (its messages go with it), then start again
        stack_env.admin.delete_queue(stack_env.vhost, queue)
        started = time.monotonic()
        start_worker(procs, "new", queue)
        stack.wait_for_workers(app, [f"new@{HOST}"], 30)  # ("old" has exited: not procs)
        recovered_in = time.monotonic() - started
        if queue == "priority_queue":  # routed there by celeryconfig.task_routes
            assert app.send_task("tasks.priority_task", ("after",)).get(timeout=20)["label"] \
                == "after"
        else:
            assert app.send_task("tasks.add", (1, 2)).get(timeout=20) == 3
    finally:
        procs.stop_all()
        app.close()
    print(f"\ninequivalent {queue}: worker exit code {code} after {failed_in:.1f}s; after "
          f"delete_queue a worker was ready in {recovered_in:.1f}s")


# --- Bad CELERY_BROKER_URL --------------------------------------------------------------------
def test_an_unknown_broker_scheme_fails_in_seconds(stack_env, tmp_path):
    env = {**stack_env, "CELERY_BROKER_URL": "notascheme://x"}
    proc = python("-c", "import tasks; tasks.add.delay(1, 2)", env=env)
    assert proc.returncode != 0
    assert "KeyError: 'No such transport: notascheme'" in proc.stderr
    code, worker_s, log = worker_until_exit(tmp_path, env, "scheme")
    assert code != 0
    assert "No such transport: notascheme" in log
    assert proc.seconds < 20 and worker_s < 30, (proc.seconds, worker_s)
    print(f"\nnotascheme://x: client KeyError in {proc.seconds:.1f}s; "
          f"worker exit code {code} in {worker_s:.1f}s")


def test_an_unresolvable_broker_host_fails_in_seconds(stack_env,
                                                      worker_with_unresolvable_broker):
    proc = python("-c", "import tasks; tasks.add.delay(1, 2)",
                  env={**stack_env, "CELERY_BROKER_URL": UNRESOLVABLE})
    assert proc.returncode != 0
    assert "kombu.exceptions.OperationalError" in proc.stderr  # the resolver's words vary
    assert proc.seconds < 30, f"{proc.seconds:.1f}s"

    worker, log, _ = worker_with_unresolvable_broker
    assert wait_for_log(log, "Cannot connect to amqp://guest:**@nonexistent.invalid:5672//", 15)
    # A worker waits for its broker for ever (celeryconfig: broker_connection_max_retries = None),
    # a name that does not resolve included: DNS may come back too. One log line per attempt.
    assert wait_for_log(log, "Trying again in 4.00 seconds... (2/None)", 30)
    assert worker.poll() is None and "Unrecoverable error" not in log.read_text()
    print(f"\nnonexistent.invalid: client OperationalError in {proc.seconds:.1f}s; "
          f"the worker keeps retrying, one log line per attempt")


# --- Security ---------------------------------------------------------------------------------
def test_the_worker_never_logs_the_broker_password(served):
    """The banner and every log line show the URL as amqp://user:**@host (python -m
    celeryconfig masks it too: see test_config.py)."""
    served.env.only_rabbit("the embedded broker has no password")
    served.still_serves()
    log = served.log_text()
    user = urlparse(served.env["CELERY_BROKER_URL"]).username
    assert f".> transport:   amqp://{user}:**@" in log
    assert f"Connected to amqp://{user}:**@" in log
    assert served.password not in log


def test_a_worker_on_sqs_never_logs_the_secret_key(tmp_path):
    """The password test's twin on a broker that any machine can run: a local SQS server
    (moto, pip-installed), whose URL carries the AWS secret key where a password goes."""
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    server = stack.Processes(tmp_path / "sqs-server")
    try:
        broker = stack.start_local_sqs(server).replace("demo:demo@", f"demo:{secret}@")
        (tmp_path / "results").mkdir()
        env = {"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": f"file://{tmp_path}/results",
               "CELERY_BROKER_PREFIX": f"bad-input-{uuid.uuid4().hex[:6]}-"}
        procs = stack.Processes(tmp_path / "run", env)
        try:
            start_worker(procs, "sqs", "celery")
            log = procs.run_dir / "sqs.log"
            assert wait_for_log(log, " ready.", 60), stack.tail(log, 40)  # SQS: no ping
            app = client_app(env)
            try:  # it really used the key: a task went through
                assert app.send_task("tasks.add", (2, 3)).get(timeout=30) == 5
            finally:
                app.close()
        finally:
            procs.stop_all()
    finally:
        server.stop_all(grace=5)
    text = log.read_text(errors="replace")
    assert ".> transport:   sqs://demo:**@127.0.0.1:" in text, text
    assert secret not in text
