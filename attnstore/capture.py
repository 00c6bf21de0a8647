"""Running a transformers model over documents and capturing every layer's attention.

(Named capture, not extract, so that ``attnstore.extract`` stays the function.)

This is the only module that imports transformers. Fused attention kernels (sdpa, flash) never build
the probability matrix, so attnstore routes every attention layer through its own attention function
(registered with transformers' ``AttentionInterface`` as ``"attnstore"``). It computes the
probabilities in float32 from the layer's queries and keys (after rotary embedding), hands them to a
consumer *one layer at a time* (packing, quantisation and scoring happen right there, so no more than
one layer's attention is alive), and returns ``probs @ value`` exactly as eager attention does.

Pitfall handled here: a newly registered attention function receives ``attention_mask=None`` (padding
silently ignored) unless a mask builder is registered under the same name; attnstore registers
transformers' boolean sdpa mask builder with the causal-skip shortcut switched off.

Not every architecture routes through ``AttentionInterface`` (Bloom, MPT and Falcon keep their own
attention code, and transformers merely logs that it ignored the request). So the path that delivers
a model's attention (:data:`PATHS`) is chosen by running a small padded batch when the
:class:`Extractor` is built, and checked again for every batch before anything is handed on:

``"function"``
    attnstore's attention function, one layer at a time (above); every stored layer must have been
    routed through it exactly once.
``"recompute"``
    forward hooks on attention modules that attnstore has a recipe for (Falcon, whose
    ``output_attentions`` are wrong: with its default sdpa attention it *adds* the boolean mask).
    The probabilities are recomputed in float32 from the layer's own query/key projection, rotary
    embedding or ALiBi bias and mask, and the layer's output is rebuilt from them and compared with
    the output the model computed; a mismatch refuses the model.
``"output_attentions"``
    transformers' eager attention with ``output_attentions=True`` (all layers alive at once;
    slower and bigger), with a warning.

Whatever the path, every block of rows is checked before it is encoded: no weight on future or
padding keys, rows of real tokens summing to 1 within the codec's bound, every row of every stored
layer delivered exactly once. A path that fails moves on to the next one; when none delivers, the
model is refused with :class:`~attnstore.errors.AttentionCaptureError` and nothing is written.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from attnstore import bidirectional_scores, needles, probes, scores, syntax
from attnstore.abc.analysis import Analysis, Batch
from attnstore.analyses.registry import DEFAULT, load
from attnstore.analyses.runner import AnalysisRunner, builtin_key
from attnstore.codecs import Codec
from attnstore.corpus import Document, InductionProbe
from attnstore.errors import AttentionCaptureError, ModelError
from attnstore.layout import ModelInfo, TokenizerInfo
from attnstore.modelref import DEFAULT_MODEL, resolve_model_id  # noqa: F401 - its old home
from attnstore.modelref import not_cached_message as _not_cached_message
from attnstore.modelref import resolve as _resolve
from attnstore.overview import OverviewPool
from attnstore.packing import packed_length
from attnstore.rows import DocRows, RowSelection
from attnstore.store import Segment
from attnstore.streaming import stream_bytes
from attnstore.syntax import Alignment

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_MODEL",
    "PATHS",
    "VALUES",
    "Extractor",
    "LoadedModel",
    "load_model",
    "prepare_model",
    "probe_documents",
]

_IMPL: Final = "attnstore"
#: how attention reaches attnstore, in the order they are tried (see the module docstring)
PATHS: Final = ("function", "recompute", "output_attentions")
#: what a store's matrices hold (``--values``): post-softmax probabilities or pre-softmax scores
VALUES: Final = ("probs", "logits")


class AttentionWarning(UserWarning):
    """Extraction falls back to a slower path."""


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
class _Capture:
    """Receives one layer's probabilities a block of query rows at a time.

    ``consume(layer, q0, probs)`` gets ``probs`` ``[doc, head, C, k_pos]`` (float32) for rows
    ``q0 … q0 + C``; ``done(layer)`` follows the last block of a layer. ``chunk_bytes`` bounds the
    size of one block, so no more than that much attention is alive at once, whatever T is.
    ``mode``: ``"eager"`` computes the layer output from the same probabilities (cheapest on a CPU);
    ``"sdpa"`` takes the output from PyTorch's fused kernel and recomputes the probabilities only for
    capture (fastest on a GPU).
    """

    def __init__(
        self,
        consume: Any,
        done: Any,
        *,
        mode: str = "eager",
        chunk_bytes: int = 1 << 28,
        online: Any = None,
    ) -> None:
        self.consume = consume
        self.done = done
        #: scores-only in sdpa mode: ``online(layer, query, key, allowed, scaling, softcap, lse)``
        #: gets the layer's queries and keys and computes scores without materialising attention
        #: (``allowed`` None: plain causal attention over a right-padded batch; ``lse`` the rows'
        #: log-sum-exp from the fused kernel, or None)
        self.online = online
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self.calls = 0
        #: how often each layer was routed through the attention function in this forward pass
        self.layer_calls: dict[int, int] = {}
        #: layers whose attention module is not causal (encoder self-attention)
        self.bidirectional: set[int] = set()
        #: ``--values logits``: consume also gets ``logits=`` (pre-softmax, masked −inf) and
        #: ``lse=`` (each row's log-sum-exp, the sink logit included) ``[doc, head, C]``
        self.want_logits = False


_ACTIVE: _Capture | None = None


def _right_padded(mask: torch.Tensor) -> bool:
    """A key mask ``[doc, 1, 1, k_pos]`` that keeps a prefix of every document (right padding)."""
    keys = mask.reshape(mask.shape[0], -1)
    return bool(keys[:, 0].all()) and bool((keys[:, 1:] <= keys[:, :-1]).all())


def _flash_cpu(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Causal attention through PyTorch's CPU flash kernel (what ``scaled_dot_product_attention``
    runs on CPU for a causal call without a mask), with each row's log-sum-exp ``[doc, head, q]``;
    ``(None, None)`` where this torch has no such kernel or it refuses the inputs."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or value.shape[-1] != query.shape[-1]:
        return None, None
    try:
        out, lse = op(query, key, value, 0.0, True, scale=scaling)
    except (RuntimeError, NotImplementedError):
        return None, None
    return out, lse.float()


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [doc, head, q_pos, d]
    key: torch.Tensor,  # [doc, kv_head, k_pos, d]
    value: torch.Tensor,  # [doc, kv_head, k_pos, d]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The layer's attention, its probabilities handed to the active capture a block of rows at a
    time.

    With plain causal attention over a right-padded batch (``attention_mask`` None or the key
    padding mask ``[doc, 1, 1, k_pos]`` of :func:`_mask`) no ``[T, T]`` mask exists: causality is
    position arithmetic (a block of rows ``q0 … q1`` computes keys ``0 … q1`` only, the upper
    triangle of its own diagonal square is filled with −inf) and sdpa runs with ``is_causal``.
    Memory beyond the model's own tensors: one block of ``chunk_bytes``; time O(B·H·T²·d/2). Any
    other mask (sliding window, custom) is combined with causality as a dense mask, as before.
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # GQA / MQA: each kv head serves n_rep consecutive query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    b, h, t_q, _ = query.shape
    t_k = key.shape[2]
    # transformers' own sdpa path reads ``module.is_causal`` the same way: False for encoder
    # self-attention (BERT family), whose rows see every real key of the document
    module_causal = getattr(module, "is_causal", True) is not False
    additive = None
    keys = None  # key padding mask [doc, 1, 1, k_pos] of the plain causal case; None: no padding
    allowed = None  # dense mask of any other case
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        additive = attention_mask[..., :t_k].float()
    elif attention_mask is not None and attention_mask.shape[-2] == 1:
        keys = attention_mask[..., :t_k]
    # learned sink logits (GPT-OSS ``sinks``, passed as ``s_aux``): one extra logit per head that
    # joins every row's softmax and is dropped after it, so rows sum to 1 − its mass
    sinks = kwargs.get("s_aux")
    cap = _ACTIVE
    # the fast causal path: plain causal attention, no sink logit, no raw scores to keep
    causal = (
        module_causal
        and t_q == t_k
        and sinks is None
        and not (cap is not None and cap.want_logits)
        and (attention_mask is None or (keys is not None and _right_padded(keys)))
    )
    if keys is not None and bool(keys.all()):
        keys = None
    if not causal:
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device)
        if module_causal:
            allowed = allowed.tril(t_k - t_q)
        allowed = allowed[None, None]
        if attention_mask is not None and additive is None:
            allowed = allowed & attention_mask[..., :t_k]
    # A row with no allowed key would be NaN and poison every later layer through 0·NaN; with right
    # padding and causal masks it cannot happen, but a custom mask might do it.
    empty_rows = allowed is not None and additive is None and bool((~allowed.any(-1)).any())
    mode = cap.mode if cap is not None else "eager"
    if softcap or additive is not None or sinks is not None:
        mode = "eager"  # sdpa has no soft-capping or sinks; float masks keep the reference path
    layer = getattr(module, "layer_idx", None)
    layer = (cap.calls if cap is not None else 0) if layer is None else int(layer)
    if cap is not None and not module_causal:
        cap.bidirectional.add(layer)
    out = None
    lse = None  # each row's log-sum-exp, when the fused kernel gives it (scores-only, CPU)
    online = cap is not None and cap.online is not None and mode == "sdpa" and causal
    if online and query.device.type == "cpu":
        # the kernel sdpa itself dispatches to on CPU, asked for its log-sum-exp too
        out, lse = _flash_cpu(query, key, value, scaling)
    if mode == "sdpa" and out is None:
        # is_causal: rows past a document's end see its padding, which no real row ever reads
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, is_causal=causal, scale=scaling
        )
        if empty_rows:
            out = torch.nan_to_num(out, nan=0.0)
    elif out is None:  # the value head size may differ from the query's (DeepSeek-V3's MLA)
        out = query.new_empty((b, h, t_q, value.shape[-1]))
    if cap is not None:
        cap.layer_calls[layer] = cap.layer_calls.get(layer, 0) + 1
    if online:
        assert cap is not None
        assert out is not None
        cap.online(layer, query, key, allowed, scaling, softcap, lse)
        cap.calls += 1
        return out.transpose(1, 2).contiguous(), None
    q_f, k_f = query.float(), key.float().transpose(-1, -2)
    chunk = t_q
    if cap is not None:
        chunk = max(1, min(t_q, cap.chunk_bytes // max(1, 4 * b * h * t_k)))
    for q0 in range(0, t_q, chunk):
        q1 = min(q0 + chunk, t_q)
        extra: dict[str, torch.Tensor] = {}
        if causal:  # keys 0 … q1 only; the diagonal square's upper triangle by arithmetic
            logits = torch.matmul(q_f[:, :, q0:q1], k_f[..., :q1]) * scaling
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            upper = torch.ones(q1 - q0, q1 - q0, dtype=torch.bool, device=query.device).triu_(1)
            logits[..., q0:q1].masked_fill_(upper, float("-inf"))
            if keys is not None:
                logits.masked_fill_(~keys[..., :q1], float("-inf"))
            part = logits.sub_(logits.amax(-1, keepdim=True)).exp_()  # softmax in place
            part.div_(part.sum(-1, keepdim=True))
            if mode == "eager":
                out[:, :, q0:q1] = torch.matmul(part.to(value.dtype), value[:, :, :q1])
            if cap is None:
                continue
            probs = part if q1 == t_k else part.new_zeros((b, h, q1 - q0, t_k))
            if q1 != t_k:
                probs[..., :q1] = part
        else:
            logits = torch.matmul(q_f[:, :, q0:q1], k_f) * scaling
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            if additive is not None:
                logits = logits + additive[..., q0:q1, :]
            if allowed is not None:
                logits = logits.masked_fill(~allowed[..., q0:q1, :], float("-inf"))
            sink = None
            if sinks is not None:
                column = sinks.float().reshape(1, -1, 1, 1).expand(b, h, q1 - q0, 1)
                both = torch.cat([logits, column], dim=-1)
                if cap is not None and cap.want_logits:
                    extra["lse"] = torch.logsumexp(both, dim=-1)
                both = torch.softmax(both, dim=-1)
                probs, sink = both[..., :-1], both[..., -1]
                extra["sink"] = sink  # the sink's mass per row [doc, head, C]: rows sum to 1 − sink
            else:
                if cap is not None and cap.want_logits:
                    extra["lse"] = torch.logsumexp(logits, dim=-1)
                probs = torch.softmax(logits, dim=-1)
            if empty_rows:
                probs = torch.nan_to_num(probs, nan=0.0)
            if mode == "eager":
                out[:, :, q0:q1] = torch.matmul(probs.to(value.dtype), value)
        if cap is not None:
            if cap.want_logits:
                extra["logits"] = logits
            cap.consume(layer, q0, probs, **extra)
    if cap is not None:
        cap.done(layer)
        cap.calls += 1
    return out.transpose(1, 2).contiguous(), None


class _RowCheck:
    """Checks each delivered block of probabilities before it is encoded: rows of real tokens
    summing to 1 within the codec's bound (``verify``'s rule), every row of every stored layer
    delivered exactly once, and (``masked=True``) no weight on future or padding keys and none
    negative. attnstore's own attention function masks future keys itself and receives the padding
    mask the same way for every batch, so that last, costlier check runs when a path is first used
    (the calibration batch is padded) and on every batch of the other paths."""

    def __init__(
        self, lengths: torch.Tensor, t_max: int, bound: float, *, masked: bool, causal: bool = True
    ) -> None:
        self.lengths = lengths
        self.t_max = t_max
        self.bound = bound
        self.masked = masked
        #: False for encoders: every real key is allowed, future ones included
        self.causal = causal
        self.rows: dict[int, int] = {}
        #: per block: layer, worst row-sum excess over the tolerance, worst masked weight
        self.worst: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(
        self, layer: int, q0: int, probs: torch.Tensor, sink: torch.Tensor | None = None
    ) -> None:
        """``sink``: the mass of a learned sink logit per row (``[doc, head, C]``), which the
        model drops after its softmax: the row must then sum to exactly 1 − ``sink``."""
        _, _, c, t_k = probs.shape
        dev = probs.device
        q = torch.arange(q0, q0 + c, device=dev)
        real = (q[None, :] < self.lengths[:, None])[:, None, :]  # [doc, 1, C]
        sums = probs.sum(-1)  # [doc, head, C]
        if sink is not None:
            sums = sums + sink.to(sums.dtype)
        width = (q + 1) if self.causal else torch.full_like(q, t_k)  # keys a row may weigh
        excess = (sums - 1.0).abs() - (1e-5 + width.to(probs.dtype) * self.bound)
        excess = torch.nan_to_num(excess, nan=float("inf")).masked_fill(~real, float("-inf"))
        wrong = torch.zeros((), device=dev)
        if self.masked:
            k = torch.arange(t_k, device=dev)
            allowed = k[None, None, :] < self.lengths[:, None, None]  # [doc, 1, key]
            if self.causal:
                allowed = allowed & (k[None, None, :] <= q[None, :, None])  # [doc, C, key]
            leak = probs.masked_fill(allowed[:, None], 0.0).sum(-1).masked_fill(~real, 0.0)
            wrong = torch.maximum(leak.amax(), (-probs.amin()).clamp(min=0.0))
        self.worst.append((layer, excess.amax(), wrong))
        self.rows[layer] = self.rows.get(layer, 0) + c

    def problems(self, layers: Sequence[int], *, online_ok: bool = False) -> list[str]:
        out = []
        for layer in layers:
            rows = self.rows.get(layer, 0)
            if rows != self.t_max and not (online_ok and rows == 0):
                out.append(f"layer {layer}: {rows} of {self.t_max} query rows delivered")
        if self.worst:
            excess = torch.stack([w[1] for w in self.worst]).cpu().tolist()
            leak = torch.stack([w[2] for w in self.worst]).cpu().tolist()
            for (layer, _, _), e, m in zip(self.worst, excess, leak, strict=True):
                if e > 0:
                    out.append(
                        f"layer {layer}: rows do not sum to 1 within the codec's bound "
                        f"(off by {e:.2g} more than allowed)"
                    )
                elif m > 1e-6:
                    out.append(
                        f"layer {layer}: up to {m:.2g} of a row's weight on future or padding "
                        "keys (or negative)"
                    )
        return out[:4]


class _SinkMass:
    """The ``learned_sink`` column of ``heads``: per (document, layer, head), the mean over the
    query rows q ≥ 1 of the mass the model's learned sink logit takes (= 1 − Σ_k A[q, k])."""

    def __init__(self, masks: scores.BatchMasks, n_layers: int, n_heads: int) -> None:
        b = masks.valid_q.shape[0]
        self.masks = masks
        self.sums = torch.zeros((b, n_layers, n_heads), dtype=torch.float64)
        self.seen = False

    def add(self, li: int, q0: int, sink: torch.Tensor) -> None:
        c = sink.shape[2]
        valid = self.masks.valid_q[:, None, q0 : q0 + c].to(torch.float64)
        self.sums[:, li] += (sink.double() * valid).sum(-1).cpu()
        self.seen = True

    def result(self) -> np.ndarray:
        n = self.masks.n_queries.cpu().to(torch.float64)[:, None, None]
        return (self.sums / n).numpy()  # 0/0 → NaN, the NULL marker


