"""Fused CPU kernels for D-RoPE scores and their gradients, compiled once per machine with the C compiler.

The score never forms rotated keys (shape letters as in ``drope``; n = 0..N-1 the rotation planes):

    s_ij = scale * sum_n C_ijn (q_i,2n k_j,2n + q_i,2n+1 k_j,2n+1) + S_ijn (q_i,2n+1 k_j,2n - q_i,2n k_j,2n+1)
    dq_i,2n = sum_j g_ij (C_ijn k_j,2n - S_ijn k_j,2n+1)      dq_i,2n+1 = sum_j g_ij (C_ijn k_j,2n+1 + S_ijn k_j,2n)
    dk_j,2n = sum_i g_ij (C_ijn q_i,2n + S_ijn q_i,2n+1)      dk_j,2n+1 = sum_i g_ij (C_ijn q_i,2n+1 - S_ijn q_i,2n)

with C = cos(d_ij theta_n), S = sin(d_ij theta_n) and g = dL/ds (dq, dk then times scale). The tables are shared
by every sequence of one protocol, so the sequences are the inner, vectorised axis: q and k are taken in blocks of
LANES sequences, copied per block into a lane-layout (T, E, LANES) scratch, and one table entry serves a whole
vector of sequences. Register blocks of IB output rows and cache tiles of JT rows keep the loads in L1 / L2.
Written in C with GCC/Clang vector types (one lane vector per AVX-512 register with -march=native); q, k, dq, dk
(M, T, E) and s, g (M, Ti, Tj) are read and written in their ordinary layouts.

``load()`` compiles the source into a cache folder ($DROPE_CACHE, else $XDG_CACHE_HOME/drope, else
~/.cache/drope) the first time and returns the loaded library, or None when there is no working compiler (the
caller then uses its portable path and says so once).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LANES = 16  # sequences per vector: one AVX-512 register of float32
X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if X86 else ()), "-shared", "-fPIC", "-std=gnu99")

SOURCE = r"""
#include <stdlib.h>
#define L 16   /* lanes: sequences per vector */
#define IB 4   /* output rows per register block (the other operand's loads serve IB rows) */
#define JT 64  /* rows of the other operand per cache tile (JT * E * L values stay in L2) */
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* q, k, dq, dk: (M, T, E); s, g: (M, T, T). Work on lane blocks b0 <= b < b1: block b holds rows b*L .. b*L+L-1
   (rows past M are zero padding), copied into a lane layout (T, E, L) scratch before use. Rows past T of a register
   block repeat row T-1 and are not stored. V: a vector of L lanes (GCC/Clang vector extension). */
