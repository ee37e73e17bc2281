"""A RabbitMQ cluster with quorum queues, and a node lost mid-run (docs/cluster.md).

    sudo .venv/bin/python -m pytest tests/test_cluster.py -s    # -s prints what was measured

The hosts (network namespaces, stack/cluster.py) are built once for the module: three RabbitMQ
nodes joined by the chapter's own commands, Redis on ``results``, two workers consuming every
queue, beat. One test runs the benchmark's tuned case on it, with quorum queues and next to
one node with classic queues (bench/cluster.py, small counts). Each fault test loses one node
while 300 late-ack tasks are sent and run, then restores it (after a cut, with the chapter's
steps for a node that does not rejoin by itself), so the next test finds the full cluster
again; if it does not, the next fault tests fail at once, saying why. Without root or
namespaces the tests skip, saying why (on CI that is a failure).
"""
import json
import re
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from urllib.parse import unquote, urlparse

import pytest

import stack
from helpers import (ROOT, VENV, chapter_blocks, client_app, need_namespaces,
                     run_the_later_steps, set_up_by_the_chapter)
from stack import cluster as clusterlib
from stack import hosts as hostlib
from stack.brokerhost import client, rabbitmq_conf

CHAPTER = ROOT / "docs" / "cluster.md"
# The first test also waits for the cluster to be built. `serial` and `cluster`: `make test` runs
# this module after the parallel phase, beside only the three machine-wide serial tests (light,
# on the loopback RabbitMQ): three RabbitMQ nodes and the measured fault-to-consume times need
# the cores (on 2 cores beside the parallel phase, heartbeats and net_ticktime run late).
pytestmark = [pytest.mark.serial, pytest.mark.cluster, pytest.mark.timeout(600)]
TASKS = 300                 # late-ack tasks per fault
SEND_LIMIT = 15.0           # no send may block longer (seconds): it fails over, or fails in one
#                             line (stack/celery_gaps.py: sends_within_deadline)
CONSUME_AGAIN = 60.0        # every worker finishes a task sent after the fault within this


