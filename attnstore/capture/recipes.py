"""The ``"recompute"`` capture path's recipes: for attention modules that keep their own attention
code (Falcon), the probabilities recomputed in float32 from the layer's own projection, rotary
embedding or ALiBi bias and mask, and the layer's output rebuilt from them (compared with the
model's own output by :func:`attnstore.capture.paths.forward`)."""

from __future__ import annotations

from typing import Any, Final

import torch

__all__: list[str] = []


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
