"""Running a transformers model over documents and capturing every layer's attention.

(Named capture, not extract, so that ``attnstore.extract`` stays the function.)

This package is where attnstore runs transformers (test fixtures aside: :mod:`attnstore.testing`).
Fused attention kernels (sdpa, flash) never build the probability matrix, so attnstore routes every
attention layer through its own attention function (registered with transformers'
``AttentionInterface`` as ``"attnstore"``, :mod:`attnstore.capture.hook`). It computes the
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


The package, by part: :mod:`~attnstore.capture.model` (loading, :class:`LoadedModel`),
:mod:`~attnstore.capture.hook` (the attention function and its mask builder),
:mod:`~attnstore.capture.recipes` (the recompute path's recipes), :mod:`~attnstore.capture.paths`
(the paths, one forward pass, the row check), :mod:`~attnstore.capture.tokens` (tokenization,
readable tokens, probe documents), :mod:`~attnstore.capture.codes` (rows into stored codes),
:mod:`~attnstore.capture.segment` (a batch as rows), :mod:`~attnstore.capture.extractor`
(:class:`Extractor`).
"""

from __future__ import annotations

from attnstore.capture.extractor import VALUES, Extractor
from attnstore.capture.hook import _register
from attnstore.capture.model import (
    AttentionWarning,
    LoadedModel,
    _is_bidirectional,
    load_model,
    prepare_model,
)
from attnstore.capture.paths import PATHS, _body
from attnstore.capture.tokens import Tokenized, probe_documents, readable_tokens, tokenize_prefix
from attnstore.modelref import DEFAULT_MODEL, resolve_model_id

__all__ = [
    "DEFAULT_MODEL",
    "PATHS",
    "VALUES",
    "AttentionWarning",
    "Extractor",
    "LoadedModel",
    "Tokenized",
    "_body",
    "_is_bidirectional",
    "_register",
    "load_model",
    "prepare_model",
    "probe_documents",
    "readable_tokens",
    "resolve_model_id",
    "tokenize_prefix",
]
