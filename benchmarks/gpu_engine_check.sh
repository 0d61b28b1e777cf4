#!/usr/bin/env bash
# The engine's whole check on a lent GPU, in one call (see docs/engines-coverage.md), each part's log in $OUT:
#   1. the coverage matrix on CUDA: float32, CUDA graphs, equal to model.generate; reuse on/off after
#      cancellations mid-chunk; graph vs eager steps                                      -> matrix.log
#   2. the compiled bfloat16 step against eager bfloat16 and float32, every architecture  -> agreement.log
#   3. a float32 1.1B engine's start and first reply, this checkout and $REPO's (the code before it)
#                                                                                          -> first-reply*.log
#   4. throughput and the long join, defaults (compile auto): 8B, 1.1B, SmolLM2 shapes     -> tp-*.log
# Run from this checkout's root with the SmolLM2 config + tokenizer in $SMOLLM2; each part has its own time
# limit, so a slow one leaves the others their logs. Parts 1-3 run side by side (they time nothing but the
# starts), the throughput runs alone on the card.
set -u
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" /tmp/shapes
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$OUT/card.txt" 2>&1
python3 benchmarks/gpu_shapes.py "$SMOLLM2" /tmp/shapes > /dev/null
BUDGET=${BUDGET:-600}  # seconds this call may take: a part that would not end in time is skipped
part() { local limit=$1 log=$2; shift 2
  if (( SECONDS + limit > BUDGET )); then echo "== skipped $log (${SECONDS} s gone of $BUDGET)" >> "$OUT/parts.txt"; return; fi
  echo "== $(date +%T) $log: $*" >> "$OUT/parts.txt"
  timeout "$limit" "$@" > "$OUT/$log" 2>&1; local rc=$?; echo "== $(date +%T) $log exit $rc" >> "$OUT/parts.txt"; }
CUDA_TESTS="tests/engine/test_engine_coverage.py tests/engine/test_prefix_cache.py tests/engine/test_engine_static.py"
# Checks that time nothing, side by side; then the throughput runs alone on the card.
part 120 matrix.log env CHATSTREAM_TEST_DEVICE=cuda python3 -m pytest -v --tb=short -p no:cacheprovider $CUDA_TESTS \
  -k "static and greedy_output_is_transformers or cancellations_mid_chunk or graph_engine_matches_alone or graph_decode" &
ARCHS=llama,qwen2,qwen2-window,qwen3,qwen3_moe,mixtral,mistral,mistral-window,phi3,gemma,gemma2,gemma3_text,granite,olmo2,gpt_oss
part 300 agreement.log python3 benchmarks/compiled_agreement.py --archs $ARCHS --prefix 128 --positions 416 --jobs 8 &
part 90 first-reply.log python3 benchmarks/first_reply.py --random-init /tmp/shapes/1.1b --dtype float32 &
part 115 first-reply-before.log env PYTHONPATH="/tmp/site:$REPO" CHATSTREAM_OTHER_CHECKOUT=1 \
  python3 benchmarks/first_reply.py --random-init /tmp/shapes/1.1b --dtype float32 &
wait
TP="python3 benchmarks/engine_throughput.py --device cuda --batch-sizes 1,16,64 --skip-hf --engine-only"
part 150 tp-1.1b.log $TP --random-init /tmp/shapes/1.1b
part 160 tp-8b.log $TP --random-init /tmp/shapes/8b
part 95 tp-smollm2.log $TP --random-init /tmp/shapes/smollm2
tail -n 4 "$OUT"/*.log
