"""Measure Celery on this machine next to the broker's own limit: the numbers behind the tuning.

    python benchmark.py --quick                       # the main cases once, small counts (< 1 min)
    python benchmark.py --repeat 3 --json bench-results.json  # the table of docs/performance.md (9 minutes)
    python benchmark.py --embedded --quick            # the pure-Python filesystem stack, no servers
    python benchmark.py --profile                     # where a tuned worker's time goes (cProfile)
    python benchmark.py --only 'tuned|broker'         # a subset (a regular expression on names)

It runs against the configured broker and result backend (celeryconfig: RabbitMQ + Redis unless
CELERY_BROKER_URL / CELERY_RESULT_BACKEND say otherwise), on a throw-away vhost and Redis key
prefix, or on uniquely named queues when rabbitmqctl is not usable, and removes them afterwards.

What it measures, round after round so that a noisy neighbour slows every case alike:
  broker     raw kombu publish + consume of the same Celery message, no Celery: the limit
  per_message  one trivial task per message, first send to last completion, for the demo's
             defaults and for a tuned configuration with one knob at a time set back
  batched    the same trivial work sent with ``chunks`` (items per second)
  peer       the same trivial work on Dramatiq / Huey / RQ, when requirements-bench.txt is installed
  latency    ``add.delay(2, 2).get(timeout=...)`` one at a time: p50 / p95 / p99
  cold start launch of a worker process to its first task done

This module is also the workers' app: every case starts ``celery -A benchmark worker`` with the
case's settings in an environment variable, so the benchmark's tasks never reach the demo's
workers. Completion is measured without a result per task: the task counts itself in memory
shared with prefork children, and the benchmark asks the workers for that count with a remote
control command (``bench_progress``). A final marker task would not do: with several pool slots
or workers the marker can finish while earlier tasks are still queued elsewhere.
"""
import json
import multiprocessing
import os
import sys
import time
from contextlib import contextmanager

from celery import Celery
from celery.worker.control import inspect_command
from kombu import Exchange, Queue

# --- The benchmark's app: `celery -A benchmark worker` imports this --------------------------
# Completed count, first and last completion time: shared memory, so prefork children (forked
# after this import) all count into the same place.
_done = multiprocessing.RawArray("d", 3)
_done_lock = multiprocessing.Lock()


def noop(*args):
    """The trivial task: records its completion and does nothing else."""
    now = time.time()
    with _done_lock:
        if not _done[0]:
            _done[1] = now
        _done[0] += 1
        _done[2] = now


def add(x, y):
    return x + y


def stamp():
    """When the task ran, by the worker's clock: cold start is launch to this moment."""
    return time.time()


@inspect_command()
def bench_progress(state):
    """How many bench tasks this worker completed, and when the first and last one ended."""
    return {"count": int(_done[0]), "first": _done[1], "last": _done[2]}


def make_app(settings=None):
    """The demo's configuration (celeryconfig) with a case's settings on top.

    Two settings are the benchmark's own: ``queue_priority`` (declare the queue with
    x-max-priority, as the demo declares its queues) and ``publisher_confirms`` (False turns
    off the RabbitMQ publisher confirms that celeryconfig asks for).
    """
    settings = dict(settings or {})
    priority = settings.pop("queue_priority", True)
    confirms = settings.pop("publisher_confirms", True)
    name = os.environ.get("BENCH_QUEUE", "bench")
    app = Celery("benchmark")
    app.config_from_object("celeryconfig")
    arguments = {"x-max-priority": app.conf.task_queue_max_priority} if priority else None
    app.conf.update(
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name,
                           queue_arguments=arguments)],
        task_default_queue=name, task_default_exchange=name, task_default_routing_key=name,
        task_routes={}, task_annotations=None, beat_schedule={}, **settings)
    if not confirms and "confirm_publish" in (app.conf.broker_transport_options or {}):
        app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                             "confirm_publish": False}
    # shared=False: other apps in the same process (tests) do not get these tasks
    app.task(name="bench.noop", shared=False)(noop)
    app.task(name="bench.add", shared=False)(add)
    app.task(name="bench.stamp", shared=False, ignore_result=False)(stamp)  # cold start
    return app


app = make_app(json.loads(os.environ.get("BENCH_SETTINGS") or "{}"))


# --- The cases ---------------------------------------------------------------------------------
# Every knob that makes one tiny task cheaper. Each "tuned + ..." case sets one of them back,
# so the table shows what that knob is worth on its own.
TUNED = {
    "task_ignore_result": True,          # no result write per task
    "worker_prefetch_multiplier": 64,    # the broker keeps 64 messages in flight to the worker
    "task_default_delivery_mode": 1,     # transient: RabbitMQ need not write the message to disk
    "worker_send_task_events": False,    # three event messages fewer per task (Flower sees nothing)
    "task_send_sent_event": False,
    "task_track_started": False,         # no STARTED write to the result backend
    "worker_disable_rate_limits": True,  # skip the rate-limit bookkeeping per message
    "queue_priority": False,             # a plain queue: x-max-priority queues are slower
    "publisher_confirms": False,         # publish without waiting for RabbitMQ's confirmation
}
LEAN = ("--without-mingle", "--without-gossip", "--without-heartbeat")
DEMO_WORKER = dict(pool="prefork", concurrency=None, loglevel="INFO", flags=())
TUNED_WORKER = dict(pool="solo", concurrency=1, loglevel="WARNING", flags=LEAN)


