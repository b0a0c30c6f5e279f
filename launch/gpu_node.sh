#!/usr/bin/env bash
# eve_jax on one GPU node (e.g. 8x H100): one process that drives every
# local GPU. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gpu_node.sh [--dry-run] MAIN_ARGS...

Runs `python -m eve_jax.main MAIN_ARGS...` as one process using all of this
machine's GPUs, e.g.

  launch/gpu_node.sh --config=configs/base.py --workdir=/data/eve_base \
      --config.mesh.data=-1 --config.mesh.expert=8

Install first (in a venv, Python >= 3.12):  pip install -e '.[cuda12]'
PYTHON=... picks the interpreter (default: python). EVE_JAX_PREFLIGHT=h100x8
first compiles the step for that target and stops if it does not fit. Relative paths in
MAIN_ARGS are relative to the current directory. Inside a SLURM job step
(srun) use launch/slurm_gpu.sbatch instead: JAX would take SLURM's
one-process-per-GPU layout there and use GPU 0 only.

  --dry-run    print the command instead of running it
  -h, --help   this help
USAGE
}

dry_run="${DRY_RUN:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

# Preflight (EVE_JAX_PREFLIGHT=TARGET, e.g. h100x8 or h100x8x4 = nodes of 8):
# compile the run's step for TARGET first (python -m eve_jax.compile, which
# needs no GPU) and stop when it does not build or fit (exit 3).
preflight=()
if [[ -n "${EVE_JAX_PREFLIGHT:-}" ]]; then
  preflight=("${PYTHON:-python}" -m eve_jax.compile "--topology=$EVE_JAX_PREFLIGHT" "$@")
  if [[ "$dry_run" == 1 ]]; then
    printf '%q' "${preflight[0]}"
    printf ' %q' "${preflight[@]:1}"
    echo
  elif ! "${preflight[@]}"; then
    echo "gpu_node.sh: preflight: the run does not compile or fit on $EVE_JAX_PREFLIGHT (see above); unset EVE_JAX_PREFLIGHT to skip" >&2
    exit 3
  fi
fi

cmd=("${PYTHON:-python}" -m eve_jax.main "$@")
if [[ "$dry_run" == 1 ]]; then
  printf '%q' "${cmd[0]}"
  printf ' %q' "${cmd[@]:1}"
  echo
else
  exec "${cmd[@]}"
fi
