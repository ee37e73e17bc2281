"""The numbers of a run: summaries, the targets, the printed tables and the JSON report.

Owns: medians and percentiles, one summary per case (min / median / max, done / sent, CPU per
message), the report dict that ``--json`` writes, the verdict on each target (always against a
measured number), and the rich tables ``benchmark.py`` prints.
"""
import os

from stack.capabilities import is_kind


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(case, runs):
    rates = [r["rate"] for r in runs]
    cpu = {k: median([r["cpu_us"][k] for r in runs if r.get("cpu_us")] or [0])
           for k in ("client", "workers", "servers")}
    return {"name": case.name, "kind": case.kind, "min": round(min(rates), 1),
            "median": round(median(rates), 1), "max": round(max(rates), 1),
            "runs": [round(x, 1) for x in rates],
            "sent": sum(r["sent"] for r in runs), "completed": sum(r["completed"] for r in runs),
            "cpu_us": cpu, "note": case.note, "settings": case.settings,
            "worker": None if case.kind == "peer" else
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in case.worker.items()},
            "errors": [r["error"] for r in runs if r.get("error")]}


TARGETS = {  # what the issue asked for; "at least" or "at most" the goal
    "per_message": ("tuned per-message >= 0.5x broker limit", 0.5, "at least"),
    "batched": ("batched items/s >= 5x broker limit", 5.0, "at least"),
    "latency": ("round trip p50 <= 2 ms", 2.0, "at most"),
    "cold": ("worker cold start <= 0.6 s", 0.6, "at most"),
}


def evaluate(report):
    """The issue's targets, each with the measured value, the case that reached it and the
    verdict; a target with nothing measured for it is left out, never counted as met."""
    limit = report["broker_limit"]
    reached = {}
    for kind in ("per_message", "batched"):
        best = max((c for c in report["cases"] if c["kind"] == kind and c["completed"]),
                   key=lambda c: c["median"], default=None)
        if best and limit:
            reached[kind] = (best["name"], round(best["median"] / limit, 2), best["median"] / limit)
    if report["latency_ms"].get("p50") is not None:
        p50 = report["latency_ms"]["p50"]
        reached["latency"] = (report["latency_ms"]["case"], p50, p50)
    # the celery command is how workers are started; app.Worker() is shown, not judged
    cold = [(v, k) for k, v in report["cold_start_s"].items() if "app.Worker" not in k]
    if cold:
        seconds, name = min(cold)
        reached["cold"] = (name, seconds, seconds)
    targets = []
    for kind, (case, value, exact) in reached.items():
        text, goal, direction = TARGETS[kind]
        met = exact >= goal if direction == "at least" else exact <= goal
        targets.append({"target": text, "case": case, "value": value, "goal": goal,
                        "direction": direction, "met": met})
    return targets


def print_report(report, console):
    from rich.table import Table
    limit = report["broker_limit"]
    table = Table(title=f"Throughput (median of {report['settings']['repeat']} interleaved runs; "
                        f"broker limit {limit:,.0f} msg/s)", title_justify="left")
    for col in ("case", "kind", "min", "median", "max", "x limit", "done/sent",
                "CPU us/msg client", "workers", "servers"):
        table.add_column(col, justify="left" if col in ("case", "kind") else "right")
    for c in report["broker"] + report["cases"]:
        cpu = c["cpu_us"]
        table.add_row(c["name"], c["kind"], f"{c['min']:,.0f}", f"{c['median']:,.0f}",
                      f"{c['max']:,.0f}", "-" if c["ratio"] is None else f"{c['ratio']:.2f}", f"{c['completed']}/{c['sent']}",
                      str(cpu["client"]), str(cpu["workers"]), str(cpu["servers"]))
    console.print(table)
    lat = Table(title="Round trip add.delay(2, 2).get() in ms", title_justify="left")
    for col in ("config", "p50", "p95", "p99", "samples", "note"):
        lat.add_column(col)
    for c in report["latency"]:
        lat.add_row(c["name"], f"{c['p50']:.2f}", f"{c['p95']:.2f}", f"{c['p99']:.2f}",
                    str(c["samples"]), c["note"])
    console.print(lat)
    cold = Table(title="Worker cold start: launch to first task done, seconds",
                 title_justify="left")
    for col in ("config", "min", "median", "max"):
        cold.add_column(col)
    for c in report["cold_start"]:
        cold.add_row(c["name"], f"{c['min']:.2f}", f"{c['median']:.2f}", f"{c['max']:.2f}")
    console.print(cold)
    for t in report["targets"]:
        mark = "[green]met[/]" if t["met"] else "[red]NOT met[/]"
        console.print(f"target {t['target']}: {t['value']} ({t['case']}) {mark}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    for error in report["errors"]:
        console.print(f"[red]error:[/] {error}")


def machine(broker, backend):
    """What the numbers were measured on: cores, CPU model, versions of everything involved."""
    import platform
    import celery
    import kombu
    info = {"nproc": os.cpu_count(), "cpu": "", "python": platform.python_version(),
            "celery": celery.__version__, "kombu": kombu.__version__,
            "broker": broker.split("://")[0], "backend": backend.split("://")[0]}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if is_kind(broker, "rabbitmq"):
        from kombu import Connection
        with Connection(broker, connect_timeout=3) as conn:
            conn.connect()
            props = conn.connection.server_properties
            info["broker"] = f"{props.get('product', 'AMQP')} {props.get('version', '')}"
    redis_url = next((url for url, role in ((broker, "broker"), (backend, "result backend"))
                      if is_kind(url, "redis", role)), None)
    if redis_url:
        import redis
        info["redis"] = redis.Redis.from_url(redis_url, socket_connect_timeout=3,
                                             socket_timeout=3).info("server")["redis_version"]
        if is_kind(broker, "redis"):
            info["broker"] = f"Redis {info['redis']}"
    return info


def build(args, broker, backend, summaries, latency, cold, recommended, errors, notes, cleanup):
    """The report ``--json`` writes: every number of the run, the targets judged on them."""
    limit = max((s["median"] for s in summaries if s["kind"] == "broker"), default=0.0)
    for s in summaries:
        s["ratio"] = round(s["median"] / limit, 3) if limit else None
    latency_rows = [{"name": case.name, "samples": len(v), "note": case.note,
                     **{f"p{q}": round(percentile(v, q), 3) for q in (50, 95, 99)}}
                    for case, v in latency if v]
    chosen = next((r for r in latency_rows if r["name"] == recommended), {})
    report = {
        "machine": machine(broker, backend),
        "settings": {"repeat": args.repeat, "count": args.count, "samples": args.samples,
                     "quick": args.quick, "timeout": args.timeout,
                     "broker": broker.split("://")[0], "backend": backend.split("://")[0]},
        "broker_limit": round(limit, 1),
        "broker": [s for s in summaries if s["kind"] == "broker"],
        "cases": [s for s in summaries if s["kind"] != "broker"],
        "latency_ms": {k: chosen.get(k) for k in ("p50", "p95", "p99")}
                      | {"case": chosen.get("name")},
        "latency": latency_rows,
        "cold_start_s": {name: round(median(v), 3) for name, v in cold.items() if v},
        "cold_start": [{"name": name, "min": round(min(v), 3), "median": round(median(v), 3),
                        "max": round(max(v), 3), "runs": [round(x, 3) for x in v]}
                       for name, v in cold.items() if v],
        "errors": errors,
        "notes": notes,
        "cleanup": cleanup,
    }
    report["targets"] = evaluate(report)
    return report
