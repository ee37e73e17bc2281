"""Every broker x result backend combination this machine runs, through run_demo.py as a user
runs it, checked demo by demo against the capability table (stack/capabilities.py).

    pytest tests/test_stacks.py        # about 2 minutes: the catalogue once per combination

RabbitMQ + Redis results and the embedded stack run in tests/test_run_demo.py; here: Redis +
Redis, RabbitMQ + PostgreSQL, RabbitMQ + rpc://, and SQS + Redis on a local SQS server (moto;
file results on a machine without Redis). Each combination runs ``run_demo.py --broker X
--backend Y --json FILE`` ONCE for the module, on a throw-away vhost, Redis key prefix,
PostgreSQL database and SQS queue prefix, all removed afterwards. A demo must pass, or be
unsupported for the reason the table gives; and the table itself must still say what was
measured (EXPECTED_UNSUPPORTED), so a demo that silently stops running fails here.
"""
import json
import subprocess
import sys
import uuid
from contextlib import ExitStack

import pytest

from helpers import (ON_CI, ROOT, alive_in_groups, environment as clean_env, finish,
                     rabbit_problem, require_postgres, require_rabbit, start)

import celeryconfig
import demos
import stack

# Measured on this machine (README, "Brokers and result backends"): what each pair cannot run.
EXPECTED_UNSUPPORTED = {
    ("rabbitmq", "redis"): set(),
    ("redis", "redis"): set(),
    ("rabbitmq", "postgresql"): set(),
    ("rabbitmq", "rpc"): {"states", "progress", "canvas", "workflow", "callbacks", "periodic",
                          "expires", "revoke"},
    ("sqs", "redis"): {"priority", "revoke", "inspect"},
    ("sqs", "file"): {"priority", "revoke", "inspect"},
    ("embedded", "file"): {"priority"},
}
URLS = {"rabbitmq": "amqp://", "redis": "redis://", "sqs": "sqs://", "embedded": "filesystem://",
        "postgresql": "db+postgresql+psycopg://", "rpc": "rpc://", "file": "file:///x"}


def unsupported_by_table(broker, backend, pool="prefork"):
    offers = stack.offers_for(URLS[broker], URLS[backend], pool)
    return {name for name in demos.DEMOS if demos.unsupported(name, offers)}


@pytest.mark.parametrize("pair", list(EXPECTED_UNSUPPORTED), ids="+".join)
def test_the_capability_table_still_says_what_was_measured(pair):
    assert unsupported_by_table(*pair) == EXPECTED_UNSUPPORTED[pair]


def test_in_process_workers_cannot_terminate_limit_time_share_results_nor_order_by_priority():
    offers = stack.offers_for("memory://", "cache+memory://", pool="threads")
    assert {n for n in demos.DEMOS if demos.unsupported(n, offers)} == {"priority"}
    assert "prefork" in stack.decide(("terminate",), offers)
    assert "prefork" in stack.decide(("time_limits",), offers)
    assert "one process" in stack.decide(("shared_results",), offers)


def test_a_feature_nobody_declared_is_refused_not_skipped():
    with pytest.raises(ValueError, match="unknown feature"):
        stack.decide(("chord",), stack.offers_for("amqp://", "redis://"))


# --- The catalogue on each combination, through run_demo.py ------------------------------------
def resources(pair, exits, tmp):
    """The environment of one run on throw-away resources, removed when ``exits`` closes."""
    broker, backend = pair
    if pair != SQS_ALONE:  # Redis and PostgreSQL are this machine's too; CI must run them all
        require_rabbit()
    env = {}
    if broker == "rabbitmq":
        env["CELERY_BROKER_URL"] = exits.enter_context(stack.throwaway_vhost())
    if "redis" in pair:  # results and broker keys under one prefix, deleted afterwards
        prefix = exits.enter_context(stack.throwaway_redis_prefix())
        env.update(CELERY_RESULT_KEYPREFIX=prefix, CELERY_BROKER_PREFIX=prefix)
    if backend == "postgresql":
        require_postgres()
        env["CELERY_RESULT_BACKEND"] = exits.enter_context(stack.throwaway_postgres_database())
    if broker == "sqs":  # a server of the test's own, so that the queues can be checked after
        server = stack.Processes(tmp / "sqs-server")
        exits.callback(server.stop_all)
        url = stack.start_local_sqs(server)
        # SQS queue names allow letters, digits, - and _ only (a pair's folder name has a +)
        env.update(CELERY_BROKER_URL=url,
                   CELERY_BROKER_PREFIX=f"celery-demo-{uuid.uuid4().hex[:6]}-")
    return env


