"""Does dopsd.py's accelerator path hold on this machine? One command: a table of checks, a JSON report, exit code 0
iff no check FAILs.

Run as:
    python examples/gpu_check.py --out gpu_check.json           # on a CUDA machine: ~2 min on one H200
    python examples/gpu_check.py --quick                          # smaller kernel tensors and mid-size DiT: ~1 min
    python examples/gpu_check.py --cpu --out /tmp/gc.json         # CPU mode, the same code paths where they exist:
                                                                  # ~25 s on 2 cores; the test suite runs it
    python examples/gpu_check.py --wheels .whl --out gpu.json     # install the pinned libraries from a wheel folder
                                                                  # first (a GPU image without network, see below)
Options: --keep DIR keeps the models and runs it builds (default: a temp dir, removed); --verbose shows what dopsd
prints (default: kept, and the tail of it lands in the report for a check that FAILs).

Everything is offline: the models are examples/make_tiny.py's random-weight Z-Image, FLUX.2-klein and Qwen3-VL, built
in a temp dir, and every training / sampling run goes through the real CLI, dopsd.main([...]), in this process.

The rows (each: PASS / FAIL / SKIP, the measured figure, the goal; a FAIL or SKIP also prints its one-line reason):
  libraries             diffusers / transformers / peft are the versions requirements.txt pins.
  loss fp32 (triton)    the fused loss on backend="triton" -- dopsd_loss (loss, gradient) and dopsd_loss_and_step (loss,
  loss bf16 (triton)    gradient, x_next) -- against divergence_loss_reference in float64 on the same inputs, shapes that
                        are no multiple of the kernel's block; max error / max|reference|, goal 1e-5 (fp32), 2e-2 (bf16).
                        On CUDA the compiled kernel (an interpreted one FAILs: TRITON_INTERPRET=1 leaked in); in --cpu
                        mode the Triton interpreter.
  loss float64 (auto)   float64 inputs on backend="auto": the kernel computes in fp32, so auto must take the PyTorch
                        path and stay at float64 precision (1e-12).
  kernel GB/s fp32      (CUDA) the forward kernel's bandwidth, counting what it must move (reads v_s and v_t, writes
  kernel GB/s bf16      w·d: 3 accesses per element, as examples/bench.py counts them), against a device-to-device copy
                        moving the same bytes (read + write counted); goal >= 80 % of the copy.
  loss auto backend     what backend="auto" resolves to (triton on CUDA, torch on CPU) and dopsd.triton_probe's verdict
                        (a test launch of the kernel); SKIP if this dopsd.py has no triton_probe.
  train zimage tiny     one optimizer step through `dopsd.py train --precision bf16 --grad-checkpointing on` (K = 2,
  train klein tiny      LoRA r4, 64 px): log.jsonl has a finite loss and grad_norm > 0; at the EMA update (right after
                        opt.step()) every teacher .grad is None and every student .grad exists, is finite and not all
                        zero; the DiT has gradient checkpointing on.
  train zimage mid      (CUDA) the same on a mid-size DiT (width 1536, a few blocks, 512 px; --quick: 1024, 256 px).
  train klein mid
  memory zimage mid     (CUDA) torch.cuda.max_memory_allocated() over that run / dopsd.memory_plan's peak
  memory klein mid      (max of peak_training and peak_caching); goal 0.7..1.3.
  sample zimage         `dopsd.py sample --precision bf16` (with the LoRA of the train row) against ZImagePipeline /
  sample klein          Flux2KleinPipeline loaded in bf16 with the same LoRA and seed, run under bf16 autocast as
                        dopsd's sampler runs; max difference in grey levels, goal <= 3 (the plain pipeline's is in the
                        detail).
  2 GPUs: cuda:1        (>= 2 GPUs) one step with --device cuda:1: its loss with the Triton kernel equals the loss with
                        --loss-backend torch (rel. 1e-3): the kernel runs on the tensors' GPU, not on GPU 0.
  2 GPUs: nccl          (>= 2 GPUs) torchrun --nproc_per_node 2, 2 steps: exit 0 and "ranks in sync: 2 ranks".
In --cpu mode the CUDA-only rows SKIP, and --precision bf16 means bf16 weights under CPU autocast.

The GPU machine of this workplace (Python 3.12, torch 2.11 + triton 3.6, other transformers / peft, no diffusers, no
network) takes the pinned libraries as wheels. On a machine with network, in the repo root (/.whl/ is git-ignored):
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl diffusers==0.42.1 transformers==5.23.0 peft==0.21.2
(20 MiB; pure-Python wheels. Their other requirements -- huggingface-hub >= 1.32, < 3; tokenizers >= 0.23.1, < 0.24;
safetensors >= 0.8; regex >= 2025.10.22; tqdm, accelerate, pyyaml, ... -- the GPU image already meets: it has
huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8.0, accelerate 1.15, and its transformers 5.17 pins the same
regex and tqdm bounds. Add a wheel here only for a package the image lacks or holds at a version outside them.)
Then, on the GPU machine, either
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \\
        && PYTHONPATH=/tmp/site python3 examples/gpu_check.py --out $OUT/gpu_check.json
or in one command
    python3 examples/gpu_check.py --wheels .whl --out $OUT/gpu_check.json
which does the same install into a temp dir (never torch, triton or nvidia-* wheels: the machine's own CUDA builds
stay), puts it first on sys.path and on PYTHONPATH (for the torchrun children), then imports the libraries.
"""
import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
torch = dopsd = None          # imported in import_stack(), after the environment is set (TRITON_INTERPRET, --wheels)

