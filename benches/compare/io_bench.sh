#!/usr/bin/env bash
# Out-of-core merge benchmark: three synthetic checkpoints of about 1 GiB each merged by
# the `modelfusion` binary (and, with MERGEKIT=1, by mergekit-yaml), beside `cp` of the
# same input bytes.
#
#   benches/compare/io_bench.sh [WORK_DIR] [SIZE_MIB]
#
# Environment: RUNS (default 3; best of), LAYOUT (`square`: f32 and bf16 checkpoints of
# 4096 x 4096 tensors; `llama`: bf16 Llama-like checkpoints of 542M parameters, see
# io_gen.py), MERGEKIT=1 (add mergekit-yaml rows, run once each: minutes and ~5 GiB
# each; needs venv-mk and the `llama` layout), MODELFUSION=0 (skip the modelfusion and
# cp rows), KEEP=1 (keep the generated inputs). TIES runs twice: in mergekit's tie
# order (the default) and with `index_tie_break: true`.
#
# Needs /usr/bin/time (apt-get install -y time), the project venv (venv) for the
# generator, and builds `modelfusion` in release mode with feature `cli`. Inputs are read
# once before every run so they are in the page cache; `sync` runs before every timed
# command so earlier writes are not flushed during it. Throughput is (bytes read + bytes
# written) / wall time; CPU is user + system time. Big files are deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-$(mktemp -d)}
SIZE=${2:-1024}
PY=${PY:-venv/bin/python}
MK=${MK:-venv-mk/bin/mergekit-yaml}
BIN=${CARGO_TARGET_DIR:-target}/release/modelfusion
RUNS=${RUNS:-3}
LAYOUT=${LAYOUT:-square}
cargo build --release --features cli --bin modelfusion >/dev/null
mkdir -p "$WORK"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

warm() { cat "$@" >/dev/null; }

# run LABEL BYTES_MOVED CMD...: prints the best-of-RUNS wall time (with its CPU time),
# GB/s, and peak RSS.
run() {
  local label=$1 moved=$2; shift 2
  local best="" cpu="" rss="" runs=$RUNS
  [ "$1" = "$MK" ] && runs=1
  for _ in $(seq "$runs"); do
    rm -rf "$WORK/out" "$WORK/cp" && mkdir -p "$WORK/cp"
    warm "$WORK"/*-m*/model.safetensors
    sync
    /usr/bin/time -v -o "$WORK/time.txt" "$@" >/dev/null 2>"$WORK/err.txt" || { cat "$WORK/err.txt"; exit 1; }
    local wall kb c
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$WORK/time.txt")
    c=$(awk -F': ' '/User time|System time/ {s+=$2} END {print s}' "$WORK/time.txt")
    kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
    if [ -z "$best" ] || awk "BEGIN{exit !($wall < $best)}"; then best=$wall; cpu=$c; rss=$kb; fi
  done
  awk -v l="$label" -v t="$best" -v c="$cpu" -v b="$moved" -v r="$rss" \
    'BEGIN{printf "| %s | %.2f | %.2f | %.2f | %.0f |\n", l, t, c, b/t/1e9, r/1024}'
}

DTS=$([ "$LAYOUT" = llama ] && echo bf16 || echo "f32 bf16")
for DT in $DTS; do
  [ -f "$WORK/$DT-m2/model.safetensors" ] || "$PY" benches/compare/io_gen.py "$WORK" "$DT" 3 "$SIZE" "$LAYOUT" >/dev/null
done

echo "| command | wall s | CPU s | GB/s (read+written) | peak RSS MiB |"
echo "|---|---|---|---|---|"
for DT in $DTS; do
  IN=$(stat -c %s "$WORK/$DT-m0/model.safetensors")
  TY=$([ "$DT" = f32 ] && echo float32 || echo bfloat16)
  cat >"$WORK/linear-$DT.yml" <<YML
merge_method: linear
models:
  - {model: $WORK/$DT-m0, parameters: {weight: 0.5}}
  - {model: $WORK/$DT-m1, parameters: {weight: 0.3}}
  - {model: $WORK/$DT-m2, parameters: {weight: 0.2}}
dtype: $TY
YML
  cat >"$WORK/ties-$DT.yml" <<YML
merge_method: ties
base_model: $WORK/$DT-m0
models:
  - {model: $WORK/$DT-m1, parameters: {weight: 0.5, density: 0.5}}
  - {model: $WORK/$DT-m2, parameters: {weight: 0.5, density: 0.5}}
dtype: $TY
YML
  if [ "${MODELFUSION:-1}" = 1 ]; then
    run "cp of the 3 $DT inputs (3 x $IN B)" $((6 * IN)) sh -c "for i in 0 1 2; do cp $WORK/$DT-m\$i/model.safetensors $WORK/cp/\$i; done"
    run "modelfusion linear, 3 x $DT -> $DT" $((4 * IN)) "$BIN" merge "$WORK/linear-$DT.yml" "$WORK/out" --no-progress
    run "modelfusion ties (density 0.5), 3 x $DT -> $DT" $((4 * IN)) "$BIN" merge "$WORK/ties-$DT.yml" "$WORK/out" --no-progress
    echo "parameters: {index_tie_break: true}" >"$WORK/ties-index-$DT.yml"
    cat "$WORK/ties-$DT.yml" >>"$WORK/ties-index-$DT.yml"
    run "modelfusion ties (density 0.5, index_tie_break), 3 x $DT -> $DT" $((4 * IN)) "$BIN" merge "$WORK/ties-index-$DT.yml" "$WORK/out" --no-progress
  fi
  if [ "${MERGEKIT:-0}" = 1 ]; then
    run "mergekit-yaml linear (CPU), 3 x $DT -> $DT" $((4 * IN)) "$MK" "$WORK/linear-$DT.yml" "$WORK/out" --allow-crimes
    run "mergekit-yaml ties (CPU, density 0.5), 3 x $DT -> $DT" $((4 * IN)) "$MK" "$WORK/ties-$DT.yml" "$WORK/out" --allow-crimes
  fi
done
