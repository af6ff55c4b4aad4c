#!/usr/bin/env bash
# REAP-VLM runner: ./run.sh [--env-file FILE] <command> [args...]   (./run.sh help lists the commands)
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
cd "$ROOT" # paths in arguments and in .env are relative to the repository root, in both runtimes
SERVICE=reap-vlm
# What the Dockerfile copies: their hash, stored as an image label, tells whether the image holds this code.
IMAGE_SOURCES=(Dockerfile requirements.txt reap.py prune_model.py test_pruned_model.py reap_vlm calibration)

usage() {
  cat <<'EOF'
Usage: ./run.sh [--env-file FILE] <command> [args...]

Commands:
  build      build the Docker image (docker compose build [args], e.g. --no-cache)
  reap       score the experts          python reap.py [args]
             reap --gpus N [args]: N data-parallel ranks on one node (torchrun: python -m reap_vlm.distributed
             --standalone --nproc-per-node N reap.py [args]); in docker it reserves N GPUs unless REAP_GPUS is set
  prune      write the pruned model     python prune_model.py [args]
  test       test the pruned model      python test_pruned_model.py [args]
  all        reap, then prune, then test; stops at the first failure. Its flags become settings for every
             stage (--prune-ratio 0.3 -> REAP_PRUNE_RATIO=0.3, --no-plots -> REAP_PLOTS=false); each stage
             takes the keys it knows, and a misspelt key stops the first stage at once.
  demo       the whole pipeline on the shipped demo VLM (CPU, offline; --model tiny: a generated random-weight one): python -m reap_vlm.demo
  verify     a checkpoint's MoE layout without loading weights: python -m reap_vlm.verify MODEL [args]
  selftest   ruff (lint + format), hadolint, shellcheck, then pytest [args]; always local, the venv gets requirements-dev.txt;
             selftest --all also runs the slow tests
  shell      a shell in the container (docker) or with the virtual environment active (local)
  help       this text (also -h, --help)
Arguments after the command reach the stage unchanged; its exit code is run.sh's exit code.

Runner settings (environment, else the .env file; the file is read, never executed):
  REAP_RUNTIME   auto (default): docker when `docker info` works and Docker Compose is v2.24+, else local.
                 docker: docker compose run (GPUs, volumes and the .env file from docker-compose.yml).
                 local: the virtual environment below (created, and refreshed when requirements change).
  REAP_VENV      local virtual environment folder (default .venv)
  REAP_GPUS      GPUs reserved in docker mode: all (default) or a count
  REAP_IMAGE     image name (default reap-vlm:latest)
  REAP_ENV_FILE  the .env file (default .env; also --env-file FILE)
Docker mode runs the container as your uid:gid, builds the image when this checkout's code changed, passes
your REAP_* variables in, and sees ./models (as /models and models/), ./outputs, ./calibration and, read-only
and offline, the host's Hugging Face cache (REAP_MODEL_PATH=org/name after `hf download org/name`).
Other paths, or Docker without the NVIDIA Container Toolkit: REAP_RUNTIME=local.
EOF
}

die() { echo "run.sh: error: $1" >&2 && exit 2; }
note() { echo "run.sh: $1" >&2; }

