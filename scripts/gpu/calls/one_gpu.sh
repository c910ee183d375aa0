# One GPU, TP 1: bench/serve.py on a MoE shape with random weights (--load-format dummy).
# Env: PRESET (qwen3-30b-a3b | gpt-oss-120b), LAYERS, CONFIGS, LEVELS, NAME, REPS, WAVES, OUTLEN, BUDGET (s),
#   MEM (--mem-fraction-static), GRAPH_BS, SETTLE (--settle: seconds between the metric-flushing requests
#   after each run; with NO_METRICS there are no xshare counters to flush, so a small value saves time);
#   ONE_SERVER=1: in-server A/B, every configuration an arm of one server (--ab --ab-one-server);
#   PROFILE=N with PROFILE_C=16,64: N decode steps per arm under SGLang's profiler at those levels;
#   NO_METRICS=1: without xshare's live metrics; STARTS=N (separate servers): N interleaved starts each.
# TMO: seconds before the benchmark is stopped (default 560; what was measured by then is written).
# Repeat the same call to continue: --state keeps the finished servers.
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
NAME=${NAME:-serve_1gpu}
# LAYERS=fit: as many GPT-OSS layers as the GPU holds in bf16 (6.4 GB of experts each): 18 on 141 GB, 10 on 80 GB
if [ "$LAYERS" = fit ]; then
  LAYERS=$(python3 -c "import torch; print(18 if torch.cuda.get_device_properties(0).total_memory > 120e9 else 10)")
fi
ab=""; [ -n "$ONE_SERVER" ] && ab="--ab --ab-one-server"
timeout ${TMO:-560} python3 bench/serve.py --preset ${PRESET:-qwen3-30b-a3b} ${LAYERS:+--layers $LAYERS} --tp 1 $ab \
  --configs ${CONFIGS:-auto} --concurrency ${LEVELS:-1,4,16,32,64} --reps ${REPS:-2} --waves ${WAVES:-2} \
  ${NO_METRICS:+--no-metrics} ${STARTS:+--starts $STARTS} --output-len ${OUTLEN:-256} --min-prompts 2 --max-bs 128 \
  --graph-bs ${GRAPH_BS:-1,2,4,8,16,32,64,128} --mem-fraction ${MEM:-0.88} --state $XS_HOME/${NAME}_state.json \
  --time-budget ${BUDGET:-500} ${SETTLE:+--settle $SETTLE} ${PROFILE:+--profile-steps $PROFILE --profile-concurrency ${PROFILE_C:-16,64}} \
  --name $NAME --out $OUT --work $XS_HOME/w_$NAME -- --moe-runner-backend triton > $OUT/run.log 2>&1
echo "serve rc=$?"
grep -v "^\[20" $OUT/run.log | tail -40
(cd $XS_HOME/w_$NAME && tar czf $OUT/logs.tgz *.log) 2>/dev/null; cp $XS_HOME/${NAME}_state.json $OUT/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
