"""What every benchmark shares: timing one call (CUDA events on GPU), the median of many, a record of where the
numbers were taken (device, versions, commit), and the refusal of a size whose estimated memory the device does not
have, before anything is allocated."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from moekit.llama.io import check_memory, package_version


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one fn() takes: CUDA events around it, after the device has drained, on GPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_time(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of fn() over `iters` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(iters))


def git_commit() -> str | None:
    """The short commit of this checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def environment(device: torch.device) -> dict:
    """Where a benchmark ran: device, threads, library versions, commit, machine."""
    return dict(device=device.type, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                device_name=device_name(device), threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.version.cuda, triton=package_version("triton"),
                transformers=package_version("transformers"), megablocks=package_version("megablocks"),
                commit=git_commit(), machine=f"{platform.machine()}, {platform.processor() or platform.system()}")


def check_device_memory(needed: float, device: torch.device, what: str, hint: str = "") -> None:
    """Refuse, before allocating, work estimated to need `needed` bytes on `device`: more than the GPU's free
    memory (torch.cuda.mem_get_info) on CUDA, more than the machine's available memory (check_memory) on CPU."""
    if device.type != "cuda":
        return check_memory(needed, what, hint)
    check_memory(needed, what, hint, available=torch.cuda.mem_get_info(device)[0], where=str(device))
