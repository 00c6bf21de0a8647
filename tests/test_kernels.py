"""The compiled census loop (attnstore/kernels/census.c) against its torch reading, and its loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnstore import kernels


def test_builds_here_and_turns_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.census_kernel() is not None  # this machine has a C compiler (.ci/run's too)
    monkeypatch.setenv("ATTNSTORE_KERNELS", "off")
    assert kernels.census_kernel() is None


def test_no_compiler_means_no_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ATTNSTORE_CACHE", str(tmp_path / "cache"))
    assert kernels._build(kernels._SOURCE) is None
    monkeypatch.setenv("CC", "false")  # a compiler that refuses
    assert kernels._build(kernels._SOURCE) is None
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 3),
    lengths=st.lists(st.integers(0, 800), min_size=1, max_size=3),
    r=st.integers(1, 40),
    kw=st.integers(1, 70),
    q0=st.integers(0, 700),  # tiles near the diagonal (windows) and far from it
    k_back=st.integers(0, 700),
    level=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
)
def test_tile_equals_its_torch_reading(
    heads: int, lengths: list[int], r: int, kw: int, q0: int, k_back: int, level: float, seed: int
) -> None:
    kernel = kernels.census_kernel()
    assert kernel is not None
    k0 = max(0, q0 - k_back)
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths) * heads
    z0 = torch.randn(n, r, kw, generator=gen) * 4 - 3
    z0[z0 < -8] = -200.0  # arguments below the exp floor
    levels = (level / 3, level)
    lse = torch.randn(n, r, generator=gen) * 5  # the loop subtracts each row's lse itself
    block = kernel.block(n, r, levels, None, lse)
    # mass already seen nearer the diagonal, below both levels (else the span would be found)
    before = torch.rand(n, r, generator=gen, dtype=torch.float64) * level / 3.1
    block["mass"][:] = before
    block.span[0, :, 1::3] = 5  # found in an earlier tile: kept
    z = z0 + lse[..., None]
    z0 = z - lse[..., None]  # what the loop sees, rounding included
    col, diag = kernel.tile(z, heads, torch.tensor(lengths), q0, k0, 1, block)

    q = torch.arange(q0, q0 + r)[None, :, None]
    k = torch.arange(k0, k0 + kw)[None, None, :]
    length = torch.tensor(lengths).repeat_interleave(heads)[:, None, None]
    visible = (k <= q) & (q < length)
    stat = visible & (q >= 1)
    zc = z0.clamp_min(-87.0)
    p = torch.where(visible, torch.exp(zc), 0.0).double()
    torch.testing.assert_close(z.double(), p, rtol=3e-7, atol=0)
    sp = torch.where(stat, p, 0.0)
    d = q - k
    tol = {"rtol": 1e-5, "atol": 1e-12}
    torch.testing.assert_close(block["l"], p.sum(-1), **tol)
    torch.testing.assert_close(block["mass"], before + p.sum(-1), **tol)
    torch.testing.assert_close(block["pk"], (p * k).sum(-1), **tol)
    torch.testing.assert_close(block["pz"], (p * zc).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(block.zmax, torch.where(visible, z0, -math.inf).amax(-1))
    torch.testing.assert_close(block["loc"], (sp * (d < 64)).sum(-1), **tol)
    torch.testing.assert_close(block["rec"], (sp * (d < 256)).sum(-1), **tol)
    torch.testing.assert_close(col.double(), sp.sum(1), **tol)
    at = {"prev": k == q - 1, "self": k == q, "sink": k == 0}
    for name, where in at.items():
        torch.testing.assert_close(block[name], (p * where).sum(-1), **tol)
    torch.testing.assert_close(block["sink4"], (sp * (k < 4)).sum(-1), **tol)
    early = k < (q - 255).clamp(0, 128)  # the stream budget's first keys
    torch.testing.assert_close(block["early"], (sp * early).sum(-1), **tol)
    top = q0 + r - 1 - k0
    for j in range(r + kw - 1):  # diag column j holds offset top - j
        torch.testing.assert_close(diag[:, j].double(), (sp * (d == top - j)).sum((1, 2)), **tol)
    suffix = before[..., None] + sp.flip(-1).cumsum(-1).flip(-1)  # mass down to key k
    for lv, value in enumerate(levels):
        reached = suffix >= value
        hit = reached.any(-1) & stat.any(-1)
        nearest = kw - 1 - reached.flip(-1).to(torch.int8).argmax(-1)  # largest k reaching it
        want = torch.where(hit, q[0, :, 0] - (k0 + nearest), -1)
        if lv == 0:
            want[:, 1::3] = 5
        # a row whose float64 sum sits within rounding of the level may go either way
        close = ((suffix - value).abs() < 1e-9).any(-1)
        assert torch.equal(block.span[lv][~close], want[~close])


@settings(max_examples=40, deadline=None)
@given(
    docs=st.integers(1, 3),
    heads=st.integers(1, 4),
    r=st.integers(1, 20),
    kw=st.integers(1, 30),
    k0=st.integers(0, 50),
    n_pairs=st.integers(0, 60),
    seed=st.integers(0, 2**31),
)
def test_pairs_equal_their_torch_reading(
    docs: int, heads: int, r: int, kw: int, k0: int, n_pairs: int, seed: int
) -> None:
    """census_pairs adds a tile's weights at (doc, row, key) pairs, repeats included, for every
    head: what index_put_ with accumulate reads from the same tile."""
    kernel = kernels.census_kernel()
    assert kernel is not None
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(docs, heads, r, kw, generator=gen)
    doc = torch.randint(0, docs, (n_pairs,), generator=gen)
    row = torch.randint(0, r, (n_pairs,), generator=gen)
    key = torch.randint(k0, k0 + kw, (n_pairs,), generator=gen)
    lo = int(torch.randint(0, n_pairs + 1, (1,), generator=gen))
    sets = torch.rand(docs, r, heads, generator=gen)
    want = sets.clone()
    sel = slice(lo, n_pairs)
    want.index_put_((doc[sel], row[sel]), p[doc[sel], :, row[sel], key[sel] - k0], accumulate=True)
    kernel.pairs(p, k0, (doc, row, key), lo, n_pairs, sets)
    torch.testing.assert_close(sets, want, rtol=1e-6, atol=1e-6)


def test_pairs_outside_the_tile_are_refused() -> None:
    kernel = kernels.census_kernel()
    assert kernel is not None
    p, sets = torch.rand(2, 3, 4, 5), torch.zeros(2, 4, 3)
    at = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([10, 15]))  # key 15 ≥ k0 + 5
    with pytest.raises(ValueError, match="1 pairs outside the tile"):
        kernel.pairs(p, 10, at, 0, 2, sets)
    with pytest.raises(ValueError, match="pairs 0…3"):
        kernel.pairs(p, 10, at, 0, 3, sets)
    with pytest.raises(ValueError, match="sets"):
        kernel.pairs(p, 10, at, 0, 1, torch.zeros(2, 3, 4))
