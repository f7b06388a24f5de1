"""D-RoPE core: distance, exact memory-bounded attention vs explicit loops and the naive twin, benchmark smoke."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import DRoPE.model.drope as drope_mod
import DRoPE.model.drope_kernel as kernel_mod
from DRoPE import bench
from DRoPE.model.drope import (
    DRoPEShapeError,
    drope_attention,
    drope_attention_naive,
    drope_distance,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------------
# independent references (python loops, straight from the definitions)
# ---------------------------------------------------------------------------------------------------------


def loop_distance(bvals, bvecs) -> np.ndarray:
    """d_ij = sqrt(0.5 (b_i/1000 - b_j/1000)^2 + alpha_ij^2), alpha = arccos|g_i.g_j|, alpha = 0 with a b0."""
    T = len(bvals)
    d = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            if bvals[i] < 50 or bvals[j] < 50:
                alpha = 0.0
            else:
                gi = np.asarray(bvecs[i], float) / np.linalg.norm(bvecs[i])
                gj = np.asarray(bvecs[j], float) / np.linalg.norm(bvecs[j])
                alpha = math.acos(min(1.0, abs(float(gi @ gj))))
            d[i, j] = math.sqrt(0.5 * (bvals[i] / 1000 - bvals[j] / 1000) ** 2 + alpha**2)
    return d


def loop_attention(q, k, v, d, base=0.3, mask=None):
    """Explicit loops over (sequence, head, i, j, n): rotate key pair n of k_j by d_ij theta_n, dot with q_i.

    q, k, v: (S, H, T, E) float64 numpy; d: (S, T, T); mask (S, H, T, T) bool or None. Returns out, weights.
    """
    S, H, T, E = q.shape
    theta = [base ** (-2.0 * n / E) for n in range(E // 2)]
    scores = np.zeros((S, H, T, T))
    for s in range(S):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    total = 0.0
                    for n in range(E // 2):
                        a = d[s, i, j] * theta[n]
                        k0, k1 = k[s, h, j, 2 * n], k[s, h, j, 2 * n + 1]
                        r0 = k0 * math.cos(a) - k1 * math.sin(a)
                        r1 = k0 * math.sin(a) + k1 * math.cos(a)
                        total += q[s, h, i, 2 * n] * r0 + q[s, h, i, 2 * n + 1] * r1
                    scores[s, h, i, j] = total / math.sqrt(E)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return w @ v, w


def random_protocol(T, gen, *, b0=True, antipodal=True):
    """Multi-shell protocol with b0s and an exact antipodal pair."""
    bvals = np.array([[0.0, 1000.0, 2000.0, 3000.0, 1000.0][t % 5] for t in range(T)])
    g = gen.standard_normal((T, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    if antipodal and T > 3:
        g[3] = -g[1]
        bvals[3] = bvals[1]
    if b0:
        g[bvals == 0] = 0
    else:
        bvals[bvals == 0] = 500.0
    return bvals, g


def rel_err(a, b) -> float:
    a, b = (torch.as_tensor(x).detach().to(torch.float64) for x in (a, b))
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------------
# distance
# ---------------------------------------------------------------------------------------------------------


def test_distance_hand_values():
    s = 1 / math.sqrt(2)
    bvals = [0, 1000, 1000, 1000, 2000]
    bvecs = [[0, 0, 0], [1, 0, 0], [0.5, math.sqrt(3) / 2, 0], [-0.5, math.sqrt(3) / 2, 0], [0, 0, 1]]
    d = drope_distance(torch.tensor(bvals, dtype=torch.float64), torch.tensor(bvecs, dtype=torch.float64))
    assert d.dtype == torch.float64 and d.shape == (5, 5)
    assert d[0, 1] == pytest.approx(s)  # b0 vs b=1000: only the b-value term, alpha = 0
    assert d[0, 4] == pytest.approx(math.sqrt(0.5 * 4))  # b0 vs b=2000
    assert d[1, 2] == pytest.approx(math.pi / 3)  # 60 degrees
    assert d[1, 3] == pytest.approx(math.pi / 3)  # 120 degrees = 60 degrees antipodally
    assert d[1, 4] == pytest.approx(math.sqrt(0.5 + (math.pi / 2) ** 2))  # orthogonal, one shell apart
    np.testing.assert_allclose(d.numpy(), loop_distance(bvals, np.array(bvecs, float)), atol=1e-12)


def test_distance_symmetry_invariances_and_b0():
    gen = np.random.default_rng(0)
    bvals, g = random_protocol(12, gen)
    d = drope_distance(torch.tensor(bvals), torch.tensor(g, dtype=torch.float64))
    np.testing.assert_allclose(d.numpy(), loop_distance(bvals, np.where(bvals[:, None] < 50, 1.0, g)), atol=1e-12)
    assert torch.equal(d, d.T)
    assert torch.all(d.diagonal() == 0) and torch.all(d >= 0)
    assert d[1, 3] == 0  # exact antipodes on the same shell are the same point
    flipped = g.copy()
    flipped[[1, 2, 5]] *= -1
    d_flip = drope_distance(torch.tensor(bvals), torch.tensor(flipped, dtype=torch.float64))
    torch.testing.assert_close(d_flip, d, atol=1e-12, rtol=0)
    rot = np.linalg.qr(gen.standard_normal((3, 3)))[0]
    d_rot = drope_distance(torch.tensor(bvals), torch.tensor(g @ rot.T, dtype=torch.float64))
    torch.testing.assert_close(d_rot, d, atol=1e-7, rtol=0)
    # b0 rows ignore the (zero or arbitrary) b-vector: alpha = 0
    junk = g.copy()
    junk[bvals == 0] = gen.standard_normal(3)
    d_junk = drope_distance(torch.tensor(bvals), torch.tensor(junk, dtype=torch.float64))
    torch.testing.assert_close(d_junk, d, atol=0, rtol=0)
    b0 = np.flatnonzero(bvals == 0)
    for i in b0:
        np.testing.assert_allclose(d[i].numpy(), np.sqrt(0.5) * np.abs(bvals - bvals[i]) / 1000, atol=1e-12)


def test_distance_batched_matches_single_and_dtype():
    gen = np.random.default_rng(1)
    protos = [random_protocol(7, gen) for _ in range(3)]
    bvals = torch.tensor(np.stack([p[0] for p in protos]), dtype=torch.float32)
    bvecs = torch.tensor(np.stack([p[1] for p in protos]), dtype=torch.float32)
    d = drope_distance(bvals, bvecs)
    assert d.shape == (3, 7, 7) and d.dtype == torch.float32
    for b in range(3):
        torch.testing.assert_close(d[b], drope_distance(bvals[b], bvecs[b]))
    with pytest.raises(DRoPEShapeError, match="bvecs"):
        drope_distance(bvals, bvecs[..., :2])


# ---------------------------------------------------------------------------------------------------------
# attention against loops and the materialising twin
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
def test_attention_matches_loops(dtype, tol, masked, kernel):
    gen = np.random.default_rng(2)
    S, H, T, E = 2, 2, 5, 6
    q, k, v = (gen.standard_normal((S, H, T, E)) for _ in range(3))
    d = np.stack([loop_distance(*random_protocol(T, gen)) for _ in range(S)])
    mask = None
    if masked:
        mask = gen.random((S, H, T, T)) > 0.4
        mask[..., np.arange(T), np.arange(T)] = True
    ref_out, ref_w = loop_attention(q, k, v, d, base=0.3, mask=mask)
    t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    mask_t = None if mask is None else torch.tensor(mask)
    out, w = drope_attention(t(q), t(k), t(v), t(d), mask=mask_t, need_weights=True, kernel=kernel)
    assert out.dtype == dtype and out.shape == (S, H, T, E) and w.shape == (S, H, T, T)
    assert rel_err(out, ref_out) < tol
    assert rel_err(w, ref_w) < tol
    out_naive, w_naive = drope_attention_naive(t(q), t(k), t(v), t(d), mask=mask_t, need_weights=True)
    assert rel_err(out_naive, ref_out) < tol and rel_err(w_naive, ref_w) < tol
    if masked:
        assert torch.all(w[~mask_t] == 0)


def test_attention_base_and_rotation_direction():
    """A wrong rotation sign or frequency base breaks agreement with the loops."""
    gen = np.random.default_rng(3)
    q, k, v = (gen.standard_normal((1, 1, 4, 4)) for _ in range(3))
    d = loop_distance(*random_protocol(4, gen, b0=False))[None]
    t = lambda a: torch.tensor(a)  # noqa: E731
    ref, _ = loop_attention(q, k, v, d, base=2.0)
    assert rel_err(drope_attention(t(q), t(k), t(v), t(d), base=2.0), ref) < 1e-12
    assert rel_err(drope_attention(t(q), t(k), t(v), t(d), base=0.3), ref) > 1e-3
    assert rel_err(drope_attention(t(q), t(k), t(v), -t(d), base=2.0), ref) > 1e-3  # opposite rotation


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kernel", [True, False])
def test_gradients_and_chunking_match_naive(monkeypatch, dtype, tol, kernel):
    """Several chunks with a remainder, several protocol groups (distance (B, 1, T, T)), a mask: outputs, weights
    and q/k/v gradients equal the autograd gradients of the materialising twin."""
    monkeypatch.setitem(drope_mod.CHUNK_BYTES, "cpu", 3 * 7 * 7 * 8 * 8)  # 3 sequences per chunk (fp64 size)
    gen = torch.Generator().manual_seed(4)
    B, P, H, T, E = 2, 5, 3, 7, 8
    q, k, v = (torch.randn(B, P, H, T, E, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    rng = np.random.default_rng(4)
    protos = [random_protocol(T, rng) for _ in range(B)]
    d = drope_distance(torch.tensor(np.stack([p[0] for p in protos])), torch.tensor(np.stack([p[1] for p in protos])))
    d = d.to(dtype)[:, None]  # (B, 1, T, T): one protocol per batch element, shared by its P positions
    mask = torch.rand(B, P, 1, T, T, generator=gen) > 0.3
    mask |= torch.eye(T, dtype=torch.bool)
    out, w = drope_attention(q, k, v, d, mask=mask, need_weights=True, kernel=kernel)
    ref, w_ref = drope_attention_naive(q, k, v, d, mask=mask, need_weights=True)
    assert rel_err(out, ref) < tol and rel_err(w, w_ref) < tol
    grad_out = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad((out * grad_out).sum() + (w**2).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * grad_out).sum() + (w_ref**2).sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < tol


def test_distance_broadcast_over_middle_dims():
    """distance (P, T, T) against q (B, P, H, T, E): broadcast over B, per-P protocols."""
    gen = torch.Generator().manual_seed(5)
    B, P, H, T, E = 3, 2, 2, 4, 4
    q, k, v = (torch.randn(B, P, H, T, E, generator=gen, dtype=torch.float64) for _ in range(3))
    rng = np.random.default_rng(5)
    d = torch.tensor(np.stack([loop_distance(*random_protocol(T, rng)) for _ in range(P)]))
    out = drope_attention(q, k, v, d)
    for b in range(B):
        for p in range(P):
            one = [t[b, p][None].numpy() for t in (q, k, v)]
            ref, _ = loop_attention(*one, d[p][None].numpy())
            assert rel_err(out[b, p], ref[0]) < 1e-12


def test_zero_distance_is_plain_attention():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(4, 3, 9, 16, generator=gen) for _ in range(3))
    mask = torch.rand(4, 1, 9, 9, generator=gen) > 0.5
    mask |= torch.eye(9, dtype=torch.bool)
    zero = torch.zeros(9, 9)
    plain = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(drope_attention(q, k, v, zero), plain, atol=1e-6, rtol=1e-5)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(drope_attention(q, k, v, zero, mask=mask), plain, atol=1e-6, rtol=1e-5)


def test_half_precision_runs_in_float32():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=gen) for _ in range(3))
    d = torch.rand(5, 5, generator=gen)
    d = d + d.T
    out = drope_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), d)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), drope_attention(q, k, v, d), atol=3e-2, rtol=3e-2)


def test_autocast_context_keeps_float32_core():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(3, 2, 6, 8, generator=gen, requires_grad=True) for _ in range(3))
    d = torch.rand(6, 6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = drope_attention(q, k, v, d)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, drope_attention_naive(q, k, v, d), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("kernel", [True, False])
def test_saved_memory_does_not_grow_with_t2_e(kernel):
    """What autograd keeps for backward is O(q + k + v + scores), not the (.., T, T, E) rotated keys."""
    S, H, T, E = 6, 2, 12, 32

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        q, k, v = (torch.randn(S, H, T, E, requires_grad=True) for _ in range(3))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, k, v, torch.rand(T, T))
        return sum(total)

    qkv = 3 * S * H * T * E * 4
    scores = S * H * T * T * 4
    rotated = S * H * T * T * E * 4
    bound = 2 * qkv + 4 * scores + T * T * E * 8
    assert saved_bytes(lambda *a: drope_attention(*a, kernel=kernel)) < bound < rotated
    assert saved_bytes(drope_attention_naive) > rotated  # the check can fail: the naive twin keeps rotated keys


def test_chunk_buffer_is_bounded(monkeypatch):
    """The work buffer stays within the byte budget whatever the number of sequences; when one sequence exceeds it,
    its query / key rows are split (and the results stay exact)."""
    sizes = []
    real = drope_mod._rotated

    def spy(xc, table, buf):
        sizes.append(buf.numel() * buf.element_size())
        return real(xc, table, buf)

    monkeypatch.setattr(drope_mod, "_rotated", spy)
    T, E = 10, 16
    for S in (4, 400):
        q = torch.randn(S, 2, T, E, requires_grad=True)
        drope_attention(q, q, q, torch.rand(T, T), kernel=False).sum().backward()
    assert max(sizes) <= drope_mod.CHUNK_BYTES["cpu"]
    sizes.clear()
    monkeypatch.setitem(drope_mod.CHUNK_BYTES, "cpu", 3 * T * E * 8)  # less than one sequence: 3 rows per block
    q = torch.randn(2, 2, T, E, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q)
    d = torch.rand(T, T, dtype=torch.float64)
    out = drope_attention(q, k, v, d, kernel=False)
    ref = drope_attention_naive(q, k, v, d)
    assert rel_err(out, ref) < 1e-12
    grads = torch.autograd.grad(out.square().sum(), (q, k))
    for g, g_ref in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k))):
        assert rel_err(g, g_ref) < 1e-12
    assert max(sizes) == 3 * T * E * 8  # rows of 3 (blocks 3, 3, 3, 1): bounded by the budget, not by T^2 E


def test_shape_errors():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(DRoPEShapeError, match="even"):
        drope_attention(q[..., :7], q[..., :7], q[..., :7], torch.zeros(5, 5))
    with pytest.raises(DRoPEShapeError, match="distance"):
        drope_attention(q, q, q, torch.zeros(4, 4))
    with pytest.raises(DRoPEShapeError, match="broadcast"):
        drope_attention(q, q, q, torch.zeros(3, 5, 5))
    with pytest.raises(DRoPEShapeError, match="bool"):
        drope_attention(q, q, q, torch.zeros(5, 5), mask=torch.ones(5, 5))


# ---------------------------------------------------------------------------------------------------------
# fused CPU kernels
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_lib():
    lib = kernel_mod.load()
    if lib is None:
        pytest.skip("no C compiler: the fused kernels cannot be built here")
    return lib


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the kernel entry points called (``attention`` = the fused path, ``scores`` = the score kernel)."""
    calls = []
    for name in ("attention", "scores"):
        real = getattr(kernel_mod, name)
        monkeypatch.setattr(kernel_mod, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def _check_against_naive(q, k, v, d, tol, **kwargs):
    """Output (and weights) and q/k/v gradients of drope_attention(**kwargs) against the naive twin."""
    out = drope_attention(q, k, v, d, **kwargs)
    ref = drope_attention_naive(q, k, v, d, mask=kwargs.get("mask"), need_weights=kwargs.get("need_weights", False))
    if kwargs.get("need_weights"):
        (out, w), (ref, w_ref) = out, ref
        assert rel_err(w, w_ref) < tol
    assert out.shape == ref.shape and rel_err(out, ref) < tol
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, (q, k, v), grad_out)):
        assert rel_err(g, g_ref) < tol


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fused_attention_matches_naive(kernel_lib, kernel_calls, threads, dtype, tol):
    """The fused path (no mask, no weights): partial lane blocks (M = 21, 37 rows), T past a register block and a
    cache tile (T = 67, not a multiple of 4 or 64) and below them (T = 5), E = 2, values of another width than q,
    several protocols (distance (B, 1, T, T)), a non-symmetric distance, work split over threads: output and
    q/k/v gradients exact; the chunked path (kernel=False) agrees too."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(11)
    # q's leading dims up to H, distance's leading dims, T, E, Ev, G = protocols = kernel calls
    shapes = (((7, 3), (), 67, 2, 2, 1), ((7, 3), (), 5, 10, 6, 1), ((2, 37, 1), (2, 1), 9, 8, 8, 2))
    for lead, d_lead, T, E, Ev, G in shapes:
        q, k = (torch.randn(*lead, T, E, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(*lead, T, Ev, generator=gen, dtype=dtype, requires_grad=True)
        d = 3 * torch.rand(*d_lead, T, T, generator=gen, dtype=dtype)
        for kernel in (True, False):
            kernel_calls.clear()
            _check_against_naive(q, k, v, d, tol, kernel=kernel)
            assert kernel_calls == ["attention"] * (G if kernel else 0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fused_attention_with_masks_matches_naive(kernel_lib, kernel_calls, threads, dtype, tol):
    """Masks run in the fused kernel: one mask shared by the heads (B, P, 1, T, T) as the model's diffusion mask
    (key padding | self) with H = 3 so that lane blocks of 16 sequences straddle mask rows, a mask per head, a
    key-padding mask (..., 1, 1, T) broadcast over heads and query rows, and one (T, T) for every sequence."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(13)
    B, P, H, T, E = 2, 9, 3, 67, 6
    q, k, v = (torch.randn(B, P, H, T, E, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    d = 3 * torch.rand(B, 1, T, T, generator=gen, dtype=dtype)
    eye = torch.eye(T, dtype=torch.bool)
    masks = (
        (torch.rand(B, P, 1, 1, T, generator=gen) > 0.5) | eye,
        (torch.rand(B, P, H, T, T, generator=gen) > 0.3) | eye,
        (torch.rand(B, P, 1, 1, T, generator=gen) > 0.5).index_fill(-1, torch.tensor([0]), True),
        (torch.rand(T, T, generator=gen) > 0.6) | eye,
    )
    for mask in masks:
        kernel_calls.clear()
        _check_against_naive(q, k, v, d, tol, mask=mask)
        assert kernel_calls == ["attention"] * B


def test_masked_keys_get_exactly_zero_weight(kernel_lib, kernel_calls):
    """A masked key contributes nothing at all, however large its value (not e^-87 of it)."""
    gen = torch.Generator().manual_seed(14)
    S, H, T, E = 20, 2, 8, 4
    q, k, v = (torch.randn(S, H, T, E, generator=gen) for _ in range(3))
    d = torch.rand(T, T, generator=gen)
    mask = torch.ones(S, 1, 1, T, dtype=torch.bool)
    mask[..., 5] = False
    ref = drope_attention_naive(q, k, v, d, mask=mask)
    v[..., 5, :] = 1e35
    out = drope_attention(q, k, v, d, mask=mask)
    assert kernel_calls == ["attention"]
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_maps_take_the_score_kernel(kernel_lib, kernel_calls, dtype, tol, masked):
    """Attention maps (need_weights) take the score kernel + softmax in torch (not the fused path); still exact."""
    gen = torch.Generator().manual_seed(13)
    B, P, H, T, E = 2, 9, 3, 67, 6
    q, k, v = (torch.randn(B, P, H, T, E, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    d = 3 * torch.rand(B, 1, T, T, generator=gen, dtype=dtype)
    mask = None
    if masked:
        mask = (torch.rand(B, P, 1, T, T, generator=gen) > 0.3) | torch.eye(T, dtype=torch.bool)
    _check_against_naive(q, k, v, d, tol, mask=mask, need_weights=True)
    assert set(kernel_calls) == {"scores"}


def test_fused_attention_saves_no_t2_tensor(kernel_lib, kernel_calls):
    """What the fused path keeps for backward is q, k, v, the row logsumexp and the (T, T, N) cos / sin tables:
    no tensor of (M, T, T) elements, unlike the score path (mask / weights), which keeps the probabilities."""
    S, H, T, E = 40, 2, 24, 8

    def saved(**kwargs):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        q, k, v = (torch.randn(S, H, T, E, requires_grad=True) for _ in range(3))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            drope_attention(q, k, v, torch.rand(T, T), **kwargs)
        return sizes

    fused = saved()
    assert kernel_calls == ["attention"]
    assert max(fused) < S * H * T * T
    assert sum(fused) == 3 * S * H * T * E + S * H * T + 2 * T * T * E // 2
    assert max(saved(need_weights=True)) >= S * H * T * T  # the check can fail: the score path keeps them


def test_cpu_uses_the_kernel_unless_told_not_to(kernel_lib, kernel_calls):
    q = torch.randn(2, 2, 5, 4)
    drope_attention(q, q, q, torch.rand(5, 5))
    assert kernel_calls == ["attention"]
    kernel_calls.clear()
    drope_attention(q, q, q, torch.rand(5, 5), kernel=False)
    assert not kernel_calls


def test_no_compiler_falls_back_once(monkeypatch, tmp_path, caplog):
    """Without a working C compiler the chunked path runs (same results) and the log says so once."""
    monkeypatch.setattr(kernel_mod, "_state", {})
    monkeypatch.setenv("DROPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    d = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="DRoPE.model.drope_kernel"):
        for _ in range(3):
            assert rel_err(drope_attention(q, k, v, d), drope_attention_naive(q, k, v, d)) < 1e-12
    assert kernel_mod.load() is None
    assert sum("chunked path" in r.getMessage() for r in caplog.records) == 1


def test_kernel_builds_into_the_cache(monkeypatch, tmp_path):
    """A fresh cache folder gets the compiled library, and a second process-level load reuses it."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(kernel_mod, "_state", {})
    monkeypatch.setenv("DROPE_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert kernel_mod.load() is not None
    built = list(tmp_path.glob("drope_kernel_*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no staging folder left


# ---------------------------------------------------------------------------------------------------------
# the compiled path (CUDA and other accelerators), checked here with Inductor's CPU backend
# ---------------------------------------------------------------------------------------------------------


def _core_inputs(G, M, T, E, dtype, gen):
    q, k, v = (torch.randn(G, M, T, E, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3))
    d = 3 * torch.rand(G, T, T, generator=gen, dtype=dtype)
    angle = drope_mod.drope_angles(d, E, drope_mod.DEFAULT_BASE)
    return q, k, v, d, angle.cos(), angle.sin()


needs_cxx = pytest.mark.skipif(
    not any(map(shutil.which, ("c++", "g++", "clang++"))), reason="Inductor's CPU backend needs a C++ compiler"
)


@needs_cxx
def test_compiled_table_attention_matches_naive():
    """The function torch.compile turns into a Triton kernel on CUDA, compiled here for CPU: output and q/k/v
    gradients equal the naive form for two protocols, a mask shared by H = 3 heads (M = 21 not a multiple of 16)
    and, without recompiling for new sizes, another T and M unmasked."""
    gen = torch.Generator().manual_seed(21)
    compiled = drope_mod.compiled_table_attention()
    for G, M, T, E, masked in ((2, 21, 9, 8, True), (1, 12, 13, 6, False)):
        q, k, v, d, cos, sin = _core_inputs(G, M, T, E, torch.float32, gen)
        mask = None
        if masked:
            mask = (torch.rand(G, M // 3, T, T, generator=gen) > 0.4) | torch.eye(T, dtype=torch.bool)
        out = drope_mod._call_compiled(compiled, q, k, v, cos, sin, mask, 1 / math.sqrt(E))
        naive_mask = None if mask is None else mask.repeat_interleave(3, dim=1)
        ref = drope_attention_naive(q, k, v, d, mask=naive_mask)
        assert rel_err(out, ref) < 1e-5
        grad_out = torch.randn(out.shape, generator=gen)
        grads, grads_ref = (torch.autograd.grad(x, (q, k, v), grad_out) for x in (out, ref))
        for g, g_ref in zip(grads, grads_ref):
            assert rel_err(g, g_ref) < 1e-5


COMPILED_MEMORY_PROBE = r"""
import math, torch
from DRoPE.bench import _maxrss_bytes, _rss_bytes
from DRoPE.model import drope
torch.set_num_threads(1)
G, M, T, E = 1, 2000, 90, 128
compiled = drope.compiled_table_attention()
cos, sin = (f(drope.drope_angles(torch.rand(G, T, T), E, 0.3)) for f in (torch.cos, torch.sin))
def run(m):
    q, k, v = (torch.randn(G, m, T, E, requires_grad=True) for _ in range(3))
    drope._call_compiled(compiled, q, k, v, cos, sin, None, 1 / math.sqrt(E)).backward(torch.randn(G, m, T, E))
run(16)  # compiles
inputs = [torch.randn(G, M, T, E, requires_grad=True) for _ in range(3)]
base = _rss_bytes()
out = drope._call_compiled(compiled, *inputs, cos, sin, None, 1 / math.sqrt(E))
out.backward(torch.randn_like(out))
print(_maxrss_bytes() - base)
"""


@pytest.mark.slow
@needs_cxx
def test_compiled_path_never_stores_the_pair_products():
    """Forward + backward of the compiled path at 2000 sequences, T = 90, E = 128 need far less than the
    (M, T, T, N) products (3.9 GiB) that autograd through the compiled forward stored (9.3 GB measured)."""
    done = subprocess.run([sys.executable, "-c", COMPILED_MEMORY_PROBE], capture_output=True, text=True, check=True)
    extra = int(done.stdout.split()[-1])
    products = 2000 * 90 * 90 * 64 * 4
    assert extra < 0.3 * products, f"{extra / 2**30:.2f} GiB"


def test_compiled_path_failure_falls_back_once(monkeypatch, caplog):
    """When torch.compile cannot build the kernel (no Triton, an Inductor error), the chunked path runs and the
    log says so once; later calls no longer try."""
    calls = []

    def broken(*args):
        calls.append(1)
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no triton"), None)

    monkeypatch.setattr(drope_mod, "_compiled", {"fn": (broken, broken)})
    q = torch.randn(1, 2, 3, 4)
    with caplog.at_level("WARNING", logger="DRoPE.model.drope"):
        assert drope_mod._call_compiled(drope_mod.compiled_table_attention(), q, q, q, q, q, None, 1.0) is None
        assert drope_mod.compiled_table_attention() is None
    assert calls == [1] and sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1


def test_compiled_path_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(drope_mod, "_compiled", {})
    monkeypatch.setenv("DROPE_COMPILE", "0")
    assert drope_mod.compiled_table_attention() is None
    monkeypatch.setattr(drope_mod, "_compiled", {})
    monkeypatch.setenv("DROPE_COMPILE", "1")
    assert drope_mod.compiled_table_attention() is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_cuda_matches_cpu(dtype, tol):
    """On CUDA the compiled path runs (Triton via Inductor), masked and not, and matches the naive form on CPU."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(3, 21, 3, 30, 8, generator=gen, dtype=dtype) for _ in range(3))
    d = torch.rand(3, 1, 30, 30, generator=gen, dtype=dtype)
    mask = (torch.rand(3, 21, 1, 30, 30, generator=gen) > 0.4) | torch.eye(30, dtype=torch.bool)
    for m in (None, mask):
        leaves = [t.cuda().requires_grad_() for t in (q, k, v)]
        out = drope_attention(*leaves, d.cuda(), mask=None if m is None else m.cuda())
        assert drope_mod.compiled_table_attention() is not None  # it compiled, no fallback
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = drope_attention_naive(*ref_leaves, d, mask=m)
        assert rel_err(out.cpu(), ref) < tol
        grad_out = torch.randn(out.shape, generator=gen, dtype=dtype)
        grads = torch.autograd.grad(out, leaves, grad_out.cuda())
        for g, g_ref in zip(grads, torch.autograd.grad(ref, ref_leaves, grad_out)):
            assert rel_err(g.cpu(), g_ref) < tol


def test_bench_quick_smoke(capsys):
    assert bench.main(["--quick", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("sdpa_rope" in line for line in lines) and any("skipped" in line for line in lines)
    ratios = [line for line in lines if "drope/sdpa_rope: time" in line]
    assert len(ratios) == len(bench.QUICK_CASES)
    assert all(float(line.split("max_rel_err ")[1]) < 1e-5 for line in ratios)
    last = lines[-1]
    assert last.startswith("drope/sdpa_rope time_ratio=") and "mem_ratio=" in last
    assert float(last.split("max_rel_err=")[1]) < 1e-5
