"""What runs inside the benchmark's worker processes: the benchmark's Celery app and its tasks.

    celery -A bench.worker worker -Q QUEUE ...      # how every case starts its workers
    python -m bench.worker --worker -Q QUEUE ...    # app.Worker() without the celery command
    python -m bench.worker --raw-consumer OUT COUNT PREFETCH IDLE_TIMEOUT  # plain kombu

Owns: the trivial tasks, the completion counter and the ``bench_progress`` remote-control
command that reads it, ``make_app`` (celeryconfig plus a case's settings), the benchmark's queue
and the Celery message its pre-built cases copy. A case's settings arrive as JSON in
``BENCH_SETTINGS``, its queue name in ``BENCH_QUEUE``, so the benchmark's tasks never reach the
demo's workers.

Completion is measured without a result per task: the task counts itself in memory shared with
prefork children, and the benchmark asks the workers for that count with ``bench_progress``. On
a broker without remote control (SQS) each worker writes it to the file ``BENCH_CELERY_TALLY``
instead, first when it is ready (Celery's worker_ready signal), then whenever it changed.
A final marker task would not do: with several pool slots or workers the marker can finish
while earlier tasks are still queued elsewhere.
"""
import json
import multiprocessing
import os
import socket
import sys
import threading
import time

from celery import Celery
from celery.signals import worker_ready
from celery.worker.control import inspect_command
from kombu import Exchange, Queue

import celeryconfig

# Completed count, first and last completion time: shared memory, so prefork children (forked
# after this import) all count into the same place.
_done = multiprocessing.RawArray("d", 3)
_done_lock = multiprocessing.Lock()
LEAN = ("--without-mingle", "--without-gossip", "--without-heartbeat")


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


def write_tally(path):
    """bench_progress's answer, in a file (replaced whole: a reader never sees half of it)."""
    with open(path + ".tmp", "w") as f:
        json.dump({"count": int(_done[0]), "first": _done[1], "last": _done[2]}, f)
    os.replace(path + ".tmp", path)


@worker_ready.connect(weak=False)
def tally_from_now_on(**_):
    path = os.environ.get("BENCH_CELERY_TALLY")
    if not path:  # the benchmark asks with bench_progress
        return

    def keep_writing():  # in the worker's main process: prefork children count into _done
        last = None
        while True:
            if tuple(_done) != last:
                last = tuple(_done)
                write_tally(path)
            time.sleep(0.02)
    write_tally(path)
    threading.Thread(target=keep_writing, name="bench-tally", daemon=True).start()


def make_app(settings=None):
    """The demo's configuration (celeryconfig) with a case's settings on top.

    Two settings are the benchmark's own: ``queue_priority`` (declare the queue with
    x-max-priority, as the demo declares its priority_queue; its other queues are plain) and ``publisher_confirms`` (False turns
    off the RabbitMQ publisher confirms that celeryconfig asks for). The run's throw-away prefix
    for a Redis broker's keys comes as the demo's own ``CELERY_BROKER_PREFIX`` (celeryconfig).
    """
    settings = dict(settings or {})
    priority = settings.pop("queue_priority", False)
    confirms = settings.pop("publisher_confirms", True)
    name = os.environ.get("BENCH_QUEUE", "bench")
    app = Celery("benchmark")
    app.config_from_object("celeryconfig")
    arguments = {"x-max-priority": celeryconfig.MAX_PRIORITY} if priority else None
    kind = "direct"
    if celeryconfig.QUEUE_TYPE == "quorum":  # as celeryconfig declares them (docs/cluster.md)
        arguments, kind = {"x-queue-type": "quorum"}, "topic"  # no priorities on RabbitMQ 3.x
    app.conf.update(
        task_queues=[Queue(name, Exchange(name, type=kind), routing_key=name,
                           queue_arguments=arguments)],
        task_default_queue=name, task_default_exchange=name, task_default_routing_key=name,
        task_routes={}, task_annotations=None, beat_schedule={},
        imports=(),  # the demo's worker extras (celeryconfig.imports) are not what is measured
        **settings)
    options = dict(app.conf.broker_transport_options or {})
    if not confirms and "confirm_publish" in options:
        options["confirm_publish"] = False
    app.conf.broker_transport_options = options
    # shared=False: other apps in the same process (tests) do not get these tasks
    app.task(name="bench.noop", shared=False)(noop)
    app.task(name="bench.add", shared=False)(add)
    app.task(name="bench.stamp", shared=False, ignore_result=False)(stamp)  # cold start
    return app


app = make_app(json.loads(os.environ.get("BENCH_SETTINGS") or "{}"))


def bench_queue(bench_app):
    return bench_app.amqp.queues[bench_app.conf.task_default_queue]


def template_message(bench_app):
    """The message ``noop.apply_async()`` would publish, built once by Celery itself."""
    task = bench_app.tasks["bench.noop"]
    return bench_app.amqp.create_task_message(
        "template", task.name, (), {}, reply_to=bench_app.thread_oid,
        create_sent_event=False, ignore_result=task.ignore_result)


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


def raw_consumer(out, count, prefetch, timeout):
    """Consume ``count`` messages from the benchmark queue with plain kombu; write when done.

    Gives up ``timeout`` seconds after the last message (or the start): a stalled broker ends
    it, and the benchmark reads how far it got.
    """
    from kombu import Consumer
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
        with Consumer(channel, [bench_queue(app)], on_message=on_message):
            open(out + ".ready", "w").close()
            cpu = sum(os.times()[:2])
            idle_since = time.monotonic()
            while state["count"] < count and time.monotonic() - idle_since < timeout:
                seen = state["count"]
                try:
                    connection.drain_events(timeout=1)
                except socket.timeout:
                    pass
                if state["count"] != seen:
                    idle_since = time.monotonic()
            state["cpu"] = sum(os.times()[:2]) - cpu
    with open(out, "w") as f:
        json.dump(state, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_without_cli(sys.argv[2:]))
    elif sys.argv[1:2] == ["--raw-consumer"]:
        out, count, prefetch, timeout = sys.argv[2:6]
        sys.exit(raw_consumer(out, int(count), int(prefetch), float(timeout)))
    sys.exit(__doc__.split("\n\n")[0])
