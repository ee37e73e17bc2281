"""web.py against real workers: its JSON API, its answers to bad input and to services that do
not answer, `run_demo.py --web`, and the page itself in headless Chromium.

    pytest tests/test_web.py

The workers are prefork processes for `celery` and `slow_queue`, as run_demo.py starts them
(revoke with terminate needs prefork), on a throw-away vhost or the embedded stack.
"""
import time
import uuid

import pytest
import requests

import stack
from conftest import client_app, print_logs_if_failed


class Web:
    """web.py on a free port, with the processes it runs next to."""

    def __init__(self, processes, env):
        self.port = stack.free_port(0)
        self.url = stack.start_web(processes, self.port)
        self.env = env
        assert stack.wait_for_port("127.0.0.1", self.port, 30), processes.log_tail("web")

    def call(self, method, path, **kwargs):
        return requests.request(method, self.url.rstrip("/") + path, timeout=30, **kwargs)

    def start(self, duration):
        answer = self.call("POST", "/api/slow_task", json={"duration": duration})
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def until(self, task_id, wanted, timeout):
        """The task's GET answers until its state is in ``wanted``; returns all of them."""
        seen = []

        def reached():
            seen.append(self.call("GET", f"/api/tasks/{task_id}").json())
            return seen[-1]["state"] in wanted
        stack.eventually(reached, f"task {task_id} in {wanted} (seen {seen[-3:]})", timeout,
                         interval=0.2)
        return seen


@pytest.fixture(scope="module")
def web(module_env, tmp_path_factory, request):
    processes = stack.Processes(tmp_path_factory.mktemp("web"), env=module_env)
    app = client_app(module_env)
    failed_before = request.session.testsfailed
    try:
        nodes = stack.start_stack(processes, queues=("celery", "slow_queue"), beat=False)
        stack.wait_for_workers(app, nodes, 60, processes)
        yield Web(processes, module_env)
    finally:
        print_logs_if_failed(request, failed_before, processes)
        processes.stop_all()
        app.close()


def test_post_starts_slow_task_and_get_shows_progress_then_the_result(web):
    task_id = web.start(3)
    seen = web.until(task_id, {"SUCCESS"}, 30)
    progress = [s for s in seen if s["state"] == "PROGRESS"]
    assert progress and all(s["total"] == 3 and 1 <= s["current"] <= 3 for s in progress), seen
    assert any(s["current"] < 3 for s in progress), seen  # it advanced, not jumped to the end
    done = seen[-1]
    assert done["id"] == task_id and done["current"] == done["total"] == 3
    assert done["result"]["steps"] == 3
    assert set(done) == {"id", "state", "current", "total", "result"}


def test_delete_terminates_a_running_task_which_ends_revoked(web):
    task_id = web.start(60)
    web.until(task_id, {"PROGRESS"}, 20)
    answer = web.call("DELETE", f"/api/tasks/{task_id}")
    assert answer.status_code == 202, answer.text
    started = time.monotonic()
    web.until(task_id, {"REVOKED"}, 15)
    assert time.monotonic() - started < 15  # not 60 s: the task was terminated
    again = web.call("DELETE", f"/api/tasks/{task_id}")
    assert again.status_code == 409 and "already ended: REVOKED" in again.json()["error"]


def test_several_tasks_run_at_a_time(web):
    ids = [web.start(2) for _ in range(2)]
    for task_id in ids:
        assert web.until(task_id, {"SUCCESS"}, 30)[-1]["result"]["steps"] == 2


@pytest.mark.parametrize("body, says", [
    ({"duration": -1}, "duration must be a whole number of seconds from 1 to 600, not -1"),
    ({"duration": 0}, "not 0"),
    ({"duration": "abc"}, "not 'abc'"),
    ({"duration": True}, "not True"),
    ({"duration": 2.5}, "not 2.5"),
    ({"duration": 601}, "not 601"),
    ({}, 'send a JSON object such as {"duration": 5}'),
    ([5], 'send a JSON object such as {"duration": 5}'),
])
def test_a_duration_that_is_not_a_positive_number_gets_400_saying_so(web, body, says):
    answer = web.call("POST", "/api/slow_task", json=body)
    assert answer.status_code == 400 and says in answer.json()["error"], answer.text


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_malformed_task_id_gets_400_saying_so(web, method):
    answer = web.call(method, "/api/tasks/not-a-task-id")
    assert answer.status_code == 400, answer.text
    assert "'not-a-task-id' is not a task id (a UUID" in answer.json()["error"]


def test_an_unknown_task_id_is_pending_as_celery_says(web):
    task_id = str(uuid.uuid4())
    answer = web.call("GET", f"/api/tasks/{task_id}").json()
    assert answer == {"id": task_id, "state": "PENDING", "current": 0, "total": None,
                      "result": None}


# --- Services that do not answer: 503 naming the service, in seconds ---------------------------
@pytest.fixture
def web_without(tmp_path, request):
    """web.py with the given broker / result backend URLs (that nothing answers)."""
    started = []

    def start(**env):
        processes = stack.Processes(tmp_path / f"web-{len(started)}",
                                    env={**stack.embedded_env(tmp_path), **env})
        started.append(processes)
        return Web(processes, env)
    failed_before = request.session.testsfailed
    yield start
    for processes in started:
        print_logs_if_failed(request, failed_before, processes)
        processes.stop_all()


def test_a_broker_that_does_not_answer_gets_503_naming_it_in_seconds(web_without):
    web = web_without(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    started = time.monotonic()
    answer = web.call("POST", "/api/slow_task", json={"duration": 1})
    took = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert "the broker at amqp://guest:**@127.0.0.1:1//" in answer.json()["error"]
    assert took < 15, f"{took:.1f}s"
    print(f"\nno broker: 503 after {took:.1f}s: {answer.json()['error']}")


def test_a_result_backend_that_does_not_answer_gets_503_naming_it_in_seconds(web_without):
    web = web_without(CELERY_RESULT_BACKEND="redis://127.0.0.1:1/0")
    started = time.monotonic()
    answer = web.call("GET", f"/api/tasks/{uuid.uuid4()}")
    took = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert "the result backend (Redis) at redis://127.0.0.1:1/0" in answer.json()["error"]
    assert took < 15, f"{took:.1f}s"
    print(f"\nno result backend: 503 after {took:.1f}s: {answer.json()['error']}")
