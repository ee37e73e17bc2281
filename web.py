"""A web page that calls the workers: start slow_task, watch its progress, cancel it.

    python web.py                            # http://127.0.0.1:8000 (--host, --port)
    python run_demo.py --web --keep-running  # the same, with the whole stack started for you

The page (static/index.html) uses a JSON API that any other program may call too:

    POST   /api/slow_task   {"duration": 5}  -> 202 {"id": "..."}
    GET    /api/tasks/ID                     -> {"id", "state", "current", "total", "result"}
    DELETE /api/tasks/ID                     -> 202: revoked with terminate; the state becomes REVOKED
                                                (409 if it had already ended; 501 on SQS)

On rpc:// results it shows progress too, but only of the tasks this web.py process started
(a GET to another process, or after a restart, is a 404 saying why).

Bad input is a 400 with a message saying what is wrong. A broker or result backend that does not
answer is a 503 naming it within DEADLINE (8 s), never a hang. Flask, because it is small, well
kept, and already installed here (moto's server needs it); the page polls the API every half
second, which needs nothing from the server but JSON.
"""
import argparse
import re
from concurrent.futures import ThreadPoolExecutor, TimeoutError as NoAnswer

from celery.exceptions import BackendError
from flask import Flask, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

import stack
import tasks

web = Flask(__name__, static_folder="static", static_url_path="/static")
TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_DURATION = 600  # seconds: a page is not the place for longer work
# A request answers within this, whatever the services do. celeryconfig's client timeouts end
# every call, but a frozen broker takes 18 s to give up: a 6 s wait for the publisher confirm,
# then 6 s each for the polite channel and connection closes. The call goes on in its thread
# until they fire; the page hears "503" now.
DEADLINE = 8
# What the page needs of the stack (stack/capabilities.py says which stacks lack what, and why)
OFFERS = stack.offers_of(tasks.app)
# rpc:// results are messages to the reply queue of the thread that sent the task
# (app.thread_oid), and that thread's backend instance keeps the states it read for other
# tasks: with Flask serving each request on a thread of its own, the GETs saw PENDING for ever.
# So on rpc:// every Celery call (send, read, revoke) runs on one thread; other backends store
# results where any thread reads them.
RPC = OFFERS.backend.kind == "rpc"
calls = ThreadPoolExecutor(max_workers=1 if RPC else 16, thread_name_prefix="celery-call")
STARTED = set()  # on rpc:// the ids this process sent: no other task's states reach it
# What the page cannot do without them, as main() says at start. On rpc:// the page still shows
# progress (web.py is the caller, on one thread), but only of the tasks this process started.
NEEDS = {"cancel": ("remote_control",), "tasks started by another process": ("shared_results",)}


class BadRequest(ValueError):
    """The caller's mistake: answered 400 with this message."""


@web.errorhandler(BadRequest)
def bad_request(exc):
    return jsonify(error=str(exc)), 400


@web.errorhandler(Exception)
def service_failed(exc):
    """A broker or result backend that did not answer: 503 naming it, else a plain 500."""
    if isinstance(exc, HTTPException):  # Flask's own: 404 for an unknown path, 405, ...
        return jsonify(error=exc.description), exc.code
    fault = stack.queue_conflict(str(exc)) or stack.service_fault(exc, tasks.app)
    if fault:
        return jsonify(error=fault), 503
    web.logger.exception("unexpected error")
    return jsonify(error=f"{type(exc).__name__}: {exc}"), 500


def within_deadline(service, call, *args, **kwargs):
    """``call(*args, **kwargs)``, or the error Celery raises for ``service`` after DEADLINE s
    (so that stack.service_fault names it, and says how long it waited: ``seconds``)."""
    try:
        return calls.submit(call, *args, **kwargs).result(timeout=DEADLINE)
    except NoAnswer:
        error = (OperationalError if service == "broker" else BackendError)("no answer")
        error.seconds = DEADLINE
        raise error from None


@web.get("/")
def page():
    return web.send_static_file("index.html")


