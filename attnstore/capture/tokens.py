"""Documents as token ids: :class:`Tokenized` (ids, character spans, aligned parse and probe
items), tokenization by prefixes of huge documents, readable token text, and the probe documents
built with a model's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from attnstore import needles, probes, syntax
from attnstore.corpus import Document, InductionProbe
from attnstore.errors import ModelError
from attnstore.syntax import Alignment

if TYPE_CHECKING:
    from collections.abc import Sequence

    from attnstore.capture.model import LoadedModel

__all__ = ["Tokenized", "probe_documents", "readable_tokens", "tokenize", "tokenize_prefix"]


@dataclass(frozen=True)
class Tokenized:
    doc: Document
    ids: list[int]
    n_input: int
    #: character span of each stored token in ``doc.text``; None for special tokens or unknown
    spans: list[tuple[int, int] | None] | None = None
    #: words of the parse aligned to the tokens (``--parse`` or a CoNLL-U corpus)
    alignment: Alignment | None = None
    #: span-probe items aligned to the tokens (schemas/probes.md)
    probe_items: tuple[probes.Aligned, ...] | None = None

    @property
    def truncated(self) -> bool:
        return self.n_input > len(self.ids)


#: Characters of a document tokenized first: 16 per token of ``--max-length`` (plus slack); a
#: document longer than that is tokenized by growing prefixes (×4) until one yields enough tokens.
PREFIX_CHARS_PER_TOKEN: Final = 16


#: A token counts towards "enough" only if it ends this many characters before the prefix's cut
#: (tokens near the cut may merge differently once more text follows).
PREFIX_MARGIN: Final = 1024


def tokenize_prefix(
    tok: Any, text: str, max_length: int
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids (and character offsets, for a fast tokenizer) of ``text`` as far as
    ``max_length`` tokens can use: never the whole of a huge document (a 50 MB line).

    A document that fits the first window is tokenized whole, exactly as before; a longer one by
    growing prefixes, stopping at the first whose tokens include more than ``max_length`` that end
    :data:`PREFIX_MARGIN` characters before the cut. Its ``n_tokens_input`` then counts the tokens
    of that prefix: a lower bound, more than ``max_length``, so ``truncated`` is still right.
    """
    fast = getattr(tok, "is_fast", False)
    window = PREFIX_CHARS_PER_TOKEN * (max_length + 8) + PREFIX_MARGIN
    while True:
        whole = window >= len(text)
        piece = text if whole else text[:window]
        if fast:
            enc = tok(piece, add_special_tokens=True, return_offsets_mapping=True)
            ids = list(enc.input_ids)
            offsets = [(int(a), int(b)) for a, b in enc.offset_mapping]
            settled = sum(1 for _, end in offsets if 0 < end <= window - PREFIX_MARGIN)
        else:
            ids, offsets = list(tok(piece, add_special_tokens=True).input_ids), None
            settled = len(ids) - PREFIX_MARGIN // 16
        if whole or settled > max_length:
            return ids, offsets
        window *= 4


