"""Throw-away RabbitMQ vhosts, Redis key prefixes and PostgreSQL databases, for the tests and
benchmark.py: a run never touches a user's data and removes what it made.
"""
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from urllib.parse import urlparse

from .services import DEFAULT_BACKEND, DEFAULT_BROKER

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
