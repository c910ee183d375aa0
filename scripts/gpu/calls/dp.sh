# 2 x H200: DP attention + DeepEP (auto: normal prefill, low-latency decode) inside SGLang,
# xshare_ep local vs --xshare-ep-global, each against its own server's SGLang arm. Env: CONFIGS, NAME, BUDGET,
# LEVELS; ONE_SERVER=1: the configurations as arms of one server (+global on all or none, e.g.
# CONFIGS=xshare_ep@0.7+global,xshare@0.7+global,oea+k0=4+global,cap+cap=6+global: cap selects per rank);
# PROFILE=N: N decode steps per arm under SGLang's profiler at c=PROFILE_C (default 64).
bash scripts/gpu/end_marked.sh  # what an earlier call left, by process id
source scripts/gpu/env.sh || exit 1
export PYTHONUNBUFFERED=1
NAME=${NAME:-serve_qwen3_dp2_deepep}
python3 -m pip install -q --no-deps --no-index --no-compile --target $XS_SITE .whl-dg/*.whl || exit 1
python3 -c "import deep_gemm, deep_ep; print('deep_gemm', deep_gemm.__file__)" || exit 1
timeout 540 python3 bench/serve.py --preset qwen3-30b-a3b --layers 24 --tp 2 --ep 2 --ab \
  --configs ${CONFIGS:-xshare_ep@0.7+global,xshare_ep@0.7} --concurrency ${LEVELS:-8,32,64} --reps 2 \
  --output-len 128 --max-bs 64 --graph-bs 1,2,4,8,16,32,64 --state $XS_HOME/${NAME}_state.json --time-budget ${BUDGET:-520} ${ONE_SERVER:+--ab-one-server} \
  ${PROFILE:+--profile-steps $PROFILE --profile-concurrency ${PROFILE_C:-64}} \
  --startup-timeout 300 --name $NAME --out $OUT --work $XS_HOME/wd -- --attn-dp-size 2 --moe-a2a-backend deepep \
  --deepep-mode auto --moe-runner-backend deep_gemm > $OUT/dp.log 2>&1
echo "dp rc=$?"; grep -v "^\[20" $OUT/dp.log | tail -30
(cd $XS_HOME/wd && tar czf $OUT/logs_dp.tgz *.log)
