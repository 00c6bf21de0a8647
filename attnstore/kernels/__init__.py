"""Compiled loops for the census's hot path, built at first use; the torch code is their reference.

The census pass (:func:`attnstore.scores.online_layer_scores`) visits every (query, key) element
below the diagonal once per layer and head. In torch each tile costs ~15 separate passes over
memory (``exp``, a clamp, a max, sums, the sparsity table's column, diagonal and window masses,
each row's span search), and their count, not the arithmetic, is what made a census cost 3× the
forward pass on a CPU. ``census.c`` does all of it in one loop per row: it is compiled with the
system's C compiler (``$CC`` or ``cc``) the first time it is needed and cached under
``$ATTNSTORE_CACHE`` (default ``~/.cache/attnstore/kernels``), keyed by the source, the compiler
flags and the CPU, and loaded with :mod:`ctypes` (no Python headers, no torch extension build:
under a second to compile). Where no compiler works, or ``ATTNSTORE_KERNELS=off`` is set, it is
not used and the torch path runs: same results within float32 rounding, about twice the CPU time.

The loop runs on the calling thread; the census pass around it runs torch on one thread too
(:func:`attnstore.scores.online_layer_scores`: an idle OpenMP worker would spin beside it).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

__all__ = ["BlockState", "CensusKernel", "LayerMasses", "census_kernel", "disabled"]

_SOURCE: Final = Path(__file__).with_name("census.c")
#: compiler flag sets, tried in order (the first that builds is kept)
_FLAGS: Final = (
    (
        "-O3",
        "-march=native",
        "-mprefer-vector-width=256",  # 512-bit vectors measured ~20% slower (2-core x86-64 box)
        "-fopenmp-simd",
        "-fno-math-errno",
        "-fno-trapping-math",
    ),
    ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"),
    ("-O2",),
)

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def disabled() -> bool:
    """Whether ``ATTNSTORE_KERNELS=off`` (or ``0``/``false``) turns the compiled loops off."""
    return os.environ.get("ATTNSTORE_KERNELS", "").strip().lower() in ("off", "0", "false", "no")


def _cache_dir() -> Path:
    base = os.environ.get("ATTNSTORE_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "attnstore" / "kernels"


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    wanted = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted))) or platform.platform()


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> bool:
    """Build ``target`` from ``source``; False where the compiler is missing or refuses."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError:
        return False
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, "-shared", "-fPIC", "-std=c99", "-o", tmp, str(source), "-lm"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        os.replace(tmp, target)  # atomic: a concurrent build never loads half a file
    except (OSError, subprocess.SubprocessError):
        Path(tmp).unlink(missing_ok=True)
        return False
    return True


def _build(source: Path) -> ctypes.CDLL | None:
    """Compile ``source`` into a cached shared library and load it; None where that fails."""
    compiler = os.environ.get("CC", "cc")
    code = source.read_bytes()
    for flags in _FLAGS:
        key = hashlib.sha256(
            b"\0".join([code, compiler.encode(), " ".join(flags).encode(), _cpu_tag().encode()])
        ).hexdigest()[:20]
        target = _cache_dir() / f"{source.stem}-{key}.so"
        if not target.exists() and not _compile(compiler, flags, source, target):
            continue
        try:
            return ctypes.CDLL(str(target))
        except OSError:
            continue
    return None


