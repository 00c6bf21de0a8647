"""Segments (Zarr v3 arrays of codes, and the overview arrays): written once, opened safely.

A segment is one Zarr v3 array ``[layer, head, packed]`` holding the packed lower triangles of its
documents back to back (see :mod:`attnstore.packing`), compressed with Blosc (zstd + byte shuffle)
and written as a single shard: one object, written once by one process (:func:`write_segment`).
An overview array ``[layer, head, 2, cells]`` holds the ``--overview N`` pictures of a flush's
documents the same way (:func:`write_overviews`). A long document's segment is written as its rows
come (:mod:`attnstore.store.streaming`).

A segment's bytes come from the store, which may come from elsewhere. Two guards apply to every
read (``Store.matrix`` and friends, ``attnstore verify``, the viewer):

- **Decompression bombs.** A Blosc frame declares in its 16-byte header how many bytes it inflates
  to. :class:`GuardedBloscCodec` compares that figure with the size of one chunk of the array (its
  own chunk shape times the item size, from ``zarr.json``) *before* Blosc allocates anything, and
  refuses a frame that declares more (:func:`~attnstore.store.shards.check_blosc_frame`, which the
  zarr-free reader applies too). It replaces zarr's ``blosc`` codec for reading and writing alike
  (encoding is unchanged).
- **Damaged metadata.** A ``zarr.json`` that does not parse as an array becomes one
  :class:`~attnstore.errors.DamagedStoreError` line naming the file.

``Store.matrix`` and its kin read the arrays of this module without zarr when their metadata is
exactly what is written here (:mod:`attnstore.store.shards`: a fresh process then never imports
zarr); :func:`open_segment` opens everything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.registry import fully_qualified_name, register_codec

from attnstore.errors import DamagedStoreError
from attnstore.store.shards import BLOSC_HEADER, DecompressionBombError, check_blosc_frame

if TYPE_CHECKING:
    from attnstore.codecs import Codec
    from attnstore.storage import Storage

__all__ = [
    "CHUNK",
    "DecompressionBombError",
    "GuardedBloscCodec",
    "open_segment",
    "write_overviews",
    "write_segment",
]

#: Inner chunk length along the packed axis: 64 Ki values (128 KiB as uint16). One T=512 matrix
#: (131,328 values) spans 3 chunks, so one read decompresses at most ~400 KiB.
CHUNK: Final = 1 << 16

class GuardedBloscCodec(BloscCodec):
    """zarr's Blosc codec, refusing frames that declare more than one chunk of decoded bytes."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        head = chunk_bytes.as_numpy_array()[:BLOSC_HEADER]
        check_blosc_frame(head, tuple(chunk_spec.shape), chunk_spec.dtype.item_size)
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


def write_segment(storage: Storage, rel: str, data: np.ndarray, codec: Codec, packing: str) -> None:
    """The segment ``rel``: codes ``[layer, head, packed]`` as one shard, durable."""
    n_layers, n_heads, total = data.shape
    shard = -(-total // CHUNK) * CHUNK
    arr = zarr.create_array(
        store=storage.zarr_store(rel, read_only=False),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(1, 1, min(CHUNK, shard)),
        shards=(n_layers, n_heads, shard),
        # crc32c per chunk: a flipped bit fails the read instead of returning wrong values
        compressors=[BloscCodec(**codec.compressor), Crc32cCodec()],
        fill_value=0,
        zarr_format=3,
        attributes={"attnstore": {"packing": packing, "codec": codec.get_config()}},
    )
    arr[...] = data
    storage.sync(rel)


def write_overviews(storage: Storage, rel: str, data: np.ndarray, codec: Codec, size: int) -> None:
    """The overview array ``rel``: float32 ``[layer, head, 2 (max, mean), cells]``, durable."""
    n_layers, n_heads, n_kinds, total = data.shape
    chunk = min(CHUNK, total)
    arr = zarr.create_array(
        store=storage.zarr_store(rel, read_only=False),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(1, 1, n_kinds, chunk),
        shards=(n_layers, n_heads, n_kinds, -(-total // chunk) * chunk),
        compressors=[BloscCodec(**codec.compressor), Crc32cCodec()],
        fill_value=0,
        zarr_format=3,
        attributes={"attnstore": {"overview": size, "kinds": ["max", "mean"]}},
    )
    arr[...] = data
    storage.sync(rel)
