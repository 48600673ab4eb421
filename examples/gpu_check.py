"""Does dopsd.py's accelerator path hold on this machine? One command prints a table of checks and writes a JSON report.

Exit code 0 iff no check FAILs.

Run as:
    python examples/gpu_check.py --out gpu_check.json           # on a CUDA machine: ~2 min on one H200
    python examples/gpu_check.py --quick                          # smaller kernel tensors and mid-size DiT: ~1 min
    python examples/gpu_check.py --cpu --out /tmp/gc.json         # CPU mode, the same code paths where they exist:
                                                                  # ~15 s on 2 cores; the test suite runs it
    python examples/gpu_check.py --wheels .whl --out gpu.json     # install the pinned libraries from a wheel folder
                                                                  # first (a GPU image without network, see below)
Options: --keep DIR keeps the models and runs it builds (default: a temp dir, removed); --verbose shows what dopsd
prints (default: kept, and the tail of it lands in the report for a check that FAILs).

Everything is offline: the models are examples/make_tiny.py's random-weight Z-Image, FLUX.2-klein and Qwen3-VL, built
in a temp dir, and every training / sampling run goes through the real CLI, dopsd.main([...]), in this process.

The rows (each: PASS / FAIL / SKIP, the measured figure, the goal; a FAIL or SKIP also prints its one-line reason):
  libraries             diffusers / transformers / peft are the versions requirements.txt pins.
  loss fp32 (triton)    the fused loss on backend="triton" -- dopsd_loss (loss, gradient) -- against
  loss bf16 (triton)    divergence_loss_reference in float64 on the same inputs, on
                        shapes that are no multiple of the kernel's block; max error / max|reference|, goal 1e-5
                        (fp32), 2e-2 (bf16).
                        On CUDA the compiled kernel (an interpreted one FAILs: TRITON_INTERPRET=1 leaked in); in --cpu
                        mode the Triton interpreter.
  loss float64 (auto)   float64 inputs on backend="auto": the kernel computes in fp32, so auto must take the PyTorch
                        path: the gradient at float64 precision (1e-12), the loss an fp32 scalar (1e-6).
  kernel GB/s fp32      (CUDA) the forward kernel's bandwidth, counting what it must move (reads u_s and u_t, writes
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
  memory zimage mid     (CUDA) torch.cuda.max_memory_allocated() over that run / examples/memory_plan.py's peak
  memory klein mid      (max of peak_training and peak_caching); goal 0.7..1.3.
  fp8 base zimage mid   (CUDA) the mid-size step again with --fp8-base on: the train verdict, a float8 DiT, and its
  fp8 base klein mid    peak against memory_plan's --base-precision fp8 plan (goal 0.7..1.3; the bf16 peak beside it).
  sample zimage         `dopsd.py sample --precision bf16` (with the LoRA of the train row) against ZImagePipeline /
  sample klein          Flux2KleinPipeline loaded in bf16 with the same LoRA and seed, run under bf16 autocast as
                        dopsd's sampler runs: the max difference in grey levels. The floor is the pipeline's own bf16
                        image against its fp32 image (random weights amplify bf16 rounding to several grey levels);
                        goal <= max(3, 2 x floor). The plain (no autocast) pipeline's difference is in the detail.
  2 GPUs: cuda:1        (>= 2 GPUs) one step with --device cuda:1: its loss with the Triton kernel equals the loss with
                        --loss-backend torch (rel. 1e-3): the kernel runs on the tensors' GPU, not on GPU 0.
  2 GPUs: nccl          (>= 2 GPUs) torchrun --nproc_per_node 2, 2 steps: exit 0 and "ranks in sync: 2 ranks".
  2 GPUs: nccl --full   (>= 2 GPUs) the mid-size Z-Image DiT, --full sharded with FSDP2 over 2 ranks, 2 steps: exit 0,
                        and each rank's peak of allocated memory against memory_plan's --world-size 2 plan (0.7..1.3).
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
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && PYTHONPATH=/tmp/site python3 examples/gpu_check.py --out $OUT/gpu_check.json
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
import statistics
import subprocess
import sys
import tempfile
import textwrap
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
LOSS_TOL_LOSS64 = 1e-6                    # the loss itself is an fp32 scalar, also for float64 inputs
BANDWIDTH_GOAL, MEMORY_BAND, GREY_GOAL, CUDA1_RTOL, NCCL_TIMEOUT_S = 0.8, (0.7, 1.3), 3, 1e-3, 120
TRAIN_GOAL = "finite loss & grads, no teacher grad, ckpt on"
PINNED = ("diffusers", "transformers", "peft")
PROTECTED_WHEELS = ("torch", "triton", "torchvision", "torchaudio")  # never shadow the machine's CUDA builds


class Skip(Exception):
    """Raised by a check that does not apply on this machine; the message says why."""


class MainFailed(RuntimeError):
    """dopsd.main returned a non-zero exit code (its 'error:' line is in the captured output)."""


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


def load_example(name):
    """examples/<name> as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(Path(name).stem, HERE / name)
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
    """The reason of an exception in one line. An argparse exit or a dopsd exit code says more in its 'error:' line."""
    msg = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    errors = [l.strip() for l in log.splitlines() if "error:" in l]
    if errors and isinstance(e, (SystemExit, MainFailed)):
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
                if not self.args.verbose:                 # dopsd's banners, tqdm bars, warnings: into the log
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
        mode = self.head["mode"] + (" quick" if self.args.quick else "")
        libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "diffusers", "transformers", "peft"))
        lines = [f"{self.head['device']} | {mode} | {libs}", f"{'check':<20}  {'':4}  {'measured':<34}  goal",
                 "-" * width]
        for r in self.rows:
            lines.append(f"{r['name']:<20}  {r['status']:4}  {_cut(r['value'], 34):<34}  {_cut(r['goal'], width - 64)}")
            if r["status"] != "PASS" and r["detail"]:     # the reason, wrapped, at most 3 lines
                lines += textwrap.wrap(str(r["detail"]), width, initial_indent=" " * 8, subsequent_indent=" " * 8,
                                       max_lines=3, placeholder=" …")
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
    """{what: error} of dopsd_loss against the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(seed)
    vs, vt = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    sigma = (0.05 + 0.95 * torch.rand(shape[0], generator=g)).to(device)
    vs64 = vs.double().requires_grad_(True)
    ref = dopsd.divergence_loss_reference(vs64, vt.double(), sigma.double())
    ref.backward()
    vs.requires_grad_(True)
    loss = dopsd.dopsd_loss(vs, vt, sigma, backend=backend)
    loss.backward()
    return {"loss": rel_err(loss, ref), "grad": rel_err(vs.grad, vs64.grad)}


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
    shapes = [(2, 4099), (1, 7, 13, 17), (3, 5, 37, 29)]  # no multiple of the 1024-element block
    if ctx.device.type == "cuda":
        shapes.append((4, 16, 128, 128))                  # a 512 px Z-Image latent, batch 4
    worst = {"loss": (-1.0, ""), "tensor": (-1.0, "")}   # the scalar loss; the gradient
    for i, shape in enumerate(shapes):
        for what, e in loss_errors(ctx.device, dtype, shape, backend, seed=i).items():
            group = "loss" if "loss" in what else "tensor"
            if not e <= worst[group][0]:                  # NaN counts as worst too
                worst[group] = (e, f"{what} on {shape}")
    # the loss comes back in fp32 by contract, also for float64 inputs: its tolerance is fp32's there
    tol = {"loss": max(LOSS_TOL[name], LOSS_TOL_LOSS64), "tensor": LOSS_TOL[name]}
    ok = all(worst[g][0] <= tol[g] for g in worst)
    path = f"{kind} kernel" if backend == "triton" else "auto -> PyTorch path"
    return result(ok, f"loss {worst['loss'][0]:.1e}, grad {worst['tensor'][0]:.1e}",
                  f"{path}; worst: {worst['loss'][1]}, {worst['tensor'][1]}; {len(shapes)} shapes",
                  worst={g: list(v) for g, v in worst.items()}, tolerance=tol, kernel=kind)


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
    n = 2**26 if ctx.args.quick else 2**28                # 2^28 fp32: 1 GiB per tensor (an H200's L2: 60 MB)
    dev = ctx.device
    vs = torch.randn(4, n // 4, device=dev, dtype=dtype)
    vt, w = torch.randn_like(vs), torch.rand(4, device=dev)
    moved = 3 * n * vs.element_size()                     # reads u_s, u_t; writes w·d (+4 bytes per 1024-element block)
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


# --------------------------------------------------------------------------------------------------------------------
# models and data: make_tiny's builders, the mid-size DiTs through their optional dit= argument

def make_data(mt, folder, size, long_captions=False):
    """N_IMAGES square images of make_tiny's drawings at exactly `size` px (one bucket, equal steps), with captions.

    long_captions: ~450 characters. The byte-level tiny tokenizer makes that ~480 tokens, near the 512 that
    memory_plan assumes for a Z-Image caption (an upper bound), so the memory row tests the formula, not the caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        img, caption = mt.draw_sample(i)
        if long_captions:
            caption = (caption + ", drawn large on a textured background, flat colours, soft light" * 8)[:450]
        dopsd.crop_to(img, size, size).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
    return folder


