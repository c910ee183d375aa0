# One GPU, TP 1: NGRAM speculative decoding through the hook, every policy an arm of one server
# (in-server A/B against SGLang's routing, ABBA order, NGRAM's corpus flushed before every run).
# Env: MODEL (default bench/data/model, the evaluation model) or PRESET (qwen3-30b-a3b ...: random weights)
#   with LAYERS; CONFIGS (the arms), LEVELS, REPS, MIN_PROMPTS (requests per run at least), WAVES, OUTLEN,
#   DRAFTS (--speculative-num-draft-tokens), MAX_BS, MEM, NAME, BUDGET (s), TMO (s before the benchmark is stopped).
# Repeat the same call to continue: --state keeps the finished servers.
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
NAME=${NAME:-serve_ngram_tp1}
src="--model ${MODEL:-bench/data/model}"; [ -n "$PRESET" ] && src="--preset $PRESET ${LAYERS:+--layers $LAYERS}"
timeout ${TMO:-560} python3 bench/serve.py $src --tp 1 --ab --ab-one-server --flush-cache \
  --configs ${CONFIGS:-xshare@0.7,xshare_spec@0.7+rb=frac:0.9,oea+k0=4} --concurrency ${LEVELS:-1,4,16,32} \
  --reps ${REPS:-3} --waves ${WAVES:-2} --min-prompts ${MIN_PROMPTS:-16} --output-len ${OUTLEN:-128} \
  --max-bs ${MAX_BS:-32} --graph-bs 1,2,4,8,16,32 --mem-fraction ${MEM:-0.8} --state $XS_HOME/${NAME}_state.json \
  --time-budget ${BUDGET:-500} --name $NAME --out $OUT --work $XS_HOME/w_$NAME -- --speculative-algorithm NGRAM \
  --speculative-num-draft-tokens ${DRAFTS:-4} --speculative-ngram-max-bfs-breadth 1 --max-running-requests ${MAX_BS:-32} \
  ${PRESET:+--moe-runner-backend triton} > $OUT/spec.log 2>&1
echo "spec rc=$?"
grep -v "^\[20" $OUT/spec.log | grep -E "^\[|rc=|Error|error" | tail -60
(cd $XS_HOME/w_$NAME && tar czf $OUT/logs.tgz *.log) 2>/dev/null; cp $XS_HOME/${NAME}_state.json $OUT/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
