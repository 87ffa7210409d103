#!/usr/bin/env bash
# The GPU tests and the bench figures of one GPU machine, in stages (each fits a 10-minute job). From the root:
#
#     bash bench/gpu_session.sh                       # every stage below, in order
#     STAGES=kernels bash bench/gpu_session.sh        # one stage (one device call each while DALI arrives
#                                                     # in parts: kernels, then models, then vitb)
#
# kernels  GPU tests of every kernel: attention, layernorm, contrastive, ema, dino_loss, lars, fused model.
# models   GPU tests of momentum and evaluation; ViT-S/L/H Trainer steps and ViT-H's largest micro batch
#          (ZeRO-3, bf16, activation checkpointing) with its img/s.
# vitb     DALI's GPU tests; ViT-B/16 at micro batch 256 in ONE bench run (its ratios): train.py's Trainer
#          step on device batches, the same Trainer fed by DALI on 4096 real JPEGs (e2e), the official-style
#          peer, the torch.compile peer with what is left of the budget, and the step breakdown.
# extra    (not in the default) DINO ViT-S/16, R50 vs its peer, evaluation extraction img/s.
# chunk    (not in the default) ViT-B/16 at micro batch 4096 with memory.backbone_chunk (img/s, peak memory)
#          beside the unchunked step at the largest micro batch that fits; goal: <= 1.4x its time per image.
# data     (not in the default) DALI on tar shards (tests/test_shards.py -m gpu) and the data section: the
#          folder and shard rows of both loaders on 4096 real JPEGs.
# Then the ViT-B/16 goals, read from the JSON lines: e2e >= 95% of the model step, model step >= 60% MFU
# of the measured ~790 TFLOP/s bf16 dense rate (~1700 img/s), >= 1.8x the peer.
#
# Measured cold on the H200 (2026-12-04): the kernel tests take ~250 s (Triton compiles), momentum +
# evaluation tests over 150 s, vitb ~180 s, ViT-S/L/H ~115 s; with the machine's start (1-2 min) the
# default stages take about 15 minutes: where jobs are shorter, run them one stage at a time (STAGES=...).
# Every log, JSON line and the reference file land under $OUT as they are made; `timeout` cuts a hang and each
# bench records as skipped what would start past its --time-budget, so a cut call loses nothing measured.
# Every figure also goes to $OUT/reference_timings.json (--update: this device's entry, e.g. "NVIDIA H200");
# the JSON lines print again with `python bench/throughput.py --from <file>.jsonl [--markdown] [--update]`.
# Other checks, e.g. one op's:  STAGES=vitb B_ARGS="--only kernels --kernels attention" bash bench/gpu_session.sh
# Where the copy of the tree has no .git, say the commit: FASTMOCO_COMMIT=<hash> bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
KERNEL_TESTS_TIMEOUT="${KERNEL_TESTS_TIMEOUT:-260}"
MODEL_TESTS_TIMEOUT="${MODEL_TESTS_TIMEOUT:-150}"
DALI_TESTS_TIMEOUT="${DALI_TESTS_TIMEOUT:-60}"
X_BUDGET="${X_BUDGET:-150}"
X_TIMEOUT="${X_TIMEOUT:-200}"
B_BUDGET="${B_BUDGET:-210}"       # seconds; nothing starts past it, the compile peer gets what is left
B_TIMEOUT="${B_TIMEOUT:-260}"
B_ARGS="${B_ARGS:---only model,breakdown --arch vit_b --batch 256 --builds trainer,e2e,peer,peer_compile --compile-budget 90 --breakdown-steps 12}"
C_CHUNK="${C_CHUNK:-256}"         # images per backbone chunk of the chunk stage
C_BUDGET="${C_BUDGET:-200}"
C_TIMEOUT="${C_TIMEOUT:-260}"
SLH_ARCHS="${SLH_ARCHS-vit_h}"   # ViT-S and ViT-L ran on 2026-12-04: SLH_ARCHS=vit_s,vit_l,vit_h for all
SLH_BUDGET="${SLH_BUDGET:-120}"
SLH_TIMEOUT="${SLH_TIMEOUT:-150}"

PY="${PYTHON:-python3}"   # elsewhere: PYTHON=.venv/bin/python bash bench/gpu_session.sh
REF="$OUT/reference_timings.json"
cp bench/reference_timings.json "$REF"

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

{
    date -u +%FT%TZ
    echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null || echo "${FASTMOCO_COMMIT:-unknown (no git)}")"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    "$PY" -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1
    "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
    nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

