"""Per-row batched sampling: repetition penalty, top-k with top-p, greedy rows, seeds."""

from __future__ import annotations

import math
import os

import pytest
import torch

from chatstream_asgi.engines.base import GenerationParams
from chatstream_asgi.engines.transformers.sampling import BatchSampler, apply_repetition_penalty, top_k_top_p_filter

cuda_only = pytest.mark.skipif(
    os.environ.get("CHATSTREAM_TEST_DEVICE", "cpu") != "cuda", reason="needs CHATSTREAM_TEST_DEVICE=cuda"
)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_penalty_counts_each_distinct_token_once() -> None:
    sampler = BatchSampler(vocab_size=4)
    sampler.add_rows([GenerationParams(temperature=0, repetition_penalty=2.0)], [[0, 0, 0, 1]])
    assert sampler.seen.tolist() == [[True, True, False, False]]
    # Token 0 was seen three times but is penalised once: 3.0 / 2 = 1.5 still beats 1.4.
    token = sampler.sample(torch.tensor([[3.0, 2.0, 1.4, 0.0]]))
    assert token.tolist() == [0]


def test_repetition_penalty_leaves_other_rows_alone() -> None:
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0]])
    seen = torch.ones(2, 2, dtype=torch.bool)
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.0]))
    assert out.tolist() == [[1.0, -4.0], [2.0, -2.0]]


def test_top_p_applies_when_top_k_is_set() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    out = top_k_top_p_filter(logits, top_k=torch.tensor([4]), top_p=torch.tensor([0.7]))
    kept = [i for i, v in enumerate(out[0].tolist()) if not math.isinf(v)]
    assert kept == [0, 1]


def test_top_k_alone_and_disabled_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    out = top_k_top_p_filter(logits, top_k=torch.tensor([2, 0]), top_p=torch.tensor([1.0, 1.0]))
    assert [not math.isinf(v) for v in out[0].tolist()] == [False, True, False, True]
    assert out[1].tolist() == logits[1].tolist()


def test_top_p_always_keeps_the_best_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    out = top_k_top_p_filter(logits, top_k=torch.tensor([0]), top_p=torch.tensor([0.01]))
    assert [not math.isinf(v) for v in out[0].tolist()] == [False, True, False]


def test_greedy_rows_take_the_argmax_next_to_sampled_rows() -> None:
    sampler = BatchSampler(vocab_size=6)
    sampler.add_rows([GenerationParams(temperature=0), GenerationParams(temperature=1.0, top_k=0, seed=1)], [[], []])
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 0.0], [0.0] * 6])
    tokens = sampler.sample(logits)
    assert tokens[0].item() == 2
    assert sampler.seen[0, 2] and sampler.seen[1, tokens[1]]


def _draws(seed: int, neighbours: int) -> list[int]:
    sampler = BatchSampler(vocab_size=50)
    params = [GenerationParams(temperature=1.0, top_k=0, seed=100 + i) for i in range(neighbours)]
    sampler.add_rows([*params, GenerationParams(temperature=1.0, top_k=0, seed=seed)], [[]] * (neighbours + 1))
    logits = torch.zeros(neighbours + 1, 50)
    return [sampler.sample(logits)[-1].item() for _ in range(20)]


def test_seeded_rows_reproduce_regardless_of_batch_neighbours() -> None:
    assert _draws(7, neighbours=0) == _draws(7, neighbours=3)
    assert _draws(7, neighbours=0) != _draws(8, neighbours=0)


def test_keep_rows_reorders_state() -> None:
    sampler = BatchSampler(vocab_size=4)
    params = [GenerationParams(temperature=t) for t in (0.0, 0.5, 1.0)]
    sampler.add_rows(params, [[0], [1], [2]])
    sampler.keep_rows([2, 0])
    assert sampler.temperature.tolist() == [1.0, 0.0]
    assert sampler.seen.tolist() == [[False, False, True, False], [True, False, False, False]]
    assert len(sampler) == 2


def test_sample_on_a_slice_of_rows_marks_only_those() -> None:
    sampler = BatchSampler(vocab_size=3)
    sampler.add_rows([GenerationParams(temperature=0)] * 3, [[], [], []])
    tokens = sampler.sample(torch.tensor([[0.0, 0.0, 1.0]]), slice(2, 3))
    assert tokens.tolist() == [2]
    assert sampler.seen.sum().item() == 1 and sampler.seen[2, 2]


def test_a_penalty_over_the_reply_alone_lets_the_answer_reuse_the_questions_words() -> None:
    """``penalize_prompt_tokens=False``: the prompt's tokens are not penalised ("What is 2 + 2?" → "is 4"),
    the reply's own are (a line it repeats)."""
    sampler = BatchSampler(vocab_size=4)
    question = [0, 1]  # "What is"
    both, reply_only = (
        GenerationParams(temperature=0, repetition_penalty=2.0),
        GenerationParams(temperature=0, repetition_penalty=2.0, penalize_prompt_tokens=False),
    )
    sampler.add_rows([both, reply_only], [question, question])
    assert sampler.seen.tolist() == [[True, True, False, False], [False, False, False, False]]
    logits = torch.tensor([[0.0, 3.0, 2.0, 0.0]] * 2)  # "is" (1) narrowly ahead of "lies" (2)
    assert sampler.sample(logits).tolist() == [2, 1]  # penalised as seen in the question, or not
    assert sampler.seen[1].tolist() == [False, True, False, False]  # the reply's own "is" counts from now on


@cuda_only
def test_rows_join_and_leave_without_waiting_for_the_queued_steps() -> None:
    """Adding, reordering and sampling rows only queue work: the host never waits for the device's queue (the
    engine has the next step queued meanwhile; a copy from pageable memory would wait for it)."""
    device = torch.device("cuda")
    sampler = BatchSampler(64, device)
    params = [GenerationParams(temperature=0.7, top_k=5, repetition_penalty=1.2), GenerationParams(temperature=0.0)]

    def turn() -> torch.Tensor:
        sampler.add_rows(params, [[1, 2, 3], [4, 5]])
        sampler.keep_rows([len(sampler) - 1, len(sampler) - 2])  # the new rows, swapped
        return sampler.sample(torch.randn(2, 64, device=device))

    turn()  # a kernel's first launch in the process loads its module, which waits for the device: not measured
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of queued work
    queued = torch.cuda.Event()
    queued.record()
    tokens = turn()
    assert not queued.query()  # the sleep still runs: nothing above waited for it
    torch.cuda.synchronize()
    assert tokens.shape == (2,) and sampler.seen[1, [1, 2, 3]].all()