#define KERNELS(R, SUF)                                                                                        \
typedef R V##SUF __attribute__((vector_size(L * sizeof(R)), aligned(sizeof(R))));                             \
/* Rows b*L .. b*L+rows-1 of x (M, T, E) into the lane layout out (T, E, L); missing rows are zero. */         \
static void to_lanes_##SUF(const R *restrict x, R *restrict out, long b, long rows, long T, long E) {         \
    for (long t = 0; t < T * E; t++)                                                                          \
        for (long l = 0; l < L; l++) out[t * L + l] = l < rows ? x[(b * L + l) * T * E + t] : 0;             \
}                                                                                                             \
/* C, S: (Ti, Tj, N). */                                                                                      \
int scores_##SUF(const R *restrict q, const R *restrict k, const R *restrict C, const R *restrict S,          \
                 R *restrict s, long M, long T, long E, R scale, long b0, long b1) {                          \
    typedef V##SUF V;                                                                                         \
    long N = E / 2;                                                                                           \
    R *qb = malloc(sizeof(R) * 2 * T * E * L), *kb = qb + T * E * L;  /* one block of q and k, lane layout */ \
    if (!qb) return 1;                                                                                        \
    for (long b = b0; b < b1; b++) {                                                                          \
        long rows = MIN(M - b * L, L);                                                                        \
        to_lanes_##SUF(q, qb, b, rows, T, E);                                                                 \
        to_lanes_##SUF(k, kb, b, rows, T, E);                                                                 \
        for (long j0 = 0; j0 < T; j0 += JT)                                                                   \
        for (long i0 = 0; i0 < T; i0 += IB) {                                                                 \
            long ii[IB];                                                                                      \
            for (int r = 0; r < IB; r++) ii[r] = MIN(i0 + r, T - 1);                                          \
            for (long j = j0; j < MIN(j0 + JT, T); j++) {                                                     \
                const R *kj = kb + j * E * L;                                                                 \
                V acc[IB] = {0};                                                                              \
                for (long n = 0; n < N; n++) {                                                                \
                    V k0 = *(const V *)(kj + 2 * n * L), k1 = *(const V *)(kj + (2 * n + 1) * L);             \
                    _Pragma("GCC unroll 8")                                                                   \
                    for (int r = 0; r < IB; r++) {                                                            \
                        V q0 = *(const V *)(qb + (ii[r] * E + 2 * n) * L);                                    \
                        V q1 = *(const V *)(qb + (ii[r] * E + 2 * n + 1) * L);                                \
                        R cn = C[(ii[r] * T + j) * N + n], sv = S[(ii[r] * T + j) * N + n];                   \
                        acc[r] += cn * (q0 * k0 + q1 * k1) + sv * (q1 * k0 - q0 * k1);                        \
                    }                                                                                         \
                }                                                                                             \
                for (int r = 0; r < IB && i0 + r < T; r++)                                                    \
                    for (long l = 0; l < rows; l++) s[((b * L + l) * T + i0 + r) * T + j] = scale * acc[r][l]; \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    free(qb);                                                                                                 \
    return 0;                                                                                                 \
}                                                                                                             \
/* d_i = sum_j g_ij (C_inj x_j + sign S_inj swap(x_j)) per plane n: x the other operand (k for dq, q for dk);    \
   C, S: (Ti, N, Tj) tables indexed by (output row, plane, summed row); transpose: read g[j, i] (dk), not g[i, j]. \
   Rows j go in cache tiles of JT, copied plane-major (E, JT, L) so the inner loop over j reads contiguously and \
   the IB output rows x 2 channels accumulate in registers. */                                                 \
static int grad_##SUF(const R *restrict x, const R *restrict C, const R *restrict S, const R *restrict g,      \
                      R *restrict dx, long M, long T, long E, R scale, R sign, int transpose, long b0, long b1) { \
    typedef V##SUF V;                                                                                         \
    long N = E / 2;                                                                                           \
    R *gr = malloc(sizeof(R) * (IB * JT * L + E * JT * L));  /* g (IB, JT, L) of one block; x tile (E, JT, L) */ \
    if (!gr) return 1;                                                                                        \
    R *xt = gr + IB * JT * L;                                                                                 \
    for (long b = b0; b < b1; b++) {                                                                          \
        long rows = MIN(M - b * L, L);                                                                        \
        for (long j0 = 0; j0 < T; j0 += JT) {                                                                 \
            long jn = MIN(JT, T - j0);                                                                        \
            for (long j = 0; j < jn; j++)                                                                     \
                for (long e = 0; e < E; e++)                                                                  \
                    for (long l = 0; l < L; l++)                                                              \
                        xt[(e * JT + j) * L + l] = l < rows ? x[((b * L + l) * T + j0 + j) * E + e] : 0;      \
            for (long i0 = 0; i0 < T; i0 += IB) {                                                             \
                long ii[IB];                                                                                  \
                for (int r = 0; r < IB; r++) ii[r] = MIN(i0 + r, T - 1);                                      \
                for (int r = 0; r < IB; r++)                                                                  \
                    for (long j = 0; j < jn; j++)                                                             \
                        for (long l = 0; l < L; l++)                                                          \
                            gr[(r * JT + j) * L + l] = l < rows ?                                             \
                                g[(b * L + l) * T * T + (transpose ? (j0 + j) * T + ii[r] : ii[r] * T + j0 + j)] : 0; \
                for (long n = 0; n < N; n++) {                                                                \
                    V acc0[IB] = {0}, acc1[IB] = {0};                                                         \
                    const R *x0p = xt + 2 * n * JT * L, *x1p = x0p + JT * L;                                  \
                    for (long j = 0; j < jn; j++) {                                                           \
                        V x0 = *(const V *)(x0p + j * L), x1 = *(const V *)(x1p + j * L);                     \
                        _Pragma("GCC unroll 8")                                                               \
                        for (int r = 0; r < IB; r++) {                                                        \
                            V gv = *(const V *)(gr + (r * JT + j) * L);                                       \
                            long t = (ii[r] * N + n) * T + j0 + j;                                            \
                            V a = gv * C[t], bb = gv * (sign * S[t]);                                         \
                            acc0[r] += a * x0 + bb * x1;                                                      \
                            acc1[r] += a * x1 - bb * x0;                                                      \
                        }                                                                                     \
                    }                                                                                         \
                    for (int r = 0; r < IB && i0 + r < T; r++)                                               \
                        for (long l = 0; l < rows; l++) {                                                     \
                            R *d = dx + ((b * L + l) * T + i0 + r) * E + 2 * n;                               \
                            d[0] = (j0 ? d[0] : 0) + scale * acc0[r][l];                                      \
                            d[1] = (j0 ? d[1] : 0) + scale * acc1[r][l];                                      \
                        }                                                                                     \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    free(gr);                                                                                                 \
    return 0;                                                                                                 \
}                                                                                                             \
int dq_##SUF(const R *k, const R *C, const R *S, const R *g, R *dq, long M, long T, long E, R scale,        \
             long b0, long b1) { return grad_##SUF(k, C, S, g, dq, M, T, E, scale, -1, 0, b0, b1); }          \
int dk_##SUF(const R *q, const R *C, const R *S, const R *g, R *dk, long M, long T, long E, R scale,        \
             long b0, long b1) { return grad_##SUF(q, C, S, g, dk, M, T, E, scale, 1, 1, b0, b1); }

KERNELS(float, f32)
KERNELS(double, f64)
"""

_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    if os.environ.get("DROPE_CACHE"):
        return Path(os.environ["DROPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "drope"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and flags (so a shared cache never serves a foreign build)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "".join(lines)


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "drope_kernel.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: concurrent processes never load a half-written library


def load():
    """The compiled kernel library (ctypes.CDLL), or None when it cannot be built here; tried once per process."""
    with _lock:
        if "lib" not in _state:
            key = hashlib.sha256((SOURCE + " ".join(FLAGS) + _cpu_key()).encode()).hexdigest()[:16]
            target = _cache_dir() / f"drope_kernel_{key}.so"
            try:
                if not target.exists():
                    _compile(target)
                lib = ctypes.CDLL(str(target))
                _declare(lib)
                _state["lib"] = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                log.warning("D-RoPE: no fused CPU kernel (%s); using the portable chunked path (slower)", err)
                _state["lib"] = None
        return _state["lib"]


def _declare(lib) -> None:
    p, i = ctypes.c_void_p, ctypes.c_long
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        getattr(lib, f"scores_{suffix}").argtypes = [p, p, p, p, p, i, i, i, real, i, i]
        getattr(lib, f"scores_{suffix}").restype = ctypes.c_int
        for name in ("dq", "dk"):
            getattr(lib, f"{name}_{suffix}").argtypes = [p, p, p, p, p, i, i, i, real, i, i]
            getattr(lib, f"{name}_{suffix}").restype = ctypes.c_int


def _run(fn, *args, blocks: int) -> None:
    """Call fn(*args, b0, b1) over lane blocks, split across torch's intra-op thread count (ctypes drops the GIL)."""
    workers = max(1, min(torch.get_num_threads(), blocks))
    edges = [blocks * w // workers for w in range(workers + 1)]
    if workers == 1:
        codes = [fn(*args, 0, blocks)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            codes = list(pool.map(lambda w: fn(*args, edges[w], edges[w + 1]), range(workers)))
    if any(codes):
        raise MemoryError("D-RoPE kernel could not allocate its work buffers")


def _suffix(x: torch.Tensor) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[x.dtype]


def scores(lib, q, k, cos, sin, out: torch.Tensor, scale: float) -> None:
    """q, k (M, T, E) contiguous; cos, sin (Ti, Tj, N) -> out (M, Ti, Tj) = scaled scores."""
    M, T, E = q.shape
    fn = getattr(lib, f"scores_{_suffix(q)}")
    _run(fn, *[t.data_ptr() for t in (q, k, cos, sin, out)], M, T, E, scale, blocks=-(-M // LANES))


def grads(lib, x, cos, sin, g: torch.Tensor, scale: float, dq: torch.Tensor | None, dk: torch.Tensor | None) -> None:
    """g (M, Ti, Tj) = dL/ds, contiguous; x: k (M, T, E) to fill dq, or q to fill dk (the other None).

    dq / dk: (M, T, E) contiguous, filled with scale * dS . R k / scale * dS^T . R^T q."""
    M, T, E = x.shape
    out, name, transpose = (dq, "dq", False) if dq is not None else (dk, "dk", True)
    order = (1, 2, 0) if transpose else (0, 2, 1)
    c, s = (t.permute(*order).contiguous() for t in (cos, sin))  # (output row, N, summed row)
    fn = getattr(lib, f"{name}_{_suffix(x)}")
    _run(fn, *[t.data_ptr() for t in (x, c, s, g, out)], M, T, E, scale, blocks=-(-M // LANES))