PROMPT = "a red circle in [V] style"
TINY_RES, MID_RES, MID_RES_QUICK, MID_RANK, N_IMAGES = 64, 512, 256, 16, 2
# Mid-size DiTs: real head widths (128) and a few blocks, so that the DiT dominates the memory of a run and one step
# still takes seconds. sum(axes_dims) = head dim; the text width (cap_feat_dim / joint_attention_dim) stays tiny.
MID = {"zimage": dict(dim=1536, n_heads=12, n_kv_heads=12, n_layers=4, n_refiner_layers=1, axes_dims=[32, 48, 48]),
       "klein": dict(num_attention_heads=12, attention_head_dim=128, num_layers=2, num_single_layers=4,
                     axes_dims_rope=(32, 32, 32, 32))}
MID_QUICK = {"zimage": dict(MID["zimage"], dim=1024, n_heads=8, n_kv_heads=8, n_layers=2),
             "klein": dict(MID["klein"], num_attention_heads=8, num_layers=1, num_single_layers=2)}
LOSS_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float64": 1e-12}   # max error / max|reference|, as test_dopsd.py
BANDWIDTH_GOAL, MEMORY_BAND, GREY_GOAL, CUDA1_RTOL, NCCL_TIMEOUT_S = 0.8, (0.7, 1.3), 3, 1e-3, 240
PINNED = ("diffusers", "transformers", "peft")
PROTECTED_WHEELS = ("torch", "triton", "torchvision", "torchaudio")  # never shadow the machine's CUDA builds


