"""Incremental detokenization and stop-string handling for streamed output.

Decoding a token alone can split a multi-byte character or drop a leading space, so each step
decodes a short window of recent tokens and emits only text past what that window already gave;
a trailing U+FFFD (an incomplete character) is held back until the next token completes it.
"""

from __future__ import annotations

from lowbit.engine.sequence import Sequence

_CONTEXT = 5  # prompt tokens decoded as left context for the first output token


class IncrementalDetokenizer:
    def __init__(self, tokenizer, seq: Sequence):
        self.tokenizer = tokenizer
        self.skip_special = seq.params.skip_special_tokens
        n = len(seq.prompt_token_ids)
        self.prefix_offset = max(n - _CONTEXT, 0)  # start of the decode window (index into all tokens)
        self.read_offset = n  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def step(self, seq: Sequence) -> str:
        """Text newly completed by the latest token(s) of `seq`."""
        ids = seq.token_ids
        prefix_text = self._decode(ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(ids[self.prefix_offset:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return full_text[len(prefix_text):]


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newest `new_len` characters: (start index, stop)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, len(text) - new_len - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
