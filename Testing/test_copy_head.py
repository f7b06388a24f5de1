"""The copy head (beyond the paper): starts as the shell-mean baseline, learns, and the brain-weighted loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DRoPE.baselines import shell_mean_baseline
from DRoPE.model import DRoPEMAE, ModelConfigError, fixed_ratio_spatial_mask, model_config, patch_map_to_voxels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = (16, 16, 8)


def copy_model(**overrides) -> DRoPEMAE:
    torch.manual_seed(0)
    return DRoPEMAE(model_config("tiny", head="copy", **overrides)).eval()


def protocol(shells):
    """bvals (1, V) and random unit bvecs (1, V, 3) for the list of shell b-values."""
    bvals = torch.tensor([shells], dtype=torch.float32)
    bvecs = torch.nn.functional.normalize(torch.randn(1, len(shells), 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    return bvals, bvecs


def reconstruct_with_baseline(model, shells, seed=1):
    """(prediction, shell-mean baseline, visible) as (X, Y, Z, V) arrays for a random positive signal."""
    bvals, bvecs = protocol(shells)
    V = len(shells)
    x = torch.rand(1, V, *GRID, generator=torch.Generator().manual_seed(seed)) + 0.1
    keep = fixed_ratio_spatial_mask(1, V, model.num_patches(GRID), 0.75, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pred = model.reconstruct(x, bvals, bvecs, keep)[0].permute(1, 2, 3, 0).numpy()
    visible = patch_map_to_voxels(keep, GRID, model.config.patch_size)[0].permute(1, 2, 3, 0).numpy()
    signal = x[0].permute(1, 2, 3, 0).numpy()
    baseline = shell_mean_baseline(signal, visible, np.array(shells), np.ones(GRID, bool))
    return pred, baseline, visible


@pytest.mark.parametrize("drope", [True, False])
def test_at_initialisation_the_copy_head_is_the_shell_mean(drope):
    pred, baseline, visible = reconstruct_with_baseline(copy_model(drope=drope), [1000.0] * 9)
    hidden = ~visible
    assert hidden.mean() > 0.5
    np.testing.assert_allclose(pred[hidden], baseline[hidden], rtol=1e-5, atol=1e-6)


def test_with_two_shells_it_is_the_mean_of_the_own_shell_where_one_is_visible():
    shells = [1000.0] * 5 + [2000.0] * 5
    pred, baseline, visible = reconstruct_with_baseline(copy_model(), shells)
    own = np.zeros_like(visible)
    for v, b in enumerate(shells):
        same = np.array(shells) == b
        same[v] = False
        own[..., v] = visible[..., same].any(-1)
    compared = ~visible & own
    assert compared.mean() > 0.3
    np.testing.assert_allclose(pred[compared], baseline[compared], rtol=1e-5, atol=1e-6)


def test_the_copy_scores_learn_to_weight_the_closest_direction():
    """Each axis measured twice (g and -g): training only the scores (query, key, distance MLP) moves the head from
    the plain mean to the twin volume, halving the error (the twin is visible for half of the hidden patches)."""
    torch.manual_seed(0)
    model = DRoPEMAE(model_config("tiny", head="copy")).train()
    bvals, bvecs = protocol([1000.0] * 8)
    bvecs = torch.cat([bvecs[:, :4], -bvecs[:, :4]], dim=1)
    head = model.copy_head
    scoring = [*head.query.parameters(), *head.key.parameters(), *head.distance_score.parameters()]
    optimiser = torch.optim.Adam(scoring, lr=1e-2)
    P = model.num_patches(GRID)
    losses = []
    for step in range(80):
        generator = torch.Generator().manual_seed(step)  # a new signal each step: a shared field + a part per axis
        base = torch.rand(1, 1, *GRID, generator=generator) + 0.1 * torch.rand(1, 4, *GRID, generator=generator)
        x = torch.cat([base, base], dim=1)
        keep = fixed_ratio_spatial_mask(1, 8, P, 0.5, generator=generator)
        loss = model(x, bvals, bvecs, keep, 1.0).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


def test_brain_weighted_loss_counts_only_brain_voxels():
    model = copy_model()
    x = torch.rand(1, 3, *GRID)
    pred = torch.rand(1, 3, *GRID)
    keep = fixed_ratio_spatial_mask(1, 3, model.num_patches(GRID), 0.5, generator=torch.Generator().manual_seed(0))
    brain = torch.zeros(1, *GRID, dtype=torch.bool)
    brain[:, 2:11, 3:14, 1:6] = True
    _, visible_loss, masked_loss = model.forward_loss(x, pred, keep, 0.5, brain)
    shown = patch_map_to_voxels(keep, GRID, model.config.patch_size)
    squared = (pred - x) ** 2
    inside = brain[:, None].expand_as(shown)
    assert masked_loss.item() == pytest.approx(squared[inside & ~shown].mean().item(), rel=1e-5)
    assert visible_loss.item() == pytest.approx(squared[inside & shown].mean().item(), rel=1e-5)


def test_unknown_head_is_a_config_error():
    with pytest.raises(ModelConfigError, match="head"):
        model_config("tiny", head="mlp")