class Skip(Exception):
    """Raised by a check that does not apply on this machine; the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# environment: wheels, interpreter, imports (all before the first `import torch` / `import triton`)

def install_wheels(folder):
    """pip-install the wheels of `folder` (no index, no deps) into a temp dir and put it first on the paths."""
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        sys.exit(f"--wheels {folder}: no .whl files there")
    protected = lambda w: w.name.split("-")[0].lower() in PROTECTED_WHEELS or w.name.lower().startswith("nvidia")
    keep, left = [w for w in wheels if not protected(w)], [w.name for w in wheels if protected(w)]
    target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, keep)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {"folder": str(folder), "target": str(target), "installed": [w.name for w in keep], "left_out": left}


def import_stack(cpu):
    """Import torch and dopsd. CPU mode: the Triton interpreter, which @triton.jit picks when dopsd is imported."""
    global torch, dopsd
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch as _torch
    torch = _torch
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: running the CPU mode (--cpu)")
        cpu = True
        if "triton" not in sys.modules:                  # still in time for the interpreter
            os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    import dopsd as _dopsd
    dopsd = _dopsd
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging
    for lg in (d_logging, t_logging):                     # progress bars and info lines would bury the table
        lg.disable_progress_bar()
        lg.set_verbosity_error()
    return torch.device("cpu" if cpu else "cuda")


def load_make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", HERE / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine(device):
    """Device name and library versions (with where each pinned library was imported from)."""
    import diffusers, peft, transformers
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else cpu, "gpus": torch.cuda.device_count(),
            "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
                         **{m.__name__: m.__version__ for m in (diffusers, transformers, peft)}},
            "paths": {m.__name__: str(Path(m.__file__).parent.parent) for m in (diffusers, transformers, peft)},
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


# --------------------------------------------------------------------------------------------------------------------
# running checks: every check is isolated; its exception becomes a FAIL row with a one-line reason

def result(ok, value, detail="", **data):
    return {"ok": bool(ok), "value": value, "detail": detail, "data": data}


def one_line(e, log=""):
    """The reason of an exception in one line. An argparse exit or dopsd's exit code 2 says more in its 'error:' line."""
    msg = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    errors = [l.strip() for l in log.splitlines() if "error:" in l]
    if errors and (isinstance(e, SystemExit) or "returned" in msg):
        text += f" ({errors[-1]})"
    return text[:300]


def once(fn):
    """Memoise fn(*args), its exception too: two rows (train mid, memory mid) read one run."""
    cache = {}

    def wrapped(*args):
        if args not in cache:
            try:
                cache[args] = (True, fn(*args))
            except Exception as e:                        # noqa: BLE001 - re-raised to every caller
                cache[args] = (False, e)
        ok, v = cache[args]
        if not ok:
            raise v
        return v
    return wrapped


class Report:
    def __init__(self, args, info):
        self.args, self.rows, self.t0 = args, [], time.perf_counter()
        self.head = {"mode": "cpu" if args.cpu else "cuda", "quick": args.quick, **info}

    def check(self, name, goal, fn):
        """Run fn() -> result(...) with its output captured; record PASS / FAIL / SKIP; never raise."""
        t0, log, row = time.perf_counter(), io.StringIO(), {"name": name, "goal": goal, "value": "", "detail": ""}
        try:
            with contextlib.ExitStack() as quiet:
                if not self.args.verbose:                 # dopsd's banners, tqdm bars and warnings go to the log
                    quiet.enter_context(contextlib.redirect_stdout(log))
                    quiet.enter_context(contextlib.redirect_stderr(log))
                r = fn()
            row.update(status="PASS" if r["ok"] else "FAIL", value=r["value"], detail=r["detail"], data=r["data"])
        except Skip as e:
            row.update(status="SKIP", detail=str(e))
        except (Exception, SystemExit) as e:              # SystemExit: an argparse error inside dopsd.main
            row.update(status="FAIL", detail=one_line(e, log.getvalue()),
                       traceback=traceback.format_exc().splitlines()[-12:])
        if row["status"] == "FAIL":
            row["log_tail"] = log.getvalue()[-3000:]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {row['status']}  {name}  {row['value']}", flush=True)
        self.write()

    def write(self):
        """The JSON report, rewritten after every row: a run cut short still leaves what it measured."""
        if self.args.out:
            doc = {**self.head, "wall_s": round(time.perf_counter() - self.t0, 1), "checks": self.rows,
                   "fails": sum(r["status"] == "FAIL" for r in self.rows)}
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(doc, indent=2, default=str))

    def table(self, width=110):
        """The summary table, 110 columns; FAIL and SKIP rows get their reason on the next line(s)."""
        v = self.head["versions"]
        lines = [f"{self.head['device']} | {self.head['mode']}{' quick' if self.args.quick else ''} | " + ", ".join(
            f"{k} {v[k]}" for k in ("torch", "triton", "diffusers", "transformers", "peft")),
            f"{'check':<22}  {'':4}  {'measured':<38}  goal", "-" * width]
        for r in self.rows:
            lines.append(f"{r['name']:<22}  {r['status']:4}  {_cut(r['value'], 38):<38}  {_cut(r['goal'], width - 70)}")
            if r["status"] != "PASS" and r["detail"]:
                text = str(r["detail"])
                lines += ["        " + text[i:i + width - 8] for i in range(0, min(len(text), 3 * (width - 8)), width - 8)]
        n = {s: sum(r["status"] == s for r in self.rows) for s in ("PASS", "FAIL", "SKIP")}
        lines += ["-" * width, f"{n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP in "
                  f"{time.perf_counter() - self.t0:.0f} s" + (f"; report: {self.args.out}" if self.args.out else "")]
        return "\n".join(lines)


