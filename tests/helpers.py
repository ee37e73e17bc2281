"""What the tests share, imported by name (``from helpers import python, skip``);
tests/conftest.py holds only the fixtures and the CI hook.

The stack: RabbitMQ + Redis where this machine has them (each test on a throw-away vhost and
Redis key prefix), else the embedded multi-process stack (kombu filesystem:// + file://
results, in the test's tmp_path). Only RabbitMQ-specific tests skip without RabbitMQ, and only
through ``skip()``, which fails on CI (CI=true): CI must run everything, on the real broker.

The broker the tests use is the first of these that answers and can be administered (through
the management API, or a local rabbitmqctl): CELERY_BROKER_URL if you set one, RabbitMQ's
default guest@localhost, the docker-compose broker (user celery). Your own vhost is never
touched.
"""
import functools
import importlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stack  # noqa: E402
from stack.celery_gaps import install_client_workarounds  # noqa: E402

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST = socket.gethostname()
WORKER_FLAGS = ("--without-mingle", "--without-gossip", "-E", "-l", "INFO")

# One environment rule for every process a test starts (and for this one): the environment
# pytest was started with, minus the user's own Celery, Flower, demo and RabbitMQ settings,
# plus what the test sets. The user's broker and backend are remembered first: the tests make
# their throw-away vhosts there.
# The one resolver (stack/resolve.py) says which RabbitMQ brokers are worth trying, in order
# (yours, the local default, docker compose's: it reads RABBITMQ_DEFAULT_USER/_PASS, as compose
# does), and which Redis holds the results.
USER_SETTINGS = ("CELERY_", "FLOWER_", "DEMO_", "RABBITMQ_")
RABBIT_BROKERS = stack.candidates("rabbitmq")
REDIS_BACKEND = stack.configured("result backend", "redis")
for _key in [k for k in os.environ if k.startswith(USER_SETTINGS)]:
    del os.environ[_key]
os.environ.update(PYTHONUNBUFFERED="1", COLUMNS="200")


# --- Skips: one helper, which fails on CI (conftest.py fails any other skip on CI) -------
def skip(reason):
    """Skip this test, saying why; on CI (CI=true) fail instead: CI runs every test."""
    if ON_CI:
        pytest.fail(f"CI=true, so this test must run, but: {reason}")
    pytest.skip(reason)


# --- Which services the tests use --------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def rabbit():
    """(broker URL, Redis URL, admin) of a RabbitMQ + Redis the tests may use, or a reason why
    there is none (a str)."""
    backend = REDIS_BACKEND
    problems = []
    for broker in RABBIT_BROKERS:
        try:
            stack.check_broker(broker, timeout=2)
            admin = stack.rabbit_admin(broker)
        except (stack.ServiceUnavailable, stack.AdminUnavailable) as exc:
            problems.append(str(exc))
            continue
        try:
            stack.check_backend(backend, timeout=2)
        except stack.ServiceUnavailable as exc:
            return str(exc)
        return broker, backend, admin
    return "no usable RabbitMQ: " + " | ".join(problems)


def rabbit_problem():
    found = rabbit()
    return found if isinstance(found, str) else None


class StackEnv(dict):
    """The environment variables of a throw-away stack, and what it is."""
    kind = "embedded"
    admin = vhost = None

    @property
    def is_rabbit(self):
        return self.kind == "rabbitmq"

    def only_rabbit(self, why):
        """Skip (fail on CI) unless this stack is RabbitMQ: ``why`` says what needs it."""
        if not self.is_rabbit:
            skip(f"RabbitMQ only: {why} (this machine has no RabbitMQ + Redis: "
                 f"{rabbit_problem()})")


@contextmanager
def throwaway_stack(run_dir):
    """The one throw-away environment builder: a new vhost + Redis key prefix on RabbitMQ,
    removed afterwards, or the embedded stack in ``run_dir``. On CI it must be RabbitMQ."""
    found = rabbit()
    if isinstance(found, str):
        if ON_CI:
            pytest.fail(f"CI=true, so the tests must run on RabbitMQ + Redis, but: {found}")
        env = StackEnv(stack.resolve("embedded", run_dir=run_dir))
        yield env
        return
    broker, backend, admin = found
    with stack.throwaway_vhost(broker, admin=admin) as url, \
            stack.throwaway_redis_prefix(backend) as prefix:
        env = StackEnv(CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=backend,
                       CELERY_RESULT_KEYPREFIX=prefix)
        env.kind, env.admin, env.vhost = "rabbitmq", admin, stack.vhost_of(url)
        yield env


