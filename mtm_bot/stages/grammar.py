"""The reply's grammar: xgrammar's JSON-schema grammar, with string lengths held by a token mask of our own.

xgrammar builds a length bound as one state per character, which makes compiling slow with a large
vocabulary, so the grammar leaves lengths open and StringBudget's masks bound them while decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xgrammar as xgr

from .refiner_prompt import FIELD_MAX_CHARS


class StringBudget:
    """Which tokens fit in what is left of a string's length bound, for one vocabulary (built once).

    A token's text is cut at its quotes: the part before the first quote continues the string being
    written (and must fit what is left of it); a part after a quote may open a new string, which is
    bounded without looking up its field, by the smallest bound (every field allows that much).
    Characters are counted as UTF-8 lead bytes, so a character split across tokens counts once.
    """

    def __init__(self, decoded_vocab: Sequence[bytes], vocab_size: int) -> None:
        self.token_bytes = list(decoded_vocab) + [b""] * (vocab_size - len(decoded_vocab))
        smallest = min(FIELD_MAX_CHARS.values())
        lead = np.zeros(vocab_size, dtype=np.int32)  # characters before the first quote
        rest_fits = np.ones(vocab_size, dtype=bool)  # every part after a quote fits the smallest bound
        for i, text in enumerate(self.token_bytes):
            first, *rest = text.split(b'"')
            lead[i] = _char_count(first)
            rest_fits[i] = all(_char_count(part) <= smallest for part in rest)
        self.lead, self.rest_fits = lead, rest_fits
        longest = max(FIELD_MAX_CHARS.values())
        # masks[r]: the tokens allowed with r characters left; masks[-1]: outside a bounded string.
        allowed = [rest_fits & (lead <= room) for room in range(longest + 1)] + [rest_fits]
        self.masks = torch.stack([_pack_bitmask(a) for a in allowed])

    def fits(self, token_id: int, room: int | None) -> bool:
        return bool(self.rest_fits[token_id]) and (room is None or int(self.lead[token_id]) <= room)

    def mask(self, room: int | None) -> torch.Tensor:
        return self.masks[-1 if room is None else room]


def _char_count(utf8: bytes) -> int:
    return sum(1 for byte in utf8 if byte & 0xC0 != 0x80)


def _pack_bitmask(allowed: np.ndarray) -> torch.Tensor:
    """A boolean per token -> xgrammar's bitmask layout (int32 words, token i at bit i % 32 of word i // 32)."""
    words = (len(allowed) + 31) // 32
    packed = np.zeros(words * 4, dtype=np.uint8)
    bits = np.packbits(allowed, bitorder="little")
    packed[: len(bits)] = bits
    return torch.from_numpy(packed.view("<i4").copy())


class ReplyPosition:
    """Where the reply is in its JSON text, fed byte by byte: which string is open and how long it is.

    Only as much of JSON as the reply grammar allows: no escapes, so a quote always opens or closes a
    string.
    """

    def __init__(self) -> None:
        self._containers: list[list] = []  # per open object or array: [kind, key, expects a key]
        self._in_string = False
        self._key: bytearray | None = None  # the key being read, when the open string is a key
        self._bound: int | None = None  # the open value string's length bound
        self._chars = 0

    def room(self) -> int | None:
        """Characters the open string may still take; None outside a bounded string."""
        if not self._in_string or self._bound is None:
            return None
        return self._bound - self._chars

    def feed(self, text: bytes) -> None:
        for byte in text:
            if self._in_string:
                if byte == 0x22:  # '"'
                    self._in_string = False
                    if self._key is not None:
                        self._containers[-1][1] = self._key.decode()
                elif self._key is not None:
                    self._key.append(byte)
                elif byte & 0xC0 != 0x80:
                    self._chars += 1
                continue
            top = self._containers[-1] if self._containers else None
            if byte == 0x7B:  # '{'
                self._containers.append(["{", None, True])
            elif byte == 0x5B:  # '[': its items take the bound of the key that holds it
                self._containers.append(["[", top[1] if top else None, False])
            elif byte in (0x7D, 0x5D):  # '}' ']'
                self._containers.pop()
            elif byte == 0x2C and top and top[0] == "{":  # ','
                top[2] = True
            elif byte == 0x3A and top:  # ':'
                top[2] = False
            elif byte == 0x22:
                self._in_string, self._chars = True, 0
                is_key = top is not None and top[0] == "{" and top[2]
                self._key = bytearray() if is_key else None
                self._bound = None if is_key or top is None else FIELD_MAX_CHARS.get(top[1])


@dataclass(frozen=True)
class ReplyGrammar:
    """A compiled reply grammar (string lengths open) and the length budget that bounds its strings."""

    compiled: xgr.CompiledGrammar
    budget: StringBudget

    def matcher(self) -> ReplyMatcher:
        return ReplyMatcher(self)


class ReplyMatcher:
    """xgrammar's GrammarMatcher for a ReplyGrammar, with every string held to its length bound."""

    def __init__(self, grammar: ReplyGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self._budget = grammar.budget
        self._position = ReplyPosition()

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, index)
        bitmask[index] &= self._budget.mask(self._position.room())

    def accept_token(self, token_id: int) -> bool:
        if not self._budget.fits(token_id, self._position.room()) or not self._matcher.accept_token(token_id):
            return False
        self._position.feed(self._budget.token_bytes[token_id])
        return True

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def find_jump_forward_string(self) -> str:
        return self._matcher.find_jump_forward_string()


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary, with special tokens (chat headers, reserved ids) blanked.

    xgrammar reads a special token as its literal text ("<|eot_id|>") and would let it appear inside
    a JSON string; blank entries are never allowed (except as the stop tokens).
    """
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    vocab = [""] * vocab_size
    for text, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special:
            vocab[i] = text
    return xgr.TokenizerInfo(
        vocab,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=stop_token_ids,
        add_prefix_space=detected.add_prefix_space,
    )
