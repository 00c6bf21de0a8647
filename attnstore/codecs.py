"""How attention probabilities become stored numbers and back.

The contract every codec keeps (as numcodecs' ``Codec`` and xarray's ``VariableCoder`` do):

- ``decode(encode(p))`` equals ``p`` within ``max_abs_error`` for every probability ``p`` in [0, 1];
  the bound is part of the codec's config and so of every store's manifest.
- ``get_config()`` returns JSON with an ``"id"``; :func:`get_codec` rebuilds the codec from it.
- Encoding runs in torch when given a tensor (on the tensor's device: quantising on the GPU is what
  keeps extraction fast) and in numpy otherwise; both give identical codes.
- The byte-level compressor (Blosc zstd with byte shuffle) is described here as plain data and
  applied by :mod:`attnstore.store`, the only module that speaks zarr.

Presets: ``default`` = ``fixed16`` (uint16 fixed point, scale 52,000, error ≤ 9.9e-6), ``compact`` = ``fixed8``
(uint8 fixed point, error ≤ 2.0e-3), ``lossless`` = ``float32``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from attnstore.errors import UnknownCodecError

if TYPE_CHECKING:
    import torch

__all__ = ["CODECS", "PRESETS", "Codec", "FixedPoint", "Float", "get_codec"]

# Encoding (p · scale) and decoding (q / scale) run in float32, and each rounding may move a value
# ≤ 1 by up to an ulp (2**-23) of the scaled or decoded number; 2**-22 covers both, so every stated
# bound is a true bound rather than an idealised one.
_F32_SLACK = 2.0**-22


@dataclass(frozen=True)
class Codec:
    """Base class: a stored dtype, an error bound and a compressor description."""

    id: ClassVar[str]
    dtype: ClassVar[str]
    _bound: ClassVar[float] = 0.0
    #: Blosc settings (zarr v3 core codec), chosen by measurement on real attention: byte shuffle +
    #: zstd gave the best ratio/speed trade-off, and level 1 compresses uint16 codes as well as
    #: level 3 at nearly twice the speed.
    compressor: ClassVar[dict[str, Any]] = {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}

    @property
    def max_abs_error(self) -> float:
        """Bound on |decoded − original| for every probability in [0, 1]."""
        return self._bound

    def get_config(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dtype": self.dtype,
            "max_abs_error": self.max_abs_error,
            "compressor": {"id": "blosc", **self.compressor},
            **self._params(),
        }

    def _params(self) -> dict[str, Any]:
        return {}

    def encode(self, probs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities (float, any shape) → stored numbers (numpy, ``self.dtype``)."""
        if isinstance(probs, np.ndarray):
            return self._encode_numpy(probs)
        return self._encode_torch(probs)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Stored numbers → float32 probabilities."""
        raise NotImplementedError

    def _encode_numpy(self, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _encode_torch(self, probs: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class FixedPoint(Codec):
    """``q = round(p · scale)``: uniform absolute error ≤ 0.5 / scale.

    Attention is mostly tiny values, which become runs of zeros that zstd removes; this is why
    fixed point beats float16 (relative precision wasted on values nobody reads) by 2× in size.
    The scale is recorded in the store, so stores written with another scale decode correctly.
    """

    scale: int = 65535

    def __post_init__(self) -> None:
        top = 2 ** (8 * np.dtype(self.dtype).itemsize) - 1
        if not 1 <= self.scale <= top:
            raise ValueError(f"Expected a {self.id} scale in 1…{top}. Got {self.scale} instead.")

    @property
    def max_abs_error(self) -> float:
        return 0.5 / self.scale + _F32_SLACK

    def _params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def _encode_numpy(self, probs: np.ndarray) -> np.ndarray:
        scaled = np.clip(probs.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(self.scale)
        codes: np.ndarray = np.rint(scaled).astype(self.dtype)
        return codes

    def _encode_torch(self, probs: torch.Tensor) -> np.ndarray:
        import torch

        # Out-of-place on purpose: .float() returns the caller's tensor when it is float32 already.
        scaled = torch.round(probs.float().clamp(0.0, 1.0) * self.scale)
        return scaled.to(getattr(torch, self.dtype)).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.float32) * np.float32(1.0 / self.scale)


@dataclass(frozen=True)
class Fixed16(FixedPoint):
    """uint16 fixed point. The default scale, 52,000 rather than 65,535, spends the issue's error
    budget (≤ 1e-5; here ≤ 9.9e-6) instead of beating it: fewer distinct codes compress ~5% better."""

    id: ClassVar[str] = "fixed16"
    dtype: ClassVar[str] = "uint16"
    scale: int = 52000


@dataclass(frozen=True)
class Fixed8(FixedPoint):
    id: ClassVar[str] = "fixed8"
    dtype: ClassVar[str] = "uint8"
    scale: int = 255


@dataclass(frozen=True)
class Float(Codec):
    """IEEE float storage: lossless float32, or float16 (relative precision, 11 significant bits)."""

    def _encode_numpy(self, probs: np.ndarray) -> np.ndarray:
        return probs.astype(self.dtype)

    def _encode_torch(self, probs: torch.Tensor) -> np.ndarray:
        import torch

        return probs.to(getattr(torch, self.dtype)).cpu().numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.float32)


@dataclass(frozen=True)
class Float32(Float):
    id: ClassVar[str] = "float32"
    dtype: ClassVar[str] = "float32"
    _bound: ClassVar[float] = 0.0


@dataclass(frozen=True)
class Float16(Float):
    id: ClassVar[str] = "float16"
    dtype: ClassVar[str] = "float16"
    # For p in [0.5, 1] the float16 spacing is 2**-11, so rounding errs by at most 2**-12.
    _bound: ClassVar[float] = 2.0**-12 + _F32_SLACK


CODECS: dict[str, type[Codec]] = {c.id: c for c in (Fixed16, Fixed8, Float16, Float32)}
PRESETS: dict[str, str] = {"default": "fixed16", "compact": "fixed8", "lossless": "float32"}


def get_codec(config: str | dict[str, Any]) -> Codec:
    """A codec from its id, a preset name, or the config stored in a manifest.

    >>> get_codec("default").id
    'fixed16'
    >>> get_codec({"id": "float16"}).max_abs_error < 3e-4
    True
    """
    codec_id = config if isinstance(config, str) else str(config.get("id"))
    codec_id = PRESETS.get(codec_id, codec_id)
    cls = CODECS.get(codec_id)
    if cls is None:
        raise UnknownCodecError(codec_id, sorted(CODECS) + sorted(PRESETS))
    if isinstance(config, dict) and "scale" in config and issubclass(cls, FixedPoint):
        return cls(
            scale=int(config["scale"])
        )  # the scale a store was written with (65535 in the 1.0 golden store)
    return cls()