class Cluster:
    """The chapter's system, set up by its commands (see the fixture)."""

    def __init__(self, hosts, rabbit, env_block):
        self.hosts, self.rabbit, self.env_block = hosts, rabbit, env_block
        self.workers, self.nodes = {}, []  # (host, log name) -> process; worker node names
        self.said, self.later_steps = {}, []
        self.broken = None  # why the cluster is not whole after a test, if it is not

    def shell(self, host, script, timeout=240):
        """bash on ``host``: a node's host has its rabbitmqctl, the others the env block."""
        node = self.rabbit.nodes.get(host)
        env = {**node.rabbit_env(), **VENV} if node else dict(VENV)
        if node:
            env["PATH"] = f"{node.folder / 'bin'}:{env['PATH']}"
        return self.hosts.run(host, ["bash", "-ec", ("" if node else self.env_block) + script],
                              env=env, timeout=timeout)

    @contextmanager
    def client(self):
        with client(self.hosts, None, app=client_app(self.rabbit.env())) as app:
            yield app

    def queue_info(self, queue, via):
        """{column: value} of ``queue`` as the node on ``via`` lists it."""
        columns = ("name", "leader", "online", "consumers", "messages")
        out = self.rabbit.rabbitmqctl(via, "list_queues", "-p", self.rabbit.vhost, *columns)
        for line in out.splitlines():
            values = line.split("\t")
            if values[0] == queue:
                return dict(zip(columns, values))
        return {}

    def views(self):
        """{node host: (its running nodes, its partitions)} as each node answers (None: it did
        not answer)."""
        views = {}
        for host in clusterlib.NODE_HOSTS:
            try:
                status = json.loads(self.rabbit.rabbitmqctl(
                    host, "cluster_status", "--formatter", "json", timeout=20))
                views[host] = (sorted(status["running_nodes"]), status["partitions"])
            except Exception:  # a node that does not answer (yet) is not whole
                views[host] = None
        return views

    def wait_until_whole(self, timeout=120):
        """Until all three nodes run, with no partition, seen from every node. On timeout, the
        error says what each node saw, and the fault tests that follow fail at once (see
        require_whole) instead of waiting again."""
        every = sorted(f"rabbit@{h}" for h in clusterlib.NODE_HOSTS)
        def whole():
            return all(view == (every, {}) for view in self.views().values())
        started = time.monotonic()
        try:
            stack.eventually(whole, "the three nodes to run as one cluster again", timeout,
                             interval=2)
        except TimeoutError as exc:
            self.broken = f"{exc}; each node's view (running nodes, partitions): {self.views()}"
            raise AssertionError(self.broken) from None
        self.broken = None
        print(f"the cluster was whole {time.monotonic() - started:.1f}s after the heal")

    def require_whole(self):
        """Fail at once if an earlier test left the cluster broken (a fault test needs all three
        nodes), unless it has become whole since."""
        if self.broken:
            self.wait_until_whole(timeout=10)

    def logs(self):
        return "".join(f"--- end of {name}.log ---\n{stack.tail(path, 30)}\n"
                       for name, _, path in self.hosts.processes.started)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The hosts of docs/cluster.md, set up by its commands: the `run` blocks on the nodes
    before the first worker (join, user, vhost, policy), then every `background` block."""
    need_namespaces()
    blocks = chapter_blocks(CHAPTER.read_text())
    env_block = next(body for kind, _, _, body in blocks if kind == "env")
    first = urlparse(re.search(r"CELERY_BROKER_URL='([^';]+)", env_block).group(1))
    redis_password = re.search(r"redis://:([^@]+)@", env_block).group(1)
    hosts = hostlib.Hosts(clusterlib.HOST_NAMES, tmp_path_factory.mktemp("cluster"))
    with hosts:
        rabbit = clusterlib.start_cluster(hosts, unquote(first.username), unquote(first.password),
                                          unquote(first.path[1:]), redis_password)
        cluster = Cluster(hosts, rabbit, env_block)
        set_up_by_the_chapter(cluster, blocks, 90)
        yield cluster
    assert not hosts.leftovers(), f"namespaces left behind: {hosts.leftovers()}"
    assert not [h for h in hosts.hosts.values() if (clusterlib.NETNS_ETC / h.ns).exists()]


# --- The chapter, command by command ------------------------------------------------------------
def test_the_chapters_commands_build_a_cluster_of_quorum_queues_and_run_the_catalogue(
        cluster, logs_on_failure):
    said = run_the_later_steps(cluster)  # with the set-up blocks' output
    status = next(text for body, text in said.items() if "cluster_status" in body)
    running = status.split("Running Nodes")[1].split("Versions")[0]
    assert all(f"rabbit@{host}" in running for host in clusterlib.NODE_HOSTS), status
    listing = next(body for body in said if "list_queues" in body).splitlines()[0]
    def rows():
        out = cluster.shell("rabbit1", listing).stdout
        return {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()[1:]}
    first = rows()
    expected = {name: ["quorum", "3", "1" if name == "celery" else "2"]  # celery: worker1 only
                for name in ("celery", "fast_queue", "slow_queue", "network_queue",
                             "priority_queue")}
    def as_expected(found):
        return {name: [r[0], str(r[2].count("rabbit@")), r[3]] for name, r in found.items()
                if name in expected} == expected
    started = time.monotonic()
    stack.eventually(lambda: as_expected(rows()), "every queue quorum, on 3 nodes, consumed", 30)
    print(f"\nqueues as expected after {time.monotonic() - started:.1f}s; first listing: {first}")
    assert "critical" in next(text for body, text in said.items() if "quorum_critical" in body)
    out = "".join(said.values())
    summary = re.search(r"(\d+) passed, 0 failed, 1 unsupported", out)
    assert summary, out
    assert "quorum queues on RabbitMQ 3.x have no priorities" in " ".join(out.split())


def test_the_chapters_settings_are_the_ones_the_hosts_use(tmp_path):
    """What the harness writes for the hosts, for the addresses it gives them (made, not
    started: this compares text, so it needs no namespace and no RabbitMQ)."""
    blocks = chapter_blocks(CHAPTER.read_text())
    hosts = hostlib.Hosts(clusterlib.HOST_NAMES, tmp_path)
    conf = rabbitmq_conf(hosts["rabbit1"].address) + clusterlib.CLUSTER_CONF
    for _, _, lang, body in blocks:
        if lang == "ini":  # rabbit1's rabbitmq.conf
            assert all(line in conf.splitlines() for line in body.splitlines()), body
        if lang == "text" and body.startswith("10.251.0."):  # every host's /etc/hosts
            assert body == clusterlib.hosts_file(hosts)
    python = [body for _, _, lang, body in blocks if lang == "python"]
    repro = {}
    exec(python[0], repro)  # the upstream reproduction defines a quorum queue on a topic exchange
    queue = repro["app"].conf.task_queues[0]
    assert queue.queue_arguments == {"x-queue-type": "quorum"} and queue.exchange.type == "topic"
    assert ";" in repro["app"].conf.broker_url


def test_the_chapter_has_the_same_sections_and_code_in_both_languages():
    from helpers import structure
    en = CHAPTER.read_text(encoding="utf-8")
    zh = CHAPTER.with_name("cluster.zh-CN.md").read_text(encoding="utf-8")
    assert structure(en)[0] == structure(zh)[0], "different section structures"
    assert chapter_blocks(en) == chapter_blocks(zh), "code blocks or hosts markers differ"
    for readme, link in (("README.md", "docs/cluster.md"),
                         ("README.zh-CN.md", "docs/cluster.zh-CN.md")):
        assert f"]({link})" in (ROOT / readme).read_text(encoding="utf-8")


# --- Measured: tuned throughput, quorum queues on the cluster next to one classic node --------
def test_the_tuned_case_runs_on_one_node_with_classic_queues_and_on_the_quorum_cluster(cluster):
    """bench/cluster.py's comparison on this module's cluster, with a small count: both rows
    complete every task they sent (the figures of docs/cluster.md come from
    `benchmark.py --cluster`, with 10000 tasks a run)."""
    from bench import cluster as bench_cluster
    table, ratio = bench_cluster.compare(cluster.rabbit, count=300, repeat=1)
    bench_cluster.print_rows(table, ratio)
    assert [row["name"] for row in table] == ["one node, classic queues",
                                              "3-node cluster, quorum queues"]
    for row in table:
        assert row["completed"] == row["sent"] == 300 and not row["errors"], row
        assert 0 < row["median"] < 1e6, row
    assert ratio == round(table[1]["median"] / table[0]["median"], 2)
    listed = cluster.rabbit.rabbitmqctl("rabbit1", "list_queues", "-p", cluster.rabbit.vhost,
                                        "name")
    assert "bench-" not in listed, listed  # each run deleted its queues


# --- A node lost mid-run ------------------------------------------------------------------------
def succeeded_counts(cluster, since):
    """{task id: how often a worker logged it succeeded} in the worker logs after ``since``."""
    counts = Counter()
    for name, _, path in cluster.hosts.processes.started:
        if name.startswith("worker-"):
            with open(path, "rb") as log:
                log.seek(since.get(path, 0))
                text = log.read().decode(errors="replace")
            counts.update(re.findall(r"Task tasks\.slow_task\[([0-9a-f-]+)\] succeeded", text))
    return counts


def lose_a_node_mid_run(cluster, fault, heal, what):
    """Send TASKS late-ack tasks while they run; ``fault()`` after a third was sent, ``heal()``
    once everything is done. Returns the measurements; asserts the issue's promises.

    Each send names its task id, so that a send that failed (not accepted) but whose message
    the cluster enqueued anyway (its publisher confirm came too late) is seen when it runs:
    counted as an extra, not as a lost or an accepted task."""
    cluster.require_whole()
    logs = {path: path.stat().st_size for _, _, path in cluster.hosts.processes.started}
    sends, failures, failed_ids, results = [], [], [], []
    with cluster.client() as app:
        app.send_task("tasks.add", (0, 0)).get(timeout=30)  # connected before the clock starts
        fault_at = fault_wall = None
        try:
            for i in range(TASKS):
                if i == TASKS // 3:
                    fault()
                    fault_at, fault_wall, first_after = time.monotonic(), time.time(), len(results)
                task_id = str(uuid.uuid4())
                started = time.monotonic()
                try:
                    results.append(app.send_task("tasks.slow_task", (2, 0.2), task_id=task_id))
                    sends.append(time.monotonic() - started)
                except Exception as exc:  # a failed send is not an accepted task; said in one line
                    sends.append(time.monotonic() - started)  # the diagnosis is not the send's
                    failures.append(stack.service_fault(exc, app) or repr(exc))
                    failed_ids.append(task_id)
                time.sleep(0.1)  # slower than the workers: a task waits only while none consumes
            deadline = time.monotonic() + 180
            done = {}
            for r in results:
                done[r.id] = r.get(timeout=max(1.0, deadline - time.monotonic()))
            # consuming again: the first task sent after the fault that each worker finished
            finished = [app.AsyncResult(r.id) for r in results[first_after:]]
            again = {}
            for r in finished:
                if r.date_done:
                    again[r.worker] = min(again.get(r.worker, 1e9),
                                          r.date_done.timestamp() - fault_wall)
        finally:
            heal()
    counts = succeeded_counts(cluster, logs)
    accepted = {r.id for r in results}
    measured = {"fault": what, "sent": TASKS, "accepted": len(results), "failed_sends": failures,
                "done": len(done), "slowest_send": max(sends),
                # a task run more than once: its worker lost the node before its ack got there
                "duplicates": sum(n - 1 for i, n in counts.items() if n > 1 and i in accepted),
                # a send that failed, but the cluster had the message: it ran all the same
                "extras": sum(n for i, n in counts.items() if i in set(failed_ids)),
                "consuming_again": again, "run_seconds": time.monotonic() - fault_at}
    print(f"\n{what}: {measured}")
    assert len(done) == len(results) and all(v["steps"] == 2 for v in done.values())
    assert set(counts) <= accepted | set(failed_ids), "a task ran that nobody sent"
    assert all(line.startswith("the broker at amqp://celery:**@") and "s3cret" not in line
               for line in failures), failures  # one line, every password masked
    assert set(again) == set(cluster.nodes), f"a worker finished nothing after the fault: {again}"
    assert max(again.values()) <= CONSUME_AGAIN, measured
    assert measured["slowest_send"] <= SEND_LIMIT, measured
    return measured


def test_a_node_killed_mid_run_loses_no_task(cluster, logs_on_failure):
    cluster.require_whole()  # an earlier fault test may have left it broken
    victim = "rabbit1"  # every client's first node, and the leader of the queues it declared
    lose_a_node_mid_run(cluster, lambda: cluster.rabbit.kill(victim),
                        lambda: cluster.rabbit.start(victim),
                        f"{victim} killed (SIGKILL)")
    cluster.wait_until_whole()


def busiest_node(cluster):
    """The node most clients and workers are connected to."""
    out = cluster.rabbit.rabbitmqctl("rabbit1", "list_connections", "host")
    by_address = Counter(line.strip() for line in out.splitlines())
    return max(clusterlib.NODE_HOSTS, key=lambda h: by_address[cluster.hosts[h].address])


def cut_and_heal(cluster, host):
    """(fault, heal) for lose_a_node_mid_run: unplug ``host``'s cable; plug it back in, then
    what section 8 of the chapter tells an operator to do once the link is back. If the node
    has not rejoined within half a minute (it does in 1-7 s when it heals by itself): a node
    that does not answer is stuck in its start (`global:sync()`), and is restarted (its
    service, in the chapter; here the harness kills and starts it); a node that answers while
    a partition is still listed gets the chapter's `recover` block, run on it as written.
    Prints what it had to do."""
    def heal():
        cluster.hosts.restore(host)
        try:
            cluster.wait_until_whole(timeout=30)
            return
        except AssertionError as exc:
            print(f"\n{host} was cut off; half a minute after the heal: {exc}")
        if cluster.views()[host] is None:
            print(f"{host} does not answer (its start is stuck): restarting it, as the chapter "
                  f"says")
            cluster.rabbit.kill(host)
            cluster.rabbit.start(host)
            return
        recover = next(body for kind, _, _, body in chapter_blocks(CHAPTER.read_text())
                       if kind == "recover")
        done = cluster.shell(host, recover, timeout=120)
        print(f"the chapter's recover block on {host}: exit {done.returncode}")
    return (lambda: cluster.hosts.cut(host)), heal


def test_a_node_cut_off_mid_run_loses_no_task_and_the_workers_keep_consuming(
        cluster, logs_on_failure):
    cluster.require_whole()  # an earlier fault test may have left it broken
    victim = busiest_node(cluster)  # the node the client and the workers are connected to
    lose_a_node_mid_run(cluster, *cut_and_heal(cluster, victim), f"{victim} cut off (no FIN)")
    cluster.wait_until_whole()


def test_the_node_that_leads_the_queue_cut_off_mid_run_loses_no_task(cluster, logs_on_failure):
    cluster.require_whole()  # an earlier fault test may have left it broken
    leader = cluster.queue_info("slow_queue", "rabbit1")["leader"].split("@")[1]
    lose_a_node_mid_run(cluster, *cut_and_heal(cluster, leader),
                        f"{leader}, the leader of slow_queue, cut off (no FIN)")
    cluster.wait_until_whole()
    new_leader = cluster.queue_info("slow_queue", "rabbit1")["leader"]
    print(f"slow_queue's leader after the fault: {new_leader} (was rabbit@{leader})")
