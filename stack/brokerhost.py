"""The broker host of the multi-host harness: its own RabbitMQ node and Redis server, listening on
that host's address only, with a named RabbitMQ user and vhost and a Redis password.

Not this machine's services: a separate rabbitmq-server (its own node name, Erlang cookie,
database, logs and config in a temporary folder, epmd and the CLI port on the host's loopback)
and a separate redis-server, both inside the broker host's network namespace (stack/hosts.py).
The configuration written here is the one docs/more-machines.md shows.

Owns: start_broker_host (returns the URLs other hosts use), rabbitmqctl on that node, and the
demo's layout of worker hosts (start_workers), shared by ``python -m stack.hosts`` and the tests.
"""
import os
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

from .hosts import HostsUnavailable
from .processes import WORKER_NAMES, WORKER_OPTIONS, worker_command

RABBIT_BIN = "/usr/lib/rabbitmq/bin"  # the scripts themselves: /usr/sbin's wrappers `su rabbitmq`
NODE = "celery-demo@localhost"        # localhost of the broker host's own namespace


@dataclass
class BrokerHost:
    hosts: object
    host: str
    folder: object
    user: str
    password: str
    vhost: str
    redis_password: str
    node: str = NODE        # a cluster's nodes are rabbit@<host name> (stack/cluster.py)
    loopback: bool = True   # epmd and the CLI port on loopback only; a cluster node needs them
    #                         on its address, where the other nodes reach them

    @property
    def address(self):
        return self.hosts[self.host].address

    def broker_url(self, user=None, password=None, vhost=None):
        user, password = user or self.user, password or self.password
        return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.address}:5672/"
                f"{quote(vhost or self.vhost, safe='')}")

    @property
    def result_backend(self):
        return f"redis://:{quote(self.redis_password, safe='')}@{self.address}:6379/0"

    def env(self):
        """CELERY_* variables for every process on the other hosts."""
        return {"CELERY_BROKER_URL": self.broker_url(), "CELERY_RESULT_BACKEND": self.result_backend}

    def rabbit_env(self):
        """Environment under which rabbitmq-server and rabbitmqctl find this node (and not the
        machine's): the node name, its folders, its cookie (in HOME), no env file of /etc."""
        f = self.folder
        env = {"HOME": str(f), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_CONF_ENV_FILE": str(f / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(f / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(f / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(f / "enabled_plugins"),
               "RABBITMQ_MNESIA_BASE": str(f / "mnesia"), "RABBITMQ_LOG_BASE": str(f / "log"),
               "PATH": f"{f / 'bin'}:{os.environ['PATH']}"}
        if self.loopback:
            env.update({"ERL_EPMD_ADDRESS": "127.0.0.1",  # epmd and the CLI port: loopback only
                        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                            "-kernel inet_dist_use_interface {127,0,0,1}"})
        return env

    def rabbitmqctl(self, *args, timeout=60, check=True):
        """`rabbitmqctl ARGS` against this node, run on the broker host."""
        done = self.hosts.run(self.host, [f"{RABBIT_BIN}/rabbitmqctl", "-q", *args],
                              env=self.rabbit_env(), timeout=timeout)
        if check and done.returncode:
            raise HostsUnavailable(f"rabbitmqctl {' '.join(args)} failed: "
                                   f"{(done.stderr or done.stdout).strip()}")
        return done.stdout


def rabbitmq_conf(address):
    return (f"# RabbitMQ on the broker host: AMQP on its network address only\n"
            f"listeners.tcp.1 = {address}:5672\n"
            f"# guest may log in only over loopback (the default, said out loud)\n"
            f"loopback_users.guest = true\n"
            f"log.console = true\n"
            f"log.file = false\n")


def redis_conf(address, password, folder):
    return (f"# Redis on the broker host: its network address only, and a password\n"
            f"bind {address}\n"
            f"port 6379\n"
            f"protected-mode yes\n"
            f"requirepass {password}\n"
            f'save ""\n'
            f"appendonly no\n"
            f"dir {folder}\n")


