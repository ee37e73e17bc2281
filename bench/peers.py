"""The peers: the same trivial job on Dramatiq, Huey and RQ, so the table can answer "is Celery
slow?" (``pip install -r requirements-bench.txt``; without them the peers are skipped with a note).

    dramatiq bench.peers ...                   # what measure_peer starts, with BENCH_PEER set
    huey_consumer bench.peers.huey ...
    rq worker ... (jobs named bench.peers.peer_noop)

Owns: each peer's worker command, how it enqueues the job, and how its progress is read. Each
runs one worker process that counts like Celery's noop() and writes its tally to a file now and
then and at the last job; the benchmark reads that file (the peers have no remote control).
Dramatiq runs on the run's broker (RabbitMQ vhost or Redis namespace); Huey and RQ only know
Redis, so they use the run's Redis.
"""
import itertools
import json
import os
import sys
import time

from stack.capabilities import is_kind

from .profiling import CpuMeter
from .run import bounded, deadline, wait_count
from .worker import _done, noop, write_tally


def cases(broker):
    """The peer cases for this broker (Case objects of bench.cases)."""
    from .cases import Case
    where = "Redis" if is_kind(broker, "redis") else "RabbitMQ"
    return [
        Case(f"dramatiq ({where})", "peer", send="dramatiq", quick=True,
             note="1 process x 1 thread, defaults (persistent, acks late)"),
        Case("huey (Redis)", "peer", send="huey", quick=True, note="1 thread worker"),
        Case("rq (Redis)", "peer", send="rq", share=0.1, quick=True,
             note="SimpleWorker (no fork per job)"),
    ]


def peer_noop():
    noop()
    count = int(_done[0])
    if count % 500 == 1 or count == int(os.environ.get("BENCH_PEER_COUNT", 0)):
        write_tally(os.environ["BENCH_TALLY"])


def peer_name():
    return os.environ["BENCH_QUEUE"] + "-peer"  # contains the run's token: easy to clean up


def redis_url():
    """The run's Redis: the broker when it is Redis, else the result backend."""
    broker = os.environ["CELERY_BROKER_URL"]
    return broker if is_kind(broker, "redis") else os.environ["CELERY_RESULT_BACKEND"]


def dramatiq_actor():
    import dramatiq
    broker = os.environ["CELERY_BROKER_URL"]
    if is_kind(broker, "redis"):
        from dramatiq.brokers.redis import RedisBroker
        dramatiq.set_broker(RedisBroker(url=broker, namespace=peer_name(),
                                        socket_connect_timeout=3, socket_timeout=30))
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
        dramatiq.set_broker(RabbitmqBroker(url=broker))
    return dramatiq.actor(peer_noop, actor_name="peer_noop", queue_name=peer_name())


def huey_app():
    from huey import RedisHuey
    return RedisHuey(peer_name(), url=redis_url(), results=False)


if os.environ.get("BENCH_PEER") == "dramatiq":  # `dramatiq bench.peers` imports this module
    peer_actor = dramatiq_actor()
elif os.environ.get("BENCH_PEER") == "huey":  # `huey_consumer bench.peers.huey`
    huey = huey_app()
    huey.task()(peer_noop)

PEER_WORKERS = {
    "dramatiq": ["-m", "dramatiq", "bench.peers", "--processes", "1", "--threads", "1"],
    "huey": ["-m", "huey.bin.huey_consumer", "bench.peers.huey", "-w", "1", "-k", "thread"],
    "rq": ["-m", "rq.cli", "worker", "--worker-class", "rq.worker.SimpleWorker", "--quiet"],
}


def peer_missing(name, broker, backend, vhost):
    """Why this peer cannot run here (None when it can)."""
    import importlib.util
    for module in {"dramatiq": ("dramatiq", "pika"), "huey": ("huey",), "rq": ("rq",)}[name]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements-bench.txt)"
    if name == "dramatiq" and not (vhost or is_kind(broker, "redis")):
        return "needs RabbitMQ with a throw-away vhost (rabbitmqctl) or Redis"
    if name != "dramatiq" and not (is_kind(broker, "redis")
                                   or is_kind(backend, "redis", "result backend")):
        return "needs Redis (--broker redis, or CELERY_RESULT_BACKEND=redis://...)"
    return None


def measure_peer(run, case, tag, count):
    name, tally = case.send, os.path.join(run.run_dir, f"{tag}.tally")
    env = {"BENCH_PEER": name, "BENCH_PEER_COUNT": str(count + 1), "BENCH_TALLY": tally}
    argv = [sys.executable, *PEER_WORKERS[name]]
    if name == "rq":
        argv += ["--url", redis_url(), "--name", peer_name(), peer_name()]
    procs = run.processes(env)
    run.start_process(procs, tag, argv)
    close = None
    try:
        with deadline(2 * run.timeout, f"case {case.name!r}") as renew:
            send, close = peer_sender(name)
            send(1)  # these workers tell nobody they are ready: wait for a first job instead
            wait_count(lambda: read_tally(tally), procs, 1, run.timeout, run.timeout,
                       f"{name}'s first job")
            renew(run.wait_for(count))  # sending; then each tally that grows renews it
            cpu = CpuMeter(procs.pids())
            started = time.time()
            send(count)
            done, last = wait_count(lambda: read_tally(tally), procs, count + 1,
                                    run.wait_for(count, rate=100), run.timeout,
                                    f"{count} {name} jobs done", interval=0.02, renew=renew)
        return {"rate": (done - 1) / (last - started) if done > 1 else 0.0, "sent": count,
                "completed": max(0, done - 1), "cpu_us": cpu.per_message(count)}
    finally:
        procs.stop_all(grace=10)  # never under a deadline: stopping must always run
        if close:
            bounded(close, 10, f"closing {name}'s connection")


def read_tally(path):
    try:
        with open(path) as f:
            return [json.load(f)]
    except (OSError, ValueError):  # not written yet
        return []


def peer_sender(name):
    """(send(count), close()) for a peer: its own way of enqueueing the same trivial job."""
    if name == "dramatiq":
        actor = dramatiq_actor()
        return (lambda count: [actor.send() for _ in range(count)]), actor.broker.close
    if name == "huey":
        task = huey_app().task()(peer_noop)  # the worker knows it as bench.peers.peer_noop
        return (lambda count: [task() for _ in range(count)]), lambda: None
    from redis import Redis
    from rq import Queue as RQueue
    queue = RQueue(peer_name(), connection=Redis.from_url(redis_url(), socket_timeout=30))
    ids = (f"{peer_name()}-{i}" for i in itertools.count())
    return ((lambda count: [queue.enqueue("bench.peers.peer_noop", result_ttl=0, job_id=next(ids))
                            for _ in range(count)]), queue.connection.close)
