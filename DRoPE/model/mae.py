"""The D-RoPE masked autoencoder for diffusion MRI (Chau et al.), MAE style.

Shape letters: B batch, V volumes, (X, Y, Z) voxels, P patches per volume, D width, H heads, E head dim.
Inputs everywhere:
    x: (B, V, X, Y, Z) float32 b0-normalised signal; X, Y, Z multiples of ``patch_size``.
    bvals: (B, V) s/mm^2 (b < 50 is b0). bvecs: (B, V, 3) unit, zero rows for b0. Each batch element may have
        its own protocol; any V >= 1.
    keep: (B, V, P) bool, True = visible (given to the encoder), False = removed; None = all visible.

Data flow: patchify -> embed (patch + position) -> mask (only visible tokens enter) -> forward_encoder ->
forward_decoder -> forward_loss; ``forward`` is the chain. One encoder "block" is a diffusion sub-block (attention
across volumes at a patch position, D-RoPE on) followed by a spatial sub-block (attention across the patches of a
volume plus a CLS token); ``depth`` counts these pairs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .drope import DEFAULT_BASE, drope_distance
from .heads import ConvHead, CopyHead
from .layers import DualBlock, TokenLayout, qspace_coordinates, sincos_3d, spatial_sequence, split_spatial_sequence

HEADS = ("conv", "copy")


class ModelConfigError(ValueError):
    """Invalid or unknown model configuration."""


class ModelInputError(ValueError):
    """Model inputs with wrong shapes or sizes."""


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of ``DRoPEMAE`` (defaults: paper Table 5). JSON-safe through ``dataclasses.asdict``.

    Attributes:
        patch_size: (px, py, pz) voxels per patch.
        embed_dim: encoder width D (divisible by 12 for the 3-D sinusoidal code, and by num_heads).
        depth: encoder blocks (each = diffusion sub-block + spatial sub-block).
        num_heads: encoder heads (D / heads even for D-RoPE).
        decoder_embed_dim, decoder_depth, decoder_num_heads: the same for the decoder.
        mlp_ratio, decoder_mlp_ratio: MLP hidden width / width.
        conv_channels: channels of the 3-D convolutional head (1 -> c -> c -> 1).
        head: output head, "conv" (the paper's: linear patch head + 3-D convolutions) or "copy" (beyond the
            paper: a learned weighting of the visible volumes at the same position, see ``heads.CopyHead``).
        drope: D-RoPE in the diffusion attention (False = the paper's plain "MAE" ablation).
        drope_base: D-RoPE frequency base, theta_n = base^(-2n/E).
        dropout: projection / MLP dropout (training only).
    """

    patch_size: tuple[int, int, int] = (8, 8, 4)
    embed_dim: int = 384
    depth: int = 10
    num_heads: int = 3
    decoder_embed_dim: int = 384
    decoder_depth: int = 3
    decoder_num_heads: int = 3
    mlp_ratio: float = 4.0
    decoder_mlp_ratio: float = 1.0
    conv_channels: int = 8
    head: str = "conv"
    drope: bool = True
    drope_base: float = DEFAULT_BASE
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ModelConfigError(f"patch_size must be three positive ints, got {self.patch_size}")
        for name, dim, heads in (
            ("embed_dim", self.embed_dim, self.num_heads),
            ("decoder_embed_dim", self.decoder_embed_dim, self.decoder_num_heads),
        ):
            if dim % 12:
                raise ModelConfigError(f"{name}={dim} must be divisible by 12 (3-D sinusoidal code + q-space code)")
            if heads < 1 or dim % heads or (dim // heads) % 2:
                raise ModelConfigError(f"{name}={dim} with {heads} heads needs an even head dim")
        if self.head not in HEADS:
            raise ModelConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.depth < 1 or self.decoder_depth < 1:
            raise ModelConfigError("depth and decoder_depth must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.drope_base <= 0:
            raise ModelConfigError(f"drope_base must be > 0, got {self.drope_base}")

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Rebuild from ``dataclasses.asdict`` output (e.g. read from JSON); unknown keys raise ModelConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(
                f"unknown model config keys {unknown}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**data)


PRESETS: dict[str, dict] = {
    "paper": {},
    "tiny": dict(
        embed_dim=48, depth=2, num_heads=2, decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=2
    ),
}


def model_config(name: str = "paper", **overrides) -> ModelConfig:
    """A named preset ("paper" = Table 5 defaults, "tiny" for tests) with keyword overrides."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


def mask_lambda(epoch: int, total_epochs: int, start: float = 0.05, end: float = 0.95) -> float:
    """Weight of the masked-patch loss: linear from ``start`` at epoch 0 to ``end`` at epoch total_epochs - 1.

    Epochs outside [0, total_epochs - 1] are clamped; with one epoch the value is ``start``.
    """
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    if total_epochs == 1:
        return float(start)
    t = min(max(epoch, 0), total_epochs - 1) / (total_epochs - 1)
    return float(start + (end - start) * t)


# ---------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------


class EncoderOutput(NamedTuple):
    """cls: (B, D) CLS latent; tokens: (B, Vk, Pk, D) visible tokens; layout: where they sit in (B, V, P);
    patches: (B, V, P, N) the input patches, zero where hidden; visible: (B, V, P) bool, True = shown."""

    cls: torch.Tensor
    tokens: torch.Tensor
    layout: TokenLayout
    patches: torch.Tensor
    visible: torch.Tensor


class MAEOutput(tuple):
    """Result of ``DRoPEMAE.forward``: unpacks as ``loss, pred = out``; also ``out.loss_visible`` / ``out.loss_masked``.

    loss: () total loss; pred: (B, V, X, Y, Z); loss_visible / loss_masked: () parts (see ``forward_loss``).
    """

    def __new__(cls, loss, pred, loss_visible, loss_masked):
        out = super().__new__(cls, (loss, pred))
        out.loss_visible = loss_visible
        out.loss_masked = loss_masked
        return out

    @property
    def loss(self) -> torch.Tensor:
        return self[0]

    @property
    def pred(self) -> torch.Tensor:
        return self[1]


def patch_map_to_voxels(patch_map: torch.Tensor, grid, patch) -> torch.Tensor:
    """Broadcast a per-patch map to voxels: (B, V, P) -> (B, V, X, Y, Z).

    grid: (X, Y, Z) voxels (multiples of ``patch``); patch: (px, py, pz). Patches in C order (as ``patchify``).
    """
    X, Y, Z = (int(s) for s in grid)
    px, py, pz = (int(s) for s in patch)
    if X % px or Y % py or Z % pz:
        raise ModelInputError(f"grid {tuple(grid)} is not a multiple of the patch size {tuple(patch)}")
    gx, gy, gz = X // px, Y // py, Z // pz
    B, V, P = patch_map.shape
    if P != gx * gy * gz:
        raise ModelInputError(f"map has {P} patches but grid {tuple(grid)} / patch {tuple(patch)} has {gx * gy * gz}")
    m = patch_map.reshape(B, V, gx, 1, gy, 1, gz, 1).expand(B, V, gx, px, gy, py, gz, pz)
    return m.reshape(B, V, X, Y, Z)


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------


class DRoPEMAE(nn.Module):
    """Masked autoencoder over (volume, patch) tokens with D-RoPE diffusion attention.

    Args:
        config: the architecture (``ModelConfig``; see ``model_config`` for presets).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, Dd = config.embed_dim, config.decoder_embed_dim
        patch_voxels = math.prod(config.patch_size)
        block = dict(drope=config.drope, drope_base=config.drope_base, dropout=config.dropout)

        # --- encoder specifics ---
        self.patch_embed = nn.Linear(patch_voxels, D)
        self.qspace_embed = nn.Linear(3, D // 2)  # learned code of (rho, theta, phi); the other D/2 are sin-cos
        self.cls_token = nn.Parameter(torch.zeros(1, D))
        self.blocks = nn.ModuleList(
            DualBlock(D, config.num_heads, mlp_ratio=config.mlp_ratio, **block) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D)

        # --- decoder specifics ---
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, Dd))
        self.decoder_qspace_embed = nn.Linear(3, Dd // 2)
        self.decoder_blocks = nn.ModuleList(
            DualBlock(Dd, config.decoder_num_heads, mlp_ratio=config.decoder_mlp_ratio, **block)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(Dd)
        if config.head == "copy":
            self.copy_head = CopyHead(Dd, patch_voxels, use_distance=config.drope)
        else:
            self.decoder_pred = nn.Linear(Dd, patch_voxels)
            self.conv_head = ConvHead(config.conv_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE initialisation: xavier-uniform linears, zero biases, unit LayerNorms, N(0, 0.02) tokens; the copy
        head then starts as the shell mean."""
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.head == "copy":
            self.copy_head.reset_parameters()

    # --- patches ---------------------------------------------------------------------------------------

    def grid_of(self, spatial) -> tuple[int, int, int]:
        """(X, Y, Z) voxels -> (gx, gy, gz) patches; raises ModelInputError if not a multiple of the patch size."""
        pairs = list(zip(spatial, self.config.patch_size))
        if len(pairs) != 3 or any(s % p or s < p for s, p in pairs):
            raise ModelInputError(
                f"spatial size {tuple(spatial)} must be a (non-zero) multiple of the patch size "
                f"{self.config.patch_size}; crop or pad the volume"
            )
        return tuple(s // p for s, p in pairs)

    def num_patches(self, spatial) -> int:
        """P, the patches per volume of a (X, Y, Z) field of view (what masks need: ``MASKING[name](B, V, P)``)."""
        return math.prod(self.grid_of(spatial))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, V, X, Y, Z) -> (B, V, P, px*py*pz); patches in C order of (gx, gy, gz), voxels in C order."""
        B, V = x.shape[:2]
        gx, gy, gz = self.grid_of(x.shape[2:])
        px, py, pz = self.config.patch_size
        x = x.reshape(B, V, gx, px, gy, py, gz, pz).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return x.reshape(B, V, gx * gy * gz, px * py * pz)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """patches (B, V, P, px*py*pz), grid (gx, gy, gz) -> (B, V, X, Y, Z). Inverse of ``patchify``."""
        B, V = patches.shape[:2]
        gx, gy, gz = grid
        px, py, pz = self.config.patch_size
        x = patches.reshape(B, V, gx, gy, gz, px, py, pz).permute(0, 1, 2, 5, 3, 6, 4, 7)
        return x.reshape(B, V, gx * px, gy * py, gz * pz)

    # --- embedding -------------------------------------------------------------------------------------

    def position_code(self, qspace_embed: nn.Linear, layout: TokenLayout, bvals, bvecs) -> torch.Tensor:
        """(B, Vk, Pk, W) = [3-D sin-cos of the patch centre (W/2) | learned code of (rho, theta, phi) (W/2)]."""
        width = 2 * qspace_embed.out_features
        B, Vk, Pk = layout.patch_idx.shape
        spatial = sincos_3d(layout.grid, width // 2, device=bvals.device)
        spatial = torch.cat((spatial, spatial.new_zeros(1, width // 2)))  # dummy row for padding tokens
        coords = qspace_coordinates(bvals, bvecs).gather(1, layout.vol_idx[..., None].expand(B, Vk, 3))
        qcode = qspace_embed(coords)[:, :, None, :].expand(B, Vk, Pk, width // 2)
        return torch.cat((spatial[layout.patch_idx], qcode), dim=-1)

    def embed(self, x: torch.Tensor, bvals, bvecs, layout: TokenLayout) -> torch.Tensor:
        """Visible tokens: x (B, V, X, Y, Z) -> (B, Vk, Pk, D) = Linear(patch voxels) + position code."""
        patches = self.patchify(x)  # (B, V, P, p)
        B, Vk, Pk = layout.patch_idx.shape
        p = patches.shape[-1]
        if layout.dense:
            patches = patches.gather(1, layout.vol_idx[:, :, None, None].expand(B, Vk, Pk, p))
        else:
            padded = torch.cat((patches, patches.new_zeros(B, patches.shape[1], 1, p)), dim=2)
            rows = padded.gather(1, layout.vol_idx[:, :, None, None].expand(B, Vk, padded.shape[2], p))
            patches = rows.gather(2, layout.patch_idx[..., None].expand(B, Vk, Pk, p))
        return self.patch_embed(patches) + self.position_code(self.qspace_embed, layout, bvals, bvecs)

    def layout_for(self, x: torch.Tensor, keep: torch.Tensor | None) -> TokenLayout:
        """The token layout of the visible patches of x (B, V, X, Y, Z) under keep (B, V, P) or None (all)."""
        B, V = x.shape[:2]
        grid = self.grid_of(x.shape[2:])
        if keep is None:
            return TokenLayout.full(B, V, grid, x.device)
        if keep.shape != (B, V, math.prod(grid)) or keep.dtype != torch.bool:
            raise ModelInputError(
                f"keep must be bool (B, V, P) = {(B, V, math.prod(grid))} (True = visible), "
                f"got {keep.dtype} {tuple(keep.shape)}"
            )
        if not bool(keep.flatten(1).any(1).all()):
            raise ModelInputError("keep hides every patch of some batch element; keep at least one (True = visible)")
        return TokenLayout.from_keep(keep.to(x.device), grid)

    # --- encoder / decoder -----------------------------------------------------------------------------

    def forward_encoder(self, x, bvals, bvecs, keep=None) -> EncoderOutput:
        """Encode the visible patches. x (B, V, X, Y, Z); keep (B, V, P) True = visible, None = all visible.

        Returns EncoderOutput(cls (B, D), tokens (B, Vk, Pk, D), layout, patches, visible); cls and tokens after
        the final LayerNorm.
        """
        bvals, bvecs = self._check_inputs(x, bvals, bvecs)
        layout = self.layout_for(x, keep)
        tokens = self.embed(x, bvals, bvecs, layout)
        distance = self._distance(bvals, bvecs, layout.vol_idx)
        cls = self.cls_token.expand(x.shape[0], -1)
        for blk in self.blocks:
            cls, tokens = blk(cls, tokens, layout, distance)
        B, V = x.shape[:2]
        visible = torch.ones(B, V, layout.n_patches, dtype=torch.bool, device=x.device) if keep is None else keep
        patches = self.patchify(x) * visible[..., None]
        return EncoderOutput(self.norm(cls), self.norm(tokens), layout, patches, visible)

    def forward_decoder(self, encoded: EncoderOutput, bvals, bvecs) -> torch.Tensor:
        """Reconstruct every patch of every volume. Returns pred (B, V, X, Y, Z) (>= 0 with the conv head)."""
        layout = encoded.layout
        bvals = torch.as_tensor(bvals, device=encoded.tokens.device, dtype=encoded.tokens.dtype)
        bvecs = torch.as_tensor(bvecs, device=encoded.tokens.device, dtype=encoded.tokens.dtype)
        B, V = bvals.shape
        full = TokenLayout.full(B, V, layout.grid, bvals.device)
        x = self.unmask(self.decoder_embed(encoded.tokens), layout, V)  # (B, V, P, Dd)
        x = x + self.position_code(self.decoder_qspace_embed, full, bvals, bvecs)
        cls = self.decoder_embed(encoded.cls)
        distance = self._distance(bvals, bvecs, full.vol_idx)
        for blk in self.decoder_blocks:
            cls, x = blk(cls, x, full, distance)
        features = self.decoder_norm(x)  # (B, V, P, Dd)
        if self.config.head == "copy":
            patches = self.copy_head(features, encoded.patches, encoded.visible, bvals, distance)
            return self.unpatchify(patches, layout.grid)
        patches = self.decoder_pred(features)  # (B, V, P, px*py*pz)
        return self.conv_head(self.unpatchify(patches, layout.grid))

    def unmask(self, tokens: torch.Tensor, layout: TokenLayout, V: int) -> torch.Tensor:
        """Visible tokens (B, Vk, Pk, Dd) -> full grid (B, V, P, Dd) with the mask token at every removed patch."""
        B, _, _, Dd = tokens.shape
        P = layout.n_patches
        grid = self.mask_token.to(tokens.dtype).expand(B, V, P + 1, Dd).clone()  # patch P: dummy for padding
        rows = torch.arange(B, device=tokens.device)[:, None, None]
        grid[rows, layout.vol_idx[:, :, None], layout.patch_idx] = tokens
        return grid[:, :, :P]

    def forward_loss(self, x, pred, keep, mask_lambda: float, brain=None):
        """Weighted reconstruction loss. x, pred (B, V, X, Y, Z); keep (B, V, P) True = visible (None = all);
        brain (B, X, Y, Z) bool, the voxels that count (None = all).

        loss = (1 - lambda) * MSE over the (brain) voxels of visible patches + lambda * MSE over the (brain) voxels
        of removed patches; a term with no voxel is 0. Returns (loss, loss_visible, loss_masked), each 0-d.
        """
        squared = (self.patchify(pred) - self.patchify(x)) ** 2  # (B, V, P, N)
        if brain is None:
            error, count = squared.sum(-1), torch.full_like(squared[..., 0], squared.shape[-1])
        else:
            weight = self.patchify(brain[:, None].to(squared.dtype))  # (B, 1, P, N)
            error, count = (squared * weight).sum(-1), weight.sum(-1).expand_as(squared[..., 0])
        visible = torch.ones_like(error) if keep is None else keep.to(error.dtype)
        removed = 1.0 - visible
        loss_visible = (error * visible).sum() / (count * visible).sum().clamp_min(1.0)
        loss_masked = (error * removed).sum() / (count * removed).sum().clamp_min(1.0)
        loss = (1.0 - mask_lambda) * loss_visible + mask_lambda * loss_masked
        return loss, loss_visible, loss_masked

    def forward(self, x, bvals, bvecs, keep=None, mask_lambda: float = 0.5, brain=None) -> MAEOutput:
        """x (B, V, X, Y, Z), bvals (B, V), bvecs (B, V, 3), keep (B, V, P) True = visible (None = all), brain
        (B, X, Y, Z) bool voxels scored by the loss (None = all).

        Returns MAEOutput; ``loss, pred = model(...)`` unpacks (loss (), pred (B, V, X, Y, Z)), and the parts are
        ``out.loss_visible`` / ``out.loss_masked``.
        """
        encoded = self.forward_encoder(x, bvals, bvecs, keep)
        pred = self.forward_decoder(encoded, bvals, bvecs)
        loss, loss_visible, loss_masked = self.forward_loss(x, pred, keep, mask_lambda, brain)
        return MAEOutput(loss, pred, loss_visible, loss_masked)

    # --- user-facing -----------------------------------------------------------------------------------

    def encode(self, x, bvals, bvecs) -> torch.Tensor:
        """CLS latent of the whole input (nothing masked): (B, D). Invariant to the order of the volumes."""
        return self.forward_encoder(x, bvals, bvecs, None).cls

    def reconstruct(self, x, bvals, bvecs, keep=None) -> torch.Tensor:
        """Predicted signal of every patch (visible ones included, not pasted back): (B, V, X, Y, Z)."""
        return self.forward_decoder(self.forward_encoder(x, bvals, bvecs, keep), bvals, bvecs)

    def synthesize(self, x, bvals, bvecs, query_bvals, query_bvecs, *, chunk: int = 1) -> torch.Tensor:
        """Predict volumes at (b, g) that were not acquired, from every acquired volume.

        x (B, V, X, Y, Z) acquired, all visible; bvals (B, V), bvecs (B, V, 3); query_bvals (B, K), query_bvecs
        (B, K, 3) unit. Returns (B, K, X, Y, Z). The encoder runs once on x; the decoder then runs on the V
        acquired tokens plus ``chunk`` queries appended as fully hidden volumes (mask token + their q-space code),
        so with chunk=1 a query's prediction does not depend on the other queries. Equal to ``reconstruct`` of
        [x, 0] with the appended volumes hidden in every patch (``keep`` False).
        """
        bvals, bvecs = self._check_inputs(x, bvals, bvecs)
        query_bvals = torch.as_tensor(query_bvals, device=x.device, dtype=x.dtype)
        query_bvecs = torch.as_tensor(query_bvecs, device=x.device, dtype=x.dtype)
        B, V = x.shape[:2]
        K = query_bvals.shape[1] if query_bvals.dim() == 2 else -1
        if query_bvals.shape != (B, K) or query_bvecs.shape != (B, K, 3) or chunk < 1:
            raise ModelInputError(
                f"query_bvals must be (B, K) and query_bvecs (B, K, 3) with B = {B}, and chunk >= 1; got "
                f"{tuple(query_bvals.shape)}, {tuple(query_bvecs.shape)}, chunk {chunk}"
            )
        encoded = self.forward_encoder(x, bvals, bvecs, None)
        out = []
        for start in range(0, K, chunk):
            qb, qg = query_bvals[:, start : start + chunk], query_bvecs[:, start : start + chunk]
            k = qb.shape[1]
            hidden = encoded.patches.new_zeros(B, k, *encoded.patches.shape[2:])
            extended = encoded._replace(
                patches=torch.cat((encoded.patches, hidden), 1),
                visible=torch.cat((encoded.visible, encoded.visible.new_zeros(B, k, encoded.visible.shape[2])), 1),
            )
            pred = self.forward_decoder(extended, torch.cat((bvals, qb), 1), torch.cat((bvecs, qg), 1))
            out.append(pred[:, V:])
        return torch.cat(out, 1) if out else x.new_zeros(B, 0, *x.shape[2:])

    @torch.no_grad()
    def attention_maps(self, x, bvals, bvecs, keep=None) -> dict[str, torch.Tensor]:
        """Attention of the last encoder block, averaged over heads, and the CLS latent of the same pass.

        Returns {"spatial": (B, V, P) CLS -> patch attention within each volume (0 for removed patches / volumes;
        a row sums to 1 minus the CLS -> CLS weight), "diffusion": (B, V, V) query volume -> key volume attention
        averaged over the patch positions where the query is visible (rows sum to 1; 0 rows / columns for volumes
        not held), "cls": (B, D) the latent (``encode`` when keep is None)}. ``patch_map_to_voxels`` turns the
        spatial map into an overlay.
        """
        bvals, bvecs = self._check_inputs(x, bvals, bvecs)
        layout = self.layout_for(x, keep)
        tokens = self.embed(x, bvals, bvecs, layout)
        distance = self._distance(bvals, bvecs, layout.vol_idx)
        cls = self.cls_token.expand(x.shape[0], -1)
        for blk in self.blocks[:-1]:
            cls, tokens = blk(cls, tokens, layout, distance)
        last = self.blocks[-1]
        _, w_diff = last.diffusion.attn(last.diffusion.norm1(tokens), layout, distance, need_weights=True)
        tokens = last.diffusion(tokens, layout=layout, distance=distance)
        seq = spatial_sequence(cls, tokens)
        _, w_spat = last.spatial.attn(last.spatial.norm1(seq), layout.spatial_key_mask, need_weights=True)
        cls, _ = split_spatial_sequence(last.spatial(seq, key_mask=layout.spatial_key_mask), tokens.shape, layout)
        return {
            "spatial": self._spatial_map(w_spat, layout, x.shape[1]),
            "diffusion": self._diffusion_map(w_diff, layout, x.shape[1]),
            "cls": self.norm(cls),
        }

    # --- helpers ---------------------------------------------------------------------------------------

    def _spatial_map(self, weights, layout: TokenLayout, V: int) -> torch.Tensor:
        """weights (B * Vk, H, 1 + Pk, 1 + Pk) -> (B, V, P): CLS row, heads averaged, scattered to patches."""
        B, Vk, Pk = layout.patch_idx.shape
        cls_row = weights[:, :, 0, 1:].mean(1).view(B, Vk, Pk)
        per_vol = cls_row.new_zeros(B, Vk, layout.n_patches + 1).scatter(2, layout.patch_idx, cls_row)
        out = cls_row.new_zeros(B, V, layout.n_patches)
        rows = torch.arange(B, device=out.device)[:, None]
        out[rows, layout.vol_idx] = per_vol[:, :, : layout.n_patches]
        return out

    def _diffusion_map(self, weights, layout: TokenLayout, V: int) -> torch.Tensor:
        """weights (B, P, H, Vk, Vk) -> (B, V, V): heads averaged, mean over positions where the query is visible."""
        B, Vk = layout.vol_idx.shape
        w = weights.mean(2)  # (B, P, Vk, Vk)
        if layout.dense:
            held = w.mean(1)
        else:
            query = layout.occupancy.to(w.dtype)  # (B, P, Vk)
            held = (w * query[..., None]).sum(1) / query.sum(1).clamp_min(1.0)[..., None]
        out = w.new_zeros(B, V, V)
        rows = torch.arange(B, device=w.device)[:, None, None]
        out[rows, layout.vol_idx[:, :, None], layout.vol_idx[:, None, :]] = held
        return out

    def _distance(self, bvals, bvecs, vol_idx) -> torch.Tensor:
        """q-space distances (B, Vk, Vk) between the held volumes ``vol_idx`` (B, Vk)."""
        B, Vk = vol_idx.shape
        b = bvals.gather(1, vol_idx)
        g = bvecs.gather(1, vol_idx[..., None].expand(B, Vk, 3))
        return drope_distance(b, g)

    def _check_inputs(self, x, bvals, bvecs):
        if x.dim() != 5:
            raise ModelInputError(f"x must be (B, V, X, Y, Z), got shape {tuple(x.shape)}")
        B, V = x.shape[:2]
        bvals = torch.as_tensor(bvals, device=x.device, dtype=x.dtype)
        bvecs = torch.as_tensor(bvecs, device=x.device, dtype=x.dtype)
        if bvals.shape != (B, V) or bvecs.shape != (B, V, 3):
            raise ModelInputError(
                f"bvals must be (B, V) = {(B, V)} and bvecs (B, V, 3); "
                f"got {tuple(bvals.shape)} and {tuple(bvecs.shape)}"
            )
        self.grid_of(x.shape[2:])
        return bvals, bvecs
