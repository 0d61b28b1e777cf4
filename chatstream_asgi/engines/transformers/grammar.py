"""Constrained decoding: JSON schemas compiled by llguidance into per-row token masks.

llguidance (the ``structured`` extra) compiles a JSON Schema into a grammar over the tokenizer's tokens;
a matcher per constrained row says, before each token, which tokens may come next (a bitmask the sampler
applies to the row's logits) and consumes the token sampled. We chose it over xgrammar (faster mask
fills, but it pulls ``triton`` and ``apache-tvm-ffi``) and outlines-core (regex-index compilation, slow
for nested schemas): one 3 MB wheel without dependencies, the JSON Schema support vLLM and llama.cpp use,
precise refusals (an unknown keyword, an unsatisfiable range), and compile limits.

:class:`Grammars` holds the library's view of one tokenizer (built once, about a second, on the first
constrained request) and the schemas compiled so far (an LRU of matchers in their initial state, copied
for each request). Compiling runs in :meth:`Grammars.check`, which the front calls off the event loop
before admission, so a bad schema is a 400 and the generation thread never compiles; and again once the
request is admitted, so a schema the LRU let go while the request waited compiles off the loop too.

A grammar makes every reply valid only if it ends: a small model can loop inside an open string or array
until ``max_new_tokens`` cuts it (SmolLM2-135M does, for most ``json_object`` prompts). So once a
constrained row has ``CLOSING_RESERVE`` tokens left (a quarter of its limit at most), it is steered to
close: of the tokens its grammar allows, it keeps the first tier that has any: the end of sequence, then
``"`` (it ends an open string; elsewhere it opens the shortest value or key), then tokens made of ``}`` and
``]``. That ends open strings, objects and arrays within a few tokens; the grammar still decides what is
valid (a required property still comes before its object closes).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from chatstream_asgi.engines.base import UnsupportedFeature

__all__ = ["CLOSING_RESERVE", "EXTRA_HINT", "Grammars", "RowGrammar"]

EXTRA_HINT = "structured output needs the llguidance library: pip install 'chatstream-asgi[structured]'"

CLOSING_RESERVE = 24
"""Tokens left to a constrained reply when it starts being steered to close (see the module docstring)."""
_BRACKETS = frozenset("}]")

_JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON (no free whitespace): a small model cannot loop on blank lines inside an object."""


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise UnsupportedFeature(EXTRA_HINT, param="response_format") from None
    return llguidance


class RowGrammar:
    """One constrained row's matcher: fills the row's mask, consumes each sampled token."""

    def __init__(self, matcher: Any, words: int, closers: tuple[tuple[int, ...], ...]) -> None:
        self._matcher = matcher
        self.words = words
        self.closers = closers
        """Tiers of tokens that close strings, objects and arrays, best first (shared by the engine's rows)."""
        self.closing = False
        """Steer to close: set by output processing when the reply nears its token limit."""

    def fill(self, address: int, nbytes: int) -> None:
        """Write the allowed next tokens as a bitmask (bit ``t % 32`` of int32 word ``t // 32``) at ``address``."""
        self._matcher.unsafe_compute_mask_ptr(address, nbytes)

    def consume(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar did not allow it (the matcher is then in error)."""
        return bool(self._matcher.consume_token(token))

    @property
    def stopped(self) -> bool:
        """The reply is complete: nothing but the end may follow."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())


class Grammars:
    """Schema compilation for one tokenizer (see the module docstring). Thread-safe."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], vocab_size: int, cache_size: int = 64) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self._n_vocab = max(vocab_size, len(tokenizer))  # the logits' width, or the tokenizer's where larger
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._closers: tuple[tuple[int, ...], ...] = ()

    @property
    def mask_words(self) -> int:
        """int32 words in one row's bitmask."""
        return (self._n_vocab + 31) // 32

    def check(self, schema: str) -> None:
        """Compile ``schema`` (JSON text) and keep it; :class:`UnsupportedFeature` names what is wrong."""
        self._template(schema)

    def matcher(self, schema: str) -> RowGrammar:
        """A fresh matcher for ``schema`` (compiled by :meth:`check` already, or now)."""
        template = self._template(schema)
        return RowGrammar(template.deep_copy(), self.mask_words, self._closers)

    def _template(self, schema: str) -> Any:
        with self._lock:
            template = self._compiled.get(schema)
            if template is not None:
                self._compiled.move_to_end(schema)
                return template
        llg = _llguidance()
        tokenizer = self._llg_tokenizer(llg)
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise UnsupportedFeature(f"invalid JSON schema: {exc}", code="invalid_json_schema") from None
        template = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            message = template.get_error().splitlines()[0] if template.get_error() else "unknown error"
            code = "schema_too_complex" if "limit" in message else "invalid_json_schema"
            raise UnsupportedFeature(f"the JSON schema cannot be used: {message}", code=code)
        with self._lock:
            self._compiled[schema] = template
            while len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return template

    def _llg_tokenizer(self, llg: Any) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    hf = self._hf_tokenizer
                    self._tokenizer = llg.hf.from_tokenizer(hf, n_vocab=self._n_vocab, eos_token=self._eos)
                    texts = hf.batch_decode([[token] for token in range(len(hf))])
                    quotes = tuple(t for t, text in enumerate(texts) if text == '"')
                    brackets = tuple(t for t, text in enumerate(texts) if text and set(text) <= _BRACKETS)
                    self._closers = (tuple(self._eos), quotes, brackets)
                except Exception as exc:  # a slow tokenizer, say
                    raise UnsupportedFeature(
                        f"structured output is not available for this model's tokenizer ({exc})",
                        param="response_format",
                    ) from None
            return self._tokenizer
