"""The Celery cases of the benchmark, and how each one is measured.

Owns: the tuned settings and each "tuned + ..." variant that sets one knob back, the broker's
limit (plain kombu, no Celery), the demo's defaults, ``chunks``, the round-trip latency and the
worker cold start; the ways a case sends its tasks (``delay``, ``apply_async``, pre-built
messages, ``chunks``). The peers (Dramatiq, Huey, RQ) live in bench/peers.py.
"""
import json
import os
import sys
import time
from contextlib import contextmanager

import stack
from stack.capabilities import is_kind

from .profiling import CpuMeter
from .run import check_alive, clean_up, deadline, wait_done
from .worker import LEAN, bench_queue, make_app, template_message

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
    "queue_priority": False,             # a plain queue, as every demo queue but priority_queue
    "publisher_confirms": False,         # publish without waiting for RabbitMQ's confirmation
}
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
    """The throughput cases for this broker and result backend, the peers last."""
    from . import peers
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
          if is_kind(broker, "rabbitmq") else []),
        tuned("tuned, 2 worker processes", workers=2),
        Case("chunks of 100", "batched", TUNED, send="chunks:100", share=5, quick=True,
             note="noop.chunks(items, 100): one message per 100 items"),
        Case("chunks of 1000", "batched", TUNED, send="chunks:1000", share=5),
        *peers.cases(broker),
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


# --- Sending ---------------------------------------------------------------------------------
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


# --- Measurements --------------------------------------------------------------------------------
# Each measurement talks to the services inside a deadline (a frozen broker ends it with
# Stalled instead of a hang) and stops its processes outside it, so that stopping always runs.
def measure(run, case, tag, base_count, profile=None):
    """One throughput run of a case: {"rate", "sent", "completed", "cpu_us"}."""
    count = case.count(base_count)
    run.use_queue(tag)
    if case.kind == "broker":
        return measure_raw(run, case, tag, count, profile)
    if case.kind == "peer":
        from .peers import measure_peer
        return measure_peer(run, case, tag, count)
    return measure_celery(run, case, tag, count, profile)


def measure_celery(run, case, tag, count, profile=None):
    bench_app = make_app(case.settings)
    procs, names = run.start(case, tag, profile)
    try:
        with deadline(2 * run.timeout, f"case {case.name!r}") as renew:
            run.wait_ready(bench_app, names, procs)
            renew(run.wait_for(count))  # sending; then each task done renews it
            with sender(bench_app, case.send) as send:
                cpu = CpuMeter(procs.pids())
                started = time.time()
                send(count)
                done, last = wait_done(run, bench_app, names, procs, count,
                                       run.wait_for(count), idle=run.timeout, renew=renew)
        result = {"rate": done / (last - started) if done else 0.0, "sent": count,
                  "completed": done, "cpu_us": cpu.per_message(count)}
    finally:
        run.stop(bench_app, names, procs)
        left, what = clean_up(bench_app, bench_queue)
    if left:  # a message run twice, or one that never ran, would show here
        result["error"] = f"{left} messages left in the queue" + (f": {what}" if what else "")
    return result


def measure_raw(run, case, tag, count, profile=None):
    """The broker's limit: plain kombu, one publisher (this process) and one consumer process."""
    bench_app = make_app(case.settings)
    out = os.path.join(run.run_dir, f"{tag}.json")
    procs = run.processes({"BENCH_SETTINGS": json.dumps(case.settings)})
    prefetch = bench_app.conf.worker_prefetch_multiplier * TUNED_WORKER["concurrency"]
    run.start_process(procs, tag, [sys.executable, "-m", "bench.worker", "--raw-consumer", out,
                                   str(count), str(prefetch), str(run.timeout)], profile)
    try:
        stack.eventually(lambda: check_alive(procs) or os.path.exists(out + ".ready"),
                         "the raw consumer did not start", run.timeout, interval=0.02)
        with deadline(2 * run.timeout + run.wait_for(count, rate=200), f"case {case.name!r}"), \
                bench_app.connection_for_write() as connection:
            publish = publisher(connection, bench_queue(bench_app), template_message(bench_app),
                                bench_app.conf.task_default_delivery_mode)
            cpu = CpuMeter(())
            started = time.time()
            publish(count)
            # it ends by itself: all consumed, or nothing more for --timeout seconds
            procs.started[0][1].wait(timeout=run.wait_for(count, rate=200) + run.timeout)
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
        clean_up(bench_app, bench_queue)


def measure_latency(run, case, tag, samples):
    """Round trips of add.delay(2, 2).get(timeout=...), one at a time, in milliseconds."""
    run.use_queue(tag)
    bench_app = make_app(case.settings)
    procs, names = run.start(case, tag)
    add_task = bench_app.tasks["bench.add"]
    try:
        with deadline(run.timeout + 5, "the latency workers to start"):
            run.wait_ready(bench_app, names, procs)
        times = []
        for i in range(samples + 20):  # the first 20 warm up connections and caches
            started = time.perf_counter()
            # interval only matters for polling backends (file://); Redis pushes the result
            with deadline(run.timeout + 5, "a round trip add.delay(2, 2).get()"):
                if add_task.delay(2, 2).get(timeout=run.timeout, interval=0.01) != 4:
                    raise AssertionError("add(2, 2) did not return 4")
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        run.stop(bench_app, names, procs)
        clean_up(bench_app, bench_queue)


def measure_cold_start(run, case, tag):
    """Seconds from launching a worker to the end of its first task (already queued)."""
    run.use_queue(tag)
    bench_app = make_app(case.settings)
    procs, names = None, []
    try:
        with deadline(run.timeout, "queueing the cold-start task"):
            with bench_app.connection_for_write() as connection:
                bench_queue(bench_app)(connection.default_channel).declare()
            result = bench_app.tasks["bench.stamp"].delay()
        launched = time.time()
        procs, names = run.start(case, tag)
        with deadline(2 * run.timeout + 5, "a cold-started worker's first task"):
            return result.get(timeout=2 * run.timeout, interval=0.01) - launched
    finally:
        if procs:
            run.stop(bench_app, names, procs)
        clean_up(bench_app, bench_queue)
