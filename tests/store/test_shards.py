"""The zarr-free segment reader (:mod:`attnstore.store.shards`) against zarr itself: the same values
for every array attnstore writes, damage refused by name, and every other layout left to zarr."""

from __future__ import annotations

import contextlib
import copy
import json
import multiprocessing
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import google_crc32c
import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnstore
from attnstore.codecs import CODECS, get_codec
from attnstore.errors import DamagedStoreError
from attnstore.storage import LocalStorage, ObjectStorage
from attnstore.store import matrices, segments, streaming
from attnstore.store.shards import DecompressionBombError, ShardedArray, layout_of, open_sharded
from tests.helpers import GOLDEN
from tests.synthetic import write_synthetic_store

WRITERS = ("segment", "overviews", "stream")


@contextlib.contextmanager
def _chunk(size: int) -> Iterator[None]:
    """Writers with inner chunks of ``size`` values (16 per streamed shard), so that small arrays
    span many chunks and shards."""
    with (
        mock.patch.object(segments, "CHUNK", size),
        mock.patch.object(streaming, "CHUNK", size),
        mock.patch.object(streaming, "SHARD_VALUES", 16 * size),
    ):
        yield


def _write(storage: Any, rel: str, writer: str, data: np.ndarray, codec_id: str) -> None:
    codec = get_codec(codec_id)
    if writer == "segment":
        segments.write_segment(storage, rel, data, codec, "tril-rowmajor")
    elif writer == "overviews":
        segments.write_overviews(storage, rel, data.astype(np.float32), codec, 8)
    else:
        stream = streaming.DocStream(storage, rel, "x", data.shape, codec)
        for layer in range(data.shape[0]):
            for at in range(0, data.shape[2], 97):  # blocks of rows, as extraction hands them
                stream.write(layer, data[layer, :, at : at + 97])
            stream.end_layer(layer)
        stream.close()


def _values(rng: np.random.Generator, shape: tuple[int, ...], codec_id: str) -> np.ndarray:
    """Codes of ``codec_id``'s dtype, with runs of zeros (chunks of zeros are never written)."""
    dtype = np.dtype(CODECS[codec_id].dtype)
    if dtype.kind == "u":
        data = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    else:
        data = rng.random(shape).astype(dtype)
    flat = data.reshape(-1)
    for _ in range(int(rng.integers(0, 3))):
        a = int(rng.integers(0, flat.size))
        flat[a : a + int(rng.integers(0, flat.size))] = 0
    return data


@st.composite
def _index(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """A basic selection: per axis an integer (maybe negative) or a slice (maybe a step)."""
    key: list[Any] = []
    for n in shape:
        if draw(st.booleans()):
            key.append(draw(st.integers(-n, n - 1)))
        else:
            a = draw(st.none() | st.integers(-n - 2, n + 2))
            b = draw(st.none() | st.integers(-n - 2, n + 2))
            key.append(slice(a, b, draw(st.sampled_from([None, 1, 1, 2, 3]))))
    return tuple(key)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writer=st.sampled_from(WRITERS),
    codec_id=st.sampled_from(sorted(CODECS)),
    chunk=st.sampled_from([5, 64, 1000, segments.CHUNK]),
    layers=st.integers(1, 3),
    heads=st.integers(1, 3),
    length=st.integers(1, 2500),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_reads_what_zarr_reads(
    writer: str,
    codec_id: str,
    chunk: int,
    layers: int,
    heads: int,
    length: int,
    seed: int,
    data: st.DataObject,
) -> None:
    """Random arrays of every writer and codec, read back through both readers, slice by slice."""
    rng = np.random.default_rng(seed)
    shape = (layers, heads, 2, length) if writer == "overviews" else (layers, heads, length)
    values = _values(rng, shape, codec_id)
    with _chunk(chunk), tempfile.TemporaryDirectory() as root:
        storage = LocalStorage(root)
        _write(storage, "a", writer, values, codec_id)
        ours = open_sharded(storage, "a")
        assert isinstance(ours, ShardedArray), "an array attnstore wrote must be read without zarr"
        theirs = zarr.open_array(store=storage.zarr_store("a", read_only=True), mode="r")
        assert ours.shape == theirs.shape
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours[...], theirs[...])
        for _ in range(5):
            key = data.draw(_index(theirs.shape))
            got, want = ours[key], theirs[key]
            assert (got.shape, got.dtype) == (want.shape, want.dtype), key
            np.testing.assert_array_equal(got, want)


