"""Per-row sampling for a whole batch at once.

Every row of a decode step carries its own :class:`~chatstream_asgi.GenerationParams`.
:class:`BatchSampler` keeps those parameters as tensors aligned with the engine's batch rows, plus
a per-row "seen token" mask for the repetition penalty and a per-row :class:`torch.Generator`, so
that a seeded request draws the same numbers whether it runs alone or next to others.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from chatstream_asgi.engines.base import GenerationParams

__all__ = ["BatchSampler", "apply_repetition_penalty", "top_k_top_p_filter"]


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

    def __len__(self) -> int:
        return len(self.generators)

    def add_rows(self, params: Sequence[GenerationParams], prompts: Sequence[Sequence[int]]) -> None:
        """Append rows for new sequences (in batch order), seeding ``seen`` with their prompts (where the
        row's ``penalize_prompt_tokens`` says the prompt counts for the repetition penalty)."""
        dev = self.device
        self.temperature = torch.cat([self.temperature, torch.tensor([p.temperature for p in params], device=dev)])
        self.top_k = torch.cat([self.top_k, torch.tensor([p.top_k for p in params], dtype=torch.long, device=dev)])
        self.top_p = torch.cat([self.top_p, torch.tensor([p.top_p for p in params], device=dev)])
        self.penalty = torch.cat([self.penalty, torch.tensor([p.repetition_penalty for p in params], device=dev)])
        seen = torch.zeros(len(params), self.vocab_size, dtype=torch.bool, device=dev)
        for row, prompt in enumerate(prompts):
            prompt = prompt if params[row].penalize_prompt_tokens else ()
            ids = torch.tensor([t for t in prompt if 0 <= t < self.vocab_size], dtype=torch.long)
            seen[row, ids.to(dev)] = True
        self.seen = torch.cat([self.seen, seen])
        for p in params:
            gen = torch.Generator(device=dev)
            gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            self.generators.append(gen)
            self._greedy.append(p.temperature <= 0)
            self._penalised.append(p.repetition_penalty != 1.0)

    def keep_rows(self, order: Sequence[int]) -> None:
        """Keep only the rows listed in ``order``, in that order."""
        idx = torch.tensor(list(order), dtype=torch.long, device=self.device)
        self.temperature = self.temperature[idx]
        self.top_k = self.top_k[idx]
        self.top_p = self.top_p[idx]
        self.penalty = self.penalty[idx]
        self.seen = self.seen[idx]
        self.generators = [self.generators[i] for i in order]
        self._greedy = [self._greedy[i] for i in order]
        self._penalised = [self._penalised[i] for i in order]

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
        tokens = torch.argmax(logits, dim=-1)
        sampled = [n for n, i in enumerate(row_ids) if not self._greedy[i]]
        if sampled:
            pick = torch.tensor(sampled, dtype=torch.long)
            pick = pick.pin_memory() if logits.is_cuda else pick
            pick = pick.to(logits.device, non_blocking=True)
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
        return tokens
