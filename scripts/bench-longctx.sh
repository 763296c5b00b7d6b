#!/usr/bin/env bash
# Long-context prefill memory benchmark: does a 32K-token prompt prefill on
# the qwen2-0.5b shape within this machine's memory, and does peak memory
# grow linearly with the context?
#
#   scripts/bench-longctx.sh [MODEL_DIR]
#
# MODEL_DIR (default ${TMPDIR:-/tmp}/qwenfleet-qwen2-0.5b-bf16) is made with
# `qwenctl mkmodel --preset qwen2-0.5b --dtype bf16` when it holds no model.
# Each length is prefilled in a fresh process by `qwenctl forward
# --random-prompt N --chunk 512` (chunked prefill through a KV cache of
# exactly the blocks the prompt needs, as the serving scheduler does), which
# reports the peak resident memory of the prefill (VmHWM, reset after the
# weights load) and the KV cache bytes (layers x 2 x kvDim x 4 per token).
# The script fits peak = a + b*tokens over the lengths, reports the largest
# residual as a share of the peak and the slope b against the KV formula's
# bytes per token, and exits 1 when the growth is clearly not linear (a
# residual above MAX_RESIDUAL_PCT of the peak).
#
# Environment:
#   LENGTHS="8192 16384 32000"  prompt lengths (at least 3 for a linearity check)
#   CHUNK=512                   prefill chunk, tokens per forward step
#   SEED=1                      --seed of the random prompts
#   MAX_RESIDUAL_PCT=5          the non-linearity threshold
#   FORWARD_FLAGS=""            more `qwenctl forward` flags (--threads 8, --compute bf16, --mmap ...)
#   GOGC, GOMEMLIMIT            passed through to qwenctl (Go's collector sizes the peak; see the verdict)
#
# Try it small: LENGTHS="1024 2048 4096" scripts/bench-longctx.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

MODEL="${1:-${TMPDIR:-/tmp}/qwenfleet-qwen2-0.5b-bf16}"
LENGTHS="${LENGTHS:-8192 16384 32000}"
CHUNK="${CHUNK:-512}"
SEED="${SEED:-1}"
MAX_RESIDUAL_PCT="${MAX_RESIDUAL_PCT:-5}"
FORWARD_FLAGS="${FORWARD_FLAGS:-}"

