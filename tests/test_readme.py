"""The READMEs are code: the step-by-step journey runs as written, and both languages agree.

Both languages agree when README.md and README.zh-CN.md (and each docs/NAME.md and
docs/NAME.zh-CN.md) have the same heading levels, journey markers and code blocks, the code
compared without its comments (which may be translated).

A code block preceded by ``<!-- journey: background NAME -->`` is a terminal left running (a
worker, beat, Flower); ``<!-- journey: run -->`` blocks are commands that must succeed;
``<!-- journey: env NAME -->`` blocks are the exports of a variant, typed in every terminal.
The test replays them in README order against a throw-away stack (a RabbitMQ vhost, or the
embedded stack), as a user would with the environment variables the README documents; and
once more with nothing but step 2's "install nothing" exports, in a fresh copy of the project.
Only Flower's port is one that is free, so that runs at the same time do not collide.
"""
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import requests

import celeryconfig
import stack
from helpers import FENCE, ROOT, run, structure, without_comments

JOURNEY = re.compile(r"<!-- journey: (background|run|env)(?: (\S+))? -->\n```bash\n(.*?)```", re.S)
NODES = [stack.WORKER_NAMES[queue] for queue in celeryconfig.QUEUE_NAMES]


def read(name):
    return (ROOT / name).read_text(encoding="utf-8")


def journey(text):
    steps = []
    for kind, name, body in JOURNEY.findall(text):
        commands = [line for line in body.replace("\\\n", " ").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        steps.append((kind, name, commands))
    return steps


def shell(command, env, timeout=120, cwd=ROOT):
    return run(["bash", "-c", command], env=env, timeout=timeout, cwd=cwd)


def test_readme_worker_commands_are_the_ones_stack_builds():
    """run_demo.py, the diagnosis messages and the README start workers with one command."""
    commands = [c for _, name, cs in journey(read("README.md")) if name.startswith("worker-")
                for c in cs]
    assert commands == [" ".join(stack.worker_command(q, "-l", "INFO"))
                        for q in celeryconfig.QUEUE_NAMES]


def fresh_copy(folder):
    """The project as a clone has it: no virtualenv, no run folders, no broker folders."""
    shutil.copytree(ROOT, folder, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".run", ".pytest_cache", "__pycache__", "celery-fs", "celery-results"))
    return folder


@pytest.mark.parametrize("variant", ["configured", "embedded"])
def test_readme_journey_runs_as_written(variant, request, tmp_path):
    """configured: the services of this machine (a throw-away vhost and Redis prefix), or the
    embedded stack where there are none. embedded: only the exports of step 2 d), in a copy of
    the project where no folder of the embedded stack exists yet."""
    steps = journey(read("README.md"))
    names = [name for kind, name, _ in steps if kind == "background"]
    assert names == [f"worker-{node}" for node in NODES] + ["beat", "flower", "web"]
    # As a user with the venv activated: `celery` and `python` are the venv's.
    path = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if variant == "embedded":
        env, cwd = path, fresh_copy(tmp_path / "celery-demo")
        exports = "; ".join(c for kind, name, cs in steps if (kind, name) == ("env", "embedded")
                            for c in cs)
        assert exports.count("export ") == 2
    else:
        env, cwd, exports = {**request.getfixturevalue("stack_env"), **path}, ROOT, ""
    port, web_port = stack.free_port(0), stack.free_port(0)
    typed = lambda command: f"{exports}; {command}" if exports else command  # noqa: E731
    processes = stack.Processes(tmp_path / "logs", env, cwd=cwd)
    host = os.uname().nodename
    ready = False
    try:
        for kind, name, commands in steps:
            if kind == "env":
                continue
            commands = [c.replace("--port=5555", f"--port={port}")
                        .replace("python web.py", f"python web.py --port {web_port}")
                        for c in commands]
            if kind == "background":
                for command in commands:
                    processes.start(name, ["bash", "-c", typed(command)])
                continue
            if not ready:  # a user waits for the workers' "ready" lines before going on
                pinged = lambda: shell(typed("celery -A tasks inspect ping"),  # noqa: E731
                                       env, 30, cwd).stdout
                stack.eventually(lambda: all(f"{n}@{host}: OK" in pinged() for n in NODES),
                                 "every worker to answer a ping", 90, interval=0.5)
                ready = True
            for command in commands:
                out = shell(typed(command), env, cwd=cwd)
                assert out.returncode == 0, f"`{command}` failed:\n{out.stdout}\n{out.stderr}"
                if "active_queues" in command:
                    for queue in celeryconfig.QUEUE_NAMES:
                        assert f"'name': '{queue}'" in out.stdout
                if "client_fixed.py" in command:
                    assert "failed" not in out.stdout.lower() or " 0 failed" in out.stdout
                if command.startswith("celery -A tasks result"):
                    assert out.stdout.strip() == "5", out.output
        assert not processes.exited(), processes.exited()
        # Flower, as the README says: the dashboard lists every worker.
        page = requests.get(f"http://127.0.0.1:{port}/workers", timeout=5)
        assert page.status_code == 200
        for node in NODES:
            assert f"{node}@{host}" in page.text
        # web.py, as the README says: its page, and its API starting a task the workers run
        web = f"http://127.0.0.1:{web_port}"
        assert stack.wait_for_port("127.0.0.1", web_port, 30), processes.log_tail("web")
        assert "slow_task" in requests.get(f"{web}/", timeout=5).text
        started = requests.post(f"{web}/api/slow_task", json={"duration": 1}, timeout=15).json()
        stack.eventually(lambda: requests.get(f"{web}/api/tasks/{started['id']}",
                                              timeout=15).json()["state"] == "SUCCESS",
                         "the web page's task to succeed", 20)
        if variant == "embedded":  # the folders the exports name, made by the stack itself
            assert (cwd / "celery-fs" / "messages").is_dir()
            assert any((cwd / "celery-results").iterdir())
    finally:
        processes.stop_all()