def build_models(ctx):
    """{zimage, klein, vlm, data}: paths of the tiny models and data (built once, by ctx.models())."""
    mt, root = ctx.make_tiny, ctx.work / "tiny"
    for name, build in (("zimage", mt.make_zimage), ("klein", mt.make_klein), ("vlm", mt.make_vlm)):
        build(root / name)
    make_data(mt, root / "data", TINY_RES)
    return {k: root / k for k in ("zimage", "klein", "vlm", "data")}


def build_mid(ctx, family):
    """(model folder, data folder) of the mid-size DiT of `family`; its text encoder and VAE stay tiny."""
    mt, root = ctx.make_tiny, ctx.work / "mid"
    build = mt.make_zimage if family == "zimage" else mt.make_klein
    build(root / family, dit=(MID_QUICK if ctx.args.quick else MID)[family])
    if not (root / "data").is_dir():
        make_data(mt, root / "data", ctx.mid_res, long_captions=True)
    return root / family, root / "data"


class Ctx:
    """What the checks share: options, device, work dir, and the memoised model builds and training runs."""

    def __init__(self, args, device, work):
        self.args, self.device, self.work = args, device, work
        self.mid_res = MID_RES_QUICK if args.quick else MID_RES
        self.make_tiny = load_example("make_tiny.py")
        self.models = once(lambda: build_models(self))
        self.mid = once(lambda family: build_mid(self, family))
        self.train_tiny = once(self._train_tiny)
        self.train_mid = once(self._train_mid)
        self.train_mid_fp8 = once(lambda family: self._train_mid(family, ("--fp8-base", "on")))

    def _train_tiny(self, family):
        m = self.models()
        return run_train(self, m[family], m["vlm"], m["data"], self.work / f"train_{family}_tiny", TINY_RES,
                         self.device)

    def _train_mid(self, family, extra=()):
        model, data = self.mid(family)
        return run_train(self, model, self.models()["vlm"], data, self.work / f"train_{family}_mid{len(extra)}",
                         self.mid_res, self.device, rank=MID_RANK, extra=extra)


