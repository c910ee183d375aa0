# 2 x H200: the serving bench through sglang-xshare-ray (Ray head here, the TP 2 / EP 2 server as a Ray job).
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
timeout 400 python3 bench/serve.py --model bench/data/model --tp 2 --ep 2 --ray --configs off,xshare@0.7 \
  --concurrency 1,16 --reps 2 --output-len 128 --max-bs 16 --graph-bs 1,2,4,8,16 --mem-fraction 0.5 \
  --name serve_ray_tp2ep2 --out $OUT --work $XS_HOME/wr > $OUT/ray.log 2>&1
echo "ray rc=$?"; grep -v "^\[20" $OUT/ray.log | tail -30
(cd $XS_HOME/wr && tar czf $OUT/logs_ray.tgz *.log)
echo "processes left after the bench:"; bash scripts/gpu/end_marked.sh
