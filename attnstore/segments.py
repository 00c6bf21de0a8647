"""Opening a segment (a Zarr v3 array) safely: bounded decoding and one-line errors.

A segment's bytes come from the store, which may come from elsewhere. Two guards apply to every
read (``Store.matrix`` and friends, ``attnstore verify``, the viewer):

- **Decompression bombs.** A Blosc frame declares in its 16-byte header how many bytes it inflates
  to. :class:`GuardedBloscCodec` compares that figure with the size of one chunk of the array (its
  own chunk shape times the item size, from ``zarr.json``) *before* Blosc allocates anything, and
  refuses a frame that declares more. It replaces zarr's ``blosc`` codec for reading and writing
  alike (encoding is unchanged).
- **Damaged metadata.** A ``zarr.json`` that does not parse as an array becomes one
  :class:`~attnstore.errors.DamagedStoreError` line naming the file.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.registry import fully_qualified_name, register_codec

from attnstore.errors import DamagedStoreError

__all__ = ["GuardedBloscCodec", "open_segment"]

#: Size of the Blosc 1 frame header; ``nbytes`` (uint32, little-endian) sits at offset 4.
_HEADER: Final = 16


class DecompressionBombError(DamagedStoreError):
    """A compressed chunk that declares more decoded bytes than its array's chunk holds."""


class GuardedBloscCodec(BloscCodec):
    """zarr's Blosc codec, refusing frames that declare more than one chunk of decoded bytes."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        limit = int(np.prod(chunk_spec.shape, dtype=np.int64)) * chunk_spec.dtype.item_size
        head = chunk_bytes.as_numpy_array()[:_HEADER].tobytes()
        if len(head) < _HEADER:
            raise DecompressionBombError(
                f"A Blosc chunk of {len(head)} bytes is shorter than its 16-byte header."
            )
        (declared,) = struct.unpack_from("<I", head, 4)
        if declared > limit:
            raise DecompressionBombError(
                f"A Blosc chunk declares {declared:,} decoded bytes; a chunk of this array "
                f"{tuple(chunk_spec.shape)} × {chunk_spec.dtype.item_size} B holds {limit:,}. "
                "Refused before decoding (a damaged or hostile segment)."
            )
        return super()._decode_sync(chunk_bytes, chunk_spec)


register_codec("blosc", GuardedBloscCodec)
zarr.config.set({"codecs.blosc": fully_qualified_name(GuardedBloscCodec)})


def open_segment(zarr_store: Any, rel: str) -> Any:
    """The read-only Zarr array of segment ``rel``; one clear error if its metadata is damaged."""
    try:
        return zarr.open_array(store=zarr_store, mode="r", zarr_format=3)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds on a damaged zarr.json
        text = " ".join(str(err).split())[:200]
        raise DamagedStoreError(
            f"{rel}/zarr.json: not a readable Zarr v3 array ({type(err).__name__}: {text})."
        ) from None
