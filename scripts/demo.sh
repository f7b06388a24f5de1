#!/usr/bin/env bash
# Set up .venv (idempotent) and run DRoPE on the bundled sample DWI with the bundled weights:
# reconstruction of 75% masked patches, FA/MD of original and reconstruction with error maps, attention maps,
# latent and an overview PNG, all written to ./demo_output (or $1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
out="${1:-$root/demo_output}"
cd "$root"
.venv/bin/python -m DRoPE info Resources/Sample/dwi.nii.gz
.venv/bin/python -m DRoPE reconstruct Resources/Sample/dwi.nii.gz --out "$out"
echo "Results written to $out (open $out/overview.png)"