def _store_full_rows(
    codes: list[np.ndarray],
    codec: Codec,
    li: int,
    q0: int,
    probs: torch.Tensor,
    n_tok: Sequence[int],
) -> None:
    """Encoder layout (``packing: "full-rowmajor"``): rows ``q0 …`` of each document's whole
    ``[n, n]`` square, row after row, into its codes ``[layer, head, n·n]``."""
    c = probs.shape[2]
    for i, n in enumerate(n_tok):
        hi = min(q0 + c, n)
        if hi > q0:
            block = probs[i, :, : hi - q0, :n].reshape(probs.shape[1], (hi - q0) * n)
            codes[i][li, :, q0 * n : hi * n] = codec.encode(block)


def _store_lse(
    codes: list[np.ndarray],
    li: int,
    q0: int,
    lse: torch.Tensor,
    n_tok: Sequence[int],
    packed: Any,
) -> None:
    """``--values logits``: rows ``q0 …``'s log-sum-exp (``[doc, head, C]``) after each document's
    packed logits, so ``exp(logit − lse)`` gives the probabilities back exactly."""
    c = lse.shape[2]
    for i, n in enumerate(n_tok):
        hi = min(q0 + c, n)
        if hi > q0:
            base = packed(n)
            codes[i][li, :, base + q0 : base + hi] = lse[i, :, : hi - q0].float().cpu().numpy()


