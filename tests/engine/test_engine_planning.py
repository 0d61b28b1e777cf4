"""Step planning, without torch: which prompt tokens go beside the running rows, and which slots they take."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from chatstream_asgi.engines.transformers.planning import Chunk, StepPlan, pack_chunk, slot_targets


@dataclass(eq=False)
class Prompt:
    prompt_ids: list[int]
    cached: int = 0
    name: str = field(default="")


def prompts(*lengths: int, cached: tuple[int, ...] = ()) -> list[Prompt]:
    return [Prompt(list(range(n)), cached[i] if i < len(cached) else 0, f"p{i}") for i, n in enumerate(lengths)]


def fits_all(tokens: int, columns: int, sequences: int) -> bool:
    return True


def plan(waiting: list[Prompt], budget: int, per_sequence: int = 10_000, fits=fits_all) -> list[tuple[str, int, int]]:
    chunks = pack_chunk(waiting, budget=budget, per_sequence=per_sequence, cached=lambda p: p.cached, fits=fits)
    return [(c.seq.name, c.start, c.take) for c in chunks]


def test_prompts_are_packed_oldest_first_and_a_cut_one_ends_the_chunk() -> None:
    assert plan(prompts(5, 7, 9), budget=100) == [("p0", 0, 5), ("p1", 0, 7), ("p2", 0, 9)]
    assert plan(prompts(5, 7, 9), budget=10) == [("p0", 0, 5), ("p1", 0, 5)]  # p1 cut: p2 waits
    assert plan(prompts(40, 3), budget=16) == [("p0", 0, 16)]  # a long prompt's first chunk, alone
    assert plan(prompts(40, 3, cached=(32,)), budget=16) == [("p0", 32, 8), ("p1", 0, 3)]  # its last, then p1


def test_reused_beginnings_count_as_columns_and_a_cap_a_sequence_holds() -> None:
    seen = []

    def fits(tokens: int, columns: int, sequences: int) -> bool:
        seen.append((tokens, columns, sequences))
        return columns <= 40

    assert plan(prompts(30, 30, cached=(20, 25)), budget=100, fits=fits) == [("p0", 20, 10)]
    assert seen == [(15, 60, 2)]  # p1 (25 held + 5 new) would read 60 columns: not packed
    assert plan(prompts(30, 8), budget=100, per_sequence=8) == [("p0", 0, 8)]  # a ring model's chunk cap


def test_the_first_prompt_goes_in_even_when_nothing_fits() -> None:
    assert plan(prompts(9, 9), budget=100, fits=lambda *args: False) == [("p0", 0, 9)]


def test_completed_prompts_join_the_running_rows_and_a_partial_one_waits_on_top() -> None:
    waiting = prompts(5, 7, 40)
    chunks = pack_chunk(waiting, budget=20, per_sequence=100, cached=lambda p: p.cached, fits=fits_all)
    assert [c.completes for c in chunks] == [True, True, False]
    assert slot_targets(chunks, running=3, rows=8) == [3, 4, 7]
    step = StepPlan(["r0", "r1", "r2"], chunks)
    assert [getattr(s, "name", s) for s in step.sampled] == ["r0", "r1", "r2", "p0", "p1"]
    assert Chunk(waiting[2], 8, 32).completes and Chunk(waiting[2], 8, 32).end == 40


def test_planning_imports_no_torch() -> None:
    """The module loads alone, without torch (its package's ``__init__`` imports the engine, so by file)."""
    import subprocess

    code = (
        "import sys, importlib.util; "
        "path = 'chatstream_asgi/engines/transformers/planning.py'; "
        "spec = importlib.util.spec_from_file_location('planning', path); "
        "module = sys.modules['planning'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
