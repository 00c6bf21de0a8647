"""Segments read without zarr: the one subset of Zarr v3 that attnstore writes, read directly.

Why this exists: the first read of a fresh process. Importing zarr costs ~0.15 s (its asyncio
machinery, codec registry, donfig and yaml, fsspec, ...), more than opening a store and reading a
matrix take without it; a script or notebook that reads one matrix paid it before anything else.
The arrays attnstore writes use a small, fixed part of the format, so reading them needs numpy,
``google_crc32c`` (the checksum zarr itself uses) and numcodecs' Blosc, and nothing more. zarr
still writes every array (:mod:`attnstore.store.segments`, :mod:`attnstore.store.streaming`),
``attnstore verify`` reads through it, and so does every read this module declines.

What it reads: an array whose ``zarr.json`` (untrusted data, like every byte of a store) says
exactly what :func:`~attnstore.store.segments.write_segment`,
:func:`~attnstore.store.segments.write_overviews` and :class:`~attnstore.store.streaming.DocStream`
write, and nothing else:

- ``zarr_format`` 3, ``node_type`` ``"array"``, no storage transformers;
- ``data_type`` one a codec stores (:data:`DTYPES`), and a number as ``fill_value``;
- a ``regular`` chunk grid (the shard shape) and the ``default`` chunk key encoding with ``"/"``;
- one codec, ``sharding_indexed``, whose inner chunk shape divides the shard shape, whose inner
  codecs are exactly ``[bytes (little-endian), blosc (any settings), crc32c]``, whose index codecs
  are exactly ``[bytes (little-endian), crc32c]``, and whose index is at the ``end``.

Anything else, including metadata that does not parse, makes :func:`open_sharded` return None: the
caller opens the array with zarr (:func:`~attnstore.store.segments.open_segment`), as before, and
zarr reports what it makes of it. So does a storage without byte-range reads
(:class:`~attnstore.storage.RangeReads`).

How one shard is read (the shard object ``c/i/j/k`` of the chunk key encoding): its index, the last
``16 · n + 4`` bytes (``n`` inner chunks, each ``(offset, nbytes)`` as little-endian uint64, then the
index's crc32c), with one ranged read; then the byte ranges of the inner chunks the selection
touches, with one more (a selection that touches every chunk of a shard reads the whole object at
once). An index entry of all ones marks a chunk never written, and a missing shard object a shard
never written: both read as the fill value, as in zarr. Each chunk is its Blosc frame followed by
its crc32c: the checksum is checked, then the frame's header (:func:`check_blosc_frame`, the same
decompression-bomb guard as :class:`~attnstore.store.segments.GuardedBloscCodec`, and a frame must
be exactly as long as it says), then Blosc decodes it, and the decoded size is checked.

Damage (a checksum that does not match, an index cut short, a chunk outside the object, a frame
that declares more, or decodes to other, than one chunk) raises
:class:`~attnstore.errors.DamagedStoreError` naming the shard object and the chunk, what was expected
and what came. It never falls back to zarr: damage is a finding, not a format variant.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import google_crc32c
import numpy as np

from attnstore.errors import DamagedStoreError

if TYPE_CHECKING:
    from attnstore.storage import RangeReads

__all__ = [
    "DTYPES",
    "DecompressionBombError",
    "Layout",
    "ShardedArray",
    "check_blosc_frame",
    "layout_of",
    "open_sharded",
]

#: The data types read here: those of the codecs (:mod:`attnstore.codecs`).
DTYPES: Final = frozenset({"uint8", "uint16", "float16", "float32"})
#: Size of the Blosc 1 frame header: ``nbytes`` (decoded) at offset 4, ``cbytes`` (the whole frame)
#: at offset 12, both uint32 little-endian.
BLOSC_HEADER: Final = 16
#: An index entry of a chunk never written (offset and nbytes alike).
_MISSING: Final = 2**64 - 1
_CRC: Final = 4
_EMPTY: Final = np.zeros(0, np.uint8)


class DecompressionBombError(DamagedStoreError):
    """A compressed chunk that declares more decoded bytes than its array's chunk holds."""


