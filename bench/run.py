"""Where one benchmark run works and how it waits: throw-away vhost / Redis prefix, a queue per
case, worker processes, and a deadline on every wait.

Owns: choosing the broker (``--broker rabbitmq|redis|sqs|embedded``), isolating the run (a
throw-away RabbitMQ vhost, a Redis key prefix for the broker and the results, SQS queues under a
name prefix on a local SQS server, or a temporary folder) and removing it all afterwards; ``Run``, which starts a case's workers and stops them;
asking the workers how far they got; and ``deadline``, which ends a wait that a frozen broker
would otherwise make endless, even while it is blocked on a socket.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlparse

import stack
from stack.capabilities import is_kind


class Stalled(RuntimeError):
    """A wait passed its deadline; the message says what was awaited and from which service."""


_deadlines = []  # [end, what, seconds] of the deadlines in force, innermost last
_outside = []  # the alarm handler and time left from before the first deadline


def _arm():
    """Set the alarm for the soonest deadline; once it passed, fire again every second."""
    if _deadlines:
        soonest = min(end for end, _, _ in _deadlines) - time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, soonest if soonest > 0 else 1.0, 1.0)
    else:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _expire(*_):
    now = time.monotonic()
    # a deadline whose block was left by another exception lingers: forget it after a while
    _deadlines[:] = [d for d in _deadlines if d[0] > now - 30]
    expired = [d for d in _deadlines if d[0] <= now]
    _arm()
    if expired:
        _, what, seconds = expired[0]
        raise Stalled(f"{what} did not finish within {seconds:.0f}s")


@contextmanager
def deadline(seconds, what):
    """Raise Stalled when the block runs longer than ``seconds``, also inside a blocking socket
    call (a SIGALRM interrupts it), and again every second until the block is left: kombu's
    clean-up on the way out (closing a channel) would block on a frozen broker too.

    Yields ``renew(seconds)``, which moves the deadline to ``seconds`` from now (a wait that
    sees progress renews it). Wrap only the talking to services, not the stopping of processes.
    """
    entry = [time.monotonic() + seconds, what, seconds]

    def renew(seconds):
        entry[0], entry[2] = time.monotonic() + seconds, seconds
        if any(d is entry for d in _deadlines):
            _arm()

    if threading.current_thread() is not threading.main_thread():
        yield renew
        return
    if not _deadlines:  # someone else's alarm (pytest-timeout's): put it back afterwards
        _outside[:] = [signal.signal(signal.SIGALRM, _expire),
                       signal.getitimer(signal.ITIMER_REAL)[0], time.monotonic()]
    _deadlines.append(entry)
    _arm()
    try:
        yield renew
    finally:
        _deadlines[:] = [d for d in _deadlines if d is not entry]
        _arm()
        if not _deadlines and _outside:
            handler, left, since = _outside
            signal.signal(signal.SIGALRM, handler)
            if left:
                signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - since), 0.001))


def bounded(call, seconds, what):
    """call() within a deadline; None (and nothing raised) if it failed: for clean-up steps."""
    try:
        with deadline(seconds, what):
            return call()
    except Exception:  # the broker may be the problem; what follows must still run
        return None


def isolate(broker_name, cleanup, token):
    """Point this run at its own vhost, key prefixes and queue; undo it all on exit.

    Raises stack.ServiceUnavailable (one line, naming the service) when a service is down.
    """
    # the one resolver (stack/resolve.py): --broker KIND, else the environment or the defaults
    folder = None
    if broker_name in ("embedded", "sqs"):  # the embedded stack's folders, the SQS server's log
        import tempfile
        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="celery-bench-"))
    started = {}
    os.environ.update(stack.resolve(broker_name or "configured", "configured", folder, started))
    server = started.get("services")  # a local SQS server (moto), unless the URL named one
    if server:
        cleanup.callback(server.stop_all, 5)
    broker, backend = os.environ["CELERY_BROKER_URL"], os.environ["CELERY_RESULT_BACKEND"]
    if not broker_name:  # resolve() checked a broker named by kind; this one is the user's
        stack.check_services(broker, backend)
    where = {"queue": f"bench-{token}", "vhost": None, "redis_prefix": None,
             "broker_prefix": None, "token": token,
             "sqs_server_pid": server.pids()[0] if server else None}
    if is_kind(broker, "rabbitmq") and stack.rabbitmqctl_usable():
        url = cleanup.enter_context(said(stack.throwaway_vhost(
            broker, prefix=f"celery-bench-{token}"), "the run's vhost"))
        os.environ["CELERY_BROKER_URL"] = url
        where["vhost"] = urlparse(url).path[1:]
    # otherwise a shared vhost or another broker: every case's queue is deleted after it
    if is_kind(broker, "redis"):  # every broker key under the prefix
        prefix = cleanup.enter_context(said(stack.throwaway_redis_prefix(
            broker, prefix=f"celery-bench-{token}-broker"), "the broker's keys"))
        os.environ["CELERY_BROKER_PREFIX"] = where["broker_prefix"] = prefix  # celeryconfig
    if is_kind(backend, "redis", "result backend"):
        prefix = cleanup.enter_context(said(stack.throwaway_redis_prefix(
            backend, prefix=f"celery-bench-{token}"), "the results' keys"))
        os.environ["CELERY_RESULT_KEYPREFIX"] = where["redis_prefix"] = prefix
    else:
        os.environ.pop("CELERY_RESULT_KEYPREFIX", None)
    if is_kind(broker, "sqs"):  # every queue of the run under the prefix, deleted after
        prefix = os.environ["CELERY_BROKER_PREFIX"] = where["broker_prefix"] = f"bench-{token}-"
        cleanup.callback(bounded, lambda: stack.delete_sqs_queues(broker, prefix), 30,
                         "deleting the run's SQS queues")
    for url in {u for u, role in ((broker, "broker"), (backend, "result backend"))
                if is_kind(u, "redis", role)}:
        cleanup.callback(delete_redis_keys, url, f"*{token}*")  # the peers' keys
    return where


@contextmanager
def said(context, what):
    """``context``, except that failing to undo it (the service went away meanwhile) is one
    line naming what is left behind, not a traceback."""
    value = context.__enter__()
    try:
        yield value
    finally:
        try:
            context.__exit__(None, None, None)
        except Exception as exc:
            print(f"could not remove {what} ({value}): {type(exc).__name__}: "
                  f"{str(exc)[:200]}", file=sys.stderr)


def delete_redis_keys(url, pattern):
    import redis
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
    for key in client.scan_iter(match=pattern, count=1000):
        client.delete(key)
    for registry in (b"rq:workers", b"rq:queues"):  # RQ's sets name our worker and queue
        members = [m for m in client.smembers(registry) if pattern.strip("*").encode() in m]
        if members:
            client.srem(registry, *members)


class Run:
    """Where and how this benchmark run works: queue, run folder, deadlines, processes."""

    def __init__(self, queue, token, run_dir, timeout=30.0, deadline_factor=1.0,
                 remote_control=True):
        self.queue, self.token, self.run_dir = queue, token, run_dir
        self.host = socket.gethostname()
        self.worker_pids = []
        self.timeout = timeout * deadline_factor  # the filesystem stack is far slower
        self.factor = deadline_factor
        # Without it (SQS) the workers write their progress to files: {node name: path}
        self.remote_control, self.tallies = remote_control, {}

    def wait_for(self, count, rate=50):
        """The deadline of a wait for ``count`` messages: --timeout plus count / rate seconds."""
        return self.timeout + count / rate * self.factor

    def use_queue(self, tag):
        """Give each case its own queue: nothing one case leaves behind can count for another."""
        os.environ["BENCH_QUEUE"] = f"{self.queue}-{tag}"  # make_app() and the workers read it
        return os.environ["BENCH_QUEUE"]

    def processes(self, env=None):
        return stack.Processes(self.run_dir, env=env)

    def start_process(self, procs, name, argv, profile=None, env=None):
        if profile:  # the same command under cProfile, which writes its stats on exit
            argv = [argv[0], "-m", "cProfile", "-o", profile, *argv[1:]]
        self.worker_pids.append(procs.start(name, argv, env=env).pid)

    def start(self, case, tag, profile=None):
        """Start the case's worker processes; return (Processes, node names)."""
        procs = self.processes({"BENCH_SETTINGS": json.dumps(case.settings)})
        names = []
        for i in range(case.workers):
            short = f"{self.token}-{tag}-{i}"
            w = case.worker
            options = ["-Q", os.environ["BENCH_QUEUE"], "-n", f"{short}@{self.host}",
                       "-l", w["loglevel"], "-P", w["pool"], *w["flags"],
                       *(["-c", str(w["concurrency"])] if w["concurrency"] else [])]
            if w.get("cli", True):
                argv = [sys.executable, "-m", "celery", "-A", "bench.worker", "worker", *options]
            else:  # app.Worker() directly: the celery command imports every CLI plugin first
                argv = [sys.executable, "-m", "bench.worker", "--worker", *options]
            env = None
            if not self.remote_control:
                tally = self.tallies[f"{short}@{self.host}"] = os.path.join(self.run_dir,
                                                                            f"{short}.tally")
                env = {"BENCH_CELERY_TALLY": tally}
            self.start_process(procs, short, argv, profile, env)
            names.append(f"{short}@{self.host}")
        return procs, names

    def wait_ready(self, app, names, procs):
        if self.remote_control:
            return stack.wait_for_workers(app, names, self.timeout, processes=procs)
        # a worker writes its tally when it is ready
        stack.eventually(lambda: check_alive(procs) or all(
            os.path.exists(self.tallies[n]) for n in names), f"{', '.join(names)} ready",
            self.timeout, interval=0.05)

    def progress(self, app, names):
        """{node: {"count", "first", "last"}} of every worker that answered or wrote a tally."""
        if self.remote_control:
            return progress(app, names)
        from .peers import read_tally
        return {n: tally for n in names for tally in read_tally(self.tallies[n])}

    def stop(self, app, names, procs):
        # Ask first: a worker without heartbeat takes up to 10 s to notice a SIGTERM.
        if self.remote_control and bounded(
                lambda: app.control.shutdown(destination=names) or True, 5, "shutdown"):
            for _, proc, _ in procs.started:
                try:
                    proc.wait(timeout=10)  # a profiled worker writes its stats while exiting
                except subprocess.TimeoutExpired:
                    break
        procs.stop_all(grace=10)  # SIGTERM, then SIGKILL: never under a deadline


