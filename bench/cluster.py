"""The tuned case on a three-node RabbitMQ cluster with quorum queues, next to one node with
classic queues, in the same run (docs/cluster.md, docs/performance.md).

    sudo .venv/bin/python benchmark.py --cluster   # builds the cluster, measures, removes it

Owns: running benchmark.py's ``tuned`` case on the cluster's client host, round after round and
in alternating order, against (a) ``rabbit1`` alone with classic queues and (b) the failover
list with quorum queues, and the two rows side by side. Each measurement is a run of
``benchmark.py --only '^tuned$'`` on that host, so the numbers are the main table's own
measurement; both rows connect to ``rabbit1`` (a client's quorum queue has its leader on the
node it declared it on), so what differs is the queue type: a quorum queue writes every message
to disk on all three nodes and waits for a majority, a transient message on a classic queue
stays in one node's memory.
"""
import json
import os
import subprocess
import sys

from .report import median

HOST = "client"


def rows(cluster):
    """(name, the CELERY_* variables of its runs) of the two rows."""
    return (("one node, classic queues", {"CELERY_BROKER_URL": cluster.url("rabbit1"),
                                          "CELERY_RESULT_BACKEND": cluster.result_backend,
                                          "CELERY_QUEUE_TYPE": "classic"}),
            ("3-node cluster, quorum queues", cluster.env()))


def measure_once(cluster, name, env, count, timeout, out):
    """One run of the tuned case on the client host; its summary from benchmark.py's JSON."""
    argv = [sys.executable, "benchmark.py", "--only", "^tuned$", "--repeat", "1",
            "--count", str(count), "--timeout", str(timeout), "--json", str(out)]
    done = cluster.hosts.run(HOST, argv, env=env, timeout=3 * timeout + count / 50 + 60)
    if done.returncode or not os.path.exists(out):
        said = (done.stdout + done.stderr).strip().splitlines()
        raise RuntimeError(f"benchmark.py on {HOST} ({name}) exited {done.returncode}: "
                           f"{said[-1] if said else ''}")
    with open(out) as f:
        return next(c for c in json.load(f)["cases"] if c["name"] == "tuned")


def compare(cluster, count=10000, repeat=3, timeout=30.0, say=print):
    """Both rows, ``repeat`` interleaved rounds; returns [{name, median, runs, sent, completed,
    errors}, ...] and quorum / classic (the ratio of the medians)."""
    measured = {name: [] for name, _ in rows(cluster)}
    for rnd in range(repeat):
        order = rows(cluster)[::1 if rnd % 2 == 0 else -1]  # neither row always goes first
        for i, (name, env) in enumerate(order):
            out = cluster.hosts.run_dir / f"bench-cluster-r{rnd}-{i}.json"
            case = measure_once(cluster, name, env, count, timeout, out)
            measured[name].append(case)
            say(f"round {rnd + 1}/{repeat}  {name:<30} {case['median']:>9,.0f}/s  "
                f"{case['completed']}/{case['sent']}")
    table = [{"name": name, "median": round(median([c["median"] for c in cases]), 1),
              "runs": [c["median"] for c in cases], "sent": sum(c["sent"] for c in cases),
              "completed": sum(c["completed"] for c in cases),
              "errors": [e for c in cases for e in c["errors"]]}
             for name, cases in measured.items()]
    classic, quorum = (row["median"] for row in table)
    return table, round(quorum / classic, 2) if classic else None


def print_rows(table, ratio, say=print):
    say(f"{'tuned, from the client host':<32} {'median /s':>10}  {'runs /s':<26} done/sent")
    for row in table:
        runs = ", ".join(f"{r:,.0f}" for r in row["runs"])
        say(f"{row['name']:<32} {row['median']:>10,.0f}  {runs:<26} "
            f"{row['completed']}/{row['sent']}" + (f"  {row['errors']}" if row["errors"] else ""))
    say(f"quorum / classic: {ratio}")


def main(args):
    """``benchmark.py --cluster``: build the hosts and the cluster, compare, remove it all (also
    after a failure, Ctrl-C or SIGTERM: the hosts' with-block). Returns the exit code."""
    from stack import cluster as clusterlib
    from stack import hosts as hostlib
    try:
        hostlib.require_root()
    except hostlib.HostsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with hostlib.Hosts(clusterlib.HOST_NAMES) as hosts:
            print(f"cluster: starting 3 RabbitMQ nodes and Redis; logs in {hosts.run_dir}",
                  flush=True)
            cluster = clusterlib.start_cluster(hosts)
            clusterlib.join(cluster)
            print("cluster: rabbit2 and rabbit3 joined rabbit1", flush=True)
            table, ratio = compare(cluster, args.count, args.repeat, args.timeout,
                                   say=lambda line: print(line, flush=True))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # the hosts are gone by now
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print_rows(table, ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cluster": table, "quorum_over_classic": ratio,
                       "count": args.count, "repeat": args.repeat}, f, indent=2)
    return 0 if all(r["completed"] == r["sent"] and not r["errors"] for r in table) else 1
