"""A service that fails in the middle of a run: every script ends in time and names it.

    python -m pytest tests/test_midrun_faults.py -s -m "not serial"
    python -m pytest tests/test_midrun_faults.py -s -m serial    # with nothing else

Real `celery -A tasks worker` processes and a real client_fixed.py / run_demo.py reach the real
RabbitMQ and Redis through stack.FaultProxy, which freezes them on command (sockets open,
nothing answered: a paused VM, a partition). The alarm and stop_app tests (marked ``serial``)
change RabbitMQ for the whole machine and restore it in a ``finally``: they would block or cut
off any other run on this machine, so `make test` runs them alone, after every other test.
Each test asserts the exit code, a generous time bound (the deadline + 15 s), that the
message names the service, and that nothing it started is left running.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import HOST, ROOT, WORKER_FLAGS, client_app, environment, start_worker

import stack

GRACE = 15  # seconds of slack on every deadline a user relies on (the machine is shared)


class Script:
    """A script run as a user runs it; its output is collected line by line as it comes."""

    def __init__(self, name, *args, env):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / name), *args], cwd=ROOT,
                                     env=env, stdin=subprocess.DEVNULL, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, text, timeout=60):
        stack.eventually(lambda: text in self.output or self.proc.poll() is not None,
                         f"{text!r} in the output", timeout)
        assert text in self.output, self.output

    def end(self, timeout):
        """(exit code, seconds since start); kills it (and fails) if it overran ``timeout``."""
        try:
            code = self.proc.wait(timeout=max(0.1, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)  # SIGKILL cannot be ignored: this ends at once
            pytest.fail(f"still running after {timeout:.0f}s:\n{self.output[-3000:]}")
        time.sleep(0.3)  # the reader thread gets the last lines
        return code, time.monotonic() - self.started

    def assert_nothing_left(self):
        """Its process group (itself and any child) has no live member left."""
        assert not stack.group_alive(self.proc.pid)


@pytest.fixture
def proxied(rabbit_env, tmp_path):
    """Workers for the default and slow queues, all of them behind one proxy per service."""
    with stack.FaultProxy("127.0.0.1", 5672) as broker, \
            stack.FaultProxy("127.0.0.1", 6379) as redis:
        env = environment(**{**rabbit_env,
                           "CELERY_BROKER_URL": broker.rewrite(rabbit_env["CELERY_BROKER_URL"]),
                           "CELERY_RESULT_BACKEND": redis.rewrite(stack.DEFAULT_BACKEND)})
        procs = stack.Processes(tmp_path / "run", env)
        try:
            nodes = stack.start_stack(procs, queues=("celery", "slow_queue"), beat=False)
            from celery import Celery
            app = Celery(broker=env["CELERY_BROKER_URL"], set_as_current=False)
            stack.wait_for_workers(app, nodes, 60, procs)
            app.close()
            yield env, {"broker": broker, "redis": redis}, procs
        finally:
            broker.forward()  # the services answer again: the workers' warm shutdown works
            redis.forward()
            procs.stop_all(grace=10)
            assert procs.still_running() == []


def masked(env, service):
    url = env["CELERY_BROKER_URL" if service == "broker" else "CELERY_RESULT_BACKEND"]
    return stack.mask(url).split("@")[-1]  # host:port/... : the proxy's, which the user set


# --- A frozen broker or Redis, while a demo runs and while the stack is idle -----------------
@pytest.mark.parametrize("service", ["broker", "redis"])
def test_a_service_frozen_mid_run_ends_the_run_naming_it(proxied, service, tmp_path):
    env, proxies, _ = proxied
    results = tmp_path / "results.json"
    client = Script("client_fixed.py", "--only", "basic,progress,canvas,workflow,rate_limit",
                    "--timeout", "60", "--json", str(results), env=env)
    client.wait_for("PASS basic")
    proxies[service].freeze()
    frozen_at = time.monotonic()
    code, seconds = client.end(60 + GRACE)
    output = client.output
    named = ("the broker at amqp://guest:**@" if service == "broker"
             else "the result backend (Redis) at redis://")
    assert code == 2, output
    assert named in output and masked(env, service) in output and "stopped answering" in output
    assert "Traceback" not in output
    assert "Summary" in output and "not run: a service failed" in output
    report = json.loads(results.read_text())
    assert report["fault"].startswith(named.split(" at ")[0]) and report["demos"][0]["ok"]
    client.assert_nothing_left()
    print(f"\n{service} frozen mid-run: client_fixed.py exit {code} after {seconds:.1f}s, "
          f"{time.monotonic() - frozen_at:.1f}s after the freeze (--timeout 60)")

    proxies[service].forward()  # it answers again: the same workers serve a new run
    again = Script("client_fixed.py", "--only", "basic", "--timeout", "60", env=env)
    code, seconds = again.end(60 + GRACE)
    assert code == 0, again.output
    print(f"after the thaw: client_fixed.py --only basic passed in {seconds:.1f}s")


@pytest.mark.parametrize("service", ["broker", "redis"])
def test_a_service_frozen_while_idle_is_named_in_seconds(proxied, service):
    env, proxies, _ = proxied
    proxies[service].freeze()
    client = Script("client_fixed.py", "--only", "basic", "--timeout", "30", env=env)
    code, seconds = client.end(30 + GRACE)
    output = client.output
    what = "broker" if service == "broker" else "result backend"
    assert code == 2, output
    assert f"cannot reach the {what} at" in output and masked(env, service) in output
    assert "Traceback" not in output
    client.assert_nothing_left()
    print(f"\n{service} frozen while idle: client_fixed.py exit {code} after {seconds:.1f}s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_client_while_it_waits_on_a_frozen_broker(proxied, sig, tmp_path):
    env, proxies, _ = proxied
    results = tmp_path / "results.json"
    client = Script("client_fixed.py", "--only", "progress,workflow,canvas", "--timeout", "120",
                    "--json", str(results), env=env)
    client.wait_for("running 3 demos")
    proxies["broker"].freeze()
    time.sleep(2)  # blocked in a publish, a confirm or a result by now
    os.killpg(client.proc.pid, sig)  # as a terminal's Ctrl-C does: the whole job
    signalled = time.monotonic()
    code, _ = client.end(120)
    seconds = time.monotonic() - signalled
    output = client.output
    assert code == 130, output
    assert seconds < 5 + 5, f"ended {seconds:.1f}s after {sig.name}"  # the promise is 5 s
    assert "interrupted" in output and "Summary" in output and "Traceback" not in output
    assert json.loads(results.read_text())["interrupted"] is True
    client.assert_nothing_left()
    print(f"\n{sig.name} while blocked on a frozen broker: exit {code} {seconds:.1f}s later")


def test_run_demo_stops_everything_on_sigterm_while_the_broker_is_frozen(rabbit_env, tmp_path):
    with stack.FaultProxy("127.0.0.1", 5672) as broker:
        env = environment(**{**rabbit_env,
                           "CELERY_BROKER_URL": broker.rewrite(rabbit_env["CELERY_BROKER_URL"])})
        run_dir = tmp_path / "run"
        job = Script("run_demo.py", "--broker", "rabbitmq", "--run-dir", str(run_dir),
                     "--only", "progress,workflow,canvas", "--timeout", "120", env=env)
        job.wait_for("running 3 demos", timeout=90)
        broker.freeze()  # progress (1.5 s of steps) is in flight: blocked from here on
        time.sleep(2)
        os.killpg(job.proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        code, _ = job.end(120)
        seconds = time.monotonic() - signalled
    pids = json.loads((run_dir / "pids.json").read_text())
    assert code == 128 + signal.SIGTERM, job.output
    assert "nothing left running" in job.output, job.output
    assert not any(stack.group_alive(pid) for pid in pids["processes"].values())
    job.assert_nothing_left()  # run_demo.py and client_fixed.py, in the job's group
    assert seconds < 15 + GRACE, f"run_demo.py took {seconds:.1f}s to stop its stack"
    print(f"\nSIGTERM to run_demo.py with a frozen broker: exit {code}, everything stopped "
          f"{seconds:.1f}s later")


# --- Machine-wide RabbitMQ faults: alarms and a restart (restored in a finally) ---------------
ALARMS = {
    # (how to read the current value, how to set it, a value that raises the alarm at once)
    "memory": ("vm_memory_monitor:get_vm_memory_high_watermark().",
               "set_vm_memory_high_watermark", "0.000001"),
    "disk": ("rabbit_disk_monitor:get_disk_free_limit().", "set_disk_free_limit",
             str(10 ** 18)),  # an exabyte free: no disk has that
}


@pytest.fixture(scope="module")
def alarm_stack(module_env, tmp_path_factory):
    """One worker for both alarms (each test raises its own and checks that the stack works
    again afterwards): the same path, walked once."""
    module_env.only_rabbit("the alarms are RabbitMQ's")
    env = environment(**module_env)
    procs = stack.Processes(tmp_path_factory.mktemp("alarm") / "run", env)
    start_worker(procs, "alarm", "celery")
    try:
        stack.wait_for_workers(_client(env), [f"alarm@{HOST}"], 60, procs)
        yield env
    finally:
        procs.stop_all(grace=5)
        assert procs.still_running() == []


@pytest.mark.serial
@pytest.mark.parametrize("alarm", ALARMS)
def test_a_rabbitmq_alarm_blocking_publishers_is_named_and_the_stack_works_again(
        alarm_stack, alarm):
    read, setter, trigger = ALARMS[alarm]
    env = alarm_stack
    before = stack.rabbitmqctl("eval", read).strip()  # restore what it was, not a guess
    assert before and "error" not in before, before
    if before.startswith("{absolute,"):  # a watermark given in bytes: `... absolute N`
        before = ["absolute", before.strip("{}").split(",")[1]]
    try:
        stack.rabbitmqctl(setter, trigger)
        stack.eventually(lambda: alarm in (stack.rabbitmq_alarms(stack.DEFAULT_BROKER) or []),
                         f"the {alarm} alarm", 30)
        client = Script("client_fixed.py", "--only", "basic", "--timeout", "30", env=env)
        code, seconds = client.end(30 + GRACE)
    finally:
        stack.rabbitmqctl(setter, *([before] if isinstance(before, str) else before))
    output = client.output
    assert code == 2, output
    assert f"RabbitMQ is blocking publishers: {alarm} alarm" in output, output
    assert "rabbitmq-diagnostics alarms" in output and "Traceback" not in output
    client.assert_nothing_left()
    print(f"\n{alarm} alarm: client_fixed.py exit {code} after {seconds:.1f}s")

    stack.eventually(lambda: stack.rabbitmq_alarms(stack.DEFAULT_BROKER) == [],
                     "the alarm cleared", 30)
    again = Script("client_fixed.py", "--only", "basic", "--timeout", "30", env=env)
    assert again.end(30 + GRACE)[0] == 0, again.output


def _answering(env):
    """Node names that answer a ping, asked over a new connection."""
    app = _client(env)
    try:
        return {name for reply in app.control.ping(timeout=1) or [] for name in reply}
    finally:
        app.close()


def _client(env):
    from celery import Celery
    return Celery(broker=env["CELERY_BROKER_URL"], set_as_current=False)


@pytest.mark.serial
def test_hand_started_workers_and_beat_outlive_a_broker_restart(rabbit_env, tmp_path):
    """Longer than the old retry budget (5 retries, ~30 s): they used to exit for good."""
    env = environment(**rabbit_env)
    procs = stack.Processes(tmp_path / "run", env)
    # The README's commands (`celery -A tasks worker -Q slow_queue -n slow@%h`, ...), -l INFO
    procs.celery("worker-slow", "worker", "-Q", "slow_queue", "-n", "slow@%h", "-l", "INFO")
    procs.celery("worker-default", "worker", "-n", "default@%h", "-l", "INFO")
    procs.celery("beat", "beat", "-l", "INFO", "-s", str(tmp_path / "celerybeat-schedule"))
    app = _client(env)
    try:
        stack.wait_for_workers(app, [f"slow@{HOST}", f"default@{HOST}"], 60, procs)
        try:
            stack.rabbitmqctl("stop_app")
            stopped = time.monotonic()
            time.sleep(35)
        finally:
            stack.rabbitmqctl("start_app")
            stack.rabbitmqctl("await_startup", timeout=120)
        away = time.monotonic() - stopped
        assert procs.exited() == [], procs.exited()  # nobody gave up
        nodes = {f"slow@{HOST}", f"default@{HOST}"}
        # a fresh client each time: RabbitMQ may still reset connections just after start_app
        stack.eventually(lambda: nodes <= _answering(env), "both workers answering again", 60,
                         interval=1, ignore=(Exception,))
        back = time.monotonic() - stopped - away
        log = (procs.run_dir / "worker-slow.log").read_text(errors="replace")
        assert "Trying again in" in log and "(5/None)" in log, log[-3000:]  # a line per attempt
        client = Script("client_fixed.py", "--only", "basic,progress,periodic", "--timeout",
                        "60", env=env)
        code, seconds = client.end(60 + GRACE)
        assert code == 0, client.output
        print(f"\nbroker away {away:.0f}s: workers and beat stayed up, answered {back:.1f}s "
              f"after start_app; demos (basic, progress, periodic) passed in {seconds:.1f}s")
    finally:
        app.close()
        procs.stop_all(grace=10)
        assert procs.still_running() == []


# --- Heartbeats: a worker whose broker connection went silent --------------------------------
def test_a_silent_worker_connection_is_dropped_and_its_late_ack_task_redelivered(
        rabbit_env, tmp_path):
    """broker_heartbeat = 10: RabbitMQ closes a connection it has not heard from for two
    intervals, as when a worker's host vanishes (no FIN, no RST), and gives its unacknowledged
    late-ack task to another worker; the silent worker notices by itself and reconnects."""
    with stack.FaultProxy("127.0.0.1", 5672) as broker:
        env = environment(**rabbit_env)
        procs = stack.Processes(tmp_path / "run", env)
        app = client_app(rabbit_env)
        try:
            procs.celery("behind", "worker", "-Q", "slow_queue", "-n", "behind@%h", "-c", "1",
                         *WORKER_FLAGS,
                         env={"CELERY_BROKER_URL": broker.rewrite(env["CELERY_BROKER_URL"])})
            stack.wait_for_workers(app, [f"behind@{HOST}"], 60, procs)
            result = app.send_task("tasks.slow_task", (120, 0.5), queue="slow_queue")
            stack.eventually(lambda: result.state == "PROGRESS", "slow_task running", 30)
            start_worker(procs, "rescuer", "slow_queue", "-c", "1")
            stack.wait_for_workers(app, [f"rescuer@{HOST}"], 60, procs)
            broker.freeze()  # the host of "behind" vanishes, as far as RabbitMQ can tell
            frozen = time.monotonic()

            def redelivered():
                active = app.control.inspect(timeout=1, destination=[f"rescuer@{HOST}"]).active()
                return any(t["id"] == result.id for t in (active or {}).get(f"rescuer@{HOST}", []))
            stack.eventually(redelivered, "the task redelivered to rescuer", 30 + GRACE)
            redelivered_in = time.monotonic() - frozen
            log = procs.run_dir / "behind.log"
            # 2 x 10 s of silence, plus the event loop's stalls on the frozen event connection
            # (each reconnect attempt waits for broker_connection_timeout): about 40 s here
            stack.eventually(lambda: "Too many heartbeats missed" in log.read_text(errors="replace"),
                             "behind noticing its dead connection", 45 + GRACE)
            noticed_in = time.monotonic() - frozen
            result.revoke(terminate=True)
            print(f"\nheartbeat 10 s: RabbitMQ redelivered the late-ack task {redelivered_in:.1f}s "
                  f"after the worker went silent; the worker noticed within {noticed_in:.1f}s")
        finally:
            broker.forward()
            app.close()
            procs.stop_all(grace=10)
            assert procs.still_running() == []