PAIRS = [("README.md", "README.zh-CN.md")] + [
    (f"docs/{page.name}", f"docs/{page.stem}.zh-CN.md")
    for page in sorted((ROOT / "docs").glob("*.md")) if not page.name.endswith(".zh-CN.md")]


@pytest.mark.parametrize("en_name, zh_name", PAIRS, ids=[en for en, _ in PAIRS])
def test_both_languages_have_the_same_sections_and_code(en_name, zh_name):
    assert (ROOT / zh_name).exists(), f"{en_name} has no Chinese version {zh_name}"
    en, zh = read(en_name), read(zh_name)
    en_levels, en_blocks, en_journey = structure(en)
    zh_levels, zh_blocks, zh_journey = structure(zh)
    assert en_levels == zh_levels, f"{en_name} and {zh_name} have different section structures"
    assert en_journey == zh_journey
    assert len(en_blocks) == len(zh_blocks)
    for number, (a, b) in enumerate(zip(en_blocks, zh_blocks), 1):
        assert a == b, f"code block {number} differs between {en_name} and {zh_name}"
    # each page links to the other language before its first section
    assert Path(zh_name).name in en.split("\n## ")[0] and Path(en_name).name in zh.split("\n## ")[0]


def test_the_comment_stripping_keeps_the_code():
    assert without_comments("celery -A tasks worker  # a worker\n# only a comment\nx = '#'") == \
        "celery -A tasks worker\nx = '#'"
    assert without_comments("a = 1  # one") != without_comments("a = 2  # one")


def test_readme_links_every_docs_page_in_both_languages():
    en, zh = read("README.md"), read("README.zh-CN.md")
    for en_name, zh_name in PAIRS[1:]:
        assert f"]({en_name})" in en, f"README.md does not link {en_name}"
        assert f"]({zh_name})" in zh, f"README.zh-CN.md does not link {zh_name}"


def test_readme_quick_start_names_the_commands_that_exist():
    en = read("README.md")
    quick = en.split("## The whole stack in one command", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quick and "make test" in quick
    makefile = read("Makefile")
    assert re.search(r"^demo:.*\n\t.*run_demo\.py", makefile, re.M)
    assert re.search(r"^test:.*\n(?:\t.*\n)*?\t.*pytest", makefile, re.M)
    ci = read(".ci/run")
    assert "make test" in ci
    for name in re.findall(r"`([\w/.-]+\.(?:py|yml|png|txt))`", en):
        assert (ROOT / name).exists() or (ROOT / "tests" / name).exists() or "/" not in name \
            and list(ROOT.glob(f"**/{name}")), f"README mentions {name}, which does not exist"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def test_every_link_between_pages_and_to_a_section_resolves():
    pages = ["README.md", "README.zh-CN.md"] + [f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")]
    broken = []
    for page in pages:
        text = FENCE.sub("", read(page))
        for target, anchor in re.findall(r"\]\((?!https?://|#)([^)#\s]*)(?:#([^)\s]*))?\)", text):
            path = (ROOT / page).parent / target
            if not path.exists():
                broken.append(f"{page}: {target} does not exist")
                continue
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", FENCE.sub("", path.read_text()), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page}: {target}#{anchor}: no such section")
    assert not broken, "\n".join(broken)


def test_every_docs_page_links_back_to_the_readme():
    for page in sorted((ROOT / "docs").glob("*.md")):
        readme = "README.zh-CN.md" if page.name.endswith(".zh-CN.md") else "README.md"
        head = page.read_text(encoding="utf-8").split("\n## ")[0]
        assert f"](../{readme})" in head, f"docs/{page.name} does not link back to {readme}"


# One Chinese term per concept; the English word only in code, in names, or as a gloss right
# after the term's first use: 工作进程（worker）.
ENGLISH_TERMS = re.compile(r"\b(workers?|brokers?|clients?|acks?|late[- ]ack\w*|early[- ]ack\w*|"
                           r"publisher confirms?|child(?:ren)?)\b", re.I)
GLOSS = re.compile(r"（[^（）]*）")


def test_chinese_prose_uses_one_term_per_concept():
    found = []
    for en_name, zh_name in PAIRS:
        # code spans, links, markers and *UI labels* (Flower's *Workers* tab) are names
        prose = re.sub(r"<!--.*?-->|``.*?``|`[^`\n]*`|\]\([^)]*\)|\*[A-Z][\w ]*\*", "",
                       FENCE.sub("", read(zh_name)), flags=re.S)
        for line in prose.splitlines():
            for word in ENGLISH_TERMS.findall(GLOSS.sub("", line)):
                found.append(f"{zh_name}: '{word}' in: {line.strip()[:80]}")
    assert not found, "use 工作进程, 消息代理, 客户端, 确认, 延迟确认, 提前确认, 发布确认, 子进程:\n" + \
        "\n".join(found)
