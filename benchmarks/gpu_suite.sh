#!/usr/bin/env bash
# The whole GPU throughput suite in one call:  bash benchmarks/gpu_suite.sh OUTDIR
#
# Runs on any CUDA machine with this repository installed (pip install -e .; PyTorch with CUDA,
# Triton optional; no TensorRT needed). Writes into OUTDIR:
#   env.txt                       nvidia-smi, torch / CUDA / cuSPARSELt / Triton versions
#   gpu_tests.txt                 the gpu-marked benchmark tests (semi-structured + Triton correctness)
#   layer_llama3_fp16.{json,png}  the headline: Llama-3-8B shapes, fp16, every M, both 2:4 backends,
#                                 ARMOR via ArmorLinear and via the Triton block-diagonal kernel
#   layer_llama3_fused.json       fused q/k/v and gate/up (one A.S.B, one B) against their members, same shapes
#   layer_all.{json,png}          every model suite (SmolLM2, Llama-2-7B, Llama-3-8B, Qwen2.5-7B/14B), fp16 + bf16
#   e2e_fp16.{json,png}           prefill/decode tokens/s, dense vs ARMOR, PyTorch on CUDA (needs an artifact:
#                                 ARTIFACT=dir, else one is pruned from the default model with --method magnitude
#                                 and timed with explicit b=32 blocks; skipped with a message if that fails)
# Budget: about 5 minutes on an H100 (the layer suites dominate); PYTHON overrides the interpreter.
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
cd "$ROOT" || exit 1
"$PY" - <<'PYEOF' > "$OUT/env.txt" 2>&1
import torch, importlib.util
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("cusparselt", torch.backends.cusparselt.is_available() and torch.backends.cusparselt.version())
print("triton", importlib.util.find_spec("triton") is not None)
PYEOF
nvidia-smi >> "$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device visible"; exit 2; }
BD=torch
"$PY" -c "import triton" 2>/dev/null && BD=torch,triton
rc=0
timeout 120 "$PY" -m pytest -q -m gpu tests/test_benchmarks_smoke.py > "$OUT/gpu_tests.txt" 2>&1 || rc=1
tail -3 "$OUT/gpu_tests.txt"
timeout 200 "$PY" -m benchmarks.bench_layer --device cuda --suite llama-3-8b --dtype fp16 --blockdiag "$BD" \
    --iters 50 --out "$OUT/layer_llama3_fp16.json" || rc=1
timeout 120 "$PY" -m benchmarks.bench_layer --device cuda --suite llama-3-8b --dtype fp16 \
    --layers qkv,q,k,v,gate_up,gate,up --iters 50 --plot none --out "$OUT/layer_llama3_fused.json" \
    | grep -E "^fused|correctness" || rc=1
timeout 300 "$PY" -m benchmarks.bench_layer --device cuda --dtype fp16,bf16 --blockdiag "$BD" \
    --iters 20 --out "$OUT/layer_all.json" > "$OUT/layer_all.txt" || rc=1
tail -2 "$OUT/layer_all.txt"
ART=${ARTIFACT:-}
SYNTH=()
if [ -z "$ART" ]; then
    ART="$OUT/artifact_magnitude"
    SYNTH=(--synth-block-size 32)
    [ -f "$ART/manifest.json" ] || timeout 240 armor-export prune --method magnitude --out "$ART" --overwrite \
        > "$OUT/prune.txt" 2>&1 || echo "could not build an artifact (see $OUT/prune.txt); e2e skipped"
fi
if [ -f "$ART/manifest.json" ]; then
    timeout 200 "$PY" -m benchmarks.bench_e2e --artifact "$ART" --device cuda --dtype fp16 --engines torch \
        --prefill 1x512,8x512,32x512 --decode-tokens 64 --iters 5 "${SYNTH[@]}" --out "$OUT/e2e_fp16.json" || rc=1
fi
echo "gpu_suite: results in $OUT (exit $rc)"
exit $rc