# --------------------------------------------------------------------------------------------------------------------
# 2./3. one training step through the CLI, with a spy on the EMA update; the memory of that run against the plan

def train_argv(model, vlm, data, out, resolution, device, rank=4, max_steps=1, extra=()):
    return ["train", "--data", str(data), "--model", str(model), "--vlm", str(vlm), "--out", str(out),
            "--resolution", str(resolution), "--rollout-steps", "2", "--rank", str(rank), "--max-steps", str(max_steps),
            "--sample-every", "0", "--lr", "1e-3", "--precision", "bf16", "--grad-checkpointing", "on",
            "--device", str(device), *extra]


def grad_spy(seen):
    """A stand-in for dopsd.ema_update that records the gradients as opt.step() left them, then calls the real one."""
    real = dopsd.ema_update

    def ema_update(teacher_params, student_params, decay):
        grads = [p.grad for p in student_params]
        seen.update(ema_calls=seen.get("ema_calls", 0) + 1, teacher_params=len(teacher_params),
                    teacher_grads=sum(p.grad is not None for p in teacher_params), student_params=len(grads),
                    student_grads_missing=sum(g is None for g in grads),
                    student_grads_finite=all(bool(torch.isfinite(g).all()) for g in grads if g is not None),
                    student_grads_nonzero=sum(bool(g.abs().sum() > 0) for g in grads if g is not None))
        return real(teacher_params, student_params, decay)
    return ema_update