def check_alive(procs):
    """Fail at once, with the end of its log, when a process of the case exited."""
    for name, code in procs.exited():
        raise RuntimeError(f"{name} exited with {code}:\n{procs.log_tail(name)}")


def progress(app, names, timeout=1.0):
    """{node: {"count", "first", "last"}} from every worker that answered within timeout."""
    replies = app.control.broadcast("bench_progress", reply=True, destination=names,
                                    limit=len(names), timeout=timeout) or []
    return {node: value for reply in replies for node, value in reply.items()}


def wait_done(run, app, names, procs, expected, timeout, idle, renew=None):
    """Poll the workers' counts until ``expected`` tasks completed, nothing more completed for
    ``idle`` seconds, or ``timeout`` passed; return (completed, time of the last completion):
    a case that stalls shows how far it got."""
    return wait_count(lambda: run.progress(app, names).values(), procs, expected, timeout, idle,
                      f"{expected} tasks done", renew=renew)


def wait_count(read, procs, expected, timeout, idle, what, interval=0.05, renew=None):
    """Sum what ``read()`` reports ({"count", "last"} each) until it reaches ``expected``, stops
    growing for ``idle`` seconds, or ``timeout`` passed; return (count, last). Each time the
    count grows, ``renew(idle + 10)`` moves the enclosing deadline."""
    seen = {"count": 0, "last": 0.0, "since": time.monotonic()}

    def done():
        check_alive(procs)
        values = list(read())
        count = sum(v["count"] for v in values)
        if count > seen["count"]:
            seen.update(count=count, since=time.monotonic(),
                        last=max((v["last"] for v in values), default=0.0))
            if renew:
                renew(idle + 10)
        return count >= expected or time.monotonic() - seen["since"] > idle

    try:
        stack.eventually(done, what, timeout, interval=interval)
    except TimeoutError:
        pass
    return seen["count"], seen["last"]


