"""Run the test suite as a fresh machine would, and count what skips (run as root).

    sudo .venv/bin/python tools/fresh_machine.py        # the whole suite, 4 processes
    sudo .venv/bin/python tools/fresh_machine.py --jobs 2 tests/test_config.py

"A fresh machine" is this project installed with pip and nothing else: no RabbitMQ, Redis,
PostgreSQL, Docker, Chromium or Node.js, and no network. The suite must still pass there, and
at most 15 % of its tests may skip (they are the ones that need what is missing; CI runs them).

To model it on a machine that has all of those, the suite runs in a new network namespace
(only loopback, so nothing answers on 127.0.0.1 and nothing outside is reached) and a new mount
namespace, in which every one of those programs is removed from the folders on PATH (an overlay
with a whiteout: not found, as if never installed), and RabbitMQ's scripts and PostgreSQL's
socket folder are covered by an empty tmpfs. Nothing outside the namespaces changes; the mounts
end with the run. Before the tests start it checks that no service answers and no removed
program is there, so even the `serial` tests (which on a real machine change RabbitMQ for
everyone) only meet "no RabbitMQ" here. CI is unset: on CI a skip fails. "Installed with pip"
means what `make test` leaves: `.venv` made from the requirements (it needs the network, so it
is not made here: the run stops if `make` would still install).

It prints passed / skipped / failed, the skip percentage, and the skips grouped by reason.
Exit code 0 when no test failed and at most --max-skip percent skipped.
"""
import argparse
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSIDE = "FRESH_MACHINE_INSIDE"  # set on the re-run of this script inside the namespaces
HIDDEN_PROGRAMS = ("rabbitmq-server", "rabbitmqctl", "rabbitmq-plugins", "rabbitmq-diagnostics",
                   "erl", "epmd", "redis-server", "redis-cli", "postgres", "pg_ctl", "initdb",
                   "pg_ctlcluster", "psql", "docker", "docker-compose", "chromium",
                   "chromium-browser", "chromedriver", "google-chrome", "node", "npm", "npx")
HIDDEN_FOLDERS = ("/usr/lib/rabbitmq", "/run/postgresql", "/var/run/postgresql")
# RabbitMQ, its management API, Erlang's port mapper and distribution, Redis, PostgreSQL
SERVICE_PORTS = (5672, 15672, 4369, 25672, 6379, 5432)


