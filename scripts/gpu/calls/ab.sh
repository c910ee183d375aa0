# 2 x H200: the in-server A/B on a MoE shape with dummy weights, TP 2 / EP 2 (default: Qwen3-30B-A3B's,
# 24 layers). Repeat the same call: --state continues where the previous call stopped.
# Env: CONFIGS, LEVELS, PRESET, LAYERS, NAME, BUDGET (and a state file per NAME); ONE_SERVER=1: every
# configuration is an arm of one server (--ab-one-server: one start-up for the whole comparison);
# PROFILE=N: N decode steps per arm under SGLang's profiler at c=PROFILE_C (default 64); NO_METRICS=1: without
# xshare's live metrics (what a production server pays; no experts columns); WAVES: requests per run / concurrency.
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
NAME=${NAME:-serve_qwen3_tp2ep2_ab}
timeout 540 python3 bench/serve.py --preset ${PRESET:-qwen3-30b-a3b} --layers ${LAYERS:-24} --tp 2 --ep 2 --ab \
  --configs ${CONFIGS:-xshare@0.7,xshare_ep@0.7,oea+k0=4,cap+cap=6} --concurrency ${LEVELS:-1,8,16,32,64,128} --reps 2 --waves ${WAVES:-2} ${NO_METRICS:+--no-metrics} \
  --output-len 128 --min-prompts 8 --max-bs 128 --graph-bs 1,2,4,8,16,32,64,128 --state $XS_HOME/${NAME}_state.json \
  --time-budget ${BUDGET:-500} ${ONE_SERVER:+--ab-one-server} \
  ${PROFILE:+--profile-steps $PROFILE --profile-concurrency ${PROFILE_C:-64}} --name $NAME --out $OUT --work $XS_HOME/w_$NAME -- --moe-runner-backend triton > $OUT/ab.log 2>&1
echo "ab rc=$?"
grep -v "^\[20" $OUT/ab.log | tail -30
(cd $XS_HOME/w_$NAME && tar czf $OUT/logs_ab.tgz *.log); cp $XS_HOME/${NAME}_state.json $OUT/ 2>/dev/null
