#!/usr/bin/env bash
# REAP-VLM runner: ./run.sh <command> [args...]   (./run.sh help lists the commands)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

usage() {
  cat <<'EOF'
Usage: ./run.sh <command> [args...]

Commands:
  build      build the Docker image (GPU-ready)
  reap       score experts            -> reap.py [args]
  prune      write the pruned model   -> prune_model.py [args]
  test       test the pruned model    -> test_pruned_model.py [args]
  all        reap, then prune, then test (each reads .env; args go to reap only)
  demo       the whole pipeline on a generated tiny Qwen3-VL-MoE (CPU, offline)
  verify     inspect a checkpoint's MoE layout without loading weights
  selftest   ruff, hadolint, shellcheck and pytest, always local (--all adds the slow tests)
  shell      a shell in the container (docker) or with the virtual environment (local)
  help       this text

Runner settings (environment or the .env file):
  REAP_RUNTIME   auto (docker when `docker info` works, else local), docker, or local
  REAP_VENV      local virtual environment folder (default .venv)
  REAP_GPUS      GPUs reserved in docker mode (default all)
  REAP_IMAGE     image name (default reap-vlm:latest)
  REAP_ENV_FILE  the .env file to read (default .env)
Arguments after the command go to the stage script unchanged; its exit code is returned.
EOF
}

die() { echo "run.sh: $1" >&2; exit 2; }

# Read one runner key from the environment, else from the .env file (parsed as KEY=VALUE lines; never executed).
setting() {
  local key="$1" default="$2" value=""
  if [[ -n "${!key:-}" ]]; then
    value="${!key}"
  elif [[ -f "$ENV_FILE" ]]; then
    value="$(sed -n "s/^[[:space:]]*${key}[[:space:]]*=[[:space:]]*//p" "$ENV_FILE" | tail -n 1)"
    value="${value%\"}"; value="${value#\"}"; value="${value%\'}"; value="${value#\'}"
  fi
  echo "${value:-$default}"
}

ENV_FILE="${REAP_ENV_FILE:-.env}"
[[ -n "${REAP_ENV_FILE:-}" && ! -f "$ENV_FILE" ]] && die "REAP_ENV_FILE=$ENV_FILE does not exist: point it at an existing .env file."
RUNTIME="$(setting REAP_RUNTIME auto)"
VENV="$(setting REAP_VENV .venv)"
# compose reads these (REAP_ENV_FILE only when the user named one: compose defaults to .env itself)
export REAP_GPUS REAP_IMAGE
REAP_GPUS="$(setting REAP_GPUS all)"
REAP_IMAGE="$(setting REAP_IMAGE reap-vlm:latest)"

docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }

resolve_runtime() {
  case "$RUNTIME" in
    local|docker) echo "$RUNTIME" ;;
    auto) if docker_ok; then echo docker; else echo local; fi ;;
    *) die "REAP_RUNTIME=$RUNTIME is not valid: use auto, docker or local." ;;
  esac
}

# Create the venv on first use; (re)install when the requirements file changes (hash stamp in the venv).
ensure_venv() {
  local reqs="$1" stamp hash
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "run.sh: creating $VENV (first run installs torch, transformers, ...: about 3-5 minutes)" >&2
    python3 -m venv "$VENV"
  fi
  stamp="$VENV/.reap-requirements"
  hash="$(cat "$reqs" requirements.txt | sha256sum | cut -d' ' -f1)-$reqs"
  if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$hash" ]]; then
    echo "run.sh: installing $reqs into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
    echo "$hash" > "$stamp"
  fi
}

# Run a python module/script in the chosen runtime.
run_python() {
  local runtime; runtime="$(resolve_runtime)"
  if [[ "$runtime" == docker ]]; then
    docker compose run --rm reap-vlm "$@"
  else
    ensure_venv requirements.txt
    "$VENV/bin/python" "$@"
  fi
}

selftest() {
  local marker=(-m "not slow")
  if [[ "${1:-}" == "--all" ]]; then marker=(-m "slow or not slow"); shift; fi
  ensure_venv requirements-dev.txt
  local bin="$VENV/bin"
  echo "== ruff"; "$bin/ruff" check .
  echo "== hadolint"; "$bin/hadolint" Dockerfile
  echo "== shellcheck"; "$bin/shellcheck" run.sh .ci/run
  echo "== pytest"; "$bin/python" -m pytest "${marker[@]}" "$@"
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  help|-h|--help) usage ;;
  build) docker compose build reap-vlm ;;
  reap) run_python reap.py "$@" ;;
  prune) run_python prune_model.py "$@" ;;
  test) run_python test_pruned_model.py "$@" ;;
  all) run_python reap.py "$@" && run_python prune_model.py && run_python test_pruned_model.py ;;
  demo) run_python -m reap_vlm.demo "$@" ;;
  verify) run_python -m reap_vlm.verify "$@" ;;
  selftest) selftest "$@" ;;
  shell)
    if [[ "$(resolve_runtime)" == docker ]]; then docker compose run --rm --entrypoint bash reap-vlm
    else ensure_venv requirements.txt; echo "run.sh: venv $VENV active; exit to leave" >&2
      bash --rcfile <(echo "source '$VENV/bin/activate'") -i; fi ;;
  *) die "unknown command '$cmd': use one of build reap prune test all demo verify selftest shell help." ;;
esac
