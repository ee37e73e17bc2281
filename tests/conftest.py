"""Shared fixtures: the in-process memory stack, and real RabbitMQ + Redis on throw-away vhosts.

RabbitMQ tests skip on a machine without RabbitMQ, Redis or rabbitmqctl, except on CI
(CI=true), where such a skip is turned into a failure: CI must prove the real broker.
"""
import functools
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stack  # noqa: E402

MEMORY_ENV = {"CELERY_BROKER_URL": "memory://localhost/", "CELERY_RESULT_BACKEND": "cache+memory://"}
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip(reason):
    """Skip this test, saying why; on CI (CI=true) fail instead: CI runs every test."""
    if ON_CI:
        pytest.fail(f"CI=true, so this test must run, but: {reason}")
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def rabbit_problem():
    """None when RabbitMQ, Redis and rabbitmqctl are all usable, else what is missing."""
    try:
        stack.check_broker(stack.DEFAULT_BROKER, timeout=2)
        stack.check_backend(stack.DEFAULT_BACKEND, timeout=2)
    except stack.ServiceUnavailable as exc:
        return str(exc)
    if not stack.rabbitmqctl_usable():
        return "rabbitmqctl is missing or not permitted (needed for throw-away vhosts)"
    return None


def require_rabbit():
    problem = rabbit_problem()
    if problem:
        skip(f"RabbitMQ + Redis not available: {problem}")


@pytest.fixture
def rabbit_env():
    """Environment for subprocesses: a fresh vhost and Redis key prefix, removed afterwards."""
    require_rabbit()
    with stack.throwaway_vhost() as url, stack.throwaway_redis_prefix() as prefix:
        yield {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": stack.DEFAULT_BACKEND,
               "CELERY_RESULT_KEYPREFIX": prefix}


def configure(env):
    """Point the one `tasks` app at another broker and backend, as a fresh process would see it.

    The environment is what celeryconfig reads; the app's cached connections, producer pool and
    result backend are dropped so that nothing still talks to the previous broker.
    """
    import celeryconfig
    import tasks
    for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_RESULT_KEYPREFIX"):
        os.environ.pop(key, None)
    os.environ.update(env)
    importlib.reload(celeryconfig)
    app = tasks.app
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    for cached in ("amqp", "control", "events"):
        app.__dict__.pop(cached, None)
    app._backend_cache = None
    app._local = threading.local()
    app.config_from_object(celeryconfig, force=True)
    assert app.conf.broker_url == env["CELERY_BROKER_URL"]
    return app


class Stack:
    def __init__(self, name, app, workers):
        self.name, self.app, self.workers = name, app, workers

    def context(self, **kwargs):
        """A demo context with what this stack offers (in-process workers: the threads pool)."""
        import demos
        offers = stack.offers_for(self.app.conf.broker_url, self.app.conf.result_backend,
                                  pool="threads")
        return demos.Context(app=self.app, offers=offers, **kwargs)


@pytest.fixture(scope="session", params=["memory", "rabbitmq"])
def live(request, tmp_path_factory):
    """The `tasks` app with real in-process workers for every queue, and beat.

    Every test that takes this fixture runs twice: on memory:// and on RabbitMQ + Redis.
    """
    saved = dict(os.environ)
    try:
        if request.param == "memory":
            env = dict(MEMORY_ENV)
            app = configure(env)
            yield from _workers(request.param, app, tmp_path_factory)
        else:
            require_rabbit()
            with stack.throwaway_vhost() as url, stack.throwaway_redis_prefix() as prefix:
                app = configure({"CELERY_BROKER_URL": url, "CELERY_RESULT_KEYPREFIX": prefix,
                                 "CELERY_RESULT_BACKEND": stack.DEFAULT_BACKEND})
                yield from _workers(request.param, app, tmp_path_factory)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _workers(name, app, tmp_path_factory):
    queues = [q.name for q in app.conf.task_queues]
    run_dir = tmp_path_factory.mktemp(f"beat-{name}")
    with stack.in_process_workers(app, queues, beat=True, run_dir=run_dir) as workers:
        yield Stack(name, app, workers)


# --- Helpers for tests that run real worker processes (test_faults.py, test_bad_input.py) ---
HOST = socket.gethostname()
WORKER_FLAGS = ("--without-mingle", "--without-gossip", "-E", "-l", "INFO")


def client_app(env):
    """A client for the test's vhost that does not depend on the `tasks` module's state."""
    app = Celery("test-client", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.update(
        broker_url=env["CELERY_BROKER_URL"], result_backend=env["CELERY_RESULT_BACKEND"],
        broker_transport_options={"confirm_publish": True},  # what celeryconfig sets for amqp
        result_backend_transport_options={"global_keyprefix": env["CELERY_RESULT_KEYPREFIX"],
                                          "retry_policy": {"timeout": 5.0}})
    return app


def start_worker(procs, name, queues, *extra):
    return procs.celery(name, "worker", "-Q", queues, "-n", f"{name}@%h", *WORKER_FLAGS, *extra)


def wait_for_log(path, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in Path(path).read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def run_client(code, env, timeout=60):
    """Run `python -c code` as a user would, against ``env``; return (process, seconds)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=stack.HERE, env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def worker_until_exit(run_dir, env, name, timeout=60):
    """Start a worker that should stop by itself; return (exit code, seconds, its log)."""
    procs = stack.Processes(run_dir, env)
    try:
        started = time.monotonic()
        code = start_worker(procs, name, "celery").wait(timeout=timeout)
        seconds = time.monotonic() - started
    finally:
        procs.stop_all()
    return code, seconds, (procs.run_dir / f"{name}.log").read_text(errors="replace")


@contextmanager
def worker_without(run_dir, name, broker_url):
    """A worker whose broker is not there, started now, so its retries overlap other tests.

    Yields (process, log path, seconds from start to exit); the last fails until it exited.
    """
    require_rabbit()  # Redis must answer: the worker checks its result backend first
    procs = stack.Processes(run_dir, {
        "CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": stack.DEFAULT_BACKEND,
        "CELERY_RESULT_KEYPREFIX": "celery-demo-unused:"})
    started, ended = time.monotonic(), []
    proc = start_worker(procs, name, "celery")
    # Note when it exits, even if that is before the test looks (a daemon thread: it ends
    # when the worker does, at the latest when stop_all kills it below)
    threading.Thread(target=lambda: (proc.wait(), ended.append(time.monotonic())),
                     daemon=True).start()
    try:
        yield proc, procs.run_dir / f"{name}.log", lambda: ended[0] - started
    finally:
        procs.stop_all()
