"""Several "hosts" on this one machine: Linux network namespaces, each with its own address and
host name, joined by a switch; the broker host runs its own RabbitMQ and Redis.

    sudo .venv/bin/python -m stack.hosts                 # every demo across hosts, then clean up
    sudo .venv/bin/python -m stack.hosts --keep-running  # leave the hosts up until Ctrl-C

Layout (the addresses of docs/more-machines.md): a switch namespace with a bridge, and a veth
"cable" from each host to it. ``broker`` 10.251.0.2 runs rabbitmq-server and redis-server bound
to that address (stack/brokerhost.py), ``client`` 10.251.0.3 runs client_fixed.py, and each
worker host (10.251.0.11, .12, ...) runs a worker, named ``NAME@<host name>`` through ``%h``.
Needs root (namespaces, veth, setns). Cutting a host's cable (``cut``) drops its packets
silently at the switch: no FIN, no RST, as when a machine loses power. Everything it made (the
namespaces, their cables, every process in them, the temporary folder) is removed by ``close``,
also after a failure, Ctrl-C or SIGTERM; namespaces left by a run that was SIGKILLed are removed
by the next run.

Owns: the namespaces, links, running commands on a host, entering a host from Python.
"""
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .processes import Processes, tail

SUBNET = "10.251.0"             # private; exists only inside the namespaces we create
PREFIX = "celery-demo"          # namespace names: celery-demo-<pid>-<host>
CLONE_NEWNET = 0x40000000


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here; the message says why and what to do."""


def problem():
    """None when namespaces, veth and the broker host's servers are usable here, else why not."""
    if os.geteuid() != 0:
        return ("the multi-host harness needs root (network namespaces, veth links, setns); "
                "run it with sudo, e.g. `sudo .venv/bin/python -m stack.hosts`")
    from .brokerhost import RABBIT_BIN
    tools = [shutil.which(t) and t for t in ("ip", "unshare", "hostname", "redis-server")]
    for tool, found in zip(("ip", "unshare", "hostname", "redis-server", "rabbitmq-server"),
                           tools + [os.path.exists(f"{RABBIT_BIN}/rabbitmq-server")]):
        if not found:
            return (f"`{tool}` is not installed (the harness needs iproute2, util-linux, "
                    f"redis-server, and rabbitmq-server's scripts in {RABBIT_BIN})")
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def require_root():
    """Raise HostsUnavailable (with the reason and the fix) unless the harness can run."""
    reason = problem()
    if reason:
        raise HostsUnavailable(reason)


@dataclass
class Host:
    name: str      # its host name: what `%h` becomes in `-n slow@%h`
    ns: str        # its network namespace: `ip netns exec NS ...` runs a command there
    address: str
    port: str      # its end of the cable, in the switch namespace


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def namespaces():
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace(ns, grace=3.0):
    """End every process still inside ``ns`` (they are ours: we made it), then delete it."""
    pids = lambda: [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]  # noqa
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)
    _ip("netns", "delete", ns, check=False)


def remove_stale():
    """Remove the namespaces of earlier runs whose process no longer exists (a SIGKILLed run)."""
    for ns in namespaces():
        parts = ns.split("-")
        if ns.startswith(PREFIX + "-") and len(parts) > 3 and parts[2].isdigit() \
                and not _alive(int(parts[2])):
            _kill_namespace(ns)


