"""Each plot writes a real PNG of a sensible size that is not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import attnstore
from attnstore.cli import cli


def check_png(path: Path, min_w: int, min_h: int) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w
        assert im.height >= min_h
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10  # not a blank canvas
    return pixels


@pytest.mark.parametrize(
    ("args", "min_size"),
    [
        (["matrix", "--doc", "0", "--layer", "1", "--head", "2"], (500, 500)),
        (["grid", "--score", "prev_token", "--where", "doc_id < 6"], (300, 300)),
        (["tokens", "--doc", "0", "--layer", "1", "--head", "2", "--query", "20"], (1000, 150)),
    ],
)
def test_plot_commands(
    llama_store: Path, tmp_path: Path, args: list[str], min_size: tuple[int, int]
) -> None:
    out = tmp_path / "fig.png"
    result = CliRunner().invoke(cli, ["plot", args[0], str(llama_store), *args[1:], "-o", str(out)])
    assert result.exit_code == 0, result.output
    check_png(out, *min_size)


def test_matrix_plot_shows_the_causal_triangle(tmp_path: Path) -> None:
    from attnstore.plots import plot_matrix
    from tests.synthetic import write_synthetic_store

    store = write_synthetic_store(tmp_path / "syn.attn")
    pixels = check_png(plot_matrix(str(store), 0, 0, 3, tmp_path / "self.png"), 500, 500)
    # the masked upper triangle is a flat light grey: many pixels of exactly that colour
    grey = np.all(np.abs(pixels - 230) < 3, axis=-1)
    assert grey.mean() > 0.15


def test_short_document_gets_token_labels(
    llama_dir: Path, corpus_txt: Path, tmp_path: Path
) -> None:
    from attnstore.plots import MAX_LABELLED, plot_matrix

    out = tmp_path / "short.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus_txt), progress=False)
    store = attnstore.open(str(out))
    short = store.sql(
        "SELECT doc_id, n_tokens FROM docs WHERE n_tokens > 0 ORDER BY n_tokens LIMIT 1"
    ).to_pylist()[0]
    assert 0 < short["n_tokens"] <= MAX_LABELLED
    path = plot_matrix(store, short["doc_id"], 0, 0, tmp_path / "short.png")
    labelled = check_png(path, 300, 300)
    unlabelled = check_png(plot_matrix(store, 6, 0, 0, tmp_path / "long.png"), 300, 300)
    assert labelled.shape != unlabelled.shape or not np.array_equal(labelled, unlabelled)


def test_plot_errors(llama_store: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "plot",
            "tokens",
            str(llama_store),
            "--doc",
            "0",
            "--layer",
            "0",
            "--head",
            "0",
            "--query",
            "9999",
            "-o",
            str(tmp_path / "x.png"),
        ],
    )
    assert result.exit_code == 1
    assert "query position in 0…" in result.output
    result = runner.invoke(
        cli,
        ["plot", "grid", str(llama_store), "--where", "layer = 42", "-o", str(tmp_path / "x.png")],
    )
    assert result.exit_code == 1
    assert "matches no heads" in result.output
