"""Streaming store-all: one long document's rows go to its own segment as they are captured.

A document whose codes would exceed :data:`STREAM_BYTES` is not held in memory: the extractor opens
a :class:`DocStream` (through :meth:`attnstore.store.StoreWriter.stream`) and hands it each layer's
encoded rows, block by block, in row order. The stream keeps at most one shard per head
(``heads × SHARD_VALUES`` codes, 18 MiB for 9 uint16 heads) and writes every full shard at once, so
peak memory is bounded by a block of rows, not by the document.

The document's segment is a Zarr v3 array ``[layer, head, stored]`` (``stored`` = the packed length
of its stored rows, :class:`attnstore.rows.DocRows`) with inner chunks of :data:`CHUNK` values along
the packed axis and shards of ``(1, heads, SHARD_VALUES)``: a block of rows is a few chunks, and a
read of rows ``a … b`` of one head decodes only the chunks those rows touch. The segment becomes
visible only when the ``docs`` row naming it commits (the flush protocol of :mod:`attnstore.store.writer`);
a process killed while streaming leaves an unreferenced array that readers ignore, and a rerun
extracts that one document again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from attnstore.store.segments import CHUNK

if TYPE_CHECKING:
    from attnstore.codecs import Codec
    from attnstore.storage import Storage

__all__ = ["CHUNK", "SHARD_VALUES", "STREAM_BYTES", "DocStream", "Streamed", "stream_bytes"]

#: Values per head in one shard of a streamed segment (16 chunks).
SHARD_VALUES: Final = 16 * CHUNK
#: Documents whose codes (all stored layers and heads) exceed this many bytes are streamed.
STREAM_BYTES: Final = 256 << 20


def stream_bytes() -> int:
    """The streaming threshold: :data:`STREAM_BYTES` or ``ATTNSTORE_STREAM_BYTES``."""
    value = os.environ.get("ATTNSTORE_STREAM_BYTES")
    return int(value) if value else STREAM_BYTES


@dataclass(frozen=True)
class Streamed:
    """Stands in :attr:`Segment.codes` for a document already written as its own segment."""

    segment: str
    length: int
    nbytes: int = 0  # nothing buffered


class DocStream:
    """Writes one document's codes ``[layer, head, stored]`` layer by layer, shard by shard."""

    def __init__(
        self,
        storage: Storage,
        rel: str,
        name: str,
        shape: tuple[int, int, int],
        codec: Codec,
        fault: Any = None,
    ) -> None:
        _, n_heads, length = shape
        self.storage, self.rel, self.name = storage, rel, name
        self.length = length
        self.shard = min(SHARD_VALUES, -(-max(length, 1) // CHUNK) * CHUNK)
        self.array = zarr.create_array(
            store=storage.zarr_store(rel, read_only=False),
            shape=shape,
            dtype=codec.dtype,
            chunks=(1, 1, min(CHUNK, self.shard)),
            shards=(1, n_heads, self.shard),
            compressors=[BloscCodec(**codec.compressor), Crc32cCodec()],
            fill_value=0,
            zarr_format=3,
            attributes={
                "attnstore": {
                    "packing": "tril-rowmajor",
                    "codec": codec.get_config(),
                    "streamed": True,
                }
            },
        )
        self._buf = np.zeros((n_heads, self.shard), dtype=codec.dtype)
        self._fill = 0
        self._base = 0
        self._layer: int | None = None
        self._fault = fault
        self.layers_done = 0

    def write(self, layer: int, values: np.ndarray) -> None:
        """The next stored rows of layer position ``layer``: codes ``[head, k]`` in row order."""
        if self._layer is None:
            self._layer = layer
        elif self._layer != layer:
            raise RuntimeError(f"layer {self._layer} of the stream was not ended before {layer}")
        k = values.shape[1]
        at = 0
        while at < k:
            take = min(k - at, self.shard - self._fill)
            self._buf[:, self._fill : self._fill + take] = values[:, at : at + take]
            self._fill += take
            at += take
            if self._fill == self.shard:
                self._write_buffer()

    def end_layer(self, layer: int) -> None:
        """Layer position ``layer`` is complete: write its last (partial) shard."""
        if self._layer is None:  # a layer with no stored rows
            self._layer = layer
        if self._fill:
            self._write_buffer()
        if self._base != self.length:
            raise RuntimeError(
                f"layer {layer}: {self._base} of {self.length} stored values were streamed"
            )
        self._layer, self._base = None, 0
        self.layers_done += 1

    def _write_buffer(self) -> None:
        assert self._layer is not None
        end = self._base + self._fill
        self.array[self._layer, :, self._base : end] = self._buf[:, : self._fill]
        self._base, self._fill = end, 0
        if self._fault is not None:
            self._fault("stream")

    def close(self) -> Streamed:
        """Every layer written: make the files durable and name the segment for the docs row."""
        n_layers = self.array.shape[0]
        if self.layers_done != n_layers:
            raise RuntimeError(f"{self.layers_done} of {n_layers} layers were streamed")
        self.storage.sync(self.rel)
        return Streamed(self.name, self.length)
