"""client_fixed.py and client.py as a user runs them: against a live stack, a stack with a
queue nobody consumes, and no broker at all.

    pytest tests/test_clients.py
"""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from celery import Celery

from conftest import ROOT

import demos
import stack


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "FLOWER_", "DEMO_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def run(script, *args, env, timeout):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@contextmanager
def workers(env, run_dir, queues):
    """Real worker processes (prefork, as run_demo.py starts them) for ``queues`` only."""
    processes = stack.Processes(run_dir, env=env)
    try:
        nodes = stack.start_stack(processes, queues=queues, beat=False)
        stack.wait_for_workers(Celery(broker=env["CELERY_BROKER_URL"]), nodes, 60, processes)
        yield processes
    finally:
        processes.stop_all()
        assert processes.still_running() == []


@pytest.mark.parametrize("script", ["client_fixed.py", "client.py"])
@pytest.mark.parametrize("broken", ["broker", "backend"])
def test_without_a_broker_or_backend_a_clear_message_in_seconds(script, broken):
    if broken == "broker":
        env = clean_env(CELERY_BROKER_URL="amqp://guest:secret@127.0.0.1:1//")
        masked = "amqp://guest:**@127.0.0.1:1//"
    else:  # the broker needs no server; the Redis result backend is missing
        env = clean_env(CELERY_BROKER_URL="filesystem://", CELERY_FS_ROOT="/nonexistent",
                        CELERY_RESULT_BACKEND="redis://:secret@127.0.0.1:1/0")
        masked = "redis://:**@127.0.0.1:1/0"
    done = run(script, env=env, timeout=30)  # a hang fails here, not a timed assertion
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"cannot reach the {'broker' if broken == 'broker' else 'result backend'} at " \
           f"{masked}" in output
    assert "secret" not in output
    assert "docker compose up -d rabbitmq redis" in output  # how to start one
    assert "Traceback" not in output


def test_list_names_every_demo_with_a_description():
    done = run("client_fixed.py", "--list", env=clean_env(), timeout=30)
    assert done.returncode == 0, done.stderr
    listed = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert list(listed) == list(demos.DEMOS)
    assert all(description.strip() for description in listed.values())


def test_unknown_demo_is_refused_with_the_list():
    done = run("client_fixed.py", "--only", "basic,nope", env=clean_env(), timeout=30)
    assert done.returncode == 2 and "unknown demo nope" in done.stderr
    assert ", ".join(demos.DEMOS) in done.stderr


def test_a_queue_without_worker_is_named_instead_of_a_hang(rabbit_env, tmp_path):
    """Workers for every queue but network_queue: the retry demo names what is missing."""
    env = clean_env(**rabbit_env)
    results = tmp_path / "results.json"
    with workers(env, tmp_path / "run", ["celery", "fast_queue", "slow_queue"]):
        done = run("client_fixed.py", "--only", "basic,retry", "--timeout", "8",
                   "--json", str(results), env=env, timeout=60)
    output = done.stdout + done.stderr
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


def test_client_walk_through_runs_to_the_end(rabbit_env, tmp_path):
    env = clean_env(**rabbit_env)
    with workers(env, tmp_path / "run", list(stack.WORKER_NAMES)):
        done = run("client.py", env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("add(4, 4) = 8", "step 1 of 5", "ran on fast@", "chord: {'count': 3",
                 "'attempts': 3", "ended FAILURE", "revoked at once -> REVOKED",
                 "network_queue", "Done: every step finished."):
        assert step in done.stdout, step


def test_no_worker_at_all_is_reported_at_once(rabbit_env):
    done = run("client_fixed.py", env=clean_env(**rabbit_env), timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no worker answers" in done.stderr and "python run_demo.py --keep-running" in done.stderr
