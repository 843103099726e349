"""The README's quick start stays true: every shell block of its "Two commands" section and its
two-process session, as written. Fast: each `covspec` line parses with the real parser, each script
exists and is valid bash, every file a line needs exists or is made by an earlier line of its block,
and every endpoint a device dials is one the block serves. Slow (-m slow): the blocks run."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from covspec.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BUILTINS = {"kill", "source", "sleep"}


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start:end if end > 0 else len(text)]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def quick_start() -> dict[str, str]:
    """name -> block: the Two commands section's blocks and the two-process session."""
    blocks = {f"two-commands-{i}": b for i, b in enumerate(bash_blocks(section("## Two commands")))}
    session = README.read_text().split("A two-process session by hand", 1)[1]
    blocks["two-process-session"] = bash_blocks(session)[0]
    return blocks


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments and a trailing & dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[-1] == "&":
            words = words[:-1]
        if words:
            out.append(words)
    return out


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


BLOCKS = quick_start()


def test_the_quick_start_is_found():
    assert set(BLOCKS) == {"two-commands-0", "two-process-session"}
    assert commands(BLOCKS["two-commands-0"])[0] == ["bash", "scripts/demo.sh"]  # the main command comes first


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_line_is_a_command_that_parses(name, capsys):
    parser = build_parser()
    for words in commands(BLOCKS[name]):
        if words[0] == "covspec":
            parser.parse_args(words[1:])  # SystemExit (and the reason on stderr) if the README is wrong
        elif words[0] == "bash":
            script = ROOT / words[1]
            assert script.is_file(), f"{name}: {words[1]} does not exist"
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        else:
            assert words[0] in BUILTINS, f"{name}: {shlex.join(words)} is not a command this test knows"
    assert "invalid" not in capsys.readouterr().err


def made_by(words: list[str], tmp_path: Path) -> set[Path]:
    """The files a `covspec demo show` line writes (its images, as show() names them)."""
    if words[:3] != ["covspec", "demo", "show"]:
        return set()
    from covspec.demo.task import sample_split

    args = build_parser().parse_args(words[1:])
    return {Path(args.out) / item.save_image(tmp_path).name for item in sample_split("heldout", args.n, 0)}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_file_exists_or_is_made_first_and_every_endpoint_is_served(name, tmp_path):
    made: set[Path] = set()
    served: set[str] = set()
    for words in commands(BLOCKS[name]):
        for flag in ("--model", "--image", "--bundle", "--draft", "--target"):
            path = option(words, flag)
            if path is not None:
                assert (ROOT / path).exists() or Path(path) in made, f"{name}: {flag} {path} neither exists nor is made"
        made |= made_by(words, tmp_path)
        bind, listen = option(words, "--bind"), option(words, "--listen")
        if words[:3] == ["covspec", "edge", "serve"]:
            served.add(bind or "tcp://127.0.0.1:5555")
        if listen is not None:
            upstream = option(words, "--upstream")
            assert f"tcp://{upstream}" in served, f"{name}: the link's upstream {upstream} is not an edge started before it"
            served.add(f"tcp://{listen}")
        edge = option(words, "--edge")
        if edge is not None:
            assert edge in served, f"{name}: {shlex.join(words[:3])} dials {edge}, which nothing in the block serves"


def test_the_session_spells_out_auth_and_threads():
    words = {w[2]: w for w in commands(BLOCKS["two-process-session"]) if w[0] == "covspec"}
    assert option(words["serve"], "--auth") == "none"
    assert option(words["serve"], "--threads") == option(words["run"], "--threads") == "1"


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def code_commands(text: str) -> list[list[str]]:
    """Every `covspec ...` command of a text's code: fenced bash blocks and 4-space indented blocks
    (continuations joined, comments and a trailing & dropped)."""
    blocks = bash_blocks(text)
    indented = re.findall(r"(?:\n\n)((?: {4}\S.*\n?)+)", text)
    blocks += ["\n".join(line[4:] for line in b.splitlines()) + "\n" for b in indented]
    out = []
    for block in blocks:
        for name, value in re.findall(r'(?m)^\s*(\w+)="([^"$]*)"\s*$', block):  # NAME="..." used as $NAME below
            block = re.sub(rf"\${name}\b", value, block)
        out += [words for words in commands(block) if words[0] == "covspec"]
    return out


def test_every_documented_command_parses(capsys):
    """README.md and docs/*.md: each `covspec` command in their code blocks parses with the real parser."""
    parser = build_parser()
    seen = 0
    for path in DOCS:
        for words in code_commands(path.read_text()):
            try:
                parser.parse_args(words[1:])
            except SystemExit as exit_:
                err = capsys.readouterr().err.strip().splitlines()[-1:]
                raise AssertionError(f"{path.relative_to(ROOT)}: `{shlex.join(words)}` does not parse: {err}") from exit_
            seen += 1
    assert seen >= 10, f"only {seen} documented commands found: the block finder broke"
    with pytest.raises(SystemExit):  # the check can fail: a flag that does not exist
        parser.parse_args(code_commands("```bash\ncovspec edge serve --no-such-flag\n```\n")[0][1:])
    capsys.readouterr()


def free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_block(block: str, timeout: float) -> subprocess.CompletedProcess:
    """The block as written, in bash with the venv first on PATH; its background jobs ended after it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = 'trap \'rc=$?; kill $(jobs -p) 2>/dev/null || true; exit $rc\' EXIT\nset -euo pipefail\n' + block
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_two_process_session_runs_as_written():
    if not (free(5555) and free(6000)):
        pytest.skip("ports 5555/6000 are taken on this machine")
    done = run_block(BLOCKS["two-process-session"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "there are" in done.stdout  # the describe answer
    assert re.search(r"\[\d+ tokens, first token .* drafted per round", done.stderr), done.stderr[-3000:]


@pytest.mark.slow
def test_the_main_command_runs_as_written():
    done = run_block(BLOCKS["two-commands-0"].splitlines()[0], timeout=900)  # scripts/test.sh would run us
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same as target" in done.stdout and "speed-up" in done.stdout
    assert (ROOT / "runs" / "demo-bench" / "tokens_per_s.png").stat().st_size > 1000
