# Ends, by process id, what an earlier benchmark call left running: the serving bench marks every
# process it starts (its servers, their workers, the Ray head of --ray) with XSHARE_SERVE_BENCH_RUN in
# the environment (bench/servebench/server.py); nothing else on the machine is touched.
#   bash scripts/gpu/end_marked.sh
n=0
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$$" ] && continue
  if { tr '\0' '\n' < "$d/environ"; } 2>/dev/null | grep -q '^XSHARE_SERVE_BENCH_RUN='; then
    kill -9 "$pid" 2>/dev/null && n=$((n + 1))
  fi
done
[ "$n" -gt 0 ] && echo "end_marked: ended $n process(es) of an earlier benchmark run" && sleep 1
exit 0