# --- Subprocesses: one runner -----------------------------------------------------------------
def run(argv, env=None, timeout=60, cwd=ROOT):
    """Run a command as a user would, from the project folder; the result has ``seconds``.

    A hang ends in subprocess.TimeoutExpired at ``timeout``: a failure, not a wait."""
    started = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=environment(**(env or {})),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    done.seconds = time.monotonic() - started
    done.output = done.stdout + done.stderr
    return done


def environment(**extra):
    """The environment of a process a test starts (see the rule at the top), plus ``extra``."""
    return {**os.environ, **extra}


def python(*args, env=None, timeout=60, cwd=ROOT):
    """`python ARGS` with this virtualenv's interpreter: see run()."""
    return run([sys.executable, *args], env=env, timeout=timeout, cwd=cwd)


def client_app(env):
    """A client configured as a fresh process with ``env`` would be: celeryconfig read anew
    (so filesystem:// gets its folders, amqp:// its publisher confirms) and independent of the
    `tasks` module's state."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        spec = importlib.util.spec_from_file_location("celeryconfig_for_test",
                                                      ROOT / "celeryconfig.py")
        config = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    app = Celery("test-client", set_as_current=False)
    app.config_from_object(config)
    install_client_workarounds(app)  # as this project's clients do (ClientGuard)
    return app


def configure(env=None):
    """Point the one `tasks` app at another broker and backend, as a fresh process would see it
    (``env=None``: at what os.environ says now, as once a module's throw-away stack is gone).

    The environment is what celeryconfig reads; the app's cached connections, producer pool and
    result backend are dropped so that nothing still talks to the previous broker.
    """
    import celeryconfig
    import tasks
    if env is not None:
        for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_RESULT_KEYPREFIX",
                    "CELERY_FS_ROOT"):
            os.environ.pop(key, None)
        os.environ.update(env)
    importlib.reload(celeryconfig)
    app = tasks.app
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    for cached in ("amqp", "control", "events"):
        app.__dict__.pop(cached, None)
    app._backend_cache = None
    app._local = threading.local()
    app.config_from_object(celeryconfig, force=True)
    assert env is None or app.conf.broker_url == env["CELERY_BROKER_URL"]
    return app


# --- In-process workers: the `live` fixture ---------------------------------------------------
class Live:
    def __init__(self, env, app, workers):
        self.env, self.app, self.workers = env, app, workers
        self.name = env.kind

    def context(self, **kwargs):
        """A demo context with what this stack offers (in-process workers: the threads pool)."""
        import demos
        offers = stack.offers_of(self.app, pool="threads")
        return demos.Context(app=self.app, offers=offers, **kwargs)


# --- Real worker processes (test_faults.py, test_bad_input.py, test_clients.py) ------------
def start_worker(procs, name, queues, *extra):
    """`celery -A tasks worker -Q QUEUES -n NAME@%h` as stack.worker_command builds it."""
    return procs.start(name, [sys.executable, "-m",
                              *stack.worker_command(queues, *WORKER_FLAGS, *extra, name=name)])


def wait_for_log(path, text, timeout):
    """True once ``text`` is in the file at ``path``, False at the deadline."""
    try:
        return stack.eventually(lambda: text in Path(path).read_text(errors="replace"),
                                f"{text!r} in {path}", timeout, interval=0.1,
                                ignore=FileNotFoundError)
    except TimeoutError:
        return False


def worker_until_exit(run_dir, env, name, timeout=60):
    """Start a worker that should stop by itself; return (exit code, seconds, its log)."""
    procs = stack.Processes(run_dir, env)
    try:
        started = time.monotonic()
        code = start_worker(procs, name, "celery").wait(timeout=timeout)
        seconds = time.monotonic() - started
    finally:
        procs.stop_all()
    return code, seconds, (procs.run_dir / f"{name}.log").read_text(errors="replace")


@contextmanager
def worker_without(run_dir, name, broker_url):
    """A worker whose broker is not there, started now, so its retries overlap other tests.

    Its results go to file:// in ``run_dir`` (it checks its result backend first, and that
    one must answer). Yields (process, log path, seconds from start to exit); the last fails
    until it exited.
    """
    (Path(run_dir) / "results").mkdir(parents=True, exist_ok=True)
    procs = stack.Processes(run_dir, {"CELERY_BROKER_URL": broker_url,
                                      "CELERY_RESULT_BACKEND": f"file://{run_dir}/results"})
    started, ended = time.monotonic(), []
    proc = start_worker(procs, name, "celery")
    # Note when it exits, even if that is before the test looks (a daemon thread: it ends
    # when the worker does, at the latest when stop_all kills it below)
    threading.Thread(target=lambda: (proc.wait(), ended.append(time.monotonic())),
                     daemon=True).start()
    try:
        yield proc, procs.run_dir / f"{name}.log", lambda: ended[0] - started
    finally:
        procs.stop_all()


def print_logs_if_failed(request, failed_before, procs, lines=40):
    """After a failed test, the end of each log of the processes it started."""
    if request.session.testsfailed > failed_before:
        for name, _, path in procs.started:
            print(f"--- end of {name}.log ---\n{stack.tail(path, lines)}")


# --- A service failing under a client (tests/test_diagnosis.py, tests/test_sentinel.py) ----
BLOCKED_AT_MOST = 60  # seconds a call may take to fail on a frozen service (its timeouts: < 20)
# What a client is promised (a demo's deadline is 10-20 s), with slack for a loaded machine
CLIENT_DEADLINE = 30


def fault_of(app, call, within=BLOCKED_AT_MOST):
    """The line the diagnosis makes of what ``call()`` raises; it must raise within ``within``
    seconds (a daemon thread: a call that hangs fails the test, it does not hang it)."""
    raised = []

    def target():
        try:
            call()
            raised.append(None)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the diagnosis judges it
            raised.append(exc)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(within)
    assert raised, f"still blocked {within}s after the service froze: nothing bounds the wait"
    assert raised[0] is not None, "the call succeeded although its service was gone"
    return stack.service_fault(raised[0], app) or f"not a service fault: {raised[0]!r}"


# --- For tests that are about RabbitMQ itself ------------------------------------------------
def require_rabbit(why="needs RabbitMQ + Redis"):
    """Skip (fail on CI) unless this machine has a usable RabbitMQ + Redis."""
    problem = rabbit_problem()
    if problem:
        skip(f"{why}: {problem}")


def require_redis(why="needs Redis"):
    """Skip (fail on CI) unless Redis answers at the local default URL: for the tests about
    Redis alone, which a machine with Redis but no RabbitMQ can run."""
    try:
        stack.check_backend(stack.BROKER_URLS["redis"], timeout=2)
    except stack.ServiceUnavailable as exc:
        skip(f"{why}: {exc}")


def require_postgres():
    """Skip without PostgreSQL on 127.0.0.1:5432 (user postgres), as require_rabbit() does
    for RabbitMQ; on CI (CI=true) fail instead: CI must prove the PostgreSQL results."""
    try:
        stack.postgres_databases()
    except Exception as exc:  # any failure means the same here: no usable PostgreSQL
        skip(f"PostgreSQL not available: {exc.__class__.__name__}: {exc}")


# --- Scripts run as a user runs them, in a session (a process group) of their own ------------
def start(args, env, cwd, command=(sys.executable, str(ROOT / "run_demo.py"))):
    """Start ``command ARGS`` (run_demo.py by default) as a shell job: its group id is the PID
    of the command started."""
    return subprocess.Popen([*command, *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def alive_in_groups(run_dir, job_pid):
    """PIDs of live (not zombie) processes in any process group this run created."""
    pids = json.loads((run_dir / "pids.json").read_text())
    # run_demo.py (and client_fixed.py) are in the job's group, as in a shell
    groups = {job_pid, *pids["processes"].values()}
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            after_name = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        state, pgrp = after_name[0], int(after_name[2])
        if pgrp in groups and state != "Z":
            alive.append(int(entry.name))
    return alive


def finish(proc, timeout, run_dir=None):
    """The output of a job started with start(); killed (and failed) if it overran, with the
    process groups it started (``run_dir``/pids.json: run_demo's workers, beat, Flower)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pids = Path(run_dir or "/nonexistent") / "pids.json"
        for group in json.loads(pids.read_text())["processes"].values() if pids.exists() else ():
            try:
                os.killpg(group, signal.SIGKILL)  # each leads its own group: not the job's
            except ProcessLookupError:
                pass
        output, _ = proc.communicate()
        name = next((Path(a).name for a in proc.args if str(a).endswith(".py")), proc.args[0])
        pytest.fail(f"{name} still running after {timeout}s:\n{output[-4000:]}")
    return output


# --- The docs: what both languages of a page share -------------------------------------------
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
COMMENT = re.compile(r"(?:^|\s+)#(?:\s.*)?$")


def without_comments(block):
    """A code block with its comments dropped: comments may be translated, the code may not."""
    lines = [COMMENT.sub("", line).rstrip() for line in block.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def structure(text):
    """Heading levels, code blocks (without comments) and journey markers: what both languages share."""
    blocks = [without_comments(block) for block in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    levels = [len(m) for m in re.findall(r"^(#+) ", prose, re.M)]
    return levels, blocks, re.findall(r"<!-- journey: [^>]*-->", text)


# --- A stand-in `docker` (no Docker engine on CI) ---------------------------------------------
def fake_docker(tmp_path, compose_fails=False, running=()):
    """A `docker` on PATH that logs its arguments: engine up, compose ok (or failing)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "docker-calls"
    bin_dir.mkdir()
    script = f'#!/bin/sh\necho "$@" >> {calls}\n'
    if compose_fails:
        script += ('if [ "$1 $2" = "compose up" ]; then echo "Error: port 5672 is already '
                   'allocated" >&2; exit 1; fi\n')
    if running:  # what `docker compose ps --status running --services` prints
        script += f'if [ "$1 $2" = "compose ps" ]; then echo "{chr(10).join(running)}"; fi\n'
    (bin_dir / "docker").write_text(script + "exit 0\n")
    (bin_dir / "docker").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", calls


# --- The chapters run on network-namespace hosts (docs/more-machines.md, docs/cluster.md) -------
# A bash block of a chapter is run on a host: `run HOST` to its end, `background HOST NAME`
# left running; the `env` block is what every host but the broker has in its environment.
STEP = re.compile(r"(?:<!-- hosts: (\w+)((?: \S+)*) -->\n)?```(\w+)\n(.*?)```", re.S)
VENV = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # as with the venv active


def chapter_blocks(text):
    """[(kind or None, [args], language, body)] of a chapter's ``text``, in order."""
    return [(kind or None, args.split(), lang, body)
            for kind, args, lang, body in STEP.findall(text)]


def need_namespaces():
    from stack import hosts
    reason = hosts.problem()
    if reason:
        skip(f"the multi-host tests need network namespaces: {reason}")


def set_up_by_the_chapter(system, blocks, ping_timeout):
    """Set a chapter's system up by its own commands, as a reader would: every `run` block
    before the first `background` one, on its host (``system.shell``); the later `run` blocks
    are kept in ``system.later_steps`` for the tests; each `background` block is started on its
    host, under its log name (``system.workers[host, name]``), with the `env` block first. Then every worker must answer a ping.
    ``system`` has hosts, env_block, workers, nodes, said, later_steps, shell(), client(),
    logs()."""
    hosts = system.hosts
    for kind, args, _, body in blocks:
        if kind == "run" and not system.workers:
            done = system.shell(args[0], body)
            assert done.returncode == 0, f"{body}\n{done.stdout}{done.stderr}"
            system.said[body] = done.stdout
        elif kind == "run":
            system.later_steps.append((args[0], body))
        elif kind == "background":
            host, name = args
            system.workers[host, name] = hosts.start(
                host, name, ["bash", "-c", system.env_block + body], env=VENV)
            node = re.search(r"-n (\w+)@%h", body)
            system.nodes += [f"{node.group(1)}@{host}"] if node else []
    try:
        with system.client() as app:
            stack.wait_for_workers(app, system.nodes, ping_timeout, hosts.processes)
    except stack.StackFailed:
        print(system.logs())
        raise


def run_the_later_steps(system):
    """Run the chapter's later `run` blocks (``system.later_steps``) on their hosts, each of
    which must succeed (its FAIL lines shown if not); returns {block: what it printed}, the
    set-up blocks' output (``system.said``) included."""
    said = dict(system.said)
    for host, body in system.later_steps:
        done = system.shell(host, body)
        failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
        assert done.returncode == 0, f"on {host}: {body}\n" + (
            "\n".join(failed) or done.stdout + done.stderr)
        said[body] = done.stdout
    return said