class Case:
    """One line of the table: what to send, to which workers, with which settings."""

    def __init__(self, name, kind, settings=None, send="prebuilt", share=1.0, workers=1,
                 note="", quick=False, **worker):
        self.name, self.kind, self.send, self.share, self.quick = name, kind, send, share, quick
        self.settings, self.workers, self.note = dict(settings or {}), workers, note
        self.worker = {**TUNED_WORKER, **worker}

    def count(self, base):
        return max(10, int(base * self.share))


def tuned(name, note="", settings=None, **kwargs):
    return Case(name, "per_message", {**TUNED, **(settings or {})}, note=note, **kwargs)


def all_cases(broker, backend):
    results = backend.split(":", 1)[0]
    return [
        Case("broker: raw kombu, transient", "broker", TUNED, send="raw", quick=True,
             note="same message, publish + consume at once, ack per message"),
        Case("broker: raw kombu, persistent", "broker",
             {**TUNED, "task_default_delivery_mode": 2}, send="raw"),
        Case("defaults (demo celeryconfig)", "per_message", {}, send="delay", share=0.25,
             note=f"prefork, prefetch 1, results in {results}, events, -l INFO, delay()",
             quick=True, **DEMO_WORKER),
        Case("defaults, results ignored", "per_message", {"task_ignore_result": True},
             send="delay", share=0.25, **DEMO_WORKER),
        tuned("tuned", "solo, prefetch 64, no results/events, transient, -l WARNING; "
                       "pre-built messages", quick=True),
        tuned("tuned, apply_async()", "the same worker; the client calls apply_async",
              send="apply_async"),
        tuned(f"tuned + results in {results}", settings={"task_ignore_result": False},
              quick=True),
        tuned("tuned + prefork x2", pool="prefork", concurrency=2),
        tuned("tuned + threads x4", pool="threads", concurrency=4),
        tuned("tuned + prefetch 1", settings={"worker_prefetch_multiplier": 1}, share=0.25,
              note="a broker round trip per message"),
        tuned("tuned + prefetch 4", settings={"worker_prefetch_multiplier": 4}),
        tuned("tuned + persistent", settings={"task_default_delivery_mode": 2}),
        tuned("tuned + -l INFO", loglevel="INFO"),
        tuned("tuned + priority queue", settings={"queue_priority": True}),
        *([tuned("tuned + publisher confirms", settings={"publisher_confirms": True})]
          if broker.startswith(("amqp", "pyamqp")) else []),
        tuned("tuned, 2 worker processes", workers=2),
        Case("chunks of 100", "batched", TUNED, send="chunks:100", share=5, quick=True,
             note="noop.chunks(items, 100): one message per 100 items"),
        Case("chunks of 1000", "batched", TUNED, send="chunks:1000", share=5),
        Case("dramatiq (RabbitMQ)", "peer", send="dramatiq", quick=True,
             note="1 process x 1 thread, defaults (persistent, acks late)"),
        Case("huey (Redis)", "peer", send="huey", quick=True, note="1 thread worker"),
        Case("rq (Redis)", "peer", send="rq", share=0.1, quick=True,
             note="SimpleWorker (no fork per job)"),
    ]


LATENCY_CASES = [
    Case("defaults", "latency", {}, quick=True, **DEMO_WORKER),
    Case("low latency", "latency",
         {**TUNED, "task_ignore_result": False, "result_extended": False,
          "worker_prefetch_multiplier": 1},
         note="solo, no events/STARTED, -l WARNING, results in the backend", quick=True),
]
COLD_START_CASES = [
    Case("defaults", "cold", {}, quick=True, **DEMO_WORKER),
    Case("without mingle/gossip", "cold", {},
         **{**DEMO_WORKER, "flags": ("--without-mingle", "--without-gossip")}),
    Case("lean (solo, no mingle/gossip/heartbeat)", "cold", TUNED, quick=True),
    Case("lean, app.Worker() without the celery command", "cold", TUNED, cli=False),
]


# --- Running workers and sending tasks -------------------------------------------------------
class Run:
    """Where and how this benchmark run works: queue, environment, run folder, processes."""

    def __init__(self, queue, token, run_dir, deadline_factor=1.0):
        import socket
        self.queue, self.token, self.run_dir = queue, token, run_dir
        self.host = socket.gethostname()
        self.worker_pids = []
        self.deadline_factor = deadline_factor  # the filesystem stack is far slower

    def use_queue(self, tag):
        """Give each case its own queue: nothing one case leaves behind can count for another."""
        os.environ["BENCH_QUEUE"] = f"{self.queue}-{tag}"  # make_app() and the workers read it
        return os.environ["BENCH_QUEUE"]

    def start(self, case, tag, profile=None):
        """Start the case's worker processes; return (Processes, node names)."""
        import stack
        env = {"BENCH_SETTINGS": json.dumps(case.settings)}
        procs = stack.Processes(self.run_dir, env=env)
        names = []
        for i in range(case.workers):
            name = f"{self.token}-{tag}-{i}@{self.host}"
            w = case.worker
            options = ["-Q", os.environ["BENCH_QUEUE"], "-n", name, "-l", w["loglevel"],
                       "-P", w["pool"], *w["flags"],
                       *(["-c", str(w["concurrency"])] if w["concurrency"] else [])]
            if w.get("cli", True):
                argv = [sys.executable, "-m", "celery", "-A", "benchmark", "worker", *options]
            else:  # app.Worker() directly: the celery command imports every CLI plugin first
                argv = [sys.executable, __file__, "--worker", *options]
            if profile:  # the same worker under cProfile, which writes its stats on exit
                argv[1:1] = ["-m", "cProfile", "-o", profile]
            self.worker_pids.append(procs.start(f"{tag}-{i}", argv).pid)
            names.append(name)
        return procs, names

    def wait_ready(self, app, names, procs, timeout=30):
        deadline = time.monotonic() + timeout * self.deadline_factor
        while time.monotonic() < deadline:
            if len(progress(app, names, timeout=0.5)) == len(names):
                return
            check_alive(procs)
        raise TimeoutError(f"workers not ready after {timeout}s: {', '.join(names)}")

    def stop(self, app, names, procs):
        # Ask first: a worker without heartbeat takes up to 10 s to notice a SIGTERM.
        try:
            app.control.shutdown(destination=names)
            for _, proc, _ in procs.started:
                proc.wait(timeout=10)  # a profiled worker writes its stats while exiting
        except Exception:  # the broker may be the problem; SIGTERM and SIGKILL follow anyway
            pass
        procs.stop_all(grace=10)