def _cut(s, n):
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def need_cuda(ctx, what):
    if ctx.device.type != "cuda":
        raise Skip(f"CUDA only ({what}); CPU mode")


def need_two_gpus(ctx):
    need_cuda(ctx, "two GPUs")
    if torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU visible, needs 2")


# --------------------------------------------------------------------------------------------------------------------
# 1. the fused loss: accuracy against the float64 reference, bandwidth against a copy, what auto picks

def kernel_kind():
    """'compiled' or 'interpreted' (TRITON_INTERPRET=1 at import), None without triton."""
    if not dopsd.HAS_TRITON:
        return None
    from triton.runtime.jit import JITFunction
    return "compiled" if isinstance(dopsd._divergence_kernel, JITFunction) else "interpreted"


def rel_err(actual, expected):
    """max|a - e| / max|e| (normwise, so elements near 0 do not blow up), in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)


def loss_errors(device, dtype, shape, backend, seed):
    """{what: error} of dopsd_loss and dopsd_loss_and_step against the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(seed)
    vs, vt, x = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    sigma = (0.05 + 0.95 * torch.rand(shape[0], generator=g)).to(device)
    dt = -(0.05 + 0.5 * torch.rand(shape[0], generator=g)).to(device)   # σ falls along the roll-out
    vs64 = vs.double().requires_grad_(True)
    ref = dopsd.divergence_loss_reference(vs64, vt.double(), sigma.double())
    ref.backward()
    x_ref = x.double() + dt.double().view(-1, *[1] * (len(shape) - 1)) * vs.double()
    vs.requires_grad_(True)
    loss = dopsd.dopsd_loss(vs, vt, sigma, backend=backend)
    loss.backward()
    errs = {"loss": rel_err(loss, ref), "grad": rel_err(vs.grad, vs64.grad)}
    vs.grad = None
    loss, x_next = dopsd.dopsd_loss_and_step(vs, vt, sigma, x, dt, backend=backend)
    loss.backward()
    errs.update({"step loss": rel_err(loss, ref), "step grad": rel_err(vs.grad, vs64.grad),
                 "x_next": rel_err(x_next, x_ref)})
    if x_next.dtype != x.dtype or x_next.requires_grad:
        errs["x_next"] = math.inf                         # must come back in x's dtype, detached
    return errs


def check_loss(ctx, dtype):
    """fp32 / bf16 on backend='triton' (the kernel); float64 on backend='auto' (must take the PyTorch path)."""
    name = str(dtype).removeprefix("torch.")
    backend = "auto" if dtype == torch.float64 else "triton"
    kind = kernel_kind()
    if backend == "triton":
        if kind is None:
            raise RuntimeError("triton is not importable: the fused loss would take the PyTorch path")
        if ctx.device.type == "cuda" and kind != "compiled":
            raise RuntimeError("the kernel is interpreted on CUDA: unset TRITON_INTERPRET and rerun")
    shapes = [(2, 4099), (1, 7, 13, 17), (3, 5, 37, 29)] + ([(4, 16, 128, 128)] if ctx.device.type == "cuda" else [])
    worst, where = 0.0, ""
    for i, shape in enumerate(shapes):
        for what, e in loss_errors(ctx.device, dtype, shape, backend, seed=i).items():
            if not e <= worst:                            # NaN counts as worst too
                worst, where = e, f"{what} on {shape}"
    path = f"{kind} kernel" if backend == "triton" else "auto -> PyTorch path"
    return result(worst <= LOSS_TOL[name], f"max err {worst:.1e}", f"{path}; worst: {where}; {len(shapes)} shapes",
                  worst=worst, where=where, kernel=kind)


