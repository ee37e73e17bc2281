"""The configuration a user reads and overrides, and the no-service demo."""
import time

import pytest

from conftest import python

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
    for name in demos.DEMOS:
        assert f" {name}" in out.stdout
