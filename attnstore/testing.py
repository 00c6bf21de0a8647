"""Tiny random-init models for tests, benchmarks and golden fixtures (no model hub needed).

The tokenizer is a byte-level BPE trained in well under a second on Python's own documentation;
models are built from a config with a fixed seed and saved with ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["save_tiny_gpt2", "save_tiny_llama", "save_tiny_tokenizer"]


def save_tiny_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
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
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
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
