# one H200 of the 2 x H200 machine, no server: what a policy costs per MoE layer inside a CUDA graph
# of SGLang TopK layers, plain SGLang vs the hook's fast path, and with what bench/serve.py turns on around it
# (live metrics, the in-server A/B switch). The server profile of serve_qwen3_tp2ep2_arms.md saw ~1.7x this bench's fast-path
# figures; this says how much of that is the measurement. Env: T (default "16 64"), NAME.
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
timeout 300 python3 bench/hook_overhead.py --T ${T:-16 64} --layers 24 --iters 100 --no-legacy --metrics --ab \
  --name ${NAME:-hook_overhead_modes} --out $OUT > $OUT/overhead.log 2>&1
echo "overhead rc=$?"; tail -40 $OUT/overhead.log
