"""Start a real multi-process Celery stack, run every demo on it, and stop it all again.

    python run_demo.py                      # about 30 s; exit code 0 when every demo passed
    python run_demo.py --flower             # also start Flower and print its URL
    python run_demo.py --web --keep-running # also web.py (a page with live progress), and stay up
    python run_demo.py --broker embedded    # or auto (default), rabbitmq, redis, sqs, docker
    python run_demo.py --backend postgresql # or auto (default), redis, rpc, file
    python run_demo.py --keep-running       # leave the stack up after the demos, until Ctrl-C
    python run_demo.py --only canvas,retry  # passed to client_fixed.py, as are --timeout, --json

Services with --broker auto, the first that works: (1) the configured broker and result backend
(CELERY_BROKER_URL, CELERY_RESULT_BACKEND); (2) RabbitMQ and Redis from `docker compose`;
(3) an embedded stack that needs nothing installed: kombu's filesystem transport and file
results inside the run folder. --broker/--backend KIND choose one: the URL from the environment
when it is of that kind, else the local default (one resolver decides: stack/resolve.py);
--broker sqs starts a local SQS-compatible server (moto) unless CELERY_BROKER_URL is an sqs://
URL. What the chosen pair
cannot do is said first (stack/capabilities.py), and those demos are reported unsupported.
Then a worker per queue, beat (and Flower, web.py), and finally
``client_fixed.py`` as a subprocess, exactly as you would run it yourself. Each process logs to
the run folder (.run/<timestamp>-<pid>/). Everything it started is stopped at the end, also after a
failure, Ctrl-C or SIGTERM.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

import stack

HERE = Path(__file__).resolve().parent
console = Console()
received = []  # the signal that ended the run, if any


def parse_args():
    parser = argparse.ArgumentParser(description="Run every Celery demo on a real stack.")
    parser.add_argument("--broker", default="auto", choices=stack.BROKER_MODES,
                        help="which broker to use (default: auto)")
    parser.add_argument("--backend", default="auto", choices=stack.BACKEND_MODES,
                        help="which result backend to use (default: auto: the configured one, "
                             "or files with the embedded broker)")
    parser.add_argument("--flower", action="store_true", help="also start Flower on 127.0.0.1")
    parser.add_argument("--web", action="store_true",
                        help="also start web.py on 127.0.0.1 (with --keep-running to use it "
                             "after the demos)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the stack running after the demos until Ctrl-C")
    parser.add_argument("--run-dir", type=Path, help="folder for logs (default .run/<timestamp>-<pid>)")
    parser.add_argument("--only", help="run only these demos (comma-separated)")
    parser.add_argument("--timeout", type=float, default=180, help="deadline for all the demos")
    parser.add_argument("--json", metavar="FILE", help="write the demo results to FILE")
    return parser.parse_args()


def say(message):
    console.print(f"[bold cyan]run_demo:[/] {message}")


def run_dir_name(wanted):
    """The run folder: --run-dir, else .run/<timestamp>-<pid>. The PID keeps two runs started in
    the same second apart. Not created here: the first thing started creates it, so a run that
    fails before starting anything leaves none."""
    if wanted:
        return wanted.resolve()
    return HERE / ".run" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def write_pids(run_dir, started, client=None):
    """pids.json: what this run started (each in its own process group), for checks and cleanup."""
    groups = [started[key] for key in ("services", "processes") if started.get(key)]
    pids = {"run_demo": os.getpid(),
            "processes": {n: p.pid for group in groups for n, p, _ in group.started},
            "client": client.pid if client else None}
    (run_dir / "pids.json").write_text(json.dumps(pids, indent=2))


def client_command(args):
    command = [sys.executable, str(HERE / "client_fixed.py"), "--timeout", str(args.timeout)]
    if args.only:
        command += ["--only", args.only]
    if args.json:
        command += ["--json", str(Path(args.json).resolve())]
    return command


def on_signal(signum, frame):
    received.append(signum)
    raise KeyboardInterrupt  # so that every finally-block runs and the stack is stopped


def run(args, run_dir, started):
    """Everything between services up and demos done; returns the exit code of client_fixed.py."""
    user_env = dict(os.environ)
    # the one resolver (stack/resolve.py): --broker/--backend, the environment, the fallback
    env = stack.resolve(args.broker, args.backend, run_dir, started,
                        say=lambda line: say(escape(line)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HERE), os.environ.get("PYTHONPATH"))))
    os.environ.update(env)  # for this process (pings) and every child
    import tasks  # only now: celeryconfig reads the environment set just above
    offers = stack.offers_of(tasks.app)
    for feature, why in offers.missing():  # the demos that need these are reported unsupported
        say(f"[yellow]{offers.name()} cannot do {feature}: {escape(why)}[/]")
    flower_port = stack.free_port(5555) if args.flower else None
    if flower_port and not offers.offers("events"):
        say(f"[yellow]Flower not started: {escape(offers.lacks('events'))}[/]")
        flower_port = None
    processes = started["processes"] = stack.Processes(run_dir)
    say(f"logs in {run_dir}")
    t0 = time.monotonic()
    nodes = stack.start_stack(processes, flower_port=flower_port)
    write_pids(run_dir, started)
    by_log = not offers.offers("remote_control")  # no ping on SQS: the workers' "ready." lines
    say(f"started {len(nodes)} workers (prefork, -E) and beat"
        f"{' and Flower' if flower_port else ''}; waiting for their "
        f"{'ready line in their logs' if by_log else 'ping'}")
    stack.wait_for_workers(tasks.app, nodes, 45, processes, by_log=by_log)
    say(f"workers ready in {time.monotonic() - t0:.1f}s: {', '.join(nodes)}")
    if flower_port:
        up = stack.wait_for_port("127.0.0.1", flower_port, timeout=20)
        say(f"Flower: http://127.0.0.1:{flower_port}/" + ("" if up else " (not answering yet)"))
    if args.web:
        web_port = stack.free_port(8000)
        url = stack.start_web(processes, web_port)
        write_pids(run_dir, started)
        up = stack.wait_for_port("127.0.0.1", web_port, timeout=20)
        say(f"web page (web.py): {url}" + ("" if up else " (not answering yet)"))
    client = started["client"] = subprocess.Popen(client_command(args), cwd=HERE, env=os.environ)
    write_pids(run_dir, started, client)
    try:  # client_fixed.py ends by --timeout + 5 s whatever the services do (its ClientGuard);
        code = client.wait(timeout=args.timeout + 20)  # this bound only guards against a bug
    except subprocess.TimeoutExpired:
        say(f"[red]client_fixed.py did not end within {args.timeout + 20:.0f}s; stopping it[/]")
        code = 1
    reported = report_exits(processes, set())
    if code:
        say(f"[red]some demos failed[/]; each process's log is in {run_dir}")
    if args.keep_running:
        started["code"] = code  # Ctrl-C is then how the user ends a good run
        exports = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("CELERY_")
                           and user_env.get(k) != v)  # what this run chose, not yours
        # the web page's URL again: the demos' table has scrolled its first mention away
        say(f"the stack {f'and the web page {url} keep' if args.web else 'keeps'} running; "
            "press Ctrl-C to stop it. From another terminal: "
            f"{'export ' + exports + '; ' if exports else ''}python client.py")
        while True:
            time.sleep(1)
            reported = report_exits(processes, reported)
    return code


def report_exits(processes, reported):
    """Show the end of the log of each process that stopped on its own (once)."""
    for name, exit_code in processes.exited():
        if name not in reported:
            console.print(f"[red]{name} stopped with exit code {exit_code}; the end of its log:"
                          f"[/]\n{escape(processes.log_tail(name))}")
    return {name for name, _ in processes.exited()}


def stop(started, interrupted):
    """Stop the client, every process and the containers it started; return what is left."""
    client, processes = started.get("client"), started.get("processes")
    if client and client.poll() is None:
        client.send_signal(signal.SIGTERM)  # it prints what finished, then exits
        try:
            client.wait(timeout=5)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait(timeout=5)
    if processes:
        say(f"stopping {len(processes.started)} processes")
        # Interrupted: the user wants out now, and a worker whose broker froze cannot finish a
        # warm shutdown anyway; late-ack tasks go back to the queue when SIGKILL ends it.
        processes.stop_all(grace=3 if interrupted else 15)
    services = started.get("services")  # after the workers, which talk to them until the end
    if services:
        say(f"stopping {', '.join(name for name, _, _ in services.started)}")
        services.stop_all(grace=5)
    if started.get("compose"):
        say(f"stopping the containers it started: "
            f"`docker compose stop {' '.join(started['compose'])}`")
        stack.compose_stop(started["compose"])
    return [*(processes.still_running() if processes else []),
            *(services.still_running() if services else [])]


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    begin = time.monotonic()
    run_dir = run_dir_name(args.run_dir)
    started, code = {}, 1
    try:
        code = run(args, run_dir, started)
    except stack.ServiceUnavailable as exc:  # also MissingDriver: one line naming the package
        console.print(f"[red]error:[/] {escape(str(exc))}")
        code = 2
    except stack.StackFailed as exc:
        console.print(f"[red]the stack did not start:[/] {escape(str(exc))}")
        conflict = stack.queue_conflict(str(exc))  # a queue an older version of the demo left
        if conflict:
            say(escape(conflict))
        code = 1
    except KeyboardInterrupt:
        code = started.get("code", 128 + (received[-1] if received else signal.SIGINT))
        say("interrupted")
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = stop(started, interrupted=bool(received))
    verdict = "[green]every demo passed[/]" if code == 0 else f"[red]exit code {code}[/]"
    still = f"[red]still running: {', '.join(left)}[/]" if left else "nothing left running"
    logs = f"; logs in {run_dir}" if run_dir.exists() else ""
    say(f"{verdict}; {time.monotonic() - begin:.1f}s in all; {still}{logs}")
    return code


if __name__ == "__main__":
    sys.exit(main())
