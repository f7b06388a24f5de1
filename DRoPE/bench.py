"""Benchmark of D-RoPE attention (and, with --model, of the whole model). ``python -m DRoPE.bench [--quick] [--model]``

Attention part: forward (inference, no autograd) and forward+backward time and peak memory of
    drope      ``drope_attention`` (exact; on CPU the fused C kernels, on CUDA the torch.compile (Triton) path,
               else the chunked path),
    sdpa_rope  F.scaled_dot_product_attention after standard 1-D RoPE on q and k (the floor: same shapes),
    naive      ``drope_attention_naive`` (materialises rotated keys; skipped where it cannot fit: its analytic
               size is printed instead),
at (a) pretraining: 672 sequences (batch 4 x 168 kept patch positions), T = 15 and T = 7; (b) a whole brain:
9408 sequences, T = 90; (c) T = 288 at 672 sequences. H = 3, E = 128 everywhere, float32.

Model part (--model): encoder forward of the paper model on one whole-brain DWI (90 volumes, 96x96x64, synthetic)
and one AdamW training step at pretraining shapes (batch 4, 15 volumes, 96x96x4 slab, spatial masking).

Memory method. CPU: every measurement runs in a fresh subprocess. After the inputs (and the output gradient) are
made, the baseline is the current resident set size (/proc/self/statm); the peak is ru_maxrss after one run, so
the figure is the extra memory the run needed on top of its inputs. (Large blocks are mmap-ed by the allocator and
returned on free, so RSS follows the live tensors.) If the run did not raise ru_maxrss above its earlier peak the
figure is an upper bound and is marked "<=". CUDA: torch.cuda.max_memory_allocated over memory_allocated before the
run, in-process, after one warm-up call (which compiles). Times: the minimum over a few repetitions after that
first run (one repetition for big cases). With one thread (the default) a CPU time is the process CPU time
(time.process_time), which leaves out the time spent waiting for a core that other processes hold; with more
threads it is wall-clock time. The CPU is shared, so compare ratios measured in the same run.

Threads. The default is ONE intra-op CPU thread for every method. On a CPU shared with other busy processes,
each multi-threaded (OpenMP) op can stall for milliseconds at its closing barrier while a core serves someone else;
the chunked D-RoPE runs thousands of ops where SDPA runs tens, so multi-thread timings on a busy machine measure
the stalls rather than the methods. On a quiet machine pass --threads N.

After the table, one line per case gives the drope / sdpa_rope ratios (time forward and forward+backward, memory
forward+backward) and max_rel_err of drope against naive, measured on 2 of the case's sequences where naive
cannot run on all of them. The last line printed is ``drope/sdpa_rope time_ratio=X mem_ratio=Y max_rel_err=Z`` for case (a) T = 15,
forward+backward, on CPU (max_rel_err: largest max|a - b| / max|b| over the output and the q, k, v gradients of
drope against naive).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model.drope import drope_attention, drope_attention_naive, drope_distance


@dataclass(frozen=True)
class Case:
    name: str
    sequences: int
    T: int
    H: int = 3
    E: int = 128
    naive: bool = True


FULL_CASES = (
    Case("a_T15", 672, 15),
    Case("a_T7", 672, 7),
    Case("b_T90", 9408, 90, naive=False),
    Case("c_T288", 672, 288, naive=False),
)
QUICK_CASES = (
    Case("a_T15", 12, 15, H=2, E=16),
    Case("a_T7", 12, 7, H=2, E=16),
    Case("c_T40", 4, 40, H=2, E=16, naive=False),
)
METHODS = ("drope", "sdpa_rope", "naive")
MODES = ("fwd", "fwdbwd")


# ---------------------------------------------------------------------------------------------------------
# the attention variants
# ---------------------------------------------------------------------------------------------------------


def rope_1d(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Standard 1-D RoPE (positions 0..T-1, adjacent pairs, complex multiply). x (..., T, E) -> (..., T, E)."""
    T, E = x.shape[-2:]
    theta = base ** (-torch.arange(0, E, 2, dtype=torch.float32, device=x.device) / E)
    angle = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * theta
    rot = torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rot).flatten(-2)


