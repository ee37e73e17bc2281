"""run_demo.py end to end, as a user runs it: every demo passes and no process is left behind.

    pytest tests/test_run_demo.py        # about 90 s: two full runs and two interrupted ones

Each run gets its own run folder; run_demo.py writes there the PIDs of what it started (each
worker, beat and Flower leads its own process group; client_fixed.py shares run_demo's group,
which the test creates). Afterwards no process may remain in any of those groups: that covers
the workers' prefork pool children too.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import pytest

from helpers import ROOT, alive_in_groups, environment, fake_docker, finish, start

import demos
import stack

DEAD_BROKER = "amqp://guest:secret@127.0.0.1:1//"


def check_full_run(proc, run_dir, results, unsupported=()):
    """Every demo passed, but ``unsupported``, reported so with the capability table's reason."""
    output = finish(proc, timeout=240, run_dir=run_dir)
    assert proc.returncode == 0, output[-5000:]
    report = json.loads(results.read_text())
    assert report["passed"], report
    assert [d["name"] for d in report["demos"]] == list(demos.DEMOS)
    failed = [d for d in report["demos"] if not d["ok"]]
    assert not failed, failed
    assert [d["name"] for d in report["demos"] if d["status"] == "unsupported"] == \
        list(unsupported)
    total = len(demos.DEMOS)
    assert f"{total - len(unsupported)} passed, 0 failed, {len(unsupported)} unsupported" \
        in output
    assert alive_in_groups(run_dir, proc.pid) == []
    assert "nothing left running" in output
    # The callbacks lesson's intended failure: one INFO line in the worker's log (Task.throws)
    log = (run_dir / "worker-default.log").read_text()
    assert "raised expected: RuntimeError('important_task was asked to fail')" in log
    assert "raised unexpected: RuntimeError" not in log
    names = set(json.loads((run_dir / "pids.json").read_text())["processes"])
    assert {"worker-default", "worker-fast", "worker-slow", "worker-network", "beat"} <= names
    return output


