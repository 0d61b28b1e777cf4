"""The model loads in a thread that ends with the load, so that the engine's generation thread is the only
one holding an OpenMP team (see ``loading.in_passing_thread``: a second team halved the CPU decode speed)."""

from __future__ import annotations

import threading

import pytest

from chatstream_asgi.engines.transformers.loading import ModelLoadError, in_passing_thread


def test_the_work_runs_in_a_thread_that_has_ended_when_it_returns() -> None:
    ran_in: list[threading.Thread] = []

    def work() -> int:
        ran_in.append(threading.current_thread())
        return 7

    assert in_passing_thread(work) == 7
    (thread,) = ran_in
    assert thread is not threading.current_thread() and not thread.is_alive()


def test_its_failure_is_raised_in_the_caller() -> None:
    def work() -> None:
        raise ModelLoadError("cannot load model 'nope'")

    with pytest.raises(ModelLoadError, match="nope"):
        in_passing_thread(work)
