"""The default model built without transformers' modeling code (``lean_model.py``, ``gguf_loading.load_gguf_lean``).

On the CPU the bundled SmolLM2 GGUF loads as a ``LeanLlama``: the server then never imports
``transformers.modeling_utils`` (nor torch._dynamo, sympy, ``torch.distributed.tensor``: about 100 MiB resident),
and answers token for token as the same file loaded into transformers' ``LlamaForCausalLM`` (``lean=False``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from model_fixtures import greedy_answers  # noqa: E402
from test_lean_decoder import forwards  # noqa: E402

from chatstream_asgi.engines.transformers import TransformersEngine  # noqa: E402
from chatstream_asgi.engines.transformers.kv_layout import UnsupportedModel  # noqa: E402
from chatstream_asgi.engines.transformers.lean_model import LeanConfig, LeanLlama  # noqa: E402
from chatstream_asgi.engines.transformers.loading import load_model  # noqa: E402
from chatstream_asgi.engines.transformers.model_runner import ModelRunner  # noqa: E402

PROBES = ["What is the capital of France?", "Write a haiku about autumn.", "What is 2 + 2?"]
HEAVY = (
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "torch._dynamo",
    "sympy",
    "torch.distributed.tensor",
)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2_builds() -> tuple[Any, Any, Any]:
    """SmolLM2 as a LeanLlama, its tokenizer, and the same file in transformers' model class."""
    lean, tokenizer, _ = load_model("smollm2", device="cpu")
    return lean, tokenizer, load_model("smollm2", device="cpu", lean=False)[0]


@pytest.mark.smollm2
def test_default_model_serves_without_transformers_modeling_code_and_answers_alike(
    smollm2_builds: tuple[Any, Any, Any],
) -> None:
    """The engine the server builds by default (its grammar library given the tokenizer too), in a fresh process."""
    script = f"""
import asyncio, json, sys
sys.path.insert(0, {str(REPO / "tests" / "support")!r})
from model_fixtures import greedy_answers
from chatstream_asgi.engines.base import GenerationParams
from chatstream_asgi.engines.transformers import TransformersEngine
engine = TransformersEngine.from_pretrained("smollm2", device="cpu")
engine.check_params(GenerationParams(json_schema='{{"type": "object"}}'))
answers = asyncio.run(greedy_answers(engine, {PROBES!r}))
imported = [m for m in {HEAVY!r} if sys.modules.get(m) is not None]
print(json.dumps({{"model": type(engine.model).__name__, "answers": answers, "imported": imported}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads(done.stdout.splitlines()[-1])
    assert served["model"] == "LeanLlama" and served["imported"] == []
    _, tokenizer, reference = smollm2_builds
    assert type(reference).__name__ == "LlamaForCausalLM"
    expected = asyncio.run(greedy_answers(TransformersEngine(reference, tokenizer, "cpu"), PROBES))
    assert "Paris" in served["answers"][0][0]
    assert served["answers"] == expected


@pytest.mark.smollm2
def test_lean_model_computes_transformers_forward_of_the_file(smollm2_builds: tuple[Any, Any, Any]) -> None:
    """Prefill after reused prefixes and a decode step: the LeanLlama through the lean decoder against the
    transformers-built model through transformers' own forward."""
    lean, _, reference = smollm2_builds
    assert isinstance(lean, LeanLlama)
    runner = ModelRunner(lean, torch.device("cpu"))
    torch.manual_seed(1)
    got = forwards(runner)
    runner = ModelRunner(reference, torch.device("cpu"))
    runner.decoder = None
    torch.manual_seed(1)
    for logits, want in zip(got, forwards(runner), strict=True):
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    positions = torch.arange(40).reshape(2, 20)
    x = torch.zeros(2, 20, 1)
    for a, b in zip(lean.model.rotary_emb(x, positions), reference.model.rotary_emb(x, positions), strict=True):
        assert torch.equal(a, b)


@pytest.mark.smollm2
def test_slotted_cache_needs_transformers_model_class(smollm2_builds: tuple[Any, Any, Any]) -> None:
    lean, tokenizer, _ = smollm2_builds
    with pytest.raises(UnsupportedModel, match="lean=False"):
        TransformersEngine(lean, tokenizer, "cpu", static_cache=True)
    engine = TransformersEngine.from_pretrained("smollm2", device="cpu", static_cache=True, compile_mode=None)
    assert type(engine.model).__name__ == "LlamaForCausalLM" and engine.static


SMOLLM2 = {"model_type": "llama", "_model_name_or_path": "SmolLM2", "tie_word_embeddings": True, "vocab_size": 49152,
           "num_hidden_layers": 30, "max_position_embeddings": 8192, "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "rms_norm_eps": 1e-05,
           "head_dim": 64, "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "pad_token_id": 2}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [{"model_type": "mistral"}, {"sliding_window": 4096}, {"rope_scaling": {"rope_type": "llama3"}},
     {"num_key_value_heads": [3] * 30}],
    ids=["mistral", "sliding-window", "rope-scaling", "per-layer-heads"],
)  # fmt: skip
def test_configs_beyond_a_plain_llama_go_to_transformers(change: dict[str, Any]) -> None:
    assert LeanConfig.of(SMOLLM2, "dir") is not None
    assert LeanConfig.of({**SMOLLM2, **change}, "dir") is None
    assert LeanConfig.of({k: v for k, v in SMOLLM2.items() if k != "rope_theta"}, "dir") is None


def test_a_config_without_optional_keys_takes_llamas_defaults() -> None:
    optional = ("num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id")
    config = LeanConfig.of({k: v for k, v in SMOLLM2.items() if k not in optional}, "dir")
    assert config is not None
    assert (config.num_key_value_heads, config.head_dim, config.bos_token_id, config.eos_token_id) == (9, 64, 1, 2)
    assert config.pad_token_id is None and config.name_or_path == "dir"


def test_the_weights_map_builds_ggufs_name_map_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' recursion built gguf's name map once per submodule (367 times, 4.6 s of the default
    model's load); the loader's map is the same map, built once, and gguf's builder is restored."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    from chatstream_asgi.engines.transformers.gguf_loading import weights_map

    built = []
    build = gguf.get_tensor_name_map

    def counted(*args: Any) -> Any:
        built.append(args)
        return build(*args)

    monkeypatch.setattr(gguf, "get_tensor_name_map", counted)
    config = LeanConfig.of({**SMOLLM2, "num_hidden_layers": 2}, "dir")
    assert config is not None
    with torch.device("meta"):
        model = LeanLlama(config)
    processor = LlamaTensorProcessor(config=dataclasses.asdict(config))
    names = weights_map(model, processor)
    assert len(built) == 1 and gguf.get_tensor_name_map is counted
    assert names == get_gguf_hf_weights_map(model, processor) and len(built) > 2
    assert names["blk.1.ffn_down.weight"] == "model.layers.1.mlp.down_proj.weight"


@pytest.mark.smollm2
def test_the_default_model_parses_its_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' config read and the tensors share one parse of the GGUF (its tokenizer's 49,152 tokens
    and merges took 2.3 s a parse on 2 cores); gguf's reader class is restored after the load."""
    import gguf

    parsed = []
    made = gguf.GGUFReader

    class Counted(made):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            parsed.append(args)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    model, _, _ = load_model("smollm2", device="cpu")
    assert isinstance(model, LeanLlama) and len(parsed) == 1
    assert gguf.GGUFReader is Counted