class CensusKernel:
    """``census.c``'s ``census_tile`` (one thread: a tile is under a millisecond of work, less
    than handing parts of it to other threads costs)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        fn = lib.census_tile
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i64, i64, i64,
                       ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                       i64, ptr, ptr, i64, ptr, ptr]  # fmt: skip
        fn.restype = None
        self._fn = fn
        pairs = lib.census_pairs
        pairs.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr]
        pairs.restype = i64
        self._pairs = pairs

    def block(
        self, n: int, r: int, levels: tuple[float, ...], layer: LayerMasses | None = None,
        lse: torch.Tensor | None = None,
    ) -> BlockState:  # fmt: skip
        """Fresh row state for a block of ``r`` rows of ``n`` (document, head) slices with their
        log-sum-exp ``lse`` (``[n, r]``; None: 0, the tiles hold ``s − lse``); its tiles' column
        and diagonal masses are added to ``layer`` when given."""
        return BlockState(n, r, levels, layer, lse)

    def tile(
        self, z: torch.Tensor, heads: int, lengths: torch.Tensor, q0: int, k0: int,
        q_min: int, state: BlockState,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Run the pass over ``z`` (float32 ``[N, R, K]``, contiguous, CPU), overwriting it with
        the weights and adding its part to ``state``; ``lengths``: int64 ``[N // heads]``.
        Returns the tile's column masses ``[N, K]`` and diagonal masses ``[N, R + K - 1]``
        (float32, buffers reused by the next call): see ``census.c``."""
        import torch

        n, r, k = z.shape
        if not (z.is_contiguous() and z.dtype == torch.float32 and z.device.type == "cpu"):
            raise ValueError("census_tile needs a contiguous float32 CPU tile")
        if (n, r) != state.shape:
            raise ValueError(f"census_tile: a tile of {n}×{r} rows for a block of {state.shape}")
        if not (lengths.is_contiguous() and lengths.dtype == torch.int64
                and len(lengths) * heads == n):  # fmt: skip
            raise ValueError(f"census_tile needs int64 lengths [{n // max(heads, 1)}]")
        col, diag = state.buffers(k)
        f64, step = state.rows.data_ptr(), n * r * 8
        self._fn(
            z.data_ptr(), state.lse.data_ptr(), n, r, k, heads, lengths.data_ptr(), q0, k0, q_min,
            f64, f64 + step, f64 + 2 * step, state.zmax.data_ptr(),
            *(f64 + j * step for j in range(3, len(ROWS))), col.data_ptr(), diag.data_ptr(),
            len(state.levels), state.level_values.data_ptr(), state.span.data_ptr(),
            0 if state.layer is None else state.layer.length,
            None if state.layer is None else state.layer.columns.data_ptr(),
            None if state.layer is None else state.layer.diagonals.data_ptr(),
        )  # fmt: skip
        return col, diag

    def pairs(
        self, p: torch.Tensor, k0: int, at: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        lo: int, hi: int, sets: torch.Tensor,
    ) -> None:  # fmt: skip
        """Add to ``sets`` (float32 ``[doc, R, head]``, contiguous) the weights of tile ``p``
        (``[doc, head, R, K]``, keys ``k0 …``, contiguous) at pairs ``lo … hi − 1`` of ``at``
        (int64 document, row and key, contiguous), for every head."""
        import torch

        b, h, r, k = p.shape
        doc, row, key = at
        if not (p.is_contiguous() and p.dtype == torch.float32 and sets.is_contiguous()
                and sets.dtype == torch.float32 and tuple(sets.shape) == (b, r, h)):  # fmt: skip
            raise ValueError("census_pairs needs a contiguous float32 tile and sets [doc, R, head]")
        if not (0 <= lo <= hi <= min(len(doc), len(row), len(key))) or any(
            x.dtype != torch.int64 or not x.is_contiguous() for x in at
        ):
            raise ValueError(f"census_pairs: pairs {lo}…{hi} of int64 arrays of {len(doc)}")
        bad = self._pairs(
            p.data_ptr(), b, r, k, h, k0, doc.data_ptr(), row.data_ptr(), key.data_ptr(),
            lo, hi, sets.data_ptr(),
        )  # fmt: skip
        if bad:
            raise ValueError(f"census_pairs: {bad} pairs outside the tile (keys {k0}…{k0 + k - 1})")


#: span levels one block can search (``MAX_LEVELS`` in census.c)
MAX_LEVELS: Final = 8
#: the float64 row sums of :class:`BlockState`, in ``census_tile``'s argument order (``zmax``,
#: float32, comes between ``pz`` and ``loc``)
ROWS: Final = ("l", "pk", "pz", "loc", "rec", "mass", "prev", "self", "sink", "sink4", "early")


class LayerMasses:
    """A layer's column and diagonal masses, float64 ``[N, T]`` (``diagonals[n, d]``: Σ over rows
    of the weight at offset ``d = q − k``), summed over every tile of the layer."""

    def __init__(self, n: int, length: int) -> None:
        import torch

        self.length = length
        self.columns = torch.zeros((n, length), dtype=torch.float64)
        self.diagonals = torch.zeros((n, length), dtype=torch.float64)


class BlockState:
    """A block's row state for :meth:`CensusKernel.tile` (flat rows ``[N, R]``): the float64 sums
    of :data:`ROWS` (``state["l"]``), float32 ``zmax``, and per span level the found offset
    ``span`` (int64 ``[levels, N, R]``, −1: not yet)."""

    def __init__(
        self, n: int, r: int, levels: tuple[float, ...], layer: LayerMasses | None = None,
        lse: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        import torch

        if layer is not None and layer.columns.shape[0] != n:
            raise ValueError(f"a block of {n} slices for a layer of {layer.columns.shape[0]}")
        if len(levels) > MAX_LEVELS:
            raise ValueError(f"at most {MAX_LEVELS} span levels; got {len(levels)}")
        if lse is None:
            lse = torch.zeros((n, r), dtype=torch.float32)
        if lse.shape != (n, r):
            raise ValueError(f"lse of a block of {n}×{r} rows has shape {tuple(lse.shape)}")
        self.lse = lse.to(torch.float32).contiguous()
        self.layer = layer
        self.shape = (n, r)
        self.levels = levels
        self.level_values = torch.tensor(levels or (0.0,), dtype=torch.float64)
        self.rows = torch.zeros((len(ROWS), n, r), dtype=torch.float64)
        self.zmax = torch.full((n, r), -math.inf, dtype=torch.float32)
        self.span = torch.full((max(len(levels), 1), n, r), -1, dtype=torch.int64)
        self._col: torch.Tensor | None = None
        self._diag: torch.Tensor | None = None

    def buffers(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        n, r = self.shape
        if self._col is None or self._col.shape[1] != k:
            self._col = torch.empty((n, k), dtype=torch.float32)
            self._diag = torch.empty((n, r + k - 1), dtype=torch.float32)
        assert self._diag is not None
        return self._col, self._diag

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.rows[ROWS.index(name)]


def census_kernel() -> CensusKernel | None:
    """The compiled census pass for this process (built on first call), or None: turned off
    (``ATTNSTORE_KERNELS=off``), not on CPython, or no working C compiler."""
    if disabled() or sys.implementation.name != "cpython":
        return None
    with _lock:
        if "census" not in _loaded:
            lib = _build(_SOURCE)
            _loaded["census"] = None if lib is None else CensusKernel(lib)
        kernel: CensusKernel | None = _loaded["census"]
        return kernel
