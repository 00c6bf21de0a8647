"""Loading a model for capture: a causal LM (or an encoder) and its tokenizer, with attention
routed to attnstore (:func:`load_model`, :func:`prepare_model`, :class:`LoadedModel`)."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Final

import torch

from attnstore.capture.hook import _IMPL, _register
from attnstore.capture.recipes import _recipe
from attnstore.errors import AttentionCaptureError, ModelError
from attnstore.layout import ModelInfo, TokenizerInfo
from attnstore.modelref import not_cached_message as _not_cached_message
from attnstore.modelref import resolve as _resolve

__all__ = ["AttentionWarning", "LoadedModel", "load_model", "prepare_model"]


class AttentionWarning(UserWarning):
    """Extraction falls back to a slower path."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    tokenizer_info: TokenizerInfo
    max_positions: int | None
    device: torch.device
    captured: bool  # True: per-layer capture through attnstore's attention function
    #: how attention reaches attnstore, one of :data:`~attnstore.capture.paths.PATHS`; chosen and
    #: re-checked by the Extractor
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
