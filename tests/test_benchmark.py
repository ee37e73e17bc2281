"""benchmark.py end to end on RabbitMQ, on Redis as the broker and on the embedded stack, with
every peer (Dramatiq, Huey, RQ) really running; and the pieces a reader of its table relies on.

    pytest tests/test_benchmark.py -q

No assertion on speed: the numbers belong to the machine. What is checked is that every case
completed every task it sent and produced sane numbers, that each target's verdict is the one
its measured number gives, that a broker that does not answer ends the run with a line naming
it, and that the run left nothing behind (vhost, Redis keys, queue messages, processes).
Counts are tiny: these runs prove the benchmark works, not how fast anything is.
"""
import json
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, environment, require_rabbit
import stack

KINDS = {"per_message", "batched", "peer"}
TINY = ["--quick", "--count", "100", "--samples", "20", "--timeout", "20"]
PEERS = {"dramatiq", "huey", "rq"}


def benchmark(*args, env=None, timeout=150):
    """Run `python benchmark.py ARGS` as a user would; return the finished process."""
    return subprocess.run([sys.executable, "benchmark.py", *args], cwd=ROOT,
                          env=environment(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)


def run_quick(tmp_path, *args, env=None):
    """`benchmark.py --quick` with tiny counts and --json; return the parsed JSON."""
    out = tmp_path / "bench.json"
    proc = benchmark(*TINY, "--json", str(out), *args, env=env)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Throughput" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def check_report(report):
    """Every case completed what it sent, with numbers that can be true, and each target's
    verdict follows from the number measured for it."""
    limit = report["broker_limit"]
    assert limit > 0 and report["errors"] == []
    assert {c["kind"] for c in report["cases"]} >= {"per_message", "batched"}
    assert {c["kind"] for c in report["cases"]} <= KINDS
    for case in report["broker"] + report["cases"]:
        assert case["sent"] > 0 and case["completed"] == case["sent"], case
        assert case["errors"] == [], case
        # rates: positive, ordered, and below a million a second (a trivial task, two cores)
        assert 0 < case["min"] <= case["median"] <= case["max"] < 1e6, case
        assert case["ratio"] == pytest.approx(case["median"] / limit, abs=1e-3)
        assert all(v >= 0 for v in case["cpu_us"].values()), case
    latency = report["latency"]
    assert latency and all(row["samples"] == report["settings"]["samples"] for row in latency)
    for row in latency:  # milliseconds: positive, ordered, below the --timeout of a round trip
        assert 0 < row["p50"] <= row["p95"] <= row["p99"] < report["settings"]["timeout"] * 1000
    assert report["latency_ms"]["p50"] == next(
        r["p50"] for r in latency if r["name"] == report["latency_ms"]["case"])
    assert report["cold_start"]
    for row in report["cold_start"]:  # seconds from launch to the first task done
        assert 0 < row["min"] <= row["median"] <= row["max"] < 2 * report["settings"]["timeout"]
    check_targets(report)


def check_targets(report):
    """Each target names a case of this run, carries that case's measured number, and is met
    exactly when that number reaches the goal."""
    cases = {c["name"]: c for c in report["cases"]}
    measured = {
        "tuned per-message >= 0.5x broker limit":
            lambda t: round(cases[t["case"]]["median"] / report["broker_limit"], 2),
        "batched items/s >= 5x broker limit":
            lambda t: round(cases[t["case"]]["median"] / report["broker_limit"], 2),
        "round trip p50 <= 2 ms": lambda t: next(
            r["p50"] for r in report["latency"] if r["name"] == t["case"]),
        "worker cold start <= 0.6 s": lambda t: report["cold_start_s"][t["case"]],
    }
    assert [t["target"] for t in report["targets"]] == list(measured)  # none left out
    for target in report["targets"]:
        assert target["value"] == pytest.approx(measured[target["target"]](target), abs=0.011)
        reached = target["value"] >= target["goal"] if target["direction"] == "at least" \
            else target["value"] <= target["goal"]
        if abs(target["value"] - target["goal"]) > 0.011:  # rounding aside
            assert target["met"] == reached, target


def check_peers(report, dramatiq_on):
    """Each peer ran the same job for real: it is in the table, every job done."""
    peers = {c["name"].split()[0]: c for c in report["cases"] if c["kind"] == "peer"}
    assert set(peers) == PEERS, report["notes"]
    assert f"dramatiq ({dramatiq_on})" in {c["name"] for c in peers.values()}
    for case in peers.values():
        assert case["completed"] == case["sent"] > 0 and case["median"] > 0, case


def assert_no_worker_left(report):
    """No process started by the benchmark survives it (pid reuse aside: check the command)."""
    for pid in report["cleanup"]["worker_pids"]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue  # gone, as it should be
        assert report["cleanup"]["token"] not in cmdline, cmdline
        assert "bench.worker" not in cmdline and "bench.peers" not in cmdline, cmdline


def assert_no_redis_key_left(token):
    import redis
    client = redis.Redis.from_url(stack.DEFAULT_BACKEND, socket_timeout=5)
    assert list(client.scan_iter(match=f"*{token}*", count=1000)) == []
    for registry in ("rq:workers", "rq:queues"):  # RQ registers its worker and queue here
        assert not [m for m in client.smembers(registry) if token.encode() in m], registry


def test_quick_on_rabbitmq_with_every_peer(tmp_path):
    require_rabbit()
    report = run_quick(tmp_path, "--broker", "rabbitmq")
    check_report(report)
    check_peers(report, dramatiq_on="RabbitMQ")
    assert report["machine"]["broker"].startswith("RabbitMQ")
    where = report["cleanup"]
    assert where["vhost"] and where["vhost"] not in stack.rabbitmqctl("list_vhosts").split()
    assert_no_redis_key_left(where["token"])
    assert_no_worker_left(report)


def test_quick_with_redis_as_the_broker(tmp_path):
    require_rabbit()  # the suite's one skip helper: Redis is part of what it checks
    report = run_quick(tmp_path, "--broker", "redis")
    check_report(report)
    check_peers(report, dramatiq_on="Redis")
    assert report["machine"]["broker"].startswith("Redis")
    assert report["settings"]["broker"] == "redis"
    where = report["cleanup"]
    assert where["vhost"] is None and where["broker_prefix"].startswith("celery-bench-")
    assert_no_redis_key_left(where["token"])  # the broker prefix holds the token too
    assert_no_worker_left(report)


def test_quick_on_the_embedded_filesystem_stack(tmp_path):
    report = run_quick(tmp_path, "--broker", "embedded")
    check_report(report)
    assert report["settings"]["broker"] == "filesystem"
    # peers need RabbitMQ or Redis: skipped with a note each, not run and not failed
    assert not [c for c in report["cases"] if c["kind"] == "peer"]
    assert sorted(n.split()[0] for n in report["notes"] if "skipped" in n) == sorted(PEERS)
    assert_no_worker_left(report)


def test_quick_on_a_local_sqs_server(tmp_path):
    """The run starts its own SQS server (moto) and stops it; results in files, so that this
    runs where there is no Redis. No remote control on SQS: the workers write their tallies."""
    (tmp_path / "results").mkdir()
    report = run_quick(tmp_path, "--broker", "sqs",
                       env={"CELERY_RESULT_BACKEND": f"file://{tmp_path / 'results'}"})
    check_report(report)
    assert report["settings"]["broker"] == "sqs"
    assert report["cleanup"]["broker_prefix"] == f"bench-{report['cleanup']['token']}-"
    assert sorted(n.split()[0] for n in report["notes"] if "skipped" in n) == sorted(PEERS)
    assert_no_worker_left(report)
    server = report["cleanup"]["sqs_server_pid"]
    assert server, "the run started its own SQS server"
    try:
        with open(f"/proc/{server}/cmdline", "rb") as f:
            assert b"moto" not in f.read(), "the SQS server still runs"
    except FileNotFoundError:
        pass  # gone, as it should be


def test_a_broker_that_does_not_answer_ends_the_run_naming_it():
    """A broker that accepts the connection and then says nothing: one line, exit code 2."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts; nobody ever answers
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}//"
        started = time.monotonic()
        proc = benchmark("--broker", "rabbitmq", "--quick", "--timeout", "5",
                         env={"CELERY_BROKER_URL": url}, timeout=60)
        seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reach the broker at amqp://guest:**@127.0.0.1:" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert seconds < 5 + 20, seconds  # its --timeout, with generous slack for start-up


def test_a_deadline_interrupts_a_blocked_socket_read_and_the_cleanup_after_it():
    """What ends a wait on a frozen broker: a read that never returns, and a clean-up on the
    way out that blocks too, both end once the deadline passed."""
    from bench.run import Stalled, deadline
    a, b = socket.socketpair()
    a.settimeout(10)  # if the deadline did not work: a failure in 10 s, not a hang
    started = time.monotonic()
    with a, b, pytest.raises(Stalled, match="reading from a frozen peer did not finish"):
        with deadline(0.3, "reading from a frozen peer"):
            try:
                a.recv(1)  # nothing is ever sent
            finally:
                a.recv(1)  # like kombu closing a channel: waits for an answer too
    assert time.monotonic() - started < 0.3 + 3
    time.sleep(1.2)  # the alarm is off once the block is left: nothing fires here


def test_targets_are_judged_on_the_measured_numbers():
    """A met and a missed target of each kind, from a report made up for the purpose."""
    from bench.report import evaluate

    def report(per_message, batched, p50, cold):
        case = {"kind": "per_message", "completed": 10}
        return {"broker_limit": 1000.0,
                "cases": [{**case, "name": "tuned", "median": per_message},
                          {**case, "name": "defaults", "median": 1.0},
                          {**case, "name": "failed", "median": 0.0, "completed": 0},
                          {**case, "kind": "batched", "name": "chunks", "median": batched}],
                "latency_ms": {"p50": p50, "case": "low latency"},
                "cold_start_s": {"lean": cold, "lean, app.Worker() without the celery command":
                                 0.01}}
    good = evaluate(report(600.0, 5100.0, 1.5, 0.5))
    assert [(t["case"], t["value"], t["met"]) for t in good] == [
        ("tuned", 0.6, True), ("chunks", 5.1, True), ("low latency", 1.5, True),
        ("lean", 0.5, True)]  # app.Worker() is shown, not judged
    bad = evaluate(report(400.0, 4900.0, 2.5, 0.7))
    assert [(t["value"], t["met"]) for t in bad] == [(0.4, False), (4.9, False), (2.5, False),
                                                     (0.7, False)]
    nothing = evaluate({"broker_limit": 0.0, "cases": [], "latency_ms": {}, "cold_start_s": {}})
    assert nothing == []  # nothing measured: no target claimed


def test_prebuilt_messages_are_what_apply_async_publishes(monkeypatch):
    """The "pre-built" cases publish copies of Celery's own message: check it is the same one."""
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://localhost/")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "cache+memory://")
    from celery.signals import before_task_publish
    from bench.cases import TUNED
    from bench.worker import make_app, template_message
    app = make_app(TUNED)
    sent = []

    def capture(headers=None, body=None, properties=None, **kwargs):
        sent.append((headers, body, properties))

    before_task_publish.connect(capture)
    try:
        app.tasks["bench.noop"].apply_async()
    finally:
        before_task_publish.disconnect(capture)
        app.close()
    headers, body, properties = sent[0]
    template = template_message(app)
    skip = {"id", "root_id"}  # a new id for every copy
    assert {k: v for k, v in template.headers.items() if k not in skip} == \
        {k: v for k, v in headers.items() if k not in skip}
    assert template.body == body
    assert template.properties["reply_to"] == properties["reply_to"]
