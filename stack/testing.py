"""Throw-away RabbitMQ vhosts and users, Redis key prefixes and PostgreSQL databases, and the
RabbitMQ admin calls the tests need, for the tests and benchmark.py: a run never touches a
user's data and removes what it made.

Owns ``rabbit_admin(url)``: one way to administer the broker a URL points at, through the
RabbitMQ management HTTP API (port 15672, with the URL's own credentials: the docker-compose
broker, user ``celery``, has no local ``rabbitmqctl``), or a local ``rabbitmqctl``. Enable the
plugin with ``rabbitmq-plugins enable rabbitmq_management`` (.ci/run does).
"""
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlparse

from .services import DEFAULT_BACKEND, DEFAULT_BROKER

MANAGEMENT_PORT = int(os.environ.get("RABBITMQ_MANAGEMENT_PORT", "15672"))


class AdminUnavailable(RuntimeError):
    """Neither the management API nor a local rabbitmqctl can administer this broker."""


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


def _local(host):
    return host in (None, "", "localhost", "127.0.0.1", "::1")


class ManagementAdmin:
    """The RabbitMQ management HTTP API, as the broker URL's user."""
    way = "management API"

    def __init__(self, url):
        import requests
        parsed = urlparse(url)
        self.base = f"http://{parsed.hostname or 'localhost'}:{MANAGEMENT_PORT}/api"
        self.session = requests.Session()
        self.session.auth = (unquote(parsed.username or "guest"),
                             unquote(parsed.password or "guest"))

    def _call(self, method, path, ok=(200, 201, 204), **kwargs):
        response = self.session.request(method, self.base + path, timeout=10, **kwargs)
        if response.status_code not in ok:
            raise AdminUnavailable(f"{method} {self.base}{path}: {response.status_code} "
                                   f"{response.text[:200]}")
        return response.json() if response.content else None

    def check(self):
        self._call("GET", "/whoami")

    def add_vhost(self, name):
        self._call("PUT", f"/vhosts/{quote(name, safe='')}")

    def delete_vhost(self, name):
        self._call("DELETE", f"/vhosts/{quote(name, safe='')}", ok=(204, 404))

    def set_permissions(self, vhost, user):
        self._call("PUT", f"/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
                   json={"configure": ".*", "write": ".*", "read": ".*"})

    def clear_permissions(self, vhost, user):
        self._call("DELETE", f"/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
                   ok=(204, 404))

    def add_user(self, user, password):
        self._call("PUT", f"/users/{quote(user, safe='')}", json={"password": password,
                                                                   "tags": ""})

    def delete_user(self, user):
        self._call("DELETE", f"/users/{quote(user, safe='')}", ok=(204, 404))

    def connections(self, vhost):
        listing = self._call("GET", f"/vhosts/{quote(vhost, safe='')}/connections")
        return [connection["name"] for connection in listing]

    def close_connection(self, name, reason):
        self._call("DELETE", f"/connections/{quote(name, safe='')}", ok=(204, 404),
                   headers={"X-Reason": reason})

    def delete_queue(self, vhost, queue):
        self._call("DELETE", f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")

    def queue_counts(self, vhost, queue):
        """(ready, unacknowledged); the management API samples them every few seconds."""
        info = self._call("GET", f"/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
        return info.get("messages_ready", 0), info.get("messages_unacknowledged", 0)


class RabbitmqctlAdmin:
    """A local rabbitmqctl (root, or the rabbitmq user): this machine's broker only."""
    way = "rabbitmqctl"

    def check(self):
        if not rabbitmqctl_usable():
            raise AdminUnavailable("rabbitmqctl is missing or not permitted")

    def add_vhost(self, name):
        rabbitmqctl("add_vhost", name)

    def delete_vhost(self, name):
        rabbitmqctl("delete_vhost", name)

    def set_permissions(self, vhost, user):
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def clear_permissions(self, vhost, user):
        rabbitmqctl("clear_permissions", "-p", vhost, user)

    def add_user(self, user, password):
        rabbitmqctl("add_user", user, password)

    def delete_user(self, user):
        rabbitmqctl("delete_user", user)

    def connections(self, vhost):
        listing = rabbitmqctl("list_connections", "pid", "vhost")
        return [line.split("\t")[0] for line in listing.splitlines()
                if line.split("\t")[1:2] == [vhost]]

    def close_connection(self, name, reason):
        rabbitmqctl("close_connection", name, reason)

    def delete_queue(self, vhost, queue):
        rabbitmqctl("delete_queue", "-p", vhost, queue)

    def queue_counts(self, vhost, queue):
        """(ready, unacknowledged), read from the queue process itself: no sampling delay."""
        out = rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready",
                          "messages_unacknowledged")
        for line in out.splitlines():
            name, *counts = line.split("\t")
            if name == queue:
                return tuple(int(c) for c in counts)
        raise AdminUnavailable(f"no queue {queue!r} in vhost {vhost!r}")


def rabbit_admin(url=DEFAULT_BROKER, way=None):
    """An admin for the broker at ``url``; ``way`` ("management"/"rabbitmqctl") forces one.

    By default the management API (a call takes milliseconds, rabbitmqctl about a second),
    with a local rabbitmqctl for a broker on this machine when the API does not answer. Where
    both work, connections and queue lengths are read with rabbitmqctl: the API samples them
    only every 5 s. Raises AdminUnavailable saying what was tried.
    """
    local = _local(urlparse(url).hostname)
    problems = []
    if way in (None, "management"):
        try:
            admin = ManagementAdmin(url)
            admin.check()
            if way is None and local and rabbitmqctl_usable():
                live = RabbitmqctlAdmin()
                admin.connections, admin.close_connection = live.connections, live.close_connection
                admin.queue_counts = live.queue_counts
            return admin
        except Exception as exc:  # refused, 401, plugin off: each says why
            problems.append(f"management API: {exc.__class__.__name__}: {exc}")
    # rabbitmqctl would administer this machine's broker, not a remote one
    if way == "rabbitmqctl" or way is None and local:
        if rabbitmqctl_usable():
            return RabbitmqctlAdmin()
        problems.append("rabbitmqctl: missing or not permitted")
    raise AdminUnavailable("cannot create throw-away vhosts (" + "; ".join(problems) +
                           "); enable the management plugin: "
                           "`rabbitmq-plugins enable rabbitmq_management`")


def vhost_of(url):
    """The vhost a broker URL names ("/" for amqp://host// and amqp://host)."""
    path = urlparse(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


@contextmanager
def throwaway_vhost(base_url=DEFAULT_BROKER, prefix="celery-demo", admin=None):
    """Yield a broker URL on a new vhost that is deleted (with all its queues) afterwards."""
    admin = admin or rabbit_admin(base_url)
    parsed = urlparse(base_url)
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin.add_vhost(name)
    try:
        admin.set_permissions(name, unquote(parsed.username or "guest"))
        yield parsed._replace(path="/" + name).geturl()
    finally:
        admin.delete_vhost(name)


@contextmanager
def throwaway_user(admin, vhost, prefix="celery-demo"):
    """Yield (user, password) of a new RabbitMQ user allowed on ``vhost``, deleted afterwards."""
    import secrets
    user, password = f"{prefix}-{secrets.token_hex(4)}", secrets.token_hex(12)
    admin.add_user(user, password)
    try:
        admin.set_permissions(vhost, user)
        yield user, password
    finally:
        admin.delete_user(user)


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



POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextmanager
def throwaway_postgres_database(admin_url=POSTGRES_ADMIN_URL, prefix="celery_demo"):
    """Yield a ``db+postgresql+psycopg://`` result backend URL on a new database that is
    dropped afterwards (with the connections still open to it)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT",
                                     connect_args={"connect_timeout": 3},
                                     poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(admin_url).set(database=name)
        yield "db+" + url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def postgres_databases(admin_url=POSTGRES_ADMIN_URL, prefix="celery_demo"):
    """The names of databases starting with ``prefix`` (to check that none is left)."""
    import sqlalchemy
    admin = sqlalchemy.create_engine(admin_url, connect_args={"connect_timeout": 3},
                                     poolclass=sqlalchemy.pool.NullPool)
    try:
        with admin.connect() as conn:
            rows = conn.execute(sqlalchemy.text(
                "SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": prefix + "%"})
            return [row[0] for row in rows]
    finally:
        admin.dispose()
