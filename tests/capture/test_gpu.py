"""The CUDA paths (sdpa mode, on-device quantisation, online scores) equal the CPU reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnstore.capture import Extractor, load_model
from attnstore.codecs import get_codec
from attnstore.corpus import Document

pytestmark = pytest.mark.gpu

TEXTS = [
    "The cat sat on the mat and the cat slept.",
    "def f(x): return x + 1  # def f(x): return x + 1",
]


@pytest.mark.parametrize("store_matrices", [True, False])
def test_cuda_capture_equals_cpu(llama_dir: Path, store_matrices: bool) -> None:
    runs = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(str(llama_dir), device=device, dtype="float32")
        ex = Extractor(loaded, get_codec("float32"), 64, store_matrices=store_matrices, mode="auto")
        assert ex.mode == ("sdpa" if device == "cuda" else "eager")
        runs[device] = ex.run([ex.tokenize(Document(i, t)) for i, t in enumerate(TEXTS)])
    for name in ("prev_token", "induction", "entropy", "mean_distance"):
        np.testing.assert_allclose(runs["cuda"].heads[name], runs["cpu"].heads[name], atol=1e-4)
    for a, b in zip(runs["cuda"].codes, runs["cpu"].codes, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
