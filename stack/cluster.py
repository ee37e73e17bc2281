"""A RabbitMQ cluster on network-namespace hosts: three broker hosts with one node each, a host
for the Redis result backend, the client and worker hosts (docs/cluster.md).

The nodes are started here, each on its own host, with the configuration and the shared
Erlang cookie the chapter shows; they are *joined* by the chapter's own commands
(``rabbitmqctl join_cluster``), which tests/test_cluster.py runs as written. A node is found
by its name, ``rabbit@rabbit1``: every host's /etc/hosts (``/etc/netns/NS/hosts``, which
``ip netns exec`` puts in place of /etc/hosts) lists the three nodes. Those files are
removed with the hosts, also after a failure.

Owns: the cluster's hosts and their addresses, the nodes' names and configuration, killing a
node (SIGKILL, by PID) and starting it again, the failover URL.
"""
import os
import secrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .brokerhost import await_rabbit, redis_conf, start_broker_host, start_rabbit
from .hosts import PREFIX, Hosts, namespaces

NODE_HOSTS = ("rabbit1", "rabbit2", "rabbit3")
WORKER_HOSTS = ("worker1", "worker2")
# client .3; rabbit1..3 .11-.13; results (Redis) .14; worker1, worker2 .15, .16
HOST_NAMES = ["client", *NODE_HOSTS, "results", *WORKER_HOSTS]
NETNS_ETC = Path("/etc/netns")
# A node that loses sight of the majority stops serving (no split brain); a node that went
# silent is declared down after net_ticktime (60 s by default: a quorum queue whose leader was
# cut off accepted nothing for over a minute); see docs/cluster.md
CLUSTER_CONF = "cluster_partition_handling = pause_minority\nnet_ticktime = 10\n"


def hosts_file(hosts):
    """The /etc/hosts lines every host needs: the nodes' names, which their node names use."""
    return "".join(f"{hosts[name].address} {name}\n" for name in NODE_HOSTS)


def write_hosts_files(hosts):
    """Give every host of ``hosts`` an /etc/hosts naming the nodes; removed at close (and those
    of a run that was SIGKILLed, whose namespaces Hosts has removed, now)."""
    alive = set(namespaces())
    for stale in NETNS_ETC.glob(f"{PREFIX}-*"):
        if stale.name not in alive:
            shutil.rmtree(stale, ignore_errors=True)
    made = []
    for host in hosts.hosts.values():
        folder = NETNS_ETC / host.ns
        folder.mkdir(parents=True, exist_ok=True)
        made.append(folder)
        own = "" if host.name in NODE_HOSTS else f"{host.address} {host.name}\n"
        (folder / "hosts").write_text("127.0.0.1 localhost\n" + own + hosts_file(hosts))
    hosts.closers.insert(0, lambda: [shutil.rmtree(f, ignore_errors=True) for f in made])


@dataclass
class RabbitCluster:
    hosts: Hosts
    nodes: dict          # host name -> its BrokerHost (rabbitmqctl on that node)
    user: str
    password: str
    vhost: str
    redis_password: str

    def url(self, host):
        return (f"amqp://{quote(self.user, safe='')}:{quote(self.password, safe='')}@"
                f"{self.hosts[host].address}:5672/{quote(self.vhost, safe='')}")

    def failover_url(self, order=NODE_HOSTS):
        """``amqp://...rabbit1...;amqp://...rabbit2...;...``: kombu tries them in turn."""
        return ";".join(self.url(host) for host in order)

    @property
    def result_backend(self):
        return (f"redis://:{quote(self.redis_password, safe='')}@"
                f"{self.hosts['results'].address}:6379/0")

    def env(self):
        """CELERY_* variables of every worker and client host."""
        return {"CELERY_BROKER_URL": self.failover_url(),
                "CELERY_RESULT_BACKEND": self.result_backend, "CELERY_QUEUE_TYPE": "quorum"}

    def rabbitmqctl(self, host, *args, **kwargs):
        return self.nodes[host].rabbitmqctl(*args, **kwargs)

    def node_process(self, host):
        """The Popen of the node's newest rabbitmq-server on ``host``."""
        name = f"rabbitmq-{host}"
        return [proc for started, proc, _ in self.hosts.processes.started if started == name][-1]

    def kill(self, host):
        """SIGKILL the node on ``host`` (its whole process group, by PID): it dies at once, its
        host's kernel closes its connections (the clients see a reset, not silence)."""
        proc = self.node_process(host)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def start(self, host, timeout=90):
        """Start the node on ``host`` again; it rejoins the cluster by itself."""
        start_rabbit(self.nodes[host])
        await_rabbit(self.nodes[host], timeout)


def start_cluster(hosts, user=None, password=None, vhost="celery-demo", redis_password=None,
                  timeout=120):
    """Start a RabbitMQ node on each of NODE_HOSTS (not yet joined: see the chapter) and Redis
    on ``results``; returns a RabbitCluster. Everything stops when ``hosts`` closes."""
    write_hosts_files(hosts)
    cookie = secrets.token_hex(16)
    nodes = {host: start_broker_host(hosts, host, user=None, node=f"rabbit@{host}",
                                     conf_extra=CLUSTER_CONF, redis=False, cookie=cookie,
                                     wait=False)
             for host in NODE_HOSTS}
    cluster = RabbitCluster(hosts, nodes, user or "celery", password or secrets.token_urlsafe(12),
                            vhost, redis_password or secrets.token_urlsafe(12))
    folder = hosts.run_dir / "results-servers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "redis.conf").write_text(redis_conf(hosts["results"].address,
                                                  cluster.redis_password, folder))
    hosts.start("results", "redis-server", ["redis-server", str(folder / "redis.conf")])
    for node in nodes.values():
        await_rabbit(node, timeout)
    return cluster


def join(cluster, first="rabbit1"):
    """What sections 2 and 3 of docs/cluster.md do (tests/test_cluster.py runs those as
    written), for ``benchmark.py --cluster``: the other nodes join ``first``; then the cluster's
    user, vhost and permissions."""
    for host in NODE_HOSTS:
        if host != first:
            for step in (("stop_app",), ("join_cluster", f"rabbit@{first}"), ("start_app",)):
                cluster.rabbitmqctl(host, *step, timeout=120)
    cluster.rabbitmqctl(first, "add_user", cluster.user, cluster.password)
    cluster.rabbitmqctl(first, "add_vhost", cluster.vhost)
    cluster.rabbitmqctl(first, "set_permissions", "-p", cluster.vhost, cluster.user,
                        ".*", ".*", ".*")
