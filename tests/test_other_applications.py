"""Other applications call the workers: a Celery app with Celery's default settings that sends
by name from another folder, and celery-node (a Node.js client of Celery's protocol), on
RabbitMQ and on Redis (the Python client on the embedded stack too), with the commands of
docs/other-applications.md run as written.

    pytest tests/test_other_applications.py

The workers are the ones run_demo.py and the README start (`celery` and `slow_queue` here),
on a throw-away vhost or Redis key prefix.
"""
import re
import shutil
from contextlib import ExitStack

import pytest
from kombu import Exchange, Queue

import stack
from helpers import (ROOT, VENV, client_app, require_rabbit, require_redis, run, skip,
                     throwaway_stack)

MARKER = re.compile(r"<!-- other-apps: (\w+) -->\n```bash\n(.*?)```", re.S)


def documented(kind):
    """The commands of docs/other-applications.md marked ``<!-- other-apps: KIND -->``."""
    text = (ROOT / "docs" / "other-applications.md").read_text(encoding="utf-8")
    return [line for found, body in MARKER.findall(text) if found == kind
            for line in body.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def workers(request, tmp_path_factory):
    """The README's workers for `celery` and `slow_queue`, on the broker a test names
    (indirect parametrization): RabbitMQ, Redis, or the embedded stack."""
    if request.param == "rabbitmq":
        require_rabbit("RabbitMQ and Redis, the brokers a client of another kind must meet")
    elif request.param == "redis":
        require_redis("Redis, a broker a client of another kind must meet")
    with ExitStack() as exits:
        if request.param == "embedded":  # its folders: CELERY_FS_ROOT, absolute
            env = stack.resolve("embedded", run_dir=tmp_path_factory.mktemp("embedded"))
        elif request.param == "rabbitmq":
            env = dict(exits.enter_context(throwaway_stack(tmp_path_factory.mktemp("stack"))))
        else:  # broker keys and results under one prefix, deleted afterwards
            prefix = exits.enter_context(stack.throwaway_redis_prefix())
            env = {"CELERY_BROKER_URL": stack.BROKER_URLS["redis"],
                   "CELERY_RESULT_BACKEND": stack.DEFAULT_BACKEND,
                   "CELERY_BROKER_PREFIX": prefix, "CELERY_RESULT_KEYPREFIX": prefix}
        processes = stack.Processes(tmp_path_factory.mktemp("workers"), env=env)
        exits.callback(processes.stop_all)
        app = client_app(env)
        exits.callback(app.close)
        nodes = stack.start_stack(processes, queues=("celery", "slow_queue"), beat=False)
        stack.wait_for_workers(app, nodes, 60, processes)
        yield env


# celery-node has no filesystem transport: it meets the workers on RabbitMQ and Redis only
@pytest.mark.parametrize("workers", ["rabbitmq", "redis", "embedded"], indirect=True)
def test_a_default_celery_app_in_another_folder_gets_5(workers, tmp_path):
    """The chapter's command, run where there is no tasks.py and no celeryconfig.py."""
    (tmp_path / "examples" / "python").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "python" / "add.py", tmp_path / "examples" / "python")
    for command in documented("python"):
        # as a user with the virtualenv active: `python` is the one that has Celery
        done = run(["bash", "-c", command], env={**workers, **VENV}, cwd=tmp_path, timeout=60)
        assert done.returncode == 0, done.output[-2000:]
        assert done.stdout.strip().splitlines()[-1] == "5", done.output[-2000:]


@pytest.fixture(scope="module")
def node_example(tmp_path_factory):
    """A copy of examples/node (without node_modules) in a folder of its own: the parent of
    its `examples` folder."""
    if not (shutil.which("node") and shutil.which("npm")):
        skip("Node.js and npm are not installed (apt-get install nodejs npm)")
    folder = tmp_path_factory.mktemp("node")
    shutil.copytree(ROOT / "examples" / "node", folder / "examples" / "node",
                    ignore=shutil.ignore_patterns("node_modules"))
    return folder


@pytest.mark.parametrize("workers", ["rabbitmq", "redis"], indirect=True)
def test_celery_node_from_npm_gets_5(workers, node_example):
    """`npm ci` installs the pinned celery-node; its script sends tasks.add by name."""
    for command in documented("node"):
        done = run(["bash", "-c", command], env=workers, cwd=node_example, timeout=180)
        assert done.returncode == 0, done.output[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "5", done.output[-2000:]


def test_celery_node_refused_a_queue_says_so_in_one_line(node_example, tmp_path):
    """`celery` declared with x-max-priority (as an older version of the demo left it): one
    line naming PRECONDITION_FAILED and the troubleshooting page, exit 1, no stack trace
    (before: Node's "Unhandled 'error' event")."""
    require_rabbit("PRECONDITION_FAILED is RabbitMQ's")
    with throwaway_stack(tmp_path / "stack") as env:
        app = client_app(env)
        try:
            with app.connection_for_write() as conn:
                Queue("celery", Exchange("celery", "direct"), routing_key="celery",
                      queue_arguments={"x-max-priority": 10})(conn.default_channel).declare()
        finally:
            app.close()
        install = run(["npm", "ci"], cwd=node_example / "examples" / "node", timeout=180)
        assert install.returncode == 0, install.output[-2000:]
        done = run(["node", "add.js", "2", "3"], env=env, cwd=node_example / "examples" / "node",
                   timeout=30)
    assert done.returncode == 1, done.output[-2000:]
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.output
    assert done.stderr.startswith("tasks.add failed: Channel closed by server: 406 "
                                  "(PRECONDITION-FAILED)"), done.stderr
    assert "inequivalent arg 'x-max-priority' for queue 'celery'" in done.stderr
    assert done.stderr.rstrip().endswith("(see docs/troubleshooting.md)"), done.stderr