class Hosts:
    """A switch and one namespace per host name. Use it as a context manager.

    ``hosts = Hosts(["broker", "client", "worker1"]); with hosts: ...`` gives each name a
    namespace and an address (``hosts["broker"].address``); ``hosts.start(host, name, argv)``
    runs a process there (logged to ``run_dir/name.log``), ``hosts.cut(host)`` and
    ``hosts.restore(host)`` unplug and plug its cable, ``with hosts.inside(host):`` makes this
    thread's new sockets belong to that host.
    """

    def __init__(self, names, run_dir=None):
        self.names = list(names)
        self.own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="celery-demo-hosts-"))
        self.switch = f"{PREFIX}-{os.getpid()}-switch"
        self.hosts = {}
        workers = iter(range(11, 250))  # broker .2, client .3, every other host .11, .12, ...
        for name in self.names:
            number = {"broker": 2, "client": 3}.get(name) or next(workers)
            self.hosts[name] = Host(name, f"{PREFIX}-{os.getpid()}-{name}",
                                    f"{SUBNET}.{number}", f"p{number}")
        self.processes = None
        self.closers = []  # callables run first at close (e.g. the broker host's servers)

    def __getitem__(self, name):
        return self.hosts[name]

    # --- up and down -------------------------------------------------------------------------
    def __enter__(self):
        require_root()
        remove_stale()
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        self.processes = Processes(self.run_dir)
        _ip("netns", "add", self.switch)
        sw = ("-n", self.switch)
        _ip(*sw, "link", "add", "switch", "type", "bridge", "forward_delay", "0", "stp_state", "0")
        _ip(*sw, "link", "set", "switch", "up")
        for host in self.hosts.values():
            _ip("netns", "add", host.ns)
            # One cable: eth0 inside the host, its other end plugged into the switch
            _ip("link", "add", "eth0", "netns", host.ns, "type", "veth",
                "peer", "name", host.port, "netns", self.switch)
            _ip(*sw, "link", "set", host.port, "master", "switch", "up")
            _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")

    def close(self):
        """Stop every process, delete every namespace (their cables go with them), the folder."""
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:  # the rest of the clean-up must still run
                print(f"hosts: clean-up step failed: {exc}", file=sys.stderr)
        self.closers.clear()
        if self.processes:
            self.processes.stop_all(grace=5)
        for host in self.hosts.values():
            if host.ns in namespaces():
                _kill_namespace(host.ns)
        if self.switch in namespaces():
            _kill_namespace(self.switch)
        if self.own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def leftovers(self):
        """Namespaces of this run that still exist (a test checks this is empty after close)."""
        mine = {h.ns for h in self.hosts.values()} | {self.switch}
        return sorted(mine & set(namespaces()))

    # --- running things on a host ------------------------------------------------------------
    def command(self, host, argv):
        """``argv`` as run on ``host``: in its network namespace, under its own host name."""
        h = self.hosts[host]
        return ["ip", "netns", "exec", h.ns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', h.name, *argv]

    def start(self, host, name, argv, env=None):
        """Start a long-running process on ``host``, logging to ``run_dir/name.log``."""
        return self.processes.start(name, self.command(host, argv), env=env)

    def celery(self, host, name, *args, env=None):
        return self.start(host, name, [sys.executable, "-m", "celery", "-A", "tasks", *args],
                          env=env)

    def run(self, host, argv, env=None, timeout=120, **kwargs):
        """Run a command on ``host`` to its end; returns the CompletedProcess (text output)."""
        from .services import HERE
        return subprocess.run(self.command(host, argv), cwd=HERE, capture_output=True,
                              text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                              stdin=subprocess.DEVNULL, **kwargs)

    def log(self, name, lines=40):
        return tail(self.run_dir / f"{name}.log", lines)

    @contextmanager
    def inside(self, host):
        """Sockets this thread opens meanwhile belong to ``host`` (setns; per thread on Linux).

        Close them before leaving: a connection opened inside stays in that namespace.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.hosts[host].ns}", os.O_RDONLY)
        try:
            if libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {host} failed")
            try:
                yield self.hosts[host]
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to this machine failed")
        finally:
            os.close(there)
            os.close(home)

    # --- links -------------------------------------------------------------------------------
    def cut(self, host):
        """Unplug ``host``'s cable at the switch: its packets vanish, nobody is told (no RST)."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "down")

    def restore(self, host):
        """Plug the cable back in: the host is reachable again (its processes never stopped)."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "up")

    @contextmanager
    def outage(self, host):
        """The host's cable is unplugged inside the block, and plugged back in afterwards."""
        self.cut(host)
        try:
            yield
        finally:
            self.restore(host)


# --- python -m stack.hosts: every demo with the client, each worker and the broker on hosts ----
def main(argv=None):
    import argparse

    from .brokerhost import HOST_NAMES, client, client_env, start_broker_host, start_workers
    from .processes import wait_for_workers
    from .services import HERE
    parser = argparse.ArgumentParser(prog="python -m stack.hosts",
                                     description="Run the demos across network-namespace hosts.")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the hosts up after the demos, until Ctrl-C")
    parser.add_argument("--only", help="run only these demos (comma-separated)")
    parser.add_argument("--timeout", type=float, default=180, help="deadline for the demos")
    parser.add_argument("--run-dir", type=Path, help="folder for logs (default: a temporary one)")
    args = parser.parse_args(argv)
    say = lambda message: print(f"hosts: {message}", flush=True)  # noqa: E731

    def interrupt(signum, frame):
        raise KeyboardInterrupt  # SIGTERM too: the with-block below removes everything
    try:
        require_root()
    except HostsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, interrupt)
    code = 1
    try:
        with Hosts(HOST_NAMES, args.run_dir) as hosts:
            say("; ".join(f"{h.name} {h.address}" for h in hosts.hosts.values()))
            say(f"logs in {hosts.run_dir}")
            broker = start_broker_host(hosts)
            say(f"broker host: RabbitMQ {broker.broker_url(password='**')} and Redis "
                f"redis://:**@{broker.address}:6379/0, listening on {broker.address} only")
            nodes = start_workers(hosts, broker)
            with client(hosts, broker) as app:
                wait_for_workers(app, nodes, 60, hosts.processes)
            say(f"workers answer from their hosts: {', '.join(nodes)}; beat on worker1")
            command = [sys.executable, "client_fixed.py", "--timeout", str(args.timeout)]
            command += ["--only", args.only] if args.only else []
            code = subprocess.run(hosts.command("client", command), cwd=HERE,
                                  env={**os.environ, **client_env(hosts, broker)},
                                  timeout=args.timeout + 60).returncode
            if args.keep_running:
                say("the hosts keep running; Ctrl-C removes them. A shell on a host: "
                    f"sudo ip netns exec {hosts['client'].ns} bash")
                while True:
                    time.sleep(1)
    except KeyboardInterrupt:
        say("interrupted")
        code = 130 if not args.keep_running else code
    except Exception as exc:  # noqa: BLE001  one line, not a traceback; the hosts are gone
        print(f"error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        code = 1
    left = [ns for ns in namespaces() if ns.startswith(f"{PREFIX}-{os.getpid()}-")]
    say(f"exit code {code}; " + (f"left behind: {', '.join(left)}" if left else
                                 "every namespace, link and process removed"))
    return code


if __name__ == "__main__":
    from stack.hosts import main as _main  # the package's module, not a second copy of it
    sys.exit(_main())