# A runner key: the environment first, else the last `KEY=value` line of the env file (dotenv rules:
# optional `export`, quotes, ` #` comments). The file is parsed here and never executed.
setting() {
  local key="$1" default="$2" line value=""
  if [[ -n "${!key:-}" ]]; then echo "${!key}" && return; fi
  if [[ -f "$ENV_FILE" ]]; then
    while IFS= read -r line || [[ -n "$line" ]]; do
      line="${line%$'\r'}"
      [[ "$line" =~ ^[[:space:]]*(export[[:space:]]+)?${key}[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
      value="${BASH_REMATCH[2]}"
      if [[ "$value" =~ ^\"([^\"]*)\" || "$value" =~ ^\'([^\']*)\' ]]; then
        value="${BASH_REMATCH[1]}"
      else
        value="${value%%[[:space:]]#*}" && value="${value%"${value##*[![:space:]]}"}"
      fi
    done <"$ENV_FILE"
  fi
  echo "${value:-$default}"
}

# Docker is usable: the engine answers and Compose is v2.24+ (the first with an optional env_file).
compose_ok() {
  local version major minor
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 || return 1
  version="$(docker compose version --short 2>/dev/null)" || return 1
  version="${version#v}" && major="${version%%.*}" && minor="${version#*.}" && minor="${minor%%.*}"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] && ((major > 2 || (major == 2 && minor >= 24)))
}

# Compose's settings, exported so that a key set only in the env file still reaches its interpolation.
docker_settings() {
  REAP_GPUS="$(setting REAP_GPUS all)" && REAP_IMAGE="$(setting REAP_IMAGE reap-vlm:latest)"
  [[ "$REAP_GPUS" == all || "$REAP_GPUS" =~ ^[0-9]+$ ]] || die "REAP_GPUS=$REAP_GPUS is not valid: use all or a count."
  export REAP_GPUS REAP_IMAGE
  # the host's Hugging Face hub cache, mounted read-only (Hub ids as model paths); made here, or the engine
  # would create it owned by root
  REAPVLM_HF_CACHE="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
  mkdir -p "$REAPVLM_HF_CACHE" && export REAPVLM_HF_CACHE
  REAPVLM_SOURCE="$(find "${IMAGE_SOURCES[@]}" -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum)"
  export REAPVLM_SOURCE="${REAPVLM_SOURCE%% *}" # the image label (not REAP_*: the settings would refuse it)
}

# Sets RUNTIME to docker or local, once per call of run.sh.
pick_runtime() {
  [[ -z "$RUNTIME" ]] || return 0
  local wanted
  wanted="$(setting REAP_RUNTIME auto)"
  case "$wanted" in
    local) RUNTIME=local ;;
    docker) compose_ok || die "REAP_RUNTIME=docker, but \`docker info\` fails or Docker Compose is older than v2.24: start Docker, update Compose, or use REAP_RUNTIME=local."
      RUNTIME=docker ;;
    auto) if compose_ok; then RUNTIME=docker; else RUNTIME=local; fi
      note "REAP_RUNTIME=auto: running in $RUNTIME (set REAP_RUNTIME=docker or local to choose)" ;;
    *) die "REAP_RUNTIME=$wanted is not valid: use auto, docker or local." ;;
  esac
  if [[ "$RUNTIME" == docker ]]; then docker_settings; fi
}

# Create the venv on first use; install when a requirements file changed since its last install. A stamp
# per file holds its `sha256sum` line; requirements-dev.txt includes requirements.txt, so its install stamps
# both, and a selftest venv runs the stages without installing again.
ensure_venv() {
  local file stale=()
  VENV="$(setting REAP_VENV .venv)"
  if [[ ! -x "$VENV/bin/python" ]]; then
    command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python 3.10+ (or use Docker)."
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python 3.10+ is needed, python3 is $(python3 --version 2>&1)."
    note "creating $VENV; the first run installs torch, transformers etc. (about 3-5 minutes)"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed: install the venv module (Debian/Ubuntu: apt install python3-venv), remove $VENV, run again."
  fi
  for file in "$@"; do
    sha256sum --check --status "$VENV/.reap-$file.sha256" 2>/dev/null || stale+=("$file")
  done
  ((${#stale[@]})) || return 0
  note "installing $1 into $VENV (${stale[*]} new or changed)"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -r "$1" >&2; then
    note "pip could not install $1 into $VENV: see its message above, then run again." && exit 1
  fi
  for file in "$@"; do sha256sum "$file" >"$VENV/.reap-$file.sha256"; done
}

# Sets RUN to `docker compose run` as the calling user (files written to ./outputs are theirs), with the
# stage settings of the environment passed in (flags > environment > .env as in local mode), then the
# arguments. The image is built first when missing or made from other code; else it runs as it is, with no
# registry round trip, so an offline GPU node runs a built image.
docker_run() {
  local name built
  built="$(docker image inspect --format '{{ index .Config.Labels "reap-vlm.source" }}' "$REAP_IMAGE" 2>/dev/null)" || built=""
  if [[ "$built" != "$REAPVLM_SOURCE" ]]; then
    note "building $REAP_IMAGE from this checkout (first build: CUDA base and torch, several GB; later: seconds)"
    docker compose build "$SERVICE" >&2
  fi
  mkdir -p models outputs # the engine would create them owned by root
  RUN=(docker compose run --rm --user "$(id -u):$(id -g)")
  for name in $(compgen -e); do
    case "$name" in
      REAP_RUNTIME | REAP_VENV | REAP_GPUS | REAP_IMAGE | REAP_ENV_FILE) ;;
      REAP_*) RUN+=(-e "$name=${!name}") ;;
    esac
  done
  RUN+=("$@")
}

# Run python with these arguments in the selected runtime. With `exec` first, run.sh becomes that process:
# signals (Ctrl-C, a scheduler's SIGTERM) reach the stage directly and its exit code is ours.
stage() {
  local launch=()
  if [[ "$1" == exec ]]; then launch=(exec) && shift; fi
  pick_runtime
  if [[ "$RUNTIME" == docker ]]; then
    docker_run "$SERVICE" "$@"
  else
    ensure_venv requirements.txt
    RUN=("$VENV/bin/python" "$@")
  fi
  "${launch[@]}" "${RUN[@]}"
}

# `all`: --key value, --key=value, --flag and --no-flag become REAP_KEY=... for every stage.
flags_to_settings() {
  local flag value
  while (($#)); do
    flag="$1" && shift
    [[ "$flag" =~ ^--[a-z][a-z0-9-]*(=.*)?$ ]] || die "all takes --option [value] pairs (e.g. --prune-ratio 0.3), not '$flag'."
    flag="${flag#--}"
    if [[ "$flag" == *=* ]]; then value="${flag#*=}" && flag="${flag%%=*}"
    elif (($#)) && [[ "$1" != --* ]]; then value="$1" && shift
    elif [[ "$flag" == no-* ]]; then value=false && flag="${flag#no-}"
    else value=true; fi
    if [[ "$flag" == quiet || "$flag" == verbose ]] && [[ "$value" == true ]]; then value="$flag" && flag=log-level; fi
    flag="${flag//-/_}" && export "REAP_${flag^^}=$value"
  done
}

step() { echo "== $*" && "$VENV/bin/$1" "${@:2}"; }
selftest() {
  local marker=(-m "not slow")
  if [[ "${1:-}" == --all ]]; then marker=(-m "slow or not slow") && shift; fi
  ensure_venv requirements-dev.txt requirements.txt
  step ruff check .
  step ruff format --check .
  step hadolint Dockerfile
  step shellcheck run.sh .ci/run
  echo "== pytest ${marker[*]} $*" && exec "$VENV/bin/python" -m pytest "${marker[@]}" "$@"
}

shell() {
  pick_runtime
  if [[ "$RUNTIME" == docker ]]; then
    docker_run --entrypoint bash "$SERVICE"
    exec "${RUN[@]}"
  fi
  ensure_venv requirements.txt
  note "a shell with $VENV active; exit to leave"
  exec bash --rcfile <(printf '[[ -f ~/.bashrc ]] && source ~/.bashrc\nsource %q\n' "$VENV/bin/activate") -i
}

# reap [--gpus N] [args]: --gpus N > 1 starts N data-parallel ranks through torchrun (reap_vlm.distributed)
reap() {
  local gpus="" args=() reserved
  while (($#)); do
    case "$1" in
      --gpus) (($# >= 2)) || die "--gpus needs a count: ./run.sh reap --gpus 2 [options]."
        gpus="$2" && shift 2 ;;
      --gpus=*) gpus="${1#--gpus=}" && shift ;;
      *) args+=("$1") && shift ;;
    esac
  done
  if [[ -z "$gpus" || "$gpus" == 1 ]]; then stage exec reap.py "${args[@]}"; fi
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus $gpus is not a count: give the number of GPUs (data-parallel ranks), e.g. --gpus 2."
  reserved="$(setting REAP_GPUS all)"
  if [[ "$reserved" =~ ^[0-9]+$ ]] && ((reserved < gpus)); then
    die "REAP_GPUS=$reserved reserves fewer GPUs than --gpus $gpus: raise REAP_GPUS or unset it."
  fi
  if [[ "$reserved" == all ]]; then export REAP_GPUS="$gpus"; fi
  stage exec -m reap_vlm.distributed --standalone --nproc-per-node "$gpus" reap.py "${args[@]}"
}

RUNTIME="" # docker or local, once picked
if [[ "${1:-}" == --env-file ]]; then
  (($# >= 2)) || die "--env-file needs a file: ./run.sh --env-file FILE <command> [args...]"
  export REAP_ENV_FILE="$2" && shift 2
fi
cmd="${1:-help}"
if (($#)); then shift; fi
case "$cmd" in
  help | -h | --help) usage && exit 0 ;;
  build | reap | prune | test | all | demo | verify | selftest | shell) ;;
  *) die "unknown command '$cmd': use one of build reap prune test all demo verify selftest shell help." ;;
esac
ENV_FILE="${REAP_ENV_FILE:-.env}"
if [[ -n "${REAP_ENV_FILE:-}" && ! -f "$ENV_FILE" ]]; then
  die "REAP_ENV_FILE=$ENV_FILE does not exist: point it at an existing .env file (relative to $ROOT)."
fi

case "$cmd" in
  build) compose_ok || die "build needs Docker (\`docker info\` works) with Docker Compose v2.24+."
    docker_settings
    exec docker compose build "$@" "$SERVICE" ;;
  reap) reap "$@" ;;
  prune) stage exec prune_model.py "$@" ;;
  test) stage exec test_pruned_model.py "$@" ;;
  all)
    if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage && exit 0; fi
    flags_to_settings "$@"
    stage reap.py
    stage prune_model.py
    stage exec test_pruned_model.py ;;
  demo) stage exec -m reap_vlm.demo "$@" ;;
  verify) stage exec -m reap_vlm.verify "$@" ;;
  selftest) selftest "$@" ;;
  shell) shell ;;
esac
