"""Codec round-trips within the stated bound, and triangle packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from attnstore.codecs import CODECS, PRESETS, get_codec
from attnstore.errors import UnknownCodecError
from attnstore.packing import pack_tril, packed_length, unpack_tril

probabilities = arrays(
    np.float32,
    st.integers(1, 400),
    elements=st.floats(0.0, 1.0, width=32, allow_subnormal=True),
)


@pytest.mark.parametrize("codec_id", sorted(CODECS))
@settings(max_examples=60, deadline=None)
@given(p=probabilities)
def test_roundtrip_within_bound(codec_id: str, p: np.ndarray) -> None:
    codec = get_codec(codec_id)
    codes = codec.encode(p)
    assert codes.dtype == np.dtype(codec.dtype)
    back = codec.decode(codes)
    assert back.dtype == np.float32
    assert np.abs(back.astype(np.float64) - p.astype(np.float64)).max() <= codec.max_abs_error
    # the torch path (used during extraction) yields identical codes
    np.testing.assert_array_equal(codec.encode(torch.from_numpy(p.copy())), codes)


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_bound_is_tight_enough_to_mean_something(codec_id: str) -> None:
    codec = get_codec(codec_id)
    p = np.linspace(0, 1, 100_001, dtype=np.float32)
    err = np.abs(codec.decode(codec.encode(p)).astype(np.float64) - p).max()
    assert err <= codec.max_abs_error
    if codec.max_abs_error:
        assert err > codec.max_abs_error / 2  # the stated bound is not a loose guess


def test_default_codec_meets_issue_bound() -> None:
    assert get_codec("default").max_abs_error <= 1e-5
    assert get_codec("lossless").max_abs_error == 0


def test_encode_does_not_touch_input() -> None:
    t = torch.rand(100)
    before = t.clone()
    get_codec("fixed16").encode(t)
    assert torch.equal(t, before)


def test_unknown_codec_lists_choices() -> None:
    with pytest.raises(UnknownCodecError, match="fixed16") as info:
        get_codec("zfp")
    assert info.value.codec_id == "zfp"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_roundtrip(name: str) -> None:
    codec = get_codec(name)
    assert get_codec(codec.get_config()) == codec


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), lead=st.integers(1, 3))
def test_pack_unpack_roundtrip(n: int, lead: int) -> None:
    rng = np.random.default_rng(n)
    square = np.tril(rng.random((lead, n, n)).astype(np.float32))
    packed = pack_tril(square)
    assert packed.shape == (lead, packed_length(n))
    np.testing.assert_array_equal(unpack_tril(packed, n), square)
    # row q starts at q (q + 1) / 2
    q = n - 1
    np.testing.assert_array_equal(packed[0, q * (q + 1) // 2 :], square[0, q, : q + 1])


def test_unpack_checks_length() -> None:
    with pytest.raises(ValueError, match="Expected 6 packed values"):
        unpack_tril(np.zeros(5), 3)


def test_recorded_scale_is_honoured() -> None:
    old = get_codec({"id": "fixed16", "scale": 65535})
    assert old.max_abs_error < get_codec("default").max_abs_error <= 1e-5
    codes = np.array([65535, 32768], dtype=np.uint16)
    np.testing.assert_allclose(old.decode(codes), [1.0, 32768 / 65535], rtol=1e-7)
    with pytest.raises(ValueError, match="scale in 1…255"):
        get_codec({"id": "fixed8", "scale": 300})