def run_train(ctx, model, vlm, data, out, resolution, device, rank=4, extra=()):
    """One step of dopsd.main(train ...) in this process. Returns what the spies and log.jsonl saw, and on CUDA the
    run's own peak of allocated memory (max_memory_allocated minus what was allocated before it)."""
    seen, real_ema, real_load = {}, dopsd.ema_update, dopsd.load_pipeline

    def load_pipeline(*a, **k):                           # keep a handle on the DiT to read its state afterwards
        pipe = real_load(*a, **k)
        seen["dit"] = pipe.transformer
        return pipe
    cuda = torch.device(device).type == "cuda"
    shutil.rmtree(out, ignore_errors=True)                # a --keep rerun: dopsd refuses to train into an old run
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    dopsd.ema_update, dopsd.load_pipeline = grad_spy(seen), load_pipeline
    try:
        code = dopsd.main(train_argv(model, vlm, data, out, resolution, device, rank, extra=extra))
        if cuda:
            torch.cuda.synchronize()
            seen["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    finally:
        dopsd.ema_update, dopsd.load_pipeline = real_ema, real_load
    if code != 0:
        raise MainFailed(f"dopsd.main(train) returned {code}")
    dit = seen.pop("dit")
    seen["checkpointing"] = bool(dit.is_gradient_checkpointing)
    seen["dit_dtype"] = str(next(p.dtype for n, p in dit.named_parameters() if ".lora_" not in n))
    del dit
    log = [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]
    seen.update(log=log, loss=log[-1]["loss"], grad_norm=log[-1]["grad_norm"], skipped=log[-1]["skipped"])
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return seen


def train_verdict(s):
    """PASS when the step ran, the loss and gradients are sane, the teacher got none, and checkpointing was on."""
    problems = [
        (s["skipped"], "the step was skipped (non-finite loss or gradient)"),
        (not (math.isfinite(s["loss"]) and s["loss"] > 0), f"loss {s['loss']} is not finite and > 0"),
        (not (math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0), f"grad_norm {s['grad_norm']} not finite, > 0"),
        (s.get("ema_calls") != 1, f"ema_update ran {s.get('ema_calls', 0)} times, expected once"),
        (s.get("teacher_params", 0) == 0, "no teacher parameters reached ema_update"),
        (s.get("teacher_grads", 0) > 0, f"{s.get('teacher_grads')} teacher parameters have a .grad"),
        (s.get("student_grads_missing", 1) > 0, f"{s.get('student_grads_missing')} of {s.get('student_params')} "
                                                "student parameters have no .grad"),
        (not s.get("student_grads_finite", False), "a student gradient is not finite"),
        (s.get("student_grads_nonzero", 0) == 0, "every student gradient is zero"),
        (not s["checkpointing"], "gradient checkpointing is off in the DiT despite --grad-checkpointing on"),
    ]
    bad = [why for cond, why in problems if cond]
    detail = "; ".join(bad) or (f"{s['student_grads_nonzero']}/{s['student_params']} student grads non-zero (at "
                                f"step 1 the lora_A grads are 0: lora_B starts at 0), {s['teacher_params']} teacher "
                                f"grads None, DiT {s['dit_dtype']}, checkpointing on")
    facts = {k: v for k, v in s.items() if k != "log"}
    return result(not bad, f"loss {s['loss']:.3g}, grad norm {s['grad_norm']:.3g}", detail, **facts)


def check_train_tiny(ctx, family):
    return train_verdict(ctx.train_tiny(family))


def check_train_mid(ctx, family):
    need_cuda(ctx, "mid-size DiT")
    return train_verdict(ctx.train_mid(family))


def check_memory(ctx, family):
    """The mid-size run's peak of allocated CUDA memory against examples/memory_plan.py for the same setup."""
    need_cuda(ctx, "memory")
    s = ctx.train_mid(family)
    model, _ = ctx.mid(family)
    memory_plan = load_example("memory_plan.py").memory_plan
    plan = memory_plan(str(model), str(ctx.models()["vlm"]), method="dopsd", rank=MID_RANK, resolution=ctx.mid_res,
                       batch_size=1, n_images=N_IMAGES, rollout_steps=2, grad_checkpointing=True)
    planned = max(plan["peak_training"], plan["peak_caching"])
    ratio = s["peak_bytes"] / planned
    gib = lambda b: f"{b / 2**30:.2f}"
    rows = {k: v for k, v in plan.items() if isinstance(v, (int, float))}   # every row of the memory plan's table
    return result(MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1],
                  f"{ratio:.2f} ({gib(s['peak_bytes'])} / {gib(planned)} GiB)",
                  f"measured {s['peak_bytes']:,} B, plan {planned:,} B (peak while training "
                  f"{plan['peak_training']:,}, while caching {plan['peak_caching']:,})",
                  measured=s["peak_bytes"], plan=rows, params=plan.get("params"))


