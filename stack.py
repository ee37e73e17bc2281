"""Shared plumbing: find or start a broker, start and stop workers, beat and Flower.

Used by run_demo.py, complete_demo.py, benchmark.py and the tests, so the path a user runs is
the path the tests check. It knows nothing about the demos themselves.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlparse

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps, loads
from kombu.utils.url import maybe_sanitize_url

HERE = Path(__file__).resolve().parent
DEFAULT_BROKER = "amqp://guest:guest@localhost:5672//"
DEFAULT_BACKEND = "redis://localhost:6379/0"
# Short node names per queue: `celery -A tasks worker -Q slow_queue -n slow@%h`
WORKER_NAMES = {"celery": "default", "fast_queue": "fast", "slow_queue": "slow",
                "network_queue": "network"}
# fast_queue carries many tiny tasks: a deep prefetch is worth 10x there (see benchmark.py);
# the other queues keep celeryconfig's prefetch of 1, fair for long tasks and for priorities.
WORKER_OPTIONS = {"fast_queue": ("--prefetch-multiplier", "64")}
START_HINT = ("start one with `docker compose up -d rabbitmq redis`, use your distribution's "
              "packages (rabbitmq-server, redis-server), or run `python run_demo.py`, which "
              "falls back to an embedded stack that needs no server")


class StackFailed(RuntimeError):
    """A process of the stack exited or never answered; the message holds the tail of its log."""


class ServiceUnavailable(RuntimeError):
    """A broker or result backend that cannot be reached; the message says how to fix it."""


def mask(url):
    """The URL with its password replaced, safe to print or log."""
    return maybe_sanitize_url(url)


def worker_command(queue, *extra):
    """The command a user types to start the worker of one queue (from the project folder)."""
    return ["celery", "-A", "tasks", "worker", "-Q", queue, "-n",
            f"{WORKER_NAMES.get(queue, queue)}@%h", *extra]


# --- Is a service there? -------------------------------------------------------------------
def check_broker(url, timeout=3.0):
    """Raise ServiceUnavailable unless the broker answers within ``timeout`` seconds."""
    if url.startswith(("memory://", "filesystem://")):
        return
    from kombu import Connection
    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except Exception as exc:  # every failure here means the same to the user
        raise ServiceUnavailable(
            f"cannot reach the broker at {mask(url)} ({exc.__class__.__name__}: {exc}); "
            f"{START_HINT}") from None


def check_backend(url, timeout=3.0):
    """Raise ServiceUnavailable unless a Redis result backend answers (others need no server)."""
    if not url.startswith(("redis://", "rediss://")):
        return
    import redis
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except Exception as exc:
        raise ServiceUnavailable(
            f"cannot reach the result backend at {mask(url)} ({exc.__class__.__name__}: {exc}); "
            f"{START_HINT}") from None


def reachable(broker, backend, timeout=2.0):
    try:
        check_broker(broker, timeout)
        check_backend(backend, timeout)
        return True
    except ServiceUnavailable:
        return False


def docker_engine_available(timeout=5.0):
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def embedded_env(run_dir):
    """Environment for the pure-Python stack: kombu's filesystem transport + file results."""
    root = Path(run_dir) / "embedded"
    for sub in ("messages", "control", "results"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {"CELERY_BROKER_URL": "filesystem://", "CELERY_FS_ROOT": str(root),
            "CELERY_RESULT_BACKEND": f"file://{root / 'results'}"}


class _WholeMessageChannel(filesystem.Channel):
    def get_table(self, exchange):
        try:
            with self._exchange_file(exchange).open("rb") as table:
                filesystem.lock(table, filesystem.LOCK_SH)
                data = table.read()
        except FileNotFoundError:
            return []
        return [filesystem.exchange_queue_t(*q) for q in loads(data)] if data else []

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        # Open without truncating, then lock: two workers binding at the same moment would
        # otherwise both create the file and one binding (a worker's pidbox) would be lost.
        path = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT), "r+b") as table:
            filesystem.lock(table, filesystem.LOCK_EX)  # released when the file is closed
            data = table.read()
            entries = [filesystem.exchange_queue_t(*q) for q in loads(data)] if data else []
            if entry not in entries:
                table.seek(0)
                table.truncate()
                table.write(dumps([entry, *entries]).encode())

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"  # as kombu's
        final = os.path.join(self.data_folder_out, name)
        hidden = os.path.join(self.data_folder_out, f".{name}.part")  # readers skip this name
        try:
            with open(hidden, "wb") as out:
                out.write(dumps(payload).encode())
            os.replace(hidden, final)  # atomic: a reader sees no file or the whole message
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):
    """kombu's filesystem:// transport, safe with several processes (celeryconfig uses it).

    kombu 5.7 creates a message file and then writes it; a worker that lists the folder in
    between reads an empty message and stops with ``Unrecoverable error:
    JSONDecodeError('Expecting value: line 1 column 1 (char 0)')``. Here a message is written
    under a hidden name and renamed into place, which is atomic; exchange tables (the
    bindings behind broadcast and ping) are read and updated under a lock.
    """
    Channel = _WholeMessageChannel


