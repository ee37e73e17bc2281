"""Real OS processes: the worker command line, process groups with a log each, waiting for
workers to answer, and the multi-process stack of run_demo.py (a worker per queue, beat, Flower,
web.py).
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .services import HERE

# Short node names per queue: `celery -A tasks worker -Q slow_queue -n slow@%h`
WORKER_NAMES = {"celery": "default", "fast_queue": "fast", "slow_queue": "slow",
                "network_queue": "network", "priority_queue": "priority"}
# fast_queue carries many tiny tasks: a deep prefetch is worth 10x there (see benchmark.py);
# the other queues keep celeryconfig's prefetch of 1, fair for long tasks and for priorities.
WORKER_OPTIONS = {"fast_queue": ("--prefetch-multiplier", "64")}


class StackFailed(RuntimeError):
    """A process of the stack exited or never answered; the message holds the tail of its log."""


def worker_command(queue, *extra, name=None):
    """The command a user types to start the worker of one queue (from the project folder):
    ``celery -A tasks worker -Q QUEUE -n NAME@%h EXTRA``; NAME is the queue's short name
    (WORKER_NAMES) unless given, and fast_queue's worker gets its deep prefetch.

    run_demo.py, the README's commands, docker-compose.yml and the tests all use this line.
    ``queue`` may be several, comma-separated, as `-Q` takes them.
    """
    name = name or WORKER_NAMES.get(queue, queue)
    return ["celery", "-A", "tasks", "worker", "-Q", queue, "-n", f"{name}@%h", *extra,
            *WORKER_OPTIONS.get(queue, ())]


def wait_for_workers(app, names, timeout, processes=None, by_log=False):
    """Wait until every named worker answers a ping; raise StackFailed naming the silent ones.

    With ``processes`` (the Processes that started them) it fails at once, with the end of the
    log, when one of those processes exits, and a timeout shows the silent workers' logs.
    ``by_log``: on a broker without remote control (SQS) nothing answers a ping, so a worker
    counts as ready once its log says "NODE ready." (what Celery logs when it consumes).
    """
    deadline = time.monotonic() + timeout
    missing = set(names)
    while missing:
        for name, code in processes.exited() if processes else ():
            raise StackFailed(f"{name} exited with code {code} during start-up; "
                              f"the end of its log:\n{processes.log_tail(name)}")
        if time.monotonic() > deadline:
            shorts = {node.split("@")[0] for node in missing}
            tails = "".join(f"\n--- {name}:\n{processes.log_tail(name)}"
                            for name, _, _ in processes.started
                            if name in shorts or name.removeprefix("worker-") in shorts
                            ) if processes else ""
            raise StackFailed(f"no ping answer within {timeout:.0f}s from "
                              f"{', '.join(sorted(missing))}" +
                              (f"; the end of their logs:{tails}" if tails else ""))
        if by_log:
            missing -= {n for n in missing if f"{n} ready." in _worker_log(processes, n)}
            time.sleep(0.2)
            continue
        replies = app.control.ping(timeout=0.5) or []
        missing -= {name for reply in replies for name in reply}


def _worker_log(processes, node):
    short = node.split("@")[0]
    for name, _, path in processes.started:
        if name in (short, f"worker-{short}"):
            return tail(path, 400)
    return ""


def eventually(check, what, timeout, interval=0.3, ignore=()):
    """Call ``check`` until it returns something true and return that; exceptions of the
    types in ``ignore`` count as "not yet". Raise TimeoutError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(interval)