def check_fp8(ctx, family):
    """The mid-size run again with --fp8-base on: the same training verdict, the DiT's LoRA'd weights stored in
    float8, and the peak of allocated memory against memory_plan's fp8 plan (and against the bf16 run's peak)."""
    need_cuda(ctx, "fp8 base")
    s, bf16 = ctx.train_mid_fp8(family), ctx.train_mid(family)
    verdict = train_verdict(s)
    model, _ = ctx.mid(family)
    plan = load_example("memory_plan.py").memory_plan(
        str(model), str(ctx.models()["vlm"]), method="dopsd", rank=MID_RANK, resolution=ctx.mid_res, batch_size=1,
        n_images=N_IMAGES, rollout_steps=2, grad_checkpointing=True, base_precision="fp8")
    planned = max(plan["peak_training"], plan["peak_caching"])
    ratio, gib = s["peak_bytes"] / planned, lambda b: f"{b / 2**30:.2f}"
    ok = verdict["ok"] and "float8" in s["dit_dtype"] and MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1]
    return result(ok, f"{ratio:.2f} ({gib(s['peak_bytes'])} / {gib(planned)} GiB; bf16 base {gib(bf16['peak_bytes'])})",
                  f"{verdict['detail']}; measured {s['peak_bytes']:,} B, fp8 plan {planned:,} B",
                  measured=s["peak_bytes"], measured_bf16=bf16["peak_bytes"], plan_fp8=planned, train=verdict["data"])


# --------------------------------------------------------------------------------------------------------------------
# 4. dopsd.py sample against the diffusers pipeline, both in bf16

def pipeline_image(family, model, lora, device, dtype, autocast):
    """The diffusers pipeline's image at the deploy settings, seed 5, as grey levels (float64 in 0..255)."""
    import numpy as np
    from diffusers import Flux2KleinPipeline, ZImagePipeline
    pipe = (ZImagePipeline if family == "zimage" else Flux2KleinPipeline).from_pretrained(model, dtype=dtype).to(device)
    if lora:
        pipe.load_lora_weights(str(lora))
    kw = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=dopsd.FAMILIES[family]["deploy"],
              output_type="np")                           # 8 steps for Z-Image-Turbo, 4 for klein
    if family == "zimage":
        kw.update(guidance_scale=0.0)                     # > 0 would turn CFG on
    else:                                                 # the tiny 4-layer encoder: read layers 1, 2, 3
        kw.update(guidance_scale=1.0, text_encoder_out_layers=dopsd.klein_text_layers(pipe.text_encoder))
    with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        img = pipe(generator=torch.Generator().manual_seed(5), **kw).images[0]
    return np.round(img.astype(np.float64) * 255)


