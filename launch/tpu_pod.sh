#!/usr/bin/env bash
# Train mmts_jax on every worker of a Cloud TPU pod slice (TPU VM), one process per host.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --config configs/X.py --workdir gs://BUCKET/RUN \
#       [--project P] [--setup --repo URL] [--branch B] [--dir ~/mmts_jax] \
#       [--coordinator IP] [--port 8476] [--dry-run] [-- EXTRA TRAIN ARGS]
#
# Steps (each one `gcloud compute tpus tpu-vm ...`; --dry-run prints them and runs nothing):
#   1. (--setup) clone or update the repository and pip-install it on all workers;
#   2. look up worker 0's internal IP, the jax.distributed coordinator (skipped with --coordinator);
#   3. `mmts train` on all workers at once (--worker=all) with JAX_COORDINATOR_ADDRESS set, so
#      `jax.distributed.initialize()` (the trainer's distributed="auto") joins the hosts; the
#      process count and ids come from the TPU metadata.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" SETUP=0 COORD="" PORT=8476
REPO="" BRANCH="main" DIR="~/mmts_jax"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need_value "$1" "${2:-}"; TPU="$2"; shift 2 ;;
    --zone) need_value "$1" "${2:-}"; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --config) need_value "$1" "${2:-}"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; WORKDIR="$2"; shift 2 ;;
    --repo) need_value "$1" "${2:-}"; REPO="$2"; shift 2 ;;
    --branch) need_value "$1" "${2:-}"; BRANCH="$2"; shift 2 ;;
    --dir) need_value "$1" "${2:-}"; DIR="$2"; shift 2 ;;
    --coordinator) need_value "$1" "${2:-}"; COORD="$2"; shift 2 ;;
    --port) need_value "$1" "${2:-}"; PORT="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$TPU" ]] || die "--tpu NAME is required"
[[ -n "$ZONE" ]] || die "--zone ZONE is required"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path: every host writes to it)"
[[ "$SETUP" == 0 || -n "$REPO" ]] || die "--setup needs --repo URL (the git remote to clone)"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

if [[ "$SETUP" == 1 ]]; then
  setup="set -e; if [ -d $DIR/.git ]; then git -C $DIR fetch origin $(quote "$BRANCH")"
  setup+=" && git -C $DIR checkout $(quote "$BRANCH") && git -C $DIR pull --ff-only;"
  setup+=" else git clone --branch $(quote "$BRANCH") $(quote "$REPO") $DIR; fi;"
  setup+=" python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e $DIR'[text,data]'"
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$setup"
fi

if [[ -z "$COORD" ]]; then
  describe=("${GCLOUD[@]}" describe "$TPU" "${WHERE[@]}"
            --format='value(networkEndpoints[0].ipAddress)')
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote "${describe[@]}")"
    COORD="WORKER0_IP"
  else
    COORD="$("${describe[@]}")"
    [[ -n "$COORD" ]] || die "could not read worker 0's IP of TPU '$TPU'"
  fi
fi

train="cd $DIR && JAX_COORDINATOR_ADDRESS=$(quote "$COORD:$PORT")"
train+=" python3 -m mmts_jax.cli train --config $(quote "$CONFIG") --workdir $(quote "$WORKDIR")"
[[ ${#EXTRA[@]} -gt 0 ]] && train+=" $(quote "${EXTRA[@]}")"
run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$train"
