"""Fused CPU kernels for D-RoPE attention, compiled once per machine with the C compiler.

The score never forms rotated keys (shape letters as in ``drope``; n = 0..N-1 the rotation planes):

    s_ij = scale * sum_n C_ijn (q_i,2n k_j,2n + q_i,2n+1 k_j,2n+1) + S_ijn (q_i,2n+1 k_j,2n - q_i,2n k_j,2n+1)
    dq_i,2n = sum_j g_ij (C_ijn k_j,2n - S_ijn k_j,2n+1)      dq_i,2n+1 = sum_j g_ij (C_ijn k_j,2n+1 + S_ijn k_j,2n)
    dk_j,2n = sum_i g_ij (C_ijn q_i,2n + S_ijn q_i,2n+1)      dk_j,2n+1 = sum_i g_ij (C_ijn q_i,2n+1 - S_ijn q_i,2n)

with C = cos(d_ij theta_n), S = sin(d_ij theta_n) and g = dL/ds (dq, dk then times scale). The tables are shared
by every sequence of one protocol, so the sequences are the inner, vectorised axis: the work goes in blocks of
LANES sequences, each copied into lane layout ((T, E, LANES) for q, k, v; (Ti, Tj, LANES) for scores) so that one
table entry serves a whole vector of sequences. Register blocks (IB x JB score pairs, IB x CB outputs) and cache tiles
of key rows keep the loads in L1 / L2; dq and dk come from one pass over (i, j). Written in C with GCC/Clang vector
types (one lane vector per AVX-512 register with -march=native), one multiply-add per statement so that each
compiles to one FMA.

Two entry points:

- ``attention`` / ``attention_backward``: the whole attention, out = softmax(s) v, fused per lane block, with an
  optional byte mask (one (T, T) row per group of hrep sequences, e.g. the heads of one sequence; a masked pair
  gets probability exactly 0). The forward keeps one block's scores (Ti, Tj, LANES) in per-thread scratch, takes
  the softmax there (a vectorised exp) and returns only out (M, T, Ev) and the row logsumexp lse (M, T). The
  backward recomputes p = exp(s - lse) block by block and forms dv, ds = p (dp - rowsum(p dp)) with dp = dout . v,
  and dq, dk from it in scratch: no float array of size M T^2 exists.
- ``scores`` / ``grads``: the scores s (M, Ti, Tj) and, from g = dL/ds (M, Ti, Tj), dq and dk (for attention maps,
  where the caller takes the softmax itself). Same block loops, with s / g copied to and from the lane layout.

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
from pathlib import Path

import torch

from ..parallel import thread_map

log = logging.getLogger(__name__)

LANES = 16  # sequences per vector: one AVX-512 register of float32
X86 = platform.machine().lower() in ("x86_64", "amd64")
FLAGS = ("-O3", "-march=native", *(("-mprefer-vector-width=512",) if X86 else ()), "-shared", "-fPIC", "-std=gnu99")

SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#define L 16   /* lanes: sequences per vector */
#define IB 4   /* output rows per register block (the other operand's loads serve IB rows) */
#define JB 2   /* key rows per register block of the scores */
#define CB 4   /* output columns per register block of the lane products */
#define JT 64  /* key rows per cache tile of the scores (JT * E * L values stay in L2) */
#define JG 32  /* key rows per cache tile of the gradients (k and its dk accumulators: 2 * JG * E * L values) */
#define KT 64  /* summed indices per cache tile of the lane products */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Every function works on lane blocks b0 <= b < b1 of L sequences: block b holds sequences b*L .. b*L+L-1 of
   q, k, dq, dk (M, T, E), v, out, dout, dv (M, T, Ev), lse (M, T), s, g (M, T, T) (rows past M: zero padding, never
   stored). Inside a block every array is in lane layout, (..., L) with the sequences last, so that one table entry
   serves a vector of L sequences: q, k (T, E, L), scores / probabilities (Ti, Tj, L). V: a vector of L lanes
   (GCC/Clang vector extension), VI: the integer vector of the same layout. Register blocks past the end repeat the
   last row / column and are not stored. Tables: C, S (Ti, Tj, N) for the scores, from grad_table for the gradients. */
#define KERNELS(R, I, SUF, EXP_DEGREE, EXP_LO, MANT, BIAS)                                                             \
typedef R V##SUF __attribute__((vector_size(L * sizeof(R)), aligned(sizeof(R))));                                      \
typedef I VI##SUF __attribute__((vector_size(L * sizeof(I)), aligned(sizeof(I))));                                     \
                                                                                                                       \
/* Sequences b*L .. b*L+rows-1 of x (M, n) into out (n, L); missing ones are zero. */                                  \
static void to_lanes_##SUF(const R *restrict x, R *restrict out, long b, long rows, long n) {                          \
    for (long t = 0; t < n; t++)                                                                                       \
        for (long l = 0; l < L; l++) out[t * L + l] = l < rows ? x[(b * L + l) * n + t] : 0;                           \
}                                                                                                                      \
/* Lane-layout transpose: out (F, T, L) = in (T, F, L). */                                                             \
static void lane_transpose_##SUF(const R *restrict in, R *restrict out, long T, long F) {                              \
    typedef V##SUF V;                                                                                                  \
    for (long t = 0; t < T; t++)                                                                                       \
        for (long f = 0; f < F; f++) *(V *)(out + (f * T + t) * L) = *(const V *)(in + (t * F + f) * L);               \
}                                                                                                                      \
/* The inverse: x (M, n) sequences b*L .. b*L+rows-1 = scale * in (n, L). */                                           \
static void from_lanes_##SUF(const R *restrict in, R *restrict x, long b, long rows, long n, R scale) {                \
    for (long l = 0; l < rows; l++)                                                                                    \
        for (long t = 0; t < n; t++) x[(b * L + l) * n + t] = scale * in[t * L + l];                                   \
}                                                                                                                      \
/* Masked scores to -inf: s (Ti, Tj, L) of block b; sequence m reads mask row m / hrep of mask (rows, Ti, Tj),         \
   0 = may not attend. No mask (NULL): nothing to do. */                                                               \
static void apply_mask_##SUF(const unsigned char *restrict mask, R *restrict s, long b, long rows, long hrep,          \
                             long T) {                                                                                 \
    if (!mask) return;                                                                                                 \
    for (long l = 0; l < rows; l++) {                                                                                  \
        const unsigned char *mr = mask + (b * L + l) / hrep * T * T;                                                   \
        for (long t = 0; t < T * T; t++)                                                                               \
            if (!mr[t]) s[t * L + l] = -INFINITY;                                                                      \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* e^x per lane for x <= ~0: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Taylor polynomial of degree           \
   EXP_DEGREE (float 7, double 13: truncation below one rounding), times 2^n built in the exponent bits.               \
   x below EXP_LO (where e^x leaves the normal range: < 1e-37 float, < 1e-307 double), -inf included, gives 0. */      \
static inline V##SUF exp_##SUF(V##SUF x) {                                                                             \
    typedef V##SUF V;                                                                                                  \
    typedef VI##SUF VI;                                                                                                \
    const R shifter = (R)1.5 * ((I)1 << MANT); /* adding it rounds to an integer, held in the low bits */              \
    VI low = x < (R)EXP_LO;                                                                                            \
    x = (V)(((VI)x & ~low) | ((VI)((V){} + (R)EXP_LO) & low));                                                         \
    V t = x * (R)1.4426950408889634 + shifter;                                                                         \
    V n = t - shifter;                                                                                                 \
    V r = x - n * (R)0.693145751953125 - n * (R)1.42860682030941723212e-6;                                             \
    R c[EXP_DEGREE + 1] = {1};  /* c_d = 1 / d! (constant-folded) */                                                   \
    for (int d = 1; d <= EXP_DEGREE; d++) c[d] = c[d - 1] / d;                                                         \
    V p = (V){} + c[EXP_DEGREE];                                                                                       \
    for (int d = EXP_DEGREE - 1; d >= 0; d--) p = p * r + c[d];                                                        \
    VI e = ((VI)t - (VI)((V){} + shifter) + BIAS) << MANT;                                                             \
    return (V)((VI)(p * (V)e) & ~low);                                                                                 \
}                                                                                                                      \
                                                                                                                       \
/* Scores of one block: s (Ti, Tj, L) = scale * q_i . R(a_ij) k_j from qb, kb (T, E, L); C, S (Ti, Tj, N).             \
   IB x JB blocks of (i, j) accumulate in registers, so each q and k load serves several pairs. */                     \
static void block_scores_##SUF(const R *restrict qb, const R *restrict kb, const R *restrict C,                        \
                               const R *restrict S, R *restrict s, long T, long E, R scale) {                          \
    typedef V##SUF V;                                                                                                  \
    long N = E / 2;                                                                                                    \
    for (long j0 = 0; j0 < T; j0 += JT)                                                                                \
    for (long i0 = 0; i0 < T; i0 += IB)                                                                                \
    for (long j1 = j0; j1 < MIN(j0 + JT, T); j1 += JB) {                                                               \
        long ii[IB], jj[JB];                                                                                           \
        for (int r = 0; r < IB; r++) ii[r] = MIN(i0 + r, T - 1);                                                       \
        for (int c = 0; c < JB; c++) jj[c] = MIN(j1 + c, T - 1);                                                       \
        V acc[IB][JB] = {0};                                                                                           \
        for (long n = 0; n < N; n++) {                                                                                 \
            V k0[JB], k1[JB];                                                                                          \
            for (int c = 0; c < JB; c++) {                                                                             \
                k0[c] = *(const V *)(kb + (jj[c] * E + 2 * n) * L);                                                    \
                k1[c] = *(const V *)(kb + (jj[c] * E + 2 * n + 1) * L);                                                \
            }                                                                                                          \
            _Pragma("GCC unroll 8")                                                                                    \
            for (int r = 0; r < IB; r++) {                                                                             \
                const R *qr = qb + (ii[r] * E + 2 * n) * L;                                                            \
                V q0 = *(const V *)qr, q1 = *(const V *)(qr + L);                                                      \
                for (int c = 0; c < JB; c++) {  /* one multiply-add per statement: each is one FMA */                  \
                    long t = (ii[r] * T + jj[c]) * N + n;                                                              \
                    V re = q0 * k0[c], im = q1 * k0[c];                                                                \
                    re += q1 * k1[c];                                                                                  \
                    im -= q0 * k1[c];                                                                                  \
                    acc[r][c] += C[t] * re;                                                                            \
                    acc[r][c] += S[t] * im;                                                                            \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        for (int r = 0; r < IB && i0 + r < T; r++)                                                                     \
            for (int c = 0; c < JB && j1 + c < T; c++) *(V *)(s + ((i0 + r) * T + j1 + c) * L) = scale * acc[r][c];    \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* Tables for block_grads: Ct = C (Ti, Tj, N) rearranged tile by tile, (Ti, Tj / JG, N, JG) (the last tile of each     \
   row as wide as it is), so that one row's tile is read in order. */                                                  \
void grad_table_##SUF(const R *restrict C, R *restrict Ct, long T, long N) {                                           \
    for (long i = 0; i < T; i++)                                                                                       \
        for (long j0 = 0; j0 < T; j0 += JG) {                                                                          \
            long jn = MIN(JG, T - j0);                                                                                 \
            for (long n = 0; n < N; n++)                                                                               \
                for (long j = 0; j < jn; j++) Ct[i * T * N + j0 * N + n * jn + j] = C[(i * T + j0 + j) * N + n];       \
        }                                                                                                              \
}                                                                                                                      \
                                                                                                                       \
/* Gradients of one block from g (Ti, Tj, L) = dL/ds and qb, kb (T, E, L), unscaled, per plane n:                      \
   dqb_i = sum_j g_ij R(a_ij) k_j, dkb_j = sum_i g_ij R(-a_ij) q_i (T, E, L); C, S from grad_table. Key rows go in     \
   tiles of JG, copied plane-major (E, JG, L) beside their dk accumulators so the inner loop over j reads              \
   contiguously; IB query rows keep their q and dq in registers. work: (IB + 2 E) * JG * L values. */                  \
static void block_grads_##SUF(const R *restrict qb, const R *restrict kb, const R *restrict C, const R *restrict S,    \
                              const R *restrict g, R *restrict dqb, R *restrict dkb, R *restrict work, long T,         \
                              long E) {                                                                                \
    typedef V##SUF V;                                                                                                  \
    long N = E / 2;                                                                                                    \
    R *gr = work, *kt = gr + IB * JG * L, *dkt = kt + E * JG * L;  /* g (IB, JG, L); k, dk tiles (E, JG, L) */         \
    for (long j0 = 0; j0 < T; j0 += JG) {                                                                              \
        long jn = MIN(JG, T - j0);                                                                                     \
        for (long j = 0; j < jn; j++)                                                                                  \
            for (long e = 0; e < E; e++) {                                                                             \
                *(V *)(kt + (e * JG + j) * L) = *(const V *)(kb + ((j0 + j) * E + e) * L);                             \
                *(V *)(dkt + (e * JG + j) * L) = (V){0};                                                               \
            }                                                                                                          \
        for (long i0 = 0; i0 < T; i0 += IB) {                                                                          \
            long ii[IB];                                                                                               \
            for (int r = 0; r < IB; r++) ii[r] = MIN(i0 + r, T - 1);                                                   \
            for (int r = 0; r < IB; r++)  /* repeated rows past T get g = 0: they add nothing to dk */                 \
                for (long j = 0; j < jn; j++)                                                                          \
                    *(V *)(gr + (r * JG + j) * L) = i0 + r < T ? *(const V *)(g + (ii[r] * T + j0 + j) * L) : (V){0};  \
            for (long n = 0; n < N; n++) {                                                                             \
                V dq0[IB] = {0}, dq1[IB] = {0}, q0[IB], q1[IB];                                                        \
                for (int r = 0; r < IB; r++) {                                                                         \
                    q0[r] = *(const V *)(qb + (ii[r] * E + 2 * n) * L);                                                \
                    q1[r] = *(const V *)(qb + (ii[r] * E + 2 * n + 1) * L);                                            \
                }                                                                                                      \
                V *k0p = (V *)(kt + 2 * n * JG * L), *k1p = k0p + JG;                                                  \
                V *d0p = (V *)(dkt + 2 * n * JG * L), *d1p = d0p + JG;                                                 \
                for (long j = 0; j < jn; j++) {                                                                        \
                    V k0 = k0p[j], k1 = k1p[j], dk0 = d0p[j], dk1 = d1p[j];                                            \
                    _Pragma("GCC unroll 8")                                                                            \
                    for (int r = 0; r < IB; r++) {  /* one multiply-add per statement: each is one FMA */              \
                        V gv = *(const V *)(gr + (r * JG + j) * L);                                                    \
                        long t = ii[r] * T * N + j0 * N + n * jn + j;                                                  \
                        V a = gv * C[t], bb = gv * S[t];                                                               \
                        dq0[r] += a * k0;                                                                              \
                        dq0[r] -= bb * k1;                                                                             \
                        dq1[r] += a * k1;                                                                              \
                        dq1[r] += bb * k0;                                                                             \
                        dk0 += a * q0[r];                                                                              \
                        dk0 += bb * q1[r];                                                                             \
                        dk1 += a * q1[r];                                                                              \
                        dk1 -= bb * q0[r];                                                                             \
                    }                                                                                                  \
                    d0p[j] = dk0;                                                                                      \
                    d1p[j] = dk1;                                                                                      \
                }                                                                                                      \
                for (int r = 0; r < IB && i0 + r < T; r++) {                                                           \
                    V *d = (V *)(dqb + ((i0 + r) * E + 2 * n) * L);                                                    \
                    d[0] = j0 ? d[0] + dq0[r] : dq0[r];                                                                \
                    d[1] = j0 ? d[1] + dq1[r] : dq1[r];                                                                \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        for (long j = 0; j < jn; j++)                                                                                  \
            for (long e = 0; e < E; e++) *(V *)(dkb + ((j0 + j) * E + e) * L) = *(const V *)(dkt + (e * JG + j) * L);  \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* block_grads, then dq, dk of the block's rows sequences scaled into place (M, T, E). */                              \
static void block_grads_store_##SUF(const R *restrict qb, const R *restrict kb, const R *restrict C,                   \
                                    const R *restrict S, const R *restrict g, R *restrict dqb, R *restrict dkb,        \
                                    R *restrict work, R *dq, R *dk, long b, long rows, long T, long E, R scale) {      \
    block_grads_##SUF(qb, kb, C, S, g, dqb, dkb, work, T, E);                                                          \
    from_lanes_##SUF(dqb, dq, b, rows, T * E, scale);                                                                  \
    from_lanes_##SUF(dkb, dk, b, rows, T * E, scale);                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* Lane matrix product out (rows, cols, L) = sum_k A(r, k) B(c, k), A(r, k) at A + (r ar + k) L, B(c, k) at            \
   B + (c bc + k) L. Tiles of KT summed indices x ct columns keep B's tile in L2 and A's IB x KT panel in L1;          \
   IB x CB output blocks accumulate in registers. */                                                                   \
static void lane_mm_##SUF(R *restrict out, const R *restrict A, long ar, const R *restrict B, long bc, long rows,      \
                          long cols, long K) {                                                                         \
    typedef V##SUF V;                                                                                                  \
    long ct = MAX(CB, (1L << 18) / (long)(KT * sizeof(V)) / CB * CB);                                                  \
    for (long c1 = 0; c1 < cols; c1 += ct)                                                                             \
    for (long k0 = 0; k0 < K; k0 += KT)                                                                                \
    for (long r0 = 0; r0 < rows; r0 += IB)                                                                             \
    for (long c0 = c1; c0 < MIN(c1 + ct, cols); c0 += CB) {                                                            \
        const V *a[IB], *bp[CB];                                                                                       \
        for (int r = 0; r < IB; r++) a[r] = (const V *)(A + MIN(r0 + r, rows - 1) * ar * L);                           \
        for (int c = 0; c < CB; c++) bp[c] = (const V *)(B + MIN(c0 + c, cols - 1) * bc * L);                          \
        V acc[IB][CB] = {0};                                                                                           \
        for (long k = k0; k < MIN(k0 + KT, K); k++) {                                                                  \
            _Pragma("GCC unroll 16")                                                                                   \
            for (int r = 0; r < IB; r++)                                                                               \
                for (int c = 0; c < CB; c++) acc[r][c] += a[r][k] * bp[c][k];                                          \
        }                                                                                                              \
        for (int r = 0; r < IB && r0 + r < rows; r++)                                                                  \
            for (int c = 0; c < CB && c0 + c < cols; c++) {                                                            \
                V *o = (V *)(out + ((r0 + r) * cols + c0 + c) * L);                                                    \
                *o = k0 ? *o + acc[r][c] : acc[r][c];                                                                  \
            }                                                                                                          \
    }                                                                                                                  \
}                                                                                                                      \
                                                                                                                       \
/* Scores s (M, T, T) = scale * q_i . R(a_ij) k_j. */                                                                  \
int scores_##SUF(const R *q, const R *k, const R *C, const R *S, R *s, long M, long T, long E, R scale,                \
                 long b0, long b1) {                                                                                   \
    R *qb = malloc(sizeof(R) * (2 * T * E + T * T) * L), *kb = qb + T * E * L, *sb = kb + T * E * L;                   \
    if (!qb) return 1;                                                                                                 \
    for (long b = b0; b < b1; b++) {                                                                                   \
        long rows = MIN(M - b * L, L);                                                                                 \
        to_lanes_##SUF(q, qb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(k, kb, b, rows, T * E);                                                                         \
        block_scores_##SUF(qb, kb, C, S, sb, T, E, scale);                                                             \
        from_lanes_##SUF(sb, s, b, rows, T * T, 1);                                                                    \
    }                                                                                                                  \
    free(qb);                                                                                                          \
    return 0;                                                                                                          \
}                                                                                                                      \
                                                                                                                       \
/* dq = scale g . R k, dk = scale g^T . R^T q (M, T, E) from g (M, T, T) = dL/ds. */                                   \
int grads_##SUF(const R *q, const R *k, const R *C, const R *S, const R *g, R *dq, R *dk, long M, long T, long E,      \
                R scale, long b0, long b1) {                                                                           \
    R *qb = malloc(sizeof(R) * (4 * T * E + T * T + (IB + 2 * E) * JG) * L);                                           \
    if (!qb) return 1;                                                                                                 \
    R *kb = qb + T * E * L, *dqb = kb + T * E * L, *dkb = dqb + T * E * L, *gb = dkb + T * E * L;                      \
    R *work = gb + T * T * L;                                                                                          \
    for (long b = b0; b < b1; b++) {                                                                                   \
        long rows = MIN(M - b * L, L);                                                                                 \
        to_lanes_##SUF(q, qb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(k, kb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(g, gb, b, rows, T * T);                                                                         \
        block_grads_store_##SUF(qb, kb, C, S, gb, dqb, dkb, work, dq, dk, b, rows, T, E, scale);                       \
    }                                                                                                                  \
    free(qb);                                                                                                          \
    return 0;                                                                                                          \
}                                                                                                                      \
                                                                                                                       \
/* Fused attention forward: out (M, T, Ev) = softmax(s) v and lse (M, T) = logsumexp_j s_ij, with the scores s         \
   of one block (Ti, Tj, L) in per-thread scratch only; masked pairs (apply_mask) get probability 0. */                \
int attention_##SUF(const R *q, const R *k, const R *v, const R *C, const R *S, const unsigned char *mask, R *out,     \
                    R *lse, long M, long T, long E, long Ev, long hrep, R scale, long b0, long b1) {                   \
    typedef V##SUF V;                                                                                                  \
    typedef VI##SUF VI;                                                                                                \
    R *qb = malloc(sizeof(R) * (2 * T * E + 2 * T * Ev + T * T) * L);                                                  \
    if (!qb) return 1;                                                                                                 \
    R *kb = qb + T * E * L, *vt = kb + T * E * L, *ob = vt + T * Ev * L, *p = ob + T * Ev * L;                         \
    for (long b = b0; b < b1; b++) {                                                                                   \
        long rows = MIN(M - b * L, L);                                                                                 \
        to_lanes_##SUF(q, qb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(k, kb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(v, ob, b, rows, T * Ev);                                                                        \
        lane_transpose_##SUF(ob, vt, T, Ev);  /* (Ev, T, L) */                                                         \
        block_scores_##SUF(qb, kb, C, S, p, T, E, scale);                                                              \
        apply_mask_##SUF(mask, p, b, rows, hrep, T);                                                                   \
        for (long i = 0; i < T; i++) {  /* p_ij = exp(s_ij - lse_i) in place */                                        \
            V *row = (V *)(p + i * T * L), m = row[0], sum = {0};                                                      \
            for (long j = 1; j < T; j++) m = (V)(((VI)m & (m >= row[j])) | ((VI)row[j] & (m < row[j])));               \
            for (long j = 0; j < T; j++) sum += row[j] = exp_##SUF(row[j] - m);                                        \
            V inv = 1 / sum;                                                                                           \
            for (long j = 0; j < T; j++) row[j] *= inv;                                                                \
            for (long l = 0; l < rows; l++) lse[(b * L + l) * T + i] = m[l] + log(sum[l]);                             \
        }                                                                                                              \
        lane_mm_##SUF(ob, p, T, vt, T, T, Ev, T);  /* out_i = sum_j p_ij v_j */                                        \
        from_lanes_##SUF(ob, out, b, rows, T * Ev, 1);                                                                 \
    }                                                                                                                  \
    free(qb);                                                                                                          \
    return 0;                                                                                                          \
}                                                                                                                      \
                                                                                                                       \
/* Fused attention backward from dout (M, T, Ev) and the forward's lse: recomputes p = exp(s - lse) of one block       \
   in scratch, then dv_j = sum_i p_ij dout_i, dp_ij = dout_i . v_j, ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij') and     \
   from ds dq, dk as grads_ does. */                                                                                   \
int attention_backward_##SUF(const R *q, const R *k, const R *v, const R *lse, const R *dout, const R *C,              \
                             const R *S, const R *Cg, const R *Sg, const unsigned char *mask, R *dq, R *dk, R *dv,     \
                             long M, long T, long E, long Ev, long hrep, R scale, long b0, long b1) {                  \
    typedef V##SUF V;                                                                                                  \
    R *qb = malloc(sizeof(R) * (4 * T * E + 4 * T * Ev + 2 * T * T + T + (IB + 2 * E) * JG) * L);                      \
    if (!qb) return 1;                                                                                                 \
    R *kb = qb + T * E * L, *dqb = kb + T * E * L, *dkb = dqb + T * E * L, *vb = dkb + T * E * L;                      \
    R *gb = vb + T * Ev * L, *gt = gb + T * Ev * L, *dvb = gt + T * Ev * L, *p = dvb + T * Ev * L;                     \
    R *ds = p + T * T * L, *lb = ds + T * T * L, *work = lb + T * L;                                                   \
    for (long b = b0; b < b1; b++) {                                                                                   \
        long rows = MIN(M - b * L, L);                                                                                 \
        to_lanes_##SUF(q, qb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(k, kb, b, rows, T * E);                                                                         \
        to_lanes_##SUF(v, vb, b, rows, T * Ev);                                                                        \
        to_lanes_##SUF(dout, gb, b, rows, T * Ev);                                                                     \
        lane_transpose_##SUF(gb, gt, T, Ev);  /* (Ev, T, L) */                                                         \
        to_lanes_##SUF(lse, lb, b, rows, T);                                                                           \
        block_scores_##SUF(qb, kb, C, S, p, T, E, scale);                                                              \
        apply_mask_##SUF(mask, p, b, rows, hrep, T);                                                                   \
        for (long i = 0; i < T; i++) {  /* p_ij = exp(s_ij - lse_i), and its transpose into ds */                      \
            V *row = (V *)(p + i * T * L), li = *(V *)(lb + i * L);                                                    \
            for (long j = 0; j < T; j++) ((V *)ds)[j * T + i] = row[j] = exp_##SUF(row[j] - li);                       \
        }                                                                                                              \
        lane_mm_##SUF(dvb, ds, T, gt, T, T, Ev, T);  /* dv_j = sum_i p_ij dout_i */                                    \
        from_lanes_##SUF(dvb, dv, b, rows, T * Ev, 1);                                                                 \
        lane_mm_##SUF(ds, gb, Ev, vb, Ev, T, T, Ev);  /* dp_ij = dout_i . v_j */                                       \
        for (long i = 0; i < T; i++) {  /* ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'), the sum being dout_i . out_i */ \
            V *d = (V *)(ds + i * T * L), *pi = (V *)(p + i * T * L), dot = {0};                                       \
            for (long j = 0; j < T; j++) dot += pi[j] * d[j];                                                          \
            for (long j = 0; j < T; j++) d[j] = pi[j] * (d[j] - dot);                                                  \
        }                                                                                                              \
        block_grads_store_##SUF(qb, kb, Cg, Sg, ds, dqb, dkb, work, dq, dk, b, rows, T, E, scale);                     \
    }                                                                                                                  \
    free(qb);                                                                                                          \
    return 0;                                                                                                          \
}

KERNELS(float, int, f32, 7, -87.0, 23, 127)
KERNELS(double, long, f64, 13, -708.0, 52, 1023)
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
        signatures = {
            "scores": [p] * 5 + [i, i, i, real, i, i],
            "grads": [p] * 7 + [i, i, i, real, i, i],
            "attention": [p] * 8 + [i, i, i, i, i, real, i, i],
            "attention_backward": [p] * 13 + [i, i, i, i, i, real, i, i],
            "grad_table": [p, p, i, i],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None if name == "grad_table" else ctypes.c_int


def _run(fn, *args, blocks: int) -> None:
    """Call fn(*args, b0, b1) over lane blocks, split across torch's intra-op thread count (ctypes drops the GIL)."""
    workers = max(1, min(torch.get_num_threads(), blocks))
    edges = [blocks * w // workers for w in range(workers + 1)]
    codes = list(thread_map(lambda w: fn(*args, edges[w], edges[w + 1]), range(workers), workers))
    if any(codes):
        raise MemoryError("D-RoPE kernel could not allocate its work buffers")


def _suffix(x: torch.Tensor) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[x.dtype]


def scores(lib, q, k, cos, sin, out: torch.Tensor, scale: float) -> None:
    """q, k (M, T, E) contiguous; cos, sin (Ti, Tj, N) -> out (M, Ti, Tj) = scaled scores."""
    M, T, E = q.shape
    fn = getattr(lib, f"scores_{_suffix(q)}")
    _run(fn, *[t.data_ptr() for t in (q, k, cos, sin, out)], M, T, E, scale, blocks=-(-M // LANES))


def _gradient_tables(lib, cos, sin):
    """(Ti, Tj, N) -> the tile-major copies the gradient loops read (``grad_table`` in the C source)."""
    T, N = cos.shape[-2:]
    fn = getattr(lib, f"grad_table_{_suffix(cos)}")
    out = tuple(torch.empty_like(t) for t in (cos, sin))
    for src, dst in zip((cos, sin), out):
        fn(src.data_ptr(), dst.data_ptr(), T, N)
    return out


def grads(lib, q, k, cos, sin, g: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor) -> None:
    """g (M, Ti, Tj) = dL/ds; q, k (M, T, E); all contiguous. Fills dq = scale * g . R k and
    dk = scale * g^T . R^T q, (M, T, E) contiguous, in one pass."""
    M, T, E = q.shape
    fn = getattr(lib, f"grads_{_suffix(q)}")
    tables = _gradient_tables(lib, cos, sin)  # held here while the kernel runs
    ptrs = [t.data_ptr() for t in (q, k, *tables, g, dq, dk)]
    _run(fn, *ptrs, M, T, E, scale, blocks=-(-M // LANES))


def attention(lib, q, k, v, cos, sin, scale: float, out: torch.Tensor, lse: torch.Tensor, mask=None) -> None:
    """q, k (M, T, E), v (M, T, Ev) contiguous; cos, sin (Ti, Tj, N) -> out (M, T, Ev) = softmax(s) v and
    lse (M, T) = logsumexp_j s_ij, with s the scaled scores (never stored).
    mask: None, or (M / hrep, Ti, Tj) uint8 contiguous, 1 = may attend, read by sequence m at row m // hrep
    (hrep = M / rows: e.g. the heads sharing one mask)."""
    M, T, E = q.shape
    fn = getattr(lib, f"attention_{_suffix(q)}")
    ptrs = [t.data_ptr() for t in (q, k, v, cos, sin)] + [_mask_ptr(mask), out.data_ptr(), lse.data_ptr()]
    _run(fn, *ptrs, M, T, E, v.shape[-1], _mask_repeat(mask, M), scale, blocks=-(-M // LANES))


def attention_backward(lib, q, k, v, lse, dout, cos, sin, scale: float, dq, dk, dv, mask=None) -> None:
    """Gradients of ``attention``: from q, k, v, its lse and dout = dL/dout (all contiguous, shapes as there) and
    the forward's mask, fill dq, dk (M, T, E) and dv (M, T, Ev)."""
    M, T, E = q.shape
    fn = getattr(lib, f"attention_backward_{_suffix(q)}")
    tables = _gradient_tables(lib, cos, sin)  # held here while the kernel runs
    ptrs = [t.data_ptr() for t in (q, k, v, lse, dout, cos, sin, *tables)] + [_mask_ptr(mask)]
    ptrs += [t.data_ptr() for t in (dq, dk, dv)]
    _run(fn, *ptrs, M, T, E, v.shape[-1], _mask_repeat(mask, M), scale, blocks=-(-M // LANES))


def _mask_ptr(mask) -> int | None:
    if mask is None:
        return None
    if mask.dtype != torch.uint8 or not mask.is_contiguous():
        raise TypeError("the kernel mask must be contiguous uint8")
    return mask.data_ptr()


def _mask_repeat(mask, M: int) -> int:
    """Sequences per mask row (hrep); 1 without a mask."""
    if mask is None:
        return 1
    if M % mask.shape[0]:
        raise ValueError(f"{M} sequences do not share {mask.shape[0]} mask rows evenly")
    return M // mask.shape[0]
