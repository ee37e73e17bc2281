"""Every Celery concept of this tutorial, in one process, with no broker and no Docker.

    python complete_demo.py            # about 40 seconds; exit code 0 when every section passed

Real Celery, real workers: the broker is kombu's in-memory transport and results go to an
in-memory cache, so it needs nothing installed. One worker per queue runs in a thread (Celery's
own ``celery.contrib.testing.worker.start_worker``) and beat runs embedded. What it cannot show
is said, not hidden (stack/capabilities.py): other processes (Flower, a second terminal, a
lookup by id) cannot see memory, priorities are ignored (FIFO, so the priority demo is
"unsupported"), and revoke(terminate=True) and time limits need the prefork pool of a real
worker; each demo's line says so. ``python run_demo.py`` shows all of that on a real
multi-process stack.
"""
import os
import sys
import tempfile

# Set before `tasks` is imported: this demo never uses the broker of your environment.
os.environ.update(CELERY_BROKER_URL="memory://localhost/", CELERY_RESULT_BACKEND="cache+memory://")
os.environ.pop("CELERY_RESULT_KEYPREFIX", None)

from rich.console import Console  # noqa: E402

import demos  # noqa: E402
import stack  # noqa: E402
import tasks  # noqa: E402


def main():
    console = Console()
    queues = [queue.name for queue in tasks.app.conf.task_queues]
    # in-process workers run the threads pool: memory:// cannot be shared with child processes
    ctx = demos.Context(app=tasks.app, offers=stack.offers_of(tasks.app, pool="threads"))
    outcomes = []
    with tempfile.TemporaryDirectory() as run_dir:
        console.print(f"[bold]Starting in-process workers for {', '.join(queues)} and beat[/]")
        with stack.in_process_workers(tasks.app, queues, beat=True, run_dir=run_dir):
            for name in demos.DEMOS:
                console.rule(f"[bold]{name}[/]: {demos.describe(name)}")
                outcome = demos.run(ctx, name, demos.deadline_for(name))
                label = {"passed": "[green]PASS[/]", "failed": "[red]FAIL[/]",
                         "unsupported": "[yellow]UNSUPPORTED[/]"}[outcome.status]
                console.print(f"{label} ({outcome.seconds:.1f}s) {outcome.detail}")
                outcomes.append(outcome)
    failed = [o.name for o in outcomes if not o.ok]
    for note in ctx.notes:
        console.print(f"note: {note}")
    console.print(f"[bold]{demos.count(outcomes)}[/]" + (f": {', '.join(failed)} failed"
                                                         if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
