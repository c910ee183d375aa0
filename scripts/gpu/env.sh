# Source on an offline GPU host after SGLang's wheel set is installed (../shared/gpu-sglang: install.sh
# installs it into $SITE): puts SGLang's site and this package (installed with its SGLang plugin
# entry point into $XS_SITE) on PYTHONPATH, and keeps NVLink multicast off.
#   source scripts/gpu/env.sh
XS_HOME=${XS_HOME:-$HOME}  # state files, work folders and the two install folders go here
SITE=${SITE:-$XS_HOME/gpu-site}
XS_SITE=${XS_SITE:-$XS_HOME/xs-site}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$XS_SITE:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$XS_SITE/bin:$PATH
rm -rf "$XS_SITE"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$XS_SITE" . >"$XS_HOME/xs-install.log" 2>&1 \
  || { cat "$XS_HOME/xs-install.log"; return 1 2>/dev/null || exit 1; }
# wheels carried in .whl (e.g. `datasets`, which sglang.bench_serving imports and the set lacks)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --no-compile --target "$XS_SITE" .whl/*.whl >>"$XS_HOME/xs-install.log" 2>&1
fi
python3 - <<'PY'
import importlib.metadata as md, torch, sglang, sglang_xshare
eps = [e.value for e in md.entry_points(group="sglang.srt.plugins") if e.name == "xshare"]
print("torch", torch.__version__, "sglang", sglang.__version__, "gpus", torch.cuda.device_count(),
      "xshare plugin", eps, "from", sglang_xshare.__file__)
PY
