"""The D-RoPE masked autoencoder: config, patches, invariances, masking, loss, checkpoints, training on real data."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from DRoPE.device import DeviceError, select_device
from DRoPE.model import (
    PRESETS,
    CheckpointError,
    DRoPEMAE,
    MAEOutput,
    ModelConfig,
    ModelConfigError,
    ModelInputError,
    diffusion_mask,
    fixed_ratio_spatial_mask,
    load_model,
    mask_lambda,
    model_config,
    patch_map_to_voxels,
    save_model,
    spatial_mask,
)
from DRoPE.model.drope import drope_distance
from DRoPE.model.layers import DiffusionAttention, SpatialAttention, TokenLayout, qspace_coordinates, sincos_3d

TINY = model_config("tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (16, 16, 8)  # 2 x 2 x 2 patches of (8, 8, 4)
P = 8


def make_model(seed=0, **overrides) -> DRoPEMAE:
    torch.manual_seed(seed)
    return DRoPEMAE(model_config("tiny", **overrides)).eval()


def protocol(B, V, seed=0):
    """Multi-shell protocols (b0, 1000, 2000, 3000), a different one per batch element; unit vectors, zero for b0."""
    gen = torch.Generator().manual_seed(seed)
    shells = torch.tensor([0.0, 1000.0, 2000.0, 3000.0])
    bvals = shells[torch.randint(0, 4, (B, V), generator=gen)]
    bvals[:, 0] = 0.0
    bvecs = torch.nn.functional.normalize(torch.randn(B, V, 3, generator=gen), dim=-1)
    bvecs[bvals == 0] = 0
    return bvals, bvecs


def data(B, V, seed=0, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(B, V, *shape, generator=gen), *protocol(B, V, seed)


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


def test_config_defaults_json_round_trip_and_errors():
    paper = model_config("paper")
    assert paper == ModelConfig() and paper.patch_size == (8, 8, 4) and paper.embed_dim == 384 and paper.depth == 10
    assert (paper.num_heads, paper.decoder_depth, paper.decoder_mlp_ratio, paper.drope_base) == (3, 3, 1.0, 0.3)
    text = json.dumps(dataclasses.asdict(TINY))
    assert ModelConfig.from_dict(json.loads(text)) == TINY
    assert set(PRESETS) >= {"paper", "tiny"}
    assert model_config("tiny", drope=False).drope is False
    with pytest.raises(ModelConfigError, match="unknown model config keys.*bogus"):
        ModelConfig.from_dict({**dataclasses.asdict(TINY), "bogus": 1})
    with pytest.raises(ModelConfigError, match="heads"):
        ModelConfig(embed_dim=48, num_heads=5)
    with pytest.raises(ModelConfigError, match="divisible by 12"):
        ModelConfig(embed_dim=40, num_heads=2)
    with pytest.raises(ModelConfigError, match="preset"):
        model_config("huge")


def test_mask_lambda_ramp():
    assert mask_lambda(0, 300) == pytest.approx(0.05)
    assert mask_lambda(299, 300) == pytest.approx(0.95)
    assert mask_lambda(149.5, 300) == pytest.approx(0.5)
    assert mask_lambda(1000, 300) == pytest.approx(0.95) and mask_lambda(0, 1) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------------------
# patches and positional codes
# ---------------------------------------------------------------------------------------------------------


def test_patchify_order_and_inverse():
    model = make_model()
    x = torch.randn(2, 3, 16, 24, 8)
    patches = model.patchify(x)
    assert patches.shape == (2, 3, 2 * 3 * 2, 256)
    # patch (gx, gy, gz) = (1, 2, 0) is index (1 * 3 + 2) * 2 + 0 = 10; voxels in C order
    torch.testing.assert_close(patches[1, 2, 10], x[1, 2, 8:16, 16:24, 0:4].reshape(-1), atol=0, rtol=0)
    torch.testing.assert_close(model.unpatchify(patches, (2, 3, 2)), x, atol=0, rtol=0)
    with pytest.raises(ModelInputError, match="multiple of the patch size"):
        model.patchify(torch.randn(1, 1, 12, 16, 8))


def test_patch_map_to_voxels():
    patch_map = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(1, 1, -1)
    voxels = patch_map_to_voxels(patch_map, (16, 24, 8), (8, 8, 4))
    assert voxels.shape == (1, 1, 16, 24, 8)
    assert torch.all(voxels[0, 0, 8:16, 16:24, 0:4] == 10) and torch.all(voxels[0, 0, :8, :8, 4:] == 1)


def test_position_codes():
    code = sincos_3d((2, 3, 4), 24)
    assert code.shape == (24, 24)
    # first channel of each axis block is sin(centre * 1): x centre of patch (1, 0, 0) is 1.5
    assert code[12, 0] == pytest.approx(math.sin(1.5)) and code[1, 16] == pytest.approx(math.sin(1.5))
    bvals = torch.tensor([[0.0, 1000.0, 1000.0, 2000.0]])
    g = torch.tensor([[[0.0, 0, 0], [0.6, 0, 0.8], [-0.6, 0, -0.8], [0.0, -1.0, 0.0]]])
    c = qspace_coordinates(bvals, g)
    torch.testing.assert_close(c[0, 1], c[0, 2])  # antipodal gradients get the same code
    torch.testing.assert_close(c[0, 0], torch.zeros(3))  # b0
    torch.testing.assert_close(c[0, 1], torch.tensor([1.0, math.acos(0.8), 0.0]))
    torch.testing.assert_close(c[0, 3], torch.tensor([2.0, math.pi / 2, math.pi / 2]))  # z = 0, y < 0 -> flipped


# ---------------------------------------------------------------------------------------------------------
# attention modules: fused paths agree with their plain twins
# ---------------------------------------------------------------------------------------------------------


def test_spatial_attention_fused_matches_plain():
    torch.manual_seed(1)
    attn = SpatialAttention(24, 2).eval()
    x = torch.randn(3, 7, 24)
    key_mask = torch.rand(3, 7) > 0.4
    key_mask[:, 0] = True
    fused = attn(x, key_mask)
    attn.fused = False
    torch.testing.assert_close(attn(x, key_mask), fused, atol=1e-6, rtol=1e-5)
    _, w = attn(x, key_mask, need_weights=True)
    assert torch.all(w[:, :, :, ~key_mask[0]][0] == 0)


def test_diffusion_attention_plain_path_matches_sdpa():
    torch.manual_seed(2)
    attn = DiffusionAttention(24, 2, drope=False).eval()
    x = torch.randn(2, 5, 4, 24)
    lay = TokenLayout.full(2, 5, (2, 2, 1))
    d = torch.rand(2, 5, 5)
    fused = attn(x, lay, d)
    attn.fused = False
    torch.testing.assert_close(attn(x, lay, d), fused, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("drope", [True, False])
def test_masked_diffusion_attention_matches_per_position_loop(drope):
    """With a spatial mask, attention at each patch position runs over exactly the volumes visible there: compare
    with the module run position by position on only those tokens (and the matching distance sub-matrix)."""
    torch.manual_seed(3)
    attn = DiffusionAttention(24, 2, drope=drope).eval()
    B, V, grid = 2, 6, (2, 2, 1)
    keep = spatial_mask(B, V, 4, generator=torch.Generator().manual_seed(4))  # 1 patch of 4 per volume
    lay = TokenLayout.from_keep(keep, grid)
    x = torch.randn(B, V, 1, 24)
    bvals, bvecs = protocol(B, V, seed=5)
    d = drope_distance(bvals, bvecs)
    out = attn(x, lay, d)
    for b in range(B):
        for p in range(4):
            vols = torch.nonzero(keep[b, :, p])[:, 0]
            if len(vols) == 0:
                continue
            tokens = x[b, vols][None]  # (1, n, 1, D)
            ref = attn(tokens, TokenLayout.full(1, len(vols), (1, 1, 1)), d[b][vols][:, vols][None])
            torch.testing.assert_close(out[b, vols, 0], ref[0, :, 0], atol=1e-5, rtol=1e-5)


def test_padded_spatial_attention_matches_unpadded():
    torch.manual_seed(6)
    attn = SpatialAttention(24, 2).eval()
    x = torch.randn(1, 6, 24)
    key_mask = torch.tensor([[True, True, False, True, False, True]])
    ref = attn(x[:, key_mask[0]])
    torch.testing.assert_close(attn(x, key_mask)[:, key_mask[0]], ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# model behaviour
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drope", [True, False])
def test_volume_order_equivariance(drope):
    model = make_model(drope=drope)
    x, bvals, bvecs = data(2, 7)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    spatial = spatial_mask(2, 7, P, generator=torch.Generator().manual_seed(0))
    diffusion = diffusion_mask(2, 7, P, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k in (None, spatial, diffusion):
            kp = None if k is None else k[:, perm]
            enc = model.forward_encoder(x, bvals, bvecs, k)
            enc_p = model.forward_encoder(x[:, perm], bvals[:, perm], bvecs[:, perm], kp)
            torch.testing.assert_close(enc_p.cls, enc.cls, atol=1e-5, rtol=1e-5)
            rec = model.forward_decoder(enc, bvals, bvecs)
            rec_p = model.forward_decoder(enc_p, bvals[:, perm], bvecs[:, perm])
            torch.testing.assert_close(rec_p, rec[:, perm], atol=1e-5, rtol=1e-5)


def test_protocol_matters_only_with_drope_when_code_is_fixed():
    """All-b0 protocol: every distance is 0, so D-RoPE on and off give the same outputs with the same weights;
    a multi-shell protocol makes them differ."""
    on = make_model(drope=True)
    off = DRoPEMAE(model_config("tiny", drope=False)).eval()
    off.load_state_dict(on.state_dict())
    x, bvals, bvecs = data(1, 5)
    zero_b, zero_g = torch.zeros_like(bvals), torch.zeros_like(bvecs)
    with torch.no_grad():
        same = off.reconstruct(x, zero_b, zero_g)
        torch.testing.assert_close(on.reconstruct(x, zero_b, zero_g), same, atol=1e-5, rtol=1e-5)
        assert (on.encode(x, bvals, bvecs) - off.encode(x, bvals, bvecs)).abs().max() > 1e-4


@pytest.mark.parametrize("V", [1, 7, 15, 90])
def test_any_number_of_volumes(V):
    model = make_model()
    shape = (8, 8, 4) if V == 90 else SHAPE
    x, bvals, bvecs = data(2, V, shape=shape)
    n_patches = math.prod(model.grid_of(shape))
    with torch.no_grad():
        out = model(x, bvals, bvecs, diffusion_mask(2, V, n_patches, generator=torch.Generator().manual_seed(V)), 0.5)
        assert out.pred.shape == x.shape and torch.isfinite(out.loss)
        assert torch.all(out.pred >= 0)  # final ReLU
        assert model.encode(x, bvals, bvecs).shape == (2, TINY.embed_dim)


def test_other_fields_of_view_and_eval_determinism():
    model = make_model(dropout=0.3)
    x, bvals, bvecs = data(1, 4, shape=(24, 16, 12))
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x, bvals, bvecs), model.reconstruct(x, bvals, bvecs))
        model.train()
        assert not torch.equal(model.reconstruct(x, bvals, bvecs), model.reconstruct(x, bvals, bvecs))  # dropout on


def test_keep_none_encodes_everything():
    model = make_model()
    x, bvals, bvecs = data(2, 3)
    with torch.no_grad():
        enc = model.forward_encoder(x, bvals, bvecs)
        enc_all = model.forward_encoder(x, bvals, bvecs, torch.ones(2, 3, P, dtype=torch.bool))
    assert enc.tokens.shape == (2, 3, P, TINY.embed_dim)
    torch.testing.assert_close(enc.cls, enc_all.cls, atol=0, rtol=0)


@pytest.mark.parametrize("mask_kind", ["spatial", "diffusion", "irregular"])
def test_encoder_sees_only_visible_patches(mask_kind):
    model = make_model()
    B, V = 2, 6
    x, bvals, bvecs = data(B, V)
    gen = torch.Generator().manual_seed(3)
    if mask_kind == "spatial":
        keep = spatial_mask(B, V, P, generator=gen)
    elif mask_kind == "diffusion":
        keep = diffusion_mask(B, V, P, generator=gen)
    else:
        keep = torch.rand(B, V, P, generator=gen) > 0.6
        keep[:, 0, 0] = True
    vox_keep = patch_map_to_voxels(keep.float(), SHAPE, (8, 8, 4)).bool()
    noisy = torch.where(vox_keep, x, torch.rand(x.shape, generator=gen) * 5)  # change only removed patches
    with torch.no_grad():
        enc, enc_noisy = model.forward_encoder(x, bvals, bvecs, keep), model.forward_encoder(noisy, bvals, bvecs, keep)
        torch.testing.assert_close(enc_noisy.cls, enc.cls, atol=1e-6, rtol=1e-6)
        rec = model.forward_decoder(enc, bvals, bvecs)
        torch.testing.assert_close(model.forward_decoder(enc_noisy, bvals, bvecs), rec, atol=1e-6, rtol=1e-6)
        changed = torch.where(vox_keep, x + 1.0, x)  # change the visible patches: the code must move
        assert (model.forward_encoder(changed, bvals, bvecs, keep).cls - enc.cls).abs().max() > 1e-4


def test_loss_formula_by_hand():
    model = make_model()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, *SHAPE, generator=gen)
    pred = torch.rand(2, 3, *SHAPE, generator=gen)
    keep = fixed_ratio_spatial_mask(2, 3, P, 0.75, generator=gen)
    xn, pn, kn = x.numpy(), pred.numpy(), keep.numpy()
    visible_sq, masked_sq = [], []
    for b in range(2):
        for v in range(3):
            for p in range(P):
                gx, rest = divmod(p, 4)
                gy, gz = divmod(rest, 2)
                sl = (b, v, slice(8 * gx, 8 * gx + 8), slice(8 * gy, 8 * gy + 8), slice(4 * gz, 4 * gz + 4))
                sq = ((pn[sl] - xn[sl]) ** 2).ravel()
                (visible_sq if kn[b, v, p] else masked_sq).extend(sq.tolist())
    lam = 0.3
    loss, lv, lm = model.forward_loss(x, pred, keep, lam)
    assert lv.item() == pytest.approx(np.mean(visible_sq), rel=1e-5)
    assert lm.item() == pytest.approx(np.mean(masked_sq), rel=1e-5)
    assert loss.item() == pytest.approx((1 - lam) * np.mean(visible_sq) + lam * np.mean(masked_sq), rel=1e-5)
    loss, lv, lm = model.forward_loss(x, pred, None, lam)  # nothing masked: the masked term is 0
    assert lm.item() == 0 and loss.item() == pytest.approx((1 - lam) * lv.item())


def test_forward_output_unpacks():
    model = make_model()
    x, bvals, bvecs = data(1, 4)
    keep = spatial_mask(1, 4, P, generator=torch.Generator().manual_seed(5))
    out = model(x, bvals, bvecs, keep, 0.5)
    assert isinstance(out, MAEOutput)
    loss, pred = out
    assert loss is out.loss and pred is out.pred and pred.shape == x.shape
    torch.testing.assert_close(loss, 0.5 * out.loss_visible + 0.5 * out.loss_masked)
    loss.backward()
    assert model.cls_token.grad is not None and model.conv_head.net[0].weight.grad is not None


def test_attention_maps():
    model = make_model()
    x, bvals, bvecs = data(2, 5)
    maps = model.attention_maps(x, bvals, bvecs)
    assert maps["spatial"].shape == (2, 5, P) and maps["diffusion"].shape == (2, 5, 5)
    torch.testing.assert_close(maps["cls"], model.encode(x, bvals, bvecs))  # the latent of the same pass
    torch.testing.assert_close(maps["diffusion"].sum(-1), torch.ones(2, 5))
    assert torch.all(maps["spatial"] > 0) and torch.all(maps["spatial"].sum(-1) < 1)  # the rest is CLS -> CLS
    keep = diffusion_mask(2, 5, P, generator=torch.Generator().manual_seed(6))
    maps = model.attention_maps(x, bvals, bvecs, keep)
    held = keep.any(-1)
    assert torch.all(maps["spatial"][~keep] == 0) and torch.all(maps["spatial"][keep] > 0)
    torch.testing.assert_close(maps["diffusion"].sum(-1), held.float())
    keep = spatial_mask(2, 5, P, generator=torch.Generator().manual_seed(7))
    maps = model.attention_maps(x, bvals, bvecs, keep)
    assert torch.all(maps["spatial"][~keep] == 0)
    torch.testing.assert_close(maps["diffusion"].sum(-1), torch.ones(2, 5))


def test_input_errors():
    model = make_model()
    x, bvals, bvecs = data(1, 3)
    with pytest.raises(ModelInputError, match="bvals"):
        model.encode(x, bvals[:, :2], bvecs)
    with pytest.raises(ModelInputError, match="keep"):
        model(x, bvals, bvecs, torch.ones(1, 3, P), 0.5)
    with pytest.raises(ModelInputError, match="at least one"):
        model(x, bvals, bvecs, torch.zeros(1, 3, P, dtype=torch.bool), 0.5)
    with pytest.raises(ModelInputError, match=r"\(B, V, X, Y, Z\)"):
        model.encode(x[0], bvals, bvecs)


# ---------------------------------------------------------------------------------------------------------
# checkpoints and device
# ---------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = make_model(seed=3)
    x, bvals, bvecs = data(1, 4)
    folder = save_model(model, tmp_path / "ckpt", extra={"epoch": 7})
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["extra"] == {"epoch": 7} and meta["config"]["embed_dim"] == 48
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]  # no temp files left
    with torch.no_grad():
        ref = model.reconstruct(x, bvals, bvecs)
        for path in (folder, folder / "model.safetensors", folder / "model.json"):
            loaded = load_model(path)
            assert not loaded.training and loaded.config == model.config
            assert torch.equal(loaded.reconstruct(x, bvals, bvecs), ref)


def test_checkpoint_errors(tmp_path):
    folder = save_model(make_model(), tmp_path / "c")
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_model(folder)
    (folder / "model.json").write_text(json.dumps({**meta, "config": {**meta["config"], "depth_x": 1}}))
    with pytest.raises(CheckpointError, match="depth_x"):
        load_model(folder)
    (folder / "model.json").write_text(json.dumps({**meta, "config": {**meta["config"], "depth": 3}}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(folder)
    with pytest.raises(TypeError):
        save_model(make_model(), tmp_path / "d", extra={"bad": object()})
    assert not (tmp_path / "d" / "model.json").exists()


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            select_device("cuda")


# ---------------------------------------------------------------------------------------------------------
# training sanity on a real DWI slab
# ---------------------------------------------------------------------------------------------------------


def load_slab(sample_dir):
    folder = sample_dir  # the bundled Canon oblique scan
    dwi = nib.load(folder / "dwi.nii.gz").get_fdata(dtype=np.float32)  # (80, 80, 40, 13)
    bvals = np.loadtxt(folder / "dwi.bval")
    bvecs = np.loadtxt(folder / "dwi.bvec").T
    mask = nib.load(folder / "brain_mask.nii.gz").get_fdata() > 0
    cx, cy, cz = np.argwhere(mask).mean(0).astype(int)
    crop = dwi[cx - 16 : cx + 16, cy - 16 : cy + 16, cz - 4 : cz + 4]  # 32 x 32 x 8 inside the brain
    b0 = crop[..., bvals < 50].mean(-1, keepdims=True)
    signal = np.clip(crop / np.maximum(b0, 1e-3), 0.0, 1.5) * (b0 > 1e-3)
    norms = np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs = np.where(norms > 0, bvecs / np.maximum(norms, 1e-12), 0.0)
    x = torch.tensor(np.moveaxis(signal, -1, 0))[None]  # (1, 13, 32, 32, 8)
    return x, torch.tensor(bvals, dtype=torch.float32)[None], torch.tensor(bvecs, dtype=torch.float32)[None]


@pytest.mark.slow
def test_training_reduces_masked_loss(sample_dir):
    x, bvals, bvecs = load_slab(sample_dir)
    assert x.shape == (1, 13, 32, 32, 8) and 0.2 < float(x.mean()) < 1.0
    model = make_model(seed=0, conv_channels=4)  # a lighter conv head: 3-D convs with few channels are slow on CPU
    P_slab = 4 * 4 * 2
    eval_keep = fixed_ratio_spatial_mask(1, 13, P_slab, 0.75, generator=torch.Generator().manual_seed(123))

    def masked_loss():
        model.eval()
        with torch.no_grad():
            return model(x, bvals, bvecs, eval_keep, 1.0).loss_masked.item()

    start = masked_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.process_time()  # CPU time of this single-threaded loop: robust to other processes on the machine
    for step in range(200):
        model.train()
        strategy = spatial_mask if step % 2 == 0 else diffusion_mask  # alternating
        keep = strategy(1, 13, P_slab, generator=gen)
        out = model(x, bvals, bvecs, keep, 0.75)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    end = masked_loss()
    assert end < 0.6 * start, (start, end)
    # and it uses context: better than predicting each volume's mean visible signal in its removed patches
    visible = patch_map_to_voxels(eval_keep.float(), (32, 32, 8), (8, 8, 4)).bool()
    volume_mean = (x * visible).sum(dim=(2, 3, 4), keepdim=True) / visible.sum(dim=(2, 3, 4), keepdim=True)
    baseline = ((volume_mean - x) ** 2)[~visible].mean().item()
    assert end < 0.95 * baseline, (end, baseline)
    assert time.process_time() - t0 < 60
