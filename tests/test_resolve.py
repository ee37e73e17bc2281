"""The one resolver (stack/resolve.py): which broker and result backend every process gets.

    pytest tests/test_resolve.py        # a second: no service is asked

run_demo.py, benchmark.py, client_fixed.py and the tests all call ``stack.resolve``; these
tests pin its rules: a URL of the kind asked for is taken from the environment, any other
kind falls back to that kind's default, and the embedded stack lives in the run folder.
"""
from pathlib import Path

import pytest

import stack

SQS = "sqs://key:secret@127.0.0.1:4566"


@pytest.mark.parametrize("configured, kind, expected", [
    ("redis://elsewhere:6380/2", "redis", "redis://elsewhere:6380/2"),  # yours, of that kind
    ("redis://elsewhere:6380/2", "rabbitmq", stack.DEFAULT_BROKER),     # another kind: default
    ("amqps://u:p@rabbit.example:5671/v", "rabbitmq", "amqps://u:p@rabbit.example:5671/v"),
    (None, "redis", stack.BROKER_URLS["redis"]),
])
def test_a_broker_named_by_kind_is_yours_when_of_that_kind_else_the_default(
        monkeypatch, configured, kind, expected):
    if configured:
        monkeypatch.setenv("CELERY_BROKER_URL", configured)
    assert stack.configured("broker", kind) == expected


def test_configured_is_the_environment_or_the_defaults_unchecked(monkeypatch):
    assert stack.resolve("configured") == {"CELERY_BROKER_URL": stack.DEFAULT_BROKER,
                                           "CELERY_RESULT_BACKEND": stack.DEFAULT_BACKEND}
    monkeypatch.setenv("CELERY_BROKER_URL", SQS)  # nothing listens there: not asked
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "rpc://")
    assert stack.resolve("configured") == {"CELERY_BROKER_URL": SQS,
                                           "CELERY_RESULT_BACKEND": "rpc://"}


def test_the_rabbitmq_candidates_are_yours_then_the_default_then_compose(monkeypatch):
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://me:pw@127.0.0.1:5672/mine")
    monkeypatch.setenv("RABBITMQ_DEFAULT_USER", "composed")
    assert stack.candidates("rabbitmq") == [
        "amqp://me:pw@127.0.0.1:5672/mine", stack.DEFAULT_BROKER,
        stack.compose_broker_url()]
    assert "composed" in stack.compose_broker_url()
    monkeypatch.setenv("CELERY_BROKER_URL", SQS)  # not RabbitMQ: not a candidate
    assert SQS not in stack.candidates("rabbitmq")


def test_the_embedded_stack_and_file_results_live_in_the_run_folder(tmp_path):
    env = stack.resolve("embedded", run_dir=tmp_path)
    assert stack.capabilities.is_kind(env["CELERY_BROKER_URL"], "embedded")
    assert Path(env["CELERY_FS_ROOT"]).is_dir() and str(tmp_path) in env["CELERY_FS_ROOT"]
    results = env["CELERY_RESULT_BACKEND"].removeprefix("file://")
    assert Path(results).is_dir() and results.startswith(str(tmp_path))
    # --backend file named: the results folder is made in the run folder too
    env = stack.resolve("embedded", "file", run_dir=tmp_path / "other")
    assert env["CELERY_RESULT_BACKEND"] == f"file://{tmp_path / 'other' / 'results'}"
    assert (tmp_path / "other" / "results").is_dir()
