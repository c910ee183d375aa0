# Issue 12, 2 x H200, shipped model: token-for-token at TP 2 / EP 2 (servers side by side), then
# NGRAM speculative decoding through the hook (in-server A/B, one TP 1 server per GPU).
pkill -9 -f 'sglang|raylet|gcs_server' 2>/dev/null; sleep 1  # nothing left from an earlier call
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
M=sglang_xshare/data/model
timeout 240 python3 bench/serve_correctness.py --tp 2 --ep 2 --parallel 4 --mem-fraction 0.18 \
  --configs plain,off,topk,xshare@0.7 --no-harness --name serve_correctness_tp2ep2 --out $OUT --work /root/wc > $OUT/correctness.log 2>&1
echo "correctness rc=$?"; tail -25 $OUT/correctness.log
SPEC="--speculative-algorithm NGRAM --speculative-num-draft-tokens 4 --speculative-ngram-max-bfs-breadth 1 --max-running-requests 32"
COMMON="--model $M --tp 1 --ab --concurrency 1,8,16,32 --reps 2 --output-len 128 --max-bs 32 --graph-bs 1,2,4,8,16,32 --out $OUT"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/serve.py $COMMON --configs xshare_spec@0.7+rb=frac:0.9 --name serve_ngram_xshare_spec --work /root/ws0 -- $SPEC > $OUT/spec0.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 300 python3 bench/serve.py $COMMON --configs xshare@0.7 --name serve_ngram_xshare --work /root/ws1 -- $SPEC > $OUT/spec1.log 2>&1 &
wait
tail -12 $OUT/spec0.log $OUT/spec1.log
python3 bench/serve.py --merge $OUT/serve_ngram_xshare_spec.json $OUT/serve_ngram_xshare.json --name serve_ngram_tp1 --out $OUT > /dev/null 2>&1
tar czf $OUT/logs_small.tgz -C /root wc ws0 ws1 --exclude='*.safetensors' --exclude='*.jsonl' 2>/dev/null
rm -f $OUT/serve_ngram_xshare_spec.png $OUT/serve_ngram_xshare.png
ls $OUT
