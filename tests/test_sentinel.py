"""The Redis result backend without a single point (docs/cluster.md, section 10): a primary, a
replica and three sentinels, all `redis-server` processes on free loopback ports, configured by
the chapter's own blocks; a real worker stores results while the primary is killed mid-run. And
what the user reads when the sentinels are not there: the start-up check (stack.check_backend,
a worker's) and the diagnosis of a group that died mid-run (stack.service_fault), each naming
Redis Sentinel and its `redis-cli ... sentinel get-master-addr-by-name` check.

    CI=true python -m pytest tests/test_sentinel.py -s
"""
import gc
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
import redis

import stack
from helpers import (CLIENT_DEADLINE, ROOT, chapter_blocks, client_app, fault_of,
                     print_logs_if_failed, skip, start_worker, without_comments,
                     worker_until_exit)

CHAPTER = ROOT / "docs" / "cluster.md"
TASKS, KILL_AFTER = 100, 30   # the primary is killed once this many tasks were sent
PRIMARY = re.compile(r"10\.251\.0\.14 6379")  # where the chapter's results host is named


def chapter():
    """(redis.conf lines, sentinel.conf lines, environment) of the chapter's section 10."""
    section = CHAPTER.read_text().split("## 10.", 1)[1].split("\n## ", 1)[0]
    blocks = [body for _, _, _, body in chapter_blocks(section)]
    redis_conf, sentinel_conf, exports = (without_comments(b).splitlines() for b in blocks)
    env = dict(re.fullmatch(r"export (\w+)='?(.*?)'?", line).groups() for line in exports)
    return redis_conf, sentinel_conf, env


def free_ports(count):
    """``count`` ports nothing listens on now (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def on_loopback(lines, primary_port):
    """The chapter's lines with its results host replaced by the primary on this machine."""
    return [PRIMARY.sub(f"127.0.0.1 {primary_port}", line) for line in lines]


def start_redis(procs, name, port, lines, *extra):
    """redis-server NAME.conf on 127.0.0.1:PORT in its own folder (a sentinel rewrites its file)."""
    folder = procs.run_dir / name
    folder.mkdir()
    conf = folder / f"{name}.conf"
    # Local to the test: this port, loopback only, nothing written to disk but the config, and
    # the replica's first sync at once (the default waits 5 s for more replicas to come)
    conf.write_text("\n".join([*lines, f"port {port}", "bind 127.0.0.1", f"dir {folder}",
                               'save ""', "appendonly no", "repl-diskless-sync-delay 0"]) + "\n")
    return procs.start(name, ["redis-server", str(conf), *extra])


def answers(port, password=None):
    return redis.Redis(port=port, password=password, socket_timeout=1, socket_connect_timeout=1)


def sentinels_ready(ports, master):
    """True once every sentinel knows the replica and the two other sentinels: before that a
    failover could not be agreed on."""
    for port in ports:
        state = answers(port).sentinel_master(master)
        if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
            return False
    return True


