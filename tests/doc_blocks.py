"""The code blocks and quoted messages of README.md and docs/*.md, with the doc-test markers that say what each is.

A marker is an HTML comment (invisible on GitHub) on the line before a block, or just before an inline
quote::

    <!-- doc-test: run -->                         a command block, run (the default for one)
    <!-- doc-test: fails "message" -->             a command block that must fail with this message
    <!-- doc-test: parse-only "reason" -->         a command block that cannot run here: its options are parsed
    <!-- doc-test: file name=x.toml loader=L -->   an example file that command blocks use by name
    <!-- doc-test: skip "reason" -->               neither run nor parsed (a file tree, an output sample)
    <!-- doc-test: message trigger=T [figures] --> before an inline `quote` (or a block of them, one a line):
                                                   the text trigger T must produce

Every block gets a verdict: a command block (bash/sh/console, or lines that start with python, accelerate,
pip or torchrun) runs unless marked, a python block is compiled and its imports resolved, and any other
block needs a marker. An inline quote that starts with ``error:`` needs a message marker.
Spaces around ``...`` in a quote belong to the text it stands for.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("run", "fails", "parse-only", "file", "skip", "message")
FLAGS = ("figures",)
FILE_LOADERS = ("train-config", "dataset", "prompts", "tracker-config")
COMMAND_LANGUAGES = ("bash", "sh", "shell", "console")
COMMAND_STARTS = ("python", "python3", "accelerate", "pip", "torchrun")
_MARKER = re.compile(r"<!--\s*doc-test:(.*?)-->", re.S)


def _rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else str(doc)


def doc_files() -> list[Path]:
    """README.md and every page in docs/: a new page is covered without touching the tests."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class DocError(Exception):
    """A block or quote the doc test cannot judge; the message says which marker to add."""


@dataclass(frozen=True)
class Marker:
    kind: str
    text: str | None = None  # the quoted reason or message
    options: dict[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()


def parse_marker(html: str, where: str) -> Marker | None:
    m = _MARKER.search(html)
    if m is None:
        return None
    words = shlex.split(m.group(1))
    if not words or words[0] not in KINDS:
        raise DocError(f"{where}: doc-test marker {m.group(0)!r}: the first word must be one of {', '.join(KINDS)}")
    text, options, flags = None, {}, []
    for word in words[1:]:
        if word in FLAGS:
            flags.append(word)
        elif re.fullmatch(r"\w+=\S*", word):
            key, value = word.split("=", 1)
            options[key] = value
        elif text is None:
            text = word
        else:
            raise DocError(f"{where}: doc-test marker {m.group(0)!r}: one quoted text at most")
    return Marker(words[0], text, options, tuple(flags))


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the block's first line (the fence, or the first indented line)
    info: str  # the fence's language ("" for an indented block)
    text: str
    marker: Marker | None

    @property
    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.line}"

    def is_command(self) -> bool:
        if self.info in COMMAND_LANGUAGES:
            return True
        lines = [x.strip() for x in self.text.splitlines() if x.strip() and not x.strip().startswith("#")]
        return bool(lines) and lines[0].split()[0] in COMMAND_STARTS

    def verdict(self) -> str:
        """run, fails, parse-only, file, skip or python; a block that is none of them raises DocError."""
        kind = self.marker.kind if self.marker else None
        if kind == "message":
            if "trigger" not in self.marker.options:
                raise DocError(f"{self.where}: a message marker needs trigger=NAME (a trigger of tests/test_docs.py)")
            return "message"  # each line is a quote, checked with its trigger
        if kind == "file":
            name, loader = self.marker.options.get("name"), self.marker.options.get("loader")
            if not name or loader not in FILE_LOADERS:
                raise DocError(f"{self.where}: a file marker needs name=FILE and loader= one of {', '.join(FILE_LOADERS)}")
            return "file"
        if kind in ("skip", "parse-only", "fails") and not self.marker.text:
            raise DocError(f'{self.where}: <!-- doc-test: {kind} "..." --> needs its reason or message in quotes')
        if kind == "skip":
            return "skip"
        if kind in ("parse-only", "fails", "run"):
            if not self.is_command():
                raise DocError(f"{self.where}: a {kind} marker is for a command block; this one is not")
            return kind
        if self.is_command():
            return "run"
        if self.info == "python":
            return "python"
        raise DocError(f"{self.where}: a {self.info or 'plain'} block that is neither a command nor a python snippet: "
                       'say what it is with <!-- doc-test: file name=... loader=... --> or <!-- doc-test: skip "why" -->')


