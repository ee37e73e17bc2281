"""docker compose: RabbitMQ and Redis (and PostgreSQL) in containers, for run_demo.py --broker
docker."""
import os
import shutil
import subprocess

from .processes import eventually
from .services import (BACKEND_URLS, HERE, ServiceUnavailable, check_backend, check_broker,
                       check_driver, mask)


def docker_engine_available(timeout=5.0):
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False

# --- docker compose: RabbitMQ, Redis (and PostgreSQL) in containers ---------------------------
COMPOSE_SERVICES = ("rabbitmq", "redis")


def compose(*args, timeout=120):
    """Run `docker compose ARGS` in the project folder; return the CompletedProcess."""
    return subprocess.run(["docker", "compose", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


def compose_up(broker, backend, timeout=90.0, services=COMPOSE_SERVICES,
               postgres=BACKEND_URLS["postgresql"]):
    """`docker compose up -d SERVICES`, then wait until the broker and the result backend
    answer, and PostgreSQL at ``postgres`` too when it is one of the services; raise
    ServiceUnavailable otherwise. A container is "started" long before its server accepts
    connections (PostgreSQL's image even restarts its server once on a first start)."""
    waits = [(check_broker, broker), (check_backend, backend)]
    if "postgres" in services and postgres != backend:
        waits.append((check_backend, postgres))
    for check, url in waits:  # a missing driver is named now, not after the wait
        check_driver(url, "broker" if check is check_broker else "result backend")
    command = f"docker compose up -d {' '.join(services)}"
    try:
        done = compose("up", "-d", *services, timeout=600)  # a first run pulls images
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"`{command}` did not finish within 600s") from None
    if done.returncode:
        raise ServiceUnavailable(f"`{command}` failed: {(done.stderr or done.stdout).strip()}")
    silent = []

    def all_answer():
        silent[:] = [url for check, url in waits if not _answers(check, url)]
        return not silent
    try:
        eventually(all_answer, "the services answer", timeout, interval=1)
    except TimeoutError:
        raise ServiceUnavailable(
            f"the containers started but {' and '.join(map(mask, silent))} did not answer "
            f"within {timeout:.0f}s; see `docker compose logs {' '.join(services)}`") from None


def _answers(check, url):
    try:
        check(url, timeout=2.0)
        return True
    except ServiceUnavailable:
        return False


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