def check_alive(procs):
    import stack
    for name, proc, log in procs.started:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{stack.tail(log)}")


def progress(app, names, timeout=1.0):
    """{node: {"count", "first", "last"}} from every worker that answered within timeout."""
    replies = app.control.broadcast("bench_progress", reply=True, destination=names,
                                    limit=len(names), timeout=timeout) or []
    return {node: value for reply in replies for node, value in reply.items()}


def wait_done(app, names, procs, expected, timeout):
    """Poll the workers' counts until ``expected`` tasks completed or the deadline passed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = progress(app, names)
        count = sum(v["count"] for v in seen.values())
        if count >= expected or time.monotonic() > deadline:
            return count, max((v["last"] for v in seen.values()), default=0.0)
        check_alive(procs)
        time.sleep(0.05)


def bench_queue(app):
    return app.amqp.queues[app.conf.task_default_queue]


def template_message(app):
    """The message ``noop.apply_async()`` would publish, built once by Celery itself."""
    task = app.tasks["bench.noop"]
    return app.amqp.create_task_message(
        "template", task.name, (), {}, reply_to=app.thread_oid,
        create_sent_event=False, ignore_result=task.ignore_result)


def publisher(connection, queue, message, delivery_mode):
    """Return publish(count): copies of one Celery message through plain kombu, each a new id.

    No routing, signals or serialization per message: what is left is the broker round of one
    message, the same for the raw broker measurement and for Celery's pre-built messages.
    """
    from kombu import Producer
    from kombu.serialization import dumps
    from kombu.utils.uuid import uuid
    content_type, encoding, body = dumps(message.body, "json")
    channel = connection.default_channel
    queue(channel).declare()  # the filesystem transport routes by what this process declared
    producer = Producer(channel)

    def publish(count):
        for _ in range(count):
            task_id = uuid()
            producer.publish(body, exchange=queue.exchange.name, routing_key=queue.routing_key,
                             headers={**message.headers, "id": task_id, "root_id": task_id},
                             content_type=content_type, content_encoding=encoding,
                             delivery_mode=delivery_mode, correlation_id=task_id,
                             reply_to=message.properties["reply_to"])
    return publish


@contextmanager
def sender(app, how):
    """Yield send(count), which sends noop tasks the way a case says, connections already open."""
    noop_task = app.tasks["bench.noop"]
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        if how == "apply_async":  # one producer held for the whole loop
            yield lambda count: [noop_task.apply_async(producer=producer) for _ in range(count)]
        elif how == "prebuilt":
            publish = publisher(producer.connection, bench_queue(app), template_message(app),
                                app.conf.task_default_delivery_mode)
            yield publish
        elif how.startswith("chunks:"):
            size = int(how.split(":")[1])
            yield lambda count: noop_task.chunks(((i,) for i in range(count)), size).apply_async(
                producer=producer)
        elif how != "delay":
            raise ValueError(how)
    if how == "delay":  # what most code does: a producer from the pool for every call
        yield lambda count: [noop_task.delay() for _ in range(count)]


# --- CPU time per process group: where the time goes, robust to a noisy machine --------------
def processes():
    """(pid, process group, name, start time, CPU seconds incl. reaped children) of each process."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, _, rest = f.read().rpartition(")")
            except OSError:
                continue  # it exited meanwhile
            fields = rest.split()
            yield (int(entry), int(fields[2]), head.partition("(")[2], int(fields[19]),
                   sum(int(x) for x in fields[11:15]) / tick)


def servers():
    """Pids of RabbitMQ and Redis on this machine: the oldest process of each name (rabbitmqctl
    runs a short-lived Erlang VM with the same name as the server's)."""
    oldest = {}
    for pid, _, name, started, _ in processes():
        if name in ("beam.smp", "redis-server") and started < oldest.get(name, (0, 1e18))[1]:
            oldest[name] = (pid, started)
    return {pid for pid, _ in oldest.values()}


def cpu_seconds(pgids=(), pids=()):
    return sum(cpu for pid, group, _, _, cpu in processes() if group in pgids or pid in pids)


class CpuMeter:
    """CPU time per message of this process, the workers (by process group) and the servers."""

    def __init__(self, pgids):
        import resource
        self._self = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        self.pgids, self.servers = set(pgids), servers()
        self.start = (self._self(), cpu_seconds(self.pgids), cpu_seconds(pids=self.servers))

    def per_message(self, count):
        """Microseconds of CPU per message for the client, the workers and the servers."""
        now = (self._self(), cpu_seconds(self.pgids), cpu_seconds(pids=self.servers))
        return {k: round((b - a) * 1e6 / max(count, 1))
                for k, a, b in zip(("client", "workers", "servers"), self.start, now)}


