"""Exports of selected matrices for tools that do not know attnstore (HDF5 via h5py, or NumPy .npz).

Layout (the same names in both formats; ``N`` selected heads; documented in ``schemas/export.md``):

- ``packed``: float32 ``[Σ T_i (T_i + 1) / 2]``, the decoded packed lower triangles back to back
  (row-major, row ``q`` holds keys ``0 … q``);
- ``token_ids``: int32, each selected document's tokens once, back to back;
- ``tokens``: UTF-8 strings, the same tokens as readable text (``tokens.text``: the characters each
  token covers, byte pieces of one character marked ``注[1/3]``), so axes can be labelled without the
  tokenizer;
- ``index/<column>``: ``[N]`` arrays ``doc_id, layer, head, n_tokens, offset`` (into ``packed``),
  ``token_offset`` (into ``token_ids``) and every score column (float64, NaN where NULL);
- metadata: ``format = "attnstore-export"``, ``version``, ``model``, ``codec`` (JSON), ``max_abs_error``.
  HDF5 keeps them as root attributes and ``index`` as a group; ``.npz`` names the arrays
  ``index/<column>`` and stores the metadata as a JSON string under ``meta``.

HDF5 datasets are chunked and compressed (gzip + shuffle), and written matrix by matrix, so an export
never holds more than one matrix in memory (``.npz`` holds the whole selection).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore.errors import AttnStoreError
from attnstore.packing import packed_size
from attnstore.scores import SCORE_COLUMNS
from attnstore.store import Store

if TYPE_CHECKING:
    from attnstore.storage import Location

__all__ = ["EXPORT_VERSION", "export"]

#: 1.1 added ``tokens`` (readable token text).
EXPORT_VERSION: Final = "1.1"
FORMATS: Final = ("hdf5", "npz")


def _selection(store: Store, where: str | None) -> dict[str, np.ndarray]:
    sql = f"SELECT doc_id, layer, head, n_tokens, {', '.join(SCORE_COLUMNS)} FROM heads"
    if where:
        sql += f" WHERE {where}"
    table = store.sql(sql + " ORDER BY doc_id, layer, head")
    if table.num_rows == 0:
        raise AttnStoreError(f"The selection {where!r} matches no heads; nothing to export.")
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    for c in SCORE_COLUMNS:
        cols[c] = cols[c].astype(np.float64)  # NULL → NaN
    sizes = np.array([packed_size(int(n), store.packing) for n in cols["n_tokens"]], dtype=np.int64)
    cols["offset"] = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64) if len(sizes) else sizes
    docs, first = np.unique(cols["doc_id"], return_index=True)
    doc_len = cols["n_tokens"][first].astype(np.int64)
    doc_start = dict(zip(docs.tolist(), np.r_[0, np.cumsum(doc_len)[:-1]].tolist(), strict=True))
    cols["token_offset"] = np.array([doc_start[d] for d in cols["doc_id"].tolist()], dtype=np.int64)
    return cols


def _token_text(store: Store, docs: list[int]) -> list[str]:
    """Each selected document's tokens as readable text (``tokens.text``, else the raw piece), in
    the order of ``token_ids``."""
    out: list[str] = []
    for doc_id in docs:
        rows = store.sql(
            "SELECT coalesce(text, token, '') AS t FROM tokens WHERE doc_id = ? ORDER BY pos",
            [doc_id],
        )
        out.extend(str(t) for t in rows.column("t").to_pylist())
    return out


def export(
    store: Location | Store,
    out: str | os.PathLike[str],
    *,
    where: str | None = None,
    fmt: str | None = None,
) -> dict[str, Any]:
    """Write the heads selected by ``where`` (SQL over ``heads``) with their matrices to ``out``.

    ``fmt`` is ``"hdf5"`` or ``"npz"``; by default it follows the file suffix (``.h5``/``.hdf5``/``.npz``).
    Returns a summary (items, bytes).
    """
    path = Path(out)
    if fmt is None:
        fmt = (
            "npz" if path.suffix == ".npz" else "hdf5" if path.suffix in (".h5", ".hdf5") else None
        )
    if fmt not in FORMATS:
        raise AttnStoreError(
            f"Expected --format hdf5 or npz (or an .h5/.npz file name). Got {fmt!r}."
        )
    st = store if isinstance(store, Store) else Store(store)
    sel = _selection(st, where)
    n = len(sel["doc_id"])
    meta = {
        "format": "attnstore-export",
        "version": EXPORT_VERSION,
        "model": st.manifest["model"]["id"],
        "codec": json.dumps(st.codec.get_config()),
        "max_abs_error": st.codec.max_abs_error,
        "packing": st.packing,  # "full-rowmajor": an encoder's whole squares
    }
    docs = sorted(set(sel["doc_id"].tolist()))
    token_ids = np.concatenate([st.token_ids(d) for d in docs]).astype(np.int32)
    tokens = _token_text(st, docs)
    if len(tokens) != len(token_ids):  # pragma: no cover - tokens and token_ids are one read
        raise AttnStoreError("The tokens table disagrees with the token ids; run attnstore verify.")
    total = int(sel["offset"][-1]) + packed_size(int(sel["n_tokens"][-1]), st.packing)
    items = zip(*(sel[c].tolist() for c in ("doc_id", "layer", "head", "offset")), strict=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if fmt == "hdf5":
        import h5py

        with h5py.File(tmp, "w") as f:
            f.attrs.update(meta)
            packed = f.create_dataset(
                "packed", shape=(total,), dtype="float32", chunks=(min(total, 1 << 16),),
                compression="gzip", compression_opts=4, shuffle=True,
            )  # fmt: skip
            for doc_id, layer, head, offset in items:
                values = st.packed(doc_id, layer, head)
                packed[offset : offset + len(values)] = values
            f.create_dataset("token_ids", data=token_ids, compression="gzip", shuffle=True)
            f.create_dataset(
                "tokens", data=tokens, dtype=h5py.string_dtype("utf-8"), compression="gzip"
            )
            group = f.create_group("index")
            for key, values in sel.items():
                group.create_dataset(key, data=values)
    else:
        buf = np.zeros(total, dtype=np.float32)
        for doc_id, layer, head, offset in items:
            values = st.packed(doc_id, layer, head)
            buf[offset : offset + len(values)] = values
        arrays: dict[str, Any] = {f"index/{k}": v for k, v in sel.items()}
        arrays.update(
            packed=buf, token_ids=token_ids, tokens=np.array(tokens, dtype=np.str_),
            meta=np.array(json.dumps(meta)),
        )  # fmt: skip
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)
    return {
        "path": str(path),
        "format": fmt,
        "items": n,
        "documents": len(docs),
        "bytes": path.stat().st_size,
    }
