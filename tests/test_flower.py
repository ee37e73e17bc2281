"""Flower, for real: what it shows of the demo, and its authentication.

    pytest tests/test_flower.py

On a throw-away stack (RabbitMQ vhost, or the embedded stack) this starts a worker per queue (as run_demo.py does, with -E), two Flowers
(one with basic auth, one without any auth) and runs a few demos with client_fixed.py. Then it
asks Flower's HTTP API what a user would look for on its pages: every worker with its queue,
and each demo task with its arguments and final state.
"""
import json

import pytest
import requests

from helpers import client_app, python, throwaway_stack

import stack

import demos

DEMOS = tuple(demos.DEMOS)  # every demo of the catalogue, as client_fixed.py runs them
# The task each demo is about, as Flower lists it once the demo has run: its name, its
# arguments (None: any), its final state. Each entry picks out that demo's own task.
DEMO_TASKS = {
    "basic": ("tasks.add", "(2, 3)", "SUCCESS"),
    "states": ("tasks.take_time", "(0.5,)", "SUCCESS"),
    "progress": ("tasks.slow_task", "(5,)", "SUCCESS"),
    "routing": ("tasks.fast_task", "('routed',)", "SUCCESS"),
    "canvas": ("tasks.process_data", "(5,)", "SUCCESS"),            # the chain's first step
    "workflow": ("tasks.send_notification", None, "SUCCESS"),
    "chunks": ("tasks.multiply", None, "SUCCESS"),
    "retry": ("tasks.fetch_url", None, "SUCCESS"),                 # after two retries
    "time_limit": ("tasks.time_limited", "(5,)", "SUCCESS"),       # stopped at its soft limit
    "rate_limit": ("tasks.limited_task", None, "SUCCESS"),
    "periodic": ("tasks.check_system", None, "SUCCESS"),           # sent by beat
    "callbacks": ("tasks.important_task", "('retry',)", "SUCCESS"),
    "logging": ("tasks.log_work", "(3,)", "SUCCESS"),
    "priority": ("tasks.priority_task", "('high',)", "SUCCESS"),
    "expires": ("tasks.add", "(1, 1)", "REVOKED"),                 # revoked, never run
    "revoke": ("tasks.slow_task", "(40,)", "REVOKED"),             # revoke(terminate=True)
}
NO_TASK = {"inspect"}  # demos that send no task
BEAT_TASKS = {"tasks.check_system", "tasks.generate_report"}  # beat keeps sending these
USER, PASSWORD = "admin", "flower-test"
UNAUTHENTICATED_401 = ("FLOWER_UNAUTHENTICATED_API environment variable is required to enable "
                       "API without authentication")
FINAL = {"SUCCESS", "FAILURE", "REVOKED"}


class Flower:
    def __init__(self, port, auth=None):
        self.base, self.auth = f"http://127.0.0.1:{port}", auth

    def get(self, path, auth="default", **params):
        auth = self.auth if auth == "default" else auth
        return requests.get(self.base + path, params=params, auth=auth, timeout=10)

    def api(self, path, **params):
        response = self.get(path, **params)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def demo_in_flower(tmp_path_factory):
    """Workers, two Flowers and the demos' tasks; yields (Flower with auth, Flower without, nodes)."""
    with throwaway_stack(tmp_path_factory.mktemp("stack")) as env:
        run_dir = tmp_path_factory.mktemp("flower")
        processes = stack.Processes(run_dir, env=env)
        app = client_app(env)
        try:
            nodes = stack.start_stack(processes, beat=True, concurrency=1)
            secured = Flower(stack.free_port(0), auth=(USER, PASSWORD))
            bare = Flower(stack.free_port(0))
            for name, flower, extra in (("flower-auth", secured, [f"--basic_auth={USER}:{PASSWORD}"]),
                                        ("flower-bare", bare, [])):
                processes.celery(name, "flower", "--address=127.0.0.1",
                                 f"--port={flower.base.rsplit(':', 1)[1]}", *extra)
            stack.wait_for_workers(app, nodes, 60, processes)
            # Flower only knows of tasks whose events it received: wait until its event
            # receiver has seen every worker's heartbeat before any task is sent.
            stack.eventually(lambda: set(nodes) <= set(secured.api("/api/workers", status=1)),
                             "Flower did not see every worker's events", 30,
                             ignore=requests.RequestException)
            stack.eventually(lambda: bare.get("/healthcheck").ok,
                             "the second Flower did not answer", 30,
                             ignore=requests.RequestException)
            results = run_dir / "demos.json"
            done = python("client_fixed.py", "--only", ",".join(DEMOS), "--json", str(results),
                          env=env, timeout=240)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            assert [d["name"] for d in json.loads(results.read_text())["demos"]] == list(DEMOS)
            secured.offers = stack.offers_for(env["CELERY_BROKER_URL"],
                                              env["CELERY_RESULT_BACKEND"])
            yield secured, bare, nodes
        finally:
            processes.stop_all()
            app.close()


