"""The machine this process runs on: its CPU cores (those it may use), the CPU's model and the
instruction set of PyTorch's CPU kernels, the threads, the GPUs. Read from the operating system's
and the driver's files, without importing PyTorch.

`describe()` is what a measurement of speed depends on: the timing stage's key and the analysis'
key hold it (prunestudy.graph), so a latency measured on one machine is not used on another. The
code here reads facts; it computes no result (codedigest.BOOKKEEPING).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity (what SLURM, taskset or a container's
    cpuset gave it), not the machine's count (os.cpu_count), which would oversubscribe a job."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# Variables that restrict which CPU kernels PyTorch runs (the instruction sets of ATen's, oneDNN's and
# MKL's): the same code and packages compute other floats with other instructions (docs/results.md).
CPU_DISPATCH_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                     "MKL_CBWR")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")   # PyTorch's CPU threads, read when it starts


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform says (read once)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_dispatch() -> dict:
    """The variables of CPU_DISPATCH_VARS that are set."""
    return {k: os.environ[k] for k in CPU_DISPATCH_VARS if k in os.environ}


@functools.cache
def cpu_isa() -> str:
    """The widest vector instruction set of the CPU that PyTorch's CPU kernels dispatch to (read from
    /proc/cpuinfo's flags without importing PyTorch; ATEN_CPU_CAPABILITY may lower it): avx512,
    avx2 or default."""
    try:
        flags = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), set())
    except OSError:
        flags = set()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def threads() -> int:
    """The CPU threads PyTorch computes with here: OMP_NUM_THREADS when set (a sweep sets it per task),
    else the cores this process may use."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return usable_cpus()


@functools.cache
def _gpu_models() -> tuple[str, ...]:
    models = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            models += [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                       if line.startswith("Model:")]
        except OSError:
            continue
    return tuple(models)


def gpus() -> list[str]:
    """The NVIDIA GPUs of this machine (read once from the driver's files, without importing
    PyTorch) and those this process was given (CUDA_VISIBLE_DEVICES)."""
    models = list(_gpu_models())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return models + ([f"CUDA_VISIBLE_DEVICES={visible}"] if models and visible is not None else [])


def describe() -> dict:
    """What a measurement of speed depends on besides the model and its settings: the processor, the
    instruction set of PyTorch's CPU kernels (and any variable restricting it), the threads, the
    GPUs. A timing measured under one description is not used under another (graph: the timing
    stage's key)."""
    return {"cpu": cpu_name(), "isa": cpu_isa(), "dispatch": cpu_dispatch(), "threads": threads(), "gpus": gpus()}
