"""The configuration a user reads and overrides, and the no-service demo."""
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

import stack

PY = sys.executable


def run(args, env=None, timeout=60):
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_python_m_celeryconfig_prints_the_config_with_the_password_masked():
    out = run(["-m", "celeryconfig"], {"CELERY_BROKER_URL": "amqp://alice:s3cret@broker:5672/prod",
                                      "CELERY_RESULT_BACKEND": "redis://:hunter2@cache:6379/1"})
    assert out.returncode == 0, out.stderr
    assert "s3cret" not in out.stdout and "hunter2" not in out.stdout
    assert "broker_url = 'amqp://alice:**@broker:5672/prod'" in out.stdout
    assert "accept_content = ['json']" in out.stdout
    assert "task_routes" in out.stdout and "beat_schedule" in out.stdout


def test_defaults_point_at_local_rabbitmq_and_redis():
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    out = subprocess.run([PY, "-c", "import celeryconfig as c; print(c.broker_url, c.result_backend)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30, env=env_free)
    assert out.stdout.split() == [stack.DEFAULT_BROKER, stack.DEFAULT_BACKEND]


def test_every_queue_is_declared_with_a_priority_range():
    import celeryconfig
    assert [q.name for q in celeryconfig.task_queues] == list(celeryconfig.QUEUE_NAMES)
    for queue in celeryconfig.task_queues:
        assert queue.queue_arguments == {"x-max-priority": celeryconfig.MAX_PRIORITY}
    routed = {route["queue"] for route in celeryconfig.task_routes.values()}
    assert routed <= set(celeryconfig.QUEUE_NAMES)


def test_an_unreachable_broker_is_reported_in_seconds_with_the_url_masked():
    started = time.monotonic()
    with pytest.raises(stack.ServiceUnavailable) as error:
        stack.check_broker("amqp://guest:s3cret@127.0.0.1:1//", timeout=2)
    message = str(error.value)
    assert "cannot reach the broker at amqp://guest:**@127.0.0.1:1//" in message
    assert "s3cret" not in message and "docker compose up -d rabbitmq redis" in message
    assert time.monotonic() - started < 30  # a bound so the test cannot hang, not a speed check


def test_complete_demo_runs_every_section_without_any_service():
    """It must ignore CELERY_BROKER_URL: point it at a broker that does not exist."""
    out = run(["complete_demo.py"], {"CELERY_BROKER_URL": "amqp://nobody:x@127.0.0.1:1//",
                                     "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/0",
                                     "COLUMNS": "200"}, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import demos
    assert f"{len(demos.DEMOS)} passed, 0 failed" in out.stdout
    for name in demos.DEMOS:
        assert f" {name}" in out.stdout
