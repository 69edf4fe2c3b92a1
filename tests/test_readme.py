"""README.md, docs/*.md and BENCHMARKS.md stay true: every `moekit` command they show parses (the subcommand exists
and each flag is one of its flags), the README's Python blocks marked runnable run, every relative link and anchor
resolves, the README stays a guide (at most 310 lines), and the text speaks of the tool only.

Commands are taken from fenced code blocks (bash/sh/console/unlabelled: every line; text: lines starting with `$ `;
continuation backslashes joined) and from inline code spans, wherever `moekit` starts a command: `moekit ...`,
`.venv/bin/moekit ...`, `python -m moekit ...`, `torchrun ... -m moekit train ...`, `accelerate launch ... -m
moekit train ...`. Placeholders (MODEL, DIR, `...`) are positionals and need no checking; `--flag=value` is split.
A Python block runs when the line before its fence is `<!-- runnable -->`."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moekit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCHMARKS = ROOT / "BENCHMARKS.md"
GUIDES = [README, *DOCS, BENCHMARKS]  # commands, links, the language rule
MAX_README_LINES = 310
RUNNABLE = "<!-- runnable -->"
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}  # fenced blocks whose commands are checked
FORBIDDEN = [  # how the project was made, not what the tool does (`Target:`, not `TARGET`, moekit params' positional)
    *(re.compile(p, re.IGNORECASE) for p in (
        r"\btargets? (was |were |is )?met\b", r"\bnot met\b", r"\*\*met\b", r"\bmet \(", r"\blent\b",
        r"\blending\b", r"\bsessions?\b", r"\bacceptance\b", r"\bissue #", r"\bno gpu was\b")),
    re.compile(r"\b[Tt]argets?:"),
]


# ---- documents ----------------------------------------------------------------------------------------------

@dataclass
class Block:
    """A fenced code block: its language, the line number of its first content line, its lines."""
    lang: str
    start: int
    lines: list[str]
    runnable: bool


def parse(text: str) -> tuple[list[Block], list[str]]:
    """(fenced blocks, the document's lines with the fenced blocks blanked out, for inline spans and links)."""
    blocks, prose, lines = [], [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j])
            j += 1
        blocks.append(Block(lang, i + 2, body, before == RUNNABLE))
        prose += [""] * (j + 1 - i)
        i = j + 1
    return blocks, prose


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, command) of a shell-like block: continuation lines joined; in `text` blocks only `$ ` lines."""
    out, pending, first = [], "", 0
    for n, line in enumerate(block.lines, block.start):
        if not pending:
            first = n
            if block.lang == "text":
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    if pending:
        out.append((first, pending))
    return out


def inline_spans(prose: list[str]) -> list[tuple[int, str]]:
    """(line number, text) of every inline code span outside fenced blocks (a span may wrap onto the next line)."""
    text = "\n".join(prose)
    spans = []
    for m in re.finditer(r"(?<!`)`([^`]+?)`(?!`)", text):
        if "\n\n" not in m.group(1):
            spans.append((text.count("\n", 0, m.start()) + 1, m.group(1).replace("\n", " ")))
    return spans


def commands_in(text: str) -> list[tuple[int, str]]:
    """(line number, command line) of every candidate command line of a document."""
    blocks, prose = parse(text)
    found = [c for b in blocks if b.lang in SHELL_LANGS for c in shell_lines(b)]
    return found + [(n, s.replace("\\|", "|")) for n, s in inline_spans(prose)]


# ---- the flag checker ----------------------------------------------------------------------------------------

def words(line: str) -> list[str]:
    """Shell words of a line, comments dropped; `;`, `&&`, `|` as words of their own. Falls back to a plain split
    when the line is not valid shell (an unmatched quote in a placeholder)."""
    try:
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        return list(lex)
    except ValueError:
        return line.split("#")[0].split()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def starts(ws: list[str]) -> list[int]:
    """Indexes of the words that are `moekit` starting a command: the first word of a command (after `;`, `&&`,
    `|`), or the module of `-m`."""
    out = []
    for i, w in enumerate(ws):
        if w != "moekit" and not w.endswith("/moekit"):  # moekit, .venv/bin/moekit; not moekit/ (the folder)
            continue
        if i == 0 or ws[i - 1] in {";", "&&", "||", "|", "-m", "$", "time", "exec"}:
            out.append(i)
    return out


def check_words(ws: list[str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """What is wrong with the moekit command `ws` (ws[0] is the program): an unknown subcommand, or a flag its
    (sub)command does not have. Positionals (placeholders included) are not checked."""
    parser = parser or build_parser()
    problems, path, i = [], ["moekit"], 1
    while True:  # descend through subcommands, checking the flags given before each
        subs = subparsers(parser)
        while i < len(ws) and ws[i].startswith("-") and subs:
            problems += check_flag(ws[i], parser, path)
            i += 1
        if not subs or i >= len(ws) or ws[i] in {";", "&&", "||", "|"}:
            break
        name = ws[i]
        if re.fullmatch(r"[A-Z][A-Z_]*", name):  # `moekit COMMAND --help`: a placeholder for any subcommand
            return problems
        if name not in subs:
            return problems + [f"unknown subcommand {' '.join(path)} {name!r} (one of {', '.join(subs)})"]
        parser, path, i = subs[name], [*path, name], i + 1
    for w in ws[i:]:
        if w in {";", "&&", "||", "|"}:
            break
        if w.startswith("-") and w not in {"-", "--"} and not re.fullmatch(r"-?[\d.]+(e-?\d+)?", w):
            problems += check_flag(w, parser, path)
    return problems


def check_flag(word: str, parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    flag = word.split("=", 1)[0]
    if flag in parser._option_string_actions:
        return []
    return [f"{' '.join(path)}: no flag {flag}"]


def check_line(line: str, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Problems of every moekit command in one command line."""
    ws = [w.strip("[]") for w in words(line) if w.strip("[]") not in {"...", "…", ""}]  # [--flag N]: optional
    return [p for i in starts(ws) for p in check_words(ws[i:], parser)]


