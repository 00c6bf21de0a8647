"""Each bad input gets a clear, actionable error, and nothing already stored is lost."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import attnstore
from attnstore import index
from attnstore.errors import (
    CorpusError,
    IncompatibleStoreError,
    ModelError,
    StoreExistsError,
    StoreWriteError,
)
from attnstore.verify import verify_store
from tests.helpers import store_content


def run(
    out: Path, model: Path, corpus: Path | str, **kw: object
) -> attnstore.pipeline.ExtractReport:  # type: ignore[name-defined]
    return attnstore.extract(str(out), model=str(model), corpus=str(corpus), progress=False, **kw)


def test_empty_corpus_writes_nothing(tmp_path: Path, llama_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="holds no documents"):
        run(tmp_path / "s.attn", llama_dir, empty)
    assert not (tmp_path / "s.attn").exists()


def test_whitespace_documents_are_counted(tmp_path: Path, llama_dir: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(" \n\t\nreal text\n\n")
    report = run(tmp_path / "s.attn", llama_dir, corpus)
    assert report.docs_written == 1
    assert report.docs_skipped == {"empty": 3}


def test_bad_utf8_midway_keeps_committed_batches(tmp_path: Path, llama_dir: Path) -> None:
    corpus = tmp_path / "c.txt"
    good = "".join(f"document number {i} is fine\n" for i in range(40))
    corpus.write_bytes(good.encode() + b"caf\xe9\n")
    out = tmp_path / "s.attn"
    with pytest.raises(CorpusError, match=r"c\.txt:41 is not valid UTF-8"):
        run(out, llama_dir, corpus, batch_size=2)
    assert verify_store(out).ok
    corpus.write_bytes(good.encode() + "café\n".encode())
    run(out, llama_dir, corpus, batch_size=2)  # fixed file: resume finishes the job
    assert attnstore.open(str(out)).sql("SELECT count(*) FROM docs").column(0)[0].as_py() == 41


#: Peak resident memory an extract of one huge line may reach (the tiny test model's process
#: alone is about half of it). Before issue 20 a 10 MB line took 3.8 GB; 50 MB was killed.
HUGE_LINE_PEAK_BYTES = 1536 << 20


@pytest.mark.parametrize("megabytes", [10, 50])
def test_huge_line_is_truncated_in_bounded_memory(
    tmp_path: Path, llama_dir: Path, megabytes: int
) -> None:
    """Tokenization reads only what --max-length can use; the child's peak memory is bounded."""
    import subprocess
    import sys

    from tests.helpers import extract_command

    corpus = tmp_path / "c.txt"
    with corpus.open("w") as fh:
        for _ in range(megabytes):
            fh.write("word " * 209_715)
        fh.write("\nsmall\n")
    out = tmp_path / "s.attn"
    # The child's peak is read by a small launcher (RUSAGE_CHILDREN): a child forked straight from
    # this test process would report this process's own peak, which ru_maxrss keeps across exec.
    launcher = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", launcher,
         *extract_command(out, llama_dir, corpus, "--max-length", "32")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.split()[-1])
    assert peak_kib * 1024 < HUGE_LINE_PEAK_BYTES, f"peak RSS {peak_kib} KiB"
    row = (
        attnstore.open(str(out))
        .sql("SELECT n_tokens, n_tokens_input, n_chars, truncated FROM docs WHERE doc_id = 0")
        .to_pylist()[0]
    )
    assert row["n_tokens"] == 32
    assert row["n_tokens_input"] > 32
    assert row["n_chars"] >= megabytes * 1_000_000
    assert row["truncated"]


def test_store_path_is_a_file_or_foreign_folder(
    tmp_path: Path, llama_dir: Path, corpus_txt: Path
) -> None:
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(StoreExistsError, match="it is a file"):
        run(f, llama_dir, corpus_txt)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreExistsError, match="not an attnstore store"):
        run(foreign, llama_dir, corpus_txt)
    assert f.read_text() == "mine"
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]