def check_sample(ctx, family):
    """`dopsd.py sample --precision bf16` (with the train row's LoRA, if that row wrote one) vs the pipeline in bf16.

    In fp32 the two agree to 1 grey level (test_dopsd.py). In bf16 the random-weight tiny models amplify rounding:
    the pipeline's own bf16 image sits several grey levels from its fp32 image (on CPU: Z-Image 5, klein ~20; klein's
    pipeline also keeps its latents in bf16 between steps, dopsd in fp32). Call that the floor. Two bf16 samplers, each
    within the floor of the fp32 image, are within 2 x floor of each other, so the goal is max(3, 2 x floor) grey
    levels; a wrong schedule, time convention or dtype costs tens."""
    import numpy as np
    from PIL import Image
    model, dev = ctx.models()[family], ctx.device
    lora = ctx.work / f"train_{family}_tiny"
    lora = lora if (lora / "pytorch_lora_weights.safetensors").is_file() else None
    png = ctx.work / f"sample_{family}.png"
    argv = ["sample", "--model", str(model), "--prompt", PROMPT, "--out", str(png), "--height", "64", "--width", "64",
            "--seed", "5", "--precision", "bf16", "--device", str(dev)] + (["--lora", str(lora)] if lora else [])
    code = dopsd.main(argv)
    if code != 0:
        raise MainFailed(f"dopsd.main(sample) returned {code}")
    ours = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    # dopsd's sampler runs under bf16 autocast (pick_precision), so the like-for-like pipeline run does too; the plain
    # bf16 run (what a diffusers user gets) and the fp32 run (the floor's reference) are reported beside it.
    runs = {"autocast": (torch.bfloat16, True), "plain": (torch.bfloat16, False), "fp32": (torch.float32, False)}
    img = {k: pipeline_image(family, model, lora, dev, dt, ac) for k, (dt, ac) in runs.items()}
    diff = lambda a, b: float(np.abs(a - b).max())
    d, floor = diff(ours, img["autocast"]), diff(img["plain"], img["fp32"])
    goal = max(GREY_GOAL, 2 * floor)
    return result(d <= goal, f"{d:.0f} grey levels (bf16 floor {floor:.0f})",
                  f"{'with' if lora else 'without'} LoRA; vs plain bf16 pipeline {diff(ours, img['plain']):.0f}, "
                  f"ours vs fp32 pipeline {diff(ours, img['fp32']):.0f}", diff=d, floor=floor, goal=goal,
                  vs_plain=diff(ours, img["plain"]), vs_fp32=diff(ours, img["fp32"]))


# --------------------------------------------------------------------------------------------------------------------
# 5. two GPUs: the kernel on cuda:1, and a 2-rank nccl run

def check_cuda1(ctx):
    """One step on cuda:1 with the Triton kernel and one with the PyTorch loss: the same loss."""
    need_two_gpus(ctx)
    m, losses, current = ctx.models(), {}, torch.cuda.current_device()
    try:
        for backend in ("triton", "torch"):
            s = run_train(ctx, m["zimage"], m["vlm"], m["data"], ctx.work / f"cuda1_{backend}", TINY_RES, "cuda:1",
                          extra=["--loss-backend", backend])
            losses[backend] = s["loss"]
    finally:
        torch.cuda.set_device(current)                    # pick_device("cuda:1") made cuda:1 this process's current GPU
    rel = abs(losses["triton"] - losses["torch"]) / max(abs(losses["torch"]), 1e-30)
    return result(rel <= CUDA1_RTOL, f"rel. diff {rel:.1e}", f"loss triton {losses['triton']:.6g}, torch "
                  f"{losses['torch']:.6g}", losses=losses)


