#!/usr/bin/env bash
# The CUDA path, measured (issue 39): dense vs sparse on a lent GPU, one short prepared run.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --fetch-wheels   # here, once, where pip reaches a registry: fills .whl/ (see below)
#
# The GPU machine has no package registry. Its `python3` already holds PyTorch (CUDA), numpy, pillow, tqdm,
# safetensors, typer, transformers and huggingface_hub; of what the benchmarks import, only diffusers (and its
# importlib_metadata) are missing. They travel as wheels in .whl/ (ignored by git; the `run` call names `.whl` in
# `carry`) and are installed with `pip --no-index --target` into /tmp; sparsedit itself is used from `src/` through
# PYTHONPATH (no install, no build). Without the wheels the diffusers UNets (SD 1.5, DDPM) are skipped and the
# GauGAN and conv-stack runs still happen.
#
# Steps, each under `timeout` and within an overall budget (GPU_SH_BUDGET seconds, default 450): a failing or
# timed-out step is reported and the next one runs. Results: one JSON per step and gpu.log under $OUT (or
# benchmarks/results/gpu when $OUT is unset), a summary table at the end. Sparse runs use
# --no-measured-fallback (the engine's own speed at the region; no dense fallback chosen by calibration), except the
# last, optional step, which shows the choice the library makes by itself on this GPU.
set -u

if [ "${1:-}" = "--fetch-wheels" ]; then
    PY=${PYTHON:-.venv/bin/python}
    pins=$(grep -iE '^(diffusers|importlib[-_]metadata)==' constraints.txt | tr '\n' ' ')
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    # shellcheck disable=SC2086
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins
fi

PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results/gpu}
BUDGET=${GPU_SH_BUDGET:-450}
THREADS=${GPU_SH_THREADS:-8}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1

SUMMARY=()
HAVE_DIFFUSERS=0
# step NAME TIMEOUT_S NEEDS_DIFFUSERS COMMAND...: runs COMMAND under the smaller of TIMEOUT_S and what is left of the
# budget; the result is one line of SUMMARY.
step() {
    local name=$1 limit=$2 needs=$3
    shift 3
    local left=$((BUDGET - SECONDS - 5))
    if [ "$needs" = 1 ] && [ "$HAVE_DIFFUSERS" = 0 ]; then
        SUMMARY+=("$name: skipped (no diffusers)")
        return
    fi
    if [ "$left" -lt 30 ]; then
        SUMMARY+=("$name: skipped (budget spent, ${SECONDS} s)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "== $name (limit ${limit} s, ${SECONDS} s elapsed): $*"
    if [ -n "${GPU_SH_DRY_RUN:-}" ]; then
        SUMMARY+=("$name: dry run")
        return
    fi
    local t0=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" || rc=$?
    case $rc in
        0) SUMMARY+=("$name: ok in $((SECONDS - t0)) s") ;;
        124 | 137) SUMMARY+=("$name: TIMED OUT after $((SECONDS - t0)) s (limit ${limit} s)") ;;
        *) SUMMARY+=("$name: FAILED rc=$rc after $((SECONDS - t0)) s") ;;
    esac
}

main() {
    echo "== gpu.sh $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (modified)'), results in $RES"
    nvidia-smi || echo "nvidia-smi failed"

    site=/tmp/sparsedit-site
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            || echo "wheel install failed"
    fi
    export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" - <<'EOF' || { echo "torch with CUDA or sparsedit is not importable: nothing to run"; return 1; }
import os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
assert torch.cuda.is_available() or os.environ.get("GPU_SH_DRY_RUN"), "no CUDA device"
import sparsedit
print("sparsedit", sparsedit.__version__, "from", sparsedit.__file__)
EOF
    if "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)"; then HAVE_DIFFUSERS=1; else
        HAVE_DIFFUSERS=0
        echo "diffusers missing (no .whl/ carried?): the SD 1.5 and DDPM steps are skipped"
    fi

    C=(--device cuda --threads "$THREADS")
    U=("$PY" benchmarks/unet_edit.py "${C[@]}" --no-measured-fallback)
    G=("$PY" benchmarks/gan_edit.py "${C[@]}" --no-measured-fallback --fractions 0.012 --repeats 7)

    step conv_stack 60 0 "$PY" benchmarks/conv_stack.py "${C[@]}" --no-measured-fallback --fractions 0.01 0.05 \
        --dtypes float16 bfloat16 --repeats 9 --json "$RES/conv_stack.json"
    step sd15_fp16 120 1 "${U[@]}" --model sd15 --fractions 0.012 --dtype float16 --repeats 5 \
        --json "$RES/unet_edit_sd15_fp16.json"
    step gaugan_approximate 75 0 "${G[@]}" --modes approximate --dtype float16 --json "$RES/gan_edit_approximate.json"
    step ddpm_church_fp16 75 1 "${U[@]}" --model ddpm-church --fractions 0.01 --dtype float16 --repeats 7 \
        --json "$RES/unet_edit_ddpm_fp16.json"
    step gaugan_exact 75 0 "${G[@]}" --modes exact --dtype float16 --json "$RES/gan_edit_exact.json"
    step sd15_bf16 120 1 "${U[@]}" --model sd15 --fractions 0.012 --dtype bfloat16 --repeats 5 \
        --json "$RES/unet_edit_sd15_bf16.json"
    step sd15_fp16_calibrated 90 1 "$PY" benchmarks/unet_edit.py "${C[@]}" --model sd15 --fractions 0.012 \
        --dtype float16 --repeats 3 --json "$RES/unet_edit_sd15_fp16_calibrated.json"

    echo
    echo "== summary (${SECONDS} s in all)"
    printf '%s\n' "${SUMMARY[@]}"
    "$PY" - "$RES" <<'EOF' || true
import json, sys
from pathlib import Path

print(f"{'result':<34} {'dtype':<9} {'region':>7} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8} {'MACs ratio':>10} "
      f"{'effic.':>6} {'max err':>8}")
name = None
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(p.read_text())
    meta, name = d["meta"], name or d["meta"].get("device_name")
    for r in d["rows"]:
        dense = r.get("dense_ms", 1e3 * r.get("dense_s", 0))
        sparse = r.get("sparse_ms", 1e3 * r.get("sparse_s", 0))
        frac = r.get("region_fraction", r.get("changed_fraction", 0))
        ratio = r["macs_ratio"]
        label = p.stem + (f" {r['mode']}" if "mode" in r else "")
        print(f"{label:<34} {r.get('dtype', meta.get('dtype', '')):<9} {100 * frac:>6.2f}% {dense:>9.2f} {sparse:>9.2f} "
              f"{dense / sparse:>7.2f}x {ratio:>9.1f}x {dense / sparse / ratio:>6.2f} {r['max_abs_error']:>8.1e}")
print(f"GPU: {name}")
EOF
}

main 2>&1 | tee -a "$RES/gpu.log"
exit "${PIPESTATUS[0]}"
