"""web.py against real workers: its JSON API, its answers to bad input and to services that do
not answer, `run_demo.py --web`, and the page itself in headless Chromium.

    pytest tests/test_web.py

The workers are prefork processes for `celery` and `slow_queue`, as run_demo.py starts them
(revoke with terminate needs prefork), on a throw-away vhost or the embedded stack.
"""
import os
import re
import shutil
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests

import stack
from helpers import ROOT, client_app, environment, print_logs_if_failed, skip
from helpers import alive_in_groups, start, throwaway_stack


# web.py answers every request within this many seconds (read, not imported: a script)
DEADLINE = int(re.search(r"^DEADLINE = (\d+)", (ROOT / "web.py").read_text(), re.M).group(1))


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
        try:
            stack.eventually(reached, f"task {task_id} in {wanted}", timeout, interval=0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (the last answers: {seen[-3:]})") from None
        return seen


def web_with_workers(env, run_dir, request):
    """Workers for `celery` and `slow_queue`, and web.py, on ``env``'s stack."""
    processes = stack.Processes(run_dir, env=env)
    app = client_app(env)
    failed_before = request.session.testsfailed
    try:
        nodes = stack.start_stack(processes, queues=("celery", "slow_queue"), beat=False)
        stack.wait_for_workers(app, nodes, 60, processes)
        yield Web(processes, env)
    finally:
        print_logs_if_failed(request, failed_before, processes)
        processes.stop_all()
        app.close()


@pytest.fixture(scope="module")
def web(module_env, tmp_path_factory, request):
    yield from web_with_workers(module_env, tmp_path_factory.mktemp("web"), request)


@pytest.fixture(scope="module")
def web_rpc(tmp_path_factory, request):
    """The same on rpc:// results (RabbitMQ only: they travel through the broker), on a vhost
    of its own: `web`'s workers, storing in Redis, must not take these tasks."""
    with throwaway_stack(tmp_path_factory.mktemp("stack-rpc")) as env:
        env.only_rabbit("rpc:// results travel through RabbitMQ")
        yield from web_with_workers({**env, "CELERY_RESULT_BACKEND": "rpc://"},
                                    tmp_path_factory.mktemp("web-rpc"), request)


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


def test_on_rpc_results_a_task_this_process_did_not_start_is_a_404_saying_why(web_rpc):
    answer = web_rpc.call("GET", f"/api/tasks/{uuid.uuid4()}")
    assert answer.status_code == 404, answer.text
    assert "was not started by this web.py: rpc:// sends each result only to the caller" \
        in answer.json()["error"]


@pytest.mark.parametrize("results", ["web", "web_rpc"], ids=["own-results", "rpc-results"])
def test_delete_terminates_a_running_task_which_ends_revoked(request, results):
    """Also on rpc://: a terminated task's REVOKED reaches the sender's reply queue."""
    web = request.getfixturevalue(results)
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
    """Two tasks of 3 s (slow_queue's worker runs two at once): one poll sees both running."""
    ids = [web.start(3) for _ in range(2)]
    both = []

    def both_in_progress():
        states = [web.call("GET", f"/api/tasks/{task_id}").json() for task_id in ids]
        both.append(states)
        return all(s["state"] == "PROGRESS" for s in states)
    stack.eventually(both_in_progress, f"both tasks in PROGRESS at once (seen {both[-2:]})", 20,
                     interval=0.2)
    for task_id in ids:
        assert web.until(task_id, {"SUCCESS"}, 30)[-1]["result"]["steps"] == 3


def test_on_rpc_results_tasks_started_at_once_all_reach_success_with_progress(web_rpc):
    """rpc:// sends each state only to the sender's reply queue (one per thread): web.py makes
    every Celery call on one thread, so each GET sees what the workers sent (before: PENDING for
    ever). Six tasks started at once, then parallel GETs, as several pages would."""
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda _: web_rpc.start(3), range(6)))
        seen = list(pool.map(lambda task_id: web_rpc.until(task_id, {"SUCCESS"}, 60), ids))
    for task_id, answers in zip(ids, seen):
        assert answers[-1] == {"id": task_id, "state": "SUCCESS", "current": 3, "total": 3,
                               "result": answers[-1]["result"]}, answers
        assert answers[-1]["result"]["steps"] == 3
        progress = [(a["current"], a["total"]) for a in answers if a["state"] == "PROGRESS"]
        assert progress and all(total == 3 and 1 <= current <= 3 for current, total in progress)
        assert progress == sorted(progress), answers  # never back to an older state
    print(f"\nrpc://: each of {len(ids)} tasks seen in PROGRESS: "
          f"{[sum(a['state'] == 'PROGRESS' for a in answers) for answers in seen]} times")


