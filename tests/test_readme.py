"""The README's examples run, in order, on a small store: the README cannot drift from the product.

Every fenced ``python`` block is executed, and every command of every fenced ``bash``/``sh``/``console``
block that starts with ``attnstore`` is run through the CLI, in README order, in one temporary
working folder (so ``demo.attn`` made by command 1 is the store the later examples read). ``text``
blocks (synopses, sample output) are not run.

Substitutions, so that the examples run in seconds without the 98 MB default model:

- The embedded default model is replaced by a random-init Llama with SmolLM2-135M-Instruct's shape
  (30 layers, 9 query heads sharing 3 key/value heads) but hidden size 36 and a 512-token
  byte-level BPE vocabulary in which a few common first names are single tokens (as the built-in
  name probes need) (:func:`attnstore.testing.save_tiny_llama`), and documents are cut at 64 tokens. In shell blocks,
  ``attnstore extract`` without ``--model`` gets ``--model TINY``, and ``--max-length 64`` unless it
  sets one; in Python blocks ``attnstore.extract`` gets the same defaults (explicit arguments win).
  Layer and head numbers of the real model (layer 18 head 6, …) therefore exist in the test store;
  the *values* are those of a random model, so the test checks that examples run, not their numbers
  (the README's figures of the real model are measured, with their commands, where they appear).
- ``bash scripts/install.sh`` is dropped (the environment running the tests is installed).
- ``num_workers=N`` in Python blocks becomes ``num_workers=0`` (no worker processes in a test).

Opting out: a block that genuinely cannot run here (it needs the real model, a GPU, a browser, a
server that keeps running, or runs the test suite itself) is preceded, on the line right before its
opening fence, by a visible marker with the reason::

    <!-- readme-test: skip (starts a server that runs until stopped) -->

Any other shell command in a runnable block fails this test with a message saying so.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import attnstore
from attnstore.cli import cli
from tests.helpers import ROOT

README = ROOT / "README.md"
MAX_LENGTH = 64
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b(?P<why>.*?)-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, when marked


def readme_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text, with their opt-out marker if any."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang, body = i, m.group("lang").lower(), []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        marker = SKIP.search(lines[start - 1]) if start else None
        why = marker.group("why").strip(" ()—-:") or "no reason given" if marker else None
        blocks.append(Block(start + 1, lang, "\n".join(body) + "\n", why))
        i += 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """Commands of a shell block: comments dropped, continuation lines joined, split at ``&&``."""
    joined = re.sub(r"\\\n", " ", code)
    out: list[str] = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        command: list[str] = []
        for w in [*words, "&&"]:
            if w == "&&":
                if command:
                    out.append(shlex.join(command))
                command = []
            else:
                command.append(w)
    return out


def with_tiny_model(args: list[str], tiny: Path) -> list[str]:
    if args[:1] != ["extract"]:
        return args
    if not any(a in ("--model", "-m") or a.startswith("--model=") for a in args):
        args = [*args, "--model", str(tiny)]
    if not any(a == "--max-length" or a.startswith("--max-length=") for a in args):
        args = [*args, "--max-length", str(MAX_LENGTH)]
    return args


#: Common first names made single tokens of the test tokenizer, as built-in name probes need.
NAMES = ("Mary", "John", "Sarah", "David", "James", "Paul", "Lisa", "Mark", "Amy", "Eric")


def save_tokenizer(folder: Path, vocab_size: int) -> Path:
    """Byte-level BPE like :func:`attnstore.testing.save_tiny_tokenizer`, plus :data:`NAMES`."""
    from attnstore.testing import tiny_tokenizer

    tiny_tokenizer(vocab_size, extra_texts=[" ".join(NAMES)] * 200).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init Llama with the default model's layer/head shape (30 × 9, GQA 3), tiny width."""
    from attnstore.testing import save_tiny_llama

    vocab = 512
    tokenizer = save_tokenizer(tmp_path_factory.mktemp("readme-tokenizer"), vocab)
    return save_tiny_llama(
        tmp_path_factory.mktemp("smollm2-shaped"),
        tokenizer,
        vocab_size=vocab,
        hidden_size=36,
        intermediate_size=48,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=256,
    )


def test_readme_has_examples_of_both_kinds() -> None:
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert any(b.lang == "python" and b.skip is None for b in blocks)
    assert any(b.lang in SHELL and b.skip is None for b in blocks)


def test_block_parser_reads_markers_and_commands() -> None:
    text = (
        "<!-- readme-test: skip (needs a browser) -->\n```bash\nattnstore serve x\n```\n"
        "```bash\n# a comment\nbash scripts/install.sh && attnstore info a.attn  # done\n"
        'attnstore query a.attn "SELECT 1" \\\n  -f csv\n```\n'
    )
    first, second = readme_blocks(text)
    assert (first.skip, second.skip) == ("needs a browser", None)
    assert shell_commands(second.code) == [
        "bash scripts/install.sh",
        "attnstore info a.attn",
        "attnstore query a.attn 'SELECT 1' -f csv",
    ]


@pytest.mark.slow  # every README example in order: minutes on two busy cores
def test_readme_examples_run(
    smollm2_shaped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    real_extract = attnstore.extract

    def extract(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("model", str(smollm2_shaped))
        kwargs.setdefault("max_length", MAX_LENGTH)
        kwargs.setdefault("progress", False)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(attnstore, "extract", functools.wraps(real_extract)(extract))
    runner = CliRunner()
    ran = 0
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        where = f"README.md line {block.line}"
        if block.skip is not None:
            continue
        if block.lang == "python":
            code = re.sub(r"num_workers=\d+", "num_workers=0", block.code)
            try:
                exec(compile(code, where, "exec"), {"__name__": "readme"})  # noqa: S102
            except Exception as err:  # noqa: BLE001 - any failure of an example fails the test
                pytest.fail(f"{where}: the Python example fails: {type(err).__name__}: {err}")
            ran += 1
        elif block.lang in SHELL:
            for command in shell_commands(block.code):
                if command == "bash scripts/install.sh":
                    continue
                words = shlex.split(command)
                if words[0] != "attnstore":
                    pytest.fail(
                        f"{where}: {command!r} is not an attnstore command; run it here or mark "
                        "the block '<!-- readme-test: skip (reason) -->'."
                    )
                args = with_tiny_model(words[1:], smollm2_shaped)
                result = runner.invoke(cli, args, env={"COLUMNS": "200"})
                assert result.exception is None or isinstance(result.exception, SystemExit), (
                    f"{where}: {command!r} raised {result.exception!r}"
                )
                assert result.exit_code == 0, f"{where}: {command!r} failed:\n{result.output}"
                ran += 1
    assert ran >= 3
    assert os.path.isdir(tmp_path / "demo.attn")
