#!/usr/bin/env bash
# Launch the expert-parallel MoE benchmark (bench/ep_moe.py) with torchrun, one process per GPU.
#
# Usage:
#   bench/torchrun_ep_bench.sh [--nproc N] [bench/ep_moe.py arguments...]
# Examples:
#   bench/torchrun_ep_bench.sh --shape gptoss --tokens 1,16,64,256 --backend nccl,deepep
#   bench/torchrun_ep_bench.sh --nproc 2 --shape deepseek --backend auto --policy topk,xshare_ep,xshare_ep+global
#
# N defaults to the number of visible GPUs (or 2 CPU processes on gloo when there is none).
# DeepEP: the `deepep*` backends need the `deep_ep` package importable (built for your torch/CUDA);
# without it `auto` falls back to NCCL and says so. NVLink multicast (NVLS) stays off: some hosts'
# GPUs cannot use it, and neither NCCL all-to-all nor DeepEP intranode needs it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

nproc=""
if [[ "${1:-}" == "--nproc" ]]; then
  nproc="$2"
  shift 2
fi
if [[ -z "$nproc" ]]; then
  nproc="$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)"
fi

export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

cd "$root"
exec python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" bench/ep_moe.py "$@"