@pytest.mark.parametrize("body, says", [
    ({"duration": -1}, "duration must be a whole number of seconds from 1 to 600, not -1"),
    ({"duration": 0}, "not 0"),
    ({"duration": "abc"}, "not 'abc'"),
    ({"duration": True}, "not True"),
    ({"duration": 2.5}, "not 2.5"),
    ({"duration": 601}, "not 601"),
    ({"duration": "²"}, "not '²'"),  # digits to str.isdigit, not to int()
    ({"duration": "①"}, "not '①'"),
    ({"duration": "٣"}, "not '٣'"),  # a digit to int() too, but not what a form sends
    ({}, 'send a JSON object such as {"duration": 5}'),
    ([5], 'send a JSON object such as {"duration": 5}'),
])
def test_a_duration_that_is_not_a_positive_number_gets_400_saying_so(web, body, says):
    answer = web.call("POST", "/api/slow_task", json=body)
    assert answer.status_code == 400 and says in answer.json()["error"], answer.text


def test_a_duration_given_as_a_string_of_digits_is_taken(web):
    answer = web.call("POST", "/api/slow_task", json={"duration": " 1 "})  # as a form sends it
    assert answer.status_code == 202, answer.text
    assert web.until(answer.json()["id"], {"SUCCESS"}, 30)[-1]["result"]["steps"] == 1


def test_a_json_body_without_its_content_type_is_read_anyway(web):
    answer = web.call("POST", "/api/slow_task", data='{"duration": 1}',
                      headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl -d
    assert answer.status_code == 202, answer.text
    assert web.until(answer.json()["id"], {"SUCCESS"}, 30)[-1]["result"]["steps"] == 1


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("task_id", ["not-a-task-id", str(uuid.uuid4()).upper(),
                                     uuid.uuid4().hex], ids=["word", "upper-case", "no-hyphens"])
def test_a_malformed_task_id_gets_400_saying_so(web, method, task_id):
    answer = web.call(method, f"/api/tasks/{task_id}")
    assert answer.status_code == 400, answer.text
    assert f"{task_id!r} is not a task id (a lower-case UUID such as " \
        in answer.json()["error"], answer.text


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
    assert took < DEADLINE + 3, f"{took:.1f}s"
    print(f"\nno broker: 503 after {took:.1f}s: {answer.json()['error']}")


def test_a_result_backend_that_does_not_answer_gets_503_naming_it_in_seconds(web_without):
    web = web_without(CELERY_RESULT_BACKEND="redis://127.0.0.1:1/0")
    started = time.monotonic()
    answer = web.call("GET", f"/api/tasks/{uuid.uuid4()}")
    took = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    assert "the result backend (Redis) at redis://127.0.0.1:1/0" in answer.json()["error"]
    assert took < DEADLINE + 3, f"{took:.1f}s"
    print(f"\nno result backend: 503 after {took:.1f}s: {answer.json()['error']}")


# --- The page in a real browser: headless Chromium from the distribution ------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# What works as root, in a container, with no network but the page's: no sandbox (root), no
# GPU, and none of the background calls a first start makes (updates, sync, QUIC).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=900,640")


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        skip("no headless Chromium: `apt-get install chromium chromium-driver` (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()  # also ends chromedriver and every Chromium process it started


def test_the_page_starts_a_task_shows_its_bar_reach_100_and_cancels_another(web, browser,
                                                                           tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def start(duration):
        field = browser.find_element(By.ID, "duration")
        field.clear()
        field.send_keys(str(duration))
        before = len(browser.find_elements(By.CSS_SELECTOR, ".task"))
        browser.find_element(By.ID, "start-button").click()
        WebDriverWait(browser, 10).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, ".task")) > before)
        return browser.find_elements(By.CSS_SELECTOR, ".task")[0]  # the newest is first

    def text(row, selector):
        return row.find_element(By.CSS_SELECTOR, selector).text

    browser.get(web.url)
    assert "slow_task" in browser.title
    row = start(4)
    other = start(60)  # while the first runs: two bars at once
    counts, together = set(), []

    def finished(_):
        counts.add(text(row, ".count"))
        if text(row, ".state") == text(other, ".state") == "PROGRESS":
            together.append((text(row, ".count"), text(other, ".count")))
        return text(row, ".state") == "SUCCESS"
    WebDriverWait(browser, 30, poll_frequency=0.1).until(finished)
    assert any(c.startswith(("1 of 4", "2 of 4", "3 of 4")) for c in counts), counts  # advanced
    assert text(row, ".count") == "4 of 4 (100 %)"
    assert row.find_element(By.CSS_SELECTOR, ".fill").get_attribute("style") == "width: 100%;"
    assert '"steps":4' in text(row, ".result")
    assert together and all(" of 4 (" in a and " of 60 (" in b for a, b in together), together
    assert len(browser.find_elements(By.CSS_SELECTOR, ".task")) == 2

    browser.save_screenshot(str(tmp_path / "web.png"))  # what docs/web.png shows
    other.find_element(By.CSS_SELECTOR, ".cancel").click()
    WebDriverWait(browser, 15).until(lambda _: text(other, ".state") == "REVOKED")
    assert not browser.find_element(By.ID, "error").text