def test_several_full_size_chunks_and_a_partial_one(tmp_path: Path) -> None:
    """The real chunk size: a head of 2.5 chunks, read whole, across a chunk edge and in the last."""
    rng = np.random.default_rng(1)
    values = _values(rng, (2, 3, 2 * segments.CHUNK + 12_345), "fixed16")
    storage = LocalStorage(tmp_path)
    _write(storage, "a", "segment", values, "fixed16")
    ours = open_sharded(storage, "a")
    assert ours is not None
    edge = segments.CHUNK
    for key in [(1, 2, slice(None)), (0, 1, slice(edge - 10, edge + 10)), (1, 0, slice(-50, None)),
                (slice(None), slice(None), slice(edge * 2, edge * 2 + 3))]:  # fmt: skip
        np.testing.assert_array_equal(ours[key], values[key])


# -- stores, both read paths ----------------------------------------------------------------------
@pytest.fixture(params=["shards", "zarr"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Reads through this module's reader, or (``zarr``) with it turned off."""
    if request.param == "zarr":
        monkeypatch.setattr(matrices, "open_sharded", lambda storage, rel: None)
    return str(request.param)


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_golden_stores_read_identically(version: str, read_path: str) -> None:
    store = attnstore.open(str(GOLDEN / f"{version}.attn"))
    expected = np.load(GOLDEN / f"{version}.expected.npz", allow_pickle=True)
    for key in (k for k in expected.files if k.startswith("matrix_")):
        d = int(key.removeprefix("matrix_"))
        np.testing.assert_array_equal(store.matrices(d), expected[key])
        layer, head = store.manifest["layers"][-1], store.manifest["heads"][-1]
        np.testing.assert_array_equal(store.matrix(d, layer, head, rows=slice(2, 5)),
                                      expected[key][-1, -1, 2:5])  # fmt: skip
    for key in (k for k in expected.files if k.startswith("overview_")):
        _, kind, d = key.split("_")
        got = store.overview(int(d), store.manifest["layers"][0], store.manifest["heads"][1], kind)
        np.testing.assert_array_equal(got, expected[key][0, 1])
    arrays = [store._array(s) for s in {store._location(int(k[7:])).segment
                                         for k in expected.files if k.startswith("matrix_")}]  # fmt: skip
    assert all(isinstance(a, ShardedArray) == (read_path == "shards") for a in arrays)


def test_every_golden_array_is_in_the_subset() -> None:
    """Every array of the 2.x golden stores is read here, and equals zarr's read of it."""
    for version in ("v2.0", "v2.1"):
        root = GOLDEN / f"{version}.attn"
        storage = LocalStorage(root)
        for meta in root.rglob("zarr.json"):
            rel = meta.parent.relative_to(root).as_posix()
            ours = open_sharded(storage, rel)
            assert ours is not None, rel
            theirs = zarr.open_array(store=storage.zarr_store(rel, read_only=True), mode="r")
            np.testing.assert_array_equal(ours[...], theirs[...])


# -- damage --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_store(tmp_path_factory.mktemp("shards") / "s.attn", n_docs=2)


def _store_copy(clean: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the synthetic store and the path (from its root) of its segment's shard."""
    out = tmp_path / "s.attn"
    shutil.copytree(clean, out)
    store = attnstore.open(str(out))
    segment = store._location(0).segment
    return out, f"segments/{segment}/c/0/0/0"


def _index_table(data: bytes, n: int) -> np.ndarray:
    return np.frombuffer(data[-(16 * n + 4) : -4], "<u8").reshape(n, 2).copy()


def _with_index(body: bytes, table: np.ndarray) -> bytes:
    index = table.astype("<u8").tobytes()
    return body + index + np.array([google_crc32c.value(index)], "<u4").tobytes()


def _n_chunks(store: Path, shard: str) -> int:
    meta = json.loads((store / shard.rsplit("/c/", 1)[0] / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return int(np.prod([o // c for o, c in zip(outer, sharding["chunk_shape"], strict=True)]))


def _flip_chunk(store: Path, shard: str) -> str:
    f = store / shard
    data = bytearray(f.read_bytes())
    offset, nbytes = _index_table(bytes(data), _n_chunks(store, shard))[0]
    data[int(offset) + int(nbytes) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return r"chunk \(0, 0, 0\).*crc32c"


def _flip_index(store: Path, shard: str) -> str:
    f = store / shard
    data = bytearray(f.read_bytes())
    data[-8] ^= 0x01
    f.write_bytes(bytes(data))
    return r"the shard index's crc32c"


def _truncate(store: Path, shard: str) -> str:
    f = store / shard
    f.write_bytes(f.read_bytes()[:100])
    return r"100 bytes, shorter than its shard index"


def _cut_body(store: Path, shard: str) -> str:
    """A consistent index pointing past the chunks kept: bytes missing from the middle."""
    f = store / shard
    data = f.read_bytes()
    n = _n_chunks(store, shard)
    table = _index_table(data, n)
    offset, nbytes = (int(x) for x in table[0])
    f.write_bytes(_with_index(data[: offset + nbytes - 1], table))  # chunk 0 lacks its last byte
    return r"the index places it at bytes .* within the"


def _replace_first_chunk(store: Path, shard: str, values: np.ndarray) -> None:
    """The shard's first chunk replaced by a valid Blosc frame of ``values``, checksums right."""
    f = store / shard
    data = f.read_bytes()
    table = _index_table(data, _n_chunks(store, shard))
    chunks = [data[o : o + b] for o, b in table.tolist()]
    frame = numcodecs.Blosc("zstd", 5, numcodecs.Blosc.SHUFFLE).encode(values)
    chunks[0] = frame + np.array([google_crc32c.value(frame)], "<u4").tobytes()
    offset = 0
    for i, c in enumerate(chunks):
        table[i] = (offset, len(c))
        offset += len(c)
    f.write_bytes(_with_index(b"".join(chunks), table))


def _bomb(store: Path, shard: str) -> str:
    """A frame of 64 MiB of zeros for a chunk of 128 KiB."""
    _replace_first_chunk(store, shard, np.zeros(32 << 20, np.uint16))
    return r"chunk \(0, 0, 0\): A Blosc chunk declares 67,108,864 decoded bytes"


def _short_frame(store: Path, shard: str) -> str:
    """A frame of fewer values than a chunk holds."""
    _replace_first_chunk(store, shard, np.ones(10, np.uint16))
    return r"decoded to 20 bytes, expected"


DAMAGE = {
    "flipped chunk byte": _flip_chunk,
    "flipped index byte": _flip_index,
    "truncated shard": _truncate,
    "index past the object": _cut_body,
    "decompression bomb": _bomb,
    "frame shorter than a chunk": _short_frame,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_refused_naming_the_file(
    clean: Path, tmp_path: Path, damage: str, read_path: str
) -> None:
    """Each damage fails the read: a DamagedStoreError naming the shard here, a ValueError (the
    class zarr raises, which DamagedStoreError is too) through zarr."""
    store, shard = _store_copy(clean, tmp_path)
    message = DAMAGE[damage](store, shard)
    reader = attnstore.open(str(store))
    with pytest.raises(ValueError) as caught:
        reader.matrix(0, 0, 0)
    if read_path == "shards":
        assert isinstance(caught.value, DamagedStoreError), caught.value
        assert shard in str(caught.value), caught.value
        assert caught.match(message)
    if damage == "decompression bomb":  # refused before decoding on both paths
        assert isinstance(caught.value, DecompressionBombError), caught.value


def test_a_missing_shard_reads_as_the_fill_value(
    clean: Path, tmp_path: Path, read_path: str
) -> None:
    """As in zarr: a shard never written holds the fill value (``attnstore verify`` reports it)."""
    store, shard = _store_copy(clean, tmp_path)
    (store / shard).unlink()
    assert not attnstore.open(str(store)).matrix(0, 0, 0).any()


# -- everything else is zarr's -------------------------------------------------------------------
def _golden_meta() -> dict[str, Any]:
    root = GOLDEN / "v2.1.attn" / "segments"
    return json.loads(next(root.rglob("zarr.json")).read_text())  # type: ignore[no-any-return]


def _sharding(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["codecs"][0]["configuration"]  # type: ignore[no-any-return]


VARIANTS: dict[str, Any] = {
    "zarr_format 2": lambda m: m.update(zarr_format=2),
    "a group": lambda m: m.update(node_type="group"),
    "storage transformers": lambda m: m.update(storage_transformers=[{"name": "x"}]),
    "int64": lambda m: m.update(data_type="int64"),
    "a fill value string": lambda m: m.update(fill_value="NaN"),
    "a bool fill value": lambda m: m.update(fill_value=True),
    "a negative fill value": lambda m: m.update(fill_value=-1),
    "a fill value too big": lambda m: m.update(fill_value=70_000),
    "a bool in the shape": lambda m: m["shape"].__setitem__(0, True),
    "another grid": lambda m: m["chunk_grid"].update(name="rectangular"),
    "separator .": lambda m: m["chunk_key_encoding"]["configuration"].update(separator="."),
    "v2 keys": lambda m: m["chunk_key_encoding"].update(name="v2"),
    "two codecs": lambda m: m["codecs"].append({"name": "crc32c"}),
    "no sharding": lambda m: m.update(codecs=_sharding(m)["codecs"]),
    "no chunk crc": lambda m: _sharding(m)["codecs"].pop(),
    "zstd for blosc": lambda m: _sharding(m)["codecs"].__setitem__(1, {"name": "zstd"}),
    "big endian": lambda m: _sharding(m)["codecs"][0]["configuration"].update(endian="big"),
    "an extra codec": lambda m: _sharding(m)["codecs"].insert(0, {"name": "transpose"}),
    "no index crc": lambda m: _sharding(m)["index_codecs"].pop(),
    "index at the start": lambda m: _sharding(m).update(index_location="start"),
    "an inner chunk not dividing": lambda m: _sharding(m)["chunk_shape"].__setitem__(2, 1000),
    "an unknown field": lambda m: m.update(must_understand={"x": 1}),
    "an unknown sharding field": lambda m: _sharding(m).update(extra=1),
    "a crc32c setting": lambda m: _sharding(m)["codecs"][2].update(configuration={"x": 1}),
}


def test_what_attnstore_writes_is_in_the_subset() -> None:
    layout = layout_of(_golden_meta())
    assert layout is not None
    assert (layout.shard, layout.chunk, layout.per_shard) == (
        (2, 4, 65536),
        (1, 1, 65536),
        (2, 4, 1),
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_metadata_outside_the_subset_is_left_to_zarr(variant: str) -> None:
    meta = copy.deepcopy(_golden_meta())
    VARIANTS[variant](meta)
    assert layout_of(meta) is None


def test_another_codec_list_reads_through_zarr(clean: Path, tmp_path: Path) -> None:
    """A segment rewritten with codecs attnstore does not write (zstd, no checksums): zarr reads
    it, and the matrices are the same."""
    store, shard = _store_copy(clean, tmp_path)
    before = attnstore.open(str(store))
    want = [before.matrix(d, 0, h) for d in (0, 1) for h in before.manifest["heads"]]
    rel = shard.rsplit("/c/", 1)[0]
    old = zarr.open_array(store / rel, mode="r")
    values, attributes = old[...], dict(old.attrs)
    shutil.rmtree(store / rel)
    arr = zarr.create_array(store=str(store / rel), shape=values.shape, dtype=values.dtype,
                            chunks=(1, 1, 64), shards=(1, values.shape[1], 128),
                            compressors=[zarr.codecs.ZstdCodec()], fill_value=0,
                            attributes=attributes, zarr_format=3)  # fmt: skip
    arr[...] = values
    assert open_sharded(LocalStorage(store), rel) is None
    after = attnstore.open(str(store))
    got = [after.matrix(d, 0, h) for d in (0, 1) for h in after.manifest["heads"]]
    assert isinstance(after._array(rel.removeprefix("segments/")), zarr.Array)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_a_storage_without_ranges_reads_through_zarr(tmp_path: Path) -> None:
    class Plain:  # a storage of whole files only
        def __init__(self, inner: LocalStorage) -> None:
            self.inner = inner

        def read_bytes(self, rel: str) -> bytes:
            return self.inner.read_bytes(rel)

    storage = LocalStorage(tmp_path)
    _write(storage, "a", "segment", np.ones((1, 1, 10), np.uint16), "fixed16")
    assert open_sharded(storage, "a") is not None
    assert open_sharded(Plain(storage), "a") is None


def test_a_missing_or_broken_zarr_json_is_left_to_zarr(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert open_sharded(storage, "nothing") is None
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "zarr.json").write_text("{")
    assert open_sharded(storage, "a") is None


def test_indexing_like_numpy(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    values = np.arange(2 * 3 * 40, dtype=np.uint16).reshape(2, 3, 40)
    _write(storage, "a", "segment", values, "fixed16")
    arr = open_sharded(storage, "a")
    assert arr is not None
    np.testing.assert_array_equal(arr[1], values[1])
    np.testing.assert_array_equal(arr[..., 5], values[..., 5])
    np.testing.assert_array_equal(arr[0, ...], values[0, ...])
    np.testing.assert_array_equal(arr[-1, -2, 3:-3:4], values[-1, -2, 3:-3:4])
    assert arr[0, 0, 30:10].shape == (0,)
    with pytest.raises(IndexError):
        arr[2, 0, 0]
    with pytest.raises(IndexError):
        arr[0, 0, ::-1]
    with pytest.raises(IndexError):
        arr[0, 0, 0, 0]
    with pytest.raises(IndexError):
        arr[[0, 1]]


# -- object storage -----------------------------------------------------------------------------
def _child_read(storage: ObjectStorage) -> list[int]:
    arr = open_sharded(storage, "segments/a")
    assert arr is not None
    return arr[1, 2, 70_000:70_005].tolist()  # type: ignore[no-any-return]


def test_object_storage_reads_ranges(s3: str, s3_server: Any) -> None:
    """On S3: zarr.json, the shard index (a suffix range) and the chunks (one coalesced range);
    in a forked child (obstore does not survive a fork) the same through pyarrow."""
    storage = ObjectStorage(f"{s3}/z.attn")
    values = np.random.default_rng(2).integers(0, 52_000, (2, 3, 1 << 17)).astype(np.uint16)
    _write(storage, "segments/a", "segment", values, "fixed16")
    size = dict(storage.walk("segments/a"))["segments/a/c/0/0/0"]
    s3_server.take_requests()
    arr = open_sharded(ObjectStorage(f"{s3}/z.attn"), "segments/a")
    assert arr is not None
    np.testing.assert_array_equal(arr[1, 2, 70_000:80_000], values[1, 2, 70_000:80_000])
    requests = s3_server.take_requests()
    assert [r.method for r in requests] == ["GET"] * 3, requests
    assert requests[0].path.endswith("/segments/a/zarr.json")
    assert str(requests[1].range).startswith("bytes=-"), requests[1]
    assert requests[2].range, requests[2]
    assert sum(r.bytes_out for r in requests[1:]) < size / 5  # one chunk of 12, its index
    np.testing.assert_array_equal(arr[1], values[1])  # chunks apart: ranges closer than 1 MiB are
    assert len(s3_server.take_requests()) == 2  # fetched by one GET (obstore coalesces them)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_child_read, (storage,)) == values[1, 2, 70_000:70_005].tolist()
    assert storage.read_tail("segments/a/zarr.json", 10**9)[0] == len(
        storage.read_bytes("segments/a/zarr.json")
    )
    with pytest.raises(FileNotFoundError):
        storage.read_tail("segments/a/c/9/9/9", 10)
