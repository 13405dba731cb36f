#!/usr/bin/env bash
# BriVL retrieval evaluation, as the original evaluation/test_xyb.sh: extract features, then image<->text R@1/5/10.
#   bash scripts/evaluate_brivl.sh CFG_YML CHECKPOINT FEATURES_DIR [extract options: --jsonl J --batch-size 16 ...]
# Paths are taken from the current directory. PYTHON [python] picks the interpreter.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash scripts/evaluate_brivl.sh CFG_YML CHECKPOINT FEATURES_DIR [python -m brivl_infer.extract options]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
cfg=$1 checkpoint=$2 features=$3
shift 3
$PY -m brivl_infer.extract --cfg "$cfg" --checkpoint "$checkpoint" --features "$features" "$@"
$PY -m brivl_infer.evaluate --features "$features" --json "$features/recall.json"
