"""Regenerate the README's Flower screenshot (docs/flower.png) from a real run of the demo.

    python tools/flower_screenshot.py                    # writes docs/flower.png
    python tools/flower_screenshot.py --page workers --out /tmp/workers.png

It needs what the demo needs (RabbitMQ and Redis; CELERY_BROKER_URL / CELERY_RESULT_BACKEND
or the local defaults) plus a Chromium or Chrome browser, which is not a project dependency:

    sudo apt-get install chromium        # Debian; Ubuntu: chromium-browser or the snap
    # elsewhere: install Chrome and pass --browser /path/to/chrome

The run is isolated: when `rabbitmqctl` may be used, everything happens on a throw-away vhost
(deleted afterwards), and results go under a throw-away Redis key prefix. It starts a worker per
queue and Flower (stack/, as run_demo.py does), runs a few demos with client_fixed.py
so that tasks of every kind and state show up, takes a headless screenshot of a Flower page,
and stops everything.
"""
import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack, nullcontext
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import stack  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DEMOS = "basic,routing,canvas,workflow,callbacks,retry"
PAGES = {"tasks": "/tasks", "workers": "/workers", "broker": "/broker"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--page", choices=PAGES, default="tasks", help="Flower page to shoot")
    parser.add_argument("--out", default=str(ROOT / "docs" / "flower.png"), help="PNG to write")
    parser.add_argument("--browser", help="path of a Chromium/Chrome binary")
    parser.add_argument("--size", default="1400,900", help="window size, WIDTH,HEIGHT")
    return parser.parse_args()


def find_browser(path):
    found = path or next(filter(None, map(shutil.which, BROWSERS)), None)
    if not found:
        sys.exit("no Chromium found: `sudo apt-get install chromium`, or pass --browser PATH")
    return found


def screenshot(browser, url, out, size, profile):
    # Headless, no sandbox (root in containers), and no background traffic to Google.
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={size}",
            "--virtual-time-budget=5000",  # lets the page's JavaScript load the task table
            f"--screenshot={out}", url]
    subprocess.run(argv, check=True, timeout=120, capture_output=True)


def main():
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so the cleanup below still stops every process it started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    browser = find_browser(args.browser)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    configured = stack.resolve("configured")  # the one resolver: yours, else the defaults
    base, backend = configured["CELERY_BROKER_URL"], configured["CELERY_RESULT_BACKEND"]
    stack.check_broker(base)
    stack.check_backend(backend)
    with ExitStack() as cleanup:
        run_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="flower-shot-"))
        isolated = stack.rabbitmqctl_usable() and stack.capabilities.is_kind(base, "rabbitmq")
        broker = cleanup.enter_context(stack.throwaway_vhost(base) if isolated
                                       else nullcontext(base))
        prefix = cleanup.enter_context(stack.throwaway_redis_prefix(backend))
        where = " (throw-away vhost)" if isolated else ""
        print(f"broker {stack.mask(broker)}{where}", flush=True)
        env = {"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend,
               "CELERY_RESULT_KEYPREFIX": prefix}
        processes = stack.Processes(run_dir, env=env)
        cleanup.callback(processes.stop_all)
        port = stack.free_port()
        # no beat: its task every 3 s would push the demo's tasks off the page
        nodes = stack.start_stack(processes, beat=False, flower_port=port)
        from celery import Celery
        stack.wait_for_workers(Celery(broker=broker), nodes, 60, processes)
        flower = f"http://127.0.0.1:{port}"
        # Flower shows only tasks whose events it received: wait until it sees the workers
        stack.eventually(lambda: set(nodes) <= set(requests.get(
            f"{flower}/api/workers", params={"status": 1}, timeout=5).json()),
            "Flower did not see every worker", 60, interval=0.5, ignore=requests.RequestException)
        print(f"workers {', '.join(nodes)} and Flower on {flower}: running demos {DEMOS}",
              flush=True)
        subprocess.run([sys.executable, "client_fixed.py", "--only", DEMOS], cwd=ROOT,
                       env=processes.env, check=True, timeout=180)
        stack.eventually(lambda: all(t["state"] in ("SUCCESS", "FAILURE") for t in requests.get(
            f"{flower}/api/tasks", timeout=5).json().values()), "tasks still running", 30,
            interval=0.5, ignore=requests.RequestException)
        screenshot(browser, flower + PAGES[args.page], out, args.size,
                   cleanup.enter_context(tempfile.TemporaryDirectory(prefix="chromium-")))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
