"""Timing protocol shared by the benchmarks (style habit 18), and the environment record.

``time_fn(fn, inputs, device=...)`` warms up, then times single calls: on CUDA with a pair of CUDA
events around each call (after a synchronize), on CPU with ``perf_counter`` around each call.
Inputs rotate through a list so that, on a GPU, consecutive calls do not find their activations
in L2 (``rotation_count`` sizes the list to at least twice the L2 cache, capped by a memory
budget). Returns the median and spread in milliseconds. ``environment()`` records device,
driver, library versions, date, thread count and the load average (to flag contended runs).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def l2_bytes(device: str | torch.device) -> int:
    """L2 size of the CUDA device (0 on CPU: CPU runs rotate only a couple of inputs)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(dev)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_count(bytes_per_input: int, device: str | torch.device, *, budget_bytes: int = 2**30,
                   cpu_default: int = 2) -> int:
    """How many distinct inputs to cycle through: enough to overflow L2 twice on a GPU."""
    l2 = l2_bytes(device)
    if l2 == 0:
        return cpu_default
    want = max(1, math.ceil(2 * l2 / max(1, bytes_per_input)))
    cap = max(1, budget_bytes // max(1, bytes_per_input))
    return int(min(want, cap, 64))


def time_fn(fn: Callable, inputs: Sequence, *, device: str | torch.device = "cpu", warmup: int = 5,
            iters: int = 30, min_seconds: float = 0.0) -> dict:
    """Median (and p10/p90/mean) wall time of ``fn(inputs[i % n])`` in milliseconds.

    At least ``iters`` timed calls; with ``min_seconds`` > 0 keeps going until that much time is
    spent (never more than 20x iters), which steadies the median of very short calls."""
    n = len(inputs)
    if n == 0:
        raise ValueError("time_fn needs at least one input")
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        for i in range(warmup):
            fn(inputs[i % n])
        sync(device)
        times: list[float] = []
        t_start = time.perf_counter()
        i = 0
        while i < iters or (time.perf_counter() - t_start < min_seconds and i < 20 * iters):
            x = inputs[i % n]
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
            i += 1
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p10_ms": q(0.10), "p90_ms": q(0.90),
            "mean_ms": statistics.fmean(times), "runs": len(times)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict:
    """Device, driver and library versions, date, threads and load: recorded with every result."""
    dev = torch.device(device)
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
    }
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update({"device": props.name, "cuda": torch.version.cuda, "sm": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1), "l2_mib": l2_bytes(dev) / 2**20,
                    "cusparselt": _cusparselt_version()})
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    else:
        env["device"] = f"cpu ({env['host_cpu']})"
    return env


def _cusparselt_version():
    try:
        if torch.backends.cusparselt.is_available():
            return torch.backends.cusparselt.version()
    except (AttributeError, RuntimeError):
        pass
    return None
