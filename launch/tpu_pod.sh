#!/usr/bin/env bash
# Runs eve_jax on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--accelerator v4-32] [options] \
#       -- --config=configs/base.py --workdir=gs://BUCKET/eve_base [--config.X=Y ...]
#
# Everything after `--` goes to `python -m eve_jax.main` unchanged, on every
# worker at once; jax.distributed finds the other workers by itself on a TPU
# slice. Steps: (1) create the slice if it does not exist, (2) copy `git
# archive HEAD` of this repository to ~/eve_jax on every worker, (3) install
# it into ~/eve_jax_venv (Python >= 3.12, newer than the runtime images' 3.10,
# comes from apt), (4) run, logging to ~/eve_jax.log on every worker, (5) fetch
# those logs into --logs as WORKER.log, also when the run failed.
# See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] -- MAIN_ARGS...

Creates (if needed) a Cloud TPU VM slice, copies HEAD of this repository to
every worker, installs it (pip install -e '.[tpu]' in ~/eve_jax_venv) and runs
`python -m eve_jax.main MAIN_ARGS...` on all workers at once.

options:
  --name NAME          TPU VM name (required)
  --zone ZONE          zone, e.g. us-central2-b (required)
  --accelerator TYPE   e.g. v4-32, v5p-64: creates the slice when it does not
                       exist (needed only then)
  --version RUNTIME    TPU runtime image (default by accelerator: v2-v4
                       tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e
                       v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --project PROJECT    GCP project (default: gcloud's configured one)
  --spot               create a Spot slice
  --logs DIR           local directory for the workers' logs
                       (default ./tpu_logs/NAME)
  --topology NAME      compile-only target of the preflight (default: the
                       --accelerator type, e.g. v5p-64)
  --no-preflight       skip the preflight: by default the run's train step
                       is first compiled here for the slice (python -m
                       eve_jax.compile, needs pip install -e '.[compile]')
                       and nothing is created or run when it does not fit
  --dry-run            print the commands, one per line; run nothing
  -h, --help           this help

Only committed files are copied (git archive HEAD). The workdir must be on
storage every worker sees: a bucket, --workdir=gs://BUCKET/RUN (checkpoints
commit with orbax's GCS marker object; the workers' default credentials
are used), or NFS. Not a gcsfuse mount: a checkpoint commit there is a
directory rename, which gcsfuse does not make atomic.
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell: as is when safe, else in single quotes.
q() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces.
quote_all() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

name="" zone="" accelerator="" version="" project="" spot=0 logs="" dry_run=0
topology="" preflight=1
need_value() { [[ $# -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --name=*) name="${1#*=}"; shift ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --accelerator) need_value "$@"; accelerator="$2"; shift 2 ;;
    --accelerator=*) accelerator="${1#*=}"; shift ;;
    --version) need_value "$@"; version="$2"; shift 2 ;;
    --version=*) version="${1#*=}"; shift ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --project=*) project="${1#*=}"; shift ;;
    --logs) need_value "$@"; logs="$2"; shift 2 ;;
    --logs=*) logs="${1#*=}"; shift ;;
    --topology) need_value "$@"; topology="$2"; shift 2 ;;
    --topology=*) topology="${1#*=}"; shift ;;
    --no-preflight) preflight=0; shift ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (eve_jax.main's arguments go after '--'; see --help)" ;;
  esac
done
main_args=("$@")

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ ${#main_args[@]} -gt 0 ]] || die "no arguments for eve_jax.main after '--' (e.g. -- --config=configs/base.py --workdir=DIR)"
logs="${logs:-./tpu_logs/$name}"
if [[ -n "$accelerator" && -z "$version" ]]; then
  case "$accelerator" in
    v2-*|v3-*|v4-*) version="tpu-ubuntu2204-base" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator '$accelerator'; pass --version" ;;
  esac
fi

# Runs a command, or in a dry run prints it as one shell-ready line.
run() {
  if [[ $dry_run == 1 ]]; then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

tpu=(gcloud compute tpus tpu-vm)
common=("--zone=$zone")
[[ -z "$project" ]] || common+=("--project=$project")

# (0) Preflight: compile the run's step for the slice on this machine and
# stop before any TPU is created or used when it does not fit (exit 3) or
# does not build. The run's own arguments go to eve_jax.compile unchanged.
topology="${topology:-$accelerator}"
if [[ $preflight == 1 ]]; then
  if [[ -z "$topology" ]]; then
    echo "tpu_pod.sh: warning: no --topology or --accelerator: skipping the preflight compile" >&2
  else
    run "${PYTHON:-python3}" -m eve_jax.compile "--topology=$topology" "${main_args[@]}" \
      || die "preflight: the run does not compile or fit on $topology (see above); --no-preflight skips this check"
  fi
fi

# (1) Create the slice unless it exists. A dry run does not ask gcloud: it
# creates when --accelerator is given.
if [[ $dry_run == 1 ]]; then
  create=$([[ -n "$accelerator" ]] && echo 1 || echo 0)
elif "${tpu[@]}" describe "$name" "${common[@]}" --format='value(state)' \
    >/dev/null 2>&1; then
  create=0
else
  [[ -n "$accelerator" ]] || die "TPU VM '$name' not found in $zone; pass --accelerator to create it"
  create=1
fi
if [[ $create == 1 ]]; then
  create_cmd=("${tpu[@]}" create "$name" "${common[@]}"
              "--accelerator-type=$accelerator" "--version=$version")
  [[ $spot == 0 ]] || create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi

# (2) Ship HEAD of this repository to every worker.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/eve_jax_${name}.tar.gz"
if [[ $dry_run == 0 ]]; then
  if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu_pod.sh: warning: uncommitted changes are not copied (git archive HEAD)" >&2
  fi
  trap 'rm -f "$tarball"' EXIT
fi
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$name:eve_jax.tar.gz" "${common[@]}" --worker=all
[[ $dry_run == 1 ]] || rm -f "$tarball"

# (3) Unpack and install on every worker. eve_jax needs Python >= 3.12
# (jax >= 0.11); the TPU runtime images are Ubuntu 22.04 with Python 3.10,
# so when python3 is older the venv is made from python3.12: apt's where the
# release has it (24.04), else the deadsnakes PPA's (22.04).
install_sh="set -e; mkdir -p ~/eve_jax; tar -xzf ~/eve_jax.tar.gz -C ~/eve_jax; \
rm -f ~/eve_jax.tar.gz; cd ~/eve_jax; \
if [ ! -x ~/eve_jax_venv/bin/python ]; then py=python3; \
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
py=python3.12; if ! command -v python3.12 >/dev/null; then \
sudo apt-get -qq update; \
if ! apt-cache show python3.12-venv >/dev/null 2>&1; then \
sudo add-apt-repository -y ppa:deadsnakes/ppa; sudo apt-get -qq update; fi; \
sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.12 python3.12-venv; \
fi; fi; \"\$py\" -m venv ~/eve_jax_venv; fi; \
~/eve_jax_venv/bin/python -m pip install -q --upgrade pip; \
~/eve_jax_venv/bin/python -m pip install -q -e '.[tpu]'"
run "${tpu[@]}" ssh "$name" "${common[@]}" --worker=all "--command=$install_sh"

# (5) Fetch every worker's log as LOGS/WORKER.log, whatever (4) ended with.
fetch_logs() {
  local rc=$?
  set +e
  run mkdir -p "$logs"
  run "${tpu[@]}" ssh "$name" "${common[@]}" --worker=all \
    "--command=cat ~/eve_jax.log" "--output-directory=$logs"
  [[ $dry_run == 1 ]] || echo "tpu_pod.sh: logs in $logs" >&2
  exit "$rc"
}
trap fetch_logs EXIT

# (4) Run on all workers at once. The arguments are quoted for the remote
# shell, so spaces and quotes arrive intact. The log is appended to, so a
# resumed run keeps the earlier one's lines above its own.
run_sh="set -o pipefail; cd ~/eve_jax && PYTHONUNBUFFERED=1 \
~/eve_jax_venv/bin/python -m eve_jax.main $(quote_all "${main_args[@]}") \
2>&1 | tee -a ~/eve_jax.log"
run "${tpu[@]}" ssh "$name" "${common[@]}" --worker=all "--command=$run_sh"