def cuda_ms(fn, reps):
    """Milliseconds per call of fn over `reps` back-to-back calls between two CUDA events. Back to back, the launch
    overhead on the host overlaps the GPU's work, so this times the kernel, not Python (bench.py's _time_ms
    synchronises after every call, which adds the host's launch gap to a sub-millisecond kernel)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def check_bandwidth(ctx, dtype):
    """The forward kernel's GB/s vs a device-to-device copy of the same bytes, on tensors far larger than L2."""
    need_cuda(ctx, "kernel bandwidth")
    if kernel_kind() != "compiled":
        raise RuntimeError(f"no compiled Triton kernel (triton: {kernel_kind()})")
    n = 2**26 if ctx.args.quick else 2**28                # 2^28 fp32: 1 GiB per tensor, 3 GiB per call (H200 L2: 60 MB)
    dev = ctx.device
    vs = torch.randn(4, n // 4, device=dev, dtype=dtype)
    vt, w = torch.randn_like(vs), torch.rand(4, device=dev)
    moved = 3 * n * vs.element_size()                     # reads v_s, v_t; writes w·d (+4 bytes per 1024-element block)
    src = torch.empty(3 * n // 2, device=dev, dtype=dtype)   # a copy reads and writes 1.5 n elements: the same bytes
    dst = torch.empty_like(src)
    kernel = lambda: dopsd._divergence_fwd_triton(vs, vt, w)
    copy = lambda: dst.copy_(src)
    for fn in (kernel, copy):                             # compile and warm up
        fn()
    torch.cuda.synchronize()
    times = {"kernel": [], "copy": []}
    for _ in range(5):                                    # interleaved rounds, median: clock drift hits both alike
        times["kernel"].append(cuda_ms(kernel, 10))
        times["copy"].append(cuda_ms(copy, 10))
    gbps = {k: moved / statistics.median(t) / 1e6 for k, t in times.items()}
    frac = gbps["kernel"] / gbps["copy"]
    del vs, vt, src, dst
    torch.cuda.empty_cache()
    return result(frac >= BANDWIDTH_GOAL, f"{gbps['kernel']:.0f} GB/s = {100 * frac:.0f} % of copy",
                  f"copy {gbps['copy']:.0f} GB/s; {n / 2**20:.0f} Mi elements, {moved / 1e9:.2f} GB per call",
                  kernel_gbps=gbps["kernel"], copy_gbps=gbps["copy"], fraction=frac, elements=n)


def check_auto(ctx):
    """backend='auto' on this device: triton on CUDA (after dopsd.triton_probe's test launch), torch on CPU."""
    probe = getattr(dopsd, "triton_probe", None)
    if probe is None:
        raise Skip("this dopsd.py has no triton_probe")
    ok, why = probe(ctx.device) if dopsd.HAS_TRITON else (False, "triton not importable")
    dopsd.LOSS_BACKEND.pop(ctx.device.type, None)         # resolve afresh, as a new process would
    chosen = dopsd._resolve_loss_backend("auto", ctx.device, torch.float32)
    cuda = ctx.device.type == "cuda"
    good = (chosen == "triton" and ok) if cuda else chosen == "torch"
    return result(good, f"auto = {chosen}; probe {'ok' if ok else 'failed'}", why, chosen=chosen, probe=[ok, why])
