# Sourced by the one-call GPU scripts of this folder (not run alone), from the repository root.
# Sets W (the carried wheels folder, default wheels/final) and OUT (default /tmp/out), and
# defines:
#   el MSG                 a line "[seconds since start] MSG" on stdout and in $OUT/driver.log
#   begin NAME..           install_wheels NAME.., the GPU's name, driver, clock and memory into
#                          $OUT/driver.log, then "start": the first lines of every call
#   install_wheels NAME..  pip-installs $W/whl/NAME*.whl into /tmp/site, puts it on PYTHONPATH
#   warm_peer_then_go CMD  runs the shell command CMD (OpenCLIP's untimed warm-ups: they fill
#                          TorchInductor's cache) on cores 10-15 in the background and touches
#                          /tmp/go once CMD has ended and /tmp/ready exists (ours compiled), so
#                          that no timed section shares the GPU; `wait` waits for both.
#   peer_alone FILE CMD..  runs CMD (OpenCLIP timed alone, cache hit) into $OUT/FILE, logs it
#   matmul_after           the card's bf16 matmul rate into $OUT/matmul_after.json
#   warm_openclip B..      warm_peer_then_go with OpenCLIP ViT-B-16 compiled at each batch B
#   openclip_after_ours B..  once ours has ended: lets the warm-ups finish, times OpenCLIP
#                          alone at each batch B into $OUT/openclip_bB.json, then matmul_after
#   ours_medians           the step medians of ours (train_step_bench's stdout json), one line
#   attribute VARIANT NAME  profile_attribution of VARIANT's profile into $OUT/attribution_NAME.json
W=${WHEELS:-wheels/final}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)

el() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/driver.log"; }

install_wheels() {
  local files=() name
  for name in "$@"; do files+=("$W"/whl/"$name"*.whl); done
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "${files[@]}"
  export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
}

begin() {
  install_wheels "$@"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
      >> "$OUT/driver.log"
  el start
}

warm_peer_then_go() {
  rm -f /tmp/ready /tmp/go /tmp/oc_done
  ( taskset -c 10-15 bash -c "$1"; touch /tmp/oc_done ) &
  ( while [ ! -f /tmp/ready ] || [ ! -f /tmp/oc_done ]; do sleep 1; done
    el "go (ours compiled, OpenCLIP warm-up done)"; touch /tmp/go ) &
}

peer_alone() {
  local file=$1
  shift
  timeout 90 "$@" > "$OUT/$file" 2> /tmp/peer_alone.err
  el "openclip timed ($file) rc=$?: $(head -c 400 "$OUT/$file") $(tail -c 200 /tmp/peer_alone.err)"
}

matmul_after() {
  timeout 30 python3 benchmarks/matmul_rate.py > "$OUT/matmul_after.json" 2>&1
  el "matmul after: $(cat "$OUT/matmul_after.json")"
}

warm_openclip() {
  local b cmd=""
  for b in "$@"; do
    cmd+="timeout 200 python3 $W/peer_openclip_step.py $b compile > /tmp/oc_warm_$b.json \
        2> /tmp/oc_warm_$b.err; "
  done
  warm_peer_then_go "$cmd"
}

openclip_after_ours() {
  local b
  touch /tmp/ready /tmp/go
  wait
  for b in "$@"; do
    el "openclip warm b$b: $(head -c 300 /tmp/oc_warm_$b.json) $(tail -c 300 /tmp/oc_warm_$b.err)"
    peer_alone "openclip_b$b.json" python3 "$W"/peer_openclip_step.py "$b" compile
  done
  matmul_after
}

ours_medians() {
  grep -o '"[^"]*_b[0-9]*": {"batch": [0-9]*, "step_ms_median": [0-9.]*' /tmp/jax_stdout.json \
      | tr '\n' ' '
}

attribute() {
  timeout 40 python3 benchmarks/profile_attribution.py "$OUT" --variant "$1" \
      --out "$OUT/attribution_$2.json" 2>&1 | tail -18
  el "attribution rc=$?"
}
