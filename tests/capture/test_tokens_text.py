"""Text in other scripts: tokens get a readable form, figures draw CJK (Chinese and mixed text).

The tiny test tokenizer is a byte-level BPE trained on English prose, so every Chinese character
is split into byte pieces: the case where ``tokenizer.decode([id])`` alone gives ``�``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import attnstore
from attnstore.capture import readable_tokens

CHINESE = "注意力机制让模型关注上下文。"
MIXED = "Attention 注意力 is naïve — ёж, 東京 and 서울; done."


@pytest.fixture(scope="module")
def cjk_store(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("cjk")
    corpus = folder / "corpus.txt"
    corpus.write_text(f"{CHINESE}\n{MIXED}\n", encoding="utf-8")
    out = folder / "cjk.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), progress=False)
    return out


def _tokens(store: Path, doc_id: int) -> list[dict[str, object]]:
    return attnstore.open(store).sql(
        "SELECT pos, token, text, char_start, char_end FROM tokens WHERE doc_id = ? ORDER BY pos",
        [doc_id],
    ).to_pylist()


@pytest.mark.parametrize(("doc_id", "text"), [(0, CHINESE), (1, MIXED)])
def test_token_text_is_readable_and_covers_the_document(
    cjk_store: Path, doc_id: int, text: str
) -> None:
    rows = _tokens(cjk_store, doc_id)
    assert all("\ufffd" not in str(r["text"]) for r in rows)
    # the raw piece is kept beside it, and is unreadable for byte pieces
    assert any("\ufffd" in str(r["token"]) for r in rows)
    # each token's text is its span, or its span marked as byte piece i of n
    rebuilt, last_span = [], None
    for r in rows:
        start, end = r["char_start"], r["char_end"]
        assert isinstance(start, int)
        assert isinstance(end, int)
        span_text = text[start:end]
        if r["text"] != span_text:
            assert str(r["text"]).startswith(span_text + "[")
            assert len(span_text) == 1
        if (start, end) != last_span:
            rebuilt.append(span_text)
        last_span = (start, end)
    assert "".join(rebuilt) == text


def test_byte_pieces_of_one_character_are_numbered(cjk_store: Path) -> None:
    rows = _tokens(cjk_store, 0)
    pieces = [r for r in rows if r["char_start"] == 0]
    n = len(pieces)
    assert n >= 2  # the tiny tokenizer has no Chinese merges: one token per UTF-8 byte
    assert [r["text"] for r in pieces] == [f"注[{i}/{n}]" for i in range(1, n + 1)]


def test_readable_tokens_without_spans() -> None:
    # the induction probe and special tokens have no span: decoded text, or bytes when partial
    assert readable_tokens("", [None, None, None], ["<|endoftext|>", "\ufffd", " the"],
                           ["<|endoftext|>", "æ³", "Ġthe"]) == ["<|endoftext|>", "<e6 b3>", " the"]  # fmt: skip
    # a complete character in one byte-level piece decodes to itself
    assert readable_tokens("", [None], ["\ufffd"], ["æ³¨"]) == ["注"]
    # SentencePiece byte fallback pieces are already readable
    assert readable_tokens("", [None], ["\ufffd"], ["<0xE6>"]) == ["<0xE6>"]


def test_readable_tokens_mixed_spans() -> None:
    text = "a注b"
    spans = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
    assert readable_tokens(text, spans, ["a", "\ufffd", "\ufffd", "\ufffd", "b"], [None] * 5) == [
        "a", "注[1/3]", "注[2/3]", "注[3/3]", "b",
    ]  # fmt: skip


def test_plots_draw_cjk_with_an_installed_font(cjk_store: Path, tmp_path: Path) -> None:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    from attnstore import plots

    _, mono, has_cjk = plots._fonts()
    assert has_cjk, "no CJK font: scripts/install.sh installs fonts-noto-cjk"
    store = attnstore.open(cjk_store)
    labels = plots._tokens(store, 0) + plots._tokens(store, 1)
    files = [font_manager.findfont(font_manager.FontProperties(family=f)) for f in mono]
    fonts = [FT2Font(f) for f in files]
    for ch in {c for label in labels for c in label if not c.isspace()}:
        assert any(f.get_char_index(ord(ch)) for f in fonts), f"no glyph for {ch!r} in {files}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_matrix(cjk_store, 0, 0, 0, tmp_path / "m.png")
        plots.plot_tokens(cjk_store, 1, 0, 0, 5, tmp_path / "t.png")
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_missing_cjk_font_warns_once(
    cjk_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attnstore import plots

    monkeypatch.setattr(plots, "_fonts", lambda: (list(plots.SANS), list(plots.MONO), False))
    monkeypatch.setattr(plots, "cjk_font_files", lambda: ())  # no CJK font file on disk either
    monkeypatch.setattr(plots, "_warned", set())
    with pytest.warns(plots.FontWarning, match="fonts-noto-cjk"):
        plots.plot_matrix(cjk_store, 0, 0, 0, tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_matrix(cjk_store, 0, 0, 1, tmp_path / "b.png")
