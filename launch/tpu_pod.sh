#!/usr/bin/env bash
# Run `python -m train.main [flags...]` on every worker of a Cloud TPU VM pod slice: create the
# slice (or reuse it), copy this checkout to all workers, install, run the same command on all.
#
#   launch/tpu_pod.sh --name qwen-pod --zone us-east5-a --type v5p-512 [--project P] \
#       [--version v2-alpha-tpuv5] [--spot] [--reuse] [--slices N] [--dry-run] \
#       [--no-compile-check] -- --config configs/qwen35_397b.py --config.mesh.fsdp=64
#
# First, on this machine, `python -m launch.compile --topology TYPE --num_slices N <flags>`
# compiles the step with the TPU compiler for the slice (libtpu: `pip install -e '.[test]'` or
# 'jax[tpu]'; no TPU needed) and refuses to go on when the step does not fit the chips' HBM or
# the config is wrong, before any chip is paid for. --no-compile-check skips it (MODULE other
# than train.main: skipped too). Env: LOCAL_PYTHON (default .venv/bin/python, else python3).
# --dry-run prints every command (the check, gcloud and what runs on the workers), runs nothing.
# --reuse skips creation (the slice must exist); without it an existing slice is reused too.
# --slices N > 1 requests N slices as one queued resource (multi-slice over DCN: the slices'
#   workers get MEGASCALE_* from the TPU runtime; set --config.mesh.dcn_data=N or another dcn_
#   factor so the mesh spans them). Each worker runs jax.distributed.initialize() with TPU
#   auto-detection (qwen35_jax.sharding.initialize_distributed).
# Env: PYTHON_ON_WORKER (default python3), EXTRA_PIP (extra packages to install), MODULE (default
#   train.main).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#SBATCH/ {next} NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2
  exit 2
}

name="" zone="" type="" project="" version="" spot=0 reuse=0 slices=1 dry_run=0 check=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --type) type="${2:?--type needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --slices) slices="${2:?--slices needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --reuse) reuse=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --no-compile-check) check=0; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (train flags go after --)" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$type" ]] || { echo "tpu_pod.sh: --name, --zone and --type are required" >&2; usage; }
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --slices must be a positive integer" >&2; usage; }
if [[ -z "$version" ]]; then
  case "$type" in
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
module="${MODULE:-train.main}"
py="${PYTHON_ON_WORKER:-python3}"
gc=(gcloud)
[[ -n "$project" ]] && gc+=(--project "$project")
tarball="/tmp/qwen35_jax_code.tgz"
remote_dir="qwen35_jax"

run() {  # print the command; run it unless --dry-run
  printf '+ '
  printf '%q ' "$@"
  printf '\n'
  [[ $dry_run == 1 ]] || "$@"
}

quote() { printf '%q ' "$@"; }

nodes=()
if [[ $slices == 1 ]]; then nodes=("$name"); else for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done; fi

# 0. the step must fit: compiled here by the TPU compiler for this slice type
if [[ $check == 1 && $module == train.main ]]; then
  local_py="${LOCAL_PYTHON:-python3}"
  [[ -z "${LOCAL_PYTHON:-}" && -x "$root/.venv/bin/python" ]] && local_py="$root/.venv/bin/python"
  compile_cmd=(env "PYTHONPATH=$root" "$local_py" -m launch.compile --topology "$type" --num_slices "$slices" "$@")
  set +e
  (cd "$root" && run "${compile_cmd[@]}")
  rc=$?
  set -e
  if [[ $rc == 1 ]]; then
    echo "tpu_pod.sh: the step does not fit $type (launch.compile above): change the recipe (batch, mesh, remat, loss_chunk) or the slice; nothing was created" >&2
    exit 1
  elif [[ $rc != 0 ]]; then
    echo "tpu_pod.sh: launch.compile failed (exit $rc, above); nothing was created (--no-compile-check skips the check)" >&2
    exit "$rc"
  fi
fi

# 1. the slice(s)
exists=0
if [[ $reuse == 1 ]]; then
  exists=1
elif [[ $dry_run == 0 ]]; then
  if [[ $slices == 1 ]]; then
    "${gc[@]}" compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1 && exists=1
  else
    "${gc[@]}" compute tpus queued-resources describe "$name" --zone "$zone" >/dev/null 2>&1 && exists=1
  fi
fi
if [[ $exists == 0 ]]; then
  [[ $dry_run == 0 ]] || echo "# (creates the slice unless it exists; --reuse skips this)"
  extra=()
  [[ $spot == 1 ]] && extra+=(--spot)
  if [[ $slices == 1 ]]; then
    run "${gc[@]}" compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "$type" --version "$version" "${extra[@]+"${extra[@]}"}"
  else
    run "${gc[@]}" compute tpus queued-resources create "$name" --zone "$zone" \
      --accelerator-type "$type" --runtime-version "$version" --node-count "$slices" \
      --node-prefix "$name" "${extra[@]+"${extra[@]}"}"
    echo "# wait until the queued resource is ACTIVE:"
    run "${gc[@]}" compute tpus queued-resources describe "$name" --zone "$zone" \
      --format "value(state.state)"
  fi
fi

# 2. the code: tracked and untracked-but-not-ignored files of this checkout
run bash -c "cd $(quote "$root") && git ls-files -co --exclude-standard -z | tar --null -czf $(quote "$tarball") -T -"
install="mkdir -p ~/$remote_dir && tar -xzf ~/$(basename "$tarball") -C ~/$remote_dir"
install+=" && cd ~/$remote_dir && $py -m venv .venv && .venv/bin/pip install -q -U pip"
install+=" && .venv/bin/pip install -q -e . 'jax[tpu]' ${EXTRA_PIP:-}"
cmd="cd ~/$remote_dir && QWEN35_DISTRIBUTED=1 .venv/bin/python -m $module $(quote "$@")"
for node in "${nodes[@]}"; do
  ssh=("${gc[@]}" compute tpus tpu-vm ssh "$node" --zone "$zone" --worker=all)
  run "${gc[@]}" compute tpus tpu-vm scp "$tarball" "$node:~/" --zone "$zone" --worker=all
  # 3. install on every worker
  run "${ssh[@]}" --command "$install"
done

# 4. the same command on every worker of every slice, together
pids=()
for node in "${nodes[@]}"; do
  ssh=("${gc[@]}" compute tpus tpu-vm ssh "$node" --zone "$zone" --worker=all)
  if [[ $dry_run == 1 ]]; then
    run "${ssh[@]}" --command "$cmd"
  else
    run "${ssh[@]}" --command "$cmd" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]+"${pids[@]}"}"; do wait "$pid" || status=$?; done
exit "$status"
