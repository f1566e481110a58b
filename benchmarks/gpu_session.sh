#!/usr/bin/env bash
# One command for a short GPU window (docs/scaling.md): runs benchmarks/gpu_session.py with this checkout's
# hf_elsa (src/ first on PYTHONPATH, installed or not) and the settings every run needs.
#   bash benchmarks/gpu_session.sh [--minutes 8] [--output_dir DIR] [--dry-run] [--only STEP,STEP] [--prepare]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_DISABLED=true
exec "${PYTHON:-python3}" "$ROOT/benchmarks/gpu_session.py" "$@"