for n in $LENGTHS; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench-longctx: LENGTHS: $n is not a token count" >&2; exit 2; }
done
[[ "$CHUNK" =~ ^[1-9][0-9]*$ ]] || { echo "bench-longctx: CHUNK: $CHUNK is not a token count" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/bench-longctx.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "building qwenctl ..." >&2
go build -o "$work/qwenctl" ./cmd/qwenctl

if [ ! -f "$MODEL/config.json" ]; then
  echo "making the qwen2-0.5b bf16 model in $MODEL ..." >&2
  "$work/qwenctl" mkmodel --preset qwen2-0.5b --dtype bf16 --out "$MODEL" --if-missing
fi

# jget FILE KEY: a number or bare value of qwenctl's indented JSON report.
jget() { sed -n "s/^  \"$2\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$1" | head -n 1; }

cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
[ -n "$cpu" ] || cpu="$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo 2>/dev/null | head -n 1)"
echo "cpu: ${cpu:-unknown} ($(nproc 2>/dev/null || echo '?') CPUs; memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo 2>/dev/null || echo '?'))"
echo "model: $MODEL; chunk $CHUNK; GOGC=${GOGC:-default (100)} GOMEMLIMIT=${GOMEMLIMIT:-none}${FORWARD_FLAGS:+; flags: $FORWARD_FLAGS}"

rows="$work/rows"
: >"$rows"
for n in $LENGTHS; do
  echo "prefill of $n tokens ..." >&2
  # shellcheck disable=SC2086 # FORWARD_FLAGS is a list of flags
  if ! "$work/qwenctl" forward --model "$MODEL" --random-prompt "$n" --seed "$SEED" --chunk "$CHUNK" \
      --json "$work/$n.json" $FORWARD_FLAGS 2>"$work/$n.log"; then
    cat "$work/$n.log" >&2
    echo "bench-longctx: the prefill of $n tokens failed" >&2
    exit 1
  fi
  grep '^prefill:' "$work/$n.log" >&2 || true
  f="$work/$n.json"
  echo "$(jget "$f" tokens) $(jget "$f" chunks) $(jget "$f" seconds) $(jget "$f" tokens_per_s) $(jget "$f" peak_rss_prefill) $(jget "$f" kv_bytes) $(jget "$f" rss_after_gc) $(jget "$f" peak_rss_before) $(jget "$f" rss_before) $(jget "$f" kv_bytes_per_token) $(jget "$f" peak_reset) $(jget "$f" peak_source | tr ' ' '_') $(jget "$f" gc_cycles) $(jget "$f" peak_rss_after)" >>"$rows"
done

memtotal="$(awk '/^MemTotal/ {print $2 * 1024}' /proc/meminfo 2>/dev/null || true)"
awk -v maxpct="$MAX_RESIDUAL_PCT" -v gogc="${GOGC:-}" -v memtotal="${memtotal:-0}" '
function mib(x) { return x / 1048576 }
{
  n++; t[n] = $1; ch[n] = $2; s[n] = $3; tps[n] = $4; pk[n] = $5; kv[n] = $6; kept[n] = $7
  load[n] = $8; start[n] = $9; kvpt = $10; reset[n] = $11; src = $12; gc[n] = $13; whole[n] = $14
}
END {
  printf "\n%8s %6s %9s %9s %11s %10s %11s %11s %10s %5s\n", "tokens", "chunks", "seconds", "tokens/s", "peak RSS", "KV bytes", "RSS - KV", "RSS after", "RSS - KV", "GCs"
  printf "%8s %6s %9s %9s %11s %10s %11s %11s %10s %5s\n", "", "", "", "", "(prefill)", "", "(peak)", "GC (kept)", "(kept)", ""
  noreset = 0
  for (i = 1; i <= n; i++) {
    printf "%8d %6d %9.1f %9.1f %7.0f MiB %6.0f MiB %7.0f MiB %7.0f MiB %6.0f MiB %5d\n", t[i], ch[i], s[i], tps[i], mib(pk[i]), mib(kv[i]), mib(pk[i] - kv[i]), mib(kept[i]), mib(kept[i] - kv[i]), gc[i]
    if (reset[i] != "true") noreset = 1
    maxload = (load[i] > maxload) ? load[i] : maxload
    if (whole[i] > maxwhole) { maxwhole = whole[i]; maxat = t[i] }
  }
  gsub(/_/, " ", src)
  printf "\nmemory from %s; RSS at the prefill start %.0f MiB (weights, after a collection); the process peaked at %.0f MiB while loading them\n", src, mib(start[1]), mib(maxload)
  printf "largest process peak, loading included: %.0f MiB (%d tokens)", mib(maxwhole), maxat
  if (memtotal > 0) printf " = %.1f%% of this machine'\''s %.1f GiB", 100 * maxwhole / memtotal, memtotal / 1073741824
  printf "\n"
  if (noreset) print "warning: the high-water mark could not be reset after loading, so the peaks include the load; the fit below may be flat"
  if (n < 2) { print "one length: no fit (give LENGTHS with 3 or more)"; exit 0 }
  worst = fit("peak RSS", pk); peakratio = ratio
  fit("RSS kept after GC", kept); keptratio = ratio
  if (peakratio > 1.25 && peakratio <= 3 && keptratio >= 0.8 && keptratio <= 1.25)
    printf "\nThe RSS kept after a collection grows at %.2fx the KV formula, the peak at %.2fx: the peak also holds the Go collector'\''s headroom, which is proportional to the live heap (the weights and the whole cache): %s\n", keptratio, peakratio, (gogc == "" || gogc == "100") ? "at GOGC=100, the default, the heap may reach about twice the live heap before a collection, so each cache byte can cost about 2 bytes of peak." : "GOGC=" gogc " here."
  if (n < 3) { print "\nonly 2 lengths: a line fits any 2 points, so linearity is not checked; give 3 or more"; exit 0 }
  if (worst > maxpct) {
    printf "\nNOT LINEAR: peak RSS is off a straight line by %.2f%% of the peak there (threshold %s%%)\n", worst, maxpct
    exit 1
  }
  printf "\nlinear: peak RSS is within %.2f%% of a straight line through the %d lengths (threshold %s%%)\n", worst, n, maxpct
  exit 0
}
# fit: least squares y = a + b*tokens; prints the line, the largest residual
# as a share of y, and b against the KV bytes per token (in ratio); returns
# the largest residual in percent.
function fit(name, y,    i, sx, sy, sxx, sxy, d, a, b, r, worst, wi) {
  ratio = 0
  for (i = 1; i <= n; i++) { sx += t[i]; sy += y[i]; sxx += t[i] * t[i]; sxy += t[i] * y[i] }
  d = n * sxx - sx * sx
  if (d == 0) { printf "%s: the lengths are all the same; no fit\n", name; return 0 }
  b = (n * sxy - sx * sy) / d; a = (sy - b * sx) / n
  wi = 1
  for (i = 1; i <= n; i++) {
    r = y[i] - (a + b * t[i]); r = (r < 0) ? -r : r
    if (100 * r / y[i] > worst) { worst = 100 * r / y[i]; wi = i }
  }
  ratio = b / kvpt
  printf "\n%s = %.0f MiB + %.0f B/token x tokens; largest residual %.2f%% of the value there (%d tokens)\n", name, mib(a), b, worst, t[wi]
  printf "  slope %.0f B/token = %.2fx the KV formula, %d B/token (layers x 2 x kvDim x 4): %s\n", b, ratio, kvpt, (ratio >= 0.8 && ratio <= 1.25) ? "close to it" : "not close to it"
  return worst
}' "$rows"
