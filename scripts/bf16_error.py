"""How far bf16 autocast moves D-RoPE results from float32: ``python scripts/bf16_error.py [--device cpu|cuda]``.

Prints two lines:
- the attention alone with bf16 q, k, v (the D-RoPE core computes in float32 and casts back, so this is the
  rounding of inputs and output) against the float64 naive form, at T = 90;
- the bundled model on the bundled sample (its reconstruction of the hidden brain voxels at the default 75% mask,
  and the scan latent) under ``torch.autocast(dtype=torch.bfloat16)`` against float32 on the same device.
Training on CUDA runs under bf16 autocast (``DRoPE.training.runtime``); ``reconstruct`` stays in float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs with any interpreter that has torch (GPU hosts)

from DRoPE.io import load_dwi  # noqa: E402
from DRoPE.model.checkpoint import read_metadata  # noqa: E402
from DRoPE.model.drope import drope_attention, drope_attention_naive  # noqa: E402
from DRoPE.preprocess import brain_mask, preprocess  # noqa: E402
from DRoPE.reconstruct import (  # noqa: E402
    DEFAULT_WEIGHTS,
    ReconstructSettings,
    _run_slabs,
    load_model,
    resolve_slab,
    scan_latent,
)

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample" / "dwi.nii.gz"


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def attention_error(device: str) -> float:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, 3, 90, 128, generator=gen, dtype=torch.float64) for _ in range(3))
    d = 2 * torch.rand(90, 90, generator=gen, dtype=torch.float64)
    out = drope_attention(*(t.to(device, torch.bfloat16) for t in (q, k, v)), d.to(device, torch.float32))
    return rel(out.double().cpu().numpy(), drope_attention_naive(q, k, v, d).numpy())


def model_error(device: str) -> tuple[float, float, float]:
    """(max rel, rms rel) of the hidden brain voxels' prediction and rel. error of the latent, bf16 vs float32."""
    dwi = load_dwi(SAMPLE)
    model = load_model(DEFAULT_WEIGHTS, device=device)
    prep = preprocess(dwi, mask=brain_mask(dwi), patch=model.config.patch_size)
    settings = ReconstructSettings()
    slab = resolve_slab(settings, read_metadata(DEFAULT_WEIGHTS), model.config.patch_size[2])

    def run():
        pred, visible = _run_slabs(model, prep, slab, settings, device, lambda f, m: None, extras=False)[:2]
        return pred, visible, scan_latent(model, prep, slab, device).float().cpu().numpy()

    pred32, visible, latent32 = run()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        pred16, _, latent16 = run()
    hidden = ~visible & prep.mask[None]
    a, b = pred16[hidden], pred32[hidden]
    rms = float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))
    return rel(a, b), rms, float(np.linalg.norm(latent16 - latent32) / np.linalg.norm(latent32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # the CPU is shared; one thread keeps the run steady
    print(f"{args.device}: attention with bf16 q, k, v vs float64: max rel err {attention_error(args.device):.2e}")
    worst, rms, latent = model_error(args.device)
    print(
        f"{args.device}: bundled model under bf16 autocast vs float32: hidden-voxel prediction max rel {worst:.2e}, "
        f"rms rel {rms:.2e}; scan latent rel {latent:.2e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