def check_blosc_frame(
    frame: Any, chunk_shape: tuple[int, ...], itemsize: int, where: str = ""
) -> int:
    """The decoded size a Blosc frame declares in its header, refused before anything is decoded
    when it exceeds one chunk of the array (``chunk_shape`` × ``itemsize`` bytes).

    ``frame``: the frame, or at least its first :data:`BLOSC_HEADER` bytes (bytes or uint8 array);
    ``where``: the file and chunk, to begin the message with.
    """
    limit = math.prod(chunk_shape) * itemsize
    head = bytes(frame[:BLOSC_HEADER])
    at = f"{where}: " if where else ""
    if len(head) < BLOSC_HEADER:
        raise DecompressionBombError(
            f"{at}A Blosc chunk of {len(head)} bytes is shorter than its 16-byte header."
        )
    (declared,) = struct.unpack_from("<I", head, 4)
    if declared > limit:
        raise DecompressionBombError(
            f"{at}A Blosc chunk declares {declared:,} decoded bytes; a chunk of this array "
            f"{tuple(chunk_shape)} × {itemsize} B holds {limit:,}. "
            "Refused before decoding (a damaged or hostile segment)."
        )
    return int(declared)


@dataclass(frozen=True)
class Layout:
    """What reading needs from a ``zarr.json`` of the subset above."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fill_value: int | float
    #: the chunk grid's chunk shape: one shard object each
    shard: tuple[int, ...]
    #: the inner chunks of a shard
    chunk: tuple[int, ...]

    @property
    def per_shard(self) -> tuple[int, ...]:
        """Inner chunks per shard along each axis."""
        return tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk) * self.dtype.itemsize


def _named(codec: Any, name: str) -> dict[str, Any] | None:
    """The configuration of ``codec`` if it is ``{"name": name, "configuration"?: {...}}``."""
    if not isinstance(codec, dict) or codec.get("name") != name:
        return None
    if set(codec) - {"name", "configuration"}:
        return None
    config = codec.get("configuration", {})
    return config if isinstance(config, dict) else None


def _little_endian_bytes(codec: Any, itemsize: int) -> bool:
    """``bytes`` with little-endian order (one-byte types: the order may be left out)."""
    config = _named(codec, "bytes")
    if config is None:
        return False
    if itemsize == 1 and not config:
        return True
    return config == {"endian": "little"}


def _crc32c(codec: Any) -> bool:
    return _named(codec, "crc32c") == {}


def _ints(value: Any, low: int) -> tuple[int, ...] | None:
    """``value`` as a tuple of ints ≥ ``low`` (bools are not ints here), or None."""
    if not isinstance(value, list) or not all(type(v) is int and v >= low for v in value):
        return None
    return tuple(value)


def layout_of(meta: Any) -> Layout | None:
    """The layout of an array's parsed ``zarr.json``, or None unless it is exactly the subset read
    here (the module docstring lists it)."""
    if not isinstance(meta, dict) or set(meta) - {
        "zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
        "fill_value", "codecs", "attributes", "storage_transformers", "dimension_names",
    }:  # fmt: skip
        return None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return None
    if meta.get("storage_transformers", []) != []:
        return None
    dtype_name = meta.get("data_type")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        return None
    dtype = np.dtype(dtype_name).newbyteorder("<")
    fill = meta.get("fill_value")
    if not isinstance(fill, (int, float)) or isinstance(fill, bool):
        return None
    if dtype.kind == "u" and not (type(fill) is int and 0 <= fill <= np.iinfo(dtype).max):
        return None
    shape = _ints(meta.get("shape"), 0)
    grid = _named(meta.get("chunk_grid"), "regular")
    keys = _named(meta.get("chunk_key_encoding"), "default")
    if shape is None or not shape or grid is None or keys != {"separator": "/"}:
        return None
    shard = _ints(grid.get("chunk_shape"), 1)
    codecs = meta.get("codecs")
    if shard is None or len(shard) != len(shape) or not isinstance(codecs, list):
        return None
    if len(codecs) != 1 or (sharding := _named(codecs[0], "sharding_indexed")) is None:
        return None
    if set(sharding) != {"chunk_shape", "codecs", "index_codecs", "index_location"}:
        return None
    chunk = _ints(sharding["chunk_shape"], 1)
    if chunk is None or len(chunk) != len(shape):
        return None
    if any(s % c for s, c in zip(shard, chunk, strict=True)):
        return None
    inner, index = sharding["codecs"], sharding["index_codecs"]
    if not (isinstance(inner, list) and len(inner) == 3 and isinstance(index, list)):
        return None
    if not (
        _little_endian_bytes(inner[0], dtype.itemsize)
        and _named(inner[1], "blosc") is not None
        and _crc32c(inner[2])
        and len(index) == 2
        and _little_endian_bytes(index[0], 8)
        and _crc32c(index[1])
        and sharding["index_location"] == "end"
    ):
        return None
    return Layout(shape, dtype, fill, shard, chunk)


def open_sharded(storage: object, rel: str) -> ShardedArray | None:
    """The array at ``rel`` of ``storage`` read without zarr; None when its ``zarr.json`` is
    missing, does not parse or is outside the subset, or when ``storage`` reads no byte ranges
    (then read it with zarr, which reports what it makes of the metadata)."""
    from attnstore.storage import RangeReads

    if not isinstance(storage, RangeReads):
        return None
    try:
        meta = json.loads(storage.read_bytes(f"{rel}/zarr.json"))
    except (FileNotFoundError, ValueError):
        return None
    layout = layout_of(meta)
    return None if layout is None else ShardedArray(storage, rel, layout)


def _damaged(where: str, message: str) -> DamagedStoreError:
    return DamagedStoreError(f"{where}: {message}. The segment is damaged.")


class ShardedArray:
    """A read-only array of the subset above: ``arr[i, j, a:b]`` (integers, slices of step ≥ 1 and
    one ``...``) is a numpy array, as zarr's would be."""

    def __init__(self, storage: RangeReads, rel: str, layout: Layout) -> None:
        self.storage, self.rel, self.layout = storage, rel, layout

    def __repr__(self) -> str:
        return f"<ShardedArray {self.rel!r} {self.shape} {self.dtype}>"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.layout.dtype

    @property
    def ndim(self) -> int:
        return len(self.layout.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        keys = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in keys):
            at = next(i for i, k in enumerate(keys) if k is Ellipsis)
            fill = (slice(None),) * max(0, self.ndim - len(keys) + 1)
            keys = keys[:at] + fill + keys[at + 1 :]
        if len(keys) > self.ndim:
            raise IndexError(f"too many indices for an array of {self.ndim} dimensions: {key!r}")
        keys = keys + (slice(None),) * (self.ndim - len(keys))
        lo: list[int] = []
        hi: list[int] = []
        post: list[Any] = []  # what the box read takes: a step, or dropping an integer's axis
        for k, n in zip(keys, self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 1:
                    raise IndexError(f"only slices with a step ≥ 1 are supported, got {k!r}")
                stop = max(start, stop)
                lo.append(start)
                hi.append(stop)
                post.append(slice(None, None, step))
            elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                i = int(k) + n if int(k) < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(k)} is out of bounds for an axis of size {n}")
                lo.append(i)
                hi.append(i + 1)
                post.append(0)
            else:
                raise IndexError(f"only integers and slices index a segment, got {k!r}")
        out: np.ndarray = self.read_box(tuple(lo), tuple(hi))[tuple(post)]
        return out

    def read_box(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
        """The values at ``lo[d] ≤ index[d] < hi[d]``, read shard by shard."""
        layout = self.layout
        out = np.full([b - a for a, b in zip(lo, hi, strict=True)], layout.fill_value, layout.dtype)
        if out.size == 0:
            return out
        first = [a // c for a, c in zip(lo, layout.chunk, strict=True)]
        last = [(b - 1) // c for b, c in zip(hi, layout.chunk, strict=True)]
        per = layout.per_shard
        shards = itertools.product(
            *(range(f // p, e // p + 1) for f, e, p in zip(first, last, per, strict=True))
        )
        for coords in shards:
            chunks = list(
                itertools.product(
                    *(
                        range(max(f, s * p), min(e, s * p + p - 1) + 1)
                        for f, e, s, p in zip(first, last, coords, per, strict=True)
                    )
                )
            )
            self._read_shard(coords, chunks, out, lo, hi)
        return out

    def _read_shard(
        self,
        coords: tuple[int, ...],
        chunks: list[tuple[int, ...]],
        out: np.ndarray,
        lo: tuple[int, ...],
        hi: tuple[int, ...],
    ) -> None:
        layout = self.layout
        per = layout.per_shard
        n = math.prod(per)
        index_size = 16 * n + _CRC
        key = f"{self.rel}/c/" + "/".join(map(str, coords))
        whole = len(chunks) == n  # every chunk of the shard: one read of the whole object
        data = _EMPTY
        try:
            if whole:
                data = np.frombuffer(self.storage.read_bytes(key), np.uint8)
                size, tail = len(data), data[-index_size:]
            else:
                size, got = self.storage.read_tail(key, index_size)
                tail = np.frombuffer(got, np.uint8)
        except FileNotFoundError:
            return  # a shard never written: the fill value
        if len(tail) < index_size:
            raise _damaged(
                key, f"{size:,} bytes, shorter than its shard index ({n} chunks × 16 B + 4 B "
                f"crc32c = {index_size:,} B): the object is cut short",
            )  # fmt: skip
        table_bytes = tail[:-_CRC]
        _check_crc(table_bytes, tail[-_CRC:], key, "the shard index")
        table = np.frombuffer(table_bytes, "<u8").reshape(n, 2)
        body = size - index_size
        wanted: list[tuple[tuple[int, ...], tuple[int, ...], int, int]] = []
        for chunk in chunks:
            local = tuple(c - s * p for c, s, p in zip(chunk, coords, per, strict=True))
            offset, nbytes = (int(x) for x in table[int(np.ravel_multi_index(local, per))])
            if offset == _MISSING and nbytes == _MISSING:
                continue  # a chunk never written: the fill value
            if nbytes < _CRC or offset + nbytes > body:
                raise _damaged(
                    key, f"chunk {local}: the index places it at bytes {offset:,} … "
                    f"{offset + nbytes:,}, expected {_CRC} bytes or more within the {body:,} "
                    "bytes before the index",
                )  # fmt: skip
            wanted.append((chunk, local, offset, nbytes))
        if not wanted:
            return
        if whole:
            blobs = [data[o : o + b] for _, _, o, b in wanted]
        else:
            got_ranges = self.storage.read_ranges(key, [(o, o + b) for _, _, o, b in wanted])
            blobs = [np.frombuffer(b, np.uint8) for b in got_ranges]
        for (chunk, local, _, nbytes), blob in zip(wanted, blobs, strict=True):
            where = f"{key} chunk {local}"
            if len(blob) != nbytes:
                raise _damaged(where, f"{len(blob):,} bytes came, the index says {nbytes:,}")
            values = self._decode(blob, where)
            src, dst = [], []
            for c, size_c, a, b in zip(chunk, layout.chunk, lo, hi, strict=True):
                start, stop = max(a, c * size_c), min(b, c * size_c + size_c)
                src.append(slice(start - c * size_c, stop - c * size_c))
                dst.append(slice(start - a, stop - a))
            out[tuple(dst)] = values[tuple(src)]

    def _decode(self, blob: np.ndarray, where: str) -> np.ndarray:
        """One inner chunk's bytes (a Blosc frame, then its crc32c) → its values."""
        from numcodecs import blosc

        layout = self.layout
        frame = blob[:-_CRC]
        _check_crc(frame, blob[-_CRC:], where, "the chunk")
        check_blosc_frame(frame, layout.chunk, layout.dtype.itemsize, where)
        cbytes = int(frame[12:16].view("<u4")[0])
        if cbytes != len(frame):
            raise _damaged(
                where, f"a Blosc frame of {len(frame):,} bytes whose header says {cbytes:,}"
            )
        try:
            decoded = blosc.decompress(frame)
        except (RuntimeError, ValueError) as err:
            raise _damaged(where, f"Blosc cannot decode it ({err})") from None
        if len(decoded) != layout.chunk_nbytes:
            raise _damaged(
                where, f"decoded to {len(decoded):,} bytes, expected {layout.chunk_nbytes:,} "
                f"(a chunk {layout.chunk} × {layout.dtype.itemsize} B)",
            )  # fmt: skip
        return np.frombuffer(decoded, layout.dtype).reshape(layout.chunk)


def _check_crc(data: np.ndarray, stored: np.ndarray, where: str, what: str) -> None:
    """``stored`` (crc32c, uint32 little-endian) must be the checksum of ``data`` (uint8 arrays:
    google_crc32c reads them without a copy)."""
    want = int.from_bytes(stored.tobytes(), "little")
    got = int(google_crc32c.value(data))
    if got != want:
        raise _damaged(
            where, f"{what}'s crc32c is {got:08x}, expected the stored {want:08x}: it changed"
        )
