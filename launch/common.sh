# Shared by the launch scripts (sourced, not executed): dry-run aware command runner.
#
# `run CMD...` prints the command, shell-quoted so it can be pasted, prefixed with "+ ", and runs
# it unless DRY_RUN=1. Every launch script routes every side effect through `run`, so
# `--dry-run` prints exactly the commands a real launch executes.

DRY_RUN="${DRY_RUN:-0}"

quote() {  # POSIX-shell quoting: plain words as they are, anything else in single quotes
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

run() {
  printf '+ %s\n' "$(quote "$@")"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

usage() {  # the script's leading comment block, without the shebang and #SBATCH lines
  awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

die() {
  printf '%s: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

need_value() {  # need_value FLAG VALUE: the flag must be followed by a value
  [[ -n "${2:-}" && "${2:0:2}" != "--" ]] || die "$1 needs a value"
}

project_python() {  # project_python LAUNCH_DIR: the repository's virtualenv interpreter, or die
  local repo
  repo="$(cd "$1/.." && pwd)"
  [[ -x "$repo/.venv/bin/python" ]] \
    || die "no virtualenv at $repo/.venv (run 'make install' there), or pass --python PATH to an interpreter that has mmts_jax installed"
  printf '%s' "$repo/.venv/bin/python"
}
