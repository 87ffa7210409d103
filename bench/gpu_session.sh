#!/usr/bin/env bash
# The GPU tests and the bench figures of one GPU machine, in stages. From the root:
#
#     bash bench/gpu_session.sh                       # the default stages: tests, vitb (one call)
#     STAGES="vith extra" bash bench/gpu_session.sh   # others, in a second call where time is left
#
# tests    every GPU test (pytest -m gpu; the files come from pytest's own collection, so none is left
#          out): one pytest process per file, TEST_JOBS at a time, each cut at TEST_TIMEOUT seconds.
#          Most of their time is Triton compiling (single-threaded per process): in parallel the
#          stage takes about its slowest file. The benches run after it, alone on the GPU.
# vitb     ViT-B/16 at micro batch 256 in ONE bench run (its ratios): train.py's Trainer step on device
#          batches, the same Trainer fed by DALI on 4096 real JPEGs (e2e), the official-style peer, the
#          torch.compile peer with what is left of the budget, and the step breakdown.
# vith     ViT-S/L/H Trainer steps (VITH_ARCHS), ViT-H's largest micro batch (ZeRO-3, bf16, activation
#          checkpointing) and its img/s.
# extra    (not in the default) DINO ViT-S/16, R50 vs its peer, evaluation extraction img/s.
# chunk    (not in the default) ViT-B/16 at micro batch 4096 with memory.backbone_chunk (img/s, peak memory)
#          beside the unchunked step at the largest micro batch that fits; goal: <= 1.4x its time per image.
# data     (not in the default) the data section: both loaders' img/s on a folder and on tar shards of
#          4096 real JPEGs.
# Then the ViT-B/16 goals, read from the JSON lines: e2e >= 95% of the model step, model step >= 60% MFU
# of the measured ~790 TFLOP/s bf16 dense rate (~1700 img/s), >= 1.8x the peer.
#
# Measured cold on the H200 (2026-12-04), one file after another: the kernel tests ~250 s (Triton
# compiles), vitb ~180 s, ViT-S/L ~115 s. A lent session has 15 minutes of device time in all: the
# machine's start (1-2 min) and the DALI calls (../shared/device/README.md) leave one call of about 8,
# which the default stages fit (limits: tests 180 s in parallel, vitb 230 s). With 4 minutes or more
# left after it, STAGES=vith (210 s) in a second call; what does not fit goes first next time.
# What comes back from a device call is at most 8 files, so everything lands in a few, under $OUT, as
# it is made (a call cut at its limit loses nothing already measured): log.txt (all that is printed,
# the environment first), gpu_tests.txt (the table of test files, then each file's whole log, appended
# as each ends), one bench-*.jsonl per bench run, and reference_timings.json (--update: this device's
# entry, e.g. "NVIDIA H200"). `timeout` cuts a hang, and each bench records as skipped what would start
# past its --time-budget. The JSON lines print again with
# `python bench/throughput.py --from <file>.jsonl [--markdown] [--update]`.
# Other checks, e.g. one op's:  STAGES=vitb B_ARGS="--only kernels --kernels attention" bash bench/gpu_session.sh
# Where the copy of the tree has no .git, say the commit: FASTMOCO_COMMIT=<hash> bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!
TEST_JOBS="${TEST_JOBS:-8}"
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"   # seconds per test file
TEST_FILES="${TEST_FILES:-}"          # default: every file holding a test marked gpu
X_BUDGET="${X_BUDGET:-150}"
X_TIMEOUT="${X_TIMEOUT:-200}"
B_BUDGET="${B_BUDGET:-190}"       # seconds; nothing starts past it, the compile peer gets what is left
B_TIMEOUT="${B_TIMEOUT:-230}"
B_ARGS="${B_ARGS:---only model,breakdown --arch vit_b --batch 256 --builds trainer,e2e,peer,peer_compile --compile-budget 90 --breakdown-steps 12}"
C_CHUNK="${C_CHUNK:-256}"         # images per backbone chunk of the chunk stage
C_BUDGET="${C_BUDGET:-200}"
C_TIMEOUT="${C_TIMEOUT:-260}"
VITH_ARCHS="${VITH_ARCHS-vit_s,vit_l,vit_h}"   # the Trainer steps measured beside ViT-H's largest batch
VITH_BUDGET="${VITH_BUDGET:-170}"
VITH_TIMEOUT="${VITH_TIMEOUT:-210}"

PY="${PYTHON:-python3}"   # elsewhere: PYTHON=.venv/bin/python bash bench/gpu_session.sh
REF="$OUT/reference_timings.json"
cp bench/reference_timings.json "$REF"
WORK="$(mktemp -d)"       # each test file's log while it runs (appended to $OUT/gpu_tests.txt at its end)

