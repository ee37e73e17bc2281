"""Run the demo catalogue against the running Celery stack: deadlines, diagnosis, summary.

    python client_fixed.py                          # every demo; exit code 0 when all passed
    python client_fixed.py --list                   # the demos, one line each
    python client_fixed.py --only canvas,retry --json results.json

It needs a broker, a result backend, a worker per queue and beat: ``python run_demo.py``
starts them and then runs this file. "Fixed" because it guards against what makes a naive
client hang or mislead (see client.py): every wait has a deadline, a task still PENDING at its
deadline is explained (usually: no worker consumes its queue), an unreachable broker or a
stack without any worker is reported in seconds, and the summary table and exit code say
what passed. A demo this broker or result backend cannot carry (chords on rpc://, inspect on
SQS; see stack/capabilities.py) is reported "unsupported" with the reason, not run; the exit
code is 0 when every supported demo passed.
A service that fails in the middle of the run (a frozen broker or Redis,
RabbitMQ blocking publishers) ends the run at once with one line naming it: exit code 2, as
when it is down from the start. Ctrl-C and SIGTERM end it within seconds, also while it waits
on a frozen socket; and it ends by --timeout plus a few seconds whatever the services do.
"""
import argparse
import json
import os
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

import stack

# The one resolver (stack/resolve.py): the broker and result backend you configured
# (CELERY_BROKER_URL, CELERY_RESULT_BACKEND), else the defaults; also for the processes a demo
# starts. Before `tasks`: celeryconfig reads them on import.
os.environ.update(stack.resolve("configured"))

import demos  # noqa: E402
import tasks  # noqa: E402

console = Console()


def parse_args():
    parser = argparse.ArgumentParser(description="Run the Celery demos against a running stack.")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these demos")
    parser.add_argument("--list", action="store_true", help="list the demos and exit")
    parser.add_argument("--timeout", type=float, default=180,
                        help="deadline in seconds for the whole run (default 180)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args()
    args.names = list(demos.DEMOS)
    if args.only:
        args.names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.names if name not in demos.DEMOS]
        if unknown:
            parser.error(f"unknown demo {', '.join(unknown)}; choose from {', '.join(demos.DEMOS)}")
    return args


def make_context():
    return demos.Context(
        app=tasks.app,
        # What this broker and result backend can carry; the workers run the prefork pool
        offers=stack.offers_of(tasks.app, pool="prefork"),
        # In docker compose the workers reach this client's flaky HTTP server by its service name
        http_host=os.environ.get("DEMO_HTTP_HOST", "127.0.0.1"),
        http_bind=os.environ.get("DEMO_HTTP_BIND", "127.0.0.1"))


def run_all(ctx, names, timeout, outcomes, guard):
    """Run each demo within its own deadline and the whole run's; append to ``outcomes``.

    Returns the first service fault (a line naming the service), after which no demo runs.
    """
    end, fault = time.monotonic() + timeout, ""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.fields[steps]}"))
    with Progress(*columns, console=console, transient=True) as progress:
        for name in names:
            if guard.stopped:  # a signal whose KeyboardInterrupt a library's finally swallowed
                raise KeyboardInterrupt
            left = end - time.monotonic()
            if fault:
                outcomes.append(demos.Outcome(name, "failed", 0.0, "not run: a service failed"))
                continue
            if left < 1:
                outcomes.append(demos.Outcome(name, "failed", 0.0, f"not run: the --timeout of "
                                              f"{timeout:.0f}s for the whole run was used up"))
                continue
            bar = progress.add_task(f"{name}: {escape(demos.describe(name))}", total=None, steps="")
            # demo_progress calls this with each PROGRESS state of slow_task: a live bar
            ctx.on_progress = lambda current, total: progress.update(
                bar, completed=current, total=total, steps=f"step {current}/{total}")
            outcome = demos.run(ctx, name, min(demos.deadline_for(name), left))
            progress.remove_task(bar)
            console.print(LINE[outcome.status].format(name=name, seconds=outcome.seconds,
                                                      detail=escape(outcome.detail)))
            outcomes.append(outcome)
            fault = outcome.fault
    return fault


LINE = {"passed": "[green]PASS[/] {name} ({seconds:.1f}s)",
        "failed": "[red]FAIL[/] {name} ({seconds:.1f}s): {detail}",
        "unsupported": "[yellow]UNSUPPORTED[/] {name}: {detail}"}
