"""How long a reply holds its slot, measured only while it holds one: the time model of the wait estimate.

Each reply that ends gives a sample: how long it held its slot, how long its first token took from
the grant, and how many tokens it generated. Idle time is never in a sample (a sample starts at a
grant and ends at a release), so a pause between bursts changes nothing and a slow trickle of
requests does not pass for slow service — the two ways a rate measured over a window of release
times goes wrong (after a pause every estimate was 0; after a trickle each was 10-20 times too long).

A sample is *busy* when every slot was taken, on average, while it ran. Nobody waits unless every
slot is taken, so the speeds come from the busy samples (the last ``window // 2`` of them, however
old) as soon as there are a few: an engine that batches on a CPU runs each reply slower at full
batch than alone, and a trickle of lone replies would otherwise pass for the speed a queue gets.

From the recent samples (a window of ``window`` replies):

- ``first_token_delay``: mean time from grant to first token (prefill, or a remote's queue), busy;
- ``per_token``: the decode time per further token, as a ratio of sums (long replies weigh more), busy;
- ``expected_tokens(limit)``: the mean length of the recent replies, each cut at the request's own
  ``max_new_tokens``; a recent reply that was itself cut at its limit (it had more to say) counts as
  going on to this request's limit;
- ``remaining(...)`` of a running reply: its first-token delay still to come, plus the recent
  replies' mean length beyond what it has generated so far (counted among those that got that far).

:meth:`~chatstream_asgi.service.fairness.FairScheduler.forecast` turns these into start times.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

__all__ = ["ServiceModel"]


@dataclass(frozen=True)
class _Sample:
    duration: float
    first_token: float | None
    tokens: int
    cut: bool
    """It stopped at its ``max_new_tokens``: its natural length is unknown, and at least ``tokens``."""

    def length(self, limit: int) -> int:
        return limit if self.cut else min(self.tokens, limit)


class ServiceModel:
    """Recent slot holds, and what they predict for a request of a given ``max_new_tokens``."""

    BUSY_ENOUGH = 3
    """Busy samples it takes before the speeds come from them alone."""

    def __init__(self, window: int = 64) -> None:
        self._samples: collections.deque[_Sample] = collections.deque(maxlen=window)
        self._busy: collections.deque[_Sample] = collections.deque(maxlen=max(window // 2, 1))

    @property
    def ready(self) -> bool:
        """Whether a reply that generated text has ended (before that there is nothing to estimate from)."""
        return any(s.tokens > 0 and s.first_token is not None for s in self._samples)

    def record(self, duration: float, first_token: float | None, tokens: int, limit: int, *, busy: bool) -> None:
        """One slot hold: ``duration`` seconds from grant to release, its first token ``first_token``
        seconds after the grant (None if it had none), ``tokens`` generated of at most ``limit``;
        ``busy``: every slot was taken while it ran."""
        sample = _Sample(max(duration, 0.0), first_token, max(tokens, 0), tokens >= limit)
        self._samples.append(sample)
        if busy:
            self._busy.append(sample)

    def _timed(self) -> collections.deque[_Sample]:
        """The samples the speeds come from."""
        return self._busy if len(self._busy) >= self.BUSY_ENOUGH else self._samples

    @property
    def first_token_delay(self) -> float:
        delays = [s.first_token for s in self._timed() if s.first_token is not None]
        return sum(delays) / len(delays) if delays else 0.0

    @property
    def per_token(self) -> float:
        decode_time = decode_tokens = 0.0
        for s in self._timed():
            if s.first_token is not None and s.tokens > 1:
                decode_time += s.duration - s.first_token
                decode_tokens += s.tokens - 1
        return max(decode_time, 0.0) / decode_tokens if decode_tokens else 0.0

    def expected_tokens(self, limit: int) -> float:
        """Tokens a reply limited to ``limit`` is expected to generate (``limit`` with no samples yet)."""
        lengths = [s.length(limit) for s in self._samples if s.first_token is not None]
        return sum(lengths) / len(lengths) if lengths else float(limit)

    def duration(self, limit: int) -> float:
        """Expected seconds in the slot for a reply limited to ``limit`` tokens."""
        return self.first_token_delay + self.per_token * max(self.expected_tokens(limit) - 1, 0.0)

    def remaining(self, limit: int, elapsed: float, generated: int) -> float:
        """Expected seconds left in the slot for a running reply ``elapsed`` seconds after its grant,
        with ``generated`` tokens so far."""
        if generated <= 0:
            return max(self.first_token_delay - elapsed, 0.0) + self.per_token * max(
                self.expected_tokens(limit) - 1, 0.0
            )
        lengths = [s.length(limit) for s in self._samples if s.first_token is not None]
        beyond = [length - generated for length in lengths if length > generated]
        more = sum(beyond) / len(beyond) if beyond else 1.0
        return self.per_token * more
