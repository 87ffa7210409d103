"""The README's commands run as written: every command it shows names something that exists.

Each indented code block of README.md is read as shell: continuation lines joined, comments and
`[optional]` brackets dropped, chains split at `&&`, `|` and `;`. Each simple command must start
with a program a fresh clone has after the setup command (a console script of pyproject.toml, or a
program of the environment: python, deepspeed, torchrun, pytest, pip, bash), every repository
file it names must exist, and every `--flag` must be one its program accepts (its `--help`; for
train.py a config key, checked by loading the config with the command's own overrides). The
README speaks to users: no internal references (issue numbers, this project's shared notes).
"""
from __future__ import annotations

import re
import shlex
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
PROGRAMS = {"python", "deepspeed", "torchrun", "pytest", "pip", "bash", "source"}
# Files a command names whose first folder is one of the repository's (the rest are the user's: data, runs).
REPO_DIRS = {"configs", "scripts", "bench", "fastmoco", "tests", "kernels", "pipelines", "docs", ".venv"}


def code_lines() -> list[tuple[int, str]]:
    """(line number, command) of every indented code block, continuations joined; a block that
    shows a file tree (its first word a folder, `fastmoco/`) or a run's output ("step 0: ...") holds
    no commands."""
    out, pending, start, tree, in_block = [], "", 0, False, False
    for no, line in enumerate(README.read_text().splitlines(), 1):
        if not line.startswith("    ") or line.lstrip().startswith(("- ", "* ")):
            pending, in_block = "", False if line.strip() else in_block
            continue
        text = line.strip()
        if not in_block:   # a file tree or a run's output, not commands
            in_block, tree = True, text.split()[0].endswith("/") or text.startswith("step ")
        if tree:
            continue
        if not pending:
            start = no
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text = (pending + text).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append((start, text))
    return out


def simple_commands(line: str) -> list[list[str]]:
    line = re.sub(r"\s#.*$", "", line)                  # a trailing comment
    line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)        # [--optional flag] -> the flag
    cmds = []
    for part in re.split(r"&&|\|\||\||;", line):
        words = shlex.split(part)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):   # VAR=value before the program
            words.pop(0)
        if words:
            cmds.append(words)
    return cmds


COMMANDS = [(no, words) for no, line in code_lines() for words in simple_commands(line)
            if not words[0].startswith(("/", "{", "<"))]


@cache
def help_text(*program: str) -> str:
    """The program's --help, asked in this process (each program's parser; no interpreter started)."""
    import importlib
    import io
    import runpy
    from contextlib import redirect_stdout
    from unittest import mock

    exe = Path(program[0]).name
    if exe == "deepspeed":
        from deepspeed.launcher.runner import parse_args
        call = lambda: parse_args(["--help"])   # noqa: E731
    elif exe == "torchrun":
        from torch.distributed.run import get_args_parser
        return get_args_parser().format_help()
    elif exe in SCRIPTS:
        module, func = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][exe].split(":")
        call = lambda: getattr(importlib.import_module(module), func)(["--help"])   # noqa: E731
    else:   # python FILE
        script = program[-1]
        call = lambda: runpy.run_path(script, run_name="__main__")   # noqa: E731
    out = io.StringIO()
    with redirect_stdout(out), mock.patch.object(sys, "argv", [program[-1], "--help"]), \
            pytest.raises(SystemExit) as e:
        call()
    assert e.value.code in (0, None), f"{' '.join(program)} --help exited {e.value.code}"
    return out.getvalue()


def program_of(words: list[str]) -> tuple[list[str], list[str]]:
    """(the program to ask for --help, the words that are its arguments)."""
    exe = words[0].removeprefix(".venv/bin/")
    assert exe in SCRIPTS | PROGRAMS, f"{exe!r} is neither a console script of pyproject.toml nor one of {PROGRAMS}"
    if exe in SCRIPTS:
        assert (BIN / exe).exists(), f"{exe} is not installed in {BIN}: setup does not make it"
        return [str(BIN / exe)], words[1:]
    if exe in ("python", "pytest", "pip", "bash", "source"):
        return [exe], words[1:]
    # launchers: their own flags (checked against their --help), then the script and its arguments
    launcher = [str(BIN / exe)]
    assert Path(launcher[0]).exists(), f"{exe} is not installed in {BIN}"
    args = words[1:]
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-m":
        flag = args[i].split("=")[0]
        assert flag in help_text(*launcher), f"{exe} has no flag {flag}"
        takes_value = flag not in ("--quiet", "--standalone")
        i += 1 + (takes_value and "=" not in args[i])
    return launcher, args[i:]


def check_repo_paths(words: list[str]) -> None:
    for w in words:
        path = w.split("=", 1)[-1]
        if "/" in path and path.split("/")[0] in REPO_DIRS and not path.startswith(".venv/bin/"):
            assert (ROOT / path).exists(), f"{path} does not exist in the repository"


def check_flags(program: list[str], args: list[str]) -> None:
    text = help_text(*program)
    for a in args:
        if a.startswith("--"):
            flag = a.split("=")[0]
            assert re.search(rf"{re.escape(flag)}(?![\w-])", text), f"{' '.join(program)} accepts no {flag}"


def check_train(args: list[str]) -> None:
    """train.py: its own flags, then the config with the command's overrides (unknown keys are an error)."""
    from fastmoco.config import load_config
    from fastmoco.train import parse_args

    ns, overrides = parse_args(args)
    load_config(str(ROOT / ns.config), overrides)


@pytest.mark.parametrize("no,words", COMMANDS, ids=[f"line{no}:{' '.join(w)[:60]}" for no, w in COMMANDS])
def test_readme_command_names_what_exists(no, words):
    check_repo_paths(words)
    program, args = program_of(words)
    exe = Path(program[0]).name
    if exe == "python" or exe in ("deepspeed", "torchrun"):
        if args[:1] == ["-m"]:
            module = args[1]
            import importlib.util
            assert importlib.util.find_spec(module) is not None, f"no module {module}"
            if module == "fastmoco.evaluation.cli":
                sub = args[2]
                assert sub in ("knn", "linear", "export"), f"python -m fastmoco.evaluation.cli has no {sub!r}"
                return check_flags([str(BIN / f"fastmoco-{sub}")], args[3:])
            return
        script = ROOT / args[0]
        assert script.is_file(), f"{args[0]} does not exist"
        if args[0] == "fastmoco/train.py":
            return check_train(args[1:])
        return check_flags([sys.executable, str(script)], args[1:])
    if exe == "bash":
        assert (ROOT / args[0]).is_file(), f"{args[0]} does not exist"
        return
    if exe in ("pytest", "pip", "source"):
        if exe == "source":
            assert (ROOT / args[0]).exists() or args[0].startswith(".venv/"), f"{args[0]} does not exist"
        return
    check_flags(program, args)


def test_readme_shows_the_setup_and_both_commands_first():
    text = README.read_text()
    assert "bash scripts/setup.sh && .venv/bin/fastmoco-make-demo-data demo_data && " in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in text
    assert len(COMMANDS) > 30, "the README's code blocks were not found"


def test_readme_speaks_to_users_only():
    text = README.read_text()
    for pattern, what in ((r"\bissue \d+", "an issue number"), (r"\.\./shared", "the project's shared notes"),
                          (r"\blent\b", "this project's lent machine"), (r"\$OUT\b", "the lent machine's $OUT")):
        found = re.search(pattern, text, re.I)
        assert found is None, f"README.md mentions {what}: {found.group(0)!r}"
