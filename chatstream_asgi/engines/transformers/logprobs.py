"""Log-probabilities as a client reads them: each token's text and bytes beside the numbers.

The sampler reports token ids with their log-probabilities
(:data:`~chatstream_asgi.engines.transformers.sampling.RowLogprobs`); :class:`TokenPieces` turns them into
:class:`~chatstream_asgi.engines.base.TokenLogprob` entries. A token's ``raw`` bytes are exact for
byte-level BPE (GPT-2's byte alphabet) and SentencePiece byte tokens (``<0x..>``), where one token may
hold part of a character and its decoded text is U+FFFD; otherwise they are its text's UTF-8.
"""

from __future__ import annotations

import re
from typing import Any

from chatstream_asgi.engines.base import TokenLogprob
from chatstream_asgi.engines.transformers.sampling import RowLogprobs

__all__ = ["TokenPieces"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTES_OF = _byte_alphabet()


class TokenPieces:
    """Token ids to text and bytes for one tokenizer, cached (the generation thread's)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._pieces: dict[int, tuple[str, bytes]] = {}

    def piece(self, token: int) -> tuple[str, bytes]:
        """The text a token decodes to alone, and its bytes."""
        cached = self._pieces.get(token)
        if cached is None:
            text = self._tokenizer.decode([token])
            cached = self._pieces[token] = (text, self._raw(token, text))
        return cached

    def _raw(self, token: int, text: str) -> bytes:
        if "\ufffd" not in text:
            return text.encode()
        name = self._tokenizer.convert_ids_to_tokens(token)
        if isinstance(name, str):
            match = _BYTE_TOKEN.fullmatch(name)
            if match:
                return bytes([int(match.group(1), 16)])
            if all(c in _BYTES_OF for c in name):
                return bytes(_BYTES_OF[c] for c in name)
        return text.encode()

    def entry(self, token: int, reported: RowLogprobs) -> TokenLogprob:
        """``token``'s entry from the sampler's report."""
        logprob, top = reported
        return self._entry(token, logprob, tuple(self._entry(t, lp) for t, lp in top))

    def _entry(self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        text, raw = self.piece(token)
        return TokenLogprob(text, logprob, raw, top)
