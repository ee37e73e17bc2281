"""Every command in README.md and docs/*.md is one the installed tools accept.

    pytest tests/test_docs_commands.py        # a few seconds

The README journey (test_readme.py) runs its commands; every other documented command is at
least parsed here, by the tool itself and without running it:

- ``celery ...`` through Celery's own click entry point with ``--help`` appended: click parses
  every option before it prints help, so an option Celery does not have (``control revoke ID
  --terminate``) fails. ``inspect``/``control`` sub-commands are looked up in Celery's registry,
  Flower's options (which click passes on to tornado unchecked) in Flower's, and the options of
  ``celery multi`` (passed on to each worker) as a worker's.
- ``python SCRIPT.py ...`` through the script's own argparse parser, stopped right after parsing.
- ``make TARGET`` must name a target of the Makefile; ``pip install -r FILE`` an existing file;
  any other program must be one the docs are meant to use (a typo in a program name fails).

All commands are checked in one subprocess (this file run as a script), about a second in all.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "README.zh-CN.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELLS = ("bash", "sh", "shell", "console")
# a celery command inside a config file or another block, e.g. systemd's ExecStart=.../celery -A ...
EMBEDDED_CELERY = re.compile(r"(?:^|[\s=])((?:[^\s=]*/)?celery\s+(?:-A|--app|--workdir|multi)\s.*)$", re.M)
INLINE = re.compile(r"(?<!`)``?(?!`)((?:celery|python|\.venv/bin/python) [^`]+?)``?(?!`)")
PROGRAMS = {"celery", "python", "python3", "make", "docker", "pip", "cd", "mkdir", "kill", "curl",
            "export", "systemctl", "journalctl", "apt-get", "rabbitmqctl", ".", "source", "pytest",
            "ss", "redis-cli", "date", "head", "npm", "node",
            "rabbitmq-queues"}
# `python -m MODULE` of this project: its options are parsed like a script's
OUR_MODULES = {"stack.hosts": "stack/hosts.py"}


def _substitute(command):
    """Shell substitutions and <placeholders> become plain words, as the shell would give."""
    out, i = [], 0
    while i < len(command):
        if command.startswith("$(", i):  # skip to the matching parenthesis
            depth, j = 1, i + 2
            while j < len(command) and depth:
                depth += {"(": 1, ")": -1}.get(command[j], 0)
                j += 1
            out.append("SUBST")
            i = j
        else:
            out.append(command[i])
            i += 1
    return re.sub(r"<[^<>\s][^<>]*>", "PLACEHOLDER", "".join(out))


def split_commands(line):
    """One shell line -> argv lists (split at && || ; |), without comments and VAR=value prefixes."""
    lexer = shlex.shlex(_substitute(line), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    result = []
    for argv in commands:
        while argv and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]) or argv[0] == "sudo"):
            argv = argv[1:]
        if argv:
            result.append(argv)
    return result


def documented_commands():
    """(page, command text, argv) for every shell command in the docs."""
    found = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for language, body in FENCE.findall(text):
            if language in SHELLS:
                lines = body.replace("\\\n", " ").splitlines()
            else:
                lines = EMBEDDED_CELERY.findall(body)
            for line in lines:
                for argv in split_commands(line):
                    found.append((page, line.strip(), argv))
        prose = FENCE.sub("", text)
        for span in INLINE.findall(prose.replace("\n", " ")):
            for argv in split_commands(span):
                found.append((page, span, argv))
    return found


def program(argv):
    name = argv[0].rsplit("/", 1)[-1]
    return "python" if re.fullmatch(r"python3?(\.\d+)?", name) else name


# --- Run as a script, in one subprocess: parse each command with the tool itself --------------
def check_celery(argv):
    import click
    from celery.bin.celery import celery
    from celery.worker.control import Panel
    args = argv[1:]
    for kind in ("inspect", "control"):
        if kind in args:  # the sub-command must exist (click accepts any word there)
            rest = [a for a in args[args.index(kind) + 1:] if not a.startswith("-")]
            if rest and rest[0] not in ("...", "PLACEHOLDER"):
                meta = Panel.meta.get(rest[0])
                if meta is None or meta.type != kind:
                    return f"`celery {kind}` has no command {rest[0]!r}"
    if "flower" in args:  # Flower hands its options to tornado, which checks them only at start
        from flower.options import options
        for arg in args[args.index("flower") + 1:]:
            name = arg[2:].split("=")[0].replace("_", "-")
            if arg.startswith("--") and name not in options._options:
                return f"Flower has no option --{name}"
    if "multi" in args:  # multi passes its options on to each worker: check them as a worker's
        at = args.index("multi")
        rest = args[at + 2:]  # after the action (start, stopwait, ...)
        while rest and not rest[0].startswith("-"):
            rest = rest[1:]  # node names
        args = args[:at] + ["worker"] + [re.sub(r"^(-\w+):\w+$", r"\1", a) for a in rest]
    if "--workdir" in args:  # its callback changes directory at once: give it one that exists
        args[args.index("--workdir") + 1] = str(ROOT)
    try:
        celery.main(args=args + ["--help"], prog_name="celery", standalone_mode=False)
    except click.exceptions.Exit:
        pass
    except click.ClickException as exc:
        return exc.format_message()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the command is not accepted
        return f"{exc.__class__.__name__}: {exc}"
    finally:
        os.chdir(ROOT)
    return None


def check_python(argv):
    import argparse
    import runpy
    args = argv[1:]
    module = args[1] if args[:1] == ["-m"] and args[1] in OUR_MODULES else None
    if args[:1] == ["-m"] and not module:
        return None if args[1] in ("pytest", "celeryconfig", "venv", "pip") else f"module {args[1]}?"
    if args[:1] == ["-c"]:
        return None
    if module:
        args = args[1:]  # [module, options...], checked like a script
    script = ROOT / (OUR_MODULES.get(module) or args[0])
    if not script.is_file():
        return f"{args[0]} does not exist"
    if "argparse" not in script.read_text():
        return None if len(args) == 1 else f"{args[0]} takes no options"

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        real(self, args, namespace)  # exits with code 2 on an unknown option
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_only
    sys.argv = [str(script), *args[1:]]
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(script), run_name="__main__")
    except Parsed:
        return None
    except SystemExit as exc:
        return f"refused (exit code {exc.code})"
    finally:
        argparse.ArgumentParser.parse_args = real
    return f"{args[0]} ran without parsing its arguments"


def check_one(argv):
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        if program(argv) == "celery":
            problem = check_celery(argv)
        elif program(argv) == "python":
            problem = check_python(argv)
        else:
            problem = None
    return problem and f"{problem} {out.getvalue().strip()[-300:]}"


def main():
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    results = [check_one(argv) for argv in json.loads(sys.stdin.read())]
    sys.__stdout__.write(json.dumps(results))


# --- The tests --------------------------------------------------------------------------------
def parse_all(argvs):
    done = subprocess.run([sys.executable, __file__], input=json.dumps(argvs), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_documented_command_is_accepted_by_its_tool():
    commands = documented_commands()
    assert len([c for c in commands if program(c[2]) == "celery"]) > 40  # the extraction works
    problems = []
    for page, text, argv in commands:
        name = program(argv)
        if name not in PROGRAMS:
            problems.append(f"{page}: `{text}`: unknown program {argv[0]!r}")
        elif name == "make" and not re.search(rf"^{re.escape(argv[1])}:",
                                              (ROOT / "Makefile").read_text(), re.M):
            problems.append(f"{page}: `{text}`: the Makefile has no target {argv[1]!r}")
        elif name == "pip" and "-r" in argv and not (ROOT / argv[argv.index("-r") + 1]).exists():
            problems.append(f"{page}: `{text}`: no such requirements file")
    checked = [(page, text, argv) for page, text, argv in commands
               if program(argv) in ("celery", "python")]
    for (page, text, _), problem in zip(checked, parse_all([argv for _, _, argv in checked])):
        if problem:
            problems.append(f"{page}: `{text}`: {problem}")
    assert not problems, "\n".join(problems)


def test_a_wrong_celery_option_or_command_is_rejected():
    """The check itself can fail: the option that once shipped in the README, and a typo."""
    wrong = [["celery", "-A", "tasks", "control", "revoke", "ID", "--terminate"],
             ["celery", "-A", "tasks", "worker", "--prefetch-multiplier", "64", "--bogus"],
             ["celery", "-A", "tasks", "inspect", "active_queue"],
             ["python", "run_demo.py", "--flowr"],
             ["celery", "-A", "tasks", "flower", "--basic-auth=a:b", "--prot=5555"],
             ["celery", "-A", "tasks", "multi", "start", "a", "b", "-Q:a", "celery", "--pidfle=x"],
             ["python", "client_fixed.py", "--only"]]  # --only needs a value
    right = [["celery", "-A", "tasks", "control", "terminate", "SIGTERM", "ID"],
             ["python", "run_demo.py", "--flower"]]
    results = parse_all(wrong + right)
    assert "No such option '--terminate'" in results[0]
    assert "No such option '--bogus'" in results[1]
    assert "no command 'active_queue'" in results[2]
    assert "no option --prot" in results[4]
    assert "No such option '--pidfle'" in results[5]
    assert all(results[:7]) and results[7:] == [None, None], results


def test_commands_are_found_in_blocks_inline_spans_and_config_files():
    assert split_commands("FOO=1 sudo celery -A tasks status && kill -TERM $(cat x.pid)  # ok") \
        == [["celery", "-A", "tasks", "status"], ["kill", "-TERM", "SUBST"]]
    texts = {text for _, text, _ in documented_commands()}
    assert "celery -A tasks control terminate SIGTERM ID" in texts          # an inline span
    assert any("celery -A tasks worker -Q %i" in text for text in texts)    # systemd's ExecStart
    assert "celery -A tasks inspect active_queues" in texts                 # a journey block


if __name__ == "__main__":
    main()