def check_nccl(ctx):
    """torchrun --nproc_per_node 2 dopsd.py train: both ranks finish and agree on the weights."""
    need_two_gpus(ctx)
    m = ctx.models()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "dopsd.py"), *train_argv(m["zimage"], m["vlm"], m["data"], ctx.work / "nccl", TINY_RES,
                                               ctx.device.type, max_steps=2)]
    # examples/ddp_soak.py's bounded run: past the timeout it kills torchrun and every rank below it (the ranks run in
    # sessions of their own, which a killpg of the launcher's group would miss). The ranks inherit os.environ, with
    # the PYTHONPATH that --wheels set.
    soak = load_example("ddp_soak.py")
    code, out, err, _ = soak.finish(soak.start(cmd), NCCL_TIMEOUT_S)
    print(out[-2000:], err[-2000:])                       # into the row's log
    if code is None:
        raise RuntimeError(f"torchrun did not finish in {NCCL_TIMEOUT_S} s (it and its ranks were killed)")
    synced = "ranks in sync: 2 ranks" in out
    why = "" if code == 0 else (err.strip().splitlines() or [""])[-1][:200]
    return result(code == 0 and synced, f"exit {code}, {'in sync' if synced else 'no sync line'}", why)


PEAK_WRAPPER = """import os, runpy, sys, torch
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:   # this rank's peak, for gpu_check's '2 GPUs: nccl --full' row
    with open(os.environ["DOPSD_PEAK_FILE"] + os.environ["RANK"], "w") as f:
        f.write(str(torch.cuda.max_memory_allocated()))
"""


def check_nccl_full(ctx):
    """torchrun --nproc_per_node 2 dopsd.py train --full on the mid-size Z-Image DiT (FSDP2): both ranks finish, and
    each rank's peak of allocated memory against memory_plan's plan for --full over 2 GPUs."""
    need_two_gpus(ctx)
    (model, data), m = ctx.mid("zimage"), ctx.models()
    wrapper, peaks = ctx.work / "peak_wrapper.py", ctx.work / "nccl_full_peak"
    wrapper.write_text(PEAK_WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           str(ROOT / "dopsd.py"), *train_argv(model, m["vlm"], data, ctx.work / "nccl_full", ctx.mid_res,
                                               ctx.device.type, max_steps=2, extra=["--full"])]
    soak = load_example("ddp_soak.py")
    os.environ["DOPSD_PEAK_FILE"] = str(peaks)
    code, out, err, _ = soak.finish(soak.start(cmd), NCCL_TIMEOUT_S)
    print(out[-2000:], err[-2000:])
    if code is None:
        raise RuntimeError(f"torchrun did not finish in {NCCL_TIMEOUT_S} s (it and its ranks were killed)")
    plan = load_example("memory_plan.py").memory_plan(
        str(model), str(m["vlm"]), method="dopsd", full=True, resolution=ctx.mid_res, batch_size=1,
        n_images=N_IMAGES, rollout_steps=2, grad_checkpointing=True, world_size=2)
    planned = max(plan["peak_training"], plan["peak_caching"])
    measured = [int(Path(f"{peaks}{r}").read_text()) for r in range(2) if Path(f"{peaks}{r}").is_file()]
    ratio = max(measured, default=0) / planned
    sharded = "sharded: FSDP2 over 2 ranks" in out
    ok = code == 0 and sharded and len(measured) == 2 and MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1]
    why = "" if code == 0 else (err.strip().splitlines() or [""])[-1][:200]
    return result(ok, f"exit {code}, peak / plan {ratio:.2f} ({max(measured, default=0) / 2**30:.2f} / "
                  f"{planned / 2**30:.2f} GiB)", why or ("" if sharded else "no 'sharded: FSDP2' line"),
                  measured=measured, plan=planned)


# --------------------------------------------------------------------------------------------------------------------
# the libraries, the list of rows, CLI

def check_libraries(ctx):
    """diffusers / transformers / peft at requirements.txt's pins (a GPU image's own versions test another set)."""
    import diffusers, peft, transformers
    pins = dict(l.strip().split("==") for l in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in l and not l.lstrip().startswith("#"))
    have = {m.__name__: m.__version__ for m in (diffusers, transformers, peft)}
    off = [f"{k} {have[k]} (pinned {pins[k]})" for k in PINNED if k in pins and have[k] != pins[k]]
    return result(not off, "as pinned" if not off else f"{len(off)} off the pins", "; ".join(off) or
                  ", ".join(f"{k} {v}" for k, v in have.items()) + "; --wheels DIR brings the pinned ones", **have)


