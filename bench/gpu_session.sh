#!/usr/bin/env bash
# One GPU session's checks in one device call (at most 10 minutes there): the GPU tests,
# then the full bench. Run from the project root:
#
#     bash bench/gpu_session.sh            # logs and JSON lines under $OUT (or bench/results/)
#
# One op's checks only (its GPU tests and bench entries), e.g. attention and LayerNorm:
#     TESTS="tests/test_layernorm.py tests/test_attention.py tests/test_fused_model.py" \
#     BENCH_ARGS="--only kernels --kernels attention,layernorm" bash bench/gpu_session.sh
#
# Budget (the call's limit is 10 min): setup ~0.5 min, GPU tests ~4 min (236 s on an H100,
# 2026-11-22, most of it autotuning; the every-candidate-config tests added since then make it
# more: hence 330 s), bench ~3.5 min (what would start later is recorded as skipped).
# The bench skips, and records as skipped, what would start after --time-budget; `timeout`
# cuts either part if it hangs, so the logs still come back.
# Files written under $OUT (at most 8, no sub-folders): env.txt, gpu_tests.log, bench.log,
# bench-<date>-<device>.jsonl. Bring the JSON lines home and check or store them with
#     python bench/throughput.py --from <file>.jsonl [--update] [--markdown]
# Where the copy of the tree has no .git, say the commit: FASTMOCO_COMMIT=<hash> bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
TESTS="${TESTS:-tests}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-330}"
BENCH_BUDGET="${BENCH_BUDGET:-180}"   # seconds; nothing starts past it, the compile peer gets what is left
BENCH_TIMEOUT="${BENCH_TIMEOUT:-220}"
BENCH_ARGS="${BENCH_ARGS:-}"

PY="${PYTHON:-python3}"   # elsewhere: PYTHON=.venv/bin/python bash bench/gpu_session.sh

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

echo "== GPU tests (pytest -m gpu $TESTS, ${TESTS_TIMEOUT} s at most)"
# shellcheck disable=SC2086
timeout -k 10 "$TESTS_TIMEOUT" "$PY" -m pytest -q -m gpu -p no:cacheprovider $TESTS > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/gpu_tests.log"
[ "$tests_rc" = 124 ] && echo "GPU tests: TIMED OUT after ${TESTS_TIMEOUT} s"

echo "== bench (${BENCH_TIMEOUT} s at most)"
# shellcheck disable=SC2086
timeout -k 10 "$BENCH_TIMEOUT" "$PY" bench/throughput.py --out "$OUT" --time-budget "$BENCH_BUDGET" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" = 124 ] && echo "bench: TIMED OUT after ${BENCH_TIMEOUT} s (what it measured is in $OUT/bench-*.jsonl)"

echo "== gpu_session: tests exit $tests_rc, bench exit $bench_rc (1 = a figure below its reference)"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
