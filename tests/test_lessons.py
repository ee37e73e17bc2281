"""The lessons that need a real worker process: time limits, a task's log lines, a result looked
up by id from another process, chunks and starmap.

    pytest tests/test_lessons.py        # about 15 s

One prefork worker for the default queue, as `celery -A tasks worker -Q celery -n default@%h
-l INFO` starts it (on a throw-away stack: a RabbitMQ vhost, or the embedded stack), its log
in a file; client_fixed.py runs the new demos against it as a user would, and
`celery -A tasks result ID` reads a result by id.
"""
import json
import os
import re
import sys
from pathlib import Path

import pytest

from helpers import client_app, run

import stack

LESSONS = ["states", "chunks", "time_limit", "logging"]


@pytest.fixture(scope="module")
def lessons(module_env, tmp_path_factory):
    """Run the new demos on a real prefork worker; yield (env, their outcomes, the worker log)."""
    run_dir = tmp_path_factory.mktemp("lessons")
    # a user's terminal with the venv activated
    env = {**module_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    processes = stack.Processes(run_dir, env=env)
    app = client_app(module_env)
    try:
        nodes = stack.start_stack(processes, queues=["celery"], beat=False)
        stack.wait_for_workers(app, nodes, 60, processes)
        results = run_dir / "lessons.json"
        done = run(["python", "client_fixed.py", "--only", ",".join(LESSONS), "--json",
                    str(results)], env=env, timeout=90)
        outcomes = {d["name"]: d for d in json.loads(results.read_text())["demos"]}
        assert done.returncode == 0, done.output
        yield env, outcomes, processes.run_dir / "worker-default.log"
    finally:
        processes.stop_all()
        app.close()
    assert processes.still_running() == []


def test_soft_time_limit_is_caught_and_the_hard_one_kills_the_task(lessons):
    _, outcomes, log = lessons
    detail = outcomes["time_limit"]["detail"]
    assert outcomes["time_limit"]["ok"], detail
    assert "caught SoftTimeLimitExceeded" in detail and "FAILURE TimeLimitExceeded" in detail
    text = log.read_text()
    assert "Soft time limit (1s) exceeded for tasks.time_limited" in text
    assert "Hard time limit (2s) exceeded for tasks.time_limited" in text


def test_a_task_logger_line_is_in_the_worker_log_with_the_task_name_and_id(lessons):
    _, outcomes, log = lessons
    assert outcomes["logging"]["ok"], outcomes["logging"]["detail"]
    short_id = re.search(r"tasks\.log_work\[(\w+)\.\.\.\]", outcomes["logging"]["detail"])[1]
    pattern = rf"INFO/ForkPoolWorker-\d+\] tasks\.log_work\[{short_id}[-\w]*\]: working on item 1 of 3"
    assert re.search(pattern, log.read_text()), log.read_text()[-2000:]


def test_states_are_followed_and_another_process_finds_the_result_by_id(lessons):
    env, outcomes, _ = lessons
    detail = outcomes["states"]["detail"]
    assert outcomes["states"]["ok"], detail
    assert detail.startswith("PENDING -> STARTED -> SUCCESS; another process: AsyncResult(")
    # `celery -A tasks result ID`, as the README's step 8 and the production page show it
    sent = client_app(env).send_task("tasks.add", (20, 22))
    done = run(["celery", "-A", "tasks", "result", sent.id], env=env, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stdout + done.stderr


def test_chunks_and_starmap_give_the_same_results_with_fewer_messages(lessons):
    _, outcomes, _ = lessons
    detail = outcomes["chunks"]["detail"]
    assert outcomes["chunks"]["ok"], detail
    timings = dict(re.findall(r"(group of 100 tasks|chunks of 10 \(10 tasks\)|starmap \(1 task\)) "
                              r"([\d.]+)s", detail))
    assert len(timings) == 3, detail  # each way measured, in the demo's own line
