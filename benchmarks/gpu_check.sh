#!/usr/bin/env bash
# The one prepared GPU check: everything drg-llama must show on a GPU, in one call that ends by itself.
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine; results in $OUT (or benchmarks/out/gpu_check)
#   bash benchmarks/gpu_check.sh --device cpu DIR   # the dry run with tiny shapes (tests/test_benchmarks.py runs it)
#   bash benchmarks/gpu_check.sh --stages env,fsdp,rollout --deadline 240   # a rerun of some stages
#
# Stages run each in its own process under its own timeout, inside one global deadline (--deadline seconds, 470 on
# a GPU), so a failure or an overrun never loses the rest. The functional stages (train, qlora_cli, grpo, fsdp,
# flex, gpu_tests: tiny models) run side by side first (one after another on a CPU); the timed ones (throughput,
# qlora_7b, rollout) then run alone, so nothing else shares the GPU while they are measured.
# GPU_CHECK_THROUGHPUT_ARGS replaces the throughput stage's arguments (default: --preset check).
# After every stage the figures so far are merged into
# results.json and summary.md in the results folder, and the stage's log is appended to logs.txt.
#
# Wheels for packages the GPU image lacks travel in .whl/ (benchmarks/gpu_wheels.txt says which and how to fetch
# them) and are installed into a scratch folder first; nothing is installed system-wide.
set -uo pipefail

main() {
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=cuda
DEADLINE=""
DEST=""
STAGES=env,train,qlora_cli,grpo,fsdp,flex,gpu_tests,throughput,qlora_7b,rollout
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --deadline) DEADLINE=$2; shift 2 ;;
        --stages) STAGES=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) DEST=$1; shift ;;
    esac
done
DEST=${DEST:-${OUT:-$REPO/benchmarks/out/gpu_check}}
# Stage budgets are for an H200; a 2-core CPU running the tiny forms, maybe beside other work, gets SCALE times more.
if [ "$DEVICE" = cuda ]; then DEADLINE=${DEADLINE:-470}; SCALE=1; else DEADLINE=${DEADLINE:-1500}; SCALE=4; fi
mkdir -p "$DEST"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RESULTS=$WORK/results
mkdir -p "$RESULTS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$DEST/logs.txt"; }

# --- stage 0: carried wheels, then versions and imports ---------------------------------------------------------
: > "$DEST/logs.txt"
if [ "$DEVICE" = cuda ] && compgen -G "$REPO/.whl/*.whl" > /dev/null; then  # cp312 wheels: the GPU machine's
    log "installing $(ls "$REPO"/.whl/*.whl | wc -l) carried wheels into $WORK/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$REPO"/.whl/*.whl >> "$DEST/logs.txt" 2>&1 || log "wheel install failed (see above)"
    export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv >> "$DEST/logs.txt" 2>&1

publish() {  # merge the stage files into results.json + summary.md and copy them to the destination
    "$PYTHON" "$REPO/benchmarks/gpu_check.py" summarize --out "$RESULTS" >> "$WORK/summarize.log" 2>&1
    cp "$RESULTS/results.json" "$RESULTS/summary.md" "$DEST/" 2>/dev/null
}

wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

run_stage() {  # run_stage NAME TIMEOUT: one stage in its own process, bounded by its timeout and the deadline
    local name=$1 budget=$(( $2 * SCALE )) left
    wanted "$name" || return 0
    left=$(( DEADLINE - ($(date +%s) - START) ))
    if [ "$left" -lt "$budget" ]; then budget=$left; fi
    if [ "$budget" -lt 15 ]; then
        echo "{\"stage\": \"$name\", \"ok\": false, \"error\": \"skipped: the deadline left ${left} s\"}" \
            > "$RESULTS/stages/$name.json"
        return
    fi
    local t0=$(date +%s)
    timeout -k 10 "$budget" "$PYTHON" "$REPO/benchmarks/gpu_check.py" "$name" --device "$DEVICE" \
        --work "$WORK/$name" --out "$RESULTS" > "$WORK/$name.log" 2>&1
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "{\"stage\": \"$name\", \"ok\": false, \"seconds\": $(( $(date +%s) - t0 )), \"error\": \"timeout after ${budget} s\"}" \
            > "$RESULTS/stages/$name.json"
    fi
}

finish_stage() {  # append a stage's log (its end) to logs.txt and publish the figures so far
    local name=$1
    wanted "$name" || return 0
    { echo; echo "===== $name (last 200 lines) ====="; tail -n 200 "$WORK/$name.log"; } >> "$DEST/logs.txt" 2>/dev/null
    log "$(grep -h '^\[gpu_check\]' "$WORK/$name.log" | tail -1 || echo "$name: no result line")"
    publish
}

mkdir -p "$RESULTS/stages"
run_stage env 120; finish_stage env

# --- functional stages, side by side (tiny models; their timings are not figures) -----------------------------
FUNCTIONAL=(train qlora_cli grpo fsdp flex gpu_tests)
if [ "$DEVICE" = cuda ]; then
    for name in "${FUNCTIONAL[@]}"; do run_stage "$name" 180 & done
    wait
    for name in "${FUNCTIONAL[@]}"; do finish_stage "$name"; done
else  # two cores: side by side would only slow every stage down
    for name in "${FUNCTIONAL[@]}"; do run_stage "$name" 180; finish_stage "$name"; done
fi

# --- timed stages, one at a time -------------------------------------------------------------------------------
run_stage throughput 260; finish_stage throughput
run_stage qlora_7b 100; finish_stage qlora_7b
run_stage rollout 160; finish_stage rollout  # three sides: graph, dynamic cache, reference

log "done in $(( $(date +%s) - START )) s; results in $DEST"
cat "$DEST/summary.md"
rm -rf "$WORK"
}

# Parsed whole before it runs: editing or pulling the file during a run cannot change the running check.
main "$@"