RESULT = {"passed": "[green]passed[/]", "failed": "[red]FAILED[/]",
          "unsupported": "[yellow]unsupported[/]"}


def show_summary(outcomes, notes):
    table = Table(title="Summary")
    for column in ("demo", "result", "seconds", "detail"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for o in outcomes:
        table.add_row(o.name, RESULT[o.status], f"{o.seconds:.1f}", escape(o.detail))
    console.print(table)
    for note in notes:
        console.print(f"note: {escape(note)}")
    console.print(f"[bold]{demos.count(outcomes)}[/]")


def check_workers(app, offers):
    """None when some worker answers; warns about each queue that no worker consumes."""
    if not offers.offers("remote_control"):
        console.print(f"[yellow]note:[/] workers cannot be asked on this broker "
                      f"({escape(offers.lacks('remote_control'))}); a queue without a worker "
                      f"shows as a task still PENDING at its deadline")
        return None
    workers, missing = demos.unconsumed_queues(app, [q.name for q in app.conf.task_queues])
    if not workers:
        return ("no worker answers, so every task would stay PENDING. Start the whole stack "
                "with `python run_demo.py --keep-running`, or a worker per queue, e.g. "
                f"{demos.start_worker_hint('celery')}")
    for queue in missing:
        console.print(f"[yellow]warning:[/] no worker consumes {queue!r}; its demos will "
                      f"fail. Start one: {demos.start_worker_hint(queue)}")
    return None


def main():
    args = parse_args()
    if args.list:
        for name in demos.DEMOS:
            print(f"{name:<11} {demos.describe(name)}")
        return 0
    broker, backend = tasks.app.conf.broker_url, tasks.app.conf.result_backend
    # SIGTERM ends the run like Ctrl-C (summary first, then exit), also while blocked on a
    # socket; and whatever a service does, the run ends a few seconds after --timeout.
    guard = stack.ClientGuard(tasks.app, hard_deadline=args.timeout + 5).install()
    errors = Console(stderr=True)
    ctx = make_context()
    try:  # seconds, not a hang or a traceback, when nothing listens
        stack.check_services(broker, backend)
        problem = check_workers(tasks.app, ctx.offers)
    except stack.ServiceUnavailable as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}")
        return leave(2)
    except KeyboardInterrupt:
        errors.print(f"[yellow]interrupted ({guard.stopped}) before the first demo[/]")
        return leave(130)
    except Exception as exc:  # the broker answered the check, then stopped answering
        errors.print(f"[red]error:[/] {escape(stack.service_fault(exc, tasks.app) or repr(exc))}")
        return leave(2)
    if problem:
        errors.print(f"[red]error:[/] {escape(problem)}")
        return leave(1)
    console.print(f"broker {stack.mask(broker)}, results {stack.mask(backend)}: "
                  f"running {len(args.names)} demos")
    outcomes, interrupted, fault = [], False, ""
    started = time.monotonic()
    try:
        fault = run_all(ctx, args.names, args.timeout, outcomes, guard)
    except KeyboardInterrupt:
        interrupted = True
    guard.disarm()  # Ctrl-C reaches run_demo.py too, which then stops us: summary first
    if interrupted:
        console.print(f"[yellow]interrupted ({guard.stopped}): the summary shows the demos "
                      f"that finished[/]")
    show_summary(outcomes, ctx.notes)
    if fault:
        errors.print(f"[red]error:[/] {escape(fault)}")
    ok = not interrupted and len(outcomes) == len(args.names) and all(o.ok for o in outcomes)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"passed": ok, "interrupted": interrupted, "broker": stack.mask(broker),
                       "backend": stack.mask(backend), "stack": ctx.offers.name(),
                       "seconds": round(time.monotonic() - started, 2), "notes": ctx.notes,
                       "summary": demos.count(outcomes), "fault": fault,
                       "demos": [o.as_dict() for o in outcomes]}, out, indent=2)
    return leave(130 if interrupted else 2 if fault else 0 if ok else 1)


def leave(code):
    """0 and 1 end normally; after a fault or a signal, leave without any goodbye to the
    services (a frozen broker or Redis never answers one: stack/deadlines.py)."""
    stack.abandon_connections(tasks.app)
    if code not in (0, 1):
        stack.exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