def start_broker_host(hosts, host="broker", user="demo", vhost="demo", password=None,
                      redis_password=None, timeout=90, node=NODE, conf_extra="", redis=True,
                      cookie=None, wait=True):
    """Start RabbitMQ and Redis on ``host`` of ``hosts``; create ``user`` and ``vhost``.

    Returns a BrokerHost (URLs, rabbitmqctl). The servers stop when ``hosts`` closes.
    A cluster node (stack/cluster.py) has its own ``node`` name, more configuration
    (``conf_extra``), the cluster's Erlang ``cookie``, no Redis, and is waited for later
    (``wait=False``, then ``await_rabbit``: the nodes start side by side).
    """
    folder = hosts.run_dir / f"{host}-servers"
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    broker = BrokerHost(hosts, host, folder, user, password or secrets.token_urlsafe(12), vhost,
                        redis_password or secrets.token_urlsafe(12), node=node,
                        loopback=cookie is None)
    address = broker.address
    (folder / "rabbitmq.conf").write_text(rabbitmq_conf(address) + conf_extra)
    (folder / "rabbitmq-env.conf").write_text("# nothing: not /etc/rabbitmq/rabbitmq-env.conf\n")
    (folder / "enabled_plugins").write_text("[].\n")  # no plugins: starts in seconds
    if cookie:  # every node of a cluster, and its CLI tools, must present the same cookie
        (folder / ".erlang.cookie").write_text(cookie)
        (folder / ".erlang.cookie").chmod(0o400)
    # `rabbitmqctl` on the broker host's PATH is this node's (the docs' commands run verbatim)
    for tool in ("rabbitmqctl", "rabbitmq-queues"):
        wrapper = folder / "bin" / tool
        wrapper.write_text(f'#!/bin/sh\nexec {RABBIT_BIN}/{tool} "$@"\n')
        wrapper.chmod(0o755)

    if redis:
        (folder / "redis.conf").write_text(redis_conf(address, broker.redis_password, folder))
        hosts.start(host, "redis-server", ["redis-server", str(folder / "redis.conf")])
    start_rabbit(broker)
    hosts.closers.append(lambda: stop_rabbit(broker))
    if wait:
        await_rabbit(broker, timeout)
    if wait and user:  # None: the caller creates users (the chapter's commands do, in the tests)
        broker.rabbitmqctl("add_user", user, broker.password)
        broker.rabbitmqctl("add_vhost", vhost)
        broker.rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    return broker


def start_rabbit(broker):
    """Start (or start again) this host's rabbitmq-server, logged to rabbitmq-server-HOST.log."""
    return broker.hosts.start(broker.host, f"rabbitmq-{broker.host}",
                              [f"{RABBIT_BIN}/rabbitmq-server"], env=broker.rabbit_env())


def await_rabbit(broker, timeout=90):
    """Wait until this host's RabbitMQ node has started; HostsUnavailable with its log if not."""
    deadline = time.monotonic() + timeout
    while True:
        done = broker.hosts.run(broker.host, [f"{RABBIT_BIN}/rabbitmqctl", "-q", "await_startup",
                                              "--timeout", "5"], env=broker.rabbit_env(),
                                timeout=30)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise HostsUnavailable(f"RabbitMQ on {broker.host} did not start within {timeout}s:"
                                   f"\n{broker.hosts.log(f'rabbitmq-{broker.host}')}")
        time.sleep(1)


def stop_rabbit(broker):
    """`rabbitmqctl stop` (quick and clean); what still runs is killed with the namespace."""
    try:
        broker.rabbitmqctl("stop", timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pass


# --- The demo's hosts: a worker host per queue (two for slow_queue), beat on one ---------------
WORKER_HOSTS = {"worker1": "celery", "worker2": "fast_queue", "worker3": "slow_queue",
                "worker4": "network_queue", "worker5": "slow_queue"}
EXTRA_WORKERS = [("worker4", "priority_queue")]  # a second worker on a host: (host, queue)
BEAT_HOST = "worker1"
HOST_NAMES = ["broker", "client", *WORKER_HOSTS]


def start_workers(hosts, broker, workers=None, beat_host=BEAT_HOST):
    """Start each worker host's worker (``celery -A tasks worker -Q QUEUE -n NAME@%h``) and beat
    on exactly one host; return the node names they answer a ping with."""
    nodes = []
    first = workers or WORKER_HOSTS
    for host, queue in [*first.items(), *([] if workers else EXTRA_WORKERS)]:
        argv = worker_command(queue, "-E", "-c", "2", "--without-mingle", "--without-gossip",
                              "-l", "INFO", *WORKER_OPTIONS.get(queue, ()))
        name = f"worker-{host}" if first.get(host) == queue else f"worker-{host}-{queue}"
        hosts.start(host, name, [sys.executable, "-m", *argv], env=broker.env())
        nodes.append(f"{WORKER_NAMES[queue]}@{host}")
    if beat_host:
        hosts.celery(beat_host, "beat", "beat", "-s", str(hosts.run_dir / "celerybeat-schedule"),
                     "-l", "INFO", env=broker.env())
    return nodes


def client_env(hosts, broker, host="client"):
    """What client_fixed.py needs on ``host``: the URLs, and where the workers on other hosts
    reach its flaky HTTP server (the retry demo): that host's address, not 127.0.0.1."""
    address = hosts[host].address
    return {**broker.env(), "DEMO_HTTP_HOST": address, "DEMO_HTTP_BIND": address}


@contextmanager
def client(hosts, broker, host="client", app=None):
    """A Celery client app on ``host`` (this thread's sockets live there meanwhile); every
    connection it opened is closed at the end, so nothing keeps the namespace alive. ``app``:
    a configured app to use instead (the cluster's, with quorum queues; broker is then None)."""
    from celery import Celery
    with hosts.inside(host):
        if app is None:
            app = Celery("hosts-client", set_as_current=False)
            app.config_from_object("celeryconfig")
            app.conf.update(broker_url=broker.broker_url(), result_backend=broker.result_backend)
        from .celery_gaps import install_client_workarounds
        install_client_workarounds(app)
        try:
            yield app
        finally:
            backend = app._backend  # None when nothing asked for a result
            if backend is not None and hasattr(backend, "client"):
                backend.client.connection_pool.disconnect()  # pub/sub connections too
            app.close()
