"""Per-row sampling for a whole batch at once.

Every row of a decode step carries its own :class:`~chatstream_asgi.GenerationParams`.
:class:`BatchSampler` keeps those parameters as tensors aligned with the engine's batch rows, plus
a per-row "seen token" mask for the repetition penalty and a per-row :class:`torch.Generator`, so
that a seeded request draws the same numbers whether it runs alone or next to others.

A constrained row (structured output) carries a
:class:`~chatstream_asgi.engines.transformers.grammar.RowGrammar`: before its token is picked, the
grammar's bitmask of allowed tokens is filled on the host (while the device still runs the step's
forward, where it runs asynchronously), copied over and applied to the row's logits, which the
sampler sees outside any captured graph. A row that asked for log-probabilities gets them from the
logits its token was picked from: after the repetition penalty and the grammar mask, before the
temperature, top-k and top-p (so a greedy row's token is always its own most likely one). Rows that
ask for neither cost nothing more than before.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from chatstream_asgi.engines.base import GenerationParams
from chatstream_asgi.engines.transformers.transfer import upload

__all__ = ["BatchSampler", "Grammar", "RowLogprobs", "apply_repetition_penalty", "top_k_top_p_filter"]

RowLogprobs = tuple[float, list[tuple[int, float]]]
"""A sampled token's log-probability, and the most likely tokens with theirs (best first)."""


