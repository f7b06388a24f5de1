"""D-RoPE: rotary attention whose angle is a distance in diffusion (q-) space.

Pure functions, no learned parameters. Shape letters: B batch, V volumes, T sequence length (the volumes
of one diffusion-attention sequence), H heads, E head dim (even), N = E / 2 frequency pairs.

The distance between volumes i and j (b-values b, unit gradients g):

    rho = b / 1000,  alpha_ij = arccos(|g_i . g_j|) in [0, pi/2],  d_ij = sqrt(0.5 (rho_i - rho_j)^2 + alpha_ij^2)

The absolute value makes g and -g the same direction (antipodal symmetry). A b0 volume (b < 50 s/mm^2) has no
direction, so alpha = 0 for every pair that involves a b0 and d is then the b-value term alone. (The public
code takes arccos of the dot product with the b0's zero vector and gets pi/2 instead, which makes every b0
look maximally far from every direction.)

Attention rotates only the keys, pairwise. Channel layout: ADJACENT pairs (k_2n, k_2n+1) form the n-th
rotation plane, turned by the angle a_ijn = d_ij * theta_n with theta_n = base^(-2n/E), n = 0..N-1:

    (k_2n, k_2n+1) -> (k_2n cos a - k_2n+1 sin a, k_2n sin a + k_2n+1 cos a)
    score_ij = q_i . R(a_ij) k_j / sqrt(E) = sum_n Re( conj(q~_in) k~_jn exp(i a_ijn) ) / sqrt(E)

with q~_n = q_2n + i q_2n+1 (the pairs read as complex numbers). The same rotation is used in every head; values
are not rotated.

Speed and memory. Materialising rotated keys for every query (..., H, T, T, E) is what the public code does; it
needs gigabytes at pretraining shapes. ``drope_attention`` computes the same scores exactly without them. The
(T, T, N) cos / sin tables depend only on the protocol and are shared by all its sequences and heads (building them
costs O(T^2 N), against O(sequences T^2 E) for the attention). Three paths, same results:

- CPU with a C compiler (``drope_kernel``): fused loops that never form a rotated key,
  s_ij = sum_n C_ijn (q_i,2n k_j,2n + q_i,2n+1 k_j,2n+1) + S_ijn (q_i,2n+1 k_j,2n - q_i,2n k_j,2n+1), with the
  sequences as the vectorised axis so each table entry serves a vector of sequences. Without attention maps the
  whole attention, mask included, is one kernel per block of 16 sequences (``_KernelAttention``): scores, mask,
  softmax and P v in per-thread scratch, keeping only q, k, v, the row logsumexp and the mask as bytes (one copy
  per sequence, not per head) for the backward pass, which recomputes the probabilities block by block (as flash
  attention does): no float array of size (..., H, T, T) is stored, so it needs less memory than plain SDPA.
  With ``need_weights`` the kernel computes the scores (..., H, T, T) and torch the softmax (``_KernelScores`` +
  ``_SoftmaxValues``, which keep the probabilities); the backward (dq = dS . R k, dk = dS^T . R^T q) is fused the
  same way. Compiled once per machine and cached.
- CUDA and other accelerators, without attention maps: ``table_forward`` / ``table_backward``, the same
  reductions in torch ops, compiled by ``torch.compile`` (Inductor fuses each into one reduction loop, a Triton
  kernel on CUDA, so the (..., T, T, N) products are never stored; dynamic shapes, so one compilation serves every
  T and batch), with the probabilities P kept for the backward as plain attention does. A compiled forward and a
  compiled backward (not autograd through the compiled forward, whose backward graph stores the products: 9.3 GB
  against 0.64 GB at 2000 sequences, T = 90, E = 128). Checked on CPU with Inductor's C++ backend. If
  compilation fails the chunked path runs (said once in the log); DROPE_COMPILE=0 chooses it.
- otherwise (no C compiler, attention maps on accelerators, ``kernel=False``): the rotated keys R(a_ij) k_j of one
  block of sequences or query rows, about CHUNK_BYTES, are formed in one reused buffer, contracted with the queries
  by batched (1 x E) @ (E x T) products and overwritten by the next block; the backward recomputes them block by
  block. Without a compiler this is said once in the log.

Not taken: an exact low-rank factorisation exp(i d_ij theta_n) = A_n B_n^H, which would turn the score into a
plain q k^T of head dim E r: for real protocols these matrices are nearly full rank (87-89 of 90 at rel. error
1e-3 for 2 b0 + 2 x 44 directions, 251-267 of 288 for 18 b0 + 3 x 90), so r ~ T.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading

import torch

from ..gradients import B0_THRESHOLD
from . import drope_kernel

log = logging.getLogger(__name__)

DEFAULT_BASE = 0.3
B_SCALE = 1000.0  # s/mm^2: rho = b / B_SCALE
CHUNK_BYTES = {"cpu": 4 * 2**20}  # target bytes of rotated keys per work block, per device type (cache-sized on CPU)
DEFAULT_CHUNK_BYTES = 256 * 2**20  # accelerators: large chunks, few kernel launches


class DRoPEShapeError(ValueError):
    """Inputs of the D-RoPE functions have inconsistent shapes."""


# ---------------------------------------------------------------------------------------------------------
# distance and angle tables
# ---------------------------------------------------------------------------------------------------------


def drope_distance(bvals, bvecs) -> torch.Tensor:
    """Pairwise diffusion-space distance d_ij (see the module docstring).

    bvals: (T,) or (B, T) s/mm^2; bvecs: (T, 3) or (B, T, 3), unit length (zero rows allowed for b0).
    Returns (T, T) or (B, T, T): symmetric, zero diagonal, >= 0; float64 if bvecs is float64 else float32,
    on the device of bvecs. Computed in float64 (arccos is ill-conditioned near 1). The gradient directions
    are normalised inside (so slightly non-unit vectors give exact zeros for identical or antipodal
    directions); pairs involving a b0 (b < 50) use alpha = 0.
    """
    bvals = torch.as_tensor(bvals)
    bvecs = torch.as_tensor(bvecs)
    if bvecs.shape[-1:] != (3,) or bvals.shape != bvecs.shape[:-1] or bvals.dim() not in (1, 2):
        raise DRoPEShapeError(
            f"drope_distance needs bvals (T,) / (B, T) and bvecs (T, 3) / (B, T, 3); "
            f"got bvals {tuple(bvals.shape)} and bvecs {tuple(bvecs.shape)}"
        )
    out_dtype = torch.float64 if bvecs.dtype == torch.float64 else torch.float32
    b = bvals.to(device=bvecs.device, dtype=torch.float64)
    g = bvecs.to(torch.float64)
    is_b0 = b < B0_THRESHOLD
    norm = g.norm(dim=-1, keepdim=True)
    g = torch.where(is_b0[..., None] | (norm == 0), torch.zeros_like(g), g / norm.clamp_min(1e-300))
    cos_angle = (g @ g.transpose(-1, -2)).abs().clamp(0.0, 1.0)
    alpha = torch.arccos(cos_angle)
    either_b0 = is_b0[..., :, None] | is_b0[..., None, :]
    alpha = alpha.masked_fill(either_b0, 0.0)
    eye = torch.eye(alpha.shape[-1], dtype=torch.bool, device=alpha.device)
    alpha = alpha.masked_fill(eye, 0.0)
    rho = b / B_SCALE
    d = torch.sqrt(0.5 * (rho[..., :, None] - rho[..., None, :]) ** 2 + alpha**2)
    return d.to(out_dtype)


def drope_frequencies(head_dim: int, base: float = DEFAULT_BASE, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """theta_n = base^(-2n / E), n = 0..E/2-1. Returns (N,)."""
    if head_dim % 2:
        raise DRoPEShapeError(f"D-RoPE needs an even head dim, got {head_dim}")
    n = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return (float(base) ** (-2.0 * n / head_dim)).to(dtype)


def drope_angles(distance: torch.Tensor, head_dim: int, base: float = DEFAULT_BASE) -> torch.Tensor:
    """Rotation angles a_ijn = d_ij theta_n. distance (..., T, T) -> (..., T, T, N), in distance's dtype."""
    theta = drope_frequencies(head_dim, base, dtype=distance.dtype, device=distance.device)
    return distance[..., None] * theta