# --- Measurements --------------------------------------------------------------------------------
def measure(run, case, tag, base_count, profile=None):
    """One throughput run of a case: {"rate", "sent", "completed", "cpu_us"}."""
    count = case.count(base_count)
    run.use_queue(tag)
    if case.kind == "broker":
        return measure_raw(run, case, tag, count, profile)
    if case.kind == "peer":
        return measure_peer(run, case, tag, count)
    bench_app = make_app(case.settings)
    procs, names = run.start(case, tag, profile)
    try:
        run.wait_ready(bench_app, names, procs)
        with sender(bench_app, case.send) as send:
            cpu = CpuMeter(procs.pids())
            started = time.time()
            send(count)
            done, last = wait_done(bench_app, names, procs, count,
                                   timeout=(30 + count / 50) * run.deadline_factor)
        result = {"rate": done / (last - started) if done else 0.0, "sent": count,
                  "completed": done, "cpu_us": cpu.per_message(count)}
    finally:
        run.stop(bench_app, names, procs)
        left = remove_queue(bench_app)
        bench_app.close()
    if left:  # a message run twice, or one that never ran, would show here
        result["error"] = f"{left} messages left in the queue"
    return result


def measure_raw(run, case, tag, count, profile=None):
    """The broker's limit: plain kombu, one publisher (this process) and one consumer process."""
    import stack
    bench_app = make_app(case.settings)
    out = os.path.join(run.run_dir, f"{tag}.json")
    procs = stack.Processes(run.run_dir, env={"BENCH_SETTINGS": json.dumps(case.settings)})
    argv = [sys.executable, __file__, "--raw-consumer", out, "--count", str(count)]
    if profile:
        argv[1:1] = ["-m", "cProfile", "-o", profile]
    run.worker_pids.append(procs.start(tag, argv).pid)
    try:
        deadline = time.monotonic() + 30 * run.deadline_factor
        while not os.path.exists(out + ".ready"):
            check_alive(procs)
            if time.monotonic() > deadline:
                raise TimeoutError("the raw consumer did not start")
            time.sleep(0.02)
        with bench_app.connection_for_write() as connection:
            publish = publisher(connection, bench_queue(bench_app), template_message(bench_app),
                                bench_app.conf.task_default_delivery_mode)
            cpu = CpuMeter(())
            started = time.time()
            publish(count)
            deadline = time.monotonic() + (30 + count / 200) * run.deadline_factor
            procs.started[0][1].wait(timeout=max(1, deadline - time.monotonic()))
            cpu_us = cpu.per_message(count)
        with open(out) as f:
            result = json.load(f)
        done = result["count"]
        # the consumer measured its own CPU time: it has exited by now
        cpu_us["workers"] = round(result["cpu"] * 1e6 / count)
        return {"rate": done / (result["last"] - started) if done else 0.0, "sent": count,
                "completed": done, "cpu_us": cpu_us}
    finally:
        procs.stop_all(grace=5)
        remove_queue(bench_app)
        bench_app.close()


def raw_consumer(out, count):
    """Consume ``count`` messages from the benchmark queue with plain kombu; write when done."""
    import socket
    from kombu import Consumer
    queue = bench_queue(app)
    prefetch = app.conf.worker_prefetch_multiplier * TUNED_WORKER["concurrency"]
    state = {"count": 0, "first": 0.0, "last": 0.0}

    def on_message(message):
        message.decode()  # what any consumer must do with a task message
        message.ack()     # and what Celery does for each message, even with acks early
        now = time.time()
        state["first"] = state["first"] or now
        state["count"] += 1
        state["last"] = now

    # Celery's settings only say where and how to connect (URL, transport, options)
    with app.connection_for_read() as connection:
        channel = connection.channel()
        channel.basic_qos(0, prefetch, False)
        with Consumer(channel, [queue], on_message=on_message):
            open(out + ".ready", "w").close()
            cpu = sum(os.times()[:2])
            deadline = time.monotonic() + 60 + count / 100
            while state["count"] < count and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=1)
                except socket.timeout:
                    pass
            state["cpu"] = sum(os.times()[:2]) - cpu
    with open(out, "w") as f:
        json.dump(state, f)


def measure_latency(run, case, tag, samples):
    """Round trips of add.delay(2, 2).get(timeout=...), one at a time, in milliseconds."""
    run.use_queue(tag)
    bench_app = make_app(case.settings)
    procs, names = run.start(case, tag)
    add_task = bench_app.tasks["bench.add"]
    try:
        run.wait_ready(bench_app, names, procs)
        times = []
        for i in range(samples + 20):  # the first 20 warm up connections and caches
            started = time.perf_counter()
            # interval only matters for polling backends (file://); Redis pushes the result
            if add_task.delay(2, 2).get(timeout=10 * run.deadline_factor, interval=0.01) != 4:
                raise AssertionError("add(2, 2) did not return 4")
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        run.stop(bench_app, names, procs)
        remove_queue(bench_app)
        bench_app.close()


def measure_cold_start(run, case, tag):
    """Seconds from launching a worker to the end of its first task (already queued)."""
    run.use_queue(tag)
    bench_app = make_app(case.settings)
    with bench_app.connection_for_write() as connection:
        bench_queue(bench_app)(connection.default_channel).declare()
    result = bench_app.tasks["bench.stamp"].delay()
    launched = time.time()
    procs, names = run.start(case, tag)
    try:
        return result.get(timeout=60 * run.deadline_factor, interval=0.01) - launched
    finally:
        run.stop(bench_app, names, procs)
        remove_queue(bench_app)
        bench_app.close()


