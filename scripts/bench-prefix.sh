#!/bin/bash
# Prefix caching and cache-aware routing on the qwen2-0.5b shape, as ratios
# measured in one run (docs/long-context.md reports the latest):
#   1. TTFT: requests of 2,000 tokens whose first 1,800 (90 %) are a prefix
#      an earlier request left cached, against the first request of each
#      prefix (nothing cached) -- one replica, concurrency 1.
#   2. Routing: the shared-prefix workload (8 prompts of 1,500 tokens, 64
#      requests at concurrency 4) over 2 replicas whose KV pools hold about
#      half the prefixes each, --routing prefix against least-loaded: request
#      throughput, and identical outputs (qwenctl bench --compare).
# Usage: scripts/bench-prefix.sh [MODEL_DIR]   (made with qwenctl mkmodel when
# missing). PARTS="ttft routing" picks the parts; KV_BLOCKS (per replica),
# REQUESTS, OUTPUT_LEN, PREFIXES (N:L) override the routing workload, POLICIES
# (least-loaded prefix) and MARGIN (--route-load-margin, 4) its runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export GOTOOLCHAIN=local
model=${1:-${TMPDIR:-/tmp}/qwenfleet-qwen2-0.5b-bf16}
parts=${PARTS:-ttft routing}
prefixes=${PREFIXES:-8:1500}
requests=${REQUESTS:-64}
outlen=${OUTPUT_LEN:-16}
policies=${POLICIES:-least-loaded prefix}
margin=${MARGIN:-4} # --route-load-margin
kvblocks=${KV_BLOCKS:-450} # 7,200 tokens: about 4 of the 8 prefixes and the running requests' own blocks
bin=$(mktemp -d)
work=$(mktemp -d)
pg=""
cleanup() {
  if [ -n "$pg" ]; then kill -TERM -- "-$pg" 2>/dev/null || true; sleep 2; kill -KILL -- "-$pg" 2>/dev/null || true; fi
  rm -rf "$bin" "$work"
}
trap cleanup EXIT
go build -o "$bin" ./cmd/coordinator ./cmd/worker ./cmd/qwenctl
if [ ! -f "$model/config.json" ]; then
  echo "making the qwen2-0.5b model in $model"
  "$bin/qwenctl" mkmodel --preset qwen2-0.5b --dtype bf16 --out "$model" >/dev/null
fi
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs"

# start REPLICAS [coordinator flags]: a coordinator with local workers (one
# replica each) in its own process group; waits until every replica is ready.
start() {
  local n=$1; shift
  local port; port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  addr=127.0.0.1:$port
  rm -rf "$work/data"
  PATH=$bin:$PATH setsid "$bin/coordinator" --listen "$addr" --model "$model" --data-dir "$work/data" --http-listen "" \
    --local-workers "$n" --worker-threads $((($(nproc) + n - 1) / n)) "$@" >"$work/coordinator.log" 2>&1 &
  pg=$!
  for _ in $(seq 600); do
    [ "$(grep -c 'replica ready' "$work/coordinator.log" || true)" -ge "$n" ] && return 0
    kill -0 "$pg" 2>/dev/null || { tail -5 "$work/coordinator.log"; exit 1; }
    sleep 0.5
  done
  echo "the cluster did not get ready"; tail -5 "$work/coordinator.log"; exit 1
}
stop() {
  kill -TERM -- "-$pg" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pg" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pg" 2>/dev/null || true
  pg=""
}
# cachestats: the coordinator log's finished requests: prompt tokens found
# cached, and how their replicas were chosen.
cachestats() {
  python3 - "$work/coordinator.log" <<'PY'
import re, sys, collections
cached = prompt = n = 0
routes = collections.Counter()
for line in open(sys.argv[1]):
    if "request finished" not in line:
        continue
    kv = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))
    n += 1
    prompt += int(kv.get("prompt_tokens", 0))
    cached += int(kv.get("cached_tokens", 0))
    routes[kv.get("route", "?")] += 1
if n:
    print(f"prefix cache: {cached} of {prompt} prompt tokens cached ({100*cached/max(prompt,1):.0f} %); routes: {dict(routes)}")
PY
}
field() { python3 -c 'import json,sys;d=json.load(open(sys.argv[1]));print(eval(sys.argv[2]))' "$@"; }

if [[ " $parts " == *" ttft "* ]]; then
  echo "== TTFT: 2,000-token requests, first 1,800 cached vs nothing cached (1 replica, concurrency 1)"
  start 1
  "$bin/qwenctl" bench --addr "$addr" --quiet --shared-prefix 3:1800 --input-len 200 --output-len 1 \
    --requests 12 --concurrency 1 --seed 7 --json "$work/ttft.json" >"$work/ttft.txt"
  stop
  cachestats
  grep -E "Workload|Prefixes used|first use|reuse" "$work/ttft.txt" || true
  field "$work/ttft.json" '"TTFT of a 90%%-cached request / uncached: %.3f (%.0f ms / %.0f ms)" % (d["shared_prefix"]["reuse_ttft_ms"]["mean"]/d["shared_prefix"]["first_use_ttft_ms"]["mean"], d["shared_prefix"]["reuse_ttft_ms"]["mean"], d["shared_prefix"]["first_use_ttft_ms"]["mean"])'
fi

if [[ " $parts " == *" routing "* ]]; then
  echo "== routing: --shared-prefix $prefixes, $requests requests at concurrency 4, 2 replicas of $kvblocks KV blocks of 16"
  for policy in $policies; do
    start 2 --kv-blocks "$kvblocks" --routing "$policy" --route-load-margin "$margin"
    "$bin/qwenctl" bench --addr "$addr" --quiet --shared-prefix "$prefixes" --output-len "$outlen" \
      --requests "$requests" --concurrency 4 --seed 11 --json "$work/$policy.json" >"$work/$policy.txt"
    stop
    echo "-- $policy"
    cachestats
    grep -E "Request throughput|Successful|Failed|first use|reuse|Duration" "$work/$policy.txt" || true
  done
  [ -f "$work/least-loaded.json" ] && [ -f "$work/prefix.json" ] || exit 0
  "$bin/qwenctl" bench --compare "$work/least-loaded.json" "$work/prefix.json" | tail -1
  python3 - "$work/least-loaded.json" "$work/prefix.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def tput(d):
    s = d["summary"] if "summary" in d else d
    for k in ("request_throughput", "requests_per_second"):
        if k in s:
            return s[k]
    raise SystemExit("no request throughput in the report: keys %s" % sorted(s))
ta, tb = tput(a), tput(b)
print(f"request throughput: least-loaded {ta:.3f}/s, prefix {tb:.3f}/s: {tb/ta:.2f}x")
PY
fi
