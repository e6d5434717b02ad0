"""The measuring instruments of `loopnn bench`: the device's peak FLOP/s (a measured fp32 matmul peak on CPU, the
datasheet bf16 peak on CUDA), peak memory of a code region, and peak training memory at 1 and n loops with and
without activation checkpointing, each setting in a fresh process (`bench_memory`)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from typing import Any

import torch
import torch.nn as nn

from loopnn import loop
from loopnn.config import ModelConfig
from loopnn.hftwin import hf_twin
from loopnn.model import LoopGPT

# Dense bf16 peak FLOP/s by GPU name (vendor datasheets, no sparsity). Longest matching key wins.
GPU_BF16_PEAK = {
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def cpu_matmul_peak(n: int = 2048, repeats: int = 3) -> float:
    """fp32 FLOP/s of the best of `repeats` n x n x n matmuls: the practical CPU peak MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        keys = [k for k in GPU_BF16_PEAK if k.lower() in name.lower()]
        if not keys:
            return None, f"{name}: not in bench.GPU_BF16_PEAK"
        key = max(keys, key=len)
        return GPU_BF16_PEAK[key], f"{key} dense bf16 datasheet"
    return cpu_matmul_peak(), "measured fp32 matmul 2048^3, best of 3"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a code region above what was allocated as it began: CUDA max allocated minus the allocation
    at the start (so tensors that other code holds, another model say, are not counted), or on Linux CPU the RSS
    high-water mark (VmHWM) minus the RSS at the start (the mark is reset through /proc/self/clear_refs). None
    where neither is available."""

    def __init__(self, device: torch.device):
        self.device, self.start_kb = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                self.start_kb = proc_status_kb("VmRSS")
            except OSError:
                self.start_kb = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.start_bytes) / 2**20
        else:
            peak = proc_status_kb("VmHWM")
            self.mb = max(peak - self.start_kb, 0) / 1024 if peak is not None and self.start_kb is not None else None


def release_free_memory(threshold: int = 64 * 1024) -> None:
    """glibc: give freed heap memory back to the OS (malloc_trim) and from now on serve allocations above
    `threshold` bytes by mmap, returned to the OS when freed (a fixed threshold), so that the RSS follows the
    live tensors and a peak is not hidden by memory freed earlier. No-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one training step (forward + backward) in this (fresh) process; see bench_memory."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = ModelConfig(**spec["model"])
    torch.manual_seed(spec["seed"])
    model = LoopGPT(cfg).to(device)
    net: nn.Module = model
    if spec["impl"] == "hf":
        net = hf_twin(model)
        net.checkpointing = spec["checkpointing"]
        del model
    # loopnn: the loop driver's checkpointing policy, as train.py applies it (a whole loop iteration recomputed)
    checkpointing = "loop" if spec["checkpointing"] and spec["impl"] == "loopnn" else None
    net.train()
    kw = {"return_logits": False} if spec["impl"] == "loopnn" else {}
    g = torch.Generator().manual_seed(spec["seed"])
    x = torch.randint(0, cfg.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=g).to(device)
    # Warm-up on a small batch: gradients and the allocator's pools exist before the measured step.
    with loop.backprop(loop.Backprop(checkpointing=checkpointing)):
        net(x[:1, :8], x[:1, :8], **kw)[1].backward()
    release_free_memory()
    with PeakMemory(device) as mem, loop.backprop(loop.Backprop(checkpointing=checkpointing)):
        loss = net(x, x, **kw)[1]
        loss.backward()
        sync(device)
    return {"peak_mem_mb": mem.mb, "loss": loss.item()}


def bench_memory(cfg: ModelConfig, bc: Any, seq_len: int, device: torch.device, impls: list[str]) -> dict:
    """{impl: {"loops{n}" or "loops{n}_ckpt": peak MB}} at 1 and bc.memory_loops loops, each in a fresh process
    (bc: a loopnn.bench.BenchConfig; not imported here, bench imports this module).

    CPU: growth of the RSS high-water mark over the step; CUDA: growth of max allocated. A subprocess per setting keeps
    memory freed (but still held by the allocator) by one setting from hiding the next one's peak."""
    import os
    import sys
    from pathlib import Path

    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)  # the loopnn that runs this, also in the child
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out: dict[str, dict[str, float | None]] = {impl: {} for impl in impls}
    for impl in impls:
        for n in sorted({1, bc.memory_loops}):
            for ckpt in (False, True):
                spec = dict(
                    impl=impl, model=dataclasses.asdict(dataclasses.replace(cfg, n_loops=n)), checkpointing=ckpt,
                    batch_size=bc.batch_size, seq_len=seq_len, seed=bc.seed, device=str(device),
                    threads=torch.get_num_threads(),
                )  # fmt: skip
                key = f"loops{n}" + ("_ckpt" if ckpt else "")
                if not bc.memory_subprocess:
                    out[impl][key] = memory_child(spec)["peak_mem_mb"]
                    continue
                code = "import json, sys; from loopnn.instruments import memory_child; " \
                    "print(json.dumps(memory_child(json.loads(sys.argv[1]))))"  # fmt: skip
                run = subprocess.run(
                    [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=900
                )
                if run.returncode != 0:
                    raise RuntimeError(f"memory measurement {impl} {key} failed: {run.stderr.strip()[-800:]}")
                out[impl][key] = json.loads(run.stdout.strip().splitlines()[-1])["peak_mem_mb"]
    return out
