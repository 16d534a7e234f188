"""Incremental detokenisation: a sequence's text grows by decoding only a short tail of new tokens.

Decoding the whole output every step is O(length) per sequence per step (O(length^2) over a
generation); at a few hundred running sequences that host work rivals the GPU step. Instead each
sequence keeps two offsets into its output tokens: text up to ``read`` is final, and the tokens
from ``prefix`` to ``read`` are decoded again beside the new ones, so that tokenizers whose
output depends on the neighbouring token (SentencePiece's leading space, byte-level pieces of one
character) give the same text as a full decode. A tail that ends inside a multi-byte character
("\ufffd") waits for the next token; the last update of a finished sequence takes it as is.
"""
from __future__ import annotations

from polarsparse.engine.sequence import Sequence

INCOMPLETE = "\ufffd"


def update_text(tokenizer, seq: Sequence, final: bool = False) -> str:
    """Bring ``seq.text`` up to date with its output tokens (any number of new ones) and return it."""
    ids = seq.output_token_ids
    prefix_at, read_at = seq.detok_offsets
    if read_at >= len(ids):
        return seq.text
    prefix = tokenizer.decode(ids[prefix_at:read_at], skip_special_tokens=True)
    full = tokenizer.decode(ids[prefix_at:], skip_special_tokens=True)
    if len(full) > len(prefix) and (final or not full.endswith(INCOMPLETE)):
        seq.text += full[len(prefix):]
        seq.detok_offsets = (read_at, len(ids))
    elif final:
        seq.detok_offsets = (prefix_at, len(ids))  # nothing printable came of the last tokens
    return seq.text
