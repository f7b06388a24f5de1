"""Building blocks of the D-RoPE masked autoencoder: positional codes, token layout, attention, blocks.

Shape letters: B batch, V volumes, P patches per volume, D width, H heads, E head dim; Vk / Pk are the volumes /
tokens per volume that the encoder actually holds after masking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..gradients import B0_THRESHOLD
from .drope import DEFAULT_BASE, drope_attention

# ---------------------------------------------------------------------------------------------------------
# positional codes
# ---------------------------------------------------------------------------------------------------------


def sincos_3d(grid: tuple[int, int, int], dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 3-D sinusoidal code of patch centres. Returns (P, dim), P = gx * gy * gz in C order.

    Coordinates are patch-centre positions in patch units, (i + 0.5, j + 0.5, k + 0.5) for patch (i, j, k), so a
    patch gets the same code in any field of view that is a multiple of the patch size (training slab or whole
    brain). dim / 3 channels per axis (x, y, z in that order), each half sin, half cos at frequencies
    10000^(-m / (dim / 6)), m = 0..dim/6-1. dim must be a multiple of 6.
    """
    if dim % 6:
        raise ValueError(f"the 3-D sinusoidal code needs a width divisible by 6, got {dim}")
    per_axis = dim // 3
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64, device=device) / (per_axis // 2))
    axes = [torch.arange(n, dtype=torch.float64, device=device) + 0.5 for n in grid]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (P, 3)
    codes = []
    for axis in range(3):
        phase = centres[:, axis, None] * omega  # (P, dim/6)
        codes += [phase.sin(), phase.cos()]
    return torch.cat(codes, dim=-1).to(dtype)


SIGN_TOLERANCE = 1e-6  # gradient components smaller than this are treated as exactly 0 (table rounding noise)


def qspace_coordinates(bvals: torch.Tensor, bvecs: torch.Tensor) -> torch.Tensor:
    """Spherical q-space coordinates (rho, theta, phi) of each volume. bvals (B, V), bvecs (B, V, 3) -> (B, V, 3).

    rho = b / 1000. Components within ``SIGN_TOLERANCE`` of 0 are set to +0 first, so rounding noise in a table
    (1e-17 instead of 0) cannot flip a vector or move phi across its branch cut. The gradient sign is then
    canonicalised (g and -g encode the same diffusion): flip g when z < 0; when z == 0, flip when y < 0; when
    y == z == 0, flip when x < 0. Then theta = arccos(z) in [0, pi/2] and phi = atan2(y, x) in (-pi, pi].
    b0 volumes (b < 50) get theta = phi = 0.
    """
    g = bvecs / bvecs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = torch.where(g.abs() <= SIGN_TOLERANCE, torch.zeros_like(g), g)
    x, y, z = g.unbind(-1)
    flip = (z < 0) | ((z == 0) & (y < 0)) | ((z == 0) & (y == 0) & (x < 0))
    g = torch.where(flip[..., None], -g, g)
    x, y, z = g.unbind(-1)
    theta = torch.arccos(z.clamp(-1.0, 1.0))
    phi = torch.atan2(y, x)
    is_b0 = bvals < B0_THRESHOLD
    theta = theta.masked_fill(is_b0, 0.0)
    phi = phi.masked_fill(is_b0, 0.0)
    return torch.stack((bvals / 1000.0, theta, phi), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# token layout: which (volume, patch) each encoder token is
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens (B, Vk, Pk, D) of a (possibly masked) input sit in the full (B, V, P) grid.

    Attributes:
        vol_idx: (B, Vk) long, the input volume of each token row.
        patch_idx: (B, Vk, Pk) long, the patch of each token; padding tokens point at the dummy patch P.
        valid: (B, Vk, Pk) bool, True = real token, False = padding; None when there is no padding.
        vol_valid: (B, Vk) bool, True = the row holds at least one real token; None when all do.
        grid: (gx, gy, gz) patches per axis; P = gx * gy * gz.
        n_volumes: V of the input.
        dense: every patch of every held volume is a token, in patch order (patch_idx == arange(P)).

    Packing (``from_keep``): volumes without any visible patch are dropped when every batch element keeps the same
    number of volumes (diffusion masks); otherwise all V stay and empty ones are flagged in ``vol_valid``. Inside a
    volume the visible patches are packed in increasing patch order; when their count differs between rows,
    rows are padded to the largest count and ``valid`` marks the real ones (spatial masks keep equal counts, so
    no padding). Spatial attention then needs a key mask only when there is padding; diffusion attention
    scatters the tokens of each patch position onto the Vk volumes and masks the empty ones.
    """

    vol_idx: torch.Tensor
    patch_idx: torch.Tensor
    valid: torch.Tensor | None
    vol_valid: torch.Tensor | None
    grid: tuple[int, int, int]
    n_volumes: int
    dense: bool

    @property
    def n_patches(self) -> int:
        return math.prod(self.grid)

    @classmethod
    def full(cls, B: int, V: int, grid: tuple[int, int, int], device=None) -> "TokenLayout":
        """Every patch of every volume visible."""
        P = math.prod(grid)
        vol_idx = torch.arange(V, device=device).expand(B, V)
        patch_idx = torch.arange(P, device=device).expand(B, V, P)
        return cls(vol_idx, patch_idx, None, None, tuple(grid), V, True)

    @classmethod
    def from_keep(cls, keep: torch.Tensor, grid: tuple[int, int, int]) -> "TokenLayout":
        """keep: (B, V, P) bool, True = visible. Raises ValueError when a batch element has no visible patch."""
        B, V, P = keep.shape
        counts = keep.sum(-1)  # (B, V)
        if bool((counts.sum(-1) == 0).any()):
            raise ValueError("keep marks no visible patch for some batch element; keep at least one (True = visible)")
        if bool(keep.all()):
            return cls.full(B, V, grid, keep.device)
        has = counts > 0
        n_vol = has.sum(-1)
        if bool((n_vol == n_vol[0]).all()):
            Vk = int(n_vol[0])
            vol_idx = torch.argsort((~has).to(torch.int8), dim=-1, stable=True)[:, :Vk]
            vol_valid = None
        else:
            Vk = V
            vol_idx = torch.arange(V, device=keep.device).expand(B, V)
            vol_valid = has
        keep_k = keep.gather(1, vol_idx[..., None].expand(B, Vk, P))
        counts_k = counts.gather(1, vol_idx)
        Pk = int(counts_k.max())
        if Pk == P and bool((counts_k == P).all()):
            patch_idx = torch.arange(P, device=keep.device).expand(B, Vk, P)
            return cls(vol_idx, patch_idx, None, vol_valid, tuple(grid), V, True)
        patch_idx = torch.argsort((~keep_k).to(torch.int8), dim=-1, stable=True)[..., :Pk]
        valid = keep_k.gather(-1, patch_idx)
        if bool(valid.all()):
            valid = None
        else:
            patch_idx = patch_idx.masked_fill(~valid, P)
        return cls(vol_idx, patch_idx, valid, vol_valid, tuple(grid), V, False)

    @cached_property
    def spatial_key_mask(self) -> torch.Tensor | None:
        """(B * Vk, 1 + Pk) bool, True = real key (the CLS copy in front is always real); None without padding."""
        if self.valid is None:
            return None
        B, Vk, _ = self.valid.shape
        cls = torch.ones(B, Vk, 1, dtype=torch.bool, device=self.valid.device)
        return torch.cat((cls, self.valid), dim=-1).flatten(0, 1)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, Vk, Pk, C) -> (B, Vk, P, C) with zeros where a volume has no token at a patch."""
        B, Vk, Pk, C = x.shape
        grid = x.new_zeros(B, Vk, self.n_patches + 1, C)
        grid = grid.scatter(2, self.patch_idx[..., None].expand(B, Vk, Pk, C), x)
        return grid[:, :, : self.n_patches]

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, Vk, P, C) -> tokens (B, Vk, Pk, C); padding tokens read zeros."""
        B, Vk, P, C = grid.shape
        padded = torch.cat((grid, grid.new_zeros(B, Vk, 1, C)), dim=2)
        return padded.gather(2, self.patch_idx[..., None].expand(B, Vk, self.patch_idx.shape[-1], C))

    @cached_property
    def occupancy(self) -> torch.Tensor:
        """(B, P, Vk) bool, True = volume v holds a real token at patch p."""
        B, Vk, Pk = self.patch_idx.shape
        occ = torch.zeros(B, Vk, self.n_patches + 1, dtype=torch.bool, device=self.patch_idx.device)
        occ = occ.scatter(2, self.patch_idx, True)
        return occ[:, :, : self.n_patches].transpose(1, 2)

    @cached_property
    def diffusion_mask(self) -> torch.Tensor | None:
        """(B, P, 1, Vk, Vk) bool for diffusion attention, True = may attend: real keys, and each token to itself
        (so rows of empty positions stay finite; their outputs are dropped). None when dense."""
        if self.dense:
            return None
        Vk = self.patch_idx.shape[1]
        eye = torch.eye(Vk, dtype=torch.bool, device=self.patch_idx.device)
        return (self.occupancy[:, :, None, :] | eye)[:, :, None]


# ---------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------


def plain_attention(q, k, v, mask=None, need_weights: bool = False):
    """Explicit softmax(q k^T / sqrt(E)) v, the twin of F.scaled_dot_product_attention.

    q, k, v: (..., H, T, E); mask bool broadcastable to (..., H, T, T), True = attend.
    Returns (..., H, T, E) and, when asked, weights (..., H, T, T).
    """
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    out = weights @ v
    return (out, weights) if need_weights else out


class SpatialAttention(nn.Module):
    """Multi-head self-attention over the tokens of one volume (CLS copy first).

    Args:
        dim: token width D.
        num_heads: H; D must be divisible by H.
        dropout: dropout on the output projection (training only).
        fused: use F.scaled_dot_product_attention (True) or the explicit ``plain_attention`` twin.
    """

    def __init__(self, dim: int, num_heads: int, *, dropout: float = 0.0, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, need_weights: bool = False):
        """x: (N, S, D); key_mask: (N, S) bool, True = real key, or None. Returns (N, S, D) [, weights (N, H, S, S)]."""
        N, S, D = x.shape
        q, k, v = self.qkv(x).view(N, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each (N, H, S, E)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        weights = None
        if self.fused and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out, weights = plain_attention(q, k, v, mask, need_weights=True)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(N, S, D)))
        return (out, weights) if need_weights else out


class DiffusionAttention(nn.Module):
    """Multi-head self-attention across the volumes at each patch position, with D-RoPE on the keys.

    Args:
        dim: token width D.
        num_heads: H; D / H must be even for D-RoPE.
        drope: rotate keys by the q-space distance (True) or use plain attention (the "MAE" ablation).
        drope_base: base of the D-RoPE frequencies theta_n = base^(-2n/E).
        dropout: dropout on the output projection (training only).
        fused: plain attention through F.scaled_dot_product_attention (True) or ``plain_attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        drope: bool = True,
        drope_base: float = DEFAULT_BASE,
        dropout: float = 0.0,
        fused: bool = True,
    ):
        super().__init__()
        if dim % num_heads or (drope and (dim // num_heads) % 2):
            raise ValueError(f"width {dim} must split into {num_heads} heads of even size for D-RoPE")
        self.num_heads = num_heads
        self.drope = drope
        self.drope_base = drope_base
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: TokenLayout, distance: torch.Tensor, need_weights: bool = False):
        """x: (B, Vk, Pk, D); distance: (B, Vk, Vk) q-space distances of the held volumes.

        Returns (B, Vk, Pk, D) [, weights (B, P, H, Vk, Vk), rows of empty positions meaningless].
        """
        B, Vk, Pk, D = x.shape
        qkv = self.qkv(x)
        mask = layout.diffusion_mask  # (B, P, 1, Vk, Vk) or None
        if not layout.dense:
            qkv = layout.to_grid(qkv)  # (B, Vk, P, 3D)
        P = qkv.shape[2]
        q, k, v = qkv.view(B, Vk, P, 3, self.num_heads, -1).permute(3, 0, 2, 4, 1, 5)  # each (B, P, H, Vk, E)
        weights = None
        if self.drope:
            out = drope_attention(q, k, v, distance[:, None], self.drope_base, mask, need_weights)
            if need_weights:
                out, weights = out
        elif self.fused and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out, weights = plain_attention(q, k, v, mask, need_weights=True)
        out = out.permute(0, 3, 1, 2, 4).reshape(B, Vk, P, D)
        if not layout.dense:
            out = layout.from_grid(out)
        out = self.proj_drop(self.proj(out))
        return (out, weights) if need_weights else out


# ---------------------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout. (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer sub-block: x + attn(norm(x)), then x + mlp(norm(x)).

    Args:
        dim: token width D.
        attn: the attention module; it receives norm(x) and the keyword arguments given to ``forward``.
        mlp_ratio: MLP hidden width / D.
        dropout: MLP dropout (training only).
    """

    def __init__(self, dim: int, attn: nn.Module, *, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), dropout=dropout)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), **attn_kwargs)
        return x + self.mlp(self.norm2(x))


class DualBlock(nn.Module):
    """One model block: a diffusion sub-block, then a spatial sub-block (depth 10 = 10 of these).

    The diffusion sub-block mixes the volumes at each patch position (D-RoPE when ``drope``); the CLS token is not
    part of it. The spatial sub-block mixes the tokens of each volume together with a copy of the CLS token; the
    CLS outputs are then averaged over the volumes that hold at least one real token.

    Args:
        dim: token width D.
        num_heads: heads of both attentions.
        mlp_ratio: MLP hidden width / D.
        drope: D-RoPE in the diffusion attention.
        drope_base: D-RoPE frequency base.
        dropout: projection / MLP dropout (training only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        drope: bool = True,
        drope_base: float = DEFAULT_BASE,
        dropout: float = 0.0,
    ):
        super().__init__()
        diffusion = DiffusionAttention(dim, num_heads, drope=drope, drope_base=drope_base, dropout=dropout)
        self.diffusion = Block(dim, diffusion, mlp_ratio=mlp_ratio, dropout=dropout)
        spatial = SpatialAttention(dim, num_heads, dropout=dropout)
        self.spatial = Block(dim, spatial, mlp_ratio=mlp_ratio, dropout=dropout)

    def forward(self, cls: torch.Tensor, x: torch.Tensor, layout: TokenLayout, distance: torch.Tensor):
        """cls: (B, D); x: (B, Vk, Pk, D); distance: (B, Vk, Vk). Returns (cls (B, D), x (B, Vk, Pk, D))."""
        x = self.diffusion(x, layout=layout, distance=distance)
        seq = spatial_sequence(cls, x)
        seq = self.spatial(seq, key_mask=layout.spatial_key_mask)
        return split_spatial_sequence(seq, x.shape, layout)


def spatial_sequence(cls: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """cls (B, D), x (B, Vk, Pk, D) -> (B * Vk, 1 + Pk, D): one CLS copy in front of each volume's tokens."""
    B, Vk, Pk, D = x.shape
    return torch.cat((cls[:, None, None, :].expand(B, Vk, 1, D), x), dim=2).reshape(B * Vk, 1 + Pk, D)


def split_spatial_sequence(seq: torch.Tensor, shape, layout: TokenLayout):
    """Inverse of ``spatial_sequence``: CLS averaged over volumes with real tokens. Returns (cls (B, D), x)."""
    B, Vk, Pk, D = shape
    seq = seq.view(B, Vk, 1 + Pk, D)
    cls_per_volume = seq[:, :, 0]
    if layout.vol_valid is None:
        cls = cls_per_volume.mean(1)
    else:
        w = layout.vol_valid.to(seq.dtype)[..., None]
        cls = (cls_per_volume * w).sum(1) / w.sum(1).clamp_min(1.0)
    return cls, seq[:, :, 1:]