def test_run_demo_web_serves_the_page_on_the_embedded_stack_and_stops_it(tmp_path):
    """`python run_demo.py --web --keep-running` on the stack that needs nothing installed."""
    run_dir = tmp_path / "run"
    proc = start(["--broker", "embedded", "--web", "--keep-running", "--only", "basic",
                  "--run-dir", str(run_dir)], environment(), cwd=tmp_path)
    lines, up = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "keep running;" in " ".join("".join(lines[-2:]).split()):  # rich wraps
                up.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(120), "".join(lines)[-3000:]
        url = re.search(r"web page \(web\.py\): (http://127\.0\.0\.1:\d+/)", "".join(lines))
        assert url, "".join(lines)[-3000:]
        # named again in the last line, which the demos' table does not scroll away
        said = " ".join("".join(lines).split())  # as one line, however rich wrapped it
        assert f"the stack and the web page {url.group(1)} keep running; press Ctrl-C" in said
        assert "slow_task" in requests.get(url.group(1), timeout=10).text
        task = requests.post(url.group(1) + "api/slow_task", json={"duration": 2},
                             timeout=15).json()["id"]
        stack.eventually(lambda: requests.get(f"{url.group(1)}api/tasks/{task}", timeout=15)
                         .json()["state"] == "SUCCESS", "slow_task(2) to succeed", 30)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the line it printed says
        proc.wait(timeout=40)
        reader.join(10)
    output = "".join(lines)
    assert "nothing left running" in output, output[-3000:]
    assert alive_in_groups(run_dir, proc.pid) == []


def test_cancel_on_a_broker_without_remote_control_is_501_saying_why(web_without):
    web = web_without(CELERY_BROKER_URL="sqs://key:secret@127.0.0.1:1")  # never contacted
    answer = web.call("DELETE", f"/api/tasks/{uuid.uuid4()}")
    assert answer.status_code == 501, answer.text
    assert answer.json()["error"].startswith("cannot cancel on this stack: Amazon SQS has no "
                                             "fanout exchange")


@pytest.mark.parametrize("service", ["broker", "result backend", "broker of rpc:// results"])
def test_a_service_that_freezes_mid_run_gets_503_naming_it_not_a_hang(rabbit_env, tmp_path,
                                                                       request, service):
    """TCP open, nothing answered (a paused VM): only the client's own timeouts can tell.
    With rpc:// web.py's one calling thread declares its reply queue before it sends
    (stack.celery_gaps.RPCBackend bounds that; tests/test_diagnosis.py shows the hang)."""
    rpc = service.endswith("rpc:// results")
    env = {**rabbit_env, "CELERY_RESULT_BACKEND": "rpc://"} if rpc else rabbit_env
    variable = "CELERY_RESULT_BACKEND" if service == "result backend" else "CELERY_BROKER_URL"
    url = urlparse(env[variable])
    with stack.FaultProxy(url.hostname, url.port or (6379 if variable.endswith("BACKEND")
                                                      else 5672)) as proxy:
        processes = stack.Processes(tmp_path, env={**env, variable: proxy.rewrite(env[variable])})
        failed_before = request.session.testsfailed
        try:
            web = Web(processes, env)
            task_id = web.start(1)  # both answer: no worker needed to send and to look
            assert web.call("GET", f"/api/tasks/{task_id}").json()["state"] == "PENDING"
            proxy.freeze()
            started = time.monotonic()
            answer = (web.call("GET", f"/api/tasks/{task_id}") if service == "result backend"
                      else web.call("POST", "/api/slow_task", json={"duration": 1}))
            took = time.monotonic() - started
        finally:
            print_logs_if_failed(request, failed_before, processes)
            processes.stop_all()
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"].startswith(
        "the result backend (Redis) at" if service == "result backend" else "the broker at")
    assert ("(the rpc:// results travel through it)" in answer.json()["error"]) == rpc
    assert took < DEADLINE + 3, f"{took:.1f}s"  # web.py's own deadline, not kombu's 18 s
    print(f"\nfrozen {service}: 503 after {took:.1f}s: {answer.json()['error']}")


@pytest.mark.parametrize("service", ["broker", "result backend"])
def test_an_embedded_folder_lost_mid_run_gets_503_naming_it(web_without, tmp_path, service):
    """The embedded stack's twin of a frozen service: its message or results folder removed
    while web.py runs (before, a lost results folder read as PENDING for ever)."""
    web = web_without()  # the embedded stack of web_without, in tmp_path
    task_id = web.start(1)  # both answer: no worker needed to send and to look
    assert web.call("GET", f"/api/tasks/{task_id}").json()["state"] == "PENDING"
    folder = tmp_path / "embedded" / ("messages" if service == "broker" else "results")
    shutil.rmtree(folder)
    started = time.monotonic()
    answer = (web.call("GET", f"/api/tasks/{task_id}") if service == "result backend"
              else web.call("POST", "/api/slow_task", json={"duration": 1}))
    took = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error.startswith("the broker (kombu's filesystem transport) at filesystem://"
                            if service == "broker" else
                            f"the result backend (the results folder) at file://{folder}"), error
    assert f"cannot use its folder {folder}" in error
    assert took < DEADLINE + 3, f"{took:.1f}s"


def test_an_unknown_path_is_a_json_404(web):
    answer = web.call("GET", "/api/nothing-here")
    assert answer.status_code == 404 and "not found" in answer.json()["error"].lower()