# --- Processes: workers, beat, Flower as real OS processes ------------------------------------
class Processes:
    """Start commands in their own process group with a log each; stop every one of them."""

    def __init__(self, run_dir, env=None, cwd=HERE):
        self.cwd = cwd  # where each command runs: the project folder, as a user's terminal
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.started = []  # (name, Popen, log path)
        self._lock = threading.Lock()

    def start(self, name, argv, env=None):
        log_path = self.run_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.cwd, env={**self.env, **(env or {})},
                                    stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # our own group: we can stop it whole
        with self._lock:
            self.started.append((name, proc, log_path))
        return proc

    def celery(self, name, *args, env=None):
        return self.start(name, [sys.executable, "-m", "celery", "-A", "tasks", *args], env=env)

    def exited(self):
        """(name, returncode) of processes that stopped on their own."""
        return [(n, p.returncode) for n, p, _ in self.started if p.poll() is not None]

    def pids(self):
        return [p.pid for _, p, _ in self.started]

    def still_running(self):
        """Names whose process group still has a live member (pool children included).

        A member killed a moment ago may still be a zombie, waiting to be reaped by PID 1:
        it runs nothing any more, so it does not count (kill(0) alone would say it does).
        """
        return [name for name, proc, _ in self.started if group_alive(proc.pid)]

    def log_tail(self, name, lines=20):
        return tail(self.run_dir / f"{name}.log", lines)

    def stop_all(self, grace=10.0):
        """SIGTERM each process (warm shutdown), then SIGKILL its whole group after ``grace``.

        The SIGTERM goes to the process we started only: a prefork worker then stops its own
        pool children, as a warm shutdown should (children that get the SIGTERM directly die
        mid-shutdown and can stall the worker until SIGKILL). The SIGKILL of the group then
        ends anything left, grandchildren included.
        """
        with self._lock:
            started = list(self.started)
        for _, proc, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc, _ in started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc, _ in started:
            _signal_group(proc, signal.SIGKILL)  # also reaps pool children left in the group
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # A process killed a moment ago may still be exiting: give the groups time to empty
        groups = {proc.pid for _, proc, _ in started}
        deadline = time.monotonic() + 5
        while any(group_alive(pid) for pid in groups) and time.monotonic() < deadline:
            time.sleep(0.05)


def group_alive(pgid):
    """True while a process of group ``pgid`` is alive (not a zombie)."""
    try:
        os.killpg(pgid, 0)  # signal 0: only asks whether the group exists
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def tail(path, lines=20):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- The multi-process stack of run_demo.py: a worker per queue, beat, Flower -----------------
def start_stack(processes, queues=tuple(WORKER_NAMES), beat=True, flower_port=None,
                concurrency=2, loglevel="INFO"):
    """Start one worker per queue, beat and (if a port is given) Flower, all at once.

    Returns the node names the workers will answer a ping with. Workers use the prefork pool
    (revoke(terminate=True) needs it) and send events (-E) for Flower. Mingle and gossip
    only exchange state between workers at start, which the demo does not need: without
    them a worker is ready about a second sooner.
    """
    host = socket.gethostname()
    nodes = []
    for queue in queues:
        short = WORKER_NAMES.get(queue, queue)
        processes.start(f"worker-{short}", [sys.executable, "-m", *worker_command(
            queue, "-E", "-P", "prefork", "-c", str(concurrency),
            "--without-mingle", "--without-gossip", "-l", loglevel)])
        nodes.append(f"{short}@{host}")
    if beat:
        processes.celery("beat", "beat", "-s", str(processes.run_dir / "celerybeat-schedule"),
                         "-l", loglevel)
    if flower_port:
        # Flower 2.x answers its API with 401 unless auth is configured or this is set
        processes.celery("flower", "flower", "--address=127.0.0.1", f"--port={flower_port}",
                         env={"FLOWER_UNAUTHENTICATED_API": "true"})
    return nodes


def start_web(processes, port, host="127.0.0.1"):
    """Start web.py (the page that starts, watches and cancels slow_task); return its URL."""
    processes.start("web", [sys.executable, str(HERE / "web.py"), "--host", host,
                            "--port", str(port)])
    return f"http://{host}:{port}/"


def wait_for_port(host, port, timeout):
    """True once something accepts TCP connections on host:port (Flower), False at timeout."""
    def accepts():
        with socket.create_connection((host, port), timeout=0.5):
            return True
    try:
        return eventually(accepts, f"{host}:{port} accepting connections", timeout,
                          interval=0.2, ignore=OSError)
    except TimeoutError:
        return False


def free_port(preferred=5555):
    """``preferred`` if nothing listens there, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