# --- Peers: the same trivial work on Dramatiq, Huey and RQ (pip install -r requirements-bench.txt)
# Each runs one worker process that counts like noop() and writes its tally to a file now and
# then and at the last task, which the benchmark reads: no control commands to ask them.
def peer_noop():
    noop()
    count = int(_done[0])
    if count % 500 == 1 or count == int(os.environ.get("BENCH_PEER_COUNT", 0)):
        tally = os.environ["BENCH_TALLY"]
        with open(tally + ".tmp", "w") as f:
            json.dump({"count": count, "first": _done[1], "last": _done[2]}, f)
        os.replace(tally + ".tmp", tally)


def peer_name():
    return os.environ["BENCH_QUEUE"] + "-peer"  # contains the run's token: easy to clean up


def dramatiq_actor():
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    dramatiq.set_broker(RabbitmqBroker(url=os.environ["CELERY_BROKER_URL"]))
    return dramatiq.actor(peer_noop, actor_name="peer_noop", queue_name=peer_name())


def huey_app():
    from huey import RedisHuey
    return RedisHuey(peer_name(), url=os.environ["CELERY_RESULT_BACKEND"], results=False)


if os.environ.get("BENCH_PEER") == "dramatiq":  # `dramatiq benchmark` imports this module
    peer_actor = dramatiq_actor()
elif os.environ.get("BENCH_PEER") == "huey":  # `huey_consumer benchmark.huey`
    huey = huey_app()
    huey.task()(peer_noop)

PEER_WORKERS = {
    "dramatiq": ["-m", "dramatiq", "benchmark", "--processes", "1", "--threads", "1"],
    "huey": ["-m", "huey.bin.huey_consumer", "benchmark.huey", "-w", "1", "-k", "thread"],
    "rq": ["-m", "rq.cli", "worker", "--worker-class", "rq.worker.SimpleWorker", "--quiet"],
}


def peer_missing(name, broker, backend, vhost):
    import importlib.util
    for module in {"dramatiq": ("dramatiq", "pika"), "huey": ("huey",), "rq": ("rq",)}[name]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements-bench.txt)"
    if name == "dramatiq" and not vhost:
        return "needs RabbitMQ with a throw-away vhost (rabbitmqctl)"
    if name != "dramatiq" and not backend.startswith("redis://"):
        return "needs Redis (CELERY_RESULT_BACKEND=redis://...)"
    return None


def measure_peer(run, case, tag, count):
    import stack
    name, tally = case.send, os.path.join(run.run_dir, f"{tag}.tally")
    env = {"BENCH_PEER": name, "BENCH_PEER_COUNT": str(count + 1), "BENCH_TALLY": tally}
    argv = [sys.executable, *PEER_WORKERS[name]]
    if name == "rq":
        argv += ["--url", os.environ["CELERY_RESULT_BACKEND"], "--name", peer_name(), peer_name()]
    procs = stack.Processes(run.run_dir, env=env)
    run.worker_pids.append(procs.start(tag, argv).pid)
    send, close = peer_sender(name)
    try:
        send(1)  # these workers tell nobody they are ready: wait for a first job instead
        wait_tally(tally, 1, procs, 30 * run.deadline_factor)
        cpu = CpuMeter(procs.pids())
        started = time.time()
        send(count)
        done = wait_tally(tally, count + 1, procs, (30 + count / 100) * run.deadline_factor)
        return {"rate": (done["count"] - 1) / (done["last"] - started) if done["count"] > 1
                else 0.0, "sent": count, "completed": max(0, done["count"] - 1),
                "cpu_us": cpu.per_message(count)}
    finally:
        procs.stop_all(grace=10)
        close()


def wait_tally(path, expected, procs, timeout):
    deadline = time.monotonic() + timeout
    done = {"count": 0, "last": 0.0}
    while done["count"] < expected and time.monotonic() < deadline:
        check_alive(procs)
        time.sleep(0.02)
        try:
            with open(path) as f:
                done = json.load(f)
        except (OSError, ValueError):
            pass
    return done


def peer_sender(name):
    """(send(count), close()) for a peer: its own way of enqueueing the same trivial job."""
    if name == "dramatiq":
        actor = dramatiq_actor()
        return (lambda count: [actor.send() for _ in range(count)]), actor.broker.close
    if name == "huey":
        # The worker knows the task as benchmark.peer_noop, also when this file runs as __main__
        from benchmark import peer_noop as job
        task = huey_app().task()(job)
        return (lambda count: [task() for _ in range(count)]), lambda: None
    import itertools
    from redis import Redis
    from rq import Queue as RQueue
    queue = RQueue(peer_name(), connection=Redis.from_url(os.environ["CELERY_RESULT_BACKEND"]))
    ids = (f"{peer_name()}-{i}" for i in itertools.count())
    return ((lambda count: [queue.enqueue("benchmark.peer_noop", result_ttl=0, job_id=next(ids))
                            for _ in range(count)]), queue.connection.close)


# --- Summaries, the table and the JSON ---------------------------------------------------------
def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(case, runs):
    rates = [r["rate"] for r in runs]
    cpu = {k: median([r["cpu_us"][k] for r in runs if r.get("cpu_us")] or [0])
           for k in ("client", "workers", "servers")}
    return {"name": case.name, "kind": case.kind, "min": round(min(rates), 1),
            "median": round(median(rates), 1), "max": round(max(rates), 1),
            "runs": [round(x, 1) for x in rates],
            "sent": sum(r["sent"] for r in runs), "completed": sum(r["completed"] for r in runs),
            "cpu_us": cpu, "note": case.note, "settings": case.settings,
            "worker": None if case.kind == "peer" else
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in case.worker.items()},
            "errors": [r["error"] for r in runs if r.get("error")]}