def hide_everything(scratch):
    """Remove the programs and folders of a machine with services (inside the namespaces).

    Each folder on PATH that holds one of the programs gets an overlay whose upper layer has a
    whiteout for it: the program is then absent (ENOENT), as on a machine that never had it,
    not merely unusable. The upper layers live on a tmpfs that ends with the namespace.
    """
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    scratch = Path(scratch) / "layers"  # a tmpfs: whiteouts need a file system that has them
    scratch.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", scratch], check=True)
    folders = {}  # a real folder on PATH -> the programs to remove from it
    for folder in os.environ["PATH"].split(os.pathsep):
        names = [name for name in HIDDEN_PROGRAMS if os.path.lexists(os.path.join(folder, name))]
        if names:
            folders.setdefault(os.path.realpath(folder), set()).update(names)
    for n, (folder, names) in enumerate(sorted(folders.items())):
        upper, work = scratch / f"upper{n}", scratch / f"work{n}"
        upper.mkdir()
        work.mkdir()
        for name in names:
            os.mknod(upper / name, 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # a whiteout
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={folder},upperdir={upper},workdir={work}", folder], check=True)
    for folder in HIDDEN_FOLDERS:
        if os.path.isdir(folder) and not os.path.ismount(folder):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", folder], check=True)


def still_there():
    """What a fresh machine would not have but this namespace still shows (should be [])."""
    left = [os.path.join(folder, name) for folder in os.environ["PATH"].split(os.pathsep)
            for name in HIDDEN_PROGRAMS if os.path.lexists(os.path.join(folder, name))]
    for port in SERVICE_PORTS:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            left.append(f"something answers on 127.0.0.1:{port}")
        except OSError:
            pass
    left += [f"{folder} is not empty" for folder in HIDDEN_FOLDERS
             if os.path.isdir(folder) and os.listdir(folder)]
    return left


def reason_of(message):
    """A skip message without what varies from test to test (paths, vhosts, addresses)."""
    message = re.sub(r"^.*?\.py:\d+: ", "", message)  # pytest's "file:line: " prefix
    message = re.sub(r" \(this machine has no RabbitMQ \+ Redis: .*", "", message, flags=re.S)
    message = re.sub(r": no usable RabbitMQ: .*", ": no usable RabbitMQ", message, flags=re.S)
    return message.strip().splitlines()[0][:200] if message.strip() else "(no reason given)"


def summarize(junit, max_skip):
    counts, skips = defaultdict(int), defaultdict(list)
    for case in ET.parse(junit).iter("testcase"):
        test = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in
                        ("skipped", "failure", "error")), None)
        kind = "passed" if outcome is None else {"skipped": "skipped", "failure": "failed",
                                                 "error": "error"}[outcome.tag]
        counts[kind] += 1
        if kind == "skipped":
            skips[reason_of(outcome.get("message", ""))].append(test)
        elif kind != "passed":
            print(f"{kind.upper()}: {test}: {(outcome.get('message') or '')[:300]}")
    total = sum(counts.values())
    share = 100.0 * counts["skipped"] / total if total else 0.0
    print(f"\nskips by reason ({len(skips)} reasons):")
    for reason, tests in sorted(skips.items(), key=lambda item: -len(item[1])):
        print(f"  {len(tests):3d}  {reason}")
        for test in tests:
            print(f"         {test}")
    print(f"\nfresh machine: {counts['passed']} passed, {counts['skipped']} skipped, "
          f"{counts['failed']} failed, {counts['error']} errors of {total} tests: "
          f"{share:.1f} % skipped (at most {max_skip:g} % allowed)")
    return 0 if counts["failed"] + counts["error"] == 0 and share <= max_skip else 1


def run_suite(junit, jobs, pytest_args):
    """pytest with a JUnit report at ``junit``; None, or why there is nothing to count."""
    left = still_there()
    if left:
        return "not a fresh machine yet: " + "; ".join(left)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", INSIDE)}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
               f"--junitxml={junit}"]
    if jobs > 1:
        command += ["-n", str(jobs), "--dist", "loadscope", "--no-loadscope-reorder"]
    code = subprocess.run([*command, *pytest_args], cwd=ROOT, env=env).returncode
    return None if junit.exists() else f"pytest ended with exit code {code} and wrote no report"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="pytest-xdist processes (as make test)")
    parser.add_argument("--max-skip", type=float, default=15.0, help="percent (issue #19)")
    args, pytest_args = parser.parse_known_args()
    if os.geteuid() != 0:
        sys.exit("needs root: it makes a network and a mount namespace (sudo)")
    if os.environ.get(INSIDE) != "1":
        # Start again inside new namespaces; they end when this process does
        os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "env",
                              f"{INSIDE}=1", sys.executable, *sys.argv])
    if subprocess.run(["make", "-q", "-C", str(ROOT), ".venv/.installed"]).returncode != 0:
        sys.exit("install the project first (`make test` does, or `make .venv/.installed`): a "
                 "fresh machine has it installed, and there is no network to do it here")
    with tempfile.TemporaryDirectory(prefix="fresh-machine-") as scratch:
        try:
            hide_everything(scratch)
            code = run_suite(Path(scratch) / "junit.xml", args.jobs, pytest_args)
        finally:  # detach the layers (the overlays still hold them): the folder can then go
            subprocess.run(["umount", "--lazy", str(Path(scratch) / "layers")],
                           stderr=subprocess.DEVNULL)
        sys.exit(code if code else summarize(Path(scratch) / "junit.xml", args.max_skip))



if __name__ == "__main__":
    main()
