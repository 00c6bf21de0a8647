"""The paths by which attention reaches attnstore (:data:`PATHS`), one forward pass through each
(:func:`forward`), and the check every delivered block passes before it is encoded (:class:`_RowCheck`).

``"function"``
    attnstore's attention function (:mod:`attnstore.capture.hook`), one layer at a time; every
    stored layer must have been routed through it exactly once.
``"recompute"``
    forward hooks on attention modules that attnstore has a recipe for
    (:mod:`attnstore.capture.recipes`); a rebuilt output that differs from the model's refuses it.
``"output_attentions"``
    transformers' eager attention with ``output_attentions=True`` (all layers alive at once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import torch

from attnstore.capture import hook
from attnstore.capture.recipes import _recipe

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.capture.model import LoadedModel

__all__ = ["PATHS", "forward"]

#: how attention reaches attnstore, in the order they are tried (see the module docstring)
PATHS: Final = ("function", "recompute", "output_attentions")


class _Undelivered(Exception):
    """A capture path did not deliver exact attention for this batch; the next path is tried."""


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


def forward(
    loaded: LoadedModel,
    path: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    consume: Any,
    done: Any,
    online: Any,
    check: _RowCheck,
    *,
    layers: Sequence[int],
    mode: str,
    chunk_bytes: int,
    values: str,
    first_use: bool,
) -> None:
    """One forward pass delivering every stored layer (``layers``) through ``path`` to
    ``consume(layer, q0, probs, …)`` and ``done(layer)`` (``online``: scores-only, the fused
    pass), checked by ``check``; or :class:`_Undelivered`. ``first_use``: the path is new for
    this model, so ``output_attentions`` is compared with the plain forward pass."""
    model = loaded.model
    body = _body(model)  # no vocabulary logits on the paths that do not compare them
    n_layers = loaded.info["n_layers"]
    if path == "function":
        cap = hook._Capture(consume, done, mode=mode, chunk_bytes=chunk_bytes, online=online)
        cap.want_logits = values == "logits"
        hook._ACTIVE = cap  # what the attention function hands its rows to
        try:
            body(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            hook._ACTIVE = None
        if not cap.layer_calls:
            raise _Undelivered(
                "attnstore's attention function was never called (the model computes "
                "attention in its own code)"
            )
        expected = set(layers) if loaded.bidirectional else set()
        if cap.bidirectional & set(layers) != expected:
            raise _Undelivered(
                "the attention of layers "
                f"{sorted(cap.bidirectional ^ expected)} is "
                + ("causal in an encoder" if expected else "bidirectional in a causal model")
            )
        wrong = {
            layer: cap.layer_calls.get(layer, 0)
            for layer in layers
            if cap.layer_calls.get(layer, 0) != 1
        }
        if wrong:
            raise _Undelivered(
                "calls of attnstore's attention function per stored layer were "
                f"{wrong}, expected one each"
            )
    elif path == "recompute":
        valid = mask.bool()

        def recompute(module: Any, args: Any, kwargs: Any, output: Any) -> None:
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
            m.register_forward_hook(recompute, with_kwargs=True)
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
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
        except (ValueError, NotImplementedError, TypeError) as err:
            raise _Undelivered(f"output_attentions=True failed: {err}") from None
        attentions = list(getattr(out, "attentions", None) or ())
        missing = [i for i in range(n_layers) if i >= len(attentions) or attentions[i] is None]
        if missing or len(attentions) != n_layers:
            raise _Undelivered(
                f"no attention weights returned (layers {missing} of 0…{n_layers - 1})"
            )
        if first_use:
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
            if tuple(probs.shape) != (b, loaded.info["n_heads"], t, t):
                raise _Undelivered(
                    f"layer {layer} returned attention of shape {tuple(probs.shape)}"
                )
            consume(layer, 0, probs)
            done(layer)
    problems = check.problems(layers, online_ok=path == "function" and online is not None)
    if problems:
        raise _Undelivered("; ".join(problems))