@pytest.fixture
def group(request, tmp_path):
    """The chapter's group on loopback, ready for a failover: the primary, its replica in sync
    and three sentinels that know it and each other. SimpleNamespace(backend (the chapter's
    sentinel:// URLs, pointing at these sentinels), master, password, primary (its Popen),
    replica_port, sentinel_ports, procs)."""
    if not shutil.which("redis-server"):
        skip("redis-server is not installed (apt-get install redis-server)")
    redis_conf, sentinel_conf, env = chapter()
    backend, master = env["CELERY_RESULT_BACKEND"], env["CELERY_RESULT_SENTINEL_MASTER"]
    password = re.search(r"sentinel://:([^@]+)@", backend).group(1)
    primary_port, replica_port, *sentinel_ports = free_ports(5)
    hosts = iter(sentinel_ports)
    backend = re.sub(r"10\.251\.0\.\d+:26379", lambda _: f"127.0.0.1:{next(hosts)}", backend)
    # The chapter's lines say which is the replica (replicaof): the primary has the others
    replica_lines = on_loopback(redis_conf, primary_port)
    primary_lines = [line for line in replica_lines if not line.startswith("replicaof")]
    assert len(primary_lines) == len(replica_lines) - 1, redis_conf
    procs = stack.Processes(tmp_path / "group")
    failed_before = request.session.testsfailed
    try:
        primary = start_redis(procs, "primary", primary_port, primary_lines)
        start_redis(procs, "replica", replica_port, replica_lines)
        # Sentinels learn of the replica from the primary's INFO: start them once it is there
        stack.eventually(lambda: answers(replica_port, password).info("replication")
                         ["master_link_status"] == "up", "the replica in sync", 15,
                         ignore=redis.RedisError)
        for n, port in enumerate(sentinel_ports):
            start_redis(procs, f"sentinel{n}", port,
                        [re.sub(r"^port \d+$", "", line)
                         for line in on_loopback(sentinel_conf, primary_port)], "--sentinel")
        stack.eventually(lambda: sentinels_ready(sentinel_ports, master),
                         "three sentinels that know each other and the replica", 20,
                         ignore=redis.RedisError)
        yield SimpleNamespace(backend=backend, master=master, password=password,
                              primary=primary, replica_port=replica_port,
                              sentinel_ports=sentinel_ports, procs=procs)
    finally:
        print_logs_if_failed(request, failed_before, procs, 25)
        procs.stop_all(grace=5)


def test_results_survive_losing_the_redis_primary_mid_run(stack_env, group, tmp_path):
    env = {**stack_env, "CELERY_RESULT_BACKEND": group.backend,
           "CELERY_RESULT_SENTINEL_MASTER": group.master}
    env.pop("CELERY_RESULT_KEYPREFIX", None)  # these Redis servers are the test's own
    procs = stack.Processes(tmp_path / "run", env)
    sent = []  # AsyncResults: each unsubscribes from Redis when collected
    try:
        start_worker(procs, "sentinel", "celery", "-c", "4")
        app = client_app(env)
        stack.wait_for_workers(app, [f"sentinel@{socket.gethostname()}"], 30, procs)

        killed_at, longest_send, readable = None, 0.0, []
        key = app.backend.get_key_for_task

        def read_again():
            """When the client's Redis connection (Celery's, found through the sentinels)
            reads a result again: every 0.1 s, without Celery's own retries and their pauses."""
            stack.eventually(lambda: app.backend.client.get(key(sent[0].id)),
                             "a result read after the kill", 30, interval=0.1,
                             ignore=redis.RedisError)
            readable.append(time.monotonic())
        watcher = threading.Thread(target=read_again, daemon=True)
        for i in range(TASKS):
            started = time.monotonic()
            sent.append(app.send_task("tasks.take_time", (0.05,)))
            longest_send = max(longest_send, time.monotonic() - started)
            if i + 1 == KILL_AFTER:
                group.primary.send_signal(signal.SIGKILL)  # by PID: the test's own primary
                killed_at = time.monotonic()
                watcher.start()
            time.sleep(0.02)

        # Read every result back through Celery's backend, as a client does, from right after
        # the last send: a read waits (and retries) while the primary is gone
        done = {}

        def all_done():
            for result in [r for r in sent if r.id not in done]:
                meta = app.backend.get_task_meta(result.id)
                if meta["status"] == "SUCCESS":
                    done[result.id] = meta
            return len(done) == len(sent)
        stack.eventually(all_done, f"all {TASKS} results read back", 40, interval=0.5,
                         ignore=(redis.RedisError, OSError))
        watcher.join(timeout=30)
        assert readable, "no result read through the sentinels after the kill"
        print(f"\nprimary killed after {KILL_AFTER}/{TASKS} sends; results readable again "
              f"{readable[0] - killed_at:.1f} s after the kill; all {len(done)} read back "
              f"{time.monotonic() - killed_at:.1f} s after it; longest send {longest_send:.1f} s")
        assert answers(group.replica_port, group.password).info("replication")["role"] == \
            "master"
        assert all(meta["result"] == {"slept": 0.05} for meta in done.values())
    except BaseException:
        for name, _, path in procs.started:
            print(f"--- end of {name}.log ---\n{stack.tail(path, 25)}")
        raise
    finally:
        sent.clear()  # collected while Redis is there, not at exit, when it is gone
        gc.collect()
        procs.stop_all(grace=5)