def test_falls_back_to_the_embedded_stack_and_runs_every_demo(tmp_path):
    """No reachable broker and no Docker engine: the embedded stack, from another folder."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    docker_calls = tmp_path / "docker-calls"
    (fake_bin / "docker").write_text(f'#!/bin/sh\necho "$@" >> {docker_calls}\nexit 1\n')
    (fake_bin / "docker").chmod(0o755)
    env = environment(CELERY_BROKER_URL=DEAD_BROKER,
                    PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    run_dir, results = tmp_path / "run", tmp_path / "results.json"
    proc = start(["--run-dir", str(run_dir), "--json", str(results)], env, cwd=tmp_path)
    output = check_full_run(proc, run_dir, results, unsupported=["priority"])
    assert "amqp://guest:**@127.0.0.1:1//" in output and "secret" not in output
    assert docker_calls.read_text().split() == ["info"]  # asked, and nothing started
    assert "services: embedded stack" in output
    assert "embedded + file results cannot do priority: kombu's filesystem transport" in output
    assert "UNSUPPORTED priority: kombu's filesystem transport delivers in FIFO order" in output
    assert (run_dir / "worker-slow.log").exists()


def test_make_demo_runs_every_demo_with_flower(stack_env, tmp_path):
    """The README's quick-start command itself: `make demo`, with run_demo's options in ARGS,
    on RabbitMQ + Redis, or on the embedded stack where this machine has none (Flower too:
    the filesystem transport carries worker events; every demo but priority)."""
    run_dir, results = tmp_path / "run", tmp_path / "results.json"
    args = f"ARGS=--flower --run-dir {run_dir} --json {results}"
    proc = start([args], environment(**stack_env), cwd=ROOT,
                 command=("make", "--no-print-directory", "demo"))
    output = check_full_run(proc, run_dir, results,
                            unsupported=[] if stack_env.is_rabbit else ["priority"])
    assert f"services: using the configured broker {stack.mask(stack_env['CELERY_BROKER_URL'])}" \
        in output
    assert "Flower: http://127.0.0.1:" in output and "not answering" not in output
    if not stack_env.is_rabbit:
        return
    assert "cannot do" not in output  # RabbitMQ + Redis results can run every demo
    priority = [d for d in json.loads(results.read_text())["demos"] if d["name"] == "priority"]
    assert "(higher number first)" in priority[0]["detail"]  # RabbitMQ really reordered it


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_stops_everything_within_seconds(tmp_path, how):
    run_dir = tmp_path / "run"
    proc = start(["--broker", "embedded", "--run-dir", str(run_dir)], environment(), cwd=tmp_path)
    lines, demos_running = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("PASS "):
                demos_running.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert demos_running.wait(90), "".join(lines)[-3000:]
    if how == "ctrl-c":  # the terminal sends SIGINT to the foreground group: run_demo + client
        os.killpg(proc.pid, signal.SIGINT)
    else:                # `kill PID`: run_demo alone, which must stop the client itself
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("run_demo.py did not stop within 40 s of the signal")
    reader.join(10)
    output = "".join(lines)
    assert proc.returncode == (130 if how == "ctrl-c" else 143), output[-3000:]
    assert "interrupted" in output and "Traceback" not in output
    assert "nothing left running" in output
    assert alive_in_groups(run_dir, proc.pid) == []


def test_docker_mode_starts_the_compose_services_waits_for_them_and_stops_them(stack_env,
                                                                               tmp_path):
    """`docker` is a stand-in here (no engine on CI). On RabbitMQ the broker refuses this run
    until 2 s after `compose up` (no permission on its vhost yet, as a container still
    starting), so run_demo must wait for the services as compose_up does."""
    path, calls = fake_docker(tmp_path)
    grant = threading.Thread(target=lambda: None)
    if stack_env.is_rabbit:
        admin, vhost = stack_env.admin, stack_env.vhost
        user = urlparse(stack_env["CELERY_BROKER_URL"]).username
        admin.clear_permissions(vhost, user)

        def grant_after_compose_up():
            stack.eventually(lambda: calls.exists() and "compose up" in calls.read_text(),
                             "`docker compose up`", 60, interval=0.05)
            time.sleep(2)  # the "containers" start
            admin.set_permissions(vhost, user)
        grant = threading.Thread(target=grant_after_compose_up, daemon=True)
    grant.start()
    run_dir = tmp_path / "run"
    proc = start(["--broker", "docker", "--only", "basic", "--run-dir", str(run_dir)],
                 environment(PATH=path, **stack_env), cwd=tmp_path)
    output = finish(proc, timeout=120, run_dir=run_dir)
    grant.join(60)
    assert proc.returncode == 0, output[-3000:]
    assert calls.read_text().splitlines() == [
        "info", "compose ps --status running --services", "compose up -d rabbitmq redis",
        "compose stop rabbitmq redis"]
    assert "`docker compose up -d rabbitmq redis`" in output
    assert alive_in_groups(run_dir, proc.pid) == []


def test_a_run_that_fails_before_starting_anything_leaves_no_run_folder(tmp_path):
    """A copy of run_demo.py in tmp_path makes its .run/<timestamp>-<pid> there (its own folder),
    not in this checkout, where other runs may make theirs at the same time."""
    script = tmp_path / "run_demo.py"
    script.write_text((ROOT / "run_demo.py").read_text())
    env = environment(PYTHONPATH=str(ROOT), CELERY_BROKER_URL=DEAD_BROKER)
    for args in (["--broker", "rabbitmq"], ["--broker", "rabbitmq", "--backend", "file"]):
        proc = start(args, env, cwd=tmp_path, command=(sys.executable, str(script)))
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, output
        assert "cannot reach the broker at amqp://guest:**@127.0.0.1:1//" in output, output
        assert not (tmp_path / ".run").exists(), list((tmp_path / ".run").rglob("*"))
        assert "logs in" not in output, output


def test_docker_mode_reports_a_failing_compose_in_seconds(tmp_path):
    path, calls = fake_docker(tmp_path, compose_fails=True)
    started = time.monotonic()
    proc = start(["--broker", "docker", "--run-dir", str(tmp_path / "run")],
                 environment(PATH=path, CELERY_BROKER_URL=DEAD_BROKER), cwd=tmp_path)
    output = finish(proc, timeout=60)
    assert proc.returncode == 2, output
    assert time.monotonic() - started < 20, "\"in seconds\": compose's error ends the run"
    assert "Error: port 5672 is already allocated" in output and "Traceback" not in output
    assert calls.read_text().splitlines()[-1] == "compose stop rabbitmq redis"


def test_docker_mode_leaves_running_what_it_did_not_start(tmp_path):
    """Services someone already runs with compose are used, and not stopped at the end."""
    path, calls = fake_docker(tmp_path, compose_fails=True, running=("redis",))
    proc = start(["--broker", "docker", "--run-dir", str(tmp_path / "run")],
                 environment(PATH=path), cwd=tmp_path)
    output = finish(proc, timeout=60)
    assert proc.returncode == 2, output
    assert "already running: redis" in output
    assert "amqp://celery:**@localhost:5672//" in output  # compose's user, not guest
    assert calls.read_text().splitlines()[-1] == "compose stop rabbitmq"
