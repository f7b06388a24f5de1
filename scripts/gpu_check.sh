#!/usr/bin/env bash
# One prepared GPU check (about 3-5 minutes on one CUDA GPU): the D-RoPE attention benchmark on CUDA (T = 15, 90,
# 288 rows; D-RoPE (the torch.compile path) against SDPA + 1-D RoPE), the CUDA tests, the bf16 autocast error, and
# a whole-brain 90-volume reconstruct on CUDA, with its time and peak memory from summary.json. The 90-volume DWI is
# a noisy phantom (DRoPE.phantom: 2 b0 + 2 shells x 44 directions) on the geometry and tensors of a real scan: the
# bundled sample (80x80x40, 3 mm), or the NIfTI DWI given as $2.
# Usage: bash scripts/gpu_check.sh [OUT_DIR] [SCAN.nii.gz]   (PYTHON=... picks an interpreter with CUDA torch)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-$root/gpu_check_output}"
scan="${2:-Resources/Sample/dwi.nii.gz}"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        py=.venv/bin/python
    else
        py=python3
    fi
fi
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: $py has no CUDA torch (set PYTHON=...)" >&2
    exit 2
fi
mkdir -p "$out"
"$py" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)" | tee "$out/device.txt"

echo "== attention benchmark on CUDA"
timeout 240 "$py" -m DRoPE.bench --device cuda --cases a_T15,b_T90,c_T288 | tee "$out/bench_cuda.txt"

echo "== CUDA tests of the D-RoPE paths (compiled path vs the naive form, float32 and float64)"
if "$py" -c "import pytest" 2>/dev/null; then
    timeout 180 "$py" -m pytest -q -p no:cacheprovider Testing/test_drope.py -k cuda | tee "$out/cuda_tests.txt"
else
    echo "pytest missing for $py: skipped" | tee "$out/cuda_tests.txt"
fi

echo "== bf16 autocast error on CUDA"
timeout 120 "$py" scripts/bf16_error.py --device cuda | tee "$out/bf16_cuda.txt"

echo "== 90-volume whole-brain reconstruct on CUDA (phantom of $scan)"
"$py" - "$scan" "$out/dwi90.nii.gz" <<'EOF'
import sys
from DRoPE.io import load_dwi, save_nifti
from DRoPE.phantom import make_gtab, phantom_from_dwi

dwi = load_dwi(sys.argv[1])
phantom = phantom_from_dwi(dwi, make_gtab({1000: 44, 2000: 44}, n_b0=2, seed=0), snr=30, seed=0)
save_nifti(phantom, sys.argv[2])
print("phantom", phantom.data.shape)
EOF
rm -rf "$out/recon90"
timeout 240 "$py" -m DRoPE reconstruct "$out/dwi90.nii.gz" --out "$out/recon90" --device cuda --progress none
"$py" - "$out/recon90/summary.json" <<'EOF' | tee "$out/recon90.txt"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"reconstruct 90 volumes on {s['device']}: {s['seconds']} s, peak memory {s['peak_memory_gib']} GiB, "
      f"grid {s['model_grid']}, masked MSE {s['metrics']['mse_normalised_masked']:.4g}")
EOF
