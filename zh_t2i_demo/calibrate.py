"""How fast this machine is: the demo prints it first and scales its per-step table by it."""

from __future__ import annotations

import time

import torch

SLOW_KIND_GFLOPS = 35.0  # the slow kind of 2-core CPU the demo is sized for (AVX2 only, fp32 2048² matmul on 2 threads)


def calibrate(seconds: float = 1.0) -> dict:
    """About ``seconds`` of measurement: the device a run with ``--device auto`` uses, the CPU's ATen capability, the
    thread count, and the fp32 2048x2048 matmul rate on the CPU at that thread count (GFLOP/s, the median of the
    matmuls timed). ``slow_kind_factor`` is how many times longer a compute-bound step takes on the slow kind
    (:data:`SLOW_KIND_GFLOPS`), at least 1."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: first-call allocation and kernel choice
    times, t_end = [], time.perf_counter() + seconds
    while True:  # the median matmul: robust to one slow (a busy host) or fast (a turbo burst) outlier
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() >= t_end:
            break
    gflops = 2 * n**3 / sorted(times)[len(times) // 2] / 1e9
    cuda = torch.cuda.is_available()
    return {"device": "cuda" if cuda else "cpu", "cuda_name": torch.cuda.get_device_name(0) if cuda else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "matmul_gflops": round(gflops, 1), "slow_kind_factor": round(max(1.0, gflops / SLOW_KIND_GFLOPS), 2)}


def calibration_line(c: dict) -> str:
    dev = f"cuda ({c['cuda_name']})" if c["device"] == "cuda" else "cpu (no CUDA device)"
    return (f"calibration: device {dev}; CPU capability {c['cpu_capability']}, {c['threads']} threads, fp32 2048² "
            f"matmul {c['matmul_gflops']:.1f} GFLOP/s (the slow kind: {SLOW_KIND_GFLOPS:.0f}; compute-bound CPU steps "
            f"scale by x{c['slow_kind_factor']:.2f} there)")
