#!/usr/bin/env bash
# One run on the GPU machine: install, GPU tests, loss/head benchmark, end-to-end throughput.
#
#   OUT=/path/to/results bash scripts/gpu_run.sh            # from the repository root
#
# Environment:
#   OUT               folder for the results (default runs/gpu)
#   STEPS             which sections, in order (default "tests bench throughput"; "tune" runs
#                     scripts/tune_kernels.py, the kernel sweep, into $OUT/tune)
#   BENCH_ARGS        extra flags of python -m cggr_hook.bench          (e.g. "--vocab 128256")
#   THROUGHPUT_ARGS   extra flags of examples/throughput_benchmark.py   (e.g. "--shapes gemma270m")
#   TUNE_ARGS         extra flags of scripts/tune_kernels.py              (e.g. "--quick")
#   HOST_ARGS         extra flags of scripts/host_time.py (step "host": a call's host time)
#   QUALITY_ARGS      flags of examples/quality_benchmark.py for the "quality" step (e.g.
#                     "--preset finetune-small --seeds 0"); "quality_timing" times every arm of
#                     the presets in QUALITY_TIMING_PRESETS (default "scratch-small scratch-large")
#   TESTS_TIMEOUT, TUNE_TIMEOUT, BENCH_TIMEOUT, THROUGHPUT_TIMEOUT   seconds per section (default
#                     180, 300, 300, 300; 0: none)
#   INSTALL=0         skip the two pip installs (the project is installed already)
#   COMMIT            the commit the files are at, for the log (the device's .git can be stale)
#
# Every section runs even when an earlier one failed; the exit codes are listed at the end.
# Files written (one folder deep at most; the JSON files end up in json.tar.gz, so that a call with
# every step returns at most the device tool's 8 files):
#   run.log               everything printed (versions, installs, progress, tracebacks, exit codes)
#   gpu_tests.log         python -m pytest tests -q -x -m gpu (without tests/test_integrations.py)
#   bench.json, bench.md  python -m cggr_hook.bench
#   throughput.md, throughput/throughput.json   examples/throughput_benchmark.py
#   host_time.{md,json,log}  scripts/host_time.py
#   quality_timing.md, quality/results.{md,json}, quality/val_loss_vs_time.png
#                         examples/quality_benchmark.py (its corpus and base models are cached
#                         in .cache/cggr_hook, which a warm machine keeps between calls)

set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-runs/gpu}
STEPS=${STEPS:-"tests bench throughput"}
export PYTHONUNBUFFERED=1
export CGGR_HOOK_CACHE=${CGGR_HOOK_CACHE:-$PWD/.cache/cggr_hook}
mkdir -p "$OUT" || exit 2
exec > >(tee -a "$OUT/run.log") 2>&1

summary=()
record() {  # record NAME RC SECONDS
    summary+=("$1=$2 (${3}s)")
    echo "=== $1: exit $2 after ${3}s"
}

# run NAME TIMEOUT 'COMMAND | tee FILE': the command's exit code (pipefail), not the tee's
run() {
    local name=$1 limit=$2 cmd=$3 t0=$SECONDS
    echo
    echo "=== $name ($(date -u '+%H:%M:%S UTC')): $cmd"
    timeout -k 15 "$limit" bash -o pipefail -c "$cmd"
    record "$name" $? $((SECONDS - t0))
}

# the device's copy of the tree may carry a .git older than its files: name the commit with COMMIT=
echo "=== gpu_run.sh at ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?') (its .git; COMMIT= names it)} ($(date -u '+%Y-%m-%d %H:%M UTC')), OUT=$OUT, STEPS=$STEPS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"

if [ "${INSTALL:-1}" = 1 ]; then
    t0=$SECONDS
    python -m pip install -q --no-deps --no-build-isolation -e .
    record install $? $((SECONDS - t0))
fi
if [ "${INSTALL:-1}" = 1 ] && compgen -G ".peer-wheels/*.whl" >/dev/null; then
    t0=$SECONDS
    python -m pip install -q --no-deps --no-index .peer-wheels/*.whl
    record peer_wheels $? $((SECONDS - t0))
else
    echo "=== no .peer-wheels/: the peer rows will say 'not installed'"
fi

python - <<'EOF'
import importlib, importlib.metadata as md, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
for dist in ("triton", "transformers", "wrapt", "cggr_hook", "cggr", "liger-kernel", "cut-cross-entropy"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} not installed")
EOF

for step in $STEPS; do
    case $step in
    tests)
        # the integrations extra (peft, trl, bitsandbytes, lightning) is not installed there, and
        # that file has no GPU test
        run tests "${TESTS_TIMEOUT:-180}" \
            "python -m pytest tests -q -x -m gpu --ignore=tests/test_integrations.py 2>&1 | tee '$OUT/gpu_tests.log'"
        ;;
    bench)
        run bench "${BENCH_TIMEOUT:-300}" \
            "python -m cggr_hook.bench --json '$OUT/bench.json' ${BENCH_ARGS:-} | tee '$OUT/bench.md'"
        ;;
    host)
        run host "${HOST_TIMEOUT:-180}" "python scripts/host_time.py --out '$OUT' ${HOST_ARGS:-} | tee '$OUT/host_time.log'"
        ;;
    tune)
        run tune "${TUNE_TIMEOUT:-300}" "python scripts/tune_kernels.py --out '$OUT/tune' ${TUNE_ARGS:-}"
        ;;
    quality_timing)
        for p in ${QUALITY_TIMING_PRESETS:-scratch-small scratch-large}; do
            run "quality_timing_$p" "${QUALITY_TIMEOUT:-600}" \
                "python examples/quality_benchmark.py --preset $p --timing-only | tee -a '$OUT/quality_timing.md'"
        done
        ;;
    quality)
        run quality "${QUALITY_TIMEOUT:-600}" "python examples/quality_benchmark.py --out '$OUT/quality' ${QUALITY_ARGS:-}"
        ;;
    throughput)
        run throughput "${THROUGHPUT_TIMEOUT:-300}" \
            "python examples/throughput_benchmark.py --out '$OUT/throughput' ${THROUGHPUT_ARGS:-} | tee '$OUT/throughput.md'"
        ;;
    *)
        echo "=== unknown step '$step' (tests, tune, bench, host, throughput, quality_timing, quality)"
        summary+=("$step=unknown")
        ;;
    esac
done

# the device tool returns at most 8 files a call: the raw JSON files travel as one archive
# (tar xzf json.tar.gz restores them, paths relative to $OUT)
mapfile -t jsons < <(cd "$OUT" && find . -name '*.json' -type f | sort)
if [ "${#jsons[@]}" -gt 0 ]; then
    (cd "$OUT" && tar czf json.tar.gz "${jsons[@]}" && rm -f "${jsons[@]}") && echo "=== JSON files in $OUT/json.tar.gz: ${jsons[*]}"
fi

echo
echo "=== exit codes: ${summary[*]}"
for s in "${summary[@]}"; do
    case $s in *=0\ *) ;; *) exit 1 ;; esac
done
exit 0
