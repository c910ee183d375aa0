# 2 x H200, evaluation model (bench/data/model): token for token at TP 2 / EP 2 -- plain SGLang, the hook with
# off / topk, and xshare@0.7 for in-server quality -- four servers side by side on both GPUs
# (capped KV pools: --kv-tokens), the report rewritten after every server.
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
timeout 480 python3 bench/serve_correctness.py --tp 2 --ep 2 --parallel 4 --configs plain,off,topk,xshare@0.7 \
  --name serve_correctness_tp2ep2 --out $OUT --work $XS_HOME/wc > $OUT/correctness.log 2>&1
echo "correctness rc=$?"; tail -30 $OUT/correctness.log
(cd $XS_HOME/wc && tar czf $OUT/logs_correctness.tgz *.log)
