"""Where the time goes: CPU seconds per message of each process group, and cProfile by area.

Owns: ``CpuMeter`` (CPU per message of the client, the workers and the RabbitMQ / Redis servers,
read from /proc, so it holds on a noisy machine) and ``profile`` (``benchmark.py --profile``:
the raw kombu consumer and a tuned worker under cProfile, their time grouped by package).
"""
import os


def processes():
    """(pid, process group, name, start time, CPU seconds incl. reaped children) of each process."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, _, rest = f.read().rpartition(")")
            except OSError:
                continue  # it exited meanwhile
            fields = rest.split()
            yield (int(entry), int(fields[2]), head.partition("(")[2], int(fields[19]),
                   sum(int(x) for x in fields[11:15]) / tick)


def servers():
    """Pids of RabbitMQ and Redis on this machine: the oldest process of each name (rabbitmqctl
    runs a short-lived Erlang VM with the same name as the server's)."""
    oldest = {}
    for pid, _, name, started, _ in processes():
        if name in ("beam.smp", "redis-server") and started < oldest.get(name, (0, 1e18))[1]:
            oldest[name] = (pid, started)
    return {pid for pid, _ in oldest.values()}


def cpu_seconds(pgids=(), pids=()):
    return sum(cpu for pid, group, _, _, cpu in processes() if group in pgids or pid in pids)


class CpuMeter:
    """CPU time per message of this process, the workers (by process group) and the servers."""

    def __init__(self, pgids):
        import resource
        self._self = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        self.pgids, self.servers = set(pgids), servers()
        self.start = (self._self(), cpu_seconds(self.pgids), cpu_seconds(pids=self.servers))

    def per_message(self, count):
        """Microseconds of CPU per message for the client, the workers and the servers."""
        now = (self._self(), cpu_seconds(self.pgids), cpu_seconds(pids=self.servers))
        return {k: round((b - a) * 1e6 / max(count, 1))
                for k, a, b in zip(("client", "workers", "servers"), self.start, now)}


def profile(run, count, console):
    """The raw consumer and a tuned worker, each under cProfile: where a message's time goes."""
    import pstats
    from rich.table import Table
    from .cases import all_cases, measure
    cases = {c.name: c for c in all_cases("", "")}
    compared = {"raw kombu consumer": cases["broker: raw kombu, transient"],
                "tuned Celery worker": cases["tuned"]}
    areas, top = {}, []
    for i, (label, case) in enumerate(compared.items()):
        path = os.path.join(run.run_dir, f"profile-{i}.prof")
        result = measure(run, case, f"p{i}", count, profile=path)
        console.print(f"{label}: {result['rate']:,.0f} msg/s under cProfile, "
                      f"{result['completed']}/{result['sent']}")
        stats = pstats.Stats(path).stats  # {(file, line, function): (cc, nc, tottime, cumtime, _)}
        for (filename, line, function), (_, calls, tottime, _, _) in stats.items():
            where = area(filename, function)
            areas.setdefault(where, {}).setdefault(label, 0.0)
            areas[where][label] += tottime * 1e6 / count
            if label.startswith("tuned"):
                top.append((tottime * 1e6 / count, calls / count,
                            f"{function} ({filename.split('site-packages/')[-1]}:{line})"))
    table = Table(title=f"CPU per message by area, microseconds under cProfile ({count} messages; "
                        "the profiler inflates everything, compare the columns)",
                  title_justify="left")
    table.add_column("area")
    for label in compared:
        table.add_column(label, justify="right")
    for where, by_label in sorted(areas.items(), key=lambda kv: -max(kv[1].values())):
        table.add_row(where, *(f"{by_label.get(label, 0):.1f}" for label in compared))
    table.add_row("total per message", *(
        f"{sum(v.get(label, 0) for k, v in areas.items() if 'not per message' not in k):.1f}"
        for label in compared), style="bold")
    console.print(table)
    functions = Table(title="The tuned worker's 15 most expensive functions", title_justify="left")
    for col in ("us/msg", "calls/msg", "function"):
        functions.add_column(col)
    for us, calls, name in sorted(top, reverse=True)[:15]:
        functions.add_row(f"{us:.1f}", f"{calls:.1f}", name)
    console.print(functions)
    return 0


def area(filename, function):
    """Which part of the stack a profiled function belongs to."""
    if filename == "~":  # built-in functions: name the system calls
        if "poll" in function or "select" in function:
            return "idle: waiting in poll (not per message)"
        return "socket send/recv" if "socket" in function else "builtins (C)"
    if "importlib" in filename:
        return "start-up: imports (not per message)"
    for package in ("amqp", "kombu", "vine", "billiard", "celery/worker", "celery/app",
                    "celery/concurrency", "celery", "json", "click"):
        if f"/{package}/" in filename:
            return package.replace("/", ".")
    return "other (stdlib, bench/)"
