"""The stack that needs nothing installed: kombu's filesystem transport made safe for several
processes (run_demo.py --broker embedded), and in-process workers and beat (complete_demo.py,
the tests).
"""
import errno
import os
import re
import socket
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

from celery.backends.filesystem import FilesystemBackend
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps, loads

from .capabilities import is_kind
from .processes import WORKER_NAMES, wait_for_workers
from .services import HERE


def embedded_env(run_dir):
    """Environment for the pure-Python stack: kombu's filesystem transport + file results."""
    root = Path(run_dir) / "embedded"
    for sub in ("messages", "control", "results"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return {"CELERY_BROKER_URL": "filesystem://", "CELERY_FS_ROOT": str(root),
            "CELERY_RESULT_BACKEND": f"file://{root / 'results'}"}


# A worker's mailbox (NODE.celery.pidbox), a client's replies (ID.reply.celery.pidbox), an
# event receiver's queue (celeryev.ID): queues of one process, useless once it has gone.
TRANSIENT_QUEUE = re.compile(r"\.pidbox$|^celeryev\.")


class _WholeMessageChannel(filesystem.Channel):
    # A transient queue whose oldest message has waited this long has no consumer left (a
    # worker that was killed): its binding is dropped and its messages deleted. A live worker
    # reads its mailbox within a polling interval, unless its solo pool is busy with one task.
    stale_after = 300.0
    from_transport_options = (*filesystem.Channel.from_transport_options, "stale_after")
    _swept_at = 0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.auto_delete_queues = set()

    def _new_queue(self, queue, auto_delete=False, **kwargs):
        if auto_delete:
            self.auto_delete_queues.add(queue)

    def close(self):
        # As kombu's Redis transport does: a process that ends cleanly deletes its auto-delete
        # queues (a worker's mailbox, a client's replies), so broadcasts stop going to them.
        if not self.closed:
            for queue in self.auto_delete_queues:
                try:
                    self.queue_delete(queue)  # kombu's _delete: unbind, delete its messages
                except Exception:  # noqa: BLE001 - the folders may be gone; the close goes on
                    pass
        super().close()

    def get_table(self, exchange):
        try:
            with self._exchange_file(exchange).open("rb") as table:
                filesystem.lock(table, filesystem.LOCK_SH)
                data = table.read()
        except FileNotFoundError:
            return []
        entries = [filesystem.exchange_queue_t(*q) for q in loads(data)] if data else []
        stale = self._stale_queues({entry.queue for entry in entries})
        for entry in (e for e in entries if e.queue in stale):
            super()._delete(entry.queue, exchange, entry.routing_key, entry.pattern)
        return [entry for entry in entries if entry.queue not in stale]

    def _stale_queues(self, queues):
        """The transient ``queues`` whose oldest message is older than ``stale_after`` (looked
        at once a minute at most: it lists the message folder)."""
        transient = {q for q in queues if TRANSIENT_QUEUE.search(q)}
        now = time.monotonic()
        if not transient or now - self._swept_at < min(60.0, self.stale_after / 2):
            return set()
        self._swept_at = now
        oldest = {}
        for name in os.listdir(self.data_folder_in):
            stamp, _, rest = name.partition("_")  # MONOTONIC-MS_UUID.QUEUE.msg, as kombu's
            queue = rest.partition(".")[2].removesuffix(".msg")
            if queue in transient and stamp.isdigit():
                oldest[queue] = min(int(stamp) / 1000, oldest.get(queue, now))
        return {q for q, stamp in oldest.items() if now - stamp > self.stale_after}

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
    bindings behind broadcast and ping) are read and updated under a lock. And kombu never
    unbinds a queue there (celery/kombu#1280: "Exchange bindings are never deleted"; #2437
    added the unbinding, but nothing calls it for a queue whose process left), so every
    broadcast kept writing a file for each worker that ever ran: here a worker that stops
    unbinds its mailbox, and a mailbox nobody read for ``stale_after`` seconds is dropped.
    """
    Channel = _WholeMessageChannel

    @property
    def default_connection_params(self):
        # No server, so no host name: kombu's default ('localhost') only made every worker,
        # beat and Flower log "No hostname was supplied. Reverting to default 'localhost'".
        return {"port": self.default_port}


# --- In-process workers and beat: complete_demo.py and the tests ----------------------------
class AtomicFileBackend(FilesystemBackend):
    """Celery's file:// result backend, except that a reader never sees a result half-written.

    Celery 5.7 rewrites a result file in place (open with "wb", then write): a client polling
    the state in between reads an empty file, which means PENDING, so a task seemed to go
    STARTED -> PENDING -> SUCCESS. Here the new content is written under a temporary name and
    renamed over the old file, which is atomic. celeryconfig selects it for file:// URLs.
    """

    def set(self, key, value):
        final = self._filename(key)  # bytes: Celery keeps paths and keys as bytes
        part = final + f".{os.getpid()}.{uuid.uuid4().hex[:8]}.part".encode()
        with self.open(part, "wb") as out:
            out.write(value if isinstance(value, bytes) else value.encode())
        os.replace(part, final)

    def get(self, key):
        # Celery reads a missing file as "no result yet" (PENDING), also when the whole folder
        # is gone; but then no worker can store a result, and a client would poll for ever
        # without a word.
        self._folder_is_there()
        return super().get(key)

    def _do_directory_test(self, key):
        # Celery turns any OSError here (a backend made in a new thread: one per thread) into
        # ImproperlyConfigured, "does not work correctly", which names no folder.
        self._folder_is_there()
        super()._do_directory_test(key)

    def _folder_is_there(self):
        """Raise FileNotFoundError naming the folder (stack.service_fault: `ls -ld FOLDER`)."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                    os.fsdecode(self.path))


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
    if is_kind(app.conf.broker_url, "memory"):
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