@functools.lru_cache(maxsize=256)
def _rows_index(rows: tuple[int, ...], q0: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into a ``[C, width]`` block of rows ``q0 …`` for the packed values of its
    query rows ``rows`` (global, increasing): row ``r`` holds keys ``0 … r``."""
    r = np.asarray(rows, dtype=np.int64)
    lengths = r + 1
    local = np.repeat(r - q0, lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    return torch.from_numpy(local * width + cols).to(device)


@functools.lru_cache(maxsize=256)
def _chunk_index(q0: int, hi: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into a ``[C, width]`` block of rows ``q0 …`` for packed rows ``q0 … hi - 1``."""
    rows, cols = np.tril_indices(hi)
    keep = rows >= q0
    return torch.from_numpy((rows[keep] - q0) * width + cols[keep]).to(device)


def _mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' boolean sdpa mask, except for plain causal attention during a capture through
    :func:`_attention`: then only the key padding mask ``[doc, 1, 1, k_pos]`` (O(B·T) instead of
    the ``[doc, 1, T, T]`` square), causality being the attention function's position arithmetic.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if (
        _ACTIVE is not None
        and not args
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and not kwargs.get("q_offset")
        and not kwargs.get("kv_offset")
        and kwargs.get("local_size") is None
        and kwargs.get("q_length") is not None
        and kwargs.get("q_length") == kwargs.get("kv_length")
    ):
        b, t = int(kwargs["batch_size"]), int(kwargs["kv_length"])
        padding = kwargs.get("attention_mask")
        if padding is None:
            keys = torch.ones((b, t), dtype=torch.bool, device=kwargs.get("device", "cpu"))
        elif padding.ndim == 2 and padding.shape[-1] >= t:
            keys = padding[:, :t].bool()
        else:
            keys = None
        if keys is not None:
            return keys[:, None, None, :]
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_IMPL, _attention)
    AttentionMaskInterface.register(_IMPL, _mask)


def _body(model: Any) -> Any:
    """The model without its output head: transformers' ``base_model`` (``model.model``,
    ``transformer``, …) when it is a separate module that takes ``input_ids``, ``attention_mask``
    and ``use_cache``; else the model itself. Capturing attention needs no vocabulary logits
    (``[doc, T, vocab]`` float32: 3.2 GB at 16k tokens for a 49k vocabulary)."""
    import inspect

    base = getattr(model, "base_model", None)
    if not isinstance(base, torch.nn.Module) or base is model:
        return model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return model
    takes = {"input_ids", "attention_mask", "use_cache"}
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes <= params.keys() or (open_kwargs and "input_ids" in params):
        return base
    return model


class _Undelivered(Exception):
    """A capture path did not deliver exact attention for this batch; the next path is tried."""