class Runs:
    """One full run_demo.py per combination, made when a test first asks for it; the
    throw-away resources stay until the module ends (a test may look into them)."""

    def __init__(self, exits, tmp_path_factory):
        self.exits, self.tmp_path_factory, self.done = exits, tmp_path_factory, {}

    def __call__(self, pair):
        if pair not in self.done:
            tmp = self.tmp_path_factory.mktemp("+".join(pair))
            env = resources(pair, self.exits, tmp)
            run_dir, results = tmp / "run", tmp / "results.json"
            args = ["--broker", pair[0], "--backend", pair[1], "--run-dir", str(run_dir),
                    "--json", str(results)] + (["--flower"] if pair[0] == "sqs" else [])
            proc = start(args, clean_env(**env), cwd=tmp)
            output = finish(proc, timeout=240, run_dir=run_dir)
            left = alive_in_groups(run_dir, proc.pid)
            report = json.loads(results.read_text()) if results.exists() else {}
            self.done[pair] = (env, proc.returncode, report, output, left)
        return self.done[pair]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with ExitStack() as exits:
        yield Runs(exits, tmp_path_factory)


# SQS runs on a local server of the test's own (moto), so it needs no service of this machine:
# its results go to Redis, or, where this machine has no RabbitMQ + Redis (not on CI), to files
# as on the embedded stack, so that a machine without services still checks the SQS broker.
SQS_ALONE = ("sqs", "file")
SQS = SQS_ALONE if rabbit_problem() and not ON_CI else ("sqs", "redis")
PAIRS = [("redis", "redis"), ("rabbitmq", "postgresql"), ("rabbitmq", "rpc"), SQS]


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_every_demo_passes_or_is_unsupported_as_the_table_says(runs, pair):
    broker, backend = pair
    env, code, report, output, left = runs(pair)
    assert code == 0 and report["passed"], output[-5000:]
    assert left == [] and "nothing left running" in output and "Traceback" not in output
    assert report["stack"] == f"{broker} + {backend} results"
    offers = stack.offers_for(env.get("CELERY_BROKER_URL", URLS[broker]),
                              env.get("CELERY_RESULT_BACKEND", URLS[backend]))
    outcomes = {d["name"]: d for d in report["demos"]}
    assert list(outcomes) == list(demos.DEMOS)  # every demo is reported, none left out
    for name, outcome in outcomes.items():
        why = demos.unsupported(name, offers)
        assert (outcome["status"], outcome["detail"] if why else None) == \
            (("unsupported", why) if why else ("passed", None)), outcome
    unsupported = {name for name, o in outcomes.items() if o["status"] == "unsupported"}
    assert unsupported == EXPECTED_UNSUPPORTED[pair]
    total = len(demos.DEMOS)
    assert f"{total - len(unsupported)} passed, 0 failed, {len(unsupported)} unsupported" \
        in output
    priority = outcomes["priority"]
    if broker == "redis":  # 0 is the most urgent on Redis, 9 on RabbitMQ
        assert "then 1 of priority 0 (0 is the most urgent)" in priority["detail"]
    elif broker == "rabbitmq":
        assert "then 1 of priority 9 (higher number first)" in priority["detail"]


def test_postgresql_results_are_stored_in_postgresql(runs):
    import sqlalchemy
    env, code, _, output, _ = runs(("rabbitmq", "postgresql"))
    assert code == 0, output[-3000:]
    engine = sqlalchemy.create_engine(env["CELERY_RESULT_BACKEND"][3:],
                                      poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text(
            "SELECT name, status, count(*) FROM celery_taskmeta GROUP BY name, status")).all()
    engine.dispose()
    stored = {(name, status): n for name, status, n in rows}
    # result_extended stores each task's name with its result
    assert stored[("tasks.add", "SUCCESS")] >= 1, stored
    assert stored[("tasks.combine_results", "SUCCESS")] >= 2, stored  # the chords' callbacks
    assert stored[("tasks.important_task", "FAILURE")] == 1, stored
    revoked = sum(n for (_, status), n in stored.items() if status == "REVOKED")
    assert revoked == 3, stored  # expired, revoked while waiting, terminated while running


