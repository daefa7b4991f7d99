#!/usr/bin/env bash
# The CPU benchmarks in one script, one after another (never two at once: each measures ratios from
# interleaved repeats inside its own run, and two runs side by side would share the cores).
# Writes benchmarks/results/*.json and one log per benchmark under $LOGS (default /tmp/mechkit-bench).
# Usage: [THREADS=2] bash benchmarks/cpu.sh [name ...]   (names: fingerprint patching_12l patching_bundled
#        head_ablation path_patching circuits sae steering_speed; default: all, in that order)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
THREADS=${THREADS:-2}
LOGS=${LOGS:-/tmp/mechkit-bench}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
R=benchmarks/results
declare -A CMD=(
  [fingerprint]="benchmarks/fingerprint.py --repeats 3"
  [patching_12l]="benchmarks/patching.py --skip-llama --sweeps resid_pre --repeats 3 --overheads 64,256 --plain-rows 32,64,128 --cost-model --out $R/patching.json"
  [patching_bundled]="benchmarks/patching.py --prompts 16 --plain-reps 6 --tl-patches 40 --skip-random --repeats 5 --out $R/patching_bundled.json"
  [head_ablation]="benchmarks/head_ablation.py --skip-random"
  [path_patching]="benchmarks/path_patching.py"
  [circuits]="benchmarks/circuits.py --repeats 3"
  [sae]="benchmarks/sae.py --repeats 5"
  [steering_speed]="benchmarks/steering_speed.py --models tiny-gpt2,tiny-llama"
)
ORDER=(fingerprint patching_12l patching_bundled head_ablation path_patching circuits sae steering_speed)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  echo "== $name: $PY ${CMD[$name]}  ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  $PY ${CMD[$name]} --threads "$THREADS" > "$LOGS/$name.log" 2>&1
  echo "   exit $? after $(( $(date +%s) - start )) s; log $LOGS/$name.log"
  tail -15 "$LOGS/$name.log" | grep -v '%|' | sed 's/^/   /'
done