def _falcon_attention(
    module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Falcon's probabilities ``[doc, head, q, k]`` (float32) and the attention output rebuilt from
    them, recomputed from the layer's own projection, rotary embedding or ALiBi bias, and mask.

    The logits follow the branch transformers runs for the model's attention implementation: with
    sdpa (Falcon's default) the mask holds the ALiBi bias and the scale applies to ``q·k`` alone;
    the eager branch adds the bias a second time, scaled with ``q·k``.
    """
    import sys

    hidden = args[0] if args else kwargs["hidden_states"]
    alibi = kwargs.get("alibi")
    mask = kwargs.get("attention_mask")
    query, key, value = module._split_heads(module.query_key_value(hidden))
    b, t = query.shape[:2]
    h, d = module.num_heads, module.head_dim
    n_kv = h if module.new_decoder_architecture else module.num_kv_heads
    query = query.transpose(1, 2).reshape(b, h, t, d)
    key = key.transpose(1, 2).reshape(b, n_kv, t, d)
    value = value.transpose(1, 2).reshape(b, n_kv, t, d)
    if alibi is None:
        cos, sin = kwargs["position_embeddings"]
        rotary = sys.modules[type(module).__module__].apply_rotary_pos_emb
        query, key = rotary(query, key, cos, sin)
    if n_kv != h:
        key = key.repeat_interleave(h // n_kv, dim=1)
        value = value.repeat_interleave(h // n_kv, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2))
    if alibi is not None and module.config._attn_implementation != "sdpa":
        logits = logits + alibi.view(b, h, 1, -1).float()
    logits = logits * module.inv_norm_factor
    causal = torch.ones(t, t, dtype=torch.bool, device=logits.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    if mask is not None:
        mask = mask[..., :t]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).reshape(b, t, h * d)
    return probs, module.dense(out)


#: attention module class → recipe for the "recompute" path: ``(module, args, kwargs)`` →
#: (probabilities, the module's output rebuilt from them)
_RECIPES: Final[dict[str, Any]] = {"FalconAttention": _falcon_attention}


def _recipe(module: torch.nn.Module) -> Any:
    for cls in type(module).__mro__:
        if cls.__name__ in _RECIPES:
            return _RECIPES[cls.__name__]
    return None


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    tokenizer_info: TokenizerInfo
    max_positions: int | None
    device: torch.device
    captured: bool  # True: per-layer capture through attnstore's attention function
    #: how attention reaches attnstore, one of :data:`PATHS`; chosen and re-checked by the Extractor
    path: str = ""
    #: an encoder (BERT family): self-attention is not causal, rows are whole squares
    bidirectional: bool = False
    #: attention modules have learned sink logits (GPT-OSS ``sinks``): rows sum below 1
    learned_sinks: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            self.path = "function" if self.captured else "output_attentions"

    def use(self, path: str) -> None:
        """Switch the model to ``path`` (quietly: transformers only logs what it ignores)."""
        from transformers.utils import logging as hf_logging

        if path == self.path:
            return
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            if path == "output_attentions":
                with contextlib.suppress(ValueError, NotImplementedError, AttributeError):
                    self.model.set_attn_implementation("eager")
        finally:
            hf_logging.set_verbosity(verbosity)
        self.path = path
        self.captured = path == "function"


def _load_error(ref: str | None, source: str, kwargs: dict[str, Any], err: Exception) -> str:
    """One line that says why a model did not load and what to pass instead."""
    if kwargs.get("local_files_only"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            return _not_cached_message(ref)
    detail = " ".join(str(err).split())
    return f"Cannot load model {ref!r}: {detail}"


def load_model(
    ref: str | None = None, *, device: str | None = None, dtype: str = "auto", progress: bool = True
) -> LoadedModel:
    """Load a causal LM (or an encoder: BERT family, see :func:`_is_encoder_checkpoint`) and its
    tokenizer, set up to capture attention.

    Parameters
    ----------
    ref
        ``None``/``"smollm2"`` for the embedded default, a ``save_pretrained`` folder, a ``.gguf``
        file, or a model id already in the local Hugging Face cache (never downloaded).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``…; default CUDA when available.
    dtype
        ``"auto"`` (float32 on CPU, bfloat16 on CUDA), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        Probabilities are always computed in float32.
    progress
        Show transformers' loading bars (the default model takes ~17 s to dequantise on 2 cores).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available.")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    torch_dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"Expected --dtype auto|float32|bfloat16|float16. Got {dtype!r}.")
    source, kwargs, model_id, revision = _resolve(ref)
    _register()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    # Quiet means quiet: transformers' GGUF loader and others draw tqdm bars of their own.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            auto = AutoModel if _is_encoder_checkpoint(source, kwargs) else AutoModelForCausalLM
            model = auto.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(_load_error(ref, source, kwargs, err)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return prepare_model(
        model, tokenizer, model_id=model_id, revision=revision, dtype=dtype, device=dev
    )


#: class-name endings of checkpoints that are language models (loaded as causal LMs)
_LM_HEADS: Final = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _is_encoder_checkpoint(source: str, kwargs: dict[str, Any]) -> bool:
    """Whether the checkpoint is an encoder (BERT family): loaded with ``AutoModel`` (its own
    bidirectional attention), never as a causal LM, which would make BERT a decoder.

    An encoder checkpoint is one whose config names only non-LM classes (``BertModel``,
    ``BertForMaskedLM``…) and is not marked ``is_decoder``; GGUF files are decoders.
    """
    if "gguf_file" in kwargs:
        return False
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        return False  # the model load below reports the problem
    archs = list(getattr(cfg, "architectures", None) or [])
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        return False
    return bool(archs) and not any(a.endswith(_LM_HEADS) for a in archs)


def _kv_heads(cfg: Any, n_heads: int) -> int:
    """Key/value heads; Falcon names them ``num_kv_heads`` and ignores them under multi-query."""
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        return 1
    return int(
        getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or n_heads
    )


def prepare_model(
    model: Any,
    tokenizer: Any,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    device: torch.device | None = None,
) -> LoadedModel:
    """Set up an already built causal LM (``PreTrainedModel``) and its tokenizer for capture.

    :func:`load_model` ends here; tests and notebooks call it with a model built in memory.
    ``model_id`` defaults to the class name, ``dtype`` to the model's, ``device`` to where its
    parameters are.
    """
    from transformers.utils import logging as hf_logging

    dev = device or next(model.parameters()).device
    model_id = model_id or type(model).__name__
    if dtype is None:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    _register()
    model.eval().to(dev)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # transformers only logs (and keeps its own attention) for architectures that do not use
        # AttentionInterface; ask first, so the path is right from the start.
        settable = getattr(type(model), "_can_set_attn_implementation", lambda: True)()
        if settable:
            model.set_attn_implementation(_IMPL)
            path = "function"
        else:
            path = (
                "recompute"
                if any(_recipe(m) is not None for m in model.modules())
                else "output_attentions"
            )
            with contextlib.suppress(ValueError, NotImplementedError, AttributeError):
                if path == "output_attentions":
                    model.set_attn_implementation("eager")
    except (ValueError, NotImplementedError, AttributeError) as err:
        path = "output_attentions"
        try:
            model.set_attn_implementation("eager")
        except (ValueError, NotImplementedError) as err2:
            raise AttentionCaptureError(
                f"Model {model_id!r} ({type(model).__name__}) can return no attention weights: "
                f"neither a custom attention function ({err}) nor eager attention ({err2}) is "
                "supported. Use a model of an architecture listed in the README's capability table."
            ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if path == "output_attentions":
        warnings.warn(
            f"{type(model).__name__} does not route attention through transformers' "
            "AttentionInterface; falling back to eager attention with output_attentions=True "
            "(all layers in memory, checked batch by batch).",
            AttentionWarning,
            stacklevel=2,
        )
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    info: ModelInfo = {
        "id": model_id,
        "revision": revision or getattr(cfg, "_commit_hash", None),
        "architecture": type(model).__name__,
        "n_layers": int(cfg.num_hidden_layers),
        "n_heads": n_heads,
        "n_kv_heads": _kv_heads(cfg, n_heads),
        "dtype": dtype,
    }
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    probe_ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    tok_info: TokenizerInfo = {
        "id": model_id,
        "vocab_size": len(tokenizer),
        "bos_token_id": bos,
        "adds_bos": bool(bos is not None and probe_ids[:1] == [bos]),
    }
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return LoadedModel(
        model, tokenizer, info, tok_info, max_pos, dev, path == "function", path,
        bidirectional=_is_bidirectional(model),
        learned_sinks=any(
            isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules()
        ),
    )  # fmt: skip


def _is_bidirectional(model: Any) -> bool:
    """Whether the model's self-attention is bidirectional (an encoder: BERT, RoBERTa, MiniLM…).

    transformers marks each attention module with ``is_causal``; encoder self-attention modules
    say False (and transformers' sdpa path reads the same flag). Cross-attention modules do not
    count. A model that mixes both kinds of self-attention is refused by the capture check.
    """
    flags = [
        bool(m.is_causal)
        for m in model.modules()
        if isinstance(getattr(m, "is_causal", None), bool)
        and getattr(m, "layer_idx", None) is not None
        and "cross" not in type(m).__name__.lower()
        and not getattr(m, "is_cross_attention", False)
    ]
    return bool(flags) and not any(flags)


def probe_documents(
    loaded: LoadedModel, probe: InductionProbe | probes.BuiltinProbe | needles.NeedleProbe
) -> list[Document]:
    """The induction probe of schemas/scores.md: random ordinary tokens, repeated, optional BOS;
    or the built-in span probes of schemas/probes.md (``probe:coref``, ``probe:ioi``); or the
    needle documents of schemas/sparsity.md (``probe:needle``)."""
    tok = loaded.tokenizer
    if isinstance(probe, needles.NeedleProbe):
        made = needles.build_documents(probe, needles.hf_encoder(tok))
        return [Document(i, text, needle=nd) for i, (text, nd) in enumerate(made)]
    if isinstance(probe, probes.BuiltinProbe):
        built = probes.builtin_documents(
            probe, lambda text: tok(text, add_special_tokens=False).input_ids
        )
        return [Document(i, text, probes=items) for i, (text, items) in enumerate(built)]
    special = set(tok.all_special_ids)
    ordinary = np.array([i for i in range(len(tok)) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(probe.seed)
    docs = []
    for i in range(probe.count):
        seq = rng.choice(ordinary, size=probe.n, replace=True).tolist() * probe.reps
        if loaded.tokenizer_info["adds_bos"]:
            seq = [loaded.tokenizer_info["bos_token_id"], *seq]
        docs.append(Document(i, tok.decode(seq), tuple(int(x) for x in seq)))
    return docs


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte → printable character table of byte-level BPE vocabularies (GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES: Final = _byte_decoder()


def _piece_text(decoded: str, piece: str | None) -> str:
    """A token without a character span: its decoded text, or its bytes when it is only part of
    a character (``decoded`` holds U+FFFD), written ``<e6 b3>``."""
    if "\ufffd" not in decoded or not piece:
        return decoded
    if piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return piece
    if all(c in _BYTES for c in piece):
        data = bytes(_BYTES[c] for c in piece)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "<" + data.hex(" ") + ">"
    return decoded


def readable_tokens(
    text: str,
    spans: Sequence[tuple[int, int] | None],
    decoded: Sequence[str],
    pieces: Sequence[str | None],
) -> list[str]:
    """The ``tokens.text`` column: each token as readable text.

    A token with a character span shows the text it covers (``text[char_start:char_end]``). Byte
    pieces of one character (byte-level BPE splits a Chinese character into 2-3 tokens, each
    covering the whole character) show that character and which piece they are: ``注[1/3]``,
    ``注[2/3]``, ``注[3/3]``. A token without a span (special tokens, the induction probe) shows
    its decoded text, or its bytes (``<e6 b3>``) when it is only part of a character.

    >>> readable_tokens("注 is", [(0, 1), (0, 1), (0, 1), (1, 4)], ["�"] * 3 + [" is"],
    ...                 ["æ", "³", "¨", "Ġis"])
    ['注[1/3]', '注[2/3]', '注[3/3]', ' is']
    """
    out: list[str] = []
    i, n = 0, len(spans)
    while i < n:
        span = spans[i]
        if span is None:
            out.append(_piece_text(decoded[i], pieces[i]))
            i += 1
            continue
        j = i + 1
        while j < n and spans[j] == span:
            j += 1
        covered = text[span[0] : span[1]]
        if j - i == 1:
            out.append(covered)
        else:
            out.extend(f"{covered}[{k + 1}/{j - i}]" for k in range(j - i))
        i = j
    return out


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokenized:
    doc: Document
    ids: list[int]
    n_input: int
    #: character span of each stored token in ``doc.text``; None for special tokens or unknown
    spans: list[tuple[int, int] | None] | None = None
    #: words of the parse aligned to the tokens (``--parse`` or a CoNLL-U corpus)
    alignment: Alignment | None = None
    #: span-probe items aligned to the tokens (schemas/probes.md)
    probe_items: tuple[probes.Aligned, ...] | None = None

    @property
    def truncated(self) -> bool:
        return self.n_input > len(self.ids)


#: Characters of a document tokenized first: 16 per token of ``--max-length`` (plus slack); a
#: document longer than that is tokenized by growing prefixes (×4) until one yields enough tokens.
PREFIX_CHARS_PER_TOKEN: Final = 16
#: A token counts towards "enough" only if it ends this many characters before the prefix's cut
#: (tokens near the cut may merge differently once more text follows).
PREFIX_MARGIN: Final = 1024


def tokenize_prefix(
    tok: Any, text: str, max_length: int
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids (and character offsets, for a fast tokenizer) of ``text`` as far as
    ``max_length`` tokens can use: never the whole of a huge document (a 50 MB line).

    A document that fits the first window is tokenized whole, exactly as before; a longer one by
    growing prefixes, stopping at the first whose tokens include more than ``max_length`` that end
    :data:`PREFIX_MARGIN` characters before the cut. Its ``n_tokens_input`` then counts the tokens
    of that prefix: a lower bound, more than ``max_length``, so ``truncated`` is still right.
    """
    fast = getattr(tok, "is_fast", False)
    window = PREFIX_CHARS_PER_TOKEN * (max_length + 8) + PREFIX_MARGIN
    while True:
        whole = window >= len(text)
        piece = text if whole else text[:window]
        if fast:
            enc = tok(piece, add_special_tokens=True, return_offsets_mapping=True)
            ids = list(enc.input_ids)
            offsets = [(int(a), int(b)) for a, b in enc.offset_mapping]
            settled = sum(1 for _, end in offsets if 0 < end <= window - PREFIX_MARGIN)
        else:
            ids, offsets = list(tok(piece, add_special_tokens=True).input_ids), None
            settled = len(ids) - PREFIX_MARGIN // 16
        if whole or settled > max_length:
            return ids, offsets
        window *= 4


class Extractor:
    """Turns batches of documents into :class:`~attnstore.store.Segment` objects.

    Building one runs two tiny padded documents through the model to choose the capture path
    (:data:`PATHS`); :meth:`run` checks every batch again before returning its segment and raises
    :class:`~attnstore.errors.AttentionCaptureError` when no path delivers exact attention.

    Parameters
    ----------
    loaded
        From :func:`load_model`.
    codec
        How probabilities are stored.
    max_length
        Documents are truncated to this many tokens (and marked ``truncated``).
    layers, heads
        Which layers and query heads to store; default all.
    parser
        A spaCy pipeline name: parse each document and score syntactic heads (schemas/syntax.md).
        Documents that bring a gold parse (CoNLL-U) are scored against it in any case.
    store_matrices
        False for a scores-only census: tables without attention matrices.
    mode
        ``"eager"``: the layer output is computed from the captured probabilities (cheapest on a
        CPU). ``"sdpa"``: the output comes from the fused kernel and the probabilities are
        recomputed from the same queries and keys for capture (fastest on a GPU). ``"auto"``:
        sdpa on CUDA and for a scores-only census without overviews (one fused pass per layer,
        no rows materialised), eager elsewhere. Captured values are identical in both modes.
    chunk_bytes
        Largest block of float32 probabilities alive at once (query rows × keys × heads × docs);
        bounds memory at long contexts.
    analyses
        Analyses (``schemas/analyses.md``) run beside the default ones
        (:data:`attnstore.analyses.registry.DEFAULT`) over every block of exact rows; their tables
        ride in :attr:`Segment.extra <attnstore.store.Segment.extra>`.
    defaults
        The built-in analyses run by default (names; ``None``: the registry's ``DEFAULT``). A
        census without row analyses, e.g. ``("patterns",)``, lets ``--attention sdpa`` score
        without materialising rows (online softmax).
    rows
        ``--rows``: store only these query rows of each document (:mod:`attnstore.rows`).
    overview
        ``--overview N``: pool every head into ``N × N`` max and mean overviews
        (:mod:`attnstore.overview`), with or without matrices.

    Set :attr:`stream` (``StoreWriter.stream``) to write documents bigger than
    :func:`attnstore.streaming.stream_bytes` to their own segment as their rows come
    (:mod:`attnstore.streaming`) instead of holding their codes in memory.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        codec: Codec,
        max_length: int,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        parser: str | None = None,
        *,
        store_matrices: bool = True,
        mode: str = "auto",
        chunk_bytes: int = 1 << 28,
        values: str = "probs",
        analyses: Sequence[Analysis] = (),
        rows: str | RowSelection | None = None,
        overview: int | None = None,
        defaults: Sequence[str] | None = None,
    ) -> None:
        self.loaded = loaded
        self.rows = RowSelection.parse(rows)
        if overview is not None and overview < 1:
            raise ModelError(f"--overview N needs N ≥ 1. Got {overview}.")
        self.overview = overview
        #: opens a DocStream for a long document (``StoreWriter.stream``); None: keep in memory
        self.stream: Any = None
        self.stream_bytes = stream_bytes()
        given = {builtin_key(a) for a in analyses}
        builtins = [load(n) for n in (DEFAULT if defaults is None else defaults) if n not in given]
        #: every analysis of this run: the defaults, then the caller's (checked once, here)
        self.runner = AnalysisRunner([*builtins, *analyses])
        for analysis in self.runner.analyses:  # optional: hooks on the model (value_norm)
            bind = getattr(analysis, "bind", None)
            if callable(bind):
                bind(loaded.model, loaded.tokenizer)
        self.parser = parser
        self.store_matrices = store_matrices
        if values not in VALUES:
            raise ModelError(f"Expected --values {' or '.join(VALUES)}. Got {values!r}.")
        if values == "logits" and (codec.dtype not in ("float32", "float16") or not store_matrices):
            raise ModelError(
                "--values logits stores raw pre-softmax scores, which need a float codec "
                f"(--codec float32 or float16; got {codec.id!r}) and matrices (not --scores-only)."
            )
        #: what the matrices hold: "probs" (post-softmax) or "logits" (pre-softmax scores, masked
        #: entries -inf, plus each row's log-sum-exp; schemas/README.md)
        self.values = values
        if self.rows is not None and (values == "logits" or loaded.bidirectional):
            raise ModelError(
                "--rows selects query rows of causal probabilities; it cannot be combined with "
                "--values logits or an encoder's (bidirectional) squares. Drop --rows."
            )
        if mode == "auto":
            # a scores-only census without overviews never materialises rows in sdpa mode (the
            # fused pass), which beats eager rows on a CPU too; rows to store are cheapest eager
            census = not store_matrices and overview is None
            mode = "sdpa" if loaded.device.type == "cuda" or census else "eager"
        if mode not in ("eager", "sdpa"):
            raise ModelError(f"Expected attention mode auto, eager or sdpa. Got {mode!r}.")
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self._nlp = syntax.load_parser(parser) if parser else None
        self.codec = codec
        info = loaded.info
        if max_length <= 0:
            raise ModelError(f"--max-length must be a positive number of tokens. Got {max_length}.")
        if loaded.max_positions and max_length > loaded.max_positions:
            raise ModelError(
                f"--max-length {max_length} is larger than the model's context "
                f"({loaded.max_positions} positions). Use --max-length {loaded.max_positions} or less."
            )
        self.max_length = max_length
        self.layers = list(range(info["n_layers"])) if layers is None else sorted(set(layers))
        self.heads = list(range(info["n_heads"])) if heads is None else sorted(set(heads))
        for name, sel, n in (
            ("layer", self.layers, info["n_layers"]),
            ("head", self.heads, info["n_heads"]),
        ):
            bad = [x for x in sel if not 0 <= x < n]
            if bad or not sel:
                raise ModelError(f"Expected {name}s in 0…{n - 1}. Got {bad or 'none'}.")
        self._token_cache: dict[int, str] = {}
        self._calibrating = False
        self._first_use = False
        self._calibrate()

    def tokenize(self, doc: Document) -> Tokenized:
        """Token ids (truncated), their character spans, and the aligned parse if any."""
        tok = self.loaded.tokenizer
        spans: list[tuple[int, int] | None] | None = None
        if doc.token_ids is not None:
            ids = list(doc.token_ids)
        else:
            ids, offsets = tokenize_prefix(tok, doc.text, self.max_length)
            if offsets is not None:
                special = set(tok.all_special_ids)
                spans = [
                    None if i in special or a == b else (int(a), int(b))
                    for i, (a, b) in zip(ids, offsets, strict=True)
                ]
        n_input = len(ids)
        last = ids[-1] if ids else None
        keep_last = (
            self.loaded.bidirectional
            and n_input > self.max_length > 1
            and ids[-1] in self.loaded.tokenizer.all_special_ids
        )
        ids = ids[: self.max_length]
        spans = spans[: self.max_length] if spans is not None else None
        if keep_last:  # an encoder's input ends with its separator ([SEP]), as its tokenizer does
            ids[-1] = int(last)  # type: ignore[arg-type]
            if spans is not None:
                spans[-1] = None
        alignment = None
        if spans is not None and (doc.words is not None or self._nlp is not None):
            cutoff = max((s[1] for s in spans if s is not None), default=0)
            words = (
                doc.words
                if doc.words is not None
                else syntax.parse_text(self._nlp, doc.text[:cutoff])
            )
            alignment = syntax.align(words, spans, cutoff)
        elif self._nlp is not None and doc.token_ids is None:
            raise ModelError("--parse needs a fast tokenizer (character offsets) to align words.")
        probe_items = None
        if doc.probes is not None:
            if spans is None:
                raise ModelError(
                    "Probe items need a fast tokenizer (character offsets) to align their spans."
                )
            probe_items = tuple(probes.align(doc.probes, spans))
        return Tokenized(doc, ids, n_input, spans, alignment, probe_items)

    def _packed(self, n: int) -> int:
        """Stored values per head for a document of ``n`` tokens (triangle, or whole square)."""
        return n * n if self.loaded.bidirectional else packed_length(n)

    def _stored(self, n: int) -> int:
        """Stored values per head: the packed matrix, then (``--values logits``) n row LSEs."""
        return self._packed(n) + (n if self.values == "logits" else 0)

    @property
    def _score_columns(self) -> tuple[str, ...]:
        if self.loaded.bidirectional:
            return bidirectional_scores.SCORE_COLUMNS
        return scores.SCORE_COLUMNS

    def _layer_scores(self, masks: scores.BatchMasks, ids: torch.Tensor, n_h: int) -> Any:
        if self.loaded.bidirectional:
            return bidirectional_scores.LayerScores(
                masks, n_h, ids, bidirectional_scores.separator_ids(self.loaded.tokenizer)
            )
        return scores.LayerScores(masks, n_h)

    def _token_strings(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._token_cache})
        if missing:
            texts = self.loaded.tokenizer.batch_decode([[i] for i in missing])
            self._token_cache.update(zip(missing, texts, strict=True))
        return [self._token_cache[i] for i in ids]

    def _calibrate(self) -> None:
        """Choose the capture path on two tiny padded documents, before anything is written."""
        self._calibrating = True
        try:
            self._calibrate_run()
        finally:
            self._calibrating = False

    def _calibrate_run(self) -> None:
        n_vocab = min(len(self.loaded.tokenizer), int(self.loaded.model.config.vocab_size))
        n = min(6, self.loaded.max_positions or 6)
        ids = [(7 * i + 3) % n_vocab for i in range(n)]
        docs = [
            Tokenized(Document(-1, ""), ids, n),
            Tokenized(Document(-2, ""), ids[: max(1, n // 2)], max(1, n // 2)),
        ]
        self.run(docs)

    @torch.inference_mode()
    def run(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]] = ()
    ) -> Segment:
        """Run one batch (non-empty documents) and build its segment; ``skipped`` rows ride along.

        Every stored layer's attention is checked delivered and normalised before it is encoded
        (module docstring). A path that fails gives way to the next one for good (with a warning);
        when none delivers, :class:`~attnstore.errors.AttentionCaptureError` and no segment.
        """
        loaded = self.loaded
        failures: list[str] = []
        for path in PATHS[PATHS.index(loaded.path) :]:
            if path == "recompute" and not any(_recipe(m) for m in loaded.model.modules()):
                continue
            before = loaded.path
            loaded.use(path)
            self._first_use = self._calibrating or path != before
            try:
                segment = self._run(batch, skipped, path)
            except _Undelivered as why:
                failures.append(f"{path}: {why}")
                continue
            if batch:  # recorded with the commit (Store.commits)
                segment.annotation = {**segment.annotation, "attention": path}
            if path != before:
                warnings.warn(
                    f"{loaded.info['architecture']}: attention now comes through the {path!r} "
                    f"path ({'; '.join(failures)}).",
                    AttentionWarning,
                    stacklevel=2,
                )
            return segment
        arch = loaded.info["architecture"]
        name = arch if loaded.info["id"] == arch else f"{arch} ({loaded.info['id']})"
        hint = (
            " Its attention is computed in {dtype}: try --dtype float32.".format(**loaded.info)
            if loaded.info["dtype"] not in ("float32", None)
            else ""
        )
        raise AttentionCaptureError(
            f"{name}: no capture path delivers its attention exactly, so nothing was written. "
            f"Tried: {'; '.join(failures)}.{hint} attnstore supports the architectures of the "
            "README's capability table; others need their attention routed through "
            "transformers' AttentionInterface or a recipe in attnstore.capture.",
            failures,
        )

    def _forward(
        self,
        path: str,
        ids: torch.Tensor,
        mask: torch.Tensor,
        consume: Any,
        done: Any,
        online: Any,
        check: _RowCheck,
    ) -> None:
        """One forward pass delivering every stored layer through ``path``, or ``_Undelivered``."""
        global _ACTIVE
        model = self.loaded.model
        body = _body(model)  # no vocabulary logits on the paths that do not compare them
        n_layers = self.loaded.info["n_layers"]
        if path == "function":
            cap = _Capture(
                consume, done, mode=self.mode, chunk_bytes=self.chunk_bytes, online=online
            )
            cap.want_logits = self.values == "logits"
            _ACTIVE = cap
            try:
                body(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                _ACTIVE = None
            if not cap.layer_calls:
                raise _Undelivered(
                    "attnstore's attention function was never called (the model computes "
                    "attention in its own code)"
                )
            expected = set(self.layers) if self.loaded.bidirectional else set()
            if cap.bidirectional & set(self.layers) != expected:
                raise _Undelivered(
                    "the attention of layers "
                    f"{sorted(cap.bidirectional ^ expected)} is "
                    + ("causal in an encoder" if expected else "bidirectional in a causal model")
                )
            wrong = {
                layer: cap.layer_calls.get(layer, 0)
                for layer in self.layers
                if cap.layer_calls.get(layer, 0) != 1
            }
            if wrong:
                raise _Undelivered(
                    "calls of attnstore's attention function per stored layer were "
                    f"{wrong}, expected one each"
                )
        elif path == "recompute":
            valid = mask.bool()

            def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
                probs, rebuilt = _recipe(module)(module, args, kwargs)
                got = output[0] if isinstance(output, tuple) else output
                err = float((rebuilt - got)[valid].abs().max())
                rel = 1e-4 if got.dtype == torch.float32 else 3e-2
                tol = rel * (1.0 + float(got[valid].abs().max()))
                if not err <= tol:
                    raise _Undelivered(
                        f"layer {module.layer_idx}: the output rebuilt from the recomputed "
                        f"probabilities differs from the model's by {err:.2g} (tolerance {tol:.2g})"
                    )
                consume(int(module.layer_idx), 0, probs)
                done(int(module.layer_idx))

            handles = [
                m.register_forward_hook(hook, with_kwargs=True)
                for m in model.modules()
                if _recipe(m) is not None
            ]
            try:
                body(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
        else:
            try:
                out = model(
                    input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True
                )
            except (ValueError, NotImplementedError, TypeError) as err:
                raise _Undelivered(f"output_attentions=True failed: {err}") from None
            attentions = list(getattr(out, "attentions", None) or ())
            missing = [i for i in range(n_layers) if i >= len(attentions) or attentions[i] is None]
            if missing or len(attentions) != n_layers:
                raise _Undelivered(
                    f"no attention weights returned (layers {missing} of 0…{n_layers - 1})"
                )
            if self._first_use:
                # Some architectures (Falcon) run other code when asked for attention weights:
                # they must be the weights of the forward pass the model runs without asking.
                plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                valid = mask.bool()
                diff = float((out.logits - plain)[valid].abs().max())
                tol = (1e-4 if plain.dtype == torch.float32 else 3e-2) * (
                    1.0 + float(plain[valid].abs().max())
                )
                if not diff <= tol:
                    raise _Undelivered(
                        "asking for output_attentions changes the model's output (logits differ "
                        f"by {diff:.2g}): the returned weights are not those of its forward pass"
                    )
            b, t = ids.shape
            for layer, probs in enumerate(attentions):
                if tuple(probs.shape) != (b, self.loaded.info["n_heads"], t, t):
                    raise _Undelivered(
                        f"layer {layer} returned attention of shape {tuple(probs.shape)}"
                    )
                consume(layer, 0, probs)
                done(layer)
        problems = check.problems(self.layers, online_ok=path == "function" and online is not None)
        if problems:
            raise _Undelivered("; ".join(problems))

    def _run(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]], path: str
    ) -> Segment:
        loaded = self.loaded
        dev = loaded.device
        n_tok = [len(t.ids) for t in batch]
        b, t_max = len(batch), max(n_tok, default=0)
        n_l, n_h = len(self.layers), len(self.heads)
        doc_rows = [DocRows.of(self.rows, n) for n in n_tok]
        itemsize = np.dtype(self.codec.dtype).itemsize
        # encoders' squares and --values logits (row LSEs after the matrix) stay in memory
        plain = not loaded.bidirectional and self.values == "probs"
        streams: list[Any] = [None] * b
        codes: list[Any] = []
        if self.store_matrices:
            for i, r in enumerate(doc_rows):
                big = n_l * n_h * r.length * itemsize > self.stream_bytes
                if plain and big and self.stream is not None and not self._calibrating:
                    streams[i] = self.stream(r.n_tokens)  # written as rows come
                    codes.append(None)
                else:
                    size = r.length if plain else self._stored(r.n_tokens)
                    codes.append(np.zeros((n_l, n_h, size), dtype=self.codec.dtype))
        pools = (
            {i: OverviewPool(n, self.overview, n_h, dev) for i, n in enumerate(n_tok)}
            if self.overview
            else {}
        )
        overviews = (
            [np.zeros((n_l, n_h, 2, p.m, p.m), dtype=np.float32) for p in pools.values()]
            if self.overview
            else []
        )
        score_arrays = {k: np.full((b, n_l, n_h), np.nan) for k in self._score_columns}
        # analyses (syntax, probes, plug-ins: schemas/analyses.md) see every block of exact rows
        runner = None if self._calibrating else self.runner
        if runner is not None:
            runner.begin(self._batch(batch, skipped, t_max))
        if b:
            ids = torch.full((b, t_max), loaded.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((b, t_max), dtype=torch.long)
            for i, t in enumerate(batch):
                ids[i, : len(t.ids)] = torch.tensor(t.ids)
                mask[i, : len(t.ids)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            lengths = torch.tensor(n_tok, device=dev)
            masks = scores.batch_masks(ids, lengths)
            layer_pos = {layer: i for i, layer in enumerate(self.layers)}
            head_index = torch.tensor(self.heads, device=dev)
            all_heads = n_h == loaded.info["n_heads"]
            layer_scores: dict[int, scores.LayerScores] = {}
            check = _RowCheck(
                lengths, t_max, self.codec.max_abs_error,
                masked=self._first_use or path != "function", causal=not loaded.bidirectional,
            )  # fmt: skip
            sink_mass = _SinkMass(masks, n_l, n_h)

            def consume(
                layer: int,
                q0: int,
                probs: torch.Tensor,
                sink: torch.Tensor | None = None,
                logits: torch.Tensor | None = None,
                lse: torch.Tensor | None = None,
            ) -> None:
                li = layer_pos.get(layer)
                if li is None:
                    return
                if not all_heads:
                    probs = probs.index_select(1, head_index)
                    sink = None if sink is None else sink.index_select(1, head_index)
                    logits = None if logits is None else logits.index_select(1, head_index)
                    lse = None if lse is None else lse.index_select(1, head_index)
                probs = probs.float()
                stored = probs
                if self.values == "logits":
                    if logits is None or lse is None:
                        raise _Undelivered(
                            "--values logits needs the layer's pre-softmax scores, which only "
                            "attnstore's attention function computes"
                        )
                    stored = logits.float()
                    _store_lse(codes, li, q0, lse, n_tok, self._packed)
                check.add(layer, q0, probs, sink)
                if sink is not None:
                    sink_mass.add(li, q0, sink)
                acc = layer_scores.get(li)
                if acc is None:
                    acc = layer_scores[li] = self._layer_scores(masks, ids, n_h)
                acc.add(probs, q0)
                c = probs.shape[2]
                if self.store_matrices and loaded.bidirectional:
                    _store_full_rows(codes, self.codec, li, q0, stored, n_tok)
                elif self.store_matrices:
                    # rows q0 … hi of each document, keys 0 … q: a contiguous run of its packed
                    # triangle, gathered straight from the padded block (no per-document square)
                    flat = stored.reshape(b, n_h, c * t_max)
                    for i, n in enumerate(n_tok):
                        hi = min(q0 + c, n)
                        if hi <= q0:
                            continue
                        if doc_rows[i].every:
                            lo, end = q0 * (q0 + 1) // 2, hi * (hi + 1) // 2
                            idx = _chunk_index(q0, hi, t_max, dev)
                        else:  # --rows: only the selected rows of this block
                            lo, end, sel = doc_rows[i].span(q0, hi)
                            if end == lo:
                                continue
                            idx = _rows_index(tuple(sel.tolist()), q0, t_max, dev)
                        encoded = self.codec.encode(flat[i].index_select(1, idx))
                        if streams[i] is not None:
                            streams[i].write(li, encoded)
                        else:
                            codes[i][li, :, lo:end] = encoded
                for i, pool in pools.items():
                    hi = min(q0 + c, n_tok[i])
                    if hi > q0:
                        pool.add(q0, probs[i, :, : hi - q0])
                if runner is not None:
                    runner.rows(layer, q0, probs)

            def done(layer: int) -> None:
                li = layer_pos.get(layer)
                if li is None:
                    return
                for stream in streams:
                    if stream is not None:
                        stream.end_layer(li)
                for j, pool in enumerate(pools.values()):
                    overviews[j][li] = pool.finish()
                for name, values in layer_scores.pop(li).result().items():
                    score_arrays[name][:, li, :] = values

            def online(
                layer: int, query: torch.Tensor, key: torch.Tensor,
                allowed: torch.Tensor | None, scaling: float, softcap: float | None,
                lse: torch.Tensor | None = None,
            ) -> None:  # fmt: skip
                li = layer_pos.get(layer)
                if li is None:
                    return
                if not all_heads:
                    query, key = query.index_select(1, head_index), key.index_select(1, head_index)
                    lse = None if lse is None else lse.index_select(1, head_index)
                    allowed = (
                        allowed
                        if allowed is None or allowed.shape[1] == 1
                        else allowed.index_select(1, head_index)
                    )
                # tiles of ~2 MB stay in cache (larger ones cost up to 2× on a CPU); a tile's
                # logits and their exp are alive at once (plus small temporaries)
                values = scores.online_layer_scores(
                    query,
                    key,
                    allowed,
                    masks,
                    scaling=scaling,
                    softcap=softcap,
                    # at least 128 × 128 per document and head: smaller tiles (a batch of
                    # many short documents) cost more in per-operation overhead than in cache
                    block_bytes=max(
                        min(self.chunk_bytes // 8, 1 << 21),
                        min(self.chunk_bytes, 4 * query.shape[0] * query.shape[1] * 128 * 128),
                    ),
                    lse=lse,
                    tile=(
                        None
                        if runner is None or not runner.active
                        else lambda q0, k0, p: runner.tile(layer, q0, k0, p)
                    ),
                )
                for name, v in values.items():
                    score_arrays[name][:, li, :] = v

            # Scores-only in sdpa mode never materialises attention rows (online softmax).
            use_online = (
                not self.store_matrices
                and self.mode == "sdpa"
                and not (runner is not None and runner.active and not runner.tiled)
                and not self.overview
            )
            self._forward(path, ids, mask, consume, done, online if use_online else None, check)
            n_dup = masks.n_duplicate.cpu().numpy()
            n_ind = masks.n_induction.cpu().numpy()
            n_q = masks.n_queries.cpu().numpy()
            if sink_mass.seen:
                score_arrays["learned_sink"] = sink_mass.result()
        for i, stream in enumerate(streams):
            if stream is not None:  # every layer streamed: the document's segment is complete
                codes[i] = stream.close()
        segment = self._segment(
            batch, skipped, codes, score_arrays, (n_q, n_dup, n_ind) if b else None
        )
        segment.overviews = overviews
        if runner is not None:  # built-in tables as columns, like every built-in table
            segment.extra = {
                name: table.to_pydict() if name in runner.builtin else table
                for name, table in runner.end().items()
            }
        if any(t.alignment is not None for t in batch):
            segment.annotation = {"parser": self.parser or "gold (corpus)"}
        return segment

    def _batch(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]], t_max: int
    ) -> Batch:
        """What an analysis sees of one batch (:class:`attnstore.abc.analysis.Batch`)."""
        dev = self.loaded.device
        ids = torch.zeros((len(batch), t_max), dtype=torch.long)
        for i, t in enumerate(batch):
            ids[i, : len(t.ids)] = torch.tensor(t.ids)
        info = self.loaded.info
        return Batch(
            doc_ids=[t.doc.doc_id for t in batch],
            token_ids=ids.to(dev),
            lengths=torch.tensor([len(t.ids) for t in batch], dtype=torch.long, device=dev),
            n_layers=info["n_layers"],
            n_heads=info["n_heads"],
            device=dev,
            texts=[t.doc.text for t in batch],
            layers=tuple(self.layers),
            heads=tuple(self.heads),
            documents=tuple(batch),
            info={
                "model": info["id"],
                "codec": self.codec.get_config(),
                "bidirectional": self.loaded.bidirectional,
            },
            skipped=tuple(skipped),
        )

    def _segment(
        self,
        batch: Sequence[Tokenized],
        skipped: Sequence[tuple[Document, str]],
        codes: list[np.ndarray],
        score_arrays: dict[str, np.ndarray],
        counts: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    ) -> Segment:
        columns = (
            "doc_id",
            "n_tokens",
            "n_tokens_input",
            "truncated",
            "skipped",
            "n_chars",
            "text",
        )
        rows: list[tuple[Any, ...]] = [
            (t.doc.doc_id, len(t.ids), t.n_input, t.truncated, None, len(t.doc.text), t.doc.text)
            for t in batch
        ]
        rows += [(d.doc_id, 0, 0, False, why, len(d.text), d.text) for d, why in skipped]
        docs = {name: [r[i] for r in rows] for i, name in enumerate(columns)}
        tokens: dict[str, Any] = {
            "doc_id": [], "pos": [], "token_id": [], "token": [], "text": [], "char_start": [],
            "char_end": [],
        }  # fmt: skip
        for t in batch:
            tokens["doc_id"].append(np.full(len(t.ids), t.doc.doc_id, dtype=np.int64))
            tokens["pos"].append(np.arange(len(t.ids), dtype=np.int32))
            tokens["token_id"].append(np.asarray(t.ids, dtype=np.int32))
            raw = self._token_strings(t.ids)
            tokens["token"].extend(raw)
            spans = t.spans or [None] * len(t.ids)
            pieces = self.loaded.tokenizer.convert_ids_to_tokens(t.ids)
            tokens["text"].extend(readable_tokens(t.doc.text, spans, raw, pieces))
            tokens["char_start"].extend(None if s is None else s[0] for s in spans)
            tokens["char_end"].extend(None if s is None else s[1] for s in spans)
        for k in ("doc_id", "pos", "token_id"):
            tokens[k] = np.concatenate(tokens[k]) if tokens[k] else np.zeros(0)
        n_b, n_l, n_h = len(batch), len(self.layers), len(self.heads)
        kv_group = self.loaded.info["n_heads"] // self.loaded.info["n_kv_heads"]
        shape = (n_b, n_l, n_h)
        doc_ids = np.array([t.doc.doc_id for t in batch], dtype=np.int64)
        heads: dict[str, Any] = {
            "doc_id": np.broadcast_to(doc_ids[:, None, None], shape).ravel(),
            "layer": np.broadcast_to(np.array(self.layers)[None, :, None], shape).ravel(),
            "head": np.broadcast_to(np.array(self.heads)[None, None, :], shape).ravel(),
            "kv_head": np.broadcast_to(
                np.array(self.heads)[None, None, :] // kv_group, shape
            ).ravel(),
            "n_tokens": np.broadcast_to(
                np.array([len(t.ids) for t in batch])[:, None, None], shape
            ).ravel(),
        }
        heads.update({k: v.ravel() for k, v in score_arrays.items()})
        names = ("n_queries", "n_duplicate", "n_induction")
        for name, values in zip(names, counts or (np.zeros(0),) * 3, strict=True):
            heads[name] = np.broadcast_to(np.asarray(values)[:, None, None], shape).ravel()
        return Segment(docs=docs, tokens=tokens, heads=heads, codes=codes)
