"""benchmark.py --quick, end to end, on RabbitMQ + Redis and on the embedded filesystem stack.

    pytest tests/test_benchmark.py -q

No assertion on speed: the numbers belong to the machine. What is checked is what a reader of
the table relies on: every case completed every task it sent, the JSON has the documented keys,
and the run left nothing behind (vhost, Redis keys, queue messages, worker processes).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require_rabbit
import stack

KINDS = {"per_message", "batched", "peer"}
SERVICE_VARS = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_RESULT_KEYPREFIX",
                "CELERY_FS_ROOT")


def run_quick(tmp_path, env, timeout=150):
    """Run `benchmark.py --quick --json FILE` as a user would; return the parsed JSON."""
    out = tmp_path / "bench.json"
    clean = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    proc = subprocess.run([sys.executable, "benchmark.py", "--quick", "--json", str(out)],
                          cwd=ROOT, env={**clean, **env}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Throughput" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def check_report(report):
    assert report["broker_limit"] > 0
    assert report["errors"] == []
    assert {c["kind"] for c in report["cases"]} >= {"per_message", "batched"}
    for case in report["broker"] + report["cases"]:
        assert {"name", "kind", "median", "ratio", "min", "max", "sent", "completed"} <= set(case)
        assert case["sent"] > 0 and case["completed"] == case["sent"], case
        assert case["median"] > 0 and case["ratio"] == pytest.approx(
            case["median"] / report["broker_limit"], abs=1e-3)
    assert {c["kind"] for c in report["cases"]} <= KINDS
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99"}
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= \
        report["latency_ms"]["p99"]
    assert report["cold_start_s"] and all(v > 0 for v in report["cold_start_s"].values())
    assert {t["target"] for t in report["targets"]}  # each target judged, met or not


def assert_no_worker_left(report):
    """No process started by the benchmark survives it (pid reuse aside: check the command)."""
    for pid in report["cleanup"]["worker_pids"]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue  # gone, as it should be
        assert report["cleanup"]["token"] not in cmdline and "benchmark" not in cmdline, cmdline


def test_quick_on_rabbitmq_and_redis(tmp_path):
    require_rabbit()
    report = run_quick(tmp_path, {"CELERY_BROKER_URL": stack.DEFAULT_BROKER,
                                  "CELERY_RESULT_BACKEND": stack.DEFAULT_BACKEND})
    check_report(report)
    assert report["machine"]["broker"].startswith("RabbitMQ")
    where = report["cleanup"]
    assert where["vhost"] and where["vhost"] not in stack.rabbitmqctl("list_vhosts").split()
    import redis
    client = redis.Redis.from_url(stack.DEFAULT_BACKEND, socket_timeout=5)
    assert list(client.scan_iter(match=f"*{where['token']}*", count=1000)) == []
    assert not [m for m in client.smembers("rq:workers") if where["token"].encode() in m]
    assert_no_worker_left(report)


def test_quick_on_the_embedded_filesystem_stack(tmp_path):
    env = stack.embedded_env(tmp_path)
    report = run_quick(tmp_path, env)
    check_report(report)
    assert report["settings"]["broker"] == "filesystem"
    # peers need RabbitMQ or Redis: skipped with a note, not run and not failed
    assert not [c for c in report["cases"] if c["kind"] == "peer"]
    assert any("skipped" in note for note in report["notes"])
    # every message was consumed: the queue folder holds nothing of this run
    leftovers = [p.name for p in (tmp_path / "embedded" / "messages").iterdir()
                 if report["cleanup"]["queue"] in p.name]
    assert leftovers == []
    assert_no_worker_left(report)


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