def test_append_with_other_settings_is_refused(
    tmp_path: Path, llama_dir: Path, gpt2_dir: Path, corpus_txt: Path
) -> None:
    out = tmp_path / "s.attn"
    run(out, llama_dir, corpus_txt, limit=2)
    before = store_content(out)
    with pytest.raises(
        IncompatibleStoreError, match=r"codec: store has .*fixed16.*requested .*fixed8"
    ):
        run(out, llama_dir, corpus_txt, codec="compact")
    with pytest.raises(IncompatibleStoreError, match="max_length"):
        run(out, llama_dir, corpus_txt, max_length=16)
    with pytest.raises(IncompatibleStoreError, match="model"):
        run(out, gpt2_dir, corpus_txt, max_length=64)
    with pytest.raises(IncompatibleStoreError, match="another layout"):
        run(out, llama_dir, corpus_txt, layers=[0], allow_different=True)
    after = store_content(out)
    assert after["docs"] == before["docs"]
    # asked for explicitly, a different max_length may join (the layout is unchanged)
    run(out, llama_dir, corpus_txt, max_length=16, allow_different=True)
    assert verify_store(out).ok
    assert store_content(out)["docs"][:2] == before["docs"]


def test_disk_full_commits_nothing_then_resumes(
    tmp_path: Path, llama_dir: Path, corpus_txt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.attn"
    real = index.write_part
    calls = {"n": 0}

    def full(table: object, path: Path) -> None:
        calls["n"] += 1
        # the first batch commits (docs, tokens, heads, sparsity), the second runs out of space
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(table, path)  # type: ignore[arg-type]

    monkeypatch.setattr(index, "write_part", full)
    monkeypatch.setenv("ATTNSTORE_COMMIT_EVERY", "1")  # each batch is one flush of 4 parts
    with pytest.raises(StoreWriteError, match=r"No space left on device.*rerun the same command"):
        run(out, llama_dir, corpus_txt, batch_size=2)
    assert verify_store(out).ok
    store = attnstore.open(str(out))
    assert len(store.files("docs")) == 1  # the first batch only
    assert store.sql("SELECT count(*) FROM heads").column(0)[0].as_py() == 2 * 3 * 4
    monkeypatch.setattr(index, "write_part", real)
    run(out, llama_dir, corpus_txt, batch_size=2)
    assert attnstore.open(str(out)).sql("SELECT count(*) FROM docs").column(0)[0].as_py() == 7


def test_model_without_attention_weights(
    tmp_path: Path, llama_dir: Path, corpus_txt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel

    def refuse(self: object, impl: str, **kw: object) -> None:
        raise ValueError(f"{impl} is not supported")

    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", refuse)
    with pytest.raises(ModelError, match="can return no attention weights"):
        run(tmp_path / "s.attn", llama_dir, corpus_txt)


def test_fallback_to_eager_gives_the_same_store(
    tmp_path: Path, llama_dir: Path, corpus_txt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel

    from attnstore.capture import AttentionWarning

    real = PreTrainedModel.set_attn_implementation

    def no_custom(self: PreTrainedModel, impl: str, **kw: object) -> None:
        if impl == "attnstore":
            raise ValueError("custom attention functions are not supported")
        real(self, impl, **kw)

    run(tmp_path / "a.attn", llama_dir, corpus_txt)
    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation", no_custom)
    with pytest.warns(AttentionWarning, match="falling back to eager"):
        run(tmp_path / "b.attn", llama_dir, corpus_txt)
    a, b = store_content(tmp_path / "a.attn"), store_content(tmp_path / "b.attn")
    for k in a["matrices"]:
        assert abs(a["matrices"][k] - b["matrices"][k]).max() <= 2e-5
    assert (
        json.loads((tmp_path / "b.attn" / "attnstore.json").read_text())["settings"]["attention"]
        == "eager"
    )


@pytest.mark.parametrize(
    "text",
    [
        "word " * 50_000,
        "The cat sat on the mat. " * 5_000,
        "x" * 200_000,  # one long word across every cut
        "naïve café 東京 " * 20_000,
    ],
    ids=["words", "sentences", "one_word", "unicode"],
)
def test_prefix_tokenization_keeps_the_first_tokens(tokenizer_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    from attnstore.capture import tokenize_prefix

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    whole = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    for max_length in (8, 128, 512):
        ids, offsets = tokenize_prefix(tok, text, max_length)
        assert ids[:max_length] == whole.input_ids[:max_length]
        assert offsets is not None
        assert offsets[:max_length] == [tuple(o) for o in whole.offset_mapping[:max_length]]
        assert max_length < len(ids) < len(whole.input_ids)
