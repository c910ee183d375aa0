# one H200 of the 2 x H200 machine, evaluation model (bench/data/model): NGRAM speculative decoding through the hook,
# xshare_spec and xshare each against the same server's SGLang arm (in-server A/B), one server after the other. Env: LEVELS, NAME, BUDGET;
# ONE_SERVER=1: both policies as arms of one server (--ab-one-server), if an earlier ab.sh ONE_SERVER=1 worked.
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
NAME=${NAME:-serve_ngram_tp1}
ONE=; [ -n "$ONE_SERVER" ] && [ -e $XS_HOME/one_server_ok ] && ONE=--ab-one-server; echo "spec: ${ONE:-one server per policy}"
timeout 540 python3 bench/serve.py --model bench/data/model --tp 1 --ab \
  --configs xshare_spec@0.7+rb=frac:0.9,xshare@0.7 --concurrency ${LEVELS:-1,8,32} --reps 2 --output-len 128 \
  --max-bs 32 --graph-bs 1,2,4,8,16,32 --flush-cache $ONE --state $XS_HOME/${NAME}_state.json --time-budget ${BUDGET:-500} \
  --name $NAME --out $OUT --work $XS_HOME/ws -- --speculative-algorithm NGRAM \
  --speculative-num-draft-tokens 4 --speculative-ngram-max-bfs-breadth 1 --max-running-requests 32 > $OUT/spec.log 2>&1
echo "spec rc=$?"; grep "^\[xshare" $OUT/spec.log | tail -40
(cd $XS_HOME/ws && tar czf $OUT/logs_spec.tgz *.log)
