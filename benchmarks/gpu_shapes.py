"""Write the GPU benchmark's model shapes (config + SmolLM2's tokenizer) for ``--random-init``.

Run: ``python benchmarks/gpu_shapes.py SMOLLM2_DIR OUT_DIR`` (``SMOLLM2_DIR``: SmolLM2's config and tokenizer).

``OUT_DIR/smollm2`` is SmolLM2-135M; ``OUT_DIR/1.1b`` the Llama 1.1B shape (TinyLlama's dims); ``OUT_DIR/8b``
Llama-3.1-8B's dims with SmolLM2's vocabulary (7.4B parameters, 4,096 positions so that 64 rows fit an H100's
KV budget); ``OUT_DIR/1.1b-f32`` the 1.1B shape again (for float32 runs). Weights are random
(throughput does not depend on them).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SHAPES = {
    "smollm2": {},
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 4096, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
}  # fmt: skip


def main() -> None:
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    config = json.loads((source / "config.json").read_text())
    for name, changes in SHAPES.items():
        directory = target / name
        shutil.copytree(source, directory, dirs_exist_ok=True)
        (directory / "config.json").write_text(json.dumps({**config, **changes}, indent=2))
        print(directory)


if __name__ == "__main__":
    main()