# --- Throw-away RabbitMQ vhosts and Redis key prefixes, for tests and benchmarks -------------
def rabbitmqctl(*args, timeout=60):
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def rabbitmqctl_usable():
    if not shutil.which("rabbitmqctl"):
        return False
    try:
        rabbitmqctl("list_vhosts", timeout=30)
        return True
    except (subprocess.SubprocessError, OSError):
        return False


@contextmanager
def throwaway_vhost(base_url=DEFAULT_BROKER, prefix="celery-demo"):
    """Yield a broker URL on a new vhost that is deleted (with all its queues) afterwards."""
    parsed = urlparse(base_url)
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, parsed.username or "guest", ".*", ".*", ".*")
        yield parsed._replace(path="/" + name).geturl()
    finally:
        rabbitmqctl("delete_vhost", name)


@contextmanager
def throwaway_redis_prefix(url=DEFAULT_BACKEND, prefix="celery-demo"):
    """Yield a key prefix for results; every key under it is deleted afterwards."""
    import redis
    key_prefix = f"{prefix}-{uuid.uuid4().hex[:10]}:"
    try:
        yield key_prefix
    finally:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
        keys = list(client.scan_iter(match=key_prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


# --- In-process workers and beat: complete_demo.py and the tests ----------------------------
@contextmanager
def in_process_workers(app, queues, beat=False, concurrency=4, run_dir=None):
    """Start real workers inside this process (threads pool), and beat if asked.

    Celery's own ``celery.contrib.testing.worker.start_worker`` runs a worker in a thread.
    The threads pool (not prefork) keeps ``memory://`` working: prefork children would each
    get their own copy of the in-memory broker. On memory:// there is one worker per queue,
    as in the real stack; on a network broker one worker consumes every queue, because
    workers in one process share kombu's event loop and would read each other's sockets.
    """
    from celery.contrib.testing.worker import start_worker
    host = socket.gethostname()
    if app.conf.broker_url.startswith("memory://"):
        groups = {f"{WORKER_NAMES.get(q, q)}@{host}": [q] for q in queues}
    else:
        groups = {f"demo@{host}": list(queues)}
    with ExitStack() as stack:
        for nodename, consumed in groups.items():
            stack.enter_context(start_worker(
                app, pool="threads", concurrency=concurrency, queues=consumed,
                hostname=nodename, perform_ping_check=False, shutdown_timeout=20,
                loglevel="WARNING"))
        if beat:
            stack.enter_context(embedded_beat(app, run_dir))
        wait_for_workers(app, list(groups), 20)
        yield list(groups)


@contextmanager
def embedded_beat(app, run_dir=None):
    from celery.beat import EmbeddedService
    folder = Path(run_dir or HERE / ".run")
    folder.mkdir(parents=True, exist_ok=True)
    beat = EmbeddedService(app, thread=True,
                           schedule_filename=str(folder / f"beat-{uuid.uuid4().hex[:6]}"))
    beat.start()
    try:
        yield beat
    finally:
        beat.stop()
        beat.join(10)


def wait_for_workers(app, names, timeout, processes=None):
    """Wait until every named worker answers a ping; raise StackFailed naming the silent ones.

    With ``processes`` (the Processes that started them) it fails at once, with the end of the
    log, when one of those processes exits, and a timeout shows the silent workers' logs.
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
        replies = app.control.ping(timeout=0.5) or []
        missing -= {name for reply in replies for name in reply}


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

    def __init__(self, run_dir, env=None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.started = []  # (name, Popen, log path)
        self._lock = threading.Lock()

    def start(self, name, argv, env=None):
        log_path = self.run_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, cwd=HERE, env={**self.env, **(env or {})},
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
        """Names whose process group still has a member (a worker's pool children included)."""
        left = []
        for name, proc, _ in self.started:
            try:
                os.killpg(proc.pid, 0)  # signal 0: only asks whether the group exists
                left.append(name)
            except (ProcessLookupError, PermissionError):
                pass
        return left

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
        processes.celery(f"worker-{short}", "worker", "-Q", queue, "-n", f"{short}@%h", "-E",
                         "-P", "prefork", "-c", str(concurrency),
                         "--without-mingle", "--without-gossip", "-l", loglevel,
                         *WORKER_OPTIONS.get(queue, ()))
        nodes.append(f"{short}@{host}")
    if beat:
        processes.celery("beat", "beat", "-s", str(processes.run_dir / "celerybeat-schedule"),
                         "-l", loglevel)
    if flower_port:
        # Flower 2.x answers its API with 401 unless auth is configured or this is set
        processes.celery("flower", "flower", "--address=127.0.0.1", f"--port={flower_port}",
                         env={"FLOWER_UNAUTHENTICATED_API": "true"})
    return nodes


def forget_pending_results(app):
    """Stop waiting for results whose get() timed out, while the interpreter is still whole.

    A Redis result backend keeps each of them subscribed until its task ends; left to the
    interpreter's exit, unsubscribing prints "Exception ignored in: <function
    AsyncResult.__del__ ...> ImportError: sys.meta_path is None, Python is likely shutting down".
    """
    for mapping in getattr(app.backend, "_pending_results", ()):  # only async backends
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                app.backend.remove_pending_result(result)


def wait_for_port(host, port, timeout):
    """True once something accepts TCP connections on host:port (Flower), False at timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def free_port(preferred=5555):
    """``preferred`` if nothing listens there, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- docker compose: RabbitMQ and Redis in containers -----------------------------------------
COMPOSE_SERVICES = ("rabbitmq", "redis")


def compose(*args, timeout=120):
    """Run `docker compose ARGS` in the project folder; return the CompletedProcess."""
    return subprocess.run(["docker", "compose", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


def compose_up(broker, backend, timeout=90.0):
    """`docker compose up -d rabbitmq redis`, then wait until both answer; raise otherwise."""
    command = f"docker compose up -d {' '.join(COMPOSE_SERVICES)}"
    try:
        done = compose("up", "-d", *COMPOSE_SERVICES, timeout=600)  # a first run pulls images
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"`{command}` did not finish within 600s") from None
    if done.returncode:
        raise ServiceUnavailable(f"`{command}` failed: {(done.stderr or done.stdout).strip()}")
    deadline = time.monotonic() + timeout
    while not reachable(broker, backend):
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"the containers started but {mask(broker)} / {mask(backend)} did not answer "
                f"within {timeout:.0f}s; see `docker compose logs rabbitmq redis`")
        time.sleep(1)


def compose_stop(services=COMPOSE_SERVICES):
    """`docker compose stop SERVICES`: keeps the containers, so the next start is quick."""
    return compose("stop", *services, timeout=120)


def compose_running():
    """The compose services running now (to leave running what someone else started)."""
    try:
        done = compose("ps", "--status", "running", "--services", timeout=30)
    except subprocess.TimeoutExpired:
        return set()
    return set(done.stdout.split()) if done.returncode == 0 else set()


def compose_broker_url():
    """The URL of docker-compose.yml's RabbitMQ from this machine: its named user, not guest.

    The user comes from RABBITMQ_DEFAULT_USER/_PASS in the environment or in .env next to the
    compose file, as docker compose reads them; the defaults are docker-compose.yml's.
    """
    settings = {}
    dotenv = HERE / ".env"
    if dotenv.exists():
        for line in dotenv.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.lstrip().startswith("#"):
                settings[key.strip()] = value.strip().strip("'\"")
    settings.update(os.environ)
    user = settings.get("RABBITMQ_DEFAULT_USER", "celery")
    password = settings.get("RABBITMQ_DEFAULT_PASS", "celery")
    return f"amqp://{user}:{password}@localhost:5672//"
