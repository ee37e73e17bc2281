"""The Redis result backend without a single point (docs/cluster.md, section 10): a primary, a
replica and three sentinels, all `redis-server` processes on free loopback ports, configured by
the chapter's own blocks; a real worker stores results while the primary is killed mid-run.

    CI=true python -m pytest tests/test_sentinel.py -s
"""
import gc
import re
import shutil
import signal
import socket
import threading
import time

import redis

import stack
from helpers import (ROOT, chapter_blocks, client_app, skip,
                     start_worker, without_comments)

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


def test_results_survive_losing_the_redis_primary_mid_run(stack_env, tmp_path):
    if not shutil.which("redis-server"):
        skip("redis-server is not installed (apt-get install redis-server)")
    redis_conf, sentinel_conf, env = chapter()
    backend = env["CELERY_RESULT_BACKEND"]
    master = env["CELERY_RESULT_SENTINEL_MASTER"]
    password = re.search(r"sentinel://:([^@]+)@", backend).group(1)
    primary_port, replica_port, *sentinel_ports = free_ports(5)
    hosts = iter(sentinel_ports)
    backend = re.sub(r"10\.251\.0\.\d+:26379", lambda _: f"127.0.0.1:{next(hosts)}", backend)
    env = {**stack_env, "CELERY_RESULT_BACKEND": backend,
           "CELERY_RESULT_SENTINEL_MASTER": master}
    env.pop("CELERY_RESULT_KEYPREFIX", None)  # these Redis servers are the test's own
    # The chapter's lines say which is the replica (replicaof): the primary has the others
    replica_lines = on_loopback(redis_conf, primary_port)
    primary_lines = [line for line in replica_lines if not line.startswith("replicaof")]
    assert len(primary_lines) == len(replica_lines) - 1, redis_conf
    procs = stack.Processes(tmp_path / "run", env)
    sent = []  # AsyncResults: each unsubscribes from Redis when collected
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
        start_worker(procs, "sentinel", "celery", "-c", "4")
        stack.eventually(lambda: sentinels_ready(sentinel_ports, master),
                         "three sentinels that know each other and the replica", 20,
                         ignore=redis.RedisError)
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
                primary.send_signal(signal.SIGKILL)  # by PID: the primary this test started
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
        assert answers(replica_port, password).info("replication")["role"] == "master"
        assert all(meta["result"] == {"slept": 0.05} for meta in done.values())
    except BaseException:
        for name, _, path in procs.started:
            print(f"--- end of {name}.log ---\n{stack.tail(path, 25)}")
        raise
    finally:
        sent.clear()  # collected while Redis is there, not at exit, when it is gone
        gc.collect()
        procs.stop_all(grace=5)
