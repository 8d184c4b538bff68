#!/usr/bin/env bash
# Out-of-core merge benchmark: three synthetic 1 GiB checkpoints merged by the
# `modelfusion` binary, beside `cp` of the same input bytes.
#
#   benches/compare/io_bench.sh [WORK_DIR] [SIZE_MIB]
#
# Needs /usr/bin/time (apt-get install -y time), the project venv (../venv) for the
# generator, and builds `modelfusion` in release mode with feature `cli`. Inputs are read
# once before every run so they are in the page cache (the machine has far more RAM than
# 6 GiB); `sync` runs before every timed command so earlier writes are not flushed during
# it. Throughput is (bytes read + bytes written) / wall time. Big files are deleted at
# the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/modelfusion-io-bench}
SIZE=${2:-1024}
PY=${PY:-venv/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release/modelfusion
RUNS=${RUNS:-3}
cargo build --release --features cli --bin modelfusion >/dev/null
mkdir -p "$WORK"
# KEEP=1 keeps the generated inputs for another run; by default everything is deleted.
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

warm() { cat "$@" >/dev/null; }

# run LABEL BYTES_MOVED CMD...: prints the best-of-RUNS wall time, GB/s, and peak RSS.
run() {
  local label=$1 moved=$2; shift 2
  local best="" rss=""
  for _ in $(seq "$RUNS"); do
    rm -rf "$WORK/out" "$WORK/cp" && mkdir -p "$WORK/cp"
    warm "$WORK"/*-m*/model.safetensors
    sync
    /usr/bin/time -v -o "$WORK/time.txt" "$@" >/dev/null 2>"$WORK/err.txt" || { cat "$WORK/err.txt"; exit 1; }
    local wall kb
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$WORK/time.txt")
    kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
    if [ -z "$best" ] || awk "BEGIN{exit !($wall < $best)}"; then best=$wall; rss=$kb; fi
  done
  awk -v l="$label" -v t="$best" -v b="$moved" -v r="$rss" \
    'BEGIN{printf "| %s | %.2f | %.2f | %.0f |\n", l, t, b/t/1e9, r/1024}'
}

for DT in f32 bf16; do
  [ -f "$WORK/$DT-m2/model.safetensors" ] || "$PY" benches/compare/io_gen.py "$WORK" "$DT" 3 "$SIZE" >/dev/null
done
IN=$(stat -c %s "$WORK"/f32-m0/model.safetensors)
INB=$(stat -c %s "$WORK"/bf16-m0/model.safetensors)

cat >"$WORK/linear-f32.yml" <<YML
merge_method: linear
models:
  - {model: $WORK/f32-m0, parameters: {weight: 0.5}}
  - {model: $WORK/f32-m1, parameters: {weight: 0.3}}
  - {model: $WORK/f32-m2, parameters: {weight: 0.2}}
dtype: float32
YML
sed "s/f32-m/bf16-m/g; s/float32/bfloat16/" "$WORK/linear-f32.yml" >"$WORK/linear-bf16.yml"

echo "| command | wall s | GB/s (read+written) | peak RSS MiB |"
echo "|---|---|---|---|"
run "cp of the 3 f32 inputs (3 x $IN B)" $((6 * IN)) sh -c "for i in 0 1 2; do cp $WORK/f32-m\$i/model.safetensors $WORK/cp/\$i; done"
run "modelfusion linear, 3 x f32 -> f32" $((4 * IN)) "$BIN" merge "$WORK/linear-f32.yml" "$WORK/out" --no-progress
run "cp of the 3 bf16 inputs (3 x $INB B)" $((6 * INB)) sh -c "for i in 0 1 2; do cp $WORK/bf16-m\$i/model.safetensors $WORK/cp/\$i; done"
run "modelfusion linear, 3 x bf16 -> bf16" $((4 * INB)) "$BIN" merge "$WORK/linear-bf16.yml" "$WORK/out" --no-progress
if "$BIN" merge /dev/stdin "$WORK/probe" --dry-run >/dev/null 2>&1 <<YML
merge_method: ties
base_model: $WORK/f32-m0
models: [{model: $WORK/f32-m1, parameters: {weight: 0.5, density: 0.5}}]
YML
then
  for DT in f32 bf16; do
    cat >"$WORK/ties-$DT.yml" <<YML
merge_method: ties
base_model: $WORK/$DT-m0
models:
  - {model: $WORK/$DT-m1, parameters: {weight: 0.5, density: 0.5}}
  - {model: $WORK/$DT-m2, parameters: {weight: 0.5, density: 0.5}}
dtype: $([ $DT = f32 ] && echo float32 || echo bfloat16)
YML
    B=$([ $DT = f32 ] && echo "$IN" || echo "$INB")
    run "modelfusion ties (density 0.5), 3 x $DT -> $DT" $((4 * B)) "$BIN" merge "$WORK/ties-$DT.yml" "$WORK/out" --no-progress
  done
else
  echo "(ties not available in this build)"
fi