def tokenize(
    doc: Document, tok: Any, max_length: int, *, bidirectional: bool = False, nlp: Any = None
) -> Tokenized:
    """``doc``'s token ids (truncated to ``max_length``; an encoder's, ``bidirectional``, keep
    their final separator), their character spans, and the parse aligned to them (a gold
    parse, or ``nlp``'s, a spaCy pipeline) and the span-probe items, if any."""
    spans: list[tuple[int, int] | None] | None = None
    if doc.token_ids is not None:
        ids = list(doc.token_ids)
    else:
        ids, offsets = tokenize_prefix(tok, doc.text, max_length)
        if offsets is not None:
            special = set(tok.all_special_ids)
            spans = [
                None if i in special or a == b else (int(a), int(b))
                for i, (a, b) in zip(ids, offsets, strict=True)
            ]
    n_input = len(ids)
    last = ids[-1] if ids else None
    keep_last = bidirectional and n_input > max_length > 1 and ids[-1] in tok.all_special_ids
    ids = ids[:max_length]
    spans = spans[:max_length] if spans is not None else None
    if keep_last:  # an encoder's input ends with its separator ([SEP]), as its tokenizer does
        ids[-1] = int(last)  # type: ignore[arg-type]
        if spans is not None:
            spans[-1] = None
    alignment = None
    if spans is not None and (doc.words is not None or nlp is not None):
        cutoff = max((s[1] for s in spans if s is not None), default=0)
        words = doc.words if doc.words is not None else syntax.parse_text(nlp, doc.text[:cutoff])
        alignment = syntax.align(words, spans, cutoff)
    elif nlp is not None and doc.token_ids is None:
        raise ModelError("--parse needs a fast tokenizer (character offsets) to align words.")
    probe_items = None
    if doc.probes is not None:
        if spans is None:
            raise ModelError(
                "Probe items need a fast tokenizer (character offsets) to align their spans."
            )
        probe_items = tuple(probes.align(doc.probes, spans))
    return Tokenized(doc, ids, n_input, spans, alignment, probe_items)


def probe_documents(
    loaded: LoadedModel, probe: InductionProbe | probes.BuiltinProbe | needles.NeedleProbe
) -> list[Document]:
    """The induction probe of schemas/scores.md: random ordinary tokens, repeated, optional BOS;
    or the built-in span probes of schemas/probes.md (``probe:coref``, ``probe:ioi``); or the
    needle documents of schemas/sparsity.md (``probe:needle``)."""
    tok = loaded.tokenizer
    if isinstance(probe, needles.NeedleProbe):
        made = needles.build_documents(probe, needles.hf_encoder(tok))
        return [Document(i, text, needle=nd) for i, (text, nd) in enumerate(made)]
    if isinstance(probe, probes.BuiltinProbe):
        built = probes.builtin_documents(
            probe, lambda text: tok(text, add_special_tokens=False).input_ids
        )
        return [Document(i, text, probes=items) for i, (text, items) in enumerate(built)]
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


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte → printable character table of byte-level BPE vocabularies (GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES: Final = _byte_decoder()


def _piece_text(decoded: str, piece: str | None) -> str:
    """A token without a character span: its decoded text, or its bytes when it is only part of
    a character (``decoded`` holds U+FFFD), written ``<e6 b3>``."""
    if "\ufffd" not in decoded or not piece:
        return decoded
    if piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
        return piece
    if all(c in _BYTES for c in piece):
        data = bytes(_BYTES[c] for c in piece)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "<" + data.hex(" ") + ">"
    return decoded


def readable_tokens(
    text: str,
    spans: Sequence[tuple[int, int] | None],
    decoded: Sequence[str],
    pieces: Sequence[str | None],
) -> list[str]:
    """The ``tokens.text`` column: each token as readable text.

    A token with a character span shows the text it covers (``text[char_start:char_end]``). Byte
    pieces of one character (byte-level BPE splits a Chinese character into 2-3 tokens, each
    covering the whole character) show that character and which piece they are: ``注[1/3]``,
    ``注[2/3]``, ``注[3/3]``. A token without a span (special tokens, the induction probe) shows
    its decoded text, or its bytes (``<e6 b3>``) when it is only part of a character.

    >>> readable_tokens("注 is", [(0, 1), (0, 1), (0, 1), (1, 4)], ["�"] * 3 + [" is"],
    ...                 ["æ", "³", "¨", "Ġis"])
    ['注[1/3]', '注[2/3]', '注[3/3]', ' is']
    """
    out: list[str] = []
    i, n = 0, len(spans)
    while i < n:
        span = spans[i]
        if span is None:
            out.append(_piece_text(decoded[i], pieces[i]))
            i += 1
            continue
        j = i + 1
        while j < n and spans[j] == span:
            j += 1
        covered = text[span[0] : span[1]]
        if j - i == 1:
            out.append(covered)
        else:
            out.extend(f"{covered}[{k + 1}/{j - i}]" for k in range(j - i))
        i = j
    return out
