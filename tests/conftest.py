"""The fixtures the tests share, and the CI rule for skips; every helper is in helpers.py
(imported by name: ``from helpers import python``), and so is the one environment scrub.
"""
import os
import signal

import pytest

from helpers import ON_CI, Live, configure, throwaway_stack  # puts the project on sys.path

import stack  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On CI, a skip that did not come through skip() (a skipif mark, a direct pytest.skip)
    fails all the same."""
    report = (yield).get_result()
    if ON_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true, so no test may skip, but this one did: {reason}"


# Under `make test`'s parallel run (pytest-xdist, --dist loadscope) a module is one unit of work,
# given to one process, so that what its tests share (a module fixture: the hosts, the
# in-process workers, a run per stack) is made once. The tests of these modules share nothing
# of the kind: each is a unit of its own, so that their long ones (a README journey, a benchmark
# run, a full run_demo.py) spread over the processes instead of queueing in one.
SHARE_NOTHING = ("test_readme", "test_benchmark", "test_midrun_faults", "test_run_demo",
                 "test_diagnosis")

# The longest units (about 170 s down to 25 s here) start first: pytest-xdist hands them out in
# this order, so that none of them is left running alone at the end while the other processes
# idle.
SLOWEST_FIRST = ("test_hosts", "test_stacks", "test_readme", "test_benchmark",
                 "test_midrun_faults", "test_run_demo", "test_diagnosis", "test_web",
                 "test_faults", "test_bad_input", "test_tasks", "test_config", "test_clients",
                 "test_flower", "test_embedded_pidbox", "test_compose")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist
def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, with a unit per test in the SHARE_NOTHING modules."""
    if config.getvalue("dist") != "loadscope":
        return None  # pytest-xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
            return nodeid if module in SHARE_NOTHING else super()._split_scope(nodeid)
    return Scheduling(config, log)


# `make test`'s second phase runs the `cluster` tests (tests/test_cluster.py) beside the other
# `serial` ones: they build their own RabbitMQ in network namespaces and never use this machine's.
# They run in the background of the Makefile's shell, which starts them with Ctrl-C ignored:
# heard again, Ctrl-C ends them as it ends the others, through their clean-up (`finally`).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)  # before pytest's own reordering and --failed-first
def pytest_collection_modifyitems(items):
    rank = {name: n for n, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: per module


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A test of a SHARE_NOTHING module fails if it shares a fixture made once per module
    after all: each process that runs one of those tests would make it again."""
    if item.module.__name__ in SHARE_NOTHING and not item.get_closest_marker("serial"):
        shared = [name for name, defs in item._fixtureinfo.name2fixturedefs.items()
                  if defs[-1].scope in ("package", "module", "class")]
        if shared:
            pytest.fail(f"{item.nodeid} uses {', '.join(shared)}, made once per module: take "
                        f"{item.module.__name__} out of SHARE_NOTHING in tests/conftest.py",
                        pytrace=False)


@pytest.fixture
def stack_env(tmp_path):
    """A throw-away stack for this test (RabbitMQ + Redis, or embedded)."""
    with throwaway_stack(tmp_path / "stack") as env:
        yield env


@pytest.fixture(scope="module")
def module_env(tmp_path_factory):
    """A throw-away stack shared by the tests of a module."""
    with throwaway_stack(tmp_path_factory.mktemp("stack")) as env:
        yield env


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The `tasks` app with real in-process workers (threads pool) for every queue, and beat,
    on RabbitMQ + Redis, or on the embedded stack where there is none.

    memory:// is not a variant here: complete_demo.py runs the whole catalogue on it
    (test_config.py), and a broker other processes can reach proves more.
    """
    saved = dict(os.environ)
    try:
        with throwaway_stack(tmp_path_factory.mktemp("live")) as env:
            # os.environ too: a demo's "another process" (demo_states) inherits it
            app = configure(env)
            queues = [q.name for q in app.conf.task_queues]
            run_dir = tmp_path_factory.mktemp("beat")
            with stack.in_process_workers(app, queues, beat=True, run_dir=run_dir) as workers:
                yield Live(env, app, workers)
    finally:  # later modules (processes they start, the `tasks` app) must not keep this stack
        os.environ.clear()
        os.environ.update(saved)
        configure()


@pytest.fixture
def rabbit_env(stack_env):
    """A throw-away RabbitMQ vhost + Redis prefix: for tests about RabbitMQ itself."""
    stack_env.only_rabbit("this test is about RabbitMQ")
    return stack_env


@pytest.fixture
def logs_on_failure(cluster, request):
    """Print the hosts' logs after a test that failed. ``cluster``: the requesting module's
    hosts (docs/more-machines' in test_hosts.py, docs/cluster's in test_cluster.py)."""
    before = request.session.testsfailed
    yield
    if request.session.testsfailed > before:
        print(cluster.logs())
