"""docker compose: RabbitMQ and Redis (and PostgreSQL) in containers, for run_demo.py --broker
docker."""
import os
import shutil
import subprocess

from .processes import eventually
from .services import HERE, ServiceUnavailable, mask, reachable


def docker_engine_available(timeout=5.0):
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False

# --- docker compose: RabbitMQ and Redis in containers -----------------------------------------
COMPOSE_SERVICES = ("rabbitmq", "redis")


def compose(*args, timeout=120):
    """Run `docker compose ARGS` in the project folder; return the CompletedProcess."""
    return subprocess.run(["docker", "compose", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


def compose_up(broker, backend, timeout=90.0, services=COMPOSE_SERVICES):
    """`docker compose up -d rabbitmq redis`, then wait until both answer; raise otherwise."""
    command = f"docker compose up -d {' '.join(services)}"
    try:
        done = compose("up", "-d", *services, timeout=600)  # a first run pulls images
    except subprocess.TimeoutExpired:
        raise ServiceUnavailable(f"`{command}` did not finish within 600s") from None
    if done.returncode:
        raise ServiceUnavailable(f"`{command}` failed: {(done.stderr or done.stdout).strip()}")
    try:
        eventually(lambda: reachable(broker, backend), "the services answer", timeout, interval=1)
    except TimeoutError:
        raise ServiceUnavailable(
            f"the containers started but {mask(broker)} / {mask(backend)} did not answer "
            f"within {timeout:.0f}s; see `docker compose logs {' '.join(services)}`") from None


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
