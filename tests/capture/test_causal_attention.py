"""attnstore's attention function with plain causal masks: no [T, T] mask, same probabilities and
outputs as the dense-mask path (issue 17: memory linear in T)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnstore.capture import hook


def _run(mask: torch.Tensor | None, mode: str, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    got: dict[int, torch.Tensor] = {}

    def consume(layer: int, q0: int, probs: torch.Tensor) -> None:
        got[q0] = probs.clone()

    cap = hook._Capture(consume, lambda layer: None, mode=mode, chunk_bytes=4 * 2 * 4 * 3 * 11)
    hook._ACTIVE = cap
    try:
        out, _ = hook._attention(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    finally:
        hook._ACTIVE = None
    probs = torch.cat([got[q0] for q0 in sorted(got)], dim=2)
    return out, probs


@pytest.mark.parametrize("mode", ["eager", "sdpa"])
@pytest.mark.parametrize("left", [False, True])
def test_key_padding_mask_equals_dense_mask(mode: str, left: bool) -> None:
    torch.manual_seed(0)
    b, h, t, d = 2, 4, 11, 8
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    lengths = torch.tensor([11, 6])
    pos = torch.arange(t)
    keys = pos[None, :] < lengths[:, None]  # right padding
    if left:
        keys = keys.flip(-1)
    dense = (pos[None, :] <= pos[:, None])[None, None] & keys[:, None, None, :]
    want_out, want = _run(dense, mode, q, k, v)
    got_out, got = _run(keys[:, None, None, :], mode, q, k, v)
    assert got.shape == want.shape == (b, h, t, t)
    for i, n in enumerate(lengths.tolist()):
        real = slice(t - n, t) if left else slice(0, n)  # padded rows may differ (never read)
        torch.testing.assert_close(got[i, :, real], want[i, :, real], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_out[i, real], want_out[i, real], atol=1e-5, rtol=1e-5)
    assert float(got.triu(1).abs().max()) == 0.0  # nothing above the diagonal


def test_mask_builder_returns_key_padding_only_during_capture() -> None:
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    kwargs = {"batch_size": 2, "q_length": 4, "kv_length": 4, "attention_mask": pad}
    dense = hook._mask(**kwargs)  # outside a capture: transformers' dense mask
    assert dense.shape == (2, 1, 4, 4)
    hook._ACTIVE = hook._Capture(lambda *a: None, lambda *a: None)
    try:
        compact = hook._mask(**kwargs)
        window = hook._mask(**kwargs, local_size=2)  # not plain causal: dense as before
    finally:
        hook._ACTIVE = None
    assert compact.shape == (2, 1, 1, 4)
    assert compact.dtype == torch.bool
    assert compact[:, 0, 0].tolist() == pad.bool().tolist()
    assert window.shape == (2, 1, 4, 4)