def final_tasks(flower):
    """Flower's task list once every task in it has reached a final state."""
    def settled():
        tasks = flower.api("/api/tasks")
        demo_tasks = [t for t in tasks.values() if t["name"] not in BEAT_TASKS]
        return tasks if demo_tasks and all(t["state"] in FINAL for t in demo_tasks) else None
    return stack.eventually(settled, "tasks still not in a final state in Flower", 30,
                            ignore=requests.RequestException)


def test_every_per_queue_worker_appears_with_its_queue(demo_in_flower):
    flower, _, nodes = demo_in_flower
    workers = flower.api("/api/workers", refresh=1)  # refresh: Flower inspects them now
    assert set(nodes) <= set(workers)
    for node, queue in zip(nodes, stack.WORKER_NAMES):
        consumed = [q["name"] for q in workers[node]["active_queues"]]
        assert consumed == [queue], f"{node} consumes {consumed}"
    alive = flower.api("/api/workers", status=1)
    assert all(alive[node] for node in nodes), alive


def test_demo_tasks_appear_with_arguments_and_final_states(demo_in_flower):
    flower, _, nodes = demo_in_flower
    tasks = list(final_tasks(flower).values())

    def find(name, args):
        found = [t for t in tasks if t["name"] == name and t["args"] == args]
        assert found, f"no {name}{args} in Flower: {sorted({t['name'] for t in tasks})}"
        return found[0]

    basic = find("tasks.add", "(2, 3)")
    assert basic["state"] == "SUCCESS" and basic["result"] == "5"
    assert basic["worker"] == nodes[0]                       # default@host, queue celery
    assert find("tasks.fast_task", "('routed',)")["worker"] == nodes[1]
    failed = find("tasks.important_task", "('fail',)")
    assert failed["state"] == "FAILURE" and "RuntimeError" in failed["exception"]
    assert find("tasks.important_task", "('retry',)")["state"] == "SUCCESS"  # after a retry
    chord_body = [t for t in tasks if t["name"] == "tasks.combine_results"]
    assert chord_body and all(t["state"] == "SUCCESS" for t in chord_body)
    names = {t["name"] for t in tasks}
    assert {"tasks.process_data", "tasks.validate_data", "tasks.save_result",
            "tasks.slow_task", "tasks.success_callback", "tasks.failure_callback"} <= names


def test_every_demo_shows_its_tasks_in_a_final_state(demo_in_flower):
    flower, _, _ = demo_in_flower
    offers = flower.offers
    assert set(DEMO_TASKS) == set(DEMOS) - NO_TASK, "a demo without its task in DEMO_TASKS"
    tasks = list(final_tasks(flower).values())
    for demo, (name, args, state) in DEMO_TASKS.items():
        if demos.unsupported(demo, offers):  # the demo said so and sent nothing (e.g. FIFO)
            continue
        found = [t for t in tasks if t["name"] == name and args in (None, t["args"])]
        assert found, f"the {demo} demo's {name}{args or ''} is not in Flower"
        assert state in {t["state"] for t in found}, f"{demo}: {[t['state'] for t in found]}"
    assert {t["state"] for t in tasks if t["name"] == "tasks.fetch_url"} == {"SUCCESS"}
    # soft time limit caught (SUCCESS), hard limit killed (FAILURE)
    assert {t["state"] for t in tasks if t["name"] == "tasks.time_limited"} == {"SUCCESS",
                                                                               "FAILURE"}


def test_basic_auth_guards_pages_and_api_but_not_the_healthcheck(demo_in_flower):
    flower, _, _ = demo_in_flower
    for path in ("/", "/api/workers", "/api/tasks"):
        for auth in (None, (USER, "wrong")):
            response = flower.get(path, auth=auth)
            assert response.status_code == 401, f"{path} with {auth}: {response.status_code}"
        assert flower.get(path).status_code == 200, path
    assert flower.get("/", auth=None).headers["WWW-Authenticate"] == 'Basic realm="flower"'
    # docker-compose.yml's healthcheck relies on this one answering without credentials
    assert flower.get("/healthcheck", auth=None).status_code == 200


def test_without_auth_the_pages_work_but_the_api_answers_401(demo_in_flower):
    _, bare, _ = demo_in_flower
    assert bare.get("/workers").status_code == 200  # what a user sees in the browser ...
    response = bare.get("/api/workers")              # ... and what a script gets: the trap
    assert response.status_code == 401
    assert response.text == UNAUTHENTICATED_401