def clean_up(bench_app, bench_queue):
    """Delete the case's queue and exchange and close the app's connections, each within a
    deadline; return (how many messages were still in the queue, what they were)."""
    def remove():
        with bench_app.connection_for_write() as connection:
            queue = bench_queue(bench_app)(connection.default_channel)
            left = queue.queue_declare(passive=True).message_count
            seen = [queue.get(no_ack=True) for _ in range(min(left, 100))]
            queue.delete()
            queue.exchange.delete()
            return left, leftovers([m for m in seen if m is not None])
    # None: never declared (the case failed early), or the broker is gone
    left = bounded(remove, 5, "deleting the case's queue")
    bounded(bench_app.close, 5, "closing the connections")
    return left or (0, "")


def leftovers(messages):
    """What the messages left in a case's queue are: delivered to a worker before (redelivered:
    it stopped without acknowledging them), and whether a task id is in there twice."""
    if not messages:
        return ""
    redelivered = sum(bool(m.delivery_info.get("redelivered")) for m in messages)
    ids = [(m.headers or {}).get("id") for m in messages]
    twice = len(ids) - len(set(ids))
    return (f"{redelivered} of {len(messages)} redelivered (a worker had received them and "
            f"stopped without acknowledging them)" + (f", {twice} ids twice" if twice else ""))
