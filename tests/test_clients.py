"""client_fixed.py and client.py as a user runs them: against a live stack, a stack with a
queue nobody consumes, and no broker at all.

    pytest tests/test_clients.py

One stack of real prefork workers (as run_demo.py starts them) serves the module.
"""
import json

import pytest

import demos
import stack
from helpers import HOST, client_app, python


@pytest.fixture(scope="module")
def workers(module_env, tmp_path_factory):
    """A worker per queue (prefork, as run_demo.py starts them) on the module's stack."""
    processes = stack.Processes(tmp_path_factory.mktemp("workers"), env=module_env)
    app = client_app(module_env)
    try:
        nodes = stack.start_stack(processes, beat=False)
        stack.wait_for_workers(app, nodes, 60, processes)
        yield module_env, app
    finally:
        processes.stop_all()
        app.close()
    assert processes.still_running() == []


@pytest.mark.parametrize("script", ["client_fixed.py", "client.py"])
@pytest.mark.parametrize("broken", ["broker", "backend"])
def test_without_a_broker_or_backend_a_clear_message_in_seconds(script, broken):
    if broken == "broker":
        env = dict(CELERY_BROKER_URL="amqp://guest:secret@127.0.0.1:1//")
        masked = "amqp://guest:**@127.0.0.1:1//"
    else:  # the broker needs no server; the Redis result backend is missing
        env = dict(CELERY_BROKER_URL="filesystem://", CELERY_FS_ROOT="/nonexistent",
                   CELERY_RESULT_BACKEND="redis://:secret@127.0.0.1:1/0")
        masked = "redis://:**@127.0.0.1:1/0"
    done = python(script, env=env, timeout=60)
    output = " ".join(done.output.split())  # rich wraps long lines
    assert done.returncode == 2, output
    assert done.seconds < 20, f"{done.seconds:.1f}s"  # "in seconds", with room for a busy CPU
    assert f"cannot reach the {'broker' if broken == 'broker' else 'result backend'} at " \
           f"{masked}" in output
    assert "secret" not in output
    assert "docker compose up -d rabbitmq redis" in output  # how to start one
    assert "Traceback" not in output


def test_list_names_every_demo_with_a_description():
    done = python("client_fixed.py", "--list", timeout=30)
    assert done.returncode == 0, done.stderr
    listed = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert list(listed) == list(demos.DEMOS)
    assert all(description.strip() for description in listed.values())


def test_unknown_demo_is_refused_with_the_list():
    done = python("client_fixed.py", "--only", "basic,nope", timeout=30)
    assert done.returncode == 2 and "unknown demo nope" in done.stderr
    assert ", ".join(demos.DEMOS) in done.stderr


def test_a_queue_without_worker_is_named_instead_of_a_hang(workers, tmp_path):
    """No worker consumes network_queue (its worker stopped consuming it): the retry demo
    names what is missing, the other demos pass."""
    env, app = workers
    network = f"network@{HOST}"
    results = tmp_path / "results.json"
    app.control.cancel_consumer("network_queue", destination=[network], reply=True, timeout=5)
    try:
        done = python("client_fixed.py", "--only", "basic,retry", "--timeout", "8",
                      "--json", str(results), env=env, timeout=60)
    finally:
        app.control.add_consumer("network_queue", destination=[network], reply=True, timeout=5)
    output = done.output
    assert done.returncode == 1, output
    outcome = {d["name"]: d for d in json.loads(results.read_text())["demos"]}
    assert outcome["basic"]["ok"]
    assert not outcome["retry"]["ok"]
    detail = outcome["retry"]["detail"]
    assert "still PENDING" in detail and "no worker consumes queue 'network_queue'" in detail
    assert "celery -A tasks worker -Q network_queue -n network@%h" in detail
    assert "no worker consumes queue 'network_queue'" in output  # the user sees it too
    assert "1 passed, 1 failed" in output
    assert "warning: no worker consumes 'network_queue'" in output  # said before any demo
    assert "Traceback" not in output  # not even at exit, for the result still awaited


def test_revoke_terminates_a_running_task_on_prefork_workers(workers, tmp_path):
    """The terminate half of the revoke demo needs pool processes: the in-process workers of
    test_tasks.py cannot run it, these can."""
    env, _ = workers
    results = tmp_path / "results.json"
    done = python("client_fixed.py", "--only", "revoke", "--json", str(results), env=env,
                  timeout=60)
    assert done.returncode == 0, done.output[-3000:]
    [outcome] = json.loads(results.read_text())["demos"]
    assert outcome["detail"] == ("revoke() of a waiting task and revoke(terminate=True) of a "
                                 "running one -> REVOKED"), outcome


def test_client_walk_through_runs_to_the_end(workers):
    env, _ = workers
    done = python("client.py", env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("add(4, 4) = 8", "step 1 of 5", "ran on fast@", "chord: {'count': 3",
                 "'attempts': 3", "ended FAILURE", "revoked at once -> REVOKED",
                 "network_queue", "Done: every step finished."):
        assert step in done.stdout, step


def test_no_worker_at_all_is_reported_at_once(stack_env):
    done = python("client_fixed.py", env=stack_env, timeout=60)
    assert done.returncode == 1, done.output
    assert "no worker answers" in done.stderr and "python run_demo.py --keep-running" in done.stderr
    assert done.seconds < 20, f"{done.seconds:.1f}s"  # "at once": not the demos' deadlines
