"""Masking strategies and the packing of visible tokens (TokenLayout)."""

from __future__ import annotations

import pytest
import torch

from DRoPE.model import MASKING, MaskingError, fixed_ratio_spatial_mask, strategy_for_epoch
from DRoPE.model.layers import TokenLayout
from DRoPE.model.masking import diffusion_mask, n_kept, spatial_mask


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_and_signature():
    assert set(MASKING) == {"spatial", "diffusion"}
    for fn in MASKING.values():
        keep = fn(2, 5, 12, generator=gen(), device="cpu")
        assert keep.shape == (2, 5, 12) and keep.dtype == torch.bool


def test_n_kept_rule():
    assert n_kept(144, 0.75) == 36
    assert n_kept(15, 0.5) == 8  # 7 volumes removed
    assert n_kept(14, 0.5) == 7
    assert n_kept(1, 0.5) == 1 and n_kept(3, 0.75) == 1  # at least one stays
    assert n_kept(10, 0.0) == 10
    for bad in (1.0, -0.1):
        with pytest.raises(MaskingError, match="ratio"):
            n_kept(10, bad)


def test_spatial_mask_exact_per_volume_and_independent():
    keep = spatial_mask(3, 15, 144, generator=gen(1))
    assert torch.all(keep.sum(-1) == 36)  # exactly 25% of the patches of every volume
    rows = keep.reshape(-1, 144)
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]  # drawn independently per volume
    assert keep.float().mean(dim=(0, 1)).min() > 0  # every position visible somewhere


def test_diffusion_mask_whole_volumes():
    keep = diffusion_mask(4, 15, 20, generator=gen(2))
    per_volume = keep.any(-1)
    assert torch.equal(keep, per_volume[..., None].expand_as(keep))  # a volume is all visible or all removed
    assert torch.all(per_volume.sum(-1) == 8)
    assert len({tuple(r.tolist()) for r in per_volume}) > 1  # drawn per batch element
    assert torch.all(diffusion_mask(2, 1, 7, generator=gen(3)))  # V = 1 keeps its only volume


def test_fixed_ratio_and_determinism():
    keep = fixed_ratio_spatial_mask(2, 4, 50, 0.6, generator=gen(4))
    assert torch.all(keep.sum(-1) == 20)
    assert torch.all(fixed_ratio_spatial_mask(1, 2, 9, 0.0))
    assert torch.equal(spatial_mask(2, 3, 40, generator=gen(5)), spatial_mask(2, 3, 40, generator=gen(5)))
    assert not torch.equal(spatial_mask(2, 3, 40, generator=gen(5)), spatial_mask(2, 3, 40, generator=gen(6)))
    with pytest.raises(MaskingError):
        fixed_ratio_spatial_mask(1, 1, 4, 1.5)


def test_strategy_for_epoch():
    assert [strategy_for_epoch("alternating", e) for e in range(4)] == ["spatial", "diffusion", "spatial", "diffusion"]
    assert strategy_for_epoch("spatial", 3) == "spatial" and strategy_for_epoch("diffusion", 0) == "diffusion"
    with pytest.raises(MaskingError, match="alternating"):
        strategy_for_epoch("random", 0)


def test_layout_packs_each_mask_kind():
    grid = (3, 2, 2)
    P = 12
    full = TokenLayout.from_keep(torch.ones(2, 5, P, dtype=torch.bool), grid)
    assert full.dense and full.valid is None and full.patch_idx.shape == (2, 5, P)

    keep = diffusion_mask(2, 5, P, generator=gen(7))
    lay = TokenLayout.from_keep(keep, grid)
    assert lay.dense and lay.vol_idx.shape == (2, 3) and lay.vol_valid is None  # 3 of 5 volumes, packed
    assert torch.equal(lay.vol_idx, torch.stack([torch.nonzero(k.any(-1))[:, 0] for k in keep]))

    keep = spatial_mask(2, 5, P, generator=gen(8))
    lay = TokenLayout.from_keep(keep, grid)
    assert not lay.dense and lay.valid is None and lay.patch_idx.shape == (2, 5, 3)
    assert torch.all(keep.gather(2, lay.patch_idx))  # every packed token is visible
    assert torch.all(lay.patch_idx.diff(dim=-1) > 0)  # in increasing patch order


def test_layout_irregular_mask_pads_and_round_trips():
    keep = torch.zeros(2, 3, 4, dtype=torch.bool)
    keep[0, 0, [0, 2, 3]] = True
    keep[0, 2, 1] = True
    keep[1, 1, :] = True
    keep[1, 2, 0] = True
    keep[1, 0, 3] = True  # batch 0 shows 2 volumes, batch 1 shows 3
    lay = TokenLayout.from_keep(keep, (2, 2, 1))
    assert lay.patch_idx.shape == (2, 3, 4) and lay.valid is not None
    assert torch.equal(lay.vol_valid, keep.any(-1))  # unequal volume counts per batch element: all V kept, flagged
    assert torch.equal(lay.valid.sum(-1), keep.sum(-1))
    x = torch.randn(2, 3, 4, 5)
    grid = lay.to_grid(x)
    assert torch.equal(grid[0, 0, 2], x[0, 0, 1]) and torch.all(grid[0, 1] == 0)
    back = lay.from_grid(grid)
    assert torch.equal(back[lay.valid], x[lay.valid]) and torch.all(back[~lay.valid] == 0)
    assert torch.equal(lay.occupancy.transpose(1, 2), keep)
    with pytest.raises(ValueError, match="no visible"):
        TokenLayout.from_keep(torch.zeros(1, 2, 4, dtype=torch.bool), (2, 2, 1))