def commands_of(path: Path) -> list[tuple[int, str]]:
    """(line number, command line) of the lines of `path` that hold a moekit command."""
    return [(n, c) for n, c in commands_in(path.read_text()) if starts(words(c))]


# ---- links ------------------------------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*?|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in parse(path.read_text())[1]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(f"{s}-{seen[s]}" if s in seen else s)
            seen[s] = seen.get(s, 0) + 1
    return out


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of `path` whose file (or heading, for #anchor) does not exist; paths shown relative to root."""
    problems = []
    for n, line in enumerate(parse(path.read_text())[1], 1):
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(root)}:{n}: {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems


def runnable_blocks(path: Path) -> list[Block]:
    return [b for b in parse(path.read_text())[0] if b.runnable]


# ---- the tests ----------------------------------------------------------------------------------------------------

def test_every_command_parses():
    parser = build_parser()
    problems, seen = [], set()
    for path in GUIDES:
        for n, line in commands_of(path):
            problems += [f"{path.relative_to(ROOT)}:{n}: {p}\n    {line.strip()}" for p in check_line(line, parser)]
            ws = words(line)
            for i in starts(ws):
                seen.add(" ".join(w for w in ws[i + 1:i + 3] if not w.startswith("-")))
    assert not problems, f"{len(problems)} command(s) that moekit would not accept:\n" + "\n".join(problems)
    leaves = {f"{c} {s}" if s else c for c, p in subparsers(parser).items() for s in (subparsers(p) or [""])}
    missing = {c for c in leaves if not any(s == c or s.startswith(c + " ") for s in seen)}
    assert not missing, f"subcommands the documents never show: {sorted(missing)}"


def test_readme_is_a_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"
    top = "\n".join(lines[:30])  # the two commands, at the top
    assert "bash scripts/demo.sh" in top and "bash scripts/test.sh" in top
    assert len(commands_of(README)) >= 20  # the extraction saw the commands


def test_relative_links_resolve():
    problems = [p for path in GUIDES for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_text_speaks_of_the_tool_only():
    problems = []
    for path in GUIDES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in FORBIDDEN:
                if m := pattern.search(line):
                    problems.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r}: {line.strip()}")
    assert not problems, "\n".join(problems)


def test_readme_has_runnable_examples():
    assert len(runnable_blocks(README)) >= 3
    assert all(b.lang == "python" for b in runnable_blocks(README))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(runnable_blocks(README))))
