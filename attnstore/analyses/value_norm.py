"""``value_norm``: pattern scores of norm-weighted attention (Kobayashi et al. 2020).

Attention weights alone mislead: a head that pours its weight onto the first token or a separator
often multiplies it by a tiny transformed value. Kobayashi et al. write head ``h``'s output at query
``q`` as Σ_k α_{q,k} f_h(x_k) and weigh each key by ``‖f_h(x_k)‖``:

    f_h(x_k) = W_O^h (W_V^{g(h)} x_k + b_V^{g(h)})

- ``W_V^{g} x_k + b_V^{g}``: the output of the layer's value projection (``v_proj``; BERT:
  ``attention.self.value``) for key position ``k``, bias included, sliced to key/value head
  ``g(h) = h // (n_heads / n_kv_heads)`` (grouped-query attention: the kv head that query head
  ``h`` reads; multi-head attention: ``g(h) = h``). It is read by a forward hook on that
  projection, so it is exactly what the attention of that forward pass multiplies.
- ``W_O^h``: the columns ``h·d … (h+1)·d − 1`` of the output projection's weight (``o_proj``;
  BERT: ``attention.output.dense``), ``d`` the head size. The output projection's bias is *not*
  included: it is added once after the heads are summed, not per key.

The norm-weighted rows are ``α̃_{q,k} = α_{q,k} ‖f_h(x_k)‖ / Σ_j α_{q,j} ‖f_h(x_j)‖`` and this
analysis writes, per (document, layer, head), the pattern scores of ``schemas/scores.md`` computed on
``α̃`` instead of ``α`` (bidirectional scores for encoders): e.g. its ``sink`` is the mean over
q ∈ Q1 of α_{q,0}·‖f_h(x_0)‖ / Σ_k α_{q,k}·‖f_h(x_k)‖, to compare with ``heads.sink``. It adds
``mean_norm`` = the mean over the document's keys of ``‖f_h(x_k)‖`` (the scale the weights meet).
Rows of models with learned sinks (which sum below 1) are renormalised by the same division.

The norms come from the model, so the analysis must be bound to it once before the first batch:
``ValueNorm().bind(model)`` registers the hooks (``unbind()`` removes them). Supported: attention
modules with ``v_proj``/``o_proj`` (Llama, Mistral, Qwen, Gemma, GPT-OSS, OLMo, … families) and
BERT-family encoders; others raise ``ValueError`` in :meth:`ValueNorm.bind`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from attnstore import bidirectional_scores, scores

if TYPE_CHECKING:
    import torch

    from attnstore.abc.analysis import Batch

__all__ = ["ValueNorm", "value_norms"]

#: score columns of the value_norm table (schemas/scores.md, on norm-weighted rows)
COLUMNS = (*scores.SCORE_COLUMNS, *bidirectional_scores.EXTRA_COLUMNS)


def value_norms(value_out: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``‖W_O^h v_{g(h),k}‖`` ``[B, n_heads, T]`` (float32) from the value projection's output
    ``[B, T, n_kv · d]`` and the output projection's weight ``[hidden, n_heads · d]``."""
    import torch

    b, t, kv_width = value_out.shape
    d = o_weight.shape[1] // n_heads
    n_kv = kv_width // d
    v = value_out.float().reshape(b, t, n_kv, d)
    w = o_weight.float().reshape(o_weight.shape[0], n_heads, d)  # [hidden, head, d]
    group = n_heads // n_kv
    out = torch.empty((b, n_heads, t), dtype=torch.float32, device=value_out.device)
    for h in range(n_heads):
        out[:, h] = torch.linalg.vector_norm(v[:, :, h // group] @ w[:, h].T, dim=-1)
    return out


def _projections(model: Any) -> list[tuple[int, Any, Any, int]]:
    """(layer, value projection, output projection, n_heads) for every self-attention layer."""
    found = []
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            continue
        v, o = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
        if v is not None and getattr(module, "v_norm", None) is not None:
            raise ValueError(
                f"value_norm: {type(module).__name__} normalises its values after v_proj "
                "(v_norm); the hook on v_proj would not see what attention multiplies."
            )
        n_heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
        if v is None and hasattr(module, "value") and hasattr(module, "num_attention_heads"):
            v, n_heads = module.value, module.num_attention_heads  # BERT: BertSelfAttention
            o = None
            for parent in model.modules():  # BertAttention holds .self and .output.dense
                if getattr(parent, "self", None) is module and hasattr(parent, "output"):
                    o = parent.output.dense
        if v is None or o is None or n_heads is None:
            continue
        found.append((int(layer), v, o, int(n_heads)))
    return found


class ValueNorm:
    """The ``value_norm`` analysis (module docstring); :meth:`bind` it to the model first."""

    name = "value_norm"
    schema = pa.schema(
        [
            pa.field("doc_id", pa.int64(), nullable=False),
            pa.field("layer", pa.int32(), nullable=False),
            pa.field("head", pa.int32(), nullable=False),
            *(pa.field(c, pa.float64()) for c in COLUMNS),
            pa.field("mean_norm", pa.float64()),
            pa.field("n_queries", pa.int32(), nullable=False),
        ]
    )

    def __init__(self, *, bidirectional: bool = False, separators: tuple[int, ...] = ()) -> None:
        self.bidirectional = bidirectional
        self.separators = separators
        self._handles: list[Any] = []
        self._norms: dict[int, torch.Tensor] = {}  # layer → [B, n_heads, T] of this forward
        self._batch: Batch | None = None

    # -- binding to the model ------------------------------------------------------------------
    def bind(self, model: Any, tokenizer: Any = None) -> None:
        """Hook every self-attention layer's value projection; ``tokenizer`` gives separators.

        Encoders are recognised by their attention modules (``is_causal`` False)."""
        from attnstore.capture.model import _is_bidirectional

        self.unbind()
        layers = _projections(model)
        if not layers:
            raise ValueError(
                f"value_norm: {type(model).__name__} has no attention layers with a separate "
                "value and output projection (v_proj/o_proj, or BERT's value/output.dense)."
            )
        self.bidirectional = _is_bidirectional(model)
        if tokenizer is not None:
            self.separators = bidirectional_scores.separator_ids(tokenizer)
        for layer, v, o, n_heads in layers:

            def hook(
                _m: Any, _args: Any, out: Any, layer: int = layer, o: Any = o, n: int = n_heads
            ) -> None:
                self._norms[layer] = value_norms(out.detach(), o.weight.detach(), n)

            self._handles.append(v.register_forward_hook(hook))

    def unbind(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the analysis protocol -----------------------------------------------------------------
    def begin(self, batch: Batch) -> None:
        self._batch = batch
        self._norms = {}
        self._masks = scores.batch_masks(batch.token_ids, batch.lengths)
        self._acc: dict[int, Any] = {}
        self._heads: dict[int, list[int]] = {}
        self._mean_norm: dict[int, np.ndarray] = {}

    def rows(self, layer: int, q0: int, probs: torch.Tensor) -> None:
        import torch

        batch = self._batch
        if batch is None:
            raise RuntimeError("value_norm: rows() before begin()")
        norms = self._norms.get(layer)
        if norms is None:
            raise RuntimeError(
                f"value_norm: no value norms for layer {layer}: bind(model) before extracting"
            )
        heads = list(batch.heads) or list(range(probs.shape[1]))
        k = probs.shape[-1]
        f = norms[:, heads, :k].to(probs.device)  # [B, H, K]
        weighted = probs * f[:, :, None, :]
        total = weighted.sum(-1, keepdim=True)
        weighted = torch.where(total > 0, weighted / total.clamp_min(1e-30), weighted)
        acc = self._acc.get(layer)
        if acc is None:
            if self.bidirectional:
                acc = bidirectional_scores.LayerScores(
                    self._masks, len(heads), batch.token_ids, self.separators
                )
            else:
                acc = scores.LayerScores(self._masks, len(heads))
            self._acc[layer] = acc
            self._heads[layer] = heads
            t = norms.shape[-1]
            real = (torch.arange(t, device=norms.device)[None, :] < batch.lengths[:, None].to(
                norms.device
            )).float()  # fmt: skip
            mean = (norms[:, heads] * real[:, None]).sum(-1) / real.sum(-1).clamp_min(1)[:, None]
            self._mean_norm[layer] = mean.double().cpu().numpy()
        acc.add(weighted, q0)

    def end(self) -> pa.Table:
        batch = self._batch
        if batch is None:
            raise RuntimeError("value_norm: end() before begin()")
        columns: dict[str, list[Any]] = {f.name: [] for f in self.schema}
        n_q = self._masks.n_queries.cpu().numpy()
        for layer in sorted(self._acc):
            result = self._acc[layer].result()
            heads = self._heads[layer]
            for i, doc_id in enumerate(batch.doc_ids):
                for j, head in enumerate(heads):
                    columns["doc_id"].append(int(doc_id))
                    columns["layer"].append(layer)
                    columns["head"].append(head)
                    for c in COLUMNS:
                        v = result[c][i, j] if c in result else np.nan
                        columns[c].append(None if np.isnan(v) else float(v))
                    columns["mean_norm"].append(float(self._mean_norm[layer][i, j]))
                    columns["n_queries"].append(int(n_q[i]))
        self._batch = None
        self._norms = {}
        return pa.table(columns, schema=self.schema)
