"""Output heads of the D-RoPE masked autoencoder: decoder features -> signal of every patch of every volume.

Shape letters: B batch, V volumes, P patches per volume, N voxels per patch, Dd decoder width.

- ``ConvHead`` (the paper's): a linear map of each decoder token to its patch voxels, then a small 3-D CNN per
  volume. Everything the model outputs must pass through one Dd-wide token per patch.
- ``CopyHead`` (beyond the paper): each patch of volume i is predicted as a learned weighting of the *visible*
  patches at the same position in the other volumes j, plus a learned correction. The weights are a softmax over
  the visible j of a score from the decoder features, the D-RoPE distance d_ij and a shell gate; at
  initialisation every score is equal within a shell and the correction is zero, so the head is exactly the
  shell mean of the visible volumes (``DRoPE.baselines.shell_mean_baseline``); training moves away from it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..gradients import SHELL_TOLERANCE

CONV_CHUNK = 16  # volumes per call of the convolutional head (bounds its activation memory at inference)
COPY_KEY_DIM = 32  # width of the copy head's query/key features
OTHER_SHELL_SCORE = -30.0  # initial score offset of volumes of another shell: exp(-30) ~ 1e-13, i.e. not used


class ConvHead(nn.Module):
    """Per-volume 3-D refinement: conv 1 -> c -> c -> 1 (kernel 3, padding 1), ReLU after each (signal >= 0)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(channels, 1, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, V, X, Y, Z) -> (B, V, X, Y, Z), volumes processed independently."""
        B, V = x.shape[:2]
        flat = x.reshape(B * V, 1, *x.shape[2:])
        out = torch.cat([self.net(part) for part in flat.split(CONV_CHUNK)])
        return out.view(x.shape)


def same_shell(bvals: torch.Tensor) -> torch.Tensor:
    """(B, V) b-values -> (B, V, V) bool, True where two volumes lie within ``SHELL_TOLERANCE`` of each other."""
    return (bvals[:, :, None] - bvals[:, None, :]).abs() <= SHELL_TOLERANCE


def shell_fallback(patches: torch.Tensor, visible: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
    """Per volume, the mean visible non-zero (brain) signal of its shell in the sample: (B, V).

    patches: (B, V, P, N); visible: (B, V, P) bool; shells: (B, V, V) bool. Used where no other volume is visible
    at a patch position. 0 when the shell shows no signal at all.
    """
    seen = visible[..., None] & (patches != 0)  # (B, V, P, N)
    total = (patches * seen).sum((2, 3))  # (B, V)
    count = seen.sum((2, 3)).to(patches.dtype)
    shell = shells.to(patches.dtype)
    return (shell @ total[..., None])[..., 0] / (shell @ count[..., None])[..., 0].clamp_min(1.0)


class CopyHead(nn.Module):
    """Predict every patch from the visible patches of the other volumes at the same position.

    pred_i = (1 + gain_i) * sum_j a_ij x_j + correction_i, with a_ij = softmax_j over the visible volumes j != i of
    s_ij = <q_i, k_j> / sqrt(K) + f(d_ij) + shell_score * [j in another shell], and q, k, gain, correction linear
    maps of the decoder tokens (gain, correction per voxel). f is a small MLP of the D-RoPE distance (absent when
    ``use_distance`` is False). q, f, gain and correction start at zero, so the head starts as the shell mean.
    Where no other volume is visible at a position, the copy term is the mean visible signal of the shell.

    Args:
        dim: decoder width Dd.
        patch_voxels: N.
        use_distance: score with the D-RoPE distance d_ij.
    """

    def __init__(self, dim: int, patch_voxels: int, *, use_distance: bool = True):
        super().__init__()
        self.query = nn.Linear(dim, COPY_KEY_DIM)
        self.key = nn.Linear(dim, COPY_KEY_DIM)
        self.distance_score = (
            nn.Sequential(nn.Linear(1, 16), nn.GELU(), nn.Linear(16, 1)) if use_distance else None
        )
        self.other_shell_score = nn.Parameter(torch.tensor(OTHER_SHELL_SCORE))
        self.gain = nn.Linear(dim, patch_voxels)
        self.correction = nn.Linear(dim, patch_voxels)

    def reset_parameters(self) -> None:
        """The shell-mean start: zero query, distance score, gain and correction (keys stay random)."""
        zeroed = [self.query, self.gain, self.correction]
        if self.distance_score is not None:
            zeroed.append(self.distance_score[-1])
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.other_shell_score, OTHER_SHELL_SCORE)

    def scores(self, features: torch.Tensor, shells: torch.Tensor, distance: torch.Tensor | None) -> torch.Tensor:
        """features (B, V, P, Dd), shells (B, V, V) same-shell pairs -> copy scores s_ij (B, P, V, V) before masking."""
        q, k = self.query(features), self.key(features)  # (B, V, P, K)
        s = torch.einsum("bipk,bjpk->bpij", q, k) / math.sqrt(COPY_KEY_DIM)
        pair = self.other_shell_score * (~shells).to(s.dtype)  # (B, V, V)
        if self.distance_score is not None:
            pair = pair + self.distance_score(distance.to(s.dtype)[..., None])[..., 0]
        return s + pair[:, None]

    def forward(self, features, patches, visible, bvals, distance=None) -> torch.Tensor:
        """features (B, V, P, Dd) decoder tokens; patches (B, V, P, N) input patches (read only where visible);
        visible (B, V, P) bool; bvals (B, V); distance (B, V, V) D-RoPE distances. Returns (B, V, P, N)."""
        V = visible.shape[1]
        shells = same_shell(bvals)
        candidates = visible.transpose(1, 2)[:, :, None, :] & ~torch.eye(V, dtype=torch.bool, device=visible.device)
        has_candidate = candidates.any(-1)  # (B, P, V)
        scores = self.scores(features, shells, distance).masked_fill(~candidates, float("-inf"))
        weights = scores.softmax(-1).masked_fill(~has_candidate[..., None], 0.0)  # (B, P, V, V)
        copied = torch.einsum("bpij,bjpn->bipn", weights, patches * visible[..., None])
        fallback = shell_fallback(patches, visible, shells)[:, :, None, None]
        copied = torch.where(has_candidate.transpose(1, 2)[..., None], copied, fallback)
        return copied * (1.0 + self.gain(features)) + self.correction(features)