def rotate_pairs(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs: x (..., E), angle broadcastable to (..., N) -> (..., E).

    (x_2n, x_2n+1) -> (x_2n cos a_n - x_2n+1 sin a_n, x_2n sin a_n + x_2n+1 cos a_n).
    """
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------------------
# reference implementation (materialises every rotated key)
# ---------------------------------------------------------------------------------------------------------


def drope_attention_naive(q, k, v, distance, base: float = DEFAULT_BASE, mask=None, need_weights: bool = False):
    """Plain twin of ``drope_attention``: rotates every key for every query, (..., H, T, T, E) in memory.

    Same arguments and results as ``drope_attention``; use it only on small inputs (tests, benchmark).
    """
    _check(q, k, v, distance, mask)
    dist = distance.unsqueeze(-3) if distance.dim() > 2 else distance  # (..., 1, T, T): same for every head
    angle = drope_angles(dist.to(q.dtype), q.shape[-1], base)  # (..., 1, Ti, Tj, N)
    k_rot = rotate_pairs(k[..., None, :, :], angle)  # (..., H, Ti, Tj, E): key j rotated for query i
    scores = (q[..., :, None, :] * k_rot).sum(-1) / math.sqrt(q.shape[-1])
    return _softmax_values(scores, v, mask, need_weights)


def _softmax_values(scores, v, mask, need_weights):
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = weights @ v
    return (out, weights) if need_weights else out


# ---------------------------------------------------------------------------------------------------------
# memory-bounded exact implementation
# ---------------------------------------------------------------------------------------------------------


def drope_attention(
    q, k, v, distance, base: float = DEFAULT_BASE, mask=None, need_weights: bool = False, *, kernel: bool = True
):
    """Exact D-RoPE attention without materialising rotated keys per sequence.

    q, k, v: (..., H, T, E) with E even.
    distance: (T, T), or (..., T, T) whose leading dims broadcast (right-aligned) against q's leading dims
        ``...`` -- NOT against (..., H): the same distance serves every head. Example: q (B, P, H, V, E) with
        distance (B, 1, V, V) (one protocol per batch element, shared by its P patch positions).
        No gradient flows into ``distance``.
    mask: optional bool, broadcastable to (..., H, T, T); True = may attend. Every query row needs at least
        one True (an all-False row gives NaN, as in plain attention).
    Returns out (..., H, T, E), and weights (..., H, T, T) (softmax probabilities) when ``need_weights``.

    score_ij = q_i . R(d_ij theta) k_j / sqrt(E) (adjacent-pair layout, module docstring); the result agrees
    with ``drope_attention_naive`` to rounding. fp16/bf16 inputs are computed in float32 and cast back.
    With distance == 0 everywhere it equals plain scaled-dot-product attention.
    kernel: use the fast path of the device: on CPU the fused C kernels when they can be built, elsewhere the
        torch.compile path (False: the chunked path; module docstring). Without weights the C kernels run the
        whole attention and keep no float array of size (..., H, T, T).
    """
    lead = _check(q, k, v, distance, mask)
    H, T, E = q.shape[-3:]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    order, G, M, dist = _protocol_groups(lead, distance, H)
    n = len(lead)

    lib = drope_kernel.load() if kernel and q.device.type == "cpu" else None
    compiled = compiled_table_attention() if kernel and q.device.type != "cpu" else None
    inverse = [order.index(i) for i in range(n)]

    def to_core(x):  # (..., H, T, F) -> (G, M, T, F): protocols outside, then sequences x heads
        return x.permute(*order, n, n + 1, n + 2).reshape(G, M, T, x.shape[-1]).to(work).contiguous()

    def from_core(x):  # (G, M, Ti, F) -> (..., H, Ti, F)
        return x.reshape(*[lead[i] for i in order], H, T, x.shape[-1]).permute(*inverse, n, n + 1, n + 2)

    with torch.autocast(q.device.type, enabled=False):  # the core runs in float32/float64 whatever the context
        angle = drope_angles(dist.to(device=q.device, dtype=work), E, base)  # (G, Ti, Tj, N)
        scale = 1.0 / math.sqrt(E)
        if not need_weights and (lib is not None or compiled is not None):
            core_mask = _core_mask(mask, lead, order, H, G)
            args = (to_core(q), to_core(k), to_core(v), angle.cos(), angle.sin(), core_mask, scale)
            out = _KernelAttention.apply(*args, lib) if lib is not None else _call_compiled(compiled, *args)
            if out is not None:
                return from_core(out).to(q.dtype)
        if lib is not None:
            scores = _KernelScores.apply(to_core(q), to_core(k), angle.cos(), angle.sin(), scale, lib)
        else:
            table = torch.polar(torch.ones_like(angle), angle)
            scores = _DRoPEScores.apply(to_core(q), to_core(k), table, scale)  # (G, M, Ti, Tj)
        out, weights = _SoftmaxValues.apply(from_core(scores), v.to(work), mask)
    return (out.to(q.dtype), weights.to(q.dtype)) if need_weights else out.to(q.dtype)


class _KernelAttention(torch.autograd.Function):
    """The whole attention softmax(s) v by the fused CPU kernels (``drope_kernel.attention``).

    q, k: (G, M, T, E), v: (G, M, T, Ev) contiguous; cos, sin: (G, Ti, Tj, N); mask: None or (G, Mm, Ti, Tj) bool
    (``_core_mask``; sequence m reads row m // (M / Mm)); scale: float; lib: the kernel library.
    Returns out (G, M, T, Ev). Saves q, k, v, the row logsumexp (G, M, T), the tables and the byte mask: no float
    (M, T, T) array is kept (the backward recomputes the probabilities block by block, as flash attention does).
    """

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, mask, scale, lib):
        out = v.new_empty(v.shape)
        lse = q.new_empty(q.shape[:-1])
        for g in range(q.shape[0]):
            drope_kernel.attention(lib, q[g], k[g], v[g], cos[g], sin[g], scale, out[g], lse[g], _row(mask, g))
        ctx.save_for_backward(q, k, v, lse, cos, sin, mask)
        ctx.scale, ctx.lib = scale, lib
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse, cos, sin, mask = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for g in range(q.shape[0]):
            drope_kernel.attention_backward(
                ctx.lib, q[g], k[g], v[g], lse[g], grad_out[g], cos[g], sin[g], ctx.scale, dq[g], dk[g], dv[g],
                _row(mask, g),
            )
        return dq, dk, dv, None, None, None, None, None


def table_forward(q, k, v, cos, sin, mask, scale: float):
    """The whole attention from the cos / sin tables in plain torch ops, written for ``torch.compile``.

    q, k: (G, M, T, E), v: (G, M, T, Ev); cos, sin: (G, Ti, Tj, N); mask: None or (G, Mm, Ti, Tj) bool, sequence m
    reading row m // (M / Mm) (``_core_mask``), True = may attend. Returns out (G, M, T, Ev) and the probabilities
    P (G, M, Ti, Tj). Compiled, Inductor turns the products and the sum over n into one reduction loop (a Triton
    kernel on CUDA), so the (G, M, Ti, Tj, N) broadcast below is never stored; run eagerly it is.
    """
    G, M, T, E = q.shape
    q0, q1, k0, k1, cos, sin = _pair_views(q, k, cos, sin)
    scores = (cos * (q0 * k0 + q1 * k1) + sin * (q1 * k0 - q0 * k1)).sum(-1) * scale  # (G, M, Ti, Tj)
    if mask is not None:
        Mm = mask.shape[1]
        scores = scores.view(G, Mm, M // Mm, T, T).masked_fill(~mask[:, :, None], float("-inf")).view(G, M, T, T)
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


def table_backward(q, k, v, cos, sin, weights, out, grad_out, scale: float):
    """Gradients of ``table_forward`` from its probabilities and output: (dq, dk, dv), shapes of q, k, v.

    dS = P (dP - rowsum(dO . out)) with dP = dO v^T; dq_i = sum_j dS_ij R(a_ij) k_j and dk_j = sum_i dS_ij
    R(-a_ij) q_i (pairs as in ``drope_kernel``), each one reduction over j or i that Inductor fuses with the
    (G, M, Ti, Tj, N) products, which are never stored.
    """
    dv = weights.transpose(-1, -2) @ grad_out
    ds = weights * (grad_out @ v.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    ds = (ds * scale)[..., None]  # (G, M, Ti, Tj, 1)
    q0, q1, k0, k1, cos, sin = _pair_views(q, k, cos, sin)
    dq0, dq1 = (ds * (cos * k0 - sin * k1)).sum(-2), (ds * (cos * k1 + sin * k0)).sum(-2)  # (G, M, Ti, N)
    dk0, dk1 = (ds * (cos * q0 + sin * q1)).sum(-3), (ds * (cos * q1 - sin * q0)).sum(-3)  # (G, M, Tj, N)
    return torch.stack((dq0, dq1), -1).flatten(-2), torch.stack((dk0, dk1), -1).flatten(-2), dv


def _pair_views(q, k, cos, sin):
    """Broadcastable views for the pair sums: q0, q1 (G, M, Ti, 1, N) = the even / odd channels of q, k0, k1
    (G, M, 1, Tj, N) those of k, cos, sin (G, 1, Ti, Tj, N)."""
    q0, q1 = q[..., None, 0::2], q[..., None, 1::2]
    k0, k1 = k[..., None, :, 0::2], k[..., None, :, 1::2]
    return q0, q1, k0, k1, cos[:, None], sin[:, None]


class _CompiledAttention(torch.autograd.Function):
    """``table_forward`` / ``table_backward`` compiled (``compiled_table_attention``): arguments as
    ``table_forward`` plus the pair of compiled functions. Saves q, k, v, the tables, P and out: on CUDA, P (M, T, T)
    is what plain (non-flash) attention keeps too."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, mask, scale, compiled):
        forward, ctx.backward_fn = compiled
        out, weights = forward(q, k, v, cos, sin, mask, scale)
        ctx.save_for_backward(q, k, v, cos, sin, weights, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cos, sin, weights, out = ctx.saved_tensors
        dq, dk, dv = ctx.backward_fn(q, k, v, cos, sin, weights, out, grad_out.contiguous(), ctx.scale)
        return dq, dk, dv, None, None, None, None, None


_compiled_lock = threading.Lock()
_compiled: dict = {}


def compiled_table_attention():
    """(forward, backward): ``table_forward`` and ``table_backward`` compiled by torch.compile (dynamic shapes: one
    compilation serves every T and M), or None after a compilation failed in this process or with DROPE_COMPILE=0
    in the environment (the chunked path runs then)."""
    with _compiled_lock:
        if "fn" not in _compiled:
            wanted = os.environ.get("DROPE_COMPILE", "1") != "0"
            compile_ = functools.partial(torch.compile, dynamic=True, fullgraph=True)
            _compiled["fn"] = (compile_(table_forward), compile_(table_backward)) if wanted else None
        return _compiled["fn"]


def _call_compiled(compiled, *args):
    """The compiled attention on args (as ``table_forward``), or None when compiling it fails here (said once;
    later calls skip it). The backward compiles at the first backward pass; a failure there is raised."""
    try:
        return _CompiledAttention.apply(*args, compiled)
    except torch._dynamo.exc.TorchDynamoException as err:  # Inductor or Triton failures, unsupported graphs
        with _compiled_lock:
            _compiled["fn"] = None
        log.warning("D-RoPE: torch.compile failed (%s); using the portable chunked path (slower)", str(err)[:300])
        return None


def _row(mask, g: int):
    """Protocol g's rows of a core mask as the kernel reads them (bytes), or None."""
    return None if mask is None else mask[g].view(torch.uint8)


def _core_mask(mask, lead: tuple[int, ...], order: list[int], H: int, G: int):
    """A bool mask broadcastable to (*lead, H, T, T) -> (G, Mm, T, T) bool contiguous in the core's sequence
    order, with the heads kept only when the mask differs between them (then Mm = M, else Mm = M / H); None stays."""
    if mask is None:
        return None
    n, T = len(lead), mask.shape[-1]
    mask = mask.reshape((1,) * (n + 3 - mask.dim()) + tuple(mask.shape))
    Hm = mask.shape[n]
    mask = mask.expand(*lead, Hm, T, T).permute(*order, n, n + 1, n + 2)
    return mask.reshape(G, -1, T, T).contiguous()


class _SoftmaxValues(torch.autograd.Function):
    """The twin of ``_softmax_values`` with a leaner backward: out = P v, P = softmax(scores masked).

    scores (..., Ti, Tj); v (..., Tj, Ev); mask bool broadcastable to scores or None (True = attend).
    Returns out (..., Ti, Ev) and P (..., Ti, Tj) (differentiable). Backward forms dS = P (dP - rowsum(P dP)) in
    the buffer of dP = dO v^T, with rowsum(P dP) = rowsum(dO out) (+ rowsum(P dP_weights) when P's own gradient
    is used), so it holds two (Ti, Tj) arrays per sequence where autograd would hold three.
    """

    @staticmethod
    def forward(ctx, scores, v, mask):
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        out = weights @ v
        ctx.save_for_backward(weights, v, out)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        weights, v, out = ctx.saved_tensors
        dv = weights.transpose(-1, -2) @ grad_out if ctx.needs_input_grad[1] else None
        ds = None
        if ctx.needs_input_grad[0]:
            ds = grad_out @ v.transpose(-1, -2)  # dP
            row = (grad_out * out).sum(-1, keepdim=True)
            if grad_weights is not None:
                ds += grad_weights
                row += (grad_weights * weights).sum(-1, keepdim=True)
            ds.sub_(row).mul_(weights)
        return ds, dv, None


def _protocol_groups(lead: tuple[int, ...], distance: torch.Tensor, H: int):
    """Split q's leading dims into protocol dims (where distance has its own entries) and shared dims.

    Returns (order, G, M, dist): ``order`` lists the leading dims protocol-first; G = number of protocols,
    M = sequences x heads per protocol; dist (G, T, T).
    """
    T = distance.shape[-1]
    dist_shape = (1,) * (len(lead) - (distance.dim() - 2)) + tuple(distance.shape[:-2])
    own = [i for i, (d, full) in enumerate(zip(dist_shape, lead)) if d != 1 and full != 1]
    shared = [i for i in range(len(lead)) if i not in own]
    order = own + shared
    dist = distance.reshape(dist_shape + (T, T)).permute(*order, len(lead), len(lead) + 1)
    dist = dist[(Ellipsis,) + (0,) * len(shared) + (slice(None), slice(None))]  # drop the size-1 shared dims
    G = math.prod(lead[i] for i in own)
    M = math.prod(lead[i] for i in shared) * H
    return order, G, M, dist.reshape(G, T, T)


class _KernelScores(torch.autograd.Function):
    """Scaled D-RoPE scores by the fused CPU kernels (``drope_kernel``): the contract of ``_DRoPEScores`` with
    cos, sin: (G, Ti, Tj, N) real tables in place of the complex one, and the loaded kernel library ``lib``.
    q, k: (G, M, T, E) contiguous (saved as they are: no copies)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, scale, lib):
        G, M, T, E = q.shape
        out = q.new_empty(G, M, T, T)
        for g in range(G):
            drope_kernel.scores(lib, q[g], k[g], cos[g], sin[g], out[g], scale)
        ctx.save_for_backward(q, k, cos, sin)
        ctx.scale, ctx.lib = scale, lib
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, cos, sin = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        for g in range(q.shape[0]):  # dq = dS . R k and dk = dS^T . R^T q in one pass
            drope_kernel.grads(ctx.lib, q[g], k[g], cos[g], sin[g], grad[g], ctx.scale, dq[g], dk[g])
        return dq, dk, None, None, None, None


class _DRoPEScores(torch.autograd.Function):
    """Scaled D-RoPE scores in the core layout.

    q, k: (G, M, T, E) real, contiguous; table: (G, Ti, Tj, N) complex exp(i a_gijn); scale: float.
    Returns s: (G, M, Ti, Tj), s[g, m, i, j] = scale * q[g, m, i] . R(a_gij) k[g, m, j].
    Forward: per chunk of sequences, rotated keys R(a_ij) k_j (m, Ti, Tj, E), then the dot products with q_i.
    Backward: dq_i = sum_j dS_ij R(a_ij) k_j and dk_j = sum_i dS_ij R(-a_ij) q_i, recomputing the rotations.
    """

    @staticmethod
    def forward(ctx, q, k, table, scale):
        ctx.save_for_backward(q, k, table)
        ctx.scale = scale
        G, M, T, E = q.shape
        out = q.new_empty(G, M, T, T)
        kc = torch.view_as_complex(k.unflatten(-1, (-1, 2)))  # (G, M, Tj, N)
        blocks, buf = _blocks(q, table)
        for g, m0, m1, i0, i1 in blocks:
            k_rot = _rotated(kc[g, m0:m1], table[g, i0:i1], buf)  # (m, i, Tj, E): R(a_ij) k_j
            # (1 x E) @ (E x Tj) per (m, i): a row times transposed rotated keys (much faster than a column GEMV)
            torch.matmul(q[g, m0:m1, i0:i1, None, :], k_rot.transpose(-1, -2), out=out[g, m0:m1, i0:i1, None, :])
        return out.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, table = ctx.saved_tensors  # grad: (G, M, Ti, Tj); no full-size copy of it is made
        table_t = table.transpose(1, 2).conj().resolve_conj()  # (G, Tj, Ti, N): exp(-i a_ij)
        qc = torch.view_as_complex(q.unflatten(-1, (-1, 2)))
        kc = torch.view_as_complex(k.unflatten(-1, (-1, 2)))
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        dk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        blocks, buf = _blocks(q, table)
        for g, m0, m1, r0, r1 in blocks:
            if dq is not None:  # dq_i = sum_j dS_ij R(a_ij) k_j, query rows r0:r1
                k_rot = _rotated(kc[g, m0:m1], table[g, r0:r1], buf)  # (m, i, Tj, E)
                torch.matmul(grad[g, m0:m1, r0:r1, None, :], k_rot, out=dq[g, m0:m1, r0:r1, None, :])
            if dk is not None:  # dk_j = sum_i dS_ij R(-a_ij) q_i, key rows r0:r1
                q_rot = _rotated(qc[g, m0:m1], table_t[g, r0:r1], buf)  # (m, j, Ti, E)
                grad_j = grad[g, m0:m1, :, r0:r1].transpose(-1, -2)  # (m, j, Ti)
                torch.matmul(grad_j[..., None, :], q_rot, out=dk[g, m0:m1, r0:r1, None, :])
        return _scaled(dq, ctx.scale), _scaled(dk, ctx.scale), None, None


def _scaled(x: torch.Tensor | None, scale: float) -> torch.Tensor | None:
    return None if x is None else x.mul_(scale)


def _blocks(x: torch.Tensor, table: torch.Tensor):
    """Work blocks over x (G, M, T, E): (g, m0, m1, r0, r1) = protocol, sequences m0:m1, rows r0:r1.

    A block's rotated keys (m, rows, T, E) take about CHUNK_BYTES (per device type): whole sequences are grouped
    while one fits, else the rows of one sequence are split. Returns (list of blocks, the one work buffer).
    """
    G, M, T, E = x.shape
    budget = CHUNK_BYTES.get(x.device.type, DEFAULT_CHUNK_BYTES)
    row_bytes = T * E * x.element_size()
    rows = max(1, min(T, budget // max(row_bytes, 1)))
    seqs = max(1, min(M, budget // max(row_bytes * T, 1))) if rows == T else 1
    blocks = [
        (g, m0, min(M, m0 + seqs), r0, min(T, r0 + rows))
        for g in range(G)
        for m0 in range(0, M, seqs)
        for r0 in range(0, T, rows)
    ]
    buf = table.new_empty(seqs, rows, T, E // 2)  # one buffer for all blocks: no allocation / page faults per block
    return blocks, buf


def _rotated(xc: torch.Tensor, table: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """xc (m, Tj, N) complex, table (rows, Tj, N) complex -> real (m, rows, Tj, E): R(a_rj) x_j, adjacent pairs.

    Written into the front of buf (>= m, >= rows, Tj, N)."""
    out = buf[: xc.shape[0], : table.shape[0]]
    torch.mul(xc[:, None], table[None], out=out)
    return torch.view_as_real(out).flatten(-2)


def _check(q, k, v, distance, mask) -> tuple[int, ...]:
    """Validate shapes; return the leading dims ``...`` of q (..., H, T, E)."""
    if q.dim() < 3 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise DRoPEShapeError(
            f"q, k, v must be (..., H, T, E) with equal shapes (v may have another E); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    T, E = q.shape[-2:]
    if E % 2:
        raise DRoPEShapeError(f"D-RoPE needs an even head dim E, got {E}")
    lead = tuple(q.shape[:-3])
    if distance.dim() < 2 or distance.shape[-2:] != (T, T) or distance.dim() - 2 > len(lead):
        raise DRoPEShapeError(
            f"distance must be (T, T) or (..., T, T) with T={T} and leading dims broadcastable to {lead} "
            f"(no head axis); got {tuple(distance.shape)}"
        )
    try:
        torch.broadcast_shapes(tuple(distance.shape[:-2]), lead)
        if mask is not None:
            torch.broadcast_shapes(tuple(mask.shape), (*q.shape[:-1], T))
    except RuntimeError as err:
        raise DRoPEShapeError(f"distance / mask do not broadcast against q {tuple(q.shape)}: {err}") from None
    if torch.broadcast_shapes(tuple(distance.shape[:-2]), lead) != lead:
        raise DRoPEShapeError(f"distance leading dims {tuple(distance.shape[:-2])} are larger than q's {lead}")
    if mask is not None and mask.dtype != torch.bool:
        raise DRoPEShapeError(f"mask must be bool (True = attend), got {mask.dtype}")
    return lead
