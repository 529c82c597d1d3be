#!/usr/bin/env bash
# Run NPROC processes on this host, each with DEVICES_PER_PROC simulated CPU devices, joined by
# jax.distributed (CPU collectives through gloo) into one global mesh of NPROC x DEVICES_PER_PROC
# devices, all running `python -m train.main [flags...]` (LAUNCH_MODULE overrides the module).
#
#   launch/local.sh 2 4 --workdir=/tmp/run            # the embedded default (configs/default.py)
#   launch/local.sh 2 4 --config=configs/tiny_cpu.py --config.mesh.fsdp=8 --workdir=/tmp/run
#   launch/local.sh --dry-run 2 4 --config ...        # print the commands, run nothing
#
# Python: $PYTHON if set (PYTHON=/path/to/python overrides everything), else the active virtual
# environment's ($VIRTUAL_ENV/bin/python, or $CONDA_PREFIX/bin/python), else this checkout's
# .venv/bin/python, else python3 on PATH.
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (read by
# qwen35_jax.sharding.initialize_distributed), JAX_PLATFORMS=cpu and the XLA device-count flag.
# Logs: $LAUNCH_LOGDIR/proc_<i>.log (default: a fresh /tmp directory); process 0's log is also
# streamed to stdout. When any process exits non-zero the others are stopped (SIGTERM, then
# SIGKILL after $LAUNCH_KILL_GRACE seconds, default 5: a process blocked in a collective ignores
# the trainer's SIGTERM handling) and the script exits with that process's status.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#SBATCH/ {next} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2
  echo "usage: [PYTHON=python] $0 [--dry-run] NPROC DEVICES_PER_PROC [module flags...]" >&2
  exit 2
}

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
[[ $# -ge 2 ]] || usage
nproc=$1
devices=$2
shift 2
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "NPROC must be a positive integer, got '$nproc'" >&2; usage; }
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "DEVICES_PER_PROC must be a positive integer, got '$devices'" >&2
  usage
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
module="${LAUNCH_MODULE:-train.main}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    python="$VIRTUAL_ENV/bin/python"
  elif [[ -n "${CONDA_PREFIX:-}" && -x "$CONDA_PREFIX/bin/python" ]]; then
    python="$CONDA_PREFIX/bin/python"
  elif [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
  else
    python=python3
  fi
fi
grace="${LAUNCH_KILL_GRACE:-5}"
port="${JAX_COORDINATOR_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if [[ $dry_run == 1 ]]; then
  logdir="${LAUNCH_LOGDIR:-<new /tmp/qwen35_local.* directory>}"
else
  logdir="${LAUNCH_LOGDIR:-$(mktemp -d /tmp/qwen35_local.XXXXXX)}"
  mkdir -p "$logdir"
fi
xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

command_for() {  # command_for RANK FLAGS...: the command of process RANK, in the array "cmd"
  local rank=$1
  shift
  cmd=(env "JAX_PLATFORMS=cpu" "XLA_FLAGS=${xla_flags# }"
    "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:${port}" "JAX_NUM_PROCESSES=${nproc}"
    "JAX_PROCESS_ID=${rank}" "PYTHONPATH=${root}${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -m "$module" "$@")
}

if [[ $dry_run == 1 ]]; then
  echo "# $nproc processes x $devices CPU devices; logs in $logdir"
  for ((i = 0; i < nproc; i++)); do
    command_for "$i" "$@"
    printf '%q ' "${cmd[@]}"
    printf '> %q 2>&1 &\n' "$logdir/proc_$i.log"
  done
  echo "wait"
  exit 0
fi

cd "$root"
pids=()
tail_pid=
stop_all() {  # SIGTERM to every live process, SIGKILL to those still alive after $grace s
  local pid alive deadline=$((SECONDS + grace))
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  while ((SECONDS < deadline)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [[ -z "$tail_pid" ]] || kill "$tail_pid" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for ((i = 0; i < nproc; i++)); do
  command_for "$i" "$@"
  "${cmd[@]}" >"$logdir/proc_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$logdir/proc_0.log" --pid="${pids[0]}" &
tail_pid=$!

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  next=()
  for pid in "${remaining[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
    else
      wait "$pid" || { rc=$?; [[ $status != 0 ]] || status=$rc; }
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
  if [[ $status != 0 ]]; then
    echo "local.sh: a process failed (exit $status); stopping the others. Logs: $logdir" >&2
    stop_all
    for ((i = 1; i < nproc; i++)); do
      echo "--- proc_$i.log (tail)" >&2
      tail -n 20 "$logdir/proc_$i.log" >&2 || true
    done
    exit "$status"
  fi
  [[ ${#remaining[@]} -gt 0 ]] && sleep 0.5
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
