#!/usr/bin/env bash
# GPU checks in one prepared script (for a lent H100/H200): edge circuits (EAP, EAP-IG, RelP, the
# fused faithfulness curve and single-edge patching, float32, checked against the CPU), the fused
# patching and steering benchmarks on CUDA in bf16, against TransformerLens on the same weights, plus
# the GPU parts of the test suite (device_map splits onto cuda:0). Writes $OUT/*_cuda*.json.
# On the lent machine python3 already holds torch (CUDA) and transformers; mechkit runs from the
# working tree (PYTHONPATH). transformer-lens, plotly and their missing needs are not there: carry
# them as wheels (see the device tool's README: pip download ... -d .whl: transformers==5.24.0
# transformer-lens==4.3.0 fancy-einsum beartype typeguard plotly), plus .whl/stub/datasets, a stand-in
# for `datasets` (TransformerLens imports it at module level; nothing here loads a dataset), then
#   run(command="pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#        PYTHONPATH=/tmp/site:$PWD/.whl/stub bash benchmarks/gpu.sh", carry=[".whl"])
# Worst case 120 + 60 + 200 + 120 + 60 + 60 s = 10.3 min of commands (the first run took 2.9 min), inside the 15-minute device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# edge circuits: EAP / EAP-IG / RelP vs forward+backward, curve, single-edge patching; scores vs the CPU
timeout 120 $PY benchmarks/circuits.py --device cuda --threads 8 --repeats 5 --out "$OUT/circuits_cuda.json" 2>&1 | tail -14
# where the circuits' time goes on the GPU (torch.profiler: launches, device time, top operators)
timeout 60 $PY benchmarks/profile_circuits.py --device cuda --threads 8 > "$OUT/profile_circuits_cuda.txt" 2>&1; grep "^==" "$OUT/profile_circuits_cuda.txt"
# fused patching vs TransformerLens, bf16 on the GPU (bundled models + the 12-layer GPT-2-small shape)
timeout 200 $PY benchmarks/patching.py --device cuda --dtype bfloat16 --sample-chunks 0 --tl-patches 64 \
  --prompts 8 --out "$OUT/patching_cuda_bf16.json" 2>&1 | tail -8
# steering methods, bf16 on the GPU
timeout 120 $PY benchmarks/steering.py --device cuda --dtype bfloat16 --out "$OUT/steering_cuda_bf16.json" 2>&1 | tail -30
# single-head ablation effects: fused engine vs the per-head loop, bf16 on the GPU
timeout 60 $PY benchmarks/head_ablation.py --device cuda --dtype bfloat16 --out "$OUT/head_ablation_cuda_bf16.json" 2>&1 | tail -6
# the tests that use a GPU when one is present (device_map cuda:0/cpu split)
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_device_map.py "tests/test_patching.py::test_memory_budget_bounds_cuda_peak" 2>&1 | tail -3
