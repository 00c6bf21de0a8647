"""Tiny random-init models for tests, benchmarks and golden fixtures (no model hub needed).

The tokenizer is a byte-level BPE trained in well under a second on Python's own documentation;
models are built from a config with a fixed seed and saved with ``save_pretrained``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

__all__ = [
    "ARCHITECTURES",
    "EXACT",
    "MATRIX_TEXTS",
    "MODES",
    "TINY",
    "UNSEEN",
    "Architecture",
    "MatrixResult",
    "architecture",
    "capability_table",
    "check_architecture",
    "matrix_results",
    "pad_batch",
    "reference_attention",
    "save_tiny_gpt2",
    "save_tiny_llama",
    "save_tiny_tokenizer",
    "tiny_model",
    "tiny_tokenizer",
]


def save_tiny_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    tiny_tokenizer(vocab_size).save_pretrained(folder)
    return folder


def _save(model: Any, folder: Path, tokenizer_dir: Path | None) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    if tokenizer_dir is None:
        save_tiny_tokenizer(folder, model.config.vocab_size)
    else:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def save_tiny_llama(
    folder: Path, tokenizer_dir: Path | None = None, seed: int = 0, **config: Any
) -> Path:
    """Llama family with GQA (4 query heads share 2 kv heads), rotary embeddings, 3 layers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    params: dict[str, Any] = {
        "vocab_size": 400,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    params.update(config)
    return _save(LlamaForCausalLM(LlamaConfig(**params)), folder, tokenizer_dir)


def save_tiny_gpt2(
    folder: Path, tokenizer_dir: Path | None = None, seed: int = 1, **config: Any
) -> Path:
    """GPT-2: learned positions, fused qkv, inverse-layer scaling switched on."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    params: dict[str, Any] = {
        "vocab_size": 400,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "scale_attn_by_inverse_layer_idx": True,
    }
    params.update(config)
    return _save(GPT2LMHeadModel(GPT2Config(**params)), folder, tokenizer_dir)


# --------------------------------------------------------------------------------------------
# the architecture matrix (tests/capture/test_architectures.py, scripts/capability_table.py)
# --------------------------------------------------------------------------------------------
#: what every tiny matrix model has: 2 layers, hidden 32, 4 heads, weights large enough
#: (initializer_range 0.2) that attention is far from uniform
TINY: Final[dict[str, Any]] = {
    "vocab_size": 400,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class Architecture:
    """One row of the capability table: a tiny config of one transformers architecture."""

    name: str
    model_type: str
    exercises: str
    config: dict[str, Any] = field(default_factory=dict)
    #: keys of :data:`TINY` this config spells differently (e.g. MPT's ``d_model``)
    rename: dict[str, str] = field(default_factory=dict)


ARCHITECTURES: Final[tuple[Architecture, ...]] = (
    Architecture("Llama", "llama", "GQA (4 query heads, 2 kv heads), rotary",
                 {"num_key_value_heads": 2}),
    Architecture("Mistral", "mistral", "sliding window 4, GQA",
                 {"num_key_value_heads": 2, "sliding_window": 4}),
    Architecture("Qwen2", "qwen2", "GQA, qkv bias", {"num_key_value_heads": 2}),
    Architecture("Qwen2 (sliding layers)", "qwen2", "sliding window 4 from layer 1 on",
                 {"num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 4,
                  "max_window_layers": 1}),
    Architecture("Qwen3", "qwen3", "q/k norm, GQA", {"num_key_value_heads": 2, "head_dim": 8}),
    Architecture("Gemma", "gemma", "GQA, head_dim 8", {"num_key_value_heads": 2, "head_dim": 8}),
    Architecture("Gemma2", "gemma2", "soft-capping 5, sliding window 4, query_pre_attn_scalar",
                 {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4,
                  "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 6}),
    Architecture("Gemma3", "gemma3_text", "soft-capping 5, sliding window 4 on layer 0, q/k norm",
                 {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4,
                  "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 6,
                  "layer_types": ["sliding_attention", "full_attention"]}),
    Architecture("GPT-NeoX", "gpt_neox", "partial rotary (25%)", {"rotary_pct": 0.25}),
    Architecture("GPT-2", "gpt2", "learned positions, inverse-layer scaling",
                 {"scale_attn_by_inverse_layer_idx": True}),
    Architecture("GPT-Neo", "gpt_neo", "local attention (window 4) on layer 1, no scaling",
                 {"attention_types": [[["global", "local"], 1]], "window_size": 4},
                 {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}),
    Architecture("OPT", "opt", "learned positions with offset",
                 {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    Architecture("Falcon (rotary)", "falcon", "rotary, multi-query",
                 {"alibi": False, "multi_query": True}),
    Architecture("Falcon (ALiBi)", "falcon", "ALiBi, multi-head",
                 {"alibi": True, "multi_query": False}),
    Architecture("GPT-J", "gptj", "rotary on 4 of 8 dims (interleaved)", {"rotary_dim": 4}),
    Architecture("Phi", "phi", "partial rotary (50%), qk layernorm",
                 {"partial_rotary_factor": 0.5, "qk_layernorm": True}),
    Architecture("Phi-3", "phi3", "fused qkv, GQA", {"num_key_value_heads": 2}),
    Architecture("StableLM", "stablelm", "partial rotary (25%), GQA",
                 {"num_key_value_heads": 2, "partial_rotary_factor": 0.25}),
    Architecture("GPTBigCode", "gpt_bigcode", "multi-query (1 kv head)", {"multi_query": True}),
    Architecture("OLMo", "olmo", "non-parametric layer norm", {}),
    Architecture("OLMo-2", "olmo2", "q/k norm after projection", {"num_key_value_heads": 2}),
    Architecture("Cohere", "cohere", "interleaved rotary, GQA", {"num_key_value_heads": 2}),
    Architecture("Granite", "granite", "attention multiplier 0.3",
                 {"num_key_value_heads": 2, "attention_multiplier": 0.3}),
    Architecture("Mixtral", "mixtral", "mixture of experts (2), GQA",
                 {"num_key_value_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1}),
    Architecture("Bloom", "bloom", "ALiBi", {},
                 {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}),
    Architecture("MPT", "mpt", "ALiBi (bias max 8), clipped qkv",
                 {"expansion_ratio": 2, "attn_config": {"alibi": True, "clip_qkv": 4.0}},
                 {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                  "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}),
    Architecture("SmolLM3", "smollm3", "NoPE on every second layer, GQA",
                 {"num_key_value_heads": 2, "no_rope_layer_interval": 2}),
    Architecture("GPT-OSS", "gpt_oss",
                 "learned sink logits (rows sum below 1), sliding window 4 on layer 0, GQA",
                 {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4,
                  "layer_types": ["sliding_attention", "full_attention"],
                  "num_local_experts": 2, "num_experts_per_tok": 1}),
    Architecture("DeepSeek-V3", "deepseek_v3",
                 "multi-head latent attention (query/key head 16, value head 8)",
                 {"num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 8,
                  "qk_rope_head_dim": 4, "qk_nope_head_dim": 12, "v_head_dim": 8,
                  "n_routed_experts": 2, "num_experts_per_tok": 1, "first_k_dense_replace": 1,
                  "n_group": 1, "topk_group": 1, "moe_intermediate_size": 16}),
)  # fmt: skip

#: the documents of one padded batch: three different lengths
MATRIX_TEXTS: Final = (
    "The cat sat on the mat and the cat slept on the mat.",
    "def f(x): return x + 1  # f",
    "Short.",
)


def architecture(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise KeyError(f"Unknown architecture {name!r}. Known: {[a.name for a in ARCHITECTURES]}")


def tiny_tokenizer(vocab_size: int = 400, extra_texts: Sequence[str] = ()) -> Any:
    """The byte-level BPE tokenizer of :func:`save_tiny_tokenizer`, in memory.

    ``extra_texts`` join the training texts (e.g. names repeated so each becomes one token).
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]] + list(extra_texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def pad_batch(
    docs: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[doc, T_max]`` of token id lists, right-padded: what a
    plain Hugging Face loop feeds the model (the baselines of the benchmarks in ``scripts/``).

    >>> ids, mask = pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    import torch

    t = max((len(d) for d in docs), default=0)
    ids = torch.full((len(docs), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(docs), t), dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor(list(d), dtype=torch.long)
        mask[i, : len(d)] = 1
    return ids, mask


def tiny_model(name: str, *, seed: int = 0, attn_implementation: str | None = None) -> Any:
    """The random-init model of :data:`ARCHITECTURES` row ``name``, built in memory, float32.

    The same ``seed`` gives the same weights whatever ``attn_implementation``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    arch = architecture(name)
    params = {arch.rename.get(k, k): v for k, v in TINY.items()}
    params.update(arch.config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(arch.model_type, **params)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def reference_attention(name: str, ids: list[int], *, seed: int = 0) -> Any:
    """Attention ``[layer, head, T, T]`` (float64 numpy) of one document alone, computed without
    attnstore: transformers' eager attention with ``output_attentions=True`` (no padding, so no
    mask to get wrong), except for Falcon, whose returned attention is wrong (its eager path double
    counts ALiBi; with sdpa it adds the boolean mask): rotary Falcon runs eager with a float mask,
    ALiBi Falcon is computed from the textbook formula ``softmax((q·k + m_h·j) / √d)``."""
    import torch

    arch = architecture(name)
    x = torch.tensor([ids])
    if arch.model_type == "falcon" and arch.config.get("alibi"):
        # each layer's input comes from the model's default (sdpa) forward, the one whose
        # attention counts ALiBi once
        return _falcon_alibi_reference(tiny_model(name, seed=seed, attn_implementation="sdpa"), x)
    model = tiny_model(name, seed=seed, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=x, output_attentions=True, use_cache=False)
    return torch.stack([a[0] for a in out.attentions]).double().numpy()


def _falcon_alibi_reference(model: Any, x: Any) -> Any:
    import math

    import torch

    cfg = model.config
    h = cfg.num_attention_heads
    d = cfg.hidden_size // h
    inputs: list[Any] = []
    hooks = [
        layer.self_attention.register_forward_pre_hook(
            lambda _m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for layer in model.transformer.h
    ]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for hook in hooks:
        hook.remove()
    t = x.shape[1]
    # ALiBi slopes for a power-of-two head count: 2^(-8 i / h), i = 1 … h. transformers rounds
    # slope × position to bfloat16 (so does this reference, to be the model's own bias).
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])
    bias = (slopes.bfloat16()[:, None] * torch.arange(t)[None, :]).float()  # [head, key]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    out = []
    with torch.no_grad():
        for layer, hidden in zip(model.transformer.h, inputs, strict=True):
            qkv = layer.self_attention.query_key_value(hidden).view(1, t, h, 3, d)
            q, k = qkv[0, :, :, 0].transpose(0, 1), qkv[0, :, :, 1].transpose(0, 1)
            logits = (q.double() @ k.double().transpose(-1, -2) + bias.double()[:, None, :])
            logits = (logits / math.sqrt(d)).masked_fill(~causal, float("-inf"))
            out.append(torch.softmax(logits, dim=-1))
    return torch.stack(out).numpy()


# --------------------------------------------------------------------------------------------
# a model class the matrix has never seen: Llama with a hand-written attention module
# --------------------------------------------------------------------------------------------
#: behaviours of the hand-written attention module (it never calls AttentionInterface)
CUSTOM_BEHAVIOURS: Final = {
    "none": "returns no attention weights",
    "future": "returns weights that attend to future tokens",
    "exact": "returns its exact weights",
}

UNSEEN: Final[tuple[Architecture, ...]] = tuple(
    Architecture(
        f"Custom attention module ({key})",
        "llama",
        f"hand-written attention that bypasses AttentionInterface and {what}",
        {"num_key_value_heads": 2},
    )
    for key, what in CUSTOM_BEHAVIOURS.items()
)


def _custom_attention_class() -> Any:
    import torch
    from transformers.models.llama import modeling_llama

    class HandWrittenAttention(modeling_llama.LlamaAttention):
        """Llama's projections with attention written out by hand, as a user's own model might."""

        behaviour = "none"

        def forward(
            self,
            hidden_states: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
            attention_mask: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            b, t, _ = hidden_states.shape
            shape = (b, t, -1, self.head_dim)
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            if position_embeddings is not None:
                q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            logits = (q @ k.transpose(-1, -2)) * self.scaling
            if self.behaviour != "future":
                causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
                logits = logits.masked_fill(~causal, float("-inf"))
                if attention_mask is not None and attention_mask.dtype == torch.bool:
                    logits = logits.masked_fill(~attention_mask[..., :t], float("-inf"))
                elif attention_mask is not None:
                    logits = logits + attention_mask[..., :t]
            probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
            out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
            return self.o_proj(out), None if self.behaviour == "none" else probs

    return HandWrittenAttention


def _with_custom_attention(model: Any, behaviour: str) -> Any:
    cls = _custom_attention_class()
    for layer in model.model.layers:
        layer.self_attn.__class__ = cls
        layer.self_attn.behaviour = behaviour
    return model


# --------------------------------------------------------------------------------------------
# measuring one cell of the matrix, and the README table
# --------------------------------------------------------------------------------------------
#: largest difference from the reference that counts as exact (lossless codec, float32)
EXACT: Final = 1e-5
MODES: Final = ("eager", "sdpa")
TABLE_BEGIN: Final = "<!-- capability-table: generated by scripts/capability_table.py -->"
TABLE_END: Final = "<!-- capability-table: end -->"


@dataclass(frozen=True)
class MatrixResult:
    """One architecture under one ``--attention`` mode."""

    name: str
    mode: str
    path: str | None  # None: refused
    failures: tuple[str, ...] = ()
    matrix_error: float = float("nan")
    score_error: float = float("nan")

    @property
    def exact(self) -> bool:
        return self.path is not None and max(self.matrix_error, self.score_error) <= EXACT


def check_architecture(name: str, mode: str, *, tokenizer: Any = None) -> MatrixResult:
    """Extract :data:`MATRIX_TEXTS` in one padded batch with the lossless codec and compare every
    stored matrix and score with :func:`reference_attention` of each document alone."""
    import math
    import warnings

    import numpy as np
    import torch

    from attnstore import scores
    from attnstore.capture import Extractor, prepare_model
    from attnstore.codecs import get_codec
    from attnstore.corpus import Document
    from attnstore.errors import AttentionCaptureError

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    model = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = prepare_model(model, tok, model_id=f"tiny {name}")
        try:
            ex = Extractor(loaded, get_codec("float32"), max_length=64, mode=mode)
            docs = [ex.tokenize(Document(i, text)) for i, text in enumerate(MATRIX_TEXTS)]
            segment = ex.run(docs)
        except AttentionCaptureError as err:
            return MatrixResult(name, mode, None, tuple(err.failures))
    heads = segment.heads
    matrix_error = score_error = 0.0
    for i, doc in enumerate(docs):
        ref = _reference(name, tuple(doc.ids))
        n_l, n_h, t, _ = ref.shape
        lower = np.flatnonzero(np.tril(np.ones((t, t), dtype=bool)))
        expected = ref.reshape(n_l, n_h, t * t)[..., lower]
        matrix_error = max(matrix_error, float(np.abs(segment.codes[i] - expected).max()))
        masks = scores.batch_masks(torch.tensor([doc.ids]), torch.tensor([t]))
        for layer in range(n_l):
            want = scores.score_layer(torch.from_numpy(ref[layer][None]).float(), masks)
            rows = (heads["doc_id"] == i) & (heads["layer"] == layer)
            for column, values in want.items():
                got = np.asarray(heads[column])[rows]
                both_null = np.isnan(got) & np.isnan(values[0])
                diff = np.where(both_null, 0.0, np.abs(got - values[0]))
                score_error = max(score_error, float(np.nan_to_num(diff, nan=math.inf).max()))
    return MatrixResult(name, mode, loaded.path, (), matrix_error, score_error)


def _build(name: str) -> Any:
    for arch in UNSEEN:
        if arch.name == name:
            behaviour = name.split("(")[-1].rstrip(")")
            return _with_custom_attention(tiny_model("Llama"), behaviour)
    return tiny_model(name)


@functools.lru_cache(maxsize=256)
def _reference(name: str, ids: tuple[int, ...]) -> Any:
    for arch in UNSEEN:
        if arch.name == name:
            return reference_attention("Llama", list(ids))
    return reference_attention(name, list(ids))


def capability_table(results: list[MatrixResult]) -> str:
    """The README's capability table (Markdown) from :func:`check_architecture` results."""
    by = {(r.name, r.mode): r for r in results}
    lines = [
        (
            "| architecture | `model_type` | the tiny model exercises | path | "
            "`--attention eager` | `--attention sdpa` |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for arch in (*ARCHITECTURES, *UNSEEN):
        cells = [by[(arch.name, mode)] for mode in MODES if (arch.name, mode) in by]
        if not cells:
            continue
        paths = sorted({c.path or "none" for c in cells})
        marks = []
        for c in cells:
            if c.path is None:
                marks.append(f"refused: {'; '.join(_short(f) for f in c.failures)}")
            else:
                marks.append("exact" if c.exact else "**wrong**")
        lines.append(
            f"| {arch.name} | `{arch.model_type}` | {arch.exercises} | {', '.join(paths)} | "
            + " | ".join(marks)
            + " |"
        )
    return "\n".join(lines)


#: failure text → the short reason the table shows (no numbers, so the table does not drift)
_REASONS: Final = (
    ("never called", "attention function never called"),
    ("no attention weights", "no weights returned"),
    ("future or padding keys", "weight on future or padding keys"),
    ("do not sum to 1", "rows do not sum to 1"),
    ("changes the model's output", "asking for weights changes the output"),
    ("rebuilt", "recomputed output differs from the model's"),
)


def _short(failure: str) -> str:
    path, _, why = failure.partition(": ")
    for needle, reason in _REASONS:
        if needle in why:
            return f"{path}: {reason}"
    return f"{path}: {why.split(' (')[0]}"


def matrix_results(tokenizer: Any = None) -> list[MatrixResult]:
    """Every architecture (and the unseen custom modules) under every mode."""
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    return [
        check_architecture(arch.name, mode, tokenizer=tok)
        for arch in (*ARCHITECTURES, *UNSEEN)
        for mode in MODES
    ]
