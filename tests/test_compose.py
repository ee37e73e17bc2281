"""docker-compose.yml, Dockerfile and .dockerignore, checked without a Docker engine.

    pytest tests/test_compose.py

There is no Docker engine on the machines that run these tests, so the files are read with
PyYAML and checked for what `docker compose up` relies on. The healthchecks of a worker and of
beat are then run for real against worker and beat processes on a throw-away vhost, and
`docker compose config` validates the file where docker compose is installed.
"""
import os
import re
from contextlib import contextmanager
import shlex
import socket
import subprocess
import sys
import time

import pytest
import yaml
from docker.utils.build import exclude_paths

from helpers import ROOT, client_app, fake_docker, run, skip

import celeryconfig
import stack

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # SafeLoader merges <<
SERVICES = COMPOSE["services"]
OWN_IMAGE = {name for name, s in SERVICES.items() if s.get("build")}
ONE_SHOT = {"client"}
VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(text, env=None):
    """What docker compose makes of ${VAR:-default}, ${VAR} and $$ in a value."""
    env = env or {}

    def replace(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        return env.get(name) or match.group(2) or ""
    return VARIABLE.sub(replace, str(text))


def strings(node):
    """Every string value in the file."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def argv(service):
    command = SERVICES[service]["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def healthcheck_command(service):
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), f"{service}: healthcheck test {test!r}"
    return test


def worker_services():
    """queue -> service, for every service that runs a worker."""
    workers = {}
    for name in SERVICES:
        if "command" in SERVICES[name] and argv(name)[:4] == ["celery", "-A", "tasks", "worker"]:
            args = argv(name)
            workers[args[args.index("-Q") + 1]] = name
    return workers


# --- What is there -----------------------------------------------------------------------
def test_the_stack_has_broker_backend_workers_beat_flower_web_and_a_client():
    assert {"rabbitmq", "redis", "beat", "flower", "web", "client"} <= set(SERVICES)
    assert SERVICES["rabbitmq"]["image"].startswith("rabbitmq:3.")
    assert SERVICES["rabbitmq"]["image"].endswith("-management"), "Flower's broker page needs it"
    assert re.fullmatch(r"redis:7\.\d+", SERVICES["redis"]["image"]), "kombu 5.7 needs Redis 6.2+"
    assert OWN_IMAGE == set(SERVICES) - {"rabbitmq", "redis", "postgres"}
    assert {SERVICES[name]["image"] for name in OWN_IMAGE} == {"celery-demo"}, "one image"


def test_every_queue_has_exactly_one_worker_named_as_stack_names_it():
    workers = worker_services()
    assert set(workers) == set(celeryconfig.QUEUE_NAMES)
    for queue, service in workers.items():
        args = argv(service)
        node = f"{stack.WORKER_NAMES[queue]}@%h"
        # the very command run_demo.py and the README use, plus the container's options
        assert args == stack.worker_command(queue, "-E", "-c", "2", "-l", "INFO"), service
        assert "-E" in args, f"{service}: without -E Flower shows no tasks"
        assert args.count("-Q") == 1, service
        # the healthcheck pings this very node ($HOSTNAME is what %h expands to)
        check = " ".join(healthcheck_command(service)[1:])
        assert f"-d {node.replace('%h', '$$HOSTNAME')}" in check, check


def test_exactly_one_beat_and_it_can_write_its_schedule():
    beats = [name for name in OWN_IMAGE if "beat" in argv(name)]
    assert beats == ["beat"]
    assert "replicas" not in str(SERVICES["beat"].get("deploy", {})), "two beats = tasks twice"
    args = argv("beat")
    schedule = args[args.index("-s") + 1]
    assert schedule.startswith("/tmp/"), "the image's user cannot write to /app"
    assert schedule in " ".join(healthcheck_command("beat")), "the healthcheck reads that file"


def test_commands_run_modules_and_files_of_this_project():
    """Each celery command is accepted as written: `celery ... --help` loads the app (-A
    tasks) and validates every option before printing help; a python command names a file."""
    checks = {}
    for name in OWN_IMAGE:
        args = argv(name)
        if args[0] == "celery":
            assert args[1:3] == ["-A", "tasks"], name
            checks[name] = subprocess.Popen(  # in parallel: each starts a Python
                [sys.executable, "-m", *local(args, "/tmp"), "--help"], cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        else:
            assert args[0] == "python" and (ROOT / args[1]).is_file(), f"{name}: {args}"
    for name, proc in checks.items():
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{name}: {' '.join(argv(name))}\n{output[-2000:]}"
        assert "Usage: python -m celery" in output, f"{name}: {output[-2000:]}"


def test_every_service_but_the_client_has_a_healthcheck():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert check.get("interval") and check.get("timeout") and check.get("retries"), name


def test_dependencies_wait_for_healthy_services():
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: the short form does not wait for health"
        for target, condition in depends.items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {target}"
            assert "healthcheck" in SERVICES[target], f"{name} waits on {target}, never healthy"
    for name in set(worker_services().values()) | {"beat", "flower"}:
        assert "rabbitmq" in SERVICES[name]["depends_on"], name
    # the client runs every demo: each worker, and beat for the periodic demo
    assert set(SERVICES["client"]["depends_on"]) == set(worker_services().values()) | {"beat"}


def test_ports_are_published_on_loopback_only():
    published = {}
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            host, host_port, container_port = str(port).split(":")
            assert host == "127.0.0.1", f"{name} publishes {port} to every interface"
            published[int(container_port)] = name
    assert published == {5672: "rabbitmq", 15672: "rabbitmq", 6379: "redis", 5432: "postgres",
                         5555: "flower", 8000: "web"}


def test_no_password_is_hard_coded_and_every_variable_has_a_default():
    for text in strings(COMPOSE):
        for match in VARIABLE.finditer(text):
            if match.group(0) != "$$":
                assert match.group(1) and ":-" in match.group(0), f"no default: {text}"
        # credentials in a URL must each be one variable (marked VAR here), not literals
        marked = VARIABLE.sub(lambda m: "$" if m.group(0) == "$$" else "VAR", text)
        for user, password in re.findall(r"://([^:/@\s]*):([^@\s]*)@", marked):
            assert user == password == "VAR", f"hard-coded credentials: {text}"
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASS|SECRET|TOKEN|AUTH", key):
                assert str(value).startswith("${"), f"{name}: {key} is hard-coded"


def test_postgres_results_are_one_variable_away_and_healthy_only_when_tcp_answers():
    postgres = SERVICES["postgres"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"]), "a pinned major version"
    password = interpolate(postgres["environment"]["POSTGRES_PASSWORD"])
    assert password, "the image refuses to start without POSTGRES_PASSWORD"
    test = healthcheck_command("postgres")
    # over TCP: during the image's first start a temporary server listens on the socket only
    assert test[:2] == ["CMD", "pg_isready"] and test[test.index("-h") + 1] == "127.0.0.1"
    # the workers wait for it, and COMPOSE_RESULT_BACKEND switches every container to it
    url = "db+postgresql+psycopg://postgres:postgres@postgres:5432/postgres"
    assert f"COMPOSE_RESULT_BACKEND={url}" in (ROOT / "docker-compose.yml").read_text()
    for name in set(worker_services().values()):
        assert "postgres" in SERVICES[name]["depends_on"], name
    for name in OWN_IMAGE:
        assert interpolate(SERVICES[name]["environment"]["CELERY_RESULT_BACKEND"],
                           {"COMPOSE_RESULT_BACKEND": url}) == url, name
    # run_demo.py --backend postgresql's default URL reaches this service from the host
    local = stack.BACKEND_URLS["postgresql"]
    assert local == url.replace(f":{password}@postgres:", f":{password}@localhost:")
    assert stack.capabilities.backend_kind(url) == "postgresql"


def test_flower_listens_for_the_published_port_and_its_api_has_auth():
    args = argv("flower")
    assert args[:4] == ["celery", "-A", "tasks", "flower"]
    assert "--address=0.0.0.0" in args and "--port=5555" in args
    auth = interpolate(SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"])
    assert re.fullmatch(r"[^:,]+:[^:,]+", auth), "without auth Flower 2.x's API answers 401"
    assert "/healthcheck" in " ".join(healthcheck_command("flower")), "exempt from auth"


def test_the_client_is_one_shot_and_reachable_by_the_network_worker():
    client = SERVICES["client"]
    assert client["profiles"] and client["restart"] == "no", "`up -d` must not start it"
    assert argv("client") == ["python", "client_fixed.py"]
    # `docker compose run` containers get no service alias, only their container name
    assert client["environment"]["DEMO_HTTP_HOST"] == client["container_name"]
    assert client["environment"]["DEMO_HTTP_BIND"] == "0.0.0.0"


# --- Dockerfile and .dockerignore -----------------------------------------------------------
def dockerfile():
    """[instruction, arguments] per step, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [line.split(None, 1) for line in joined.splitlines() if line.strip()]


def test_dockerfile_installs_the_pinned_requirements_and_runs_as_a_user():
    steps = dockerfile()
    assert steps[0] == ["FROM", f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"]
    for instruction, rest in steps:
        if instruction == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
    assert ["RUN", "pip install -r requirements.txt"] in steps
    users = [rest for instruction, rest in steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), "the worker must not run as root"
    assert [i for i, _ in steps].index("USER") > [i for i, _ in steps].index("RUN")


def test_dockerignore_keeps_secrets_out_and_the_code_in(tmp_path):
    """docker-py's own .dockerignore matcher decides, on a tree with the files in question."""
    kept_out = [".env", ".venv/bin/python", ".git/HEAD", "tests/__pycache__/x.pyc", ".run/a"]
    needed = ["requirements.txt", "tasks.py", "celeryconfig.py", "demos.py", "stack/__init__.py",
              "client_fixed.py"]
    for path in kept_out + needed:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    in_context = set(exclude_paths(str(tmp_path), patterns))
    assert not in_context & set(kept_out), in_context & set(kept_out)
    assert set(needed) <= in_context, set(needed) - in_context


@contextmanager
def patched_environ(env):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- docker compose itself, where the plugin is installed -----------------------------------
def compose_command():
    """`docker compose` (the plugin), else a standalone `docker-compose`, else None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        try:
            version = run([*command, "version"], timeout=30)
        except FileNotFoundError:
            continue
        if version.returncode == 0:
            return command
    return None


def test_docker_compose_accepts_the_file_and_celery_gets_the_user_rabbitmq_creates():
    """`docker compose config` (it parses, validates and interpolates; no engine needed) is
    the judge of ${VAR:-default}: with and without the user's own credentials."""
    command = compose_command()
    if not command:
        skip("no `docker compose` / `docker-compose` here to validate docker-compose.yml "
             "(.ci/run installs it)")
    for env in ({}, {"RABBITMQ_DEFAULT_USER": "alice", "RABBITMQ_DEFAULT_PASS": "s3cret"}):
        done = run([*command, "--profile", "client", "config"], env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        services = yaml.safe_load(done.stdout)["services"]
        assert set(services) == set(SERVICES)
        rabbit = services["rabbitmq"]["environment"]
        user, password = rabbit["RABBITMQ_DEFAULT_USER"], rabbit["RABBITMQ_DEFAULT_PASS"]
        assert (user, password) == (env.get("RABBITMQ_DEFAULT_USER", "celery"),
                                    env.get("RABBITMQ_DEFAULT_PASS", "celery"))
        assert user != "guest", "RabbitMQ refuses guest from other containers"
        # run_demo.py --broker docker reaches that RabbitMQ as the same user
        with patched_environ(env):
            assert stack.compose_broker_url() == f"amqp://{user}:{password}@localhost:5672//"
        for name in OWN_IMAGE:
            environment = services[name]["environment"]
            assert environment["CELERY_BROKER_URL"] == f"amqp://{user}:{password}@rabbitmq:5672//", name
            assert environment["CELERY_RESULT_BACKEND"] == "redis://redis:6379/0", name


# --- compose_up, with a stand-in docker ------------------------------------------------------
def test_compose_up_waits_for_postgresql_when_it_starts_it(tmp_path, monkeypatch):
    """The broker and the result backend answer at once (the embedded ones: no server needed);
    a PostgreSQL that never answers holds compose_up only when postgres is among the services."""
    path, calls = fake_docker(tmp_path)
    monkeypatch.setenv("PATH", path)
    env = stack.embedded_env(tmp_path)
    broker, backend = env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]
    with socket.socket() as closed:  # a port where nothing listens
        closed.bind(("127.0.0.1", 0))
        silent = f"db+postgresql+psycopg://postgres@127.0.0.1:{closed.getsockname()[1]}/postgres"
    stack.compose_up(broker, backend, timeout=5, postgres=silent)
    started = time.monotonic()
    with pytest.raises(stack.ServiceUnavailable) as raised:
        stack.compose_up(broker, backend, timeout=3, postgres=silent,
                         services=(*stack.COMPOSE_SERVICES, "postgres"))
    assert time.monotonic() - started >= 3, "it gave up before its deadline"
    message = str(raised.value)
    assert stack.mask(silent) in message and stack.mask(backend) not in message, message
    assert "docker compose logs rabbitmq redis postgres" in message
    assert calls.read_text().splitlines() == ["compose up -d rabbitmq redis",
                                              "compose up -d rabbitmq redis postgres"]


# --- The healthchecks, run for real ---------------------------------------------------------
LOCAL_SCHEDULE = ("/tmp/celerybeat-schedule", "{tmp}/celerybeat-schedule")


def local(parts, tmp_path):
    """A command of the file as it runs here: beat's schedule in tmp_path instead of /tmp."""
    return [part.replace(LOCAL_SCHEDULE[0], LOCAL_SCHEDULE[1].format(tmp=tmp_path))
            for part in parts]


def healthy(service, env, tmp_path):
    """Run a service's healthcheck as Docker would; True when it passes."""
    test = local(healthcheck_command(service), tmp_path)
    command = ["sh", "-c", interpolate(test[1])] if test[0] == "CMD-SHELL" else test[1:]
    return run(command, env=env, timeout=30).returncode == 0


def test_worker_and_beat_healthchecks_pass_only_while_they_run(stack_env, tmp_path):
    worker, absent = worker_services()["celery"], worker_services()["fast_queue"]
    # Docker sets HOSTNAME to the container's host name, which is what %h expands to;
    # `celery` and `python` are this virtualenv's, as they are the image's in a container.
    env = {**stack_env, "HOSTNAME": socket.gethostname(),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    assert not healthy("beat", env, tmp_path), "no schedule file yet, yet beat is healthy"
    processes = stack.Processes(tmp_path, env=stack_env)
    try:
        for service in (worker, "beat"):
            processes.start(service, [sys.executable, "-m", *local(argv(service), tmp_path)])
        # wait until the worker answers a ping (a check run earlier would wait its timeout)
        stack.wait_for_workers(client_app(stack_env), [f"default@{socket.gethostname()}"], 40,
                               processes)
        assert healthy(worker, env, tmp_path), "a running worker fails its healthcheck"
        stack.eventually(lambda: healthy("beat", env, tmp_path) or processes.exited(),
                         "beat healthy", 20, interval=0.5)
        assert not processes.exited(), [processes.log_tail(n) for n, _ in processes.exited()]
        assert not healthy(absent, env, tmp_path), "no fast_queue worker runs, yet it is healthy"
    finally:
        processes.stop_all()