# deepspeed and DALI: the GPU box has neither; .device/wheels/activate.sh (made for that box only:
# it unpacks into /tmp/site) puts them on PYTHONPATH.
if [ -f .device/wheels/activate.sh ] && command -v nvidia-smi >/dev/null; then
    # shellcheck disable=SC1091
    source .device/wheels/activate.sh
fi
# fastmoco.kernels / fastmoco.pipelines are mapped from kernels/ and pipelines/ by pyproject: install once.
if ! "$PY" -c "import fastmoco.kernels, fastmoco.pipelines" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi

echo "== environment"
date -u +%FT%TZ
echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null || echo "${FASTMOCO_COMMIT:-unknown (no git)}")"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
"$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1
"$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
echo "cores: $(nproc)"

bench() {  # bench NAME TIMEOUT BUDGET ARGS...: one throughput.py run; its JSON lines under $OUT
    local name=$1 limit=$2 budget=$3
    shift 3
    echo "== bench $name (${limit} s at most)"
    timeout -k 10 "$limit" "$PY" bench/throughput.py --out "$OUT" --time-budget "$budget" --reference "$REF" \
        --update "$@"
    local rc=$?
    [ "$rc" = 124 ] && echo "bench $name: TIMED OUT after ${limit} s (what it measured is in $OUT/bench-*.jsonl)"
    return "$rc"
}

test_file() {  # test_file FILE: pytest -m gpu on one file, cut at TEST_TIMEOUT; its log joins gpu_tests.txt
    local file=$1 name log t0 rc secs summary
    name=$(basename "$file" .py)
    log="$WORK/$name.log"
    t0=$(date +%s)
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS="$THREADS" timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -v -rfEs \
        --durations=5 -m gpu -p no:cacheprovider "$file" > "$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    summary=$(grep -E "^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$" "$log" | tail -1 | tr -d '=')
    [ "$rc" = 124 ] && summary="TIMED OUT after ${TEST_TIMEOUT} s (last test started: $(grep -E '::' "$log" | tail -1))"
    {
        flock 9
        printf '| %s | %s | %s | %s |\n' "$file" "$rc" "$secs" "${summary:-no summary (see its log)}" >> "$WORK/table.md"
        { echo; echo "==== $file: exit $rc, $secs s"; cat "$log"; } >> "$OUT/gpu_tests.txt"
    } 9> "$WORK/lock"
    echo "tests $file: exit $rc, $secs s: ${summary:-no summary}"
}

running() {  # running PID...: how many of them still run
    local n=0 pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done
    echo "$n"
}

run_tests() {  # every GPU test file, TEST_JOBS at a time; then the table heads gpu_tests.txt
    local files file failed=0 pids=()
    if [ -n "$TEST_FILES" ]; then
        files=$TEST_FILES
    else
        files=$("$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider tests/ 2>/dev/null \
            | grep "::" | cut -d: -f1 | sort -u)
        if [ -z "$files" ]; then
            echo "tests: pytest collected no test marked gpu under tests/"
            return 1
        fi
    fi
    THREADS=$(( $(nproc) / TEST_JOBS )); [ "$THREADS" -ge 1 ] || THREADS=1
    echo "== GPU tests: $(echo "$files" | wc -w) files, $TEST_JOBS at a time, ${TEST_TIMEOUT} s each at most"
    : > "$OUT/gpu_tests.txt"
    : > "$WORK/table.md"
    for file in $files; do
        while [ "$(running "${pids[@]}")" -ge "$TEST_JOBS" ]; do sleep 1; done
        test_file "$file" &
        pids+=($!)
    done
    wait "${pids[@]}"   # the test jobs only (a bare wait would wait for the log's tee too)
    { echo "| file | exit | s | pytest's summary |"; echo "|---|---|---|---|"; sort "$WORK/table.md"
      cat "$OUT/gpu_tests.txt"; } > "$WORK/all.txt" && mv "$WORK/all.txt" "$OUT/gpu_tests.txt"
    echo "== GPU tests"; head -n "$(( $(wc -l < "$WORK/table.md") + 2 ))" "$OUT/gpu_tests.txt"
    # every file that ran must have exited 0 (a status from the table: wait -n can miss a job's)
    [ "$(wc -l < "$WORK/table.md")" -eq "$(echo "$files" | wc -w)" ] || failed=1
    awk -F' [|] ' '$2 != "0" { bad = 1 } END { exit bad }' "$WORK/table.md" || failed=1
    return "$failed"
}

# The stages, most needed first; STAGES picks some.
STAGES="${STAGES:-tests vitb}"
rc_all=0
for stage in $STAGES; do
    case $stage in
    tests)  # 1. every GPU test: kernels, momentum, DALI, evaluation, chunks, shards, attention maps
        run_tests || rc_all=1 ;;
    vitb)  # 2. ViT-B/16 at 256: Trainer, e2e, peers, breakdown (one run: its ratios)
        # shellcheck disable=SC2086
        bench vit_b "$B_TIMEOUT" "$B_BUDGET" $B_ARGS || rc_all=1 ;;
    vith)  # 3. ViT-S/L/H Trainer steps, ViT-H's largest micro batch and its img/s
        if [ -n "$VITH_ARCHS" ]; then
            bench vith "$VITH_TIMEOUT" "$VITH_BUDGET" --only model --arch "$VITH_ARCHS" --builds trainer --steps 3 \
                --repeats 2 --max-batch vit_h --max-batch-start 128 --max-batch-seconds 70 || rc_all=1
        fi ;;
    extra)  # 4. DINO ViT-S/16 (Trainer, e2e 2x224 + 10x96, peer), R50 vs its peer, evaluation extraction
        bench extra "$X_TIMEOUT" "$X_BUDGET" --only dino,r50,eval || rc_all=1 ;;
    chunk)  # ViT-B/16 at the recipe's 4096 on one GPU with memory.backbone_chunk, beside the unchunked
            # step at the largest micro batch that fits (the chunks' GPU tests are in the tests stage)
        bench chunk "$C_TIMEOUT" "$C_BUDGET" --only model --arch vit_b --batch 4096 --builds chunked \
            --backbone-chunk "$C_CHUNK" --steps 2 --repeats 2 --max-batch vit_b --max-batch-start 256 \
            --max-batch-seconds 100 || rc_all=1 ;;
    data)  # the loaders' img/s, folder vs shards rows (DALI on shards is tested in the tests stage)
        bench data "$X_TIMEOUT" "$X_BUDGET" --only data || rc_all=1 ;;
    *) echo "unknown stage $stage (tests, vitb, vith, extra, chunk, data)"; rc_all=1 ;;
    esac
