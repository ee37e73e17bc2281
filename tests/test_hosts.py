"""More machines: the client, each queue's worker and the broker on different hosts.

    sudo .venv/bin/python -m pytest tests/test_hosts.py -s    # -s prints what each test measured

The hosts are Linux network namespaces on this machine (stack/hosts.py), started once for the
module: ``broker`` runs its own RabbitMQ and Redis on its address, ``client`` runs the demos,
``worker1`` .. ``worker5`` a worker each (worker3 and worker5 both consume slow_queue; beat runs
on worker1). A host "vanishes" when its cable is unplugged at the switch: no FIN, no RST.
Without root or namespaces the tests skip, saying why (on CI that is a failure).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import unquote, urlparse

import pytest

import celeryconfig
import demos
import stack
from helpers import (ROOT, VENV, chapter_blocks, need_namespaces, run_the_later_steps,
                     set_up_by_the_chapter, structure)
from stack import hosts as hostlib
from stack.brokerhost import (HOST_NAMES, client, client_env, rabbitmq_conf, redis_conf,
                              start_broker_host)

CHAPTER = ROOT / "docs" / "more-machines.md"
class Cluster:
    """The chapter's system, set up by the chapter's own commands (see ``cluster``)."""

    def __init__(self, hosts, broker, env_block):
        self.hosts, self.broker, self.env_block = hosts, broker, env_block
        self.workers, self.nodes = {}, []  # (host, log name) -> process; worker node names
        self.said, self.later_steps = {}, []  # set-up blocks' output; (host, body) run later

    def client(self):
        return client(self.hosts, self.broker)

    def shell(self, host, script, timeout=240):
        """bash on ``host``: the broker host has its rabbitmqctl, the others the env block."""
        on_broker = host == self.broker.host
        env = {**self.broker.rabbit_env(), **VENV} if on_broker else dict(VENV)
        if on_broker:  # this node's rabbitmqctl comes first
            env["PATH"] = f"{self.broker.folder / 'bin'}:{env['PATH']}"
        prefix = "" if on_broker else self.env_block
        return self.hosts.run(host, ["bash", "-ec", prefix + script], env=env, timeout=timeout)

    def run_demos(self, *args, env=None, timeout=240):
        """client_fixed.py on the client host; returns (exit code, its --json report, output)."""
        report = self.hosts.run_dir / f"demos-{time.monotonic_ns()}.json"
        done = self.hosts.run("client", [sys.executable, "client_fixed.py", "--json",
                                         str(report), *args],
                              env={**client_env(self.hosts, self.broker), **(env or {})},
                              timeout=timeout)
        data = json.loads(report.read_text()) if report.exists() else {}
        failed = [f"{d['name']}: {d['detail']}" for d in data.get("demos", []) if not d["ok"]]
        return done.returncode, data, "\n".join(failed) or done.stdout + done.stderr

    def queue_counts(self, name):
        out = self.broker.rabbitmqctl("list_queues", "-p", self.broker.vhost, "name", "messages",
                                      "messages_unacknowledged")
        return [line.split("\t")[1:] for line in out.splitlines() if line.split("\t")[0] == name]

    def logs(self):
        return "".join(f"--- end of {name}.log ---\n{stack.tail(path, 30)}\n"
                       for name, _, path in self.hosts.processes.started)


def chapter_redis_password():
    """The password of the chapter's redis.conf, which the broker host is given."""
    return re.search(r"^requirepass (\S+)$", CHAPTER.read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The hosts of docs/more-machines.md, set up by its commands: the broker host's user and
    vhost (its `run broker` blocks before the first worker), then every `background` block:
    the workers, beat and Flower. The chapter's other `run` blocks are test_the_chapter_...'s."""
    need_namespaces()
    blocks = chapter_blocks(CHAPTER.read_text())
    env_block = next(body for kind, _, _, body in blocks if kind == "env")
    url = urlparse(re.search(r"CELERY_BROKER_URL='([^']+)'", env_block).group(1))
    hosts = hostlib.Hosts(HOST_NAMES, tmp_path_factory.mktemp("hosts"))
    with hosts:
        broker = start_broker_host(hosts, user=None, redis_password=chapter_redis_password())
        broker.user, broker.password = unquote(url.username), unquote(url.password)
        broker.vhost = unquote(url.path[1:])
        cluster = Cluster(hosts, broker, env_block)
        set_up_by_the_chapter(cluster, blocks, 60)
        yield cluster
    assert not hosts.leftovers(), f"namespaces left behind: {hosts.leftovers()}"


# --- The chapter, command by command ------------------------------------------------------------
def test_the_chapters_commands_run_the_catalogue_across_hosts(cluster, logs_on_failure):
    """Every demo passes with the client, each queue's worker and the broker on different
    hosts: the chapter's `run` blocks after the set-up, client_fixed.py among them."""
    said = run_the_later_steps(cluster)  # with the set-up blocks' output
    out = "".join(said.values())
    for node in cluster.nodes:  # Flower and `inspect ping` see every host's worker
        assert f"'{node}'" in out and f"{node}: OK" in out, out
    summary = re.search(r"(\d+) passed, 0 failed", out)
    assert summary and int(summary.group(1)) == len(demos.DEMOS), out
    # Each queue's worker answered from its own host, named by %h
    assert "(fast@worker2)" in out and "(default@worker1)" in out, out  # the routing demo
    clock = next(text for body, text in said.items() if "TIME" in body).split()
    assert abs(int(clock[0]) - int(clock[1])) <= 2, f"clocks differ: {clock}"
    listening = next(text for body, text in said.items() if body.startswith("ss "))
    assert sorted(line.split()[3] for line in listening.splitlines()) == \
        [f"{cluster.broker.address}:5672", f"{cluster.broker.address}:6379"], listening


def test_the_chapters_settings_are_the_ones_the_hosts_and_celeryconfig_use(tmp_path):
    """What the harness writes for the broker host, for the addresses it gives the hosts
    (made, not started: this compares text, so it needs no namespace)."""
    blocks = chapter_blocks(CHAPTER.read_text())
    ini = [body for _, _, lang, body in blocks if lang == "ini"]
    python = [body for _, _, lang, body in blocks if lang == "python"]
    address = hostlib.Hosts(HOST_NAMES, tmp_path)["broker"].address
    password = chapter_redis_password()
    used = rabbitmq_conf(address).splitlines() + redis_conf(address, password, "/x").splitlines()
    for body in ini:  # the lines of rabbitmq.conf and redis.conf are the broker host's
        for line in body.splitlines():
            assert line in used, f"the chapter says {line!r}, the broker host does not"
    vanish = {}
    exec(python[0], vanish)  # the settings for hosts that vanish are celeryconfig's
    for name, value in vanish.items():
        assert name.startswith("__") or getattr(celeryconfig, name) == value, name
    from celery.app.defaults import DEFAULTS
    tls = {}
    exec(python[1], tls)  # valid Python, and every name a Celery setting
    settings = {k for k in tls if not k.startswith("_") and k != "ssl"}
    assert settings == {"broker_url", "broker_use_ssl", "result_backend",
                        "redis_backend_use_ssl"} and settings <= set(DEFAULTS)
    assert tls["broker_url"].startswith("amqps://") and tls["result_backend"].startswith("rediss:")
    # Every bash block runs on a host, except the harness's own command (the SIGTERM test's)
    unmarked = [body for kind, _, lang, body in blocks if lang == "bash" and not kind]
    assert unmarked == ["sudo .venv/bin/python -m stack.hosts\n"], unmarked


def test_the_broker_host_refuses_redis_without_its_password(cluster):
    no_password = cluster.hosts.run("client", ["redis-cli", "-h", cluster.broker.address,
                                               "ping"]).stdout
    assert "NOAUTH" in no_password


def test_guest_from_another_host_is_refused_and_the_client_says_how_to_fix_it(cluster):
    guest = f"amqp://guest:guest@{cluster.broker.address}:5672//"
    code, _, output = cluster.run_demos(env={"CELERY_BROKER_URL": guest}, timeout=60)
    said = " ".join(output.split())  # rich wraps long lines
    assert code == 2, output
    shown = next(body for _, _, lang, body in chapter_blocks(CHAPTER.read_text()) if lang == "text")
    assert shown.split("...")[0].strip() in said, "the chapter shows another message"
    assert "refused the login of 'guest' (ACCESS_REFUSED)" in said
    assert "guest log in only from the broker's own machine (localhost)" in said
    assert "rabbitmqctl add_user celery PASSWORD" in said
    assert "rabbitmqctl set_permissions -p celery-demo celery '.*' '.*' '.*'" in said


def test_the_retry_demo_reaches_the_flaky_server_from_a_worker_on_another_host(cluster):
    code, report, output = cluster.run_demos("--only", "retry")
    assert code == 0 and report["passed"], output
    # The default, 127.0.0.1, is the worker host's own loopback: the worker cannot call back
    code, report, output = cluster.run_demos(
        "--only", "retry", env={"DEMO_HTTP_HOST": "127.0.0.1", "DEMO_HTTP_BIND": "127.0.0.1"})
    assert code == 1 and not report["passed"], output
    detail = report["demos"][0]["detail"]  # the task's own failure, not blamed on the broker
    assert "the task failed in the worker: ConnectionError" in detail, detail
    assert "stopped answering" not in detail, detail


# --- A worker host vanishes in the middle of a late-ack task -------------------------------------
def test_a_vanished_worker_hosts_late_ack_tasks_finish_on_another_host_and_it_rejoins(
        cluster, logs_on_failure):
    slow_nodes = [node for node in cluster.nodes if node.startswith("slow@")]
    assert len(slow_nodes) == 2, "the chapter has two hosts for slow_queue"
    with cluster.client() as app:
        results = [app.send_task("tasks.slow_task", (8, 0.5)) for _ in range(4)]
        stack.eventually(lambda: results[0].state == "PROGRESS", "the first slow_task to start",
                         20, interval=0.05)
        running = app.control.inspect(timeout=1.0).active() or {}
        victim = next(node for node, tasks in running.items()
                      if any(t["id"] == results[0].id for t in tasks))
        victim_host = victim.split("@")[1]
        cluster.hosts.cut(victim_host)
        cut_at = time.monotonic()
        try:
            values = [r.get(timeout=max(1.0, 60 - (time.monotonic() - cut_at)))
                      for r in results]
            taken_over_in = time.monotonic() - cut_at
            assert all(v["steps"] == 8 for v in values)
            assert results[0].worker != victim and results[0].worker in slow_nodes
            assert stack.eventually(lambda: cluster.queue_counts("slow_queue") == [["0", "0"]],
                                    "slow_queue to be empty (nothing ready or unacked)", 10)
        finally:
            cluster.hosts.restore(victim_host)
        restored_at = time.monotonic()
        stack.wait_for_workers(app, [victim], 60)
        rejoined_in = time.monotonic() - restored_at
        assert all(process.poll() is None for (host, _), process in cluster.workers.items()
                   if host == victim_host), "the worker exited"
        time.sleep(2)  # the victim's own late-ack clean-up must not overwrite the results
        assert all(r.state == "SUCCESS" and r.worker != victim for r in results)
    print(f"\nvanished worker host {victim_host}: sent=4 completed=4, all done on "
          f"{results[0].worker} {taken_over_in:.1f}s after the cut; rejoined (ping) "
          f"{rejoined_in:.1f}s after the link came back")


# --- The broker host vanishes for 20 s ------------------------------------------------------------
def test_workers_and_beat_reconnect_by_themselves_after_the_broker_host_is_cut_for_20s(
        cluster, logs_on_failure):
    hosts = cluster.hosts
    logs = [path for _, _, path in hosts.processes.started]
    sizes = {path: path.stat().st_size for path in logs}
    with hosts.outage("broker"):
        time.sleep(20)
    restored_at = time.monotonic()
    with cluster.client() as app:
        stack.wait_for_workers(app, cluster.nodes, 90)
    reconnected_in = time.monotonic() - restored_at
    assert not hosts.processes.exited(), hosts.processes.exited()
    code, report, output = cluster.run_demos()
    assert code == 0 and report["passed"], output  # periodic included: beat sends again
    def since_the_cut(path):
        with open(path, "rb") as log:
            log.seek(sizes.get(path, 0))
            return log.read().decode(errors="replace")
    lost = sum(since_the_cut(path).count("Connection to broker lost") for path in logs)
    print(f"\nbroker host cut for 20s: every worker answered {reconnected_in:.1f}s after the "
          f"link came back ({lost} consumer connections re-established); "
          f"{len(report['demos'])} demos passed again in {report['seconds']:.1f}s")


# --- Nothing is left behind -----------------------------------------------------------------------
def test_python_m_stack_hosts_leaves_nothing_behind_on_sigterm(tmp_path):
    """The chapter's `python -m stack.hosts`, with --keep-running, ended by SIGTERM: every
    namespace and process it made is gone."""
    need_namespaces()
    run_dir = tmp_path / "run"
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stack.hosts", "--keep-running", "--only",
                             "basic", "--run-dir", str(run_dir)], cwd=stack.HERE, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        stack.eventually(lambda: b"the hosts keep running" in (tmp_path / "out.log").read_bytes(),
                         "python -m stack.hosts to run the demo", 120, interval=0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "out.log").read_text()
    assert "every namespace, link and process removed" in out, out
    prefix = f"{hostlib.PREFIX}-{proc.pid}-"
    assert not [ns for ns in hostlib.namespaces() if ns.startswith(prefix)]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(run_dir) not in ps, ps


def test_the_chapter_has_the_same_sections_and_code_in_both_languages():
    en = CHAPTER.read_text(encoding="utf-8")
    zh = CHAPTER.with_name("more-machines.zh-CN.md").read_text(encoding="utf-8")
    assert structure(en)[0] == structure(zh)[0], "different section structures"
    assert chapter_blocks(en) == chapter_blocks(zh), "code blocks or hosts markers differ"
    assert "more-machines.zh-CN.md" in en and "(more-machines.md)" in zh
    for readme, link in (("README.md", "docs/more-machines.md"),
                         ("README.zh-CN.md", "docs/more-machines.zh-CN.md")):
        assert f"]({link})" in (ROOT / readme).read_text(encoding="utf-8")


def test_the_harness_says_it_needs_root_and_exits(monkeypatch, capsys):
    monkeypatch.setattr(hostlib.os, "geteuid", lambda: 1000)  # as a user who is not root
    assert hostlib.main(["--only", "basic"]) == 2
    said = capsys.readouterr().err
    assert "the multi-host harness needs root" in said and "sudo .venv/bin/python -m stack.hosts" \
        in said
