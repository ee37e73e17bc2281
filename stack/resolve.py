"""The one resolver: defaults, the environment, --broker/--backend and the auto fallback become
the environment (CELERY_BROKER_URL, CELERY_RESULT_BACKEND, ...) of every process of a run.

Owns ``resolve(broker, backend, ...)``, which run_demo.py, benchmark.py, client_fixed.py and the
tests call, and the two rules it is made of: ``configured(role, kind)`` (the environment's URL
when it is of that kind, else that kind's default: stack/services.py) and ``candidates(kind)``
(the brokers of a kind worth trying, in order). What a URL is comes from the capability table
(stack/capabilities.py), never from its scheme here.

Broker modes: ``configured`` (the environment's URLs or the defaults, unchecked: the caller
checks), ``auto`` (the configured pair if both answer, else RabbitMQ and Redis from docker
compose, else the embedded stack), a kind (``rabbitmq``, ``redis``, ``sqs`` (a local server
unless the environment names one), ``embedded``) or ``docker``. Backend modes: ``auto`` (what
goes with the broker) or a kind (``redis``, ``postgresql``, ``rpc``, ``file``).
"""
import os
from pathlib import Path

from .capabilities import BACKENDS, BROKERS, broker_kind, component
from .compose import (COMPOSE_SERVICES, compose_broker_url, compose_running, compose_up,
                      docker_engine_available)
from .embedded import embedded_env
from .localsqs import start_local_sqs
from .processes import Processes
from .services import (BACKEND_URLS, BROKER_URLS, DEFAULT_BACKEND, DEFAULT_BROKER,
                       ServiceUnavailable, check_services, mask, reachable)

__all__ = ["resolve", "configured", "candidates", "BROKER_MODES", "BACKEND_MODES"]

BROKER_MODES = ("auto", "rabbitmq", "redis", "sqs", "embedded", "docker")
BACKEND_MODES = ("auto", "redis", "postgresql", "rpc", "file")
ROLES = {"broker": ("CELERY_BROKER_URL", BROKERS, BROKER_URLS, DEFAULT_BROKER),
         "result backend": ("CELERY_RESULT_BACKEND", BACKENDS, BACKEND_URLS, DEFAULT_BACKEND)}


def configured(role, kind=None, environ=None):
    """The URL of ``role`` ("broker" or "result backend"): the environment's when it is of
    ``kind`` (any kind when None), else the default URL of that kind."""
    variable, table, defaults, default = ROLES[role]
    url = (os.environ if environ is None else environ).get(variable, "")
    if kind is None:
        return url or default
    return url if url and component(url, table).kind == kind else defaults[kind]


def candidates(kind, environ=None):
    """The brokers of ``kind`` worth trying, in the order of the auto fallback: the configured
    one, the local default, docker compose's (a named user: guest logs in only from localhost)."""
    environ = os.environ if environ is None else environ
    urls = (environ.get("CELERY_BROKER_URL"), BROKER_URLS.get(kind),
            compose_broker_url() if kind == "rabbitmq" else None)
    return [url for url in dict.fromkeys(urls) if url and broker_kind(url) == kind]


def _quiet(message):
    pass


def resolve(broker="auto", backend="auto", run_dir=None, started=None, say=_quiet):
    """The environment of every process of this run: a dict of CELERY_* variables.

    ``run_dir`` holds what a mode makes (the embedded stack's folders, file:// results, a local
    SQS server's log); ``started`` records what it started for the caller to stop ("services":
    Processes, "compose": the compose services); ``say`` reports each choice in a line.
    A broker or backend named by kind is checked (ServiceUnavailable, MissingDriver: one line
    saying how to fix it); auto checks by trying; ``configured`` leaves the check to the caller.
    """
    started = {} if started is None else started
    run_dir = Path(run_dir) if run_dir else None
    env = _broker(broker, run_dir, started, say, with_postgres=backend == "postgresql")
    if backend not in ("auto", "configured"):
        if backend == "file":  # the folder is made below, once the services answer
            env["CELERY_RESULT_BACKEND"] = f"file://{run_dir / 'results'}"
        else:
            env["CELERY_RESULT_BACKEND"] = configured("result backend", backend)
    if broker not in ("auto", "docker", "configured") or backend not in ("auto", "configured"):
        check_services(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"])
        say(f"services: broker {mask(env['CELERY_BROKER_URL'])} and result backend "
            f"{mask(env['CELERY_RESULT_BACKEND'])} (both answer)")
    if backend == "file":  # only now: a run that fails before starting leaves no folder
        (run_dir / "results").mkdir(parents=True, exist_ok=True)
    return env


def _broker(mode, run_dir, started, say, with_postgres=False):
    """The broker's environment (and the result backend that goes with it in auto mode)."""
    broker, backend = configured("broker"), configured("result backend")
    pair = {"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend}
    if mode == "configured":
        return pair
    if mode in ("rabbitmq", "redis"):
        return {**pair, "CELERY_BROKER_URL": configured("broker", mode)}
    if mode == "sqs":
        if broker_kind(broker) != "sqs":
            services = started["services"] = Processes(run_dir)
            pair["CELERY_BROKER_URL"] = start_local_sqs(services)
            say(f"services: a local SQS-compatible server (moto) at "
                f"{mask(pair['CELERY_BROKER_URL'])}; its queues vanish when it stops")
        return pair
    if mode == "embedded":
        return embedded_env(run_dir)
    where = f"broker {mask(broker)} and result backend {mask(backend)}"
    if mode == "auto" and reachable(broker, backend):
        say(f"services: using the configured {where} (both answer)")
        return pair
    if mode == "auto":
        say(f"the configured {where} do not both answer")
    if mode in ("auto", "docker") and docker_engine_available():
        # compose's RabbitMQ has a named user: guest may log in only from localhost
        broker = os.environ.get("CELERY_BROKER_URL", compose_broker_url())
        running = compose_running()  # someone else's: leave them running at the end
        services = (*COMPOSE_SERVICES, *(("postgres",) if with_postgres else ()))
        started["compose"] = [s for s in services if s not in running]
        say(f"services: `docker compose up -d {' '.join(services)}` (already running: "
            f"{', '.join(sorted(running)) or 'none'}), then broker {mask(broker)} and "
            f"result backend {mask(backend)}")
        try:
            compose_up(broker, backend, services=services)
            return {"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend}
        except ServiceUnavailable as exc:
            if mode == "docker":
                raise
            say(str(exc))
    elif mode == "docker":
        raise ServiceUnavailable("no Docker engine answers `docker info`; start Docker, "
                                 "or use --broker embedded")
    elif mode == "auto":
        say("no Docker engine answers `docker info`")
    say("services: embedded stack, nothing to install: kombu filesystem:// transport and "
        "file:// results in the run folder")
    return embedded_env(run_dir)