done
rm -rf "$WORK"

echo "== ViT-B/16 goals (from $OUT/bench-*.jsonl)"
"$PY" - "$OUT" <<'PY' 2>&1
import glob, json, sys
MEASURED_BF16_TFLOPS = 790.0  # H100/H200 dense bf16, measured with a bf16 matmul
recs = [json.loads(l) for f in sorted(glob.glob(f"{sys.argv[1]}/bench-*.jsonl")) for l in open(f) if l.strip()]
ok = {(r["name"], r.get("build")): r for r in recs if r.get("status") == "ok"}
def line(what, value, goal, met):
    print(f"{what}: {value} (goal {goal}): {'met' if met else 'NOT met' if met is not None else 'not measured'}")
t, e = ok.get(("vit_base", "trainer")), ok.get(("vit_base", "e2e"))
ratio = ok.get(("vit_base", "ratio"), {}).get("metrics", {})
if t:
    m = t["metrics"]
    line(f"ViT-B Trainer model step b{t['batch']}", f"{m['img_per_s']:.0f} img/s, {m['tflops'] / MEASURED_BF16_TFLOPS:.1%}"
         " of 790 TFLOP/s", ">= 60%", m["tflops"] / MEASURED_BF16_TFLOPS >= 0.60)
e2e = ratio.get("e2e_over_trainer") or (e and t and e["metrics"]["img_per_s"] / t["metrics"]["img_per_s"])
line("ViT-B end to end / model step", f"{e2e:.3f}" if e2e else "-", ">= 0.95", None if e2e is None else e2e >= 0.95)
peer = ratio.get("trainer_over_peer")
line("ViT-B model step / peer", f"{peer:.2f}x" if peer else "-", ">= 1.8x", None if peer is None else peer >= 1.8)
chunked = ok.get(("vit_base", "chunked"))
biggest = next((r for r in recs if r.get("build") == "max_batch" and r["name"] == "vit_base"
                and r.get("status") == "ok"), None)
if chunked:
    c = chunked["metrics"]
    print(f"ViT-B b{chunked['batch']} in chunks: {c['img_per_s']:.0f} img/s, peak {c['peak_gib']:.1f} GiB")
cost = biggest and chunked and biggest["metrics"]["img_per_s"] / chunked["metrics"]["img_per_s"]
line("ViT-B chunked time per image / unchunked at its largest batch", f"{cost:.2f}x" if cost else "-", "<= 1.4x",
     None if not cost else cost <= 1.4)
for r in recs:
    if r.get("build") == "max_batch":
        print(f"{r['name']} largest micro batch: {r.get('batch', '-')} "
              f"({r.get('notes') or r.get('reason')}); img/s {r.get('metrics', {}).get('img_per_s', 0):.0f}")
    if r.get("section") == "breakdown" and r.get("status") == "ok" and r["build"] == "dali":
        print(f"{r['name']} data stall (DALI, b{r['batch']}): {r['metrics']['data_stall']:.1%} of the step")
PY

echo "== gpu_session: stages $STAGES: $([ $rc_all = 0 ] && echo all passed || echo 'something failed (logs above)')"
exec >&- 2>&-   # the log's tee ends with the last line written
wait "$TEE"
exit "$rc_all"
