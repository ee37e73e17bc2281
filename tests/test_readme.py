"""The READMEs are code: the step-by-step journey runs as written, and both languages agree.

Both languages agree when README.md and README.zh-CN.md (and each docs/NAME.md and
docs/NAME.zh-CN.md) have the same heading levels, journey markers and code blocks, the code
compared without its comments (which may be translated).

A code block preceded by ``<!-- journey: background NAME -->`` is a terminal left running (a
worker, beat, Flower); ``<!-- journey: run -->`` blocks are commands that must succeed. The test
replays them in README order against a throw-away stack (a RabbitMQ vhost, or the embedded
stack), as a user would with the environment variables the README documents.
"""
import os
import re
import sys
from pathlib import Path

import pytest
import requests

import celeryconfig
import stack
from conftest import ROOT, run

JOURNEY = re.compile(r"<!-- journey: (background|run)(?: (\S+))? -->\n```bash\n(.*?)```", re.S)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
NODES = ["default", "fast", "slow", "network"]


def read(name):
    return (ROOT / name).read_text(encoding="utf-8")


def journey(text):
    steps = []
    for kind, name, body in JOURNEY.findall(text):
        commands = [line for line in body.replace("\\\n", " ").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        steps.append((kind, name, commands))
    return steps


def shell(command, env, timeout=120):
    return run(["bash", "-c", command], env=env, timeout=timeout)


def test_readme_worker_commands_are_the_ones_stack_builds():
    """run_demo.py, the diagnosis messages and the README start workers with one command."""
    commands = [c for _, name, cs in journey(read("README.md")) if name.startswith("worker-")
                for c in cs]
    assert commands == [" ".join(stack.worker_command(q, "-l", "INFO"))
                        for q in celeryconfig.QUEUE_NAMES]


def test_readme_journey_runs_as_written(stack_env, tmp_path):
    steps = journey(read("README.md"))
    names = [name for kind, name, _ in steps if kind == "background"]
    assert names == ["worker-default", "worker-fast", "worker-slow", "worker-network", "beat",
                     "flower"]
    # As a user with the venv activated: `celery` and `python` are the venv's.
    env = {**stack_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    processes = stack.Processes(tmp_path, env)
    host = os.uname().nodename
    ready = False
    try:
        for kind, name, commands in steps:
            if kind == "background":
                for command in commands:
                    processes.start(name, ["bash", "-c", command])
                continue
            if not ready:  # a user waits for the workers' "ready" lines before going on
                pinged = lambda: shell("celery -A tasks inspect ping", env, 30).stdout  # noqa: E731
                stack.eventually(lambda: all(f"{n}@{host}: OK" in pinged() for n in NODES),
                                 "the four workers to answer a ping", 60, interval=0.5)
                ready = True
            for command in commands:
                out = shell(command, env)
                assert out.returncode == 0, f"`{command}` failed:\n{out.stdout}\n{out.stderr}"
                if "active_queues" in command:
                    for queue in ("celery", "fast_queue", "slow_queue", "network_queue"):
                        assert f"'name': '{queue}'" in out.stdout
                if "client_fixed.py" in command:
                    assert "failed" not in out.stdout.lower() or " 0 failed" in out.stdout
        assert not processes.exited(), processes.exited()
        # Flower, as the README says: the dashboard lists the four workers.
        page = requests.get("http://127.0.0.1:5555/workers", timeout=5)
        assert page.status_code == 200
        for node in NODES:
            assert f"{node}@{host}" in page.text
    finally:
        processes.stop_all()


COMMENT = re.compile(r"(?:^|\s+)#(?:\s.*)?$")


def without_comments(block):
    """A code block with its comments dropped: comments may be translated, the code may not."""
    lines = [COMMENT.sub("", line).rstrip() for line in block.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def structure(text):
    """Heading levels, code blocks (without comments) and journey markers: what both languages share."""
    blocks = [without_comments(block) for block in FENCE.findall(text)]
    prose = FENCE.sub("", text)
    levels = [len(m) for m in re.findall(r"^(#+) ", prose, re.M)]
    return levels, blocks, re.findall(r"<!-- journey: [^>]*-->", text)


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
    assert re.search(r"^test:.*\n\t.*pytest", makefile, re.M)
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
