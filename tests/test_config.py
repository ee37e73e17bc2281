"""The configuration a user reads and overrides, the two files a user takes home, and the
no-service demo."""
import ast
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from helpers import HOST, ROOT, client_app, python, run, start_worker, wait_for_log

import stack


def test_python_m_celeryconfig_prints_the_config_with_the_password_masked():
    out = python("-m", "celeryconfig", env={
        "CELERY_BROKER_URL": "amqp://alice:s3cret@broker:5672/prod",
        "CELERY_RESULT_BACKEND": "redis://:hunter2@cache:6379/1"})
    assert out.returncode == 0, out.stderr
    assert "s3cret" not in out.stdout and "hunter2" not in out.stdout
    assert "broker_url = 'amqp://alice:**@broker:5672/prod'" in out.stdout
    assert "accept_content = ['json']" in out.stdout
    assert "task_routes" in out.stdout and "beat_schedule" in out.stdout


def test_python_m_celeryconfig_names_the_effective_pair_and_what_it_cannot_do():
    out = python("-m", "celeryconfig", env={"CELERY_BROKER_URL": "sqs://key:s3cret@127.0.0.1:4566",
                                            "CELERY_RESULT_BACKEND": "rpc://"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("# broker: sqs (sqs://key:**@127.0.0.1:4566/); "
                        "result backend: rpc (rpc:///)")
    assert "#   cannot: chords: rpc:// cannot run chords: it sends results only to the caller" \
        in out.stdout
    assert "#   cannot: remote_control: Amazon SQS has no fanout exchange" in out.stdout
    assert "'visibility_timeout': 3600" in out.stdout and "s3cret" not in out.stdout
    plain = python("-m", "celeryconfig", env={"CELERY_BROKER_URL": "redis://localhost:6379/0",
                                              "CELERY_RESULT_BACKEND": "redis://localhost:6379/0"})
    assert "cannot" not in plain.stdout  # Redis + Redis runs every demo
    assert "'priority_steps': [0, 3, 6, 9]" in plain.stdout
    sentinels = python("-m", "celeryconfig", env={  # Redis underneath: it lacks nothing
        "CELERY_RESULT_BACKEND": "sentinel://:s3cret@h1:26379/0;sentinel://:s3cret@h2:26379/0"})
    assert sentinels.stdout.splitlines()[0].endswith(
        "result backend: sentinel (sentinel://:**@h1:26379/0;sentinel://:**@h2:26379/0)")
    assert "cannot" not in sentinels.stdout and "s3cret" not in sentinels.stdout


def test_defaults_point_at_local_rabbitmq_and_redis():
    out = python("-c", "import celeryconfig as c; print(c.broker_url, c.result_backend)",
                 timeout=30)
    assert out.stdout.split() == [stack.DEFAULT_BROKER, stack.DEFAULT_BACKEND]


def test_queues_are_celerys_defaults_but_priority_queue_has_a_priority_range():
    """A client with Celery's default settings declares a queue it sends to as Celery creates
    a missing one (a direct exchange of the queue's name, no arguments): ours are the same, so
    RabbitMQ lets both declare them. Only priority_queue has arguments."""
    import celeryconfig
    from celery import Celery
    assert [q.name for q in celeryconfig.task_queues] == list(celeryconfig.QUEUE_NAMES)
    defaults = Celery(set_as_current=False).amqp.queues  # creates a queue it is asked for
    for queue in celeryconfig.task_queues:
        if queue.name == "priority_queue":
            assert queue.queue_arguments == {"x-max-priority": celeryconfig.MAX_PRIORITY}
            continue
        default = defaults[queue.name]
        assert not queue.queue_arguments and default.queue_arguments is None, queue
        assert (queue.exchange.name, queue.exchange.type, queue.routing_key) == (
            default.exchange.name, default.exchange.type, default.routing_key)
    assert celeryconfig.task_routes["tasks.priority_task"] == {"queue": "priority_queue"}
    routed = {route["queue"] for route in celeryconfig.task_routes.values()}
    assert routed <= set(celeryconfig.QUEUE_NAMES)


def test_an_unreachable_broker_is_reported_in_seconds_with_the_url_masked():
    started = time.monotonic()
    with pytest.raises(stack.ServiceUnavailable) as error:
        stack.check_broker("amqp://guest:s3cret@127.0.0.1:1//", timeout=2)
    message = str(error.value)
    assert "cannot reach the broker at amqp://guest:**@127.0.0.1:1//" in message
    assert "s3cret" not in message and "docker compose up -d rabbitmq redis" in message
    assert time.monotonic() - started < 10  # "in seconds": check_broker's own timeout is 2 s


def test_complete_demo_runs_every_section_without_any_service():
    """It must ignore CELERY_BROKER_URL: point it at a broker that does not exist."""
    out = python("complete_demo.py", env={"CELERY_BROKER_URL": "amqp://nobody:x@127.0.0.1:1//",
                                          "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/0"},
                 timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import demos
    offers = stack.offers_for("memory://", "cache+memory://", pool="threads")
    unsupported = [name for name in demos.DEMOS if demos.unsupported(name, offers)]
    assert unsupported == ["priority"]  # FIFO: said, not hidden
    assert (f"{len(demos.DEMOS) - 1} passed, 0 failed, 1 unsupported" in out.stdout)
    assert "UNSUPPORTED (0.0s) kombu's memory transport delivers in FIFO order" in out.stdout
    # one line per demo: the callbacks lesson's intended failure is no ERROR with a traceback
    assert "Traceback" not in out.output and "ERROR" not in out.output, out.output
    for name in demos.DEMOS:
        assert f" {name}" in out.stdout


# --- What a learner takes home: tasks.py and celeryconfig.py, alone --------------------------
def module_level(node):
    """The statements of ``node`` that run on import: function bodies left out."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
            yield from module_level(child)


@pytest.mark.parametrize("name", ["tasks.py", "celeryconfig.py"])
def test_the_two_files_import_nothing_of_this_repository(name):
    """(celeryconfig's `python -m celeryconfig` reads stack/capabilities.py where it is there.)"""
    nodes = list(module_level(ast.parse((ROOT / name).read_text())))
    imported = {alias.name.split(".")[0] for node in nodes
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in nodes
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and not imported & {"stack", "bench", "demos", "tasks", "celeryconfig",
                                        "conftest"} - {name[:-3]}


def test_tasks_py_shows_the_app_and_its_first_task_in_its_first_30_lines():
    lines = (ROOT / "tasks.py").read_text().splitlines()[:30]
    assert any(line.startswith("app = Celery(") for line in lines)
    first = next(n for n, line in enumerate(lines) if line.startswith("@app.task"))
    assert lines[first + 1].startswith("def add(")


CLIENT = "from tasks import add; print(add.delay(2, 3).get(timeout=10))"


@pytest.mark.parametrize("broker", ["rabbitmq", "embedded"])
def test_the_two_files_alone_in_an_empty_folder_run_a_worker_and_a_client(broker, tmp_path,
                                                                          request):
    """The take-home test: a copy of tasks.py and celeryconfig.py, nothing else, with the
    README's commands: on RabbitMQ + Redis (a throw-away vhost and Redis key prefix), and with
    the two exports of README step 2 d) (filesystem:// + file://, in the copy's folder), where
    the copy also goes without the embedded stack's fixes from stack/."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("tasks.py", "celeryconfig.py"):
        shutil.copy(ROOT / name, home / name)
    services = (request.getfixturevalue("rabbit_env") if broker == "rabbitmq" else
                {"CELERY_BROKER_URL": "filesystem://",
                 "CELERY_RESULT_BACKEND": f"file://{home}/celery-results"})
    env = {**services, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    alone = run([sys.executable, "-c", "import importlib.util, celeryconfig; "
                 "print(importlib.util.find_spec('stack'), celeryconfig.EXTRAS)"],
                env=env, cwd=home)
    assert alone.stdout.split() == ["None", "False"], alone.output
    procs = stack.Processes(tmp_path / "logs", env, cwd=home)
    try:
        procs.start("worker", ["celery", "-A", "tasks", "worker", "-l", "INFO"])
        log = procs.run_dir / "worker.log"
        assert wait_for_log(log, " ready.", 60), stack.tail(log, 40)
        done = run([sys.executable, "-c", CLIENT], env=env, cwd=home, timeout=30)
        assert done.returncode == 0 and done.stdout == "5\n", done.output
        assert "Task tasks.add[" in log.read_text() and "Traceback" not in log.read_text()
    finally:
        procs.stop_all()


@pytest.mark.parametrize("first", ["import tasks", "import celeryconfig; import tasks"])
def test_file_results_get_the_atomic_backend_whatever_reads_the_config_first(first, tmp_path):
    """override_backends (celeryconfig) names stack.embedded.AtomicFileBackend for file://;
    no module rewrites Celery's aliases for everyone (celery/celery#7270: stack/celery_gaps.py)."""
    done = python("-c", f"{first}; print(type(tasks.app.backend).__name__)",
                  env={"CELERY_BROKER_URL": "memory://",
                       "CELERY_RESULT_BACKEND": f"file://{tmp_path}/results"})
    assert done.stdout.strip() == "AtomicFileBackend", done.output
    assert (tmp_path / "results").is_dir()  # created: it was not there


# --- An unusable folder of the embedded stack: one line naming it, never a traceback ----------
UNUSABLE = {"CELERY_FS_ROOT": ("filesystem://", "{blocker}", "{blocker}/messages"),
            "file results": ("memory://", "file://{blocker}/results", "{blocker}/results")}


@pytest.mark.parametrize("command", [["-m", "celeryconfig"],
                                     ["-m", "celery", "-A", "tasks", "worker", "-l", "INFO"],
                                     ["-m", "celery", "-A", "tasks", "beat", "-l", "INFO"]],
                         ids=["python -m celeryconfig", "worker", "beat"])
@pytest.mark.parametrize("case", UNUSABLE)
def test_an_unusable_folder_is_one_line_naming_it(case, command, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    broker, setting, named = (part.format(blocker=blocker) for part in UNUSABLE[case])
    env = {"CELERY_BROKER_URL": broker}
    if case == "CELERY_FS_ROOT":
        env["CELERY_FS_ROOT"] = setting
    else:
        env["CELERY_RESULT_BACKEND"] = setting
    done = python(*command, env=env, timeout=60)
    assert done.returncode == 1, done.output
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and f"cannot use the folder {named}" in lines[0], done.output
    assert "a file is in the way" in lines[0]


def test_the_rabbitmq_alarm_callback_reaches_clients_and_workers(rabbit_env, tmp_path):
    """celeryconfig cannot name a callable: clients (ClientGuard) and workers (worker_init,
    stack/worker_signals.py) add it with stack.raise_on_alarms."""
    app = client_app(rabbit_env)
    stack.raise_on_alarms(app)
    with app.connection_for_write() as conn:
        conn.connect()
        assert conn.connection.on_blocked is stack.on_connection_blocked
    procs = stack.Processes(tmp_path, rabbit_env)
    try:
        start_worker(procs, "alarmcb", "celery")
        stack.wait_for_workers(app, [f"alarmcb@{HOST}"], 60, procs)
        stats = app.control.inspect(timeout=2).stats() or {}
        options = stats[f"alarmcb@{HOST}"]["broker"]["transport_options"]
        assert options["on_blocked"] == "stack.deadlines.on_connection_blocked"
    finally:
        procs.stop_all()