bench() {  # bench NAME TIMEOUT BUDGET ARGS...: one throughput.py run, its log under $OUT
    local name=$1 limit=$2 budget=$3
    shift 3
    echo "== bench $name (${limit} s at most)"
    timeout -k 10 "$limit" "$PY" bench/throughput.py --out "$OUT" --time-budget "$budget" --reference "$REF" \
        --update "$@" 2>&1 | tee "$OUT/bench_$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "bench $name: TIMED OUT after ${limit} s (what it measured is in $OUT/bench-*.jsonl)"
    return "$rc"
}
gpu_tests() {  # gpu_tests NAME TIMEOUT FILES...: pytest -m gpu, its log under $OUT
    local name=$1 limit=$2
    shift 2
    echo "== GPU tests $name (pytest -m gpu $*, ${limit} s at most)"
    PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$PY" -m pytest -q -m gpu -p no:cacheprovider "$@" \
        > "$OUT/gpu_tests_$name.log" 2>&1
    local rc=$?
    tail -25 "$OUT/gpu_tests_$name.log"
    [ "$rc" = 124 ] && echo "GPU tests $name: TIMED OUT after ${limit} s"
    return "$rc"
}

# The stages, most needed first; STAGES picks some (one device call each when DALI
# arrives in parts: kernels, then models, then vitb once DALI is unpacked).
STAGES="${STAGES:-kernels models vitb}"
rc_all=0
for stage in $STAGES; do
    case $stage in
    kernels)  # 1. every kernel's GPU tests
        gpu_tests kernels "$KERNEL_TESTS_TIMEOUT" tests/test_attention.py tests/test_layernorm.py \
            tests/test_contrastive.py tests/test_ema.py tests/test_dino_loss.py tests/test_lars.py \
            tests/test_fused_model.py || rc_all=1 ;;
    models)  # 1. momentum and evaluation GPU tests; 3. ViT-S/L/H Trainer steps, ViT-H's largest batch
        gpu_tests models "$MODEL_TESTS_TIMEOUT" tests/test_momentum.py tests/test_evaluation.py || rc_all=1
        if [ -n "$SLH_ARCHS" ]; then
            bench slh "$SLH_TIMEOUT" "$SLH_BUDGET" --only model --arch "$SLH_ARCHS" --builds trainer --steps 3 \
                --repeats 2 --max-batch vit_h --max-batch-start 128 --max-batch-seconds 80 || rc_all=1
        fi ;;
    vitb)  # 1. DALI's GPU tests; 2. ViT-B/16 at 256: Trainer, e2e, peers, breakdown (one run: its ratios)
        gpu_tests dali "$DALI_TESTS_TIMEOUT" tests/test_pipelines_dali.py || rc_all=1
        # shellcheck disable=SC2086
        bench vit_b "$B_TIMEOUT" "$B_BUDGET" $B_ARGS || rc_all=1 ;;
    extra)  # 4. DINO ViT-S/16 (Trainer, e2e 2x224 + 10x96, peer), R50 vs its peer, evaluation extraction
        bench extra "$X_TIMEOUT" "$X_BUDGET" --only dino,r50,eval || rc_all=1 ;;
    chunk)  # (not in the default) the chunks' GPU tests (memory.backbone_chunk auto's probe, peak memory);
            # ViT-B/16 at the recipe's 4096 on one GPU with memory.backbone_chunk, beside the unchunked
            # step at the largest micro batch that fits
        gpu_tests chunk "$MODEL_TESTS_TIMEOUT" tests/test_chunked.py || rc_all=1
        bench chunk "$C_TIMEOUT" "$C_BUDGET" --only model --arch vit_b --batch 4096 --builds chunked \
            --backbone-chunk "$C_CHUNK" --steps 2 --repeats 2 --max-batch vit_b --max-batch-start 256 \
            --max-batch-seconds 100 || rc_all=1 ;;
    data)  # (not in the default) DALI on tar shards: GPU test; loader img/s, folder vs shards rows
        gpu_tests shards "$DALI_TESTS_TIMEOUT" tests/test_shards.py || rc_all=1
        bench data "$X_TIMEOUT" "$X_BUDGET" --only data || rc_all=1 ;;
    *) echo "unknown stage $stage (kernels, models, vitb, extra, chunk, data)"; rc_all=1 ;;
    esac
done

echo "== ViT-B/16 goals (from $OUT/bench-*.jsonl)"
"$PY" - "$OUT" <<'PY' 2>&1 | tee "$OUT/goals.txt"
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
exit "$rc_all"
