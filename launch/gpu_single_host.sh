#!/usr/bin/env bash
# Train mmts_jax on all (or some) GPUs of one host: one process drives every local GPU, the
# batch is split over them by the trainer's ("data",) mesh. No jax.distributed is needed.
#
#   launch/gpu_single_host.sh --config configs/X.py --workdir DIR [--gpus N|0,1,...]
#       [--mem-fraction 0.9] [--python PATH] [--dry-run] [-- EXTRA TRAIN ARGS]
#
# --gpus N uses GPUs 0..N-1 (default: all that nvidia-smi lists); a comma list picks them.
# --python defaults to the repository's .venv/bin/python (`make install`); without one, name an
# interpreter that has mmts_jax installed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="" WORKDIR="" GPUS="" MEM_FRACTION="0.9" PYTHON=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$1" "${2:-}"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; WORKDIR="$2"; shift 2 ;;
    --gpus) need_value "$1" "${2:-}"; GPUS="$2"; shift 2 ;;
    --mem-fraction) need_value "$1" "${2:-}"; MEM_FRACTION="$2"; shift 2 ;;
    --python) need_value "$1" "${2:-}"; PYTHON="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ -n "$PYTHON" ]] || PYTHON="$(project_python "$(dirname "${BASH_SOURCE[0]}")")"

if [[ -z "$GPUS" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
  fi
  [[ -n "$GPUS" ]] || die "no GPU found by nvidia-smi; pass --gpus N or --gpus 0,1,..."
elif [[ "$GPUS" =~ ^[0-9]+$ ]]; then
  [[ "$GPUS" -ge 1 ]] || die "--gpus must be >= 1, got $GPUS"
  GPUS="$(seq -s, 0 $((GPUS - 1)))"
elif ! [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus must be a count or a comma-separated list of GPU ids, got '$GPUS'"
fi

# Explicitly single-process: distributed initialisation is off even if the shell inherited
# SLURM / coordinator variables. The memory fraction leaves room for NCCL and the host runtime.
run env -u JAX_COORDINATOR_ADDRESS -u SLURM_NTASKS \
  CUDA_VISIBLE_DEVICES="$GPUS" XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION" \
  "$PYTHON" -m mmts_jax.cli train --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}"
