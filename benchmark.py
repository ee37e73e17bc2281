"""Measure Celery on this machine next to the broker's own limit: the numbers behind the tuning.

    python benchmark.py --quick                       # the main cases once, small counts (< 1 min)
    python benchmark.py --repeat 3 --json bench-results.json  # the table of docs/performance.md (9 minutes)
    python benchmark.py --broker redis --quick        # Redis as the broker (default: RabbitMQ)
    python benchmark.py --broker embedded --quick     # the pure-Python filesystem stack, no servers
    python benchmark.py --broker sqs --quick          # SQS: a local server (moto) for the run
    python benchmark.py --profile                     # where a tuned worker's time goes (cProfile)
    python benchmark.py --only 'tuned|broker'         # a subset (a regular expression on names)
    sudo .venv/bin/python benchmark.py --cluster      # tuned: 3-node quorum cluster vs one node

It runs against the chosen broker (``--broker``; without it, CELERY_BROKER_URL or RabbitMQ) and
the configured result backend (CELERY_RESULT_BACKEND, Redis by default), on a throw-away vhost
and Redis key prefixes, SQS queues under the run's prefix, or on uniquely named queues when
rabbitmqctl is not usable, and removes them afterwards. No wait lasts longer than ``--timeout`` (plus time for the messages it waits
for): a broker that freezes ends the run with a message naming it. Exit code: 0 when every case
completed, 1 when one did not, 2 when a service is down (the message names it).

What it measures, round after round so that a noisy neighbour slows every case alike:
  broker       raw kombu publish + consume of the same Celery message, no Celery: the limit
  per_message  one trivial task per message, first send to last completion, for the demo's
               defaults and for a tuned configuration with one knob at a time set back
  batched      the same trivial work sent with ``chunks`` (items per second)
  peer         the same trivial work on Dramatiq / Huey / RQ (requirements-bench.txt)
  latency      ``add.delay(2, 2).get(timeout=...)`` one at a time: p50 / p95 / p99
  cold start   launch of a worker process to its first task done

The pieces live in bench/: worker.py (the workers' app and tasks), cases.py (the Celery cases),
peers.py (Dramatiq, Huey, RQ), run.py (isolation, workers, deadlines), profiling.py (CPU per
message, cProfile) and report.py (summaries, targets, tables).
"""
import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from contextlib import ExitStack

import stack
from bench import report as reporting
from bench.cases import COLD_START_CASES, LATENCY_CASES, all_cases, measure, measure_cold_start, \
    measure_latency
from bench.peers import peer_missing
from bench.profiling import profile
from bench.run import Run, Stalled, isolate


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the main cases once, with small counts (under a minute)")
    parser.add_argument("--repeat", type=int, help="rounds of every case (default 3; quick 1)")
    parser.add_argument("--count", type=int,
                        help="tasks per case (default 10000; quick 600); cases scale it")
    parser.add_argument("--samples", type=int,
                        help="round trips for latency, after 20 for warming up (default 1000, "
                             "--quick too: its p50 is then the full run's)")
    parser.add_argument("--broker", choices=("rabbitmq", "redis", "sqs", "embedded"),
                        help="rabbitmq (a throw-away vhost), redis (a throw-away key prefix), "
                             "sqs (CELERY_BROKER_URL if sqs://, else a local server: moto) or "
                             "embedded (the filesystem stack in a temporary folder); default: "
                             "CELERY_BROKER_URL, else RabbitMQ")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="the longest any one wait may take, plus time for the messages "
                             "it waits for (default 30)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", default="", metavar="REGEX",
                        help="run only the cases whose name matches ('latency ...' and "
                             "'cold start ...' for those)")
    parser.add_argument("--profile", action="store_true",
                        help="profile a tuned worker and the raw consumer, print where time goes")
    parser.add_argument("--cluster", action="store_true",
                        help="root: build a 3-node RabbitMQ cluster on network-namespace hosts "
                             "and compare the tuned case with quorum queues there against one "
                             "node with classic queues (docs/cluster.md); --count, --repeat")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.count = args.count or (600 if args.quick else 10000)
    # --quick measures the round trip as the full run does (1000 after 20 for warming up), so
    # that both mean the same by "p50" (it quoted 100 samples against the full run's 3 x 1000)
    args.samples = args.samples or 1000
    return args


