"""Output processing: each step's sampled tokens become text deltas, finishes and failures.

Everything a step produces is collected in an :class:`Outbox` and handed to the event loop at once.
"""

from __future__ import annotations

import logging
from typing import Any

from chatstream_asgi.engines.base import EngineError, FinishReason, TokenLogprob
from chatstream_asgi.engines.transformers.detokenizer import decode_windows
from chatstream_asgi.engines.transformers.grammar import CLOSING_RESERVE
from chatstream_asgi.engines.transformers.logprobs import TokenPieces
from chatstream_asgi.engines.transformers.sampling import RowLogprobs
from chatstream_asgi.engines.transformers.sequence import EngineSequence, Outbox

__all__ = ["OutputProcessor", "fail", "finish"]

logger = logging.getLogger("chatstream_asgi.engine")


class OutputProcessor:
    """Turns sampled tokens into text for one tokenizer: end-of-sequence ids and length limits end a
    sequence, stop strings are held back and cut; a constrained sequence's grammar consumes its token
    and ends it (``stop``) once the reply is complete; log-probabilities go out with the text."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], context_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.context_len = context_len
        self._pieces = TokenPieces(tokenizer)

    def limit(self, seq: EngineSequence) -> int:
        """How many tokens ``seq`` may generate."""
        return min(seq.params.max_new_tokens, self.context_len - len(seq.prompt_ids))

    def accept(
        self,
        seqs: list[EngineSequence],
        tokens: list[int],
        outbox: Outbox,
        logprobs: list[RowLogprobs | None] | None = None,
    ) -> None:
        """Record one new token per sequence, detokenize them in one call, emit text, mark finishes.
        ``logprobs``: the sampler's report for each sequence (None where it asked for none)."""
        entries: list[list[TokenLogprob] | None] = [None] * len(seqs)
        for n, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            seq.generated += 1
            seq.last_token = token
            seq.output.append(token)
            seq.detokenizer.tokens.append(token)
            if logprobs is not None and logprobs[n] is not None:
                entries[n] = [self._pieces.entry(token, logprobs[n])]  # type: ignore[arg-type]
            if seq.grammar is not None and not seq.grammar.consume(token):
                logger.error("%s: token %d broke its grammar: %s", seq.stream.request_id, token, seq.grammar.error)
                seq.finish = "error"
            elif (token in self.eos_token_ids and not seq.ignore_eos) or (seq.grammar and seq.grammar.stopped):
                seq.finish = "stop"
            elif seq.generated >= self.limit(seq):
                seq.finish = "length"
            elif seq.grammar is not None and self.limit(seq) - seq.generated <= min(
                CLOSING_RESERVE, self.limit(seq) // 4
            ):
                seq.grammar.closing = True  # steer the reply to close before the limit cuts it
        windows = [w for seq in seqs for w in seq.detokenizer.windows()]
        try:
            texts = decode_windows(self.tokenizer, windows)
        except Exception as exc:  # every row of the step ends here: those marked finished above the loop skips
            logger.exception("detokenizing a step of %d sequence(s) failed", len(seqs))
            for seq in seqs:
                fail(seq, exc, outbox)
            return
        for i, seq in enumerate(seqs):
            if seq.finish == "error":
                fail(seq, EngineError("the reply left its schema"), outbox)
                continue
            try:
                delta = seq.detokenizer.advance(texts[2 * i], texts[2 * i + 1])
                out = seq.stop.feed(delta)
                if seq.stop.stopped:
                    seq.finish = "stop"
                elif seq.finish is not None:
                    out += seq.stop.feed(seq.detokenizer.flush()) + seq.stop.flush()
            except Exception as exc:
                logger.exception("detokenizing %s failed", seq.stream.request_id)
                fail(seq, exc, outbox)
                continue
            outbox.add(seq.stream, seq.stream.push, out, completion_tokens=seq.generated, logprobs=entries[i])
            if seq.finish is not None:
                finish(seq, seq.finish, outbox)


def finish(seq: EngineSequence, reason: FinishReason, outbox: Outbox) -> None:
    """End ``seq`` with ``reason`` (delivered with its token counts).

    Its ids are kept for the conversation's next turn first, so that a next request sent as soon as
    this one ends finds them.
    """
    seq.finish = reason
    if seq.turns is not None:
        seq.turns.record(seq.session_key, seq.prompt_text, seq.prompt_ids, seq.output)
    outbox.add(
        seq.stream,
        seq.stream.finish,
        reason,
        final=True,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=seq.generated,
    )


def fail(seq: EngineSequence, exc: BaseException, outbox: Outbox) -> None:
    """End ``seq`` with an :class:`EngineError` caused by ``exc``."""
    seq.finish = "error"
    error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc!r}")
    if error is not exc:
        error.__cause__ = exc
    outbox.add(seq.stream, seq.stream.fail, error, final=True)