class Grammar(Protocol):
    """What the sampler asks of a constrained row's grammar."""

    words: int
    """int32 words in the row's bitmask."""
    closing: bool
    """Keep only :attr:`closers` among the allowed tokens (where any is allowed)."""
    closers: tuple[tuple[int, ...], ...]

    def fill(self, address: int, nbytes: int) -> None:
        """Write the row's allowed next tokens as a bitmask of int32 words at ``address``."""


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[n, W]`` int32 bitmask words (bit ``t % 32`` of word ``t // 32``) as ``[n, vocab]`` bools; tokens past
    the words are not allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Penalise tokens already seen: divide positive logits, multiply negative ones.

    ``logits`` is ``[B, V]``, ``seen`` a ``[B, V]`` bool mask (each distinct token counts once),
    ``penalty`` ``[B]`` (``1.0`` leaves a row untouched).
    """
    p = penalty.to(logits.dtype).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to ``-inf``) every logit outside each row's top-k and then its top-p nucleus.

    ``top_k`` is ``[B]`` (``0`` disables it), ``top_p`` ``[B]`` (``1.0`` disables it). Both apply
    when both are set: the nucleus is taken within the top-k survivors.
    """
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    remove = ranks >= k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # A token stays if the mass strictly before it is below top_p; the best token always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove |= mass_before >= top_p.to(probs.dtype).unsqueeze(1)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)


class BatchSampler:
    """Sampling state for the rows of a running batch, reordered as rows join and leave."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.temperature = torch.empty(0, device=self.device)
        self.top_k = torch.empty(0, dtype=torch.long, device=self.device)
        self.top_p = torch.empty(0, device=self.device)
        self.penalty = torch.empty(0, device=self.device)
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self.generators: list[torch.Generator] = []
        self._greedy: list[bool] = []
        self._penalised: list[bool] = []
        self.grammars: list[Grammar | None] = []
        self._logprobs: list[int | None] = []
        self._words: torch.Tensor | None = None  # host bitmask buffer, a row per constrained row of a step
        self._closers: torch.Tensor | None = None  # [tiers, V] bool: the grammars' closing tokens
        self._reported: dict[int, RowLogprobs] = {}  # row -> its last token's log-probabilities

    def __len__(self) -> int:
        return len(self.generators)

    def add_rows(
        self,
        params: Sequence[GenerationParams],
        prompts: Sequence[Sequence[int]],
        grammars: Sequence[Grammar | None] | None = None,
    ) -> None:
        """Append rows for new sequences (in batch order), seeding ``seen`` with their prompts (where the
        row's ``penalize_prompt_tokens`` says the prompt counts for the repetition penalty); ``grammars``:
        the constrained rows' grammars (None for a free row)."""
        dev, f32 = self.device, torch.float32
        self.temperature = torch.cat([self.temperature, upload([p.temperature for p in params], dev, f32)])
        self.top_k = torch.cat([self.top_k, upload([p.top_k for p in params], dev, torch.long)])
        self.top_p = torch.cat([self.top_p, upload([p.top_p for p in params], dev, f32)])
        self.penalty = torch.cat([self.penalty, upload([p.repetition_penalty for p in params], dev, f32)])
        seen = torch.zeros(len(params), self.vocab_size, dtype=torch.bool, device=dev)
        for row, prompt in enumerate(prompts):
            prompt = prompt if params[row].penalize_prompt_tokens else ()
            ids = [t for t in prompt if 0 <= t < self.vocab_size]
            if ids:  # index_fill_ takes the value as a scalar: nothing else goes up from pageable memory
                seen[row].index_fill_(0, upload(ids, dev, torch.long), True)
        self.seen = torch.cat([self.seen, seen])
        for p in params:
            gen = torch.Generator(device=dev)
            gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            self.generators.append(gen)
            self._greedy.append(p.temperature <= 0)
            self._penalised.append(p.repetition_penalty != 1.0)
            self._logprobs.append(p.logprobs)
        self.grammars.extend(grammars if grammars is not None else [None] * len(params))

    def keep_rows(self, order: Sequence[int]) -> None:
        """Keep only the rows listed in ``order``, in that order."""
        idx = upload(list(order), self.device, torch.long)
        self.temperature = self.temperature[idx]
        self.top_k = self.top_k[idx]
        self.top_p = self.top_p[idx]
        self.penalty = self.penalty[idx]
        self.seen = self.seen[idx]
        self.generators = [self.generators[i] for i in order]
        self._greedy = [self._greedy[i] for i in order]
        self._penalised = [self._penalised[i] for i in order]
        self.grammars = [self.grammars[i] for i in order]
        self._logprobs = [self._logprobs[i] for i in order]
        self._reported = {}

    def sample(self, logits: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Pick one token per row from ``logits`` (``[n, V]``) and mark it seen.

        ``rows`` selects which of this sampler's rows ``logits`` belongs to (default: all).
        Greedy rows take the argmax and skip the filtering and drawing work.
        """
        rows = rows or slice(0, len(self))
        row_ids = range(*rows.indices(len(self)))
        logits = logits.float()
        if any(self._penalised[i] for i in row_ids):
            logits = apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        constrained = [n for n, i in enumerate(row_ids) if self.grammars[i] is not None]
        if constrained:
            logits = self._mask(logits, constrained, row_ids)
        tokens = torch.argmax(logits, dim=-1)
        sampled = [n for n, i in enumerate(row_ids) if not self._greedy[i]]
        if sampled:
            pick = upload(sampled, logits.device, torch.long)
            temperature = self.temperature[rows][pick].unsqueeze(1)
            filtered = top_k_top_p_filter(logits[pick] / temperature, self.top_k[rows][pick], self.top_p[rows][pick])
            probs = torch.softmax(filtered, dim=-1)
            # One draw per row from its own generator: the exponential race torch.multinomial runs for
            # one sample, without its validity check, which reads a value back (a host sync per row).
            race = torch.empty_like(probs)
            first = rows.start or 0
            for j, n in enumerate(sampled):
                race[j].exponential_(generator=self.generators[first + n])
            tokens.index_copy_(0, pick, torch.argmax(probs / race, dim=-1))
        # A scatter of a scalar: indexing with a host ``True`` would copy it from pageable memory,
        # which waits for the device (and would stall the engine's queued steps).
        self.seen[rows].scatter_(1, tokens.unsqueeze(1), True)
        asking = [n for n, i in enumerate(row_ids) if self._logprobs[i] is not None]
        if asking:
            self._report(logits, tokens, asking, row_ids)
        return tokens

    def _mask(self, logits: torch.Tensor, constrained: list[int], row_ids: range) -> torch.Tensor:
        """``logits`` with every token the constrained rows' grammars forbid at ``-inf``."""
        # The host buffer is filled again only after this step's tokens were read (no step runs ahead of a
        # constrained row), so its copy to the device has completed by then.
        n, words = len(constrained), None
        buffer = self._words
        for j, n_row in enumerate(constrained):
            grammar = self.grammars[row_ids[n_row]]
            assert grammar is not None
            if words is None:
                words = grammar.words
                if buffer is None or buffer.shape[0] < n or buffer.shape[1] != words:
                    pinned = logits.is_cuda
                    buffer = torch.empty(max(n, len(self)), words, dtype=torch.int32, pin_memory=pinned)
                    self._words = buffer
            row = buffer[j]
            grammar.fill(row.data_ptr(), row.numel() * 4)
        assert buffer is not None
        pick = upload(constrained, logits.device, torch.long)
        allowed = unpack_bitmask(buffer[:n].to(logits.device, non_blocking=True), logits.shape[1])
        closing = [j for j, n_row in enumerate(constrained) if self.grammars[row_ids[n_row]].closing]  # type: ignore[union-attr]
        if closing:
            allowed = self._steer_to_close(allowed, closing, self.grammars[row_ids[constrained[closing[0]]]])
        # A copy (never in place): the step's logits may be a captured graph's output buffer.
        return logits.index_put((pick,), logits[pick].masked_fill(~allowed, float("-inf")))

    def _steer_to_close(self, allowed: torch.Tensor, closing: list[int], grammar: Any) -> torch.Tensor:
        """``allowed`` with each ``closing`` row narrowed to the first tier of its closing tokens it allows."""
        vocab = allowed.shape[1]
        if self._closers is None or self._closers.shape[1] != vocab:
            self._closers = torch.zeros(len(grammar.closers), vocab, dtype=torch.bool)
            for tier, ids in enumerate(grammar.closers):
                self._closers[tier, [t for t in ids if t < vocab]] = True
            self._closers = self._closers.to(allowed.device)
        rows = upload(closing, allowed.device, torch.long)
        base = narrowed = allowed[rows]
        for tier in reversed(range(self._closers.shape[0])):  # the best tier last, so it wins where it applies
            tiered = base & self._closers[tier]
            narrowed = torch.where(tiered.any(dim=1, keepdim=True), tiered, narrowed)
        return allowed.index_put((rows,), narrowed)

    def _report(self, logits: torch.Tensor, tokens: torch.Tensor, asking: list[int], row_ids: range) -> None:
        """Keep the log-probabilities of the asking rows' tokens (read by :meth:`take_logprobs`)."""
        pick = upload(asking, logits.device, torch.long)
        logprobs = torch.log_softmax(logits[pick], dim=-1)
        chosen = logprobs.gather(1, tokens[pick].unsqueeze(1)).squeeze(1).tolist()
        k = max(self._logprobs[row_ids[n]] or 0 for n in asking)
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for j, n in enumerate(asking):
            row = row_ids[n]
            want = self._logprobs[row] or 0
            top = [(t, lp) for t, lp in zip(top_ids[j][:want], top_lp[j][:want], strict=True) if lp > float("-inf")]
            self._reported[row] = (chosen[j], top)

    def take_logprobs(self, count: int) -> list[RowLogprobs | None]:
        """Rows ``0 .. count - 1``'s log-probabilities from their last :meth:`sample` (None where not asked)."""
        reported, self._reported = self._reported, {}
        return [reported.get(row) for row in range(count)]