def chosen(cases, args, prefix=""):
    return [c for c in cases if (c.quick or not args.quick) and re.search(args.only, prefix + c.name)]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # `kill` (SIGTERM) unwinds like Ctrl-C: workers stopped, vhost and keys removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cluster:
        from bench import cluster
        return cluster.main(args)
    from rich.console import Console
    console = Console(width=shutil.get_terminal_size((150, 40)).columns)
    token = uuid.uuid4().hex[:8]
    run_dir = tempfile.mkdtemp(prefix="celery-bench-logs-")
    with ExitStack() as cleanup:
        try:
            where = isolate(args.broker, cleanup, token)
        except stack.ServiceUnavailable as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            return 2
        import importlib
        import celeryconfig
        importlib.reload(celeryconfig)  # it read the environment before isolate() changed it
        broker, backend = os.environ["CELERY_BROKER_URL"], os.environ["CELERY_RESULT_BACKEND"]
        embedded = stack.capabilities.is_kind(broker, "embedded")
        slow = embedded or stack.capabilities.is_kind(broker, "sqs")  # a Python server answers SQS
        run = Run(where["queue"], token, run_dir, args.timeout, 4.0 if slow else 1.0,
                  stack.offers_for(broker, backend).offers("remote_control"))
        if slow:  # round trips of 10-100 ms (the transport's polling, HTTP): fewer of them
            args.samples = max(10, args.samples // 10)
        if args.profile and not run.remote_control:
            console.print("[red]--profile needs remote control (not on SQS)[/]")
            return 2
        if args.profile:
            return profile(run, args.count, console)
        notes, cases = [], []
        for case in chosen(all_cases(broker, backend), args):
            missing = case.kind == "peer" and peer_missing(case.send, broker, backend,
                                                           where["vhost"])
            if missing:
                notes.append(f"{case.name} skipped: {missing}")
            else:
                cases.append(case)
        latency_cases = chosen(LATENCY_CASES, args, "latency ")
        cold_cases = chosen(COLD_START_CASES, args, "cold start ")
        try:
            runs, errors = rounds(run, args, cases, latency_cases, cold_cases, console, broker,
                                  backend)
        except Stalled as exc:  # a service stopped answering: clean up what can be, and end
            console.print(f"[red]stopped: {exc}[/]", highlight=False)
            console.print(f"worker logs kept in {run_dir}")
            return 2
        summaries = [reporting.summarize(case, runs[case.name]) for case in cases]
        report = reporting.build(
            args, broker, backend, summaries,
            [(case, runs[f"latency {case.name}"]) for case in latency_cases],
            {case.name: runs[f"cold start {case.name}"] for case in cold_cases},
            LATENCY_CASES[-1].name, errors, notes, {**where, "worker_pids": run.worker_pids})
        failed = errors or any(s["completed"] != s["sent"] or s["errors"] for s in summaries)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    reporting.print_report(report, console)
    if failed:
        console.print(f"[red]some cases did not complete; worker logs kept in {run_dir}[/]")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1 if failed else 0


def rounds(run, args, cases, latency_cases, cold_cases, console, broker, backend):
    """Every case once per round, the order rotated, so no case always runs first.

    Returns ({case name: [results]}, [errors]). A case that fails is recorded and the others go
    on, except when a service stopped answering: then the run ends, naming it.
    """
    runs = {c.name: [] for c in cases} | {f"latency {c.name}": [] for c in latency_cases} \
        | {f"cold start {c.name}": [] for c in cold_cases}
    errors = []  # latency and cold start failures (throughput errors stay with their case)

    def attempt(call):
        """(value, None), or (None, error) when the call failed."""
        try:
            return call(), None
        except Exception as exc:  # one broken case must not hide the others ...
            error = f"{type(exc).__name__}: {exc}"
            try:  # ... unless the broker or the result backend is the reason
                stack.check_services(broker, backend)
            except stack.ServiceUnavailable as down:
                raise Stalled(f"{error}; {down}") from None
            return None, error

    for rnd in range(args.repeat):
        shift = rnd % len(cases) if cases else 0
        for i, case in enumerate(cases[shift:] + cases[:shift]):
            tag = f"r{rnd}c{(i + shift) % len(cases)}"
            result, error = attempt(lambda: measure(run, case, tag, args.count))
            if error:
                result = {"rate": 0.0, "sent": case.count(args.count), "completed": 0,
                          "error": error}
            runs[case.name].append(result)
            console.print(f"round {rnd + 1}/{args.repeat}  {case.name:<34} "
                          f"{result['rate']:>9,.0f}/s  {result['completed']}/{result['sent']}"
                          + (f"  [red]{result['error']}[/]" if result.get("error") else ""))
        for i, case in enumerate(latency_cases):
            times, error = attempt(lambda: measure_latency(run, case, f"r{rnd}l{i}", args.samples))
            runs[f"latency {case.name}"] += times or []
            errors += [f"latency {case.name}: {error}"] if error else []
        for i, case in enumerate(cold_cases):
            seconds, error = attempt(lambda: measure_cold_start(run, case, f"r{rnd}s{i}"))
            runs[f"cold start {case.name}"] += [seconds] if not error else []
            errors += [f"cold start {case.name}: {error}"] if error else []
        console.print(f"round {rnd + 1}/{args.repeat}  latency p50 " + ", ".join(
            f"{c.name} {reporting.median(v):.2f} ms" for c in latency_cases
            if (v := runs[f"latency {c.name}"])) + "; cold start " + ", ".join(
            f"{c.name} {v[-1]:.2f} s" for c in cold_cases if (v := runs[f"cold start {c.name}"])))
    return runs, errors


if __name__ == "__main__":
    sys.exit(main())