def test_runnable_block_runs(index, tmp_path):
    block = runnable_blocks(README)[index]
    code = "\n".join(block.lines)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"README.md:{block.start}: the block failed:\n{out.stderr[-3000:]}"


# ---- the checkers catch what they should ---------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("moekit train tiny --no-such-flag", ["moekit train: no flag --no-such-flag"]),
    ("moekit frobnicate --out x", ["unknown subcommand moekit 'frobnicate'"]),
    ("moekit bench layr", ["unknown subcommand moekit bench 'layr'"]),
    ("moekit upcycle SRC DST --num-experts 8 --lr 1e-3", ["moekit upcycle: no flag --lr"]),
    ("moekit params 7B --bogus=3", ["moekit params: no flag --bogus"]),
    ("moekit --nope train tiny", ["moekit: no flag --nope"]),
    ("moekit train MODEL --out OUT --lr=3e-4 --steps 10 ...", []),
    ("torchrun --standalone --nproc_per_node 2 -m moekit train MODEL --out OUT --balance global", []),
    ("accelerate launch --multi_gpu --num_processes 2 -m moekit train MODEL --out OUT --wrong", [
        "moekit train: no flag --wrong"]),
    (".venv/bin/python -m moekit --version", []),
    ("moekit tokenizer train DATA --out DIR --vocab-size 4096", []),
    ("moekit verify DENSE MOE [--tokens 32] [--atol 1e-4] [--nope]", ["moekit verify: no flag --nope"]),
    ("moekit train tiny --out a; moekit plot a --out p --dpi 3", ["moekit plot: no flag --dpi"]),
    ("pip install moekit --upgrade", []),  # not a moekit command
])
def test_checker(line, expected):
    problems = check_line(line)
    assert len(problems) == len(expected), problems
    for p, e in zip(problems, expected):
        assert p.startswith(e), (p, e)


def test_extraction_joins_continuations_and_reads_spans():
    doc = ("Run `moekit train tiny --out x --no-such-flag` now.\n\n```bash\nmoekit upcycle a b \\\n"
           "    --num-experts 4 --nope   # a comment --also-not-checked\n```\n\n```text\n$ moekit params 7B --bad\n"
           "moekit params --not-a-command-line\n```\n\n```python\nrun('moekit train --bogus')\n```\n")
    found = [(n, p) for n, c in commands_in(doc) for p in check_line(c)]
    assert found == [(4, "moekit upcycle: no flag --nope"), (9, "moekit params: no flag --bad"),
                     (1, "moekit train: no flag --no-such-flag")]


def test_link_checker_catches_missing_files_and_headings(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("# Title\n\n[x](missing.md) [y](#title) [z](#nowhere) [w](https://example.org/x.md)\n")
    assert link_problems(bad, tmp_path) == ["bad.md:3: missing.md: no such file",
                                            "bad.md:3: #nowhere: no heading #nowhere in bad.md"]


def test_language_checker_catches_the_making_and_spares_the_tool():
    def caught(text):
        return [m.group(0) for p in FORBIDDEN if (m := p.search(text))]

    assert caught("Target: 1.1x, **met (1.07x)**") == ["**met", "met (", "Target:"]
    assert caught("No GPU was lent to this session") == ["lent", "session", "No GPU was"]
    assert caught("TARGET: a preset, a config.json, a checkpoint directory; the metric is 1.07x") == []
