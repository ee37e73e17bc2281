"""Each broker and result backend, failing for real, is named with the right system and check.

    pytest tests/test_diagnosis.py -s       # about a minute: each service frozen or removed once

A client configured as a fresh process would be (``client_app``) talks to the real service
through stack.FaultProxy, which then freezes it (sockets open, nothing answered: a paused VM),
or loses the folder the embedded stack lives in. The exception the client gets is turned into
the line a user reads by the one diagnosis (``stack.service_fault``), which asks the capability
table which system failed and how to check it: `rabbitmq-diagnostics status`, `redis-cli -u URL
ping`, `pg_isready -h HOST -p PORT`, `aws sqs list-queues`, or the folder that is missing.
(Redis Sentinel's, `redis-cli ... sentinel get-master-addr-by-name`: tests/test_sentinel.py,
which starts the servers it needs.)
"""
import shutil
import uuid

import pytest

import stack
from helpers import (CLIENT_DEADLINE, client_app, fault_of, require_postgres, require_rabbit,
                     require_redis)


def send(app):
    return app.send_task("tasks.add", (2, 3))


@pytest.fixture
def frozen(request):
    """FaultProxy(port) factory; every proxy forwards again and closes after the test."""
    proxies, apps = [], []

    def make(port):
        proxy = stack.FaultProxy("127.0.0.1", port).__enter__()
        proxies.append(proxy)
        return proxy
    make.apps = apps
    yield make
    for app in apps:
        stack.abandon_connections(app)  # no goodbye to a service that was frozen
    for proxy in proxies:
        proxy.forward()
        proxy.__exit__(None, None, None)


def test_a_frozen_rabbitmq_broker_is_named_with_rabbitmq_diagnostics(rabbit_env, frozen):
    proxy = frozen(5672)
    app = client_app({**rabbit_env, "CELERY_BROKER_URL":
                      proxy.rewrite(rabbit_env["CELERY_BROKER_URL"])})
    frozen.apps.append(app)
    send(app)  # connected through the proxy
    proxy.freeze()
    message = fault_of(app, lambda: send(app))
    assert message.startswith("the broker at amqp://guest:**@127.0.0.1:"), message
    assert "stopped answering" in message
    assert "check RabbitMQ with `rabbitmq-diagnostics status`" in message
    assert "Redis" not in message and "redis-cli" not in message


def test_a_frozen_redis_broker_is_named_with_redis_cli(frozen, tmp_path):
    require_redis()
    proxy = frozen(6379)
    broker = proxy.rewrite(stack.BROKER_URLS["redis"])
    with stack.throwaway_redis_prefix(stack.BROKER_URLS["redis"]) as prefix:
        (tmp_path / "results").mkdir()  # results elsewhere: this is about Redis as the broker
        app = client_app({"CELERY_BROKER_URL": broker, "CELERY_BROKER_PREFIX": prefix,
                          "CELERY_RESULT_BACKEND": f"file://{tmp_path / 'results'}"})
        frozen.apps.append(app)
        send(app)
        proxy.freeze()
        message = fault_of(app, lambda: send(app))
    assert message.startswith(f"the broker at {broker}"), message
    assert f"check Redis with `redis-cli -u {broker} ping`" in message
    assert "rabbitmq-diagnostics" not in message


def test_a_frozen_redis_result_backend_is_named_with_redis_cli(rabbit_env, frozen):
    proxy = frozen(6379)
    backend = proxy.rewrite(rabbit_env["CELERY_RESULT_BACKEND"])
    app = client_app({**rabbit_env, "CELERY_RESULT_BACKEND": backend})
    frozen.apps.append(app)
    backend_of_this_thread = app.backend  # the client's: app.backend is one per thread
    backend_of_this_thread.get_task_meta(str(uuid.uuid4()))  # connected through the proxy
    proxy.freeze()
    message = fault_of(app, lambda: backend_of_this_thread.get_task_meta(str(uuid.uuid4())))
    assert message.startswith(f"the result backend (Redis) at {backend} stopped answering"), \
        message
    assert f"check it with `redis-cli -u {backend} ping`" in message


def test_a_frozen_postgresql_result_backend_is_named_with_pg_isready(frozen):
    require_postgres()
    with stack.throwaway_postgres_database() as database:
        proxy = frozen(5432)
        backend = proxy.rewrite(database)
        app = client_app({"CELERY_BROKER_URL": "memory://", "CELERY_RESULT_BACKEND": backend})
        frozen.apps.append(app)
        results = app.backend  # the client's: app.backend is one per thread
        results.get_task_meta(str(uuid.uuid4()))  # creates the tables, through the proxy
        proxy.freeze()
        message = fault_of(app, lambda: results.get_task_meta(str(uuid.uuid4())))
        proxy.forward()  # the database is dropped next, with the connections still open
    assert message.startswith(f"the result backend (PostgreSQL) at {backend} stopped answering"), \
        message
    assert f"check it with `pg_isready -h 127.0.0.1 -p {proxy.port}`" in message
    assert "Redis" not in message and "redis-cli" not in message