@web.post("/api/slow_task")
def start_slow_task():
    # force: a JSON body is read whatever Content-Type says (curl -d sends a form's)
    body = request.get_json(silent=True, force=True)
    if not isinstance(body, dict) or "duration" not in body:
        raise BadRequest('send a JSON object such as {"duration": 5}')
    duration = body["duration"]
    # what an HTML form sends; ASCII digits only (str.isdigit takes "²", int() takes "٣")
    if isinstance(duration, str) and re.fullmatch(r"\s*[0-9]+\s*", duration):
        duration = int(duration)
    if isinstance(duration, bool) or not isinstance(duration, int) or \
            not 1 <= duration <= MAX_DURATION:
        raise BadRequest(f"duration must be a whole number of seconds from 1 to {MAX_DURATION}, "
                         f"not {body['duration']!r}")
    result = within_deadline("broker", tasks.slow_task.delay, duration)
    if RPC:
        STARTED.add(result.id)
    return jsonify(id=result.id), 202


def checked(task_id):
    if not TASK_ID.fullmatch(task_id):
        raise BadRequest(f"{task_id!r} is not a task id (a lower-case UUID such as "
                         f"3f2c1a9e-0b7d-4c1e-9a55-2f0e6b1d8c47)")
    return task_id


def task_meta(task_id):
    """State and info of one moment, read by the calling thread's backend (app.backend is one
    per thread: on rpc:// the one of the thread that sent the task)."""
    return tasks.app.backend.get_task_meta(task_id)


@web.get("/api/tasks/<task_id>")
def task_status(task_id):
    task_id = checked(task_id)
    if RPC and task_id not in STARTED:  # it would read PENDING for ever
        return jsonify(error=f"task {task_id} was not started by this web.py: "
                             f"{stack.decide(('shared_results',), OFFERS)}"), 404
    meta = within_deadline("result backend", task_meta, task_id)
    state, info = meta["status"], meta["result"]  # one read: state and info of one moment
    current, total, value = (0 if state in ("PENDING", "STARTED") else None), None, None
    if state == "PROGRESS" and isinstance(info, dict):
        current, total = info.get("current"), info.get("total")
    elif state == "SUCCESS":
        value = info
        current = total = info.get("steps") if isinstance(info, dict) else None
    elif state in ("FAILURE", "REVOKED", "RETRY") and info is not None:
        value = f"{type(info).__name__}: {info}" if isinstance(info, BaseException) else info
    return jsonify(id=task_id, state=state, current=current, total=total, result=value)


@web.delete("/api/tasks/<task_id>")
def cancel_task(task_id):
    checked(task_id)
    cannot = stack.decide(NEEDS["cancel"], OFFERS)
    if cannot:  # Amazon SQS: no broadcast reaches the workers
        return jsonify(error=f"cannot cancel on this stack: {cannot}"), 501
    state = within_deadline("result backend", task_meta, task_id)["status"]
    if state in ("SUCCESS", "FAILURE", "REVOKED"):
        return jsonify(error=f"task {task_id} already ended: {state}"), 409
    # terminate: a task already running is stopped (SIGTERM to its pool process, prefork only);
    # one still waiting is dropped when a worker receives it. Either way it ends REVOKED.
    within_deadline("broker", tasks.app.control.revoke, task_id, terminate=True,
                    signal="SIGTERM")
    return jsonify(id=task_id, state="REVOKED"), 202


def main(argv=None):
    parser = argparse.ArgumentParser(description="A web page that starts, watches and cancels "
                                                 "slow_task on the demo's workers.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    args = parser.parse_args(argv)
    print(f"web.py: http://{args.host}:{args.port}/ (broker {stack.mask(tasks.app.conf.broker_url)}"
          f", results {stack.mask(str(tasks.app.conf.result_backend))}); Ctrl-C stops it",
          flush=True)
    for what, needs in NEEDS.items():
        if stack.decide(needs, OFFERS):
            print(f"web.py: no {what} on this stack: {stack.decide(needs, OFFERS)}", flush=True)
    # Flask's own server, threaded: enough for a demo. In production put the `web` object
    # behind a WSGI server (gunicorn web:web).
    web.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