def test_sqs_has_no_flower_and_the_runs_queues_carry_its_prefix(runs):
    env, code, _, output, _ = runs(SQS)
    assert code == 0, output[-3000:]
    assert "Flower not started: Celery sends no worker events over SQS" in output
    assert "waiting for their ready line in their logs" in output  # no ping on SQS
    url, prefix = env["CELERY_BROKER_URL"], env["CELERY_BROKER_PREFIX"]
    names = sorted(queue.rsplit("/", 1)[1] for queue in stack.sqs_queues(url, prefix))
    assert names == sorted(prefix + q for q in celeryconfig.QUEUE_NAMES)
    assert stack.delete_sqs_queues(url, prefix) == len(celeryconfig.QUEUE_NAMES)
    assert stack.sqs_queues(url, prefix) == []


def test_run_demo_starts_and_stops_its_own_sqs_server(tmp_path):
    run_dir = tmp_path / "run"
    # file:// results: the test needs nothing but what run_demo starts itself (no Redis)
    proc = start(["--broker", "sqs", "--backend", "file", "--only", "basic,canvas",
                  "--run-dir", str(run_dir)],
                 clean_env(), cwd=tmp_path)
    output = finish(proc, timeout=120, run_dir=run_dir)
    assert proc.returncode == 0, output[-3000:]
    assert "a local SQS-compatible server (moto) at sqs://demo:**@127.0.0.1:" in output
    assert "sqs-server" in json.loads((run_dir / "pids.json").read_text())["processes"]
    assert alive_in_groups(run_dir, proc.pid) == []  # the server too
    assert "2 passed, 0 failed, 0 unsupported" in output


# --- A URL whose driver is not installed: one line naming the package, in seconds --------------
NO_BOTO3 = "raise ModuleNotFoundError(\"No module named 'boto3'\", name='boto3')\n"
COMMANDS = {
    "client_fixed.py": ["client_fixed.py"],
    "client.py": ["client.py"],
    "run_demo.py": ["run_demo.py", "--broker", "BROKER"],  # the configured URL of that kind
    "worker": ["-m", "celery", "-A", "tasks", "worker", "-l", "INFO"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("url, package", [
    ("db+mysql://alice:s3cret@127.0.0.1/results", "pip install mysqlclient"),
    ("sqs://alice:s3cret@127.0.0.1:1", "pip install boto3"),
], ids=["mysql-results", "sqs-without-boto3"])
def test_a_url_without_its_driver_gets_one_line_naming_the_package(command, url, package,
                                                                   tmp_path):
    sqs = stack.capabilities.is_kind(url, "sqs")
    env = clean_env(CELERY_BROKER_URL=url if sqs else stack.DEFAULT_BROKER,
                    CELERY_RESULT_BACKEND="rpc://" if sqs else url)
    if sqs:  # boto3 is installed here: hide it, as on a machine without it
        (tmp_path / "boto3.py").write_text(NO_BOTO3)
        env["PYTHONPATH"] = str(tmp_path)
    argv = [arg.replace("BROKER", "sqs" if sqs else "rabbitmq") for arg in COMMANDS[command]]
    if command == "run_demo.py":
        argv += ["--run-dir", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True,
                          timeout=60)  # a hang fails here, not a timed assertion
    output = done.stdout + done.stderr
    role = "broker" if sqs else "result backend"
    masked = url.replace("s3cret", "**")
    assert done.returncode in (1, 2), output
    assert f"the {role} {masked}" in " ".join(output.split())  # rich may wrap the line
    assert package in " ".join(output.split()), output
    assert "Traceback" not in output and "s3cret" not in output


def test_an_sqs_endpoint_that_does_not_answer_is_reported_in_seconds():
    done = subprocess.run([sys.executable, "client_fixed.py"], cwd=ROOT, stdin=subprocess.DEVNULL,
                          env=clean_env(CELERY_BROKER_URL="sqs://key:s3cret@127.0.0.1:1",
                                        CELERY_RESULT_BACKEND="rpc://"),
                          capture_output=True, text=True, timeout=60)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output
    assert "cannot reach the broker at sqs://key:**@127.0.0.1:1/" in output
    assert "python run_demo.py --broker sqs" in output and "Traceback" not in output