def test_rpc_results_on_a_frozen_broker_name_the_broker_not_redis(rabbit_env, frozen):
    proxy = frozen(5672)
    app = client_app({**rabbit_env, "CELERY_BROKER_URL":
                      proxy.rewrite(rabbit_env["CELERY_BROKER_URL"]),
                      "CELERY_RESULT_BACKEND": "rpc://"})
    frozen.apps.append(app)
    result = send(app)  # nobody runs it: get() waits on the broker, where rpc:// results come
    proxy.freeze()
    message = fault_of(app, lambda: result.get(timeout=30))
    assert message.startswith("the broker at amqp://guest:**@127.0.0.1:"), message
    assert "(the rpc:// results travel through it)" in message
    assert "check RabbitMQ with `rabbitmq-diagnostics status`" in message
    assert "Redis" not in message and "redis-cli" not in message


def test_rpc_send_from_another_thread_on_a_frozen_broker_fails_within_its_deadline(rabbit_env,
                                                                                   frozen):
    proxy = frozen(5672)
    app = client_app({**rabbit_env, "CELERY_BROKER_URL":
                      proxy.rewrite(rabbit_env["CELERY_BROKER_URL"]),
                      "CELERY_RESULT_BACKEND": "rpc://"})
    frozen.apps.append(app)
    send(app)  # connected through the proxy; this thread's reply queue is declared
    proxy.freeze()
    # fault_of calls from a new thread: a reply queue of its own to declare (app.thread_oid),
    # which Celery's rpc:// backend retried for ever (stack/celery_gaps.py: RPCBackend)
    message = fault_of(app, lambda: send(app), within=CLIENT_DEADLINE)
    assert message.startswith("the broker at amqp://guest:**@127.0.0.1:"), message
    assert "(the rpc:// results travel through it)" in message


def test_a_postgresql_result_backend_made_while_frozen_fails_within_its_deadline(frozen):
    require_postgres()
    with stack.throwaway_postgres_database() as database:
        proxy = frozen(5432)
        backend = proxy.rewrite(database)
        proxy.freeze()  # before the backend exists: Celery creates its tables as it makes it
        app = client_app({"CELERY_BROKER_URL": "memory://", "CELERY_RESULT_BACKEND": backend})
        frozen.apps.append(app)
        # was 69 s: Celery's table creation retried each 3 s connect ten times, twice
        message = fault_of(app, lambda: app.backend.get_task_meta(str(uuid.uuid4())),
                           within=CLIENT_DEADLINE)
        proxy.forward()
    assert message.startswith(f"the result backend (PostgreSQL) at {backend} stopped answering"), \
        message
    assert f"check it with `pg_isready -h 127.0.0.1 -p {proxy.port}`" in message


def test_a_frozen_sqs_endpoint_is_named_with_aws_sqs(frozen, tmp_path):
    """A local SQS server (moto, pip-installed) and file:// results: no service of the
    machine's, so it runs on a fresh machine too."""
    server = stack.Processes(tmp_path / "sqs-server")
    try:
        url = stack.start_local_sqs(server)
        proxy = frozen(int(url.rsplit(":", 1)[1]))
        broker = proxy.rewrite(url)
        (tmp_path / "results").mkdir()  # results elsewhere: this is about SQS
        app = client_app({"CELERY_BROKER_URL": broker,
                          "CELERY_RESULT_BACKEND": f"file://{tmp_path / 'results'}",
                          "CELERY_BROKER_PREFIX": f"diagnosis-{uuid.uuid4().hex[:6]}-"})
        frozen.apps.append(app)
        send(app)
        proxy.freeze()
        # about 20 s: each of the 3 publish attempts (task_publish_retry_policy) re-lists the
        # queues and sends, each read giving up after 4 s (client-config); it was 2 minutes
        message = fault_of(app, lambda: send(app), within=CLIENT_DEADLINE)
    finally:
        server.stop_all(grace=5)
    assert message.startswith(f"the broker at {stack.mask(broker)}"), message
    endpoint = f"http://127.0.0.1:{proxy.port}"
    assert f"check SQS with `aws sqs list-queues --endpoint-url {endpoint}`" in message
    assert "rabbitmq-diagnostics" not in message


def test_a_missing_filesystem_broker_folder_is_named(tmp_path):
    env = stack.resolve("embedded", run_dir=tmp_path)
    app = client_app(env)
    send(app)
    messages = app.conf.broker_transport_options["data_folder_out"]
    shutil.rmtree(messages)
    message = fault_of(app, lambda: send(app))
    assert message.startswith("the broker (kombu's filesystem transport) at filesystem://"), \
        message
    assert f"cannot use its folder {messages}" in message
    assert f"check it with `ls -ld {messages}` (the folder must exist)" in message
    assert "rabbitmq-diagnostics" not in message and "stopped answering" not in message


def test_a_missing_file_results_folder_is_named(tmp_path):
    env = stack.resolve("embedded", run_dir=tmp_path)
    app = client_app(env)
    folder = env["CELERY_RESULT_BACKEND"].removeprefix("file://")
    results = app.backend  # made while its folder is there (Celery checks it then)
    shutil.rmtree(folder)
    message = fault_of(app, lambda: results.store_result(str(uuid.uuid4()), 5, "SUCCESS"))
    assert message.startswith(f"the result backend (the results folder) at file://{folder}"), \
        message
    assert f"check it with `ls -ld {folder}` (the folder must exist)" in message
    # a client polling a state: Celery would read "no file" as PENDING, for ever
    read = fault_of(app, lambda: results.get_task_meta(str(uuid.uuid4())))
    assert read.startswith(f"the result backend (the results folder) at file://{folder}"), read
    assert "redis-cli" not in message and "rabbitmq-diagnostics" not in message