def checks(ctx):
    """(name, goal, function) of every row, in the order they run: cheap first, the 2-GPU runs last."""
    tol = lambda d: f"<= {LOSS_TOL[d]:g} x max|ref|: loss, grad" if d != "float64" else \
        f"grad <= {LOSS_TOL[d]:g}; fp32 loss {LOSS_TOL_LOSS64:g}"
    band = f"{MEMORY_BAND[0]}..{MEMORY_BAND[1]} x memory_plan's peak"
    rows = [("libraries", "diffusers, transformers, peft as pinned", lambda: check_libraries(ctx)),
            ("loss fp32 (triton)", tol("float32"), lambda: check_loss(ctx, torch.float32)),
            ("loss bf16 (triton)", tol("bfloat16"), lambda: check_loss(ctx, torch.bfloat16)),
            ("loss float64 (auto)", tol("float64"), lambda: check_loss(ctx, torch.float64)),
            ("kernel GB/s fp32", f">= {BANDWIDTH_GOAL:.0%} of a device copy's GB/s",
             lambda: check_bandwidth(ctx, torch.float32)),
            ("kernel GB/s bf16", f">= {BANDWIDTH_GOAL:.0%} of a device copy's GB/s",
             lambda: check_bandwidth(ctx, torch.bfloat16)),
            ("loss auto backend", "triton, probe ok" if ctx.device.type == "cuda" else "torch on CPU",
             lambda: check_auto(ctx))]
    for f in ("zimage", "klein"):
        rows.append((f"train {f} tiny", TRAIN_GOAL, lambda f=f: check_train_tiny(ctx, f)))
    for f in ("zimage", "klein"):
        rows.append((f"train {f} mid", TRAIN_GOAL, lambda f=f: check_train_mid(ctx, f)))
        rows.append((f"memory {f} mid", band, lambda f=f: check_memory(ctx, f)))
        rows.append((f"fp8 base {f} mid", f"{TRAIN_GOAL}; base float8; {band} (fp8 plan)",
                     lambda f=f: check_fp8(ctx, f)))
    for f in ("zimage", "klein"):
        rows.append((f"sample {f}", f"<= max({GREY_GOAL}, 2 x floor) grey levels", lambda f=f: check_sample(ctx, f)))
    rows += [("2 GPUs: cuda:1", f"loss triton = torch (rel. {CUDA1_RTOL:g})", lambda: check_cuda1(ctx)),
             ("2 GPUs: nccl", 'exit 0, "ranks in sync: 2 ranks"', lambda: check_nccl(ctx)),
             ("2 GPUs: nccl --full", f"exit 0; per-rank peak {band} (2 GPUs)", lambda: check_nccl_full(ctx))]
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON report here (rewritten after every row)")
    p.add_argument("--cpu", action="store_true", help="CPU mode: the kernel under the Triton interpreter, CUDA-only "
                   "rows SKIP (~15 s on 2 cores)")
    p.add_argument("--quick", action="store_true", help="CUDA: smaller kernel tensors and mid-size DiT (~1 min)")
    p.add_argument("--wheels", metavar="DIR", help="pip-install DIR/*.whl (no index, no deps; never torch/triton) "
                   "into a temp dir and import diffusers/transformers/peft from there")
    p.add_argument("--keep", metavar="DIR", help="build models and runs in DIR and keep them (default: a temp dir)")
    p.add_argument("--verbose", action="store_true", help="show dopsd's output instead of capturing it")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    wheels = install_wheels(args.wheels) if args.wheels else None   # before anything imports transformers
    device = import_stack(args.cpu)
    args.cpu = device.type == "cpu"
    report = Report(args, {**machine(device), "wheels": wheels})
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ctx = Ctx(args, device, work)
        for name, goal, fn in checks(ctx):
            report.check(name, goal, fn)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        if wheels:
            shutil.rmtree(wheels["target"], ignore_errors=True)
    report.write()
    print(report.table())
    return 1 if any(r["status"] == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
