"""tools/fresh_machine.py, which the README cites for the fresh-machine figure: how it counts.

    pytest tests/test_fresh_machine.py

(Running it takes the whole suite, as root, in namespaces: that is a measurement, not a test.)
"""
import importlib.util

from helpers import ROOT

spec = importlib.util.spec_from_file_location("fresh_machine", ROOT / "tools" / "fresh_machine.py")
fresh_machine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fresh_machine)

REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_one" />
<testcase classname="tests.test_a" name="test_two" />
<testcase classname="tests.test_a" name="test_three" />
<testcase classname="tests.test_b" name="test_rabbit[x]"><skipped type="pytest.skip"
 message="RabbitMQ only: it is about RabbitMQ (this machine has no RabbitMQ + Redis: no usable
 RabbitMQ: cannot reach the broker at amqp://guest:**@localhost:5672//)" /></testcase>
<testcase classname="tests.test_b" name="test_rabbit[y]"><skipped type="pytest.skip"
 message="RabbitMQ only: it is about RabbitMQ (this machine has no RabbitMQ + Redis: other)" />
</testcase>
{extra}</testsuite></testsuites>"""
FAILED = '<testcase classname="tests.test_c" name="test_bad"><failure message="boom" /></testcase>'


def summary(tmp_path, capsys, extra="", max_skip=50.0):
    junit = tmp_path / "junit.xml"
    junit.write_text(REPORT.format(extra=extra))
    code = fresh_machine.summarize(junit, max_skip)
    return code, capsys.readouterr().out


def test_it_counts_and_groups_the_skips_by_reason_without_the_machines_details(tmp_path, capsys):
    code, out = summary(tmp_path, capsys)
    assert code == 0, out
    assert "3 passed, 2 skipped, 0 failed, 0 errors of 5 tests: 40.0 % skipped" in out
    assert "    2  RabbitMQ only: it is about RabbitMQ\n" in out  # one reason, not two
    assert "test_b::test_rabbit[x]" in out and "test_b::test_rabbit[y]" in out


def test_a_failure_or_too_many_skips_is_exit_code_1(tmp_path, capsys):
    code, out = summary(tmp_path, capsys, extra=FAILED)
    assert code == 1 and "FAILED: test_c::test_bad: boom" in out and "1 failed" in out
    code, out = summary(tmp_path, capsys, max_skip=15.0)
    assert code == 1 and "40.0 % skipped (at most 15 % allowed)" in out