def nowhere(count=3):
    """sentinel:// URLs of ``count`` sentinels that are not there (free ports), each with a
    password of its own, and their ports."""
    ports = free_ports(count)
    return ";".join(f"sentinel://:s3cret-{n}@127.0.0.1:{port}/0"
                    for n, port in enumerate(ports)), ports


def test_the_start_up_check_names_redis_sentinel_when_no_sentinel_answers():
    backend, ports = nowhere()
    started = time.monotonic()
    with pytest.raises(stack.ServiceUnavailable) as failed:
        stack.check_backend(backend, master="results")
    took, message = time.monotonic() - started, str(failed.value)
    assert took < 5, f"the check took {took:.1f} s"
    assert "\n" not in message, message
    masked = ";".join(f"sentinel://:**@127.0.0.1:{port}/0" for port in ports)
    assert message.startswith(f"cannot reach the result backend at {masked} "), message
    assert (f"check Redis Sentinel with `redis-cli -h 127.0.0.1 -p {ports[0]} sentinel "
            f"get-master-addr-by-name results`") in message
    assert "s3cret" not in message


def test_a_worker_without_its_sentinels_exits_at_once_naming_redis_sentinel(stack_env, tmp_path):
    backend, ports = nowhere()
    env = {**stack_env, "CELERY_RESULT_BACKEND": backend, "CELERY_RESULT_SENTINEL_MASTER": "results"}
    code, exited_in, log = worker_until_exit(tmp_path, env, "nosentinels")
    assert code != 0
    assert exited_in < 20, f"exited after {exited_in:.1f}s"
    assert f"cannot reach the result backend at {stack.mask(backend)} " in log
    assert f"`redis-cli -h 127.0.0.1 -p {ports[0]} sentinel get-master-addr-by-name results`" \
        in log
    assert "s3cret" not in log


def test_the_start_up_check_passes_with_the_running_group(group):
    stack.check_backend(group.backend, master=group.master)  # raises if not
    with pytest.raises(stack.ServiceUnavailable, match="get-master-addr-by-name elsewhere"):
        stack.check_backend(group.backend, master="elsewhere")  # a name nobody monitors


def test_a_killed_sentinel_group_is_named_with_redis_cli_sentinel(group):
    app = client_app({"CELERY_BROKER_URL": "memory://", "CELERY_RESULT_BACKEND": group.backend,
                      "CELERY_RESULT_SENTINEL_MASTER": group.master})
    results = app.backend  # the client's: app.backend is one per thread
    results.get_task_meta(str(uuid.uuid4()))  # connected to the primary the sentinels named
    for _, proc, _ in group.procs.started:  # the whole group, by PID: the test's own
        proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    message = fault_of(app, lambda: results.get_task_meta(str(uuid.uuid4())),
                       within=CLIENT_DEADLINE)
    print(f"\nthe group killed: the read failed {time.monotonic() - killed_at:.1f} s later; "
          f"{message}")
    assert message.startswith(f"the result backend (Redis Sentinel) at "
                              f"{stack.mask(group.backend)} stopped answering"), message
    assert (f"check it with `redis-cli -h 127.0.0.1 -p {group.sentinel_ports[0]} sentinel "
            f"get-master-addr-by-name {group.master}`") in message
    assert group.password not in message and "rabbitmq-diagnostics" not in message


def test_the_check_reads_the_first_url_of_a_list_and_the_apps_master_name():
    backend = "sentinel://:a@10.0.0.1:26380/0;sentinel://:b@10.0.0.2:26381/0"
    sentinel = stack.capabilities.component(backend, stack.capabilities.BACKENDS)
    assert sentinel.system == "Redis Sentinel"
    master = stack.capabilities.sentinel_master({"master_name": "results"})
    assert sentinel.how_to_check(backend, master=master) == \
        "`redis-cli -h 10.0.0.1 -p 26380 sentinel get-master-addr-by-name results`"