def evaluate(report):
    """The issue's targets, each with the value reached and the case that reached it."""
    limit = report["broker_limit"] or float("nan")
    best = {kind: max((c for c in report["cases"] if c["kind"] == kind),
                      key=lambda c: c["median"], default=None)
            for kind in ("per_message", "batched")}
    # the celery command is how workers are started; app.Worker() is shown, not judged
    cold = min(((k, v) for k, v in report["cold_start_s"].items() if "app.Worker" not in k),
               key=lambda kv: kv[1], default=(None, None))
    p50 = report["latency_ms"].get("p50")
    rows = [
        ("tuned per-message >= 0.5x broker limit", best["per_message"], 0.5, "ratio"),
        ("batched items/s >= 5x broker limit", best["batched"], 5.0, "ratio"),
    ]
    targets = [{"target": text, "case": c["name"], "value": round(c["median"] / limit, 2),
                "met": c["median"] / limit >= goal} for text, c, goal, _ in rows if c]
    if p50 is not None:
        targets.append({"target": "round trip p50 <= 2 ms", "case": report["latency_ms"]["case"],
                        "value": p50, "met": p50 <= 2.0})
    if cold[0]:
        targets.append({"target": "worker cold start <= 0.6 s", "case": cold[0],
                        "value": cold[1], "met": cold[1] <= 0.6})
    return targets


def print_report(report, console):
    from rich.table import Table
    limit = report["broker_limit"]
    table = Table(title=f"Throughput (median of {report['settings']['repeat']} interleaved runs; "
                        f"broker limit {limit:,.0f} msg/s)", title_justify="left")
    for col in ("case", "kind", "min", "median", "max", "x limit", "done/sent",
                "CPU us/msg client", "workers", "servers"):
        table.add_column(col, justify="left" if col in ("case", "kind") else "right")
    for c in report["broker"] + report["cases"]:
        cpu = c["cpu_us"]
        table.add_row(c["name"], c["kind"], f"{c['min']:,.0f}", f"{c['median']:,.0f}",
                      f"{c['max']:,.0f}", f"{c['ratio']:.2f}", f"{c['completed']}/{c['sent']}",
                      str(cpu["client"]), str(cpu["workers"]), str(cpu["servers"]))
    console.print(table)
    lat = Table(title="Round trip add.delay(2, 2).get() in ms", title_justify="left")
    for col in ("config", "p50", "p95", "p99", "samples", "note"):
        lat.add_column(col)
    for c in report["latency"]:
        lat.add_row(c["name"], f"{c['p50']:.2f}", f"{c['p95']:.2f}", f"{c['p99']:.2f}",
                    str(c["samples"]), c["note"])
    console.print(lat)
    cold = Table(title="Worker cold start: launch to first task done, seconds",
                 title_justify="left")
    for col in ("config", "min", "median", "max"):
        cold.add_column(col)
    for c in report["cold_start"]:
        cold.add_row(c["name"], f"{c['min']:.2f}", f"{c['median']:.2f}", f"{c['max']:.2f}")
    console.print(cold)
    for t in report["targets"]:
        mark = "[green]met[/]" if t["met"] else "[red]NOT met[/]"
        console.print(f"target {t['target']}: {t['value']} ({t['case']}) {mark}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    for error in report["errors"]:
        console.print(f"[red]error:[/] {error}")


def machine(broker, backend):
    """What the numbers were measured on: cores, CPU model, versions of everything involved."""
    import platform
    import celery
    import kombu
    info = {"nproc": os.cpu_count(), "cpu": "", "python": platform.python_version(),
            "celery": celery.__version__, "kombu": kombu.__version__,
            "broker": broker.split("://")[0], "backend": backend.split("://")[0]}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if broker.startswith(("amqp", "pyamqp")):
        from kombu import Connection
        with Connection(broker, connect_timeout=3) as conn:
            conn.connect()
            props = conn.connection.server_properties
            info["broker"] = f"{props.get('product', 'AMQP')} {props.get('version', '')}"
    redis_url = backend if backend.startswith("redis") else None
    if redis_url:
        import redis
        info["redis"] = redis.Redis.from_url(redis_url, socket_timeout=3).info("server")[
            "redis_version"]
    return info


def isolate(args, cleanup, token):
    """Point this run at its own vhost, key prefix and queue; undo it all on exit."""
    from urllib.parse import urlparse
    import stack
    if args.embedded:
        import tempfile
        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="celery-bench-"))
        os.environ.update(stack.embedded_env(folder))
    broker = os.environ.setdefault("CELERY_BROKER_URL", stack.DEFAULT_BROKER)
    backend = os.environ.setdefault("CELERY_RESULT_BACKEND", stack.DEFAULT_BACKEND)
    stack.check_broker(broker)
    stack.check_backend(backend)
    where = {"queue": f"bench-{token}", "vhost": None, "redis_prefix": None, "token": token}
    if broker.startswith(("amqp://", "pyamqp://")) and stack.rabbitmqctl_usable():
        url = cleanup.enter_context(stack.throwaway_vhost(broker, prefix=f"celery-bench-{token}"))
        os.environ["CELERY_BROKER_URL"] = url
        where["vhost"] = urlparse(url).path[1:]
    # otherwise a shared vhost or another broker: every case's queue is deleted after it
    if backend.startswith(("redis://", "rediss://")):
        prefix = cleanup.enter_context(
            stack.throwaway_redis_prefix(backend, prefix=f"celery-bench-{token}"))
        os.environ["CELERY_RESULT_KEYPREFIX"] = where["redis_prefix"] = prefix
        cleanup.callback(delete_redis_keys, backend, f"*{token}*")  # Huey's and RQ's keys
    else:
        os.environ.pop("CELERY_RESULT_KEYPREFIX", None)
    return where


