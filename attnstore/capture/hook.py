"""attnstore's attention function: a layer's probabilities, a block of query rows at a time.

Registered with transformers' ``AttentionInterface`` (and its mask builder with
``AttentionMaskInterface``) as ``"attnstore"``: it computes the probabilities in float32 from the
layer's queries and keys (after rotary embedding), hands them to the active capture
(:data:`_ACTIVE`, set by :func:`attnstore.capture.paths.forward` for one forward pass) one block of
rows at a time, and returns ``probs @ value`` exactly as eager attention does.
"""

from __future__ import annotations

from typing import Any, Final

import torch

__all__: list[str] = []

_IMPL: Final = "attnstore"


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
