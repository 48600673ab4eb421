"""Benchmarks for dopsd.py. Part 1: the divergence loss, fused paths vs the naive autograd composition.

Run as:  python examples/bench.py [threads]      (CPU: ~15 s on 2 cores; on a CUDA machine it adds the Triton rows)

On every device: median forward+backward time, bytes of tensors saved for backward (saved_tensors_hooks), and bytes
touched per element (a dispatch hook that adds up the input and output bytes of every non-view aten op; an upper
bound on DRAM traffic that ignores caches, but it counts exactly the passes the math comment in the loss counts).
On CUDA only: achieved GB/s of the Triton forward kernel (read v_s, v_t, write w·d) vs a device-to-device copy
that moves the same number of bytes.
"""
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dopsd import HAS_TRITON, _divergence_fwd_triton, dopsd_loss  # noqa: E402


def _time_ms(fns, device, repeats, warmup):
    """Median wall time in ms of each fn in {name: fn}, runs interleaved so that load from other processes hits every
    path alike. CUDA events on GPU (no host sync in the timed region), perf_counter on CPU."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while fn() builds its graph."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    return loss, sum(seen.values())


class _TrafficCounter(TorchDispatchMode):
    """Adds input+output bytes of every aten op that allocates its output (views and aliases are free)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("empty"):
            return out  # an allocation touches no memory until something writes it
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(o)]
        ptrs = {a.untyped_storage().data_ptr() for a in ins}
        if outs and all(o.untyped_storage().data_ptr() in ptrs for o in outs):
            return out  # a view/alias (detach, view, expand, ...) moves no data
        nbytes = lambda t: min(t.nbytes, t.untyped_storage().nbytes())  # an expanded scalar is read once
        self.bytes += sum(nbytes(t) for t in ins + outs)
        return out


def bench_loss(device="cpu", shape=(4, 16, 128, 128), dtype=torch.float32, repeats=20, warmup=3):
    """Time and memory of one loss forward+backward, fused vs naive, on `device` with inputs of `shape` and `dtype`.

    Returns a flat dict: device, shape, dtype, numel; per path p in naive / torch (/ triton on CUDA): p_ms (median
    fwd+bwd), p_saved_bytes (saved for backward), p_bytes_per_elem (bytes touched, fwd+bwd); speedup_torch_vs_naive;
    on CUDA also triton_fwd_ms, triton_fwd_gbps, copy_ms, copy_gbps, triton_fraction_of_copy.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    vs = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
    vt = torch.randn(shape, generator=g).to(device, dtype)
    sigma = torch.rand(shape[0], generator=g).to(device)
    N, s = vs.numel(), vs.element_size()
    w = (sigma**2).view(-1, *([1] * (vs.dim() - 1)))              # (B, 1, ..., 1) for the naive version

    def naive():
        return (w * (vs - vt) ** 2).mean()                         # the composition the fused op replaces

    paths = {"naive": naive, "torch": lambda: dopsd_loss(vs, vt, sigma, backend="torch")}
    if device.type == "cuda" and HAS_TRITON:
        paths["triton"] = lambda: dopsd_loss(vs, vt, sigma, backend="triton")

    res = {"device": str(device), "shape": tuple(shape), "dtype": str(dtype).replace("torch.", ""), "numel": N}

    def fwd_bwd(loss_fn):
        def step():
            vs.grad = None
            loss_fn().backward()
        return step

    ms = _time_ms({name: fwd_bwd(f) for name, f in paths.items()}, device, repeats, warmup)
    res.update({f"{name}_ms": t for name, t in ms.items()})
    for name, loss_fn in paths.items():
        vs.grad = None
        loss, res[f"{name}_saved_bytes"] = _saved_bytes(loss_fn)
        with _TrafficCounter() as tc:
            loss.backward()
        traffic_bwd = tc.bytes
        vs.grad = None
        with _TrafficCounter() as tc:
            loss_fn()
        res[f"{name}_bytes_per_elem"] = (tc.bytes + traffic_bwd) / N
        if name == "triton":  # a Triton launch is not an aten op: add its reads of v_s, v_t and write of w·d by hand
            res[f"{name}_bytes_per_elem"] += 3 * s
    res["speedup_torch_vs_naive"] = res["naive_ms"] / res["torch_ms"]

    if device.type == "cuda" and HAS_TRITON:
        # forward kernel alone: reads v_s and v_t, writes w·d (plus 4 bytes per 1024-element block of partials)
        wv = (sigma**2).float().contiguous()
        vs_d, vt_d = vs.detach().contiguous(), vt.detach().contiguous()
        moved = N * (2 * s + s)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)  # a copy reads and writes: same bytes moved
        dst = torch.empty_like(src)
        ms = _time_ms({"kernel": lambda: _divergence_fwd_triton(vs_d, vt_d, wv), "copy": lambda: dst.copy_(src)},
                      device, repeats, warmup)
        t_kernel, t_copy = ms["kernel"], ms["copy"]
        res.update(triton_fwd_ms=t_kernel, triton_fwd_gbps=moved / t_kernel / 1e6,
                   copy_ms=t_copy, copy_gbps=moved / t_copy / 1e6)
        res["triton_fraction_of_copy"] = res["triton_fwd_gbps"] / res["copy_gbps"]
    return res


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1:  # python bench_loss.py 1: one thread, steadier when another process holds a core
        torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
          + f" | torch {torch.__version__}, triton: {HAS_TRITON}")
    results = []
    for dev in devices:
        for dt in (torch.float32, torch.bfloat16):
            r = bench_loss(dev, dtype=dt)
            results.append(r)
            print(f"\n{r['device']} {r['dtype']} shape {r['shape']} ({r['numel'] / 1e6:.2f}M elements)")
            print(f"{'path':8s} | {'fwd+bwd ms':>10s} | {'saved MB':>8s} | {'B/elem touched':>14s}")
            for p in ("naive", "torch", "triton"):
                if f"{p}_ms" in r:
                    print(f"{p:8s} | {r[p + '_ms']:10.2f} | {r[p + '_saved_bytes'] / 2**20:8.2f} | "
                          f"{r[p + '_bytes_per_elem']:14.1f}")
            print(f"torch path speed-up over naive: {r['speedup_torch_vs_naive']:.2f}x")
            if "triton_fwd_gbps" in r:
                print(f"triton fwd kernel {r['triton_fwd_gbps']:.0f} GB/s vs copy {r['copy_gbps']:.0f} GB/s "
                      f"({100 * r['triton_fraction_of_copy']:.0f}% of copy)")
    print(json.dumps({"loss": results}))