@dataclass(frozen=True)
class Quote:
    doc: Path
    line: int
    text: str
    marker: Marker | None

    @property
    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.line}"

    def pattern(self) -> re.Pattern:
        """The quote as a pattern: ``...`` stands for any text, and with the ``figures`` flag every number for any
        number (the doc shows one run's figures; the message's wording is what must not drift)."""
        parts = []
        for i, piece in enumerate(self.text.split("...")):
            if i:
                parts.append(".*?")
            piece = piece.strip()  # the spaces beside "..." belong to the text it stands for
            for j, chunk in enumerate(re.split(r"(\d+(?:\.\d+)?)", piece)):
                if j % 2 and self.marker and "figures" in self.marker.flags:
                    parts.append(r"\d+(?:\.\d+)?")
                else:
                    parts.append(r"\s+".join(re.escape(w) for w in re.split(r"\s+", chunk)))
        return re.compile("".join(parts))


def blocks_and_quotes(doc: Path) -> tuple[list[Block], list[Quote]]:
    tokens = MarkdownIt("commonmark").enable("table").parse(doc.read_text(encoding="utf-8"))
    blocks, quotes = [], []
    for i, tok in enumerate(tokens):
        if tok.type in ("fence", "code_block"):
            prev = tokens[i - 1] if i else None
            where = f"{_rel(doc)}:{tok.map[0] + 1}"
            marker = parse_marker(prev.content, where) if prev is not None and prev.type == "html_block" else None
            blocks.append(Block(doc, tok.map[0] + 1, tok.info.strip(), tok.content, marker))
            if marker is not None and marker.kind == "message":
                quotes += [Quote(doc, tok.map[0] + 1 + n, line.strip(), marker)
                           for n, line in enumerate(tok.content.splitlines()) if line.strip()]
        elif tok.type == "html_block" and parse_marker(tok.content, f"{_rel(doc)}:{tok.map[0] + 1}"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or nxt.type not in ("fence", "code_block"):
                raise DocError(f"{_rel(doc)}:{tok.map[0] + 1}: a doc-test marker must be right above its block")
        elif tok.type == "inline":
            where = f"{_rel(doc)}:{tok.map[0] + 1}"
            pending = None
            for child in tok.children:
                if child.type == "html_inline" and _MARKER.search(child.content):
                    pending = parse_marker(child.content, where)
                    if pending.kind != "message" or "trigger" not in pending.options:
                        raise DocError(f"{where}: an inline doc-test marker must be <!-- doc-test: message trigger=NAME -->")
                elif child.type == "code_inline":
                    text = " ".join(child.content.split())
                    if pending is not None or (text.startswith("error: ") and text.strip(" .") != "error:"):
                        quotes.append(Quote(doc, tok.map[0] + 1, text, pending))
                    pending = None
                elif child.type == "text" and child.content.strip():
                    pending = None
    return blocks, quotes


@functools.lru_cache(maxsize=1)
def collect() -> tuple[list[Block], list[Quote]]:
    blocks, quotes = [], []
    for doc in doc_files():
        b, q = blocks_and_quotes(doc)
        blocks += b
        quotes += q
    return blocks, quotes  # cached: treat as read-only


# ---------------------------------------------------------------------------------------------- shell commands


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at && and ;."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        current: list[str] = []
        for word in lex:
            if word in ("&&", ";", "||"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
        if current:
            out.append(current)
    return out