def make_inputs(case: Case, device, requires_grad: bool, seed: int = 0):
    """q, k, v (S, H, T, E), a realistic distance (T, T) from a random multi-shell protocol with b0s."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.sequences, case.H, case.T, case.E)
    q, k, v = (torch.randn(shape, generator=gen).to(device).requires_grad_(requires_grad) for _ in range(3))
    bvals = torch.tensor([0.0, 1000.0, 2000.0, 3000.0])[torch.arange(case.T) % 4]
    bvecs = torch.randn(case.T, 3, generator=gen)
    bvecs = bvecs / bvecs.norm(dim=-1, keepdim=True)
    bvecs[bvals == 0] = 0
    return q, k, v, drope_distance(bvals, bvecs).to(device)


def run_method(method: str, q, k, v, distance):
    if method == "drope":
        return drope_attention(q, k, v, distance)
    if method == "naive":
        return drope_attention_naive(q, k, v, distance)
    if method == "sdpa_rope":
        return F.scaled_dot_product_attention(rope_1d(q), rope_1d(k), v)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def naive_bytes(case: Case) -> int:
    """Size of the rotated keys (S, H, T, T, E) float32 that the naive implementation materialises."""
    return case.sequences * case.H * case.T * case.T * case.E * 4


# ---------------------------------------------------------------------------------------------------------
# one measurement (runs in a subprocess on CPU)
# ---------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _clock(device: torch.device):
    """CPU time with one CPU thread (robust on a shared machine), else wall-clock time."""
    return time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def measure(case: Case, method: str, mode: str, device: str) -> dict:
    """Time (s) and peak extra memory (bytes) of one attention call; see the module docstring."""
    dev = torch.device(device)
    clock = _clock(dev)
    grad = mode == "fwdbwd"
    q, k, v, distance = make_inputs(case, dev, grad)
    grad_out = torch.randn_like(q) if grad else None

    def once():
        if grad:
            q.grad = k.grad = v.grad = None
            run_method(method, q, k, v, distance).backward(grad_out)
        else:
            with torch.no_grad():
                run_method(method, q, k, v, distance)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    upper_bound = False
    if dev.type == "cuda":
        once()  # warm-up: CUDA context, kernel selection and the torch.compile of the D-RoPE path
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = clock()
        once()
        first = clock() - t0
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base, before = _rss_bytes(), _maxrss_bytes()
        t0 = clock()
        once()
        first = clock() - t0
        after = _maxrss_bytes()
        peak, upper_bound = after - base, after <= before
    times = [first]
    reps = 0 if first > 3.0 else max(1, min(5, int(2.0 / max(first, 1e-3))))
    for _ in range(reps):
        t0 = clock()
        once()
        times.append(clock() - t0)
    return {"time_s": min(times[1:] or times), "peak_bytes": int(peak), "upper_bound": upper_bound}


def measure_in_subprocess(case: Case, method: str, mode: str, device: str, in_process: bool = False) -> dict:
    if device != "cpu" or in_process:
        return measure(case, method, mode, device)
    cmd = [sys.executable, "-m", "DRoPE.bench", "--threads", str(torch.get_num_threads())]
    cmd += ["--worker", json.dumps([case.__dict__, method, mode, device])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_relative_error(case: Case, device: str = "cpu") -> float:
    """Largest max|drope - naive| / max|naive| over the output and the q, k, v gradients (forward+backward)."""
    results = []
    for method in ("drope", "naive"):
        q, k, v, distance = make_inputs(case, torch.device(device), True, seed=1)
        out = run_method(method, q, k, v, distance)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device))
        results.append([out.detach(), q.grad, k.grad, v.grad])
        del q, k, v, out
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))


# ---------------------------------------------------------------------------------------------------------
# model part
# ---------------------------------------------------------------------------------------------------------


def measure_model(part: str, device: str, quick: bool) -> dict:
    """part "encoder": whole-brain encoder forward; "train": one training step at pretraining shapes."""
    from .model import DRoPEMAE, model_config, spatial_mask

    torch.manual_seed(0)
    dev = torch.device(device)
    config = model_config("tiny") if quick else model_config("paper")
    model = DRoPEMAE(config).to(dev)
    if part == "encoder":
        B, V, shape = (1, 6, (16, 16, 8)) if quick else (1, 90, (96, 96, 64))
    else:
        B, V, shape = (2, 5, (16, 16, 4)) if quick else (4, 15, (96, 96, 4))
    x = torch.rand(B, V, *shape, device=dev)
    bvals = torch.tensor([0.0, 1000.0, 2000.0, 3000.0], device=dev)[torch.arange(V, device=dev) % 4].expand(B, V)
    bvecs = torch.nn.functional.normalize(torch.randn(B, V, 3, device=dev), dim=-1) * (bvals > 0)[..., None]
    P = math.prod(model.grid_of(shape))
    keep = spatial_mask(B, V, P, generator=torch.Generator().manual_seed(0)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clock = _clock(dev)

    def once():
        if part == "encoder":
            model.eval()
            with torch.no_grad():
                model.encode(x, bvals, bvecs)
        else:
            model.train()
            opt.zero_grad(set_to_none=True)
            model(x, bvals, bvecs, keep, 0.5).loss.backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = clock()
    once()
    first = clock() - t0
    peak = torch.cuda.max_memory_allocated() - base if dev.type == "cuda" else _maxrss_bytes() - base
    times = [first]
    if part == "train" and first < 20:
        t0 = clock()
        once()
        times.append(clock() - t0)
    return {"time_s": min(times), "peak_bytes": int(peak), "first_s": first, "tokens": B * V * P}


def model_in_subprocess(part: str, device: str, quick: bool) -> dict:
    if device != "cpu" or quick:
        return measure_model(part, device, quick)
    cmd = [sys.executable, "-m", "DRoPE.bench", "--threads", str(torch.get_num_threads())]
    cmd += ["--model-worker", json.dumps([part, device, quick])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def _fmt_mem(r: dict) -> str:
    if "error" in r:
        return "error"
    return ("<=" if r.get("upper_bound") else "") + f"{r['peak_bytes'] / 2**30:.3f}"


def _error_case(case: Case) -> Case:
    """The case itself where naive can run on it, else 2 of its sequences."""
    return case if case.naive else dataclasses.replace(case, sequences=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m DRoPE.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, measured in-process (smoke test; memory figures meaningless)"
    )
    parser.add_argument("--model", action="store_true", help="also time the whole model (encoder + training step)")
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = CPU, plus CUDA when present"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op CPU threads for every measurement (default 1, see above)"
    )
    parser.add_argument("--skip-attention", action="store_true", help="only the model part (with --model)")
    parser.add_argument("--cases", default=None, help="comma-separated attention cases to run (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        case_d, method, mode, device = json.loads(args.worker)
        print(json.dumps(measure(Case(**case_d), method, mode, device)))
        return 0
    if args.model_worker:
        part, device, quick = json.loads(args.model_worker)
        print(json.dumps(measure_model(part, device, quick)))
        return 0

    devices = ["cpu"] if args.device == "cpu" else (["cuda"] if args.device == "cuda" else ["cpu"])
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    cases = () if args.skip_attention else (QUICK_CASES if args.quick else FULL_CASES)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {c.name for c in cases})
        if unknown:
            print(f"unknown case(s) {unknown}; choose from {[c.name for c in cases]}", file=sys.stderr)
            return 2
        cases = tuple(c for c in cases if c.name in wanted)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} CPU thread(s); float32; times in ms, peak extra memory in GiB")
    header = (
        f"{'device':6s} {'case':8s} {'S':>6s} {'T':>4s} {'method':10s} "
        f"{'fwd ms':>10s} {'fwd GiB':>9s} {'f+b ms':>10s} {'f+b GiB':>9s}"
    )
    if cases:
        print(header)
        print("-" * len(header))
    table: dict = {}
    for device in devices:
        for case in cases:
            for method in METHODS:
                if method == "naive" and not case.naive:
                    size = naive_bytes(case) / 2**30
                    where = f"{device:6s} {case.name:8s} {case.sequences:6d} {case.T:4d} {method:10s}"
                    print(f"{where} skipped: rotated keys alone need {size:.1f} GiB")
                    continue
                row = {mode: measure_in_subprocess(case, method, mode, device, args.quick) for mode in MODES}
                table[(device, case.name, method)] = row
                cells = []
                for mode in MODES:
                    r = row[mode]
                    ms = f"{r['time_s'] * 1e3:10.1f}" if "error" not in r else f"{'error':>10s}"
                    cells += [ms, f"{_fmt_mem(r):>9s}"]
                where = f"{device:6s} {case.name:8s} {case.sequences:6d} {case.T:4d} {method:10s}"
                print(where + " " + " ".join(cells), flush=True)
                for mode in MODES:
                    if "error" in row[mode]:
                        print(f"    {method} {mode}: {row[mode]['error']}")

    if args.model:
        print()
        for device in devices:
            if args.quick:
                labels = (
                    ("encoder", "encoder forward, tiny 6 x 16x16x8"),
                    ("train", "training step, tiny 2 x 5 x 16x16x4"),
                )
            else:
                labels = (
                    ("encoder", "encoder forward, whole brain 90 x 96x96x64"),
                    ("train", "training step, 4 x 15 x 96x96x4"),
                )
            for part, label in labels:
                r = model_in_subprocess(part, device, args.quick)
                if "error" in r:
                    print(f"{device:6s} model {label}: error {r['error']}")
                else:
                    gib = r["peak_bytes"] / 2**30
                    line = f"{r['time_s']:.2f} s, peak extra {gib:.2f} GiB, {r['tokens']} tokens"
                    print(f"{device:6s} model {label}: {line}")

    for (device, name, method), row in table.items():
        base = table.get((device, name, "sdpa_rope"))
        if method != "drope" or not base or any("error" in r for r in (*row.values(), *base.values())):
            continue
        fwd, fb = (row[m]["time_s"] / base[m]["time_s"] for m in MODES)
        mem = row["fwdbwd"]["peak_bytes"] / max(base["fwdbwd"]["peak_bytes"], 1)
        err = max_relative_error(_error_case(next(c for c in cases if c.name == name)), device)
        print(
            f"{device:6s} {name:8s} drope/sdpa_rope: time fwd x{fwd:.2f}, f+b x{fb:.2f}; memory f+b x{mem:.2f}; "
            f"max_rel_err {err:.1e}"
        )

    if not cases:
        return 0
    first = cases[0]
    d, s = table.get(("cpu", first.name, "drope")), table.get(("cpu", first.name, "sdpa_rope"))
    if d and s and "error" not in d["fwdbwd"] and "error" not in s["fwdbwd"]:
        time_ratio = d["fwdbwd"]["time_s"] / s["fwdbwd"]["time_s"]
        mem_ratio = d["fwdbwd"]["peak_bytes"] / max(s["fwdbwd"]["peak_bytes"], 1)
        err = max_relative_error(_error_case(first))
        print(f"drope/sdpa_rope time_ratio={time_ratio:.2f} mem_ratio={mem_ratio:.2f} max_rel_err={err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