def delete_redis_keys(url, pattern):
    import redis
    client = redis.Redis.from_url(url, socket_timeout=10)
    for key in client.scan_iter(match=pattern, count=1000):
        client.delete(key)
    for registry in (b"rq:workers", b"rq:queues"):  # RQ's sets name our worker and queue
        members = [m for m in client.smembers(registry) if pattern.strip("*").encode() in m]
        if members:
            client.srem(registry, *members)


def remove_queue(bench_app):
    """Delete the case's queue and exchange; return how many messages were still in it."""
    try:
        with bench_app.connection_for_write() as connection:
            queue = bench_queue(bench_app)(connection.default_channel)
            left = queue.queue_declare(passive=True).message_count
            queue.delete()
            queue.exchange.delete()
            return left
    except Exception:  # never declared (the case failed early): nothing to delete
        return 0


def parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the main cases once, with small counts (under a minute)")
    parser.add_argument("--repeat", type=int, help="rounds of every case (default 3; quick 1)")
    parser.add_argument("--count", type=int,
                        help="tasks per case (default 10000; quick 600); cases scale it")
    parser.add_argument("--samples", type=int, help="round trips for latency (default 1000)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", default="", metavar="REGEX",
                        help="run only the cases whose name matches ('latency ...' and "
                             "'cold start ...' for those)")
    parser.add_argument("--embedded", action="store_true",
                        help="use the embedded filesystem stack in a temporary folder")
    parser.add_argument("--profile", action="store_true",
                        help="profile a tuned worker and the raw consumer, print where time goes")
    parser.add_argument("--raw-consumer", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.count = args.count or (600 if args.quick else 10000)
    args.samples = args.samples or (100 if args.quick else 1000)
    return args


def worker_without_cli(argv):
    """``celery worker`` minus the command line: the worker options this benchmark uses."""
    import argparse
    parser = argparse.ArgumentParser()
    for flag in ("-Q", "-n", "-l", "-P", "-c"):
        parser.add_argument(flag)
    for flag in LEAN:
        parser.add_argument(flag, action="store_true")
    opts = parser.parse_args(argv)
    worker = app.Worker(hostname=opts.n, queues=[opts.Q], loglevel=opts.l, pool_cls=opts.P,
                        concurrency=int(opts.c or 0) or None, quiet=True,
                        without_mingle=opts.without_mingle, without_gossip=opts.without_gossip,
                        without_heartbeat=opts.without_heartbeat)
    worker.start()
    return worker.exitcode


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_without_cli(argv[1:])
    args = parse_args(argv)
    if args.raw_consumer:
        return raw_consumer(args.raw_consumer, args.count)
    import re
    import signal
    # `kill` (SIGTERM) unwinds like Ctrl-C: workers stopped, vhost and keys removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import shutil
    import tempfile
    import uuid
    from contextlib import ExitStack
    from rich.console import Console
    console = Console(width=shutil.get_terminal_size((150, 40)).columns)
    token = uuid.uuid4().hex[:8]
    run_dir = tempfile.mkdtemp(prefix="celery-bench-logs-")
    failed = True
    with ExitStack() as cleanup:
        where = isolate(args, cleanup, token)
        import importlib
        import celeryconfig
        importlib.reload(celeryconfig)  # it read the environment before isolate() changed it
        broker, backend = os.environ["CELERY_BROKER_URL"], os.environ["CELERY_RESULT_BACKEND"]
        embedded = broker.startswith("filesystem://")
        run = Run(where["queue"], token, run_dir, deadline_factor=4.0 if embedded else 1.0)
        if embedded:  # each round trip waits for the transport's 0.1 s polling: fewer of them
            args.samples = max(10, args.samples // 10)
        if args.profile:
            return profile(run, args.count, console)
        notes = []
        cases = []
        for case in all_cases(broker, backend):
            if not re.search(args.only, case.name) or (args.quick and not case.quick):
                continue
            missing = case.kind == "peer" and peer_missing(case.send, broker, backend,
                                                           where["vhost"])
            if missing:
                notes.append(f"{case.name} skipped: {missing}")
            else:
                cases.append(case)
        runs = {case.name: [] for case in cases}
        errors = []  # latency and cold start failures (throughput errors stay with their case)
        latency_cases = [c for c in LATENCY_CASES if (c.quick or not args.quick)
                         and re.search(args.only, f"latency {c.name}")]
        cold_cases = [c for c in COLD_START_CASES if (c.quick or not args.quick)
                      and re.search(args.only, f"cold start {c.name}")]
        latency = {case.name: [] for case in latency_cases}
        cold = {case.name: [] for case in cold_cases}
        for rnd in range(args.repeat):
            shift = rnd % len(cases) if cases else 0  # rotate, so no case always runs first
            for i, case in enumerate(cases[shift:] + cases[:shift]):
                tag = f"r{rnd}c{(i + shift) % len(cases)}"
                try:
                    result = measure(run, case, tag, args.count)
                except Exception as exc:  # one broken case must not hide the others
                    result = {"rate": 0.0, "sent": case.count(args.count), "completed": 0,
                              "error": f"{type(exc).__name__}: {exc}"}
                runs[case.name].append(result)
                console.print(f"round {rnd + 1}/{args.repeat}  {case.name:<34} "
                              f"{result['rate']:>9,.0f}/s  {result['completed']}/{result['sent']}"
                              + (f"  [red]{result['error']}[/]" if result.get("error") else ""))
            for i, case in enumerate(latency_cases):
                try:
                    latency[case.name] += measure_latency(run, case, f"r{rnd}l{i}", args.samples)
                except Exception as exc:
                    errors.append(f"latency {case.name}: {type(exc).__name__}: {exc}")
            for i, case in enumerate(cold_cases):
                try:
                    cold[case.name].append(measure_cold_start(run, case, f"r{rnd}s{i}"))
                except Exception as exc:
                    errors.append(f"cold start {case.name}: {type(exc).__name__}: {exc}")
            console.print(f"round {rnd + 1}/{args.repeat}  latency p50 "
                          + ", ".join(f"{k} {median(v):.2f} ms" for k, v in latency.items() if v)
                          + "; cold start " + ", ".join(f"{k} {v[-1]:.2f} s"
                                                        for k, v in cold.items() if v))
        summaries = [summarize(case, runs[case.name]) for case in cases]
        limit = max((s["median"] for s in summaries if s["kind"] == "broker"), default=0.0)
        for s in summaries:
            s["ratio"] = round(s["median"] / limit, 3) if limit else None
        latency_rows = [{"name": case.name, "samples": len(v), "note": case.note,
                         **{f"p{q}": round(percentile(v, q), 3) for q in (50, 95, 99)}}
                        for case in latency_cases if (v := latency[case.name])]
        recommended = next((r for r in latency_rows if r["name"] == LATENCY_CASES[-1].name), {})
        report = {
            "machine": machine(broker, backend),
            "settings": {"repeat": args.repeat, "count": args.count, "samples": args.samples,
                         "quick": args.quick, "broker": broker.split("://")[0],
                         "backend": backend.split("://")[0]},
            "broker_limit": round(limit, 1),
            "broker": [s for s in summaries if s["kind"] == "broker"],
            "cases": [s for s in summaries if s["kind"] != "broker"],
            "latency_ms": {k: recommended.get(k) for k in ("p50", "p95", "p99")}
                          | {"case": recommended.get("name")},
            "latency": latency_rows,
            "cold_start_s": {name: round(median(v), 3) for name, v in cold.items() if v},
            "cold_start": [{"name": name, "min": round(min(v), 3), "median": round(median(v), 3),
                            "max": round(max(v), 3), "runs": [round(x, 3) for x in v]}
                           for name, v in cold.items() if v],
            "errors": errors,
            "notes": notes,
            "cleanup": {**where, "worker_pids": run.worker_pids},
        }
        report["targets"] = evaluate(report)
        failed = errors or any(s["completed"] != s["sent"] or s["errors"] for s in summaries)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print_report(report, console)
    if failed:
        console.print(f"[red]some cases did not complete; worker logs kept in {run_dir}[/]")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed else 0


def profile(run, count, console):
    """The raw consumer and a tuned worker, each under cProfile: where a message's time goes."""
    import pstats
    from rich.table import Table
    cases = {c.name: c for c in all_cases("", "")}
    compared = {"raw kombu consumer": cases["broker: raw kombu, transient"],
                "tuned Celery worker": cases["tuned"]}
    areas, top = {}, []
    for i, (label, case) in enumerate(compared.items()):
        path = os.path.join(run.run_dir, f"profile-{i}.prof")
        result = measure(run, case, f"p{i}", count, profile=path)
        console.print(f"{label}: {result['rate']:,.0f} msg/s under cProfile, "
                      f"{result['completed']}/{result['sent']}")
        stats = pstats.Stats(path).stats  # {(file, line, function): (cc, nc, tottime, cumtime, _)}
        for (filename, line, function), (_, calls, tottime, _, _) in stats.items():
            where = area(filename, function)
            areas.setdefault(where, {}).setdefault(label, 0.0)
            areas[where][label] += tottime * 1e6 / count
            if label.startswith("tuned"):
                top.append((tottime * 1e6 / count, calls / count,
                            f"{function} ({filename.split('site-packages/')[-1]}:{line})"))
    table = Table(title=f"CPU per message by area, microseconds under cProfile ({count} messages; "
                        "the profiler inflates everything, compare the columns)",
                  title_justify="left")
    table.add_column("area")
    for label in compared:
        table.add_column(label, justify="right")
    for where, by_label in sorted(areas.items(), key=lambda kv: -max(kv[1].values())):
        table.add_row(where, *(f"{by_label.get(label, 0):.1f}" for label in compared))
    table.add_row("total per message", *(
        f"{sum(v.get(label, 0) for k, v in areas.items() if 'not per message' not in k):.1f}"
        for label in compared), style="bold")
    console.print(table)
    functions = Table(title="The tuned worker's 15 most expensive functions", title_justify="left")
    for col in ("us/msg", "calls/msg", "function"):
        functions.add_column(col)
    for us, calls, name in sorted(top, reverse=True)[:15]:
        functions.add_row(f"{us:.1f}", f"{calls:.1f}", name)
    console.print(functions)
    return 0


def area(filename, function):
    """Which part of the stack a profiled function belongs to."""
    if filename == "~":  # built-in functions: name the system calls
        if "poll" in function or "select" in function:
            return "idle: waiting in poll (not per message)"
        return "socket send/recv" if "socket" in function else "builtins (C)"
    if "importlib" in filename:
        return "start-up: imports (not per message)"
    for package in ("amqp", "kombu", "vine", "billiard", "celery/worker", "celery/app",
                    "celery/concurrency", "celery", "json", "click"):
        if f"/{package}/" in filename:
            return package.replace("/", ".")
    return "other (stdlib, benchmark.py)"


if __name__ == "__main__":
    sys.exit(main())
