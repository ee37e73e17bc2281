"""Quorum queues (CELERY_QUEUE_TYPE=quorum): what celeryconfig declares, what the capability
table says they cannot do, and countdown, ETA and retries through Celery's native delayed
delivery, with a real worker on a throw-away vhost of this machine's RabbitMQ (one node: a
quorum queue works on one node too; docs/cluster.md replicates it over three).

    .venv/bin/python -m pytest tests/test_quorum.py -q
"""
import time
from datetime import datetime, timedelta, timezone

import pytest

import celeryconfig
import demos
import stack
from helpers import HOST, client_app, print_logs_if_failed, python, start_worker

QUORUM = {"CELERY_QUEUE_TYPE": "quorum"}


def test_quorum_mode_declares_every_queue_quorum_on_a_topic_exchange_of_its_name():
    out = python("-c", "import celeryconfig as c; print(*[(q.name, q.exchange.name, "
                 "q.exchange.type, q.routing_key, q.queue_arguments) for q in c.task_queues], "
                 "sep='\\n')", env=QUORUM, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == [str((name, name, "topic", name, {"x-queue-type": "quorum"}))
                     for name in celeryconfig.QUEUE_NAMES], lines
    wrong = python("-c", "import celeryconfig", env={"CELERY_QUEUE_TYPE": "qourum"}, timeout=30)
    assert wrong.returncode and "CELERY_QUEUE_TYPE must be 'classic' or 'quorum'" in wrong.output


def test_python_m_celeryconfig_says_what_quorum_queues_cannot_do():
    out = python("-m", "celeryconfig", env=QUORUM, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "#   cannot: priority: quorum queues on RabbitMQ 3.x have no priorities" in out.stdout
    assert "#   cannot: global_qos: quorum queues refuse a prefetch limit shared" in out.stdout
    classic = python("-m", "celeryconfig", timeout=30)
    assert "cannot" not in classic.stdout  # RabbitMQ's classic queues do both


def test_the_priority_lesson_is_unsupported_on_quorum_queues_and_says_why():
    offers = stack.offers_for("amqp://", "redis://", queue_type="quorum")
    unsupported = {name: demos.unsupported(name, offers) for name in demos.DEMOS}
    assert {name for name, why in unsupported.items() if why} == {"priority"}
    assert unsupported["priority"].startswith("quorum queues on RabbitMQ 3.x have no priorities")
    assert offers.broker.kind == "rabbitmq" and not offers.broker.priority
    # the same broker with classic queues, and another broker with the flag, keep priorities
    assert stack.offers_for("amqp://", "redis://").offers("priority")
    assert stack.offers_for("redis://", "redis://", queue_type="quorum").offers("priority")


@pytest.fixture
def quorum_worker(rabbit_env, tmp_path, request):
    """A worker process for the `celery` queue on quorum queues, and a client app."""
    env = {**rabbit_env, **QUORUM}
    procs = stack.Processes(tmp_path, env)
    failed_before = request.session.testsfailed
    try:
        start_worker(procs, "quorum", "celery")
        app = client_app(env)
        stack.wait_for_workers(app, [f"quorum@{HOST}"], 60, procs)
        yield app, procs, rabbit_env
    finally:
        print_logs_if_failed(request, failed_before, procs)
        procs.stop_all()


def waiting(app, *queues):
    """Messages ready in these queues now (a passive declare: no sampling, no rabbitmqctl)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        return sum(channel.queue_declare(name, passive=True).message_count for name in queues)


def delayed_messages(app):
    """Messages waiting in the native delayed delivery queues (celery_delayed_0..27)."""
    return waiting(app, *(f"celery_delayed_{level}" for level in range(28)))


def test_countdown_eta_and_retries_run_on_quorum_queues_through_native_delayed_delivery(
        quorum_worker):
    app, procs, _ = quorum_worker
    sent = time.monotonic()
    countdown = app.send_task("tasks.add", (1, 2), countdown=2)
    eta = app.send_task("tasks.add", (2, 3), eta=datetime.now(timezone.utc) + timedelta(seconds=2))
    sub_second = app.send_task("tasks.add", (3, 4), countdown=0.3)  # a Celery gap, worked around
    retried = app.send_task("tasks.important_task", ("retry",))  # retries after countdown=0.1
    # The delayed ones wait in the broker's delay queues, not in the worker's memory
    assert delayed_messages(app) >= 2
    assert [r.get(timeout=20) for r in (countdown, eta, sub_second)] == [3, 5, 7]
    assert time.monotonic() - sent >= 2
    assert retried.get(timeout=20) and retried.state == "SUCCESS"
    log = (procs.run_dir / "quorum.log").read_text(errors="replace")
    assert "Direct exchanges are not supported" not in log and "countdown must be" not in log
    assert "Failed to" not in log  # every queue bound, also those this worker does not consume


def test_a_long_countdown_waits_in_the_broker_not_in_the_worker(quorum_worker):
    """On classic queues a worker holds a countdown task in memory (and its prefetch slot);
    with native delayed delivery the broker keeps it until it is due."""
    app = quorum_worker[0]
    app.send_task("tasks.add", (1, 1), countdown=600)
    assert stack.eventually(lambda: delayed_messages(app) == 1,
                            "the message to wait in a celery_delayed_* queue", 10)
    scheduled = app.control.inspect(timeout=1.0).scheduled() or {}
    assert scheduled and not any(scheduled.values()), scheduled  # the worker holds nothing
    assert waiting(app, "celery") == 0
