"""
dopsd.py -- D-OPSD in one file: teach a few-step ("turbo") text-to-image model a new subject or style from a handful
of image-text pairs, without losing its few-step sampling.

D-OPSD (On-Policy Self-Distillation, Jiang et al. 2026, https://arxiv.org/abs/2605.05204) uses one DiT in two roles:
  * the STUDENT sees the caption only (the model's own text features) and rolls out its own few-step Euler trajectory
    from noise -- on-policy, exactly the states it will visit at inference;
  * the TEACHER is the same DiT with a second LoRA adapter (an EMA of the student's), conditioned on the caption AND the
    target image (Z-Image-Turbo: a Qwen3-VL whose language model carries Z-Image's own text-encoder weights;
    FLUX.2-klein 4B/9B: the target's VAE latents as reference tokens in the DiT, plus an instruction).
At every state the student visits, the teacher predicts under no_grad and the student is regressed onto it. There is no
ground-truth denoising target and no reward model; inference is the unchanged few-step pipeline.

References: 1) the paper (project page https://vvvvvjdy.github.io/d-opsd/); 2) diffusers' ZImagePipeline
(Tongyi-MAI/Z-Image-Turbo) and Flux2KleinPipeline (black-forest-labs/FLUX.2-klein-4B / -9B, distilled only); 3) peft
for LoRA, transformers for Qwen3-VL: we call the libraries rather than re-implement them.

Glossary (code name -> paper symbol)
  sigma (σ)        noise level, 1 = pure noise, 0 = clean.  x_σ = (1-σ)·x0 + σ·ε
  u                velocity in the scheduler's convention, u = ε - x0 = dx/dσ (Z-Image's raw output is -u; we negate it)
  u_s, u_t         student / teacher velocity  (paper: v_θ(x_t, t, f(p)) and v_φ(x_t, t, f_mm(p, I)))
  cond_s, cond_t   student conditioning f(p) / teacher conditioning f_mm(p, I), one entry per training image
  K, μ             roll-out steps (--rollout-steps); EMA decay (--ema-decay), φ <- μ·φ + (1-μ)·θ after every step
Shape letters: B batch, C latent channels, h×w latent grid (Z-Image H/8×W/8 with C=16; klein H/16×W/16, 2×2-patchified,
4C=128), H×W pixels, L text tokens, D text width.

Run as:
  python examples/make_tiny.py --out tiny                                   # tiny random models, offline, seconds
  python dopsd.py train --data tiny/data --model tiny/zimage --vlm tiny/vlm --out runs/demo \\
      --resolution 64 --max-steps 20 --rank 4                              # CPU demo, ~1 min
  python dopsd.py train --data ./imgs --out runs/mystyle                   # the real job: Z-Image-Turbo, one GPU
  python dopsd.py train --data ./imgs --model black-forest-labs/FLUX.2-klein-4B --out runs/klein
  torchrun --nproc_per_node 4 dopsd.py train --data ./imgs --out runs/mystyle         # several GPUs (DDP)
  python dopsd.py sample --lora runs/mystyle --prompt "a cat in [V] style" --out cat.png   # deploy settings
  python -m pytest -q                                                       # tests, offline, CPU
"""

import argparse, contextlib, copy, gc, hashlib, io, json, math, os, re, shutil, signal, sys, threading, time, traceback, warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch

try:  # triton is optional: without it the file imports and the loss runs on the PyTorch path
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# --------------------------------------------------------------------------------------------------------------------
# config
# One dataclass per command holds every knob with its --help text: build_parser() turns each field into a flag
# (rank -> --rank) and appends its default; config.json records a training run's.

def knob(default, help, **argparse_kw):
    """A config field that carries its own --help text (and any other add_argument keyword)."""
    return field(default=default, metadata={"help": help, **argparse_kw})

@dataclass
class TrainConfig:
    data: list = knob(None, "folder of images with same-name .txt captions or a metadata.jsonl (README: Your data); "
                      "repeat it for more folders; FOLDER:N: each image N times", required=True, action="append")
    cache_dir: str = knob(None, "folder of the encoders' outputs, reused by every run and rank on the same data and "
                          "model (default: .dopsd_cache in the first --data folder, so that it travels with the data)")
    out: str = knob("runs/dopsd", "output folder: LoRA, checkpoint, log, sample grids")
    model: str = knob("Tongyi-MAI/Z-Image-Turbo", "diffusers pipeline, hub id or local folder")
    vlm: str = knob("Qwen/Qwen3-VL-4B-Instruct", "Z-Image teacher's Qwen3-VL, hub id or local folder")
    method: str = knob("dopsd", "dopsd, or sft: plain flow matching on the same data and outputs", choices=["dopsd", "sft"])
    caption: str = knob(None, "caption for images without one")
    trigger: str = knob(None, "word that replaces [V] in captions (default: keep [V] literally)")
    resolution: int = knob(1024, "bucket size in pixels, multiple of 16")
    rollout_steps: int = knob(4, "K, student Euler steps per roll-out (4: σ = 1, .9, .75, .5 -> 0)")
    loss_steps: int = knob(None, "M: a loss at M of the K roll-out states only, drawn anew each micro-batch and "
                           "weighted K/M (unbiased); the others cost one student forward (default: M = K)", type=int)
    loss_space: str = knob("x0", "x0: σ²-weighted velocity MSE (released code); v: velocity MSE (paper)",
                           choices=["x0", "v"])
    ema_decay: float = knob(0.9999, "teacher EMA decay μ per step; 1.0 keeps the teacher at the base model")
    teacher_suffix: str = knob(None, "klein: instruction appended to the teacher's caption (default: keep the "
                               "reference's subject, details, background and composition)")
    rank: int = knob(64, "LoRA rank")
    alpha: float = knob(128.0, "LoRA alpha, scale = alpha/rank")
    init_lora: str = knob(None, "start student and teacher from this LoRA (a --out folder, or a diffusers/ComfyUI LoRA "
                          "of this model, rank <= --rank); --preserve-prompts then pulls onto base + it")
    teacher_start: str = knob("auto", "with --init-lora, where the EMA teacher starts: init (that LoRA, as the "
                              "student), base (the bare base: its in-context copy undamaged by the first concept), "
                              "or auto: whichever the teacher check finds copying this data better (the toy: base)",
                              choices=["init", "base", "auto"])
    check_images: int = knob(4, "images the teacher check measures before step 1 (will D-OPSD teach this data?); 0 = "
                             "skip it")
    full: bool = knob(False, "train every DiT weight instead of a LoRA, an fp32 EMA copy as teacher (memory: "
                      "examples/memory_plan.py)")
    lr: float = knob(None, "AdamW learning rate, constant (default: the authors', Z-Image 1e-4, klein 2e-5)", type=float)
    max_steps: int = knob(2000, "optimizer steps")
    batch_size: int = knob(1, "images per micro-batch and rank, one aspect bucket")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    seed: int = knob(0, "seed of data order, noise, LoRA init and grids")
    device: str = knob("auto", "auto (cuda -> mps -> cpu), or e.g. cpu, cuda:1")
    precision: str = knob("auto", "auto = bf16 weights + autocast (fp32 LoRA) on cuda/mps, fp32 on CPU",
                          choices=["auto", "fp32", "bf16"])
    fp8_base: str = knob("auto", "store the frozen DiT in float8 (half its memory; LoRA, AdamW stay fp32; checkpoints "
                         "activations); auto = on with CUDA when the base would not fit", choices=["auto", "on", "off"])
    grad_checkpointing: str = knob("auto", "recompute activations in backward: auto = on for cuda/mps, off on CPU",
                                   choices=["auto", "on", "off"])
    dist_timeout: float = knob(60.0, "torchrun: minutes a rank waits for the others (a dead rank, a long --full save)")
    sample_every: int = knob(250, "steps between sample grids; 0 = only at the end")
    sample_prompt: list = knob(None, "a prompt not in the training data, drawn as an extra grid column to show whether "
                               "the concept generalises (repeat the flag for more)", action="append")
    sample_prompts: str = knob(None, "a file of such prompts, one a line")
    save_every: int = knob(500, "steps between checkpoints; 0 = only at the end")
    preserve_prompts: str = knob(None, "file of prompts without the concept: a second roll-out on them pulls the "
                                 "student onto the base (or base + --init-lora), so the concept does not bleed there")
    preserve_weight: float = knob(1.0, "weight of the --preserve-prompts roll-out's loss")
    resume: bool = knob(False, "continue from --out's checkpoint (checkpoint.pt; checkpoint/ for --full)")
    loss_backend: str = knob("auto", "fused loss: auto = Triton on CUDA if it launches, else PyTorch",
                             choices=["auto", "triton", "torch"])

@dataclass
class SampleConfig:
    model: str = knob(TrainConfig.model, "diffusers pipeline, hub id or local folder")
    lora: str = knob(None, "a train --out folder, or its pytorch_lora_weights.safetensors")
    lora_scale: float = knob(1.0, "LoRA strength, 1.0 = as trained")
    compare: bool = knob(False, "a grid with the base model above the LoRA, on the same noise")
    prompt: list = knob(None, "text prompt ([V] as in training, or your --trigger word); repeat it for a grid, one "
                        "column a prompt, each with noise seed + column", required=True, action="append")
    out: str = knob("sample.png", "PNG to write")
    steps: int = knob(None, "sampling steps (default: the family's deploy count: Z-Image-Turbo 8, klein 4)", type=int)
    seed: int = knob(0, "noise seed")
    height: int = knob(1024, "pixels, multiple of 16")
    width: int = knob(1024, "pixels, multiple of 16")
    device: str = knob("auto", "auto (cuda -> mps -> cpu), or e.g. cpu")
    precision: str = knob("auto", "auto = bf16 on cuda/mps, fp32 on CPU", choices=["auto", "fp32", "bf16"])
    fp8_base: str = knob("auto", "store the DiT in 8 bits (float8 e4m3, upcast layer by layer): about half its memory "
                         "for a small change in the image; auto = on with CUDA only when it would not fit otherwise",
                         choices=["auto", "on", "off"])

@dataclass
class CheckConfig:
    data: list = knob(None, "the training data, as for train (FOLDER or FOLDER:N, repeatable)", required=True,
                      action="append")
    cache_dir: str = knob(None, "the feature cache, as for train (it is used and filled)")
    out: str = knob("runs/check", "output folder: check.json and check.png")
    model: str = knob(TrainConfig.model, "diffusers pipeline, hub id or local folder")
    vlm: str = knob(TrainConfig.vlm, "Z-Image teacher's Qwen3-VL, hub id or local folder")
    caption: str = knob(None, "caption for images without one")
    trigger: str = knob(None, "word that replaces [V] in captions")
    resolution: int = knob(1024, "bucket size in pixels, multiple of 16")
    init_lora: str = knob(None, "check the run that continues from this LoRA (start = base + it); the bare base's "
                          "teacher is measured too")
    teacher_suffix: str = knob(None, "klein: the teacher's instruction, as for train")
    check_images: int = knob(None, "images to check, drawn by --seed (default: all)", type=int)
    seed: int = knob(0, "seed of the drawn images and of each image's noise")
    device: str = knob("auto", "auto (cuda -> mps -> cpu), or e.g. cpu")
    precision: str = knob("auto", "auto = bf16 on cuda/mps, fp32 on CPU", choices=["auto", "fp32", "bf16"])

# --------------------------------------------------------------------------------------------------------------------
# the method
# D-OPSD without any model family, readable and copyable on its own: the loss (its maths, a reference, the public
# dopsd_loss), the on-policy roll-out that scores the student's own states with the teacher, the teacher's EMA, and
# the SFT baseline. A velocity here is any callable (x [B, ...], sigma [B]) -> u [B, ...]; the families come later.
#
# Per roll-out step k, u_s = v_θ(x_k, t_k, f(p)), u_t = sg[v_φ(x_k, t_k, f_mm(p, I))], σ_b the noise level of sample b,
# N = numel (any trailing shape). The sign convention of v does not matter (the roll-out passes u = ε − x0):
#
#     L = (1/N) Σ_{b,i} w(σ_b) · (u_s[b,i] − u_t[b,i])²            (one mean over all N elements, no per-sample mean)
#     w = σ²   for space="x0": both families predict x̂0 = x ± σ·v (Z-Image +, FLUX −), so x̂0_S − x̂0_T = ±σ(u_s − u_t)
#              and the released code's x0-space MSE is exactly the σ²-weighted velocity MSE (the authors, D-OPSD#6).
#     w = 1    for space="v": the paper's velocity MSE.
#     ∂L/∂u_s = 2 · w · (u_s − u_t) / N          ∂L/∂u_t = 0 (stop-gradient)       ∂L/∂σ = 0 (σ is the schedule)
#
# dopsd_loss computes exactly this, through a fused path (section "fused loss", after the families) that saves memory
# traffic; divergence_loss_reference is the same loss line for line, the yardstick of the tests.

def divergence_loss_reference(u_s, u_t, sigma, space="x0"):
    """The loss line for line from the math, eager, in the inputs' dtype (the tests feed float64). NaN for numel 0."""
    assert space in ("x0", "v"), f"space must be 'x0' or 'v', got {space!r}"
    w = sigma**2 if space == "x0" else torch.ones_like(sigma)       # (B,)  w(σ_b)
    w = w.view(u_s.shape[0], *([1] * (u_s.dim() - 1)))  # (B, 1, ..., 1) broadcasts over C, H, W
    d = u_s - u_t.detach()                              # (B, ...)  sg on the teacher
    return (w * d**2).mean()                                        # ()  one mean over all N elements

def dopsd_loss(u_s, u_t, sigma, space="x0", backend="auto"):
    """D-OPSD per-step loss L = mean_{b,i} w(σ_b)·(u_s − u_t)², w = σ² ("x0") or 1 ("v"), teacher stop-gradient.
    u_s: (B, ...) float, any strides; u_t: the same shape; sigma: (B,); all on one device. backend: "auto",
    "triton" or "torch". Returns a 0-D fp32 tensor (0 for numel 0). A ValueError names any argument the fused paths
    would misread."""
    shape = lambda t: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
    if space not in ("x0", "v"):
        raise ValueError(f"dopsd_loss: space must be 'x0' (w = σ²) or 'v' (w = 1), got {space!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"dopsd_loss: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not (torch.is_tensor(u_s) and u_s.dim() and shape(u_t) == shape(u_s) and u_s.is_floating_point()
            and u_t.is_floating_point()):
        raise ValueError(f"dopsd_loss: velocities must be float tensors of one shape (B, ...), got u_s {shape(u_s)} "
                         f"and u_t {shape(u_t)}")
    if shape(sigma) != (len(u_s),):
        raise ValueError(f"dopsd_loss: sigma must be a tensor of shape (B,) = ({len(u_s)},), got {shape(sigma)}")
    for name, t in (("u_t", u_t), ("sigma", sigma)):
        if t.device != u_s.device:
            raise ValueError(f"dopsd_loss: {name} is on {t.device} but u_s is on {u_s.device}")
    sigma = sigma.detach().float()                                  # (B,) the schedule never gets a gradient
    w = (sigma * sigma if space == "x0" else torch.ones_like(sigma)).contiguous()     # (B,) fp32 w(σ_b)
    path = _resolve_loss_backend(backend, u_s.device, u_s.dtype)
    return DivergenceLoss.apply(u_s, u_t.detach(), w, path)   # sg: the teacher is only a target

# K student Euler steps from noise; at each visited (detached) state the teacher scores it and the student is pulled
# onto the teacher's prediction. Because the state is detached, loss_k depends on θ only through the k-th student
# forward, so a backward per step gives exactly the gradient of the mean -- with one step's activations in memory.

def dopsd_rollout(student, teacher, noise, sigmas, space="x0", grad_scale=1.0, stepwise=True, backend="auto",
                  trained=None):
    """One on-policy roll-out; accumulates grad_scale · ∇(mean_k loss_k) into the student's .grad.
    student, teacher: callables (x [B, ...], sigma [B]) -> u [B, ...]; the teacher is called under no_grad.
    noise: [B, ...] start state at σ = sigmas[0]; sigmas: [K+1] schedule ending at 0.
    stepwise=False keeps all K graphs and runs one backward (the public recipe's memory behaviour; for tests/bench).
    trained: the M steps that get a loss (default all K), each weighted K/M, so the gradient is an unbiased estimate
    of the full one; at the others the student only moves on (a no_grad forward) and the teacher is not called.
    Returns (mean loss over the trained steps, detached, fp32 scalar; the final state x at σ = 0)."""
    K, B = len(sigmas) - 1, noise.shape[0]
    trained = range(K) if trained is None else trained
    sigmas = sigmas.to(noise.device)                               # once, not a host->device copy per step
    x, total, graph = noise, noise.new_zeros((), dtype=torch.float32), 0.0
    for k in range(K):
        x = x.detach()                                             # no gradient through earlier steps (no BPTT)
        s, dt = sigmas[k].expand(B), sigmas[k + 1] - sigmas[k]     # [B] noise level; () Euler step Δσ < 0
        if k in trained:
            with torch.no_grad():
                u_t = teacher(x, s)                                # the teacher on the STUDENT's state
            u_s = student(x, s)                                    # with grad
            loss = dopsd_loss(u_s, u_t, s, space, backend)         # loss_k
            if stepwise:
                (loss * (grad_scale / len(trained))).backward()    # (K/M)·(1/K); frees this step's activations now
            else:
                graph = graph + loss
            total += loss.detach()
        else:                                                      # no loss here: the student only moves on
            with torch.no_grad():
                u_s = student(x, s)
        x = x + dt * u_s.detach().to(x.dtype)                      # the student's own Euler step: on-policy
    if not stepwise:
        (graph * (grad_scale / len(trained))).backward()
    return total / len(trained), x.detach()

@torch.no_grad()
def ema_update(teacher_params, student_params, decay):
    """φ <- μ·φ + (1-μ)·θ over matching parameter lists (decay = μ). μ = 1 keeps the teacher at its start."""
    if decay >= 1.0:
        return
    for t, s in zip(teacher_params, student_params):
        t.lerp_(s.to(t.dtype), 1.0 - decay)

def sft_loss(student, x0, noise, sigma, backend="auto"):
    """Plain flow matching (the SFT baseline): the ground-truth velocity ε - x0 at a random σ. x0, noise: [B, ...]."""
    s = sigma.view(-1, *[1] * (x0.dim() - 1))
    x = (1 - s) * x0 + s * noise                                   # x_σ, the interpolation path
    return dopsd_loss(student(x, sigma), noise - x0, sigma, space="v", backend=backend)

# --------------------------------------------------------------------------------------------------------------------
# errors and argument checks
# The checks that need no model (an output path, a device name) run before anything loads.

class UserError(Exception):
    """A mistake the user can fix. main() prints it as one line and exits with `code`, without a traceback."""
    code = 2                                         # 2: the command line or its files were wrong, nothing ran

class WriteFailed(UserError):
    """A file could not be written mid-run (disk full, permissions). Exit code 1, not 2: the arguments were right and
    the run did work -- 2 would say "fix the command and run it again", while the fix here is space, then --resume.
    The message names what is intact."""
    code = 1

def refuse(checks):
    """Raise a UserError with the message of the first (bad, message) pair that is bad. Every message is built
    before any check runs, so it may only use values that exist when nothing is wrong. (examples/ call it; dopsd.py
    itself writes plain `if ...: raise UserError(...)`.)"""
    for bad, message in checks:
        if bad:
            raise UserError(message)

def read_text_file(path, what):
    """A text file's contents; one that is not UTF-8 (a UTF-16 'Unicode' export, a Latin-1 'é') is one UserError
    naming it, the first bad byte and the fix."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save "
                        "it as UTF-8") from None

def check_out_path(path, flag, folder):
    """Refuse an output path that cannot be made -- a file where a folder goes or the reverse, a path under a file, a
    folder we may not write -- before anything loads, not when the first save fails after the work is done."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: is a file, not a folder; pass a new folder name (it is created)")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; pass a file name, e.g. {p / 'sample.png'}")
    start = p if folder else p.parent
    base = next(a for a in (start, *start.parents) if a.exists())          # the nearest part of the path that exists
    if not base.is_dir():
        raise UserError(f"{flag} {p}: {base} is a file, so nothing can be created under it; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: {base} is not writable; choose another path")

def check_device(name):
    """Refuse a --device that torch cannot parse or this machine lacks, before anything loads (not at a .to())."""
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; pass auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: dopsd.py runs on cpu, cuda or mps; pass one of those, or auto")
    n = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and (dev.index or 0) >= n:
        raise UserError(f"--device {name}: " + (f"only {n} CUDA device(s) are visible, cuda:0 to cuda:{n - 1}" if n
                        else "no CUDA device is visible; pass --device auto or cpu"))
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple MPS is not available here; pass --device auto or cpu")

# --------------------------------------------------------------------------------------------------------------------
# data
# A folder of images with captions -> a checked list of (path, caption), before any model is loaded: a typo costs
# seconds, not a 20 GB load. Images are cropped into aspect-ratio buckets; one bucket per batch.

IMAGE_EXTS, MIN_SIDE = (".png", ".jpg", ".jpeg", ".webp", ".bmp"), 64

def _names(paths, limit=20):
    names = [Path(p).name for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

class Item(NamedTuple):
    """One training image: its caption variants ([V] replaced; one is drawn per step), its (height, width) after EXIF
    rotation, the sha256 of its bytes (the cache key's image part) and how often an epoch repeats it."""
    path: Path
    captions: tuple
    size: tuple
    digest: str
    repeat: int = 1

def parse_data_flag(spec):
    """'FOLDER' or 'FOLDER:N' -> (folder, N): each image of FOLDER counts N times per epoch."""
    head, _, n = spec.rpartition(":")
    if not head or Path(spec).is_dir():              # (a folder really named 'x:3' is taken as it is)
        return spec, 1
    if n.isdecimal() and int(n) >= 1:
        return head, int(n)
    if n.isdecimal() or Path(head).is_dir():         # else 'no:such:folder' is a folder the scan will not find
        raise UserError(f"--data {spec}: the repeat count after ':' must be a whole number of at least 1 (got '{n}')")
    return spec, 1

def scan_data(specs, caption=None, trigger=None, memo=None):
    """Every --data folder with its repeat count -> [Item], checked as scan_dataset checks one folder."""
    return [it._replace(repeat=repeat) for folder, repeat in map(parse_data_flag, specs)
            for it in scan_dataset(folder, caption, trigger, memo)]

def image_facts(path, memo):
    """(digest, (height, width)) of an image, decoded in full once (a truncated file fails here, not mid-training).
    memo: {path: [bytes, mtime_ns, ctime_ns, digest, height, width]} of images already decoded, updated in place;
    an unchanged file is not read again, so a launch on 20,000 cached images costs 20,000 stats, not 20,000 decodes."""
    from PIL import Image
    st, key = path.stat(), str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]   # ctime: `cp -p` and rsync keep mtime, not ctime
    known = memo.get(key) if memo is not None else None
    if known and known[:3] == stamp:
        return known[3], tuple(known[4:6])
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        swap = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)           # EXIF orientations that turn the image 90°
        size = (im.width, im.height) if swap else (im.height, im.width)
        im.load()
    digest = hashlib.sha256(data).hexdigest()
    if memo is not None:
        memo[key] = [*stamp, digest, *size]
    return digest, size

def read_captions(path, meta):
    """Caption variants of one image: metadata.jsonl's text (a string or a list of strings), else the .txt file."""
    cap, txt = meta.get(path.name), path.with_suffix(".txt")
    if cap is None and txt.is_file():
        cap = txt.read_text(encoding="utf-8")
    return [c.strip() for c in ([cap] if isinstance(cap, str) else cap or []) if c.strip()]

def scan_dataset(data_dir, caption=None, trigger=None, memo=None):
    """[Item] for every image in data_dir; raise one UserError naming every bad file and its fix. memo: see
    image_facts."""
    from PIL import Image
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data {root}: {'is a file, not a folder' if root.exists() else 'folder not found'}; pass a "
                        "folder of images with same-name .txt captions")
    meta, problems = read_metadata(root / "metadata.jsonl")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise UserError(f"--data {root}: no images ({' '.join(IMAGE_EXTS)}) found; put your training images there")
    fix = {"unreadable": "unreadable or corrupt image(s) ({names}): re-export or remove them",     # in message order
           "large": "image(s) larger than PIL's limit of {limit:,} pixels ({which}) ({names}): downscale them",
           "small": "image(s) smaller than {side} px on a side ({names}): use larger images",
           "uncaptioned": "image(s) without a caption ({names}): add a same-name .txt file or pass --caption",
           "not_utf8": "caption file(s) not UTF-8 text ({names}): save each as UTF-8"}
    bad, items, limit = {kind: [] for kind in fix}, [], 0
    for p in files:
        try:
            digest, size = image_facts(p, memo)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:   # (the warning: if made an error)
            bad["large"].append(p)
            limit = max(limit, Image.MAX_IMAGE_PIXELS * (2 if isinstance(e, Image.DecompressionBombError) else 1))
            continue
        except Exception:
            bad["unreadable"].append(p)
            continue
        if min(size) < MIN_SIDE:
            bad["small"].append(p)
            continue
        try:
            caps = read_captions(p, meta) or ([caption] if caption else [])
        except UnicodeDecodeError:
            bad["not_utf8"].append(p.with_suffix(".txt"))
            continue
        if caps:
            items.append(Item(p, tuple(c.replace("[V]", trigger) if trigger else c for c in caps), size, digest))
        else:
            bad["uncaptioned"].append(p)
    which = ("2 × " if limit > (Image.MAX_IMAGE_PIXELS or limit) else "") + "Image.MAX_IMAGE_PIXELS"
    problems += [f"{len(ps)} " + fix[k].format(names=_names(ps), side=MIN_SIDE, limit=limit, which=which)
                 for k, ps in bad.items() if ps]
    if problems:
        raise UserError(f"--data {root}: " + "; ".join(problems))
    warn_shared_captions(root, files, meta)
    return items

def read_metadata(jsonl):
    """({image file name: caption or list of captions}, [problems]) from a folder's metadata.jsonl, if it has one."""
    meta, problems = {}, []
    for n, line in enumerate(read_text_file(jsonl, "--data").splitlines() if jsonl.is_file() else [], 1):
        try:  # HF imagefolder rows {"file_name", "text"}; musubi-style {"image_path", "caption"} is tolerated too
            if line.strip():
                row = json.loads(line)
                text = row.get("text", row.get("caption"))
                if not (text is None or isinstance(text, str) or (isinstance(text, list) and all(
                        isinstance(t, str) for t in text))):
                    raise TypeError("text is neither a string nor a list of strings")
                meta[Path(row.get("file_name") or row["image_path"]).name] = text
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{jsonl} line {n} is not a JSON object with file_name and text: fix or remove it")
    return meta, problems

def warn_shared_captions(root, files, meta):
    """One warning naming images that share one .txt caption (k0.png and k0.jpg both read k0.txt): likely a mistake,
    but not fatal."""
    readers = {}                                                   # .txt file -> the images that read it
    for p in files:
        if p.name not in meta and p.with_suffix(".txt").is_file():
            readers.setdefault(p.with_suffix(".txt"), []).append(p)
    shared = [f"{_names(ps)} share the caption {txt.name}" for txt, ps in readers.items() if len(ps) > 1]
    if shared:
        print(f"warning: --data {root}: " + "; ".join(shared[:10]) + (f" and {len(shared) - 10} more" if
              len(shared) > 10 else "") + ": rename one of each, or give each its own caption, if they differ")

def make_buckets(resolution, multiple=16, ratios=(1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5)):
    """Bucket sizes (H, W) of about resolution² pixels, sides multiples of 16 (VAE's 8× times DiT's 2×2 patch)."""
    side = lambda x: max(multiple, round(x / multiple) * multiple)
    return sorted({(side(resolution / math.sqrt(r)), side(resolution * math.sqrt(r))) for r in ratios})   # r = W/H

def nearest_bucket(height, width, buckets):
    """The bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are equally far from 1:1)."""
    return min(buckets, key=lambda b: abs(math.log(width / height) - math.log(b[1] / b[0])))

def load_rgb(path):
    """Open any image mode (RGBA, LA, P, L, CMYK, 16-bit, EXIF-rotated) as 8-bit RGB; transparency becomes white."""
    from PIL import Image, ImageOps
    im = ImageOps.exif_transpose(Image.open(path))
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):                 # 16/32-bit grey: scale, don't clip at 255
        import numpy as np
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else max(a.max(), 1.0)
        im = Image.fromarray((a / top * 255).round().clip(0, 255).astype("uint8"), "L")
    if im.mode not in ("RGBA", "LA", "P"):                              # (palette images may carry transparency)
        return im.convert("RGB")
    rgba, white = im.convert("RGBA"), Image.new("RGB", im.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white

def crop_to(im, height, width):
    """Resize to cover (height, width), then centre-crop: no padding, no distortion."""
    from PIL import Image
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.Resampling.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))

def pil_to_tensor(im):
    """PIL RGB -> [3, H, W] float in [-1, 1], the range the VAE expects."""
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0

def batch_for_step(bucket_of, batch_size, seed, index):
    """Indices of micro-batch number `index`: each epoch shuffles within buckets, chunks, and shuffles the chunks.
    Every batch is full (a bucket's last chunk wraps around), so several GPUs each get an equal slice. A pure function
    of (seed, index): a resumed run sees the batches an uninterrupted one would, with no RNG state to store."""
    groups = {}
    for i, b in enumerate(bucket_of):
        groups.setdefault(b, []).append(i)
    epoch, pos = divmod(index, sum(math.ceil(len(g) / batch_size) for g in groups.values()))
    g, chunks = torch.Generator().manual_seed(seed * 1_000_003 + epoch), []
    for key in sorted(groups):
        idx = [groups[key][j] for j in torch.randperm(len(groups[key]), generator=g).tolist()]
        idx = (idx * batch_size)[: math.ceil(len(idx) / batch_size) * batch_size]        # wrap to full chunks
        chunks += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    return chunks[torch.randperm(len(chunks), generator=g)[pos].item()]

# --------------------------------------------------------------------------------------------------------------------
# device & models
# The device is picked once and printed with the reason. The pipeline comes from diffusers' from_pretrained (hub id or
# local folder alike); the teacher's VLM from transformers, with its language model swapped for the text encoder.

SUPPORTED_PIPELINES = {"ZImagePipeline": "zimage", "Flux2KleinPipeline": "klein"}

def pick_device(name="auto"):
    """The torch.device to run on, printed with the reason. An explicit cuda:N also becomes the *current* device:
    Triton launches on the current device, not the tensors' (triton/runtime/jit.py)."""
    if name != "auto":
        dev, why = torch.device(name), "--device"
    elif torch.cuda.is_available():
        dev, why = torch.device("cuda"), f"CUDA found ({torch.cuda.get_device_name()})"
    elif torch.backends.mps.is_available():
        dev, why = torch.device("mps"), "Apple MPS found, no CUDA"
    else:
        dev, why = torch.device("cpu"), "no CUDA or MPS found"
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    print(f"device: {dev} ({why})")
    return dev

def pick_precision(device, precision="auto", checkpointing="auto"):
    """(weight dtype, autocast context factory, checkpointing?), printed with the reason (checkpointing=None: not
    training). auto: bf16 weights + bf16 autocast + checkpointing on cuda/mps, the only way a 6B DiT and its roll-out
    fit; fp32 without checkpointing on CPU, where bf16 is slow. The tests run CPU bf16 to stand in for CUDA."""
    accel = device.type != "cpu"
    bf16 = precision == "bf16" or (precision == "auto" and accel)
    ckpt = checkpointing == "on" or (checkpointing == "auto" and accel)
    why = lambda flag, v: f"--{flag}" if v != "auto" else f"{'accelerator' if accel else 'CPU'} default"
    print(f"precision: {'bf16 weights + bf16 autocast' if bf16 else 'fp32'} ({why('precision', precision)})"
          + (f"; gradient checkpointing {'on' if ckpt else 'off'} ({why('grad-checkpointing', checkpointing)})"
             if checkpointing else ""))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return (torch.bfloat16 if bf16 else torch.float32), autocast, ckpt

def pick_fp8_base(choice, device, transformer, target_regex=None, rank=0, slack=3 * 2**30):
    """True to store the frozen DiT in float8, printed with the reason. auto: only on CUDA, and only when the base as
    loaded, plus a rank-`rank` LoRA on target_regex's linears with its gradient and AdamW state (20 bytes a parameter,
    student and teacher) and `slack` for activations and the CUDA context, would not fit in the free memory."""
    if choice == "on" and device.type == "mps":
        raise UserError("--fp8-base on: Apple MPS has no float8 storage; pass --fp8-base off")
    if choice != "auto" or device.type != "cuda":
        use, why = choice == "on", "--fp8-base" if choice != "auto" else f"auto: {device.type}, nothing to save"
    else:
        base = sum(p.numel() * p.element_size() for p in transformer.parameters())
        lora = sum(rank * (m.in_features + m.out_features) for n, m in transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and target_regex and re.fullmatch(target_regex, n))
        need, free = base + 20 * lora + slack, torch.cuda.mem_get_info(device)[0]
        use, why = need > free, f"auto: {need / 2**30:.1f} GiB needed as loaded, {free / 2**30:.1f} GiB free"
    print(f"base weights: {'float8 e4m3, upcast layer by layer; gradient checkpointing on' if use else 'as loaded'} "
          f"({why})")
    return use

def store_base_in_fp8(transformer, compute_dtype):
    """The DiT's weights stored in float8 e4m3, each layer upcast to compute_dtype for its own forward and cast back
    after (diffusers' layerwise casting: about half the bytes of bf16). Call it AFTER the LoRA adapters exist and pass
    no skip pattern of ours: diffusers then skips peft's lora_A / lora_B by name and the factors stay fp32 (adapters
    added later would be created in fp8; a pattern of ours replaces the one that spares them). Norms, embedders and the
    modules the model class lists stay as loaded. The cast has no scale: weights below e4m3's normal range (2^-6) lose
    precision, which is why it is an option and not the default. Gradient checkpointing must be on: without it, each
    linear keeps its upcast weight for backward and the saving is gone. Never for --full (the trained weights)."""
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)

def free_device(device):
    """Give memory the caching allocator holds back to the device: collect cycles, then empty the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

def setup_distributed(device_name, timeout_min=60.0):
    """(rank, world size, device): under torchrun one process per GPU (nccl) or CPU worker (gloo); plain python is
    rank 0 of 1, no process group. The timeout bounds every collective, so a rank waiting on a dead peer (or on rank 0
    writing a 120 GB --full checkpoint) raises instead of hanging; NCCL's 10-minute default is too short for that."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_name)
    import datetime
    import torch.distributed as dist
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device_name} under torchrun: each rank takes cuda:LOCAL_RANK; pass --device cuda "
                        "(choose the GPUs with CUDA_VISIBLE_DEVICES) or --device cpu")
    if device_name == "auto" and not cuda and torch.backends.mps.is_available():
        raise UserError("torchrun on Apple MPS: there is no multi-process backend for mps; run one process (python "
                        "dopsd.py train ...), or pass --device cpu to train on the CPU")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min))
    if dist.get_rank() == 0:
        print(f"distributed: {world} processes, {'nccl' if cuda else 'gloo'}, device {device.type}, "
              f"collective timeout {timeout_min:g} min")
    return dist.get_rank(), world, device

def any_rank(flag, device):
    """True on every rank if `flag` is true on any (without a process group: flag). Choices that shape the model --
    the fp8 base -- must be one choice for all ranks, or they would train different models."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return flag
    vote = torch.tensor(float(flag), device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote > 0)

def ranks_agree(tensors):
    """True when every rank holds the same values: per-tensor float64 sums and abs-sums compared across ranks."""
    import torch.distributed as dist
    sums = torch.stack([f(t.detach().double()) for t in tensors for f in (torch.sum, lambda v: v.abs().sum())])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)

def check_reachable(repo, flag, filename):
    """Refuse, in seconds, a hub id that is no local folder, not in the Hugging Face cache, and cannot be fetched:
    without this, an offline machine retries the hub for ~30 s and then reports only an OSError. (A cached id is let
    through: offline, set HF_HUB_OFFLINE=1 so that diffusers reads the cache without trying the hub.)"""
    from huggingface_hub import constants, get_session, try_to_load_from_cache
    if Path(repo).is_dir():
        return
    try:
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return
    except ValueError:                               # HFValidationError: not shaped like a hub id (a mistyped path)
        raise UserError(f"{flag} {repo}: no such local folder, and not a Hugging Face hub id") from None
    try:                                             # one request, through the proxies huggingface_hub would use
        get_session().head(f"{constants.ENDPOINT}/api/models/{repo}", timeout=5)
    except Exception as e:
        raise UserError(f"{flag} {repo}: no such local folder, not in the Hugging Face cache, and {constants.ENDPOINT} "
                        f"cannot be reached ({type(e).__name__}); download it on a connected machine (hf download "
                        f"{repo}) or pass a local folder") from None

def check_vlm_kind(vlm):
    """Refuse a --vlm that its config.json says is no Qwen3-VL, before anything loads: transformers would print a long
    load report and then fail on a missing tensor. A hub id not cached yet passes (from_pretrained fetches it)."""
    from huggingface_hub import try_to_load_from_cache
    config = Path(vlm) / "config.json" if Path(vlm).is_dir() else try_to_load_from_cache(vlm, "config.json")
    kind = read_json(config).get("model_type") if isinstance(config, (str, Path)) else None
    if kind not in (None, "qwen3_vl"):
        raise UserError(f"--vlm {vlm}: a {kind} model; the Z-Image teacher needs a Qwen3-VL of the text encoder's size "
                        "(Qwen/Qwen3-VL-4B-Instruct)")

def full_run_parts(model, seen=()):
    """(base pipeline, trained transformer/ folder) when `model` is the --out folder of a `train --full` run, which
    holds only transformer/ and the config.json naming its own --model; else (model, None). So a --full run is the
    --model of the next one, and the next run's encoders and feature cache are the base's."""
    p = Path(model)
    if (p / "transformer" / "config.json").is_file() and not (p / "model_index.json").is_file():
        config = read_json(p / "config.json")
        base = config.get("model")
        if base is None or p.resolve() in seen:
            raise UserError(f"--model {model}: a transformer/ folder without a dopsd.py config.json naming another "
                            "base model; pass the --out folder of a train --full run, or a diffusers pipeline")
        # A relative --model is relative to the folder that run was started in (launch_folder; older config.json
        # files lack it: then here, then the run folder, as before); a hub id matches no folder and stays as it is.
        tries = (Path(config.get("launch_folder", ""), base), Path(base), p / base)
        base = next((str(t) for t in tries if t.exists()), base)
        return full_run_parts(base, (*seen, p.resolve()))[0], p / "transformer"
    return model, None

def pipeline_family(model):
    """Read the pipeline class from model_index.json before loading any weights; refuse unsupported ones early."""
    from diffusers import DiffusionPipeline
    model = full_run_parts(model)[0]
    check_reachable(model, "--model", "model_index.json")
    try:
        index = DiffusionPipeline.load_config(model)
    except Exception as e:
        raise UserError(f"--model {model}: cannot read model_index.json ({type(e).__name__}); "
                        "pass a diffusers pipeline folder or hub id") from None
    cls = index["_class_name"]
    if cls not in SUPPORTED_PIPELINES:
        raise UserError(f"--model {model}: {cls} is not supported; supported families: ZImagePipeline "
                        "(Z-Image-Turbo), Flux2KleinPipeline (FLUX.2-klein-4B/9B, distilled)")
    if cls == "Flux2KleinPipeline" and not index.get("is_distilled", False):
        raise UserError(f"--model {model}: this klein checkpoint is not step-distilled (is_distilled=false, a klein "
                        "base model): D-OPSD keeps few-step sampling; for a base model use ordinary fine-tuning")
    return SUPPORTED_PIPELINES[cls]

def load_pipeline(model, dtype, transformer_dtype=None, text_encoder=True, transformer=True):
    """The diffusers pipeline in `dtype`, its DiT in transformer_dtype if given (fp32 for --full); text_encoder=False
    leaves the (largest) encoder unloaded when the feature cache already holds everything, transformer=False the DiT
    (ranks > 0 of a sharded --full run: rank 0 sends them its shards). Call pipeline_family(model) first: it refuses
    unsupported checkpoints before any weight is read."""
    import diffusers
    base, trained = full_run_parts(model)
    dtypes = {"default": dtype, "transformer": transformer_dtype or dtype}
    parts = {} if text_encoder else {"text_encoder": None}
    if not transformer:
        parts["transformer"] = None
    elif trained:                                     # a --full run as --model: its DiT in place of the base's
        # transformer/ is bf16: a --full run on it starts from those weights in fp32, not from the exact fp32 ones
        # in its checkpoint/ (only --resume of that run reads them)
        cls = getattr(diffusers, read_json(trained / "config.json")["_class_name"])
        parts["transformer"] = cls.from_pretrained(trained, dtype=dtypes["transformer"])
    return diffusers.DiffusionPipeline.from_pretrained(base, dtype=dtypes, **parts)

def load_hybrid_vlm(vlm_path, text_encoder, dtype):
    """Qwen3-VL whose language model gets the text encoder's weights: its vision tower now feeds OUR encoder.
    Returns (vlm.model, tokenizer, image_processor). Every language-model tensor must find a same-name, same-shape one
    in the text encoder, or we stop: a half-swapped encoder would silently give the teacher garbage features. No
    AutoProcessor: Qwen3VLProcessor insists on a video processor that needs torchvision (vlm_features does its part)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration
    vlm = Qwen3VLForConditionalGeneration.from_pretrained(vlm_path, dtype=dtype).model   # no lm_head: features only
    src = {k.removeprefix("model."): v for k, v in text_encoder.state_dict().items()}    # Qwen3ForCausalLM has "model."
    dst = vlm.language_model.state_dict()
    matched = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    if len(matched) != len(dst):
        raise UserError(f"--vlm {vlm_path}: only {len(matched)}/{len(dst)} language-model tensors match the text "
                        f"encoder of --model (first missing: {min(set(dst) - set(matched), default='')}); use the "
                        "Qwen3-VL of the same size as the encoder")
    # assign=True: the VLM's language model holds the text encoder's own tensors, not a copy -- caching then needs one
    # 4 B language model on the device, not two (Z-Image's caching peak would otherwise pass its training peak)
    vlm.language_model.load_state_dict(matched, assign=True)
    print(f"hybrid VLM: {len(matched)}/{len(dst)} language-model tensors shared with the text encoder")
    return vlm.eval().requires_grad_(False), AutoTokenizer.from_pretrained(vlm_path), \
        AutoImageProcessor.from_pretrained(vlm_path)

# The public recipe wrote its Z-Image list with a missing comma and silently lost feed_forward.w1/w2; a regex anchored
# at the end of the module name, plus a count check in add_lora_adapters(), makes such a miss impossible to overlook.
# For FLUX.2 the public recipe used FLUX.1 names that match nothing, and no single-stream module at all.
LORA_TARGETS = {
    "zimage": r".*\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))$",
    "klein": r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|linear_in|linear_out"
             r"|to_qkv_mlp_proj)$|.*single_transformer_blocks\.\d+\.attn\.to_out$",   # (fused qkv+mlp in single blocks)
}

def lora_linears(transformer, target_regex):
    """{name: linear} of the linears a LoRA on target_regex wraps."""
    return {n: m for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(target_regex, n)}

def add_lora_adapters(transformer, target_regex, rank, alpha, names=("student", "teacher")):
    """One LoRA adapter per name, the teacher an exact copy of the student; returns the number of wrapped linears.
    The factors stay fp32 on a bf16 DiT: the EMA adds (1-μ) = 1e-4 of a difference, which bf16 would round away."""
    from peft import LoraConfig
    expected = len(lora_linears(transformer, target_regex))
    with warnings.catch_warnings():                 # "Already found a peft_config": a second adapter is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:                          # Gaussian init: A random, B = 0, so every adapter starts as the base
            transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=target_regex), adapter_name=name)
    layers = lora_layers(transformer)
    # peft casts each LoRA layer's input to the factors' dtype (fp32); under bf16 autocast every LoRA'd linear would
    # then save its own bf16 copy of its input for backward, beside the one the base linear saved. Autocast casts here:
    # peft's cast is off for good (peft.helpers.disable_input_dtype_casting lasts only a `with` block).
    with torch.no_grad():
        for layer in layers:
            layer.cast_input_dtype_enabled = False
            for factors in (layer.lora_A, layer.lora_B):
                factors.float()
                for other in names[1:]:             # teacher := copy(student), so the EMA averages the same factors
                    factors[other].weight.copy_(factors[names[0]].weight)
    if len(layers) != expected or not layers:
        raise RuntimeError(f"LoRA wrapped {len(layers)} modules but {expected} linears match the target list")
    transformer.set_adapter(names[0])
    return len(layers)

# The names ComfyUI and BFL give the modules our LoRA covers, where they differ from diffusers' (ComfyUI's own maps,
# comfy.utils z_image_to_diffusers / flux_to_diffusers; see comfyui-lora.md). A (?P<p>) module is one third of a fused
# linear whose rows are q's, then k's, then v's; klein's single-block linear1 / linear2 ARE our to_qkv_mlp_proj /
# to_out. Z-Image's feed_forward.w1-3 keep their names. diffusers' own converters
# (lora_conversion_utils._convert_non_diffusers_z_image / _flux2 / _kohya_flux2) are not called: they need the tensors
# (this check reads the header only), leave ComfyUI's fused Z-Image attention.qkv unsplit, refuse BFL files that carry
# .alpha, and drop kohya names they do not know with a log line instead of an error.
THEIR_NAMES = {r"(.+\.attention)\.to_(?P<p>[qkv])": r"\1.qkv", r"(.+\.attention)\.to_out\.0": r"\1.out",
               r"transformer_blocks\.(\d+)\.attn\.to_(?P<p>[qkv])": r"double_blocks.\1.img_attn.qkv",
               r"transformer_blocks\.(\d+)\.attn\.add_(?P<p>[qkv])_proj": r"double_blocks.\1.txt_attn.qkv",
               r"transformer_blocks\.(\d+)\.attn\.to_out\.0": r"double_blocks.\1.img_attn.proj",
               r"transformer_blocks\.(\d+)\.attn\.to_add_out": r"double_blocks.\1.txt_attn.proj",
               r"transformer_blocks\.(\d+)\.ff\.linear_in": r"double_blocks.\1.img_mlp.0",
               r"transformer_blocks\.(\d+)\.ff\.linear_out": r"double_blocks.\1.img_mlp.2",
               r"transformer_blocks\.(\d+)\.ff_context\.linear_in": r"double_blocks.\1.txt_mlp.0",
               r"transformer_blocks\.(\d+)\.ff_context\.linear_out": r"double_blocks.\1.txt_mlp.2",
               r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj": r"single_blocks.\1.linear1",
               r"single_transformer_blocks\.(\d+)\.attn\.to_out": r"single_blocks.\1.linear2"}
# Adapters saved under LoRA-like names that hold no B·A to start from (a fragment of their keys: what they are)
NOT_LORA = {".lokr_": "a LyCORIS LoKr", ".hada_": "a LyCORIS LoHa", "dora_scale": "a DoRA",
            "lora_magnitude_vector": "a DoRA"}

def lora_key(key):
    """(module name without the trainers' prefixes, factor) of a LoRA file's key, in the styles read_lora_file lists;
    factor: lora_A/B, lora_down/up or alpha, None for a key that is no LoRA factor (the name is then the whole key)."""
    m = re.fullmatch(r"(.+?)\.(lora_A|lora_B|lora_down|lora_up)(\.[^.]+)?\.weight|(.+)\.alpha", key)
    name = (m.group(1) or m.group(4)) if m else key
    for prefix in ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
                   "lora_transformer_", "lycoris_"):     # kohya / musubi, OneTrainer, ComfyUI's lycoris_ alias
        name = name.removeprefix(prefix)
    return name, (m.group(2) or "alpha") if m else None

def not_a_lora(path, key):
    """The UserError for a key that is no LoRA factor, naming the adapter when its keys tell."""
    what = next((f"{kind}, not a LoRA" for frag, kind in NOT_LORA.items() if frag in key),
                f"key {key} is no LoRA factor (lora_A/B, lora_down/up, alpha)")
    return UserError(f"--init-lora {path}: {what}; pass a plain LoRA (diffusers, ComfyUI/BFL or kohya/musubi names)")

def lora_name_map(modules):
    """{a module name as LoRA files write it, with kohya's underscores for dots: [(module, first row, end row of the
    file's B)]} for modules {name: out_features}, the linears our LoRA covers: each under its diffusers name (all of
    B) and under ComfyUI's / BFL's name, where a fused q|k|v's B stacks q's rows, then k's, then v's (one A for all)."""
    groups = {n: [(0, n)] for n in modules}
    for n in modules:
        for rx, theirs in THEIR_NAMES.items():
            if m := re.fullmatch(rx, n):
                groups.setdefault(m.expand(theirs), []).append(("qkv".index(m.groupdict().get("p") or "q"), n))
    out = {}
    for name, parts in groups.items():
        start, rows = 0, out.setdefault(name.replace(".", "_"), [])
        for _, n in sorted(parts):                   # (order in q|k|v, module)
            rows.append((n, start, start + modules[n]))
            start += modules[n]
    return out

def lora_file_of(path):
    """A LoRA path as --init-lora takes it: a dopsd.py --out folder means its pytorch_lora_weights.safetensors."""
    p = Path(path)
    return p / "pytorch_lora_weights.safetensors" if p.is_dir() else p

def check_init_lora(path, family, rank, model):
    """The --init-lora file (a run folder's LoRA, or the file itself), checked from its header before any model
    loads: a safetensors LoRA of this family, of rank at most --rank, whose modules are ones our LoRA covers on --model
    (its DiT built on the meta device) in any naming lora_name_map knows. Returns the file."""
    from safetensors import safe_open
    file = lora_file_of(path)
    if not file.is_file():
        raise UserError(f"--init-lora {path}: not found; pass a dopsd.py --out folder or a LoRA .safetensors file")
    trained = weights_family("lora", file, "--init-lora")
    if trained and trained != family:
        raise UserError(f"--init-lora {path}: trained for {FAMILIES[trained]['arch']}, but --model is "
                        f"{FAMILIES[family]['arch']}; continue from a LoRA of this model")
    with safe_open(str(file), "pt") as f:
        parsed = {k: lora_key(k) for k in f.keys()}
        top = max((f.get_slice(k).get_shape()[0] for k, (_, factor) in parsed.items()
                   if factor in ("lora_A", "lora_down")), default=0)
    if odd := next((k for k, (_, factor) in parsed.items() if factor is None), None):
        raise not_a_lora(path, odd)
    if top > rank:
        raise UserError(f"--init-lora {path}: its rank is {top}, above --rank {rank}; pass --rank {top} or more")
    ours = lora_linears(dit_on_meta(model), LORA_TARGETS[family])
    known = lora_name_map({n: m.out_features for n, m in ours.items()})
    foreign = sorted({n for n, _ in parsed.values() if n.replace(".", "_") not in known})
    if foreign:                                       # (kohya's names are the only ones without dots)
        raise UserError(f"--init-lora {path}: a {'diffusers/ComfyUI' if '.' in foreign[0] else 'kohya/musubi'} LoRA "
                        f"with {len(foreign)} module(s) this model does not have or dopsd.py does not train (first: "
                        f"{foreign[0]}); pass a LoRA of this model")
    return file

def read_lora_file(path):
    """{module name as the file writes it (see lora_key): (A [r, in], B [out, r] with the file's scale alpha/r folded
    in)} from a LoRA file in the key styles trainers write: diffusers and peft (transformer.M.lora_A.weight; ours),
    ComfyUI / ai-toolkit (diffusion_model.M... with ComfyUI's or BFL's names, see THEIR_NAMES), kohya / musubi
    (lora_unet_M with _ for .), lora_down / lora_up with a per-module .alpha. The scale: a module's .alpha tensor, else
    diffusers' adapter metadata (lora_alpha / r), else 1 (alpha = r, as diffusers reads a file that says nothing)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta.get("lora_adapter_metadata", "{}"))
    peft_cfg = read_json(Path(path).parent / "adapter_config.json")   # peft's save_pretrained keeps alpha there
    alpha = info.get("transformer.lora_alpha", info.get("lora_alpha", peft_cfg.get("lora_alpha")))
    if info.get("transformer.use_rslora", info.get("use_rslora", peft_cfg.get("use_rslora"))):
        raise UserError(f"--init-lora {path}: an rsLoRA (scale alpha/√r); convert it to a plain LoRA first")
    parts = {}
    for key, t in tensors.items():
        name, factor = lora_key(key)
        if factor is None:
            raise not_a_lora(path, key)
        parts.setdefault(name, {})[factor] = t.float()
    out = {}
    for name, f in parts.items():
        A, B = f.get("lora_A", f.get("lora_down")), f.get("lora_B", f.get("lora_up"))
        if A is None or B is None:
            raise UserError(f"--init-lora {path}: module {name} has only one of its two factors")
        r = A.shape[0]
        scale = float(f["alpha"]) / r if "alpha" in f else (alpha / r if alpha else 1.0)
        out[name] = (A, B * scale)
    return out

def set_lora(transformer, factors, names, scale):
    """Load factors (from read_lora_file) into the adapters `names` (all alike), whose scale is alpha/rank: the
    effective weight B·A·scale of each module becomes the file's (a fused q|k|v's: its rows of B, the shared A). A rank
    below ours fills the first rows of A and columns of B; the rest keep their init (A Gaussian, B zero), so the delta
    is exact and the spare rank still learns."""
    modules = {n: m for n, m in transformer.named_modules() if hasattr(m, "lora_A")}
    known = lora_name_map({n: m.out_features for n, m in modules.items()})
    with torch.no_grad():
        for name, (A, B) in factors.items():
            targets = known.get(name.replace(".", "_"))
            if targets is None:
                raise UserError(f"--init-lora: module {name} of the LoRA is not one this model's LoRA covers; pass a "
                                "LoRA trained for this model")
            r, own_A, rows = A.shape[0], modules[targets[0][0]].lora_A[names[0]].weight, targets[-1][2]
            if A.shape[1] != own_A.shape[1] or B.shape[0] != rows or r > own_A.shape[0]:
                raise UserError(f"--init-lora: module {name} has shape {tuple(B.shape)}·{tuple(A.shape)}, this "
                                f"model's is ({rows}, {own_A.shape[0]})·{tuple(own_A.shape)} (rank at most --rank); "
                                "pass a LoRA of this model and a --rank at least its rank")
            for module, start, end in targets:           # a fused q|k|v: each its rows of B [3·out, r], A shared
                layer = modules[module]
                for n in names:
                    layer.lora_A[n].weight[:r] = A
                    layer.lora_B[n].weight[:, :r] = B[start:end] / scale

def adapter_params(transformer, name):
    """{parameter name without the adapter name: tensor} for one adapter, in a stable order."""
    return {n.replace(f".{name}.", "."): p for n, p in transformer.named_parameters() if ".lora_" in n and f".{name}." in n}

# --------------------------------------------------------------------------------------------------------------------
# conditioning builders
# Plain functions with explicit arguments, meant to be copied. Student: the model's own text path. Teacher, Z-Image:
# the hybrid VLM on [image, caption] -> features of the text width, where cap_feats go. Teacher, FLUX.2-klein: the
# target's VAE latents as reference tokens inside the DiT, plus an instruction appended to the caption.

def chat(tokenizer, prompts, thinking):
    """Each prompt as one user turn of the encoder's chat template (Z-Image renders it thinking, klein not)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=thinking) for p in prompts]

@torch.no_grad()
def zimage_text_features(text_encoder, tokenizer, prompts, max_len=512):
    """Z-Image's student features: chat template -> Qwen3 -> hidden_states[-2], padding stripped -> list of [L_i, D].
    Same maths as ZImagePipeline.encode_prompt, which we don't call: it overwrites the caller's prompt list in place."""
    dev = text_encoder.device
    tok = tokenizer(chat(tokenizer, prompts, True), padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt")
    mask = tok.attention_mask.to(dev).bool()                                         # [B, max_len]
    hs = text_encoder(input_ids=tok.input_ids.to(dev), attention_mask=mask,
                      output_hidden_states=True).hidden_states[-2]                   # [B, max_len, D]
    return [h[m] for h, m in zip(hs, mask)]                                          # B × [L_i, D]

@torch.no_grad()
def klein_text_features(text_encoder, tokenizer, prompts, layers, max_len=None):
    """FLUX.2-klein's text features: chat template (thinking off) -> Qwen3 -> hidden states of `layers` side by side.
    Returns [B, max_len, len(layers)·D], padding KEPT: the klein DiT has no text mask, so the pad tokens are part of
    the condition and student, teacher and pipeline must all pad to the same length (Flux2KleinPipeline's
    max_sequence_length). max_len=None: klein_text_len(tokenizer), 512 for the real checkpoints."""
    dev, max_len = text_encoder.device, max_len or klein_text_len(tokenizer)
    tok = tokenizer(chat(tokenizer, prompts, False), padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt")
    hs = text_encoder(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                      output_hidden_states=True, use_cache=False).hidden_states       # (layers+1) × [B, L, D]
    return torch.cat([hs[k] for k in layers], dim=-1)                                # [B, L, 3D]

def text_model(text_encoder):
    """The encoder's transformer without its LM head: klein ships a Qwen3ForCausalLM, whose head (1.2 GB untied in
    klein-9B) and logits over 151,936 tokens a caption (1.2 GB for 4 padded captions) no feature needs."""
    return text_encoder.model if hasattr(text_encoder, "lm_head") else text_encoder

def klein_text_len(tokenizer):
    """klein's text length: the pipeline's max_sequence_length default, 512, unless the tokenizer reads less (the real
    Qwen3 tokenizer says 131072; examples/toy's CPU model says 48, and diffusers samples it with max_sequence_length=48)."""
    return min(512, tokenizer.model_max_length)

def klein_text_layers(text_encoder):
    """klein reads its encoder at 1/4, 1/2 and 3/4 depth: (9, 18, 27) for the 36-layer Qwen3-4B/8B of klein-4B/9B."""
    n = text_encoder.config.num_hidden_layers
    return (n // 4, n // 2, 3 * n // 4)

def prompt_tokens(tokenizer, prompts, thinking):
    """Token counts of the templated prompts, to warn once before the encoder truncates them."""
    return [len(tokenizer(t).input_ids) for t in chat(tokenizer, prompts, thinking)]

def warn_long(what, items, lengths, limit, whose=""):
    """One warning line naming every image whose `what` is over `limit` tokens (so it is cut), and the fix."""
    paths = [p for (p, _), n in zip(items, lengths) if n > limit]
    if paths:
        print(f"warning: the {what} of {len(paths)} image(s) is longer than {whose}{limit} tokens and is cut "
              f"({_names(paths)}): shorten those captions")

@torch.no_grad()
def vlm_features(vlm, tokenizer, image_processor, image, prompt, pixels=(512 * 512, 768 * 768)):
    """The teacher's multimodal features f_mm(p, I): hybrid Qwen3-VL on one user turn [image, caption] -> [L', D].
    image: PIL RGB (the training crop), seen at 512²..768² pixels (the paper's processor limits). Every token of the
    turn -- template, image and caption -- is kept; they go where cap_feats go (the caller cuts to VLM_CONTEXT)."""
    dev = next(vlm.parameters()).device
    pix = image_processor(images=[image], return_tensors="pt",
                          size={"shortest_edge": pixels[0], "longest_edge": pixels[1]})
    grid = pix["image_grid_thw"]                                             # [1, 3] = (t, h, w) in 16-px patches
    n_image = int(grid.prod()) // image_processor.merge_size ** 2            # tokens after the 2×2 patch merger
    # What Qwen3-VL's chat template renders for this message (no system prompt), with <|image_pad|> already expanded:
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_image + "<|vision_end|>"
            + prompt + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids.to(dev)                      # [1, L']
    mm_type = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()         # 1 = image token, 0 = text
    return vlm(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_type,
               pixel_values=pix["pixel_values"].to(dev, vlm.dtype), image_grid_thw=grid.to(dev),
               output_hidden_states=True, use_cache=False).hidden_states[-2][0]       # [L', D]

def to_pil(image):
    """VAE output [B, 3, H, W] in [-1, 1] -> list of PIL images, rounded as the diffusers image processor does."""
    from PIL import Image
    image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)   # [B, 3, H, W]
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in image]

@torch.no_grad()
def zimage_encode(vae, image):
    """[B, 3, H, W] in [-1, 1] -> Z-Image latents [B, 16, H/8, W/8] (the DiT's scaling; inverse of zimage_decode)."""
    z = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mode()
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()

@torch.no_grad()
def zimage_decode(vae, x):
    """Z-Image latents [B, 16, h, w] -> list of PIL images, as ZImagePipeline decodes them."""
    return to_pil(vae.decode(x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).sample)

def _klein_bn(vae):
    """klein normalises 2×2-patchified latents with the VAE's BatchNorm running statistics: ([1,4C,1,1], [1,4C,1,1])."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).float()
    return mean, torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps)

@torch.no_grad()
def klein_encode(vae, image):
    """[B, 3, H, W] in [-1, 1] -> normalised klein latents [B, 4C, H/16, W/16], as the pipeline encodes reference
    images (latent mode, 2×2 patchify, BatchNorm statistics). The teacher's reference tokens, and SFT's targets."""
    z = vae.encode(image.to(vae.device, vae.dtype)).latent_dist.mode().float()       # [B, C, H/8, W/8]
    B, C, h, w = z.shape
    z = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, h // 2, w // 2)
    mean, std = _klein_bn(vae)
    return (z - mean) / std                                                           # [B, 4C, H/16, W/16]

@torch.no_grad()
def klein_decode(vae, x):
    """Normalised klein latents [B, 4C, h, w] -> list of PIL images (un-normalise, un-patchify, decode)."""
    mean, std = _klein_bn(vae)
    z = x.float() * std + mean
    B, C, h, w = z.shape
    z = z.reshape(B, C // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * h, 2 * w)
    return to_pil(vae.decode(z.to(vae.dtype)).sample)

# --------------------------------------------------------------------------------------------------------------------
# schedules and velocities
# Each family's sampling schedule and its DiT call, in one convention: every velocity function returns u = ε - x0
# (the scheduler's), so the roll-out in "the method" is family-free:
#     x0_hat = x - σ·u,      x_next = x + (σ_next - σ)·u.

def zimage_sigmas(num_steps, shift=3.0):
    """Z-Image-Turbo's schedule in diffusers 0.42: linspace(1, 1/N, N), shifted by 3, then 0. [N+1], fp32.
    N = 4 gives σ = 1, .9, .75, .5, 0: the D-OPSD training roll-out, and steps 0,2,4,6 of the 8-step deploy schedule."""
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, s.new_zeros(1)]).float()

def zimage_velocity(transformer, x, sigma, caps):
    """u = ε - x0 from the Z-Image DiT. x: [B, C, h, w] fp32; sigma: [B]; caps: B × [L_i, D]. Returns [B, C, h, w] fp32.
    Z-Image's model time is t = 1 - σ (1 = clean), kept in fp32 (it is scaled by 1000 inside), and its raw output
    points towards the data (x0 - ε), so we negate it -- exactly what ZImagePipeline does before scheduler.step."""
    dtype = getattr(transformer, "module", transformer).dtype                 # (unwrap DistributedDataParallel)
    xs = list(x.to(dtype).unsqueeze(2).unbind(0))                             # B × [C, 1, h, w] (frame axis F = 1)
    out = transformer(xs, (1.0 - sigma).float(), caps, return_dict=False)[0]  # B × [C, 1, h, w]
    return -torch.stack(out).squeeze(2).float()                               # [B, C, h, w]

def klein_sigmas(num_steps, image_seq_len):
    """FLUX.2-klein's sampling schedule, as Flux2KleinPipeline builds it: linspace(1, 1/N, N), shifted by the
    resolution-dependent mu, then 0. [N+1] fp32. The public recipe trained on set_timesteps(N, mu) without sigmas
    (linspace(1, 0.001)), whose last state sits at σ ≈ 0.01 and never visits the σ ≈ 0.7 state inference uses; the
    roll-out must visit the states the deployed sampler visits, so we train on exactly this schedule."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    mu = compute_empirical_mu(image_seq_len, num_steps)
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))                          # exponential time shift
    return torch.cat([s, s.new_zeros(1)]).float()

def klein_velocity(transformer, x, sigma, cond):
    """u = ε - x0 from the FLUX.2 DiT (its raw output already is). x: [B, 4C, h, w] normalised latents; sigma: [B];
    cond = (prompt_embeds [B, L, 3D], reference latents [B, 4C, h_r, w_r] or None). Returns [B, 4C, h, w] fp32.
    Reference tokens go AFTER the noisy tokens with their own position ids (time coordinate T = 10, as the pipeline
    gives its first reference image), and the output is sliced back to the noisy tokens. Position ids are shared by
    the batch (the DiT reads ids[0]), so a batch holds one resolution -- the buckets guarantee that."""
    pe, ref = cond
    B, C, h, w = x.shape
    dev, dt = x.device, getattr(transformer, "module", transformer).dtype     # (unwrap DistributedDataParallel)
    ar = lambda n: torch.arange(n, device=dev)
    ids = torch.cartesian_prod(ar(1), ar(h), ar(w), ar(1))                   # [h·w, 4] = (T, row, col, L)
    tokens = x.flatten(2).transpose(1, 2)                                      # [B, h·w, 4C]
    if ref is not None:                                                        # ref: [B, 4C, h_r, w_r], any size
        tokens = torch.cat([tokens, ref.flatten(2).transpose(1, 2)], 1)       # [B, h·w + h_r·w_r, 4C]
        ids = torch.cat([ids, torch.cartesian_prod(ar(1) + 10, ar(ref.shape[2]), ar(ref.shape[3]), ar(1))])  # T = 10
    txt_ids = torch.cartesian_prod(ar(1), ar(1), ar(1), ar(pe.shape[1]))     # [L, 4] = (0, 0, 0, l)
    # As the pipeline: σ·1000 rounded to the dtype the DiT computes in (bf16 on GPU), then /1000. That is autocast's
    # when on (--full: an fp32 DiT under bf16 autocast, 0.9545 -> 956, as the bf16 pipeline), else the DiT's own.
    computes = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else dt
    t = (sigma * 1000).to(computes) / 1000
    out = transformer(hidden_states=tokens.to(dt), timestep=t, guidance=None, encoder_hidden_states=pe.to(dt),
                      txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]      # [B, S, 4C]
    return out[:, : h * w].float().transpose(1, 2).reshape(B, C, h, w)

def sft_sigma(family, u, image_seq_len, deploy_steps):
    """SFT's noise level from u ~ U(0, 1): the time shift the family's own sampler applies, so that flow matching
    trains where the model samples. Z-Image: its scheduler's static shift 3 (3u / (1 + 2u)). klein: the pipeline's
    resolution-dependent shift e^μ, μ = compute_empirical_mu(tokens, deploy steps) -- about 7 at 64 tokens and 10 at
    1 MP -- not the 3 a fixed-shift trainer would use. (diffusers' FLUX.2 training example indexes the unshifted
    timesteps of a dynamic-shifting scheduler, i.e. shift 1: further still from what klein samples.)"""
    if family == "zimage":
        shift = 3.0
    else:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
        shift = math.exp(compute_empirical_mu(image_seq_len, deploy_steps))
    return shift * u / (1 + (shift - 1) * u)

@torch.no_grad()
def euler_sample(velocity, noise, sigmas):
    """Plain few-step Euler sampling (what the pipeline does, and what the student rolls out). Returns x at σ = 0."""
    x, sigmas = noise, sigmas.to(noise.device)
    for k in range(len(sigmas) - 1):
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity(x, sigmas[k].expand(x.shape[0]))
    return x

# --------------------------------------------------------------------------------------------------------------------
# two roles on one DiT
# The teacher is the SAME DiT with the "teacher" adapter active and the multimodal context in place of the caption
# features. It is evaluated on the student's state under no_grad, and never trained: after each optimizer step its
# weights move a little towards the student's (ema_update). One DiT in memory, two small adapters.

def lora_layers(transformer):
    """The peft LoRA layers of a model, listed once so that switching adapters needs no walk over every module."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]

def use_adapter(layers, name, trainable=True):
    """Make adapter `name` the active one on every LoRA layer (from lora_layers(); layers None: no LoRA, nothing to
    do); name None switches every adapter off, for the base model.
    transformer.set_adapter(name) does the same but walks all modules and re-checks peft's version each call, 2K times
    a step (7 ms a switch on the benchmark's 900-module DiT; this loop: 2.5 ms). peft's layer-level set_adapter makes the
    active adapter trainable unless inference_mode, all others frozen. The teacher is activated frozen: it can never
    collect a gradient, and autocast keeps no bf16 copies of weights that need no grad through the roll-out."""
    for layer in layers or ():
        if name is None:
            layer.enable_adapters(False)             # every adapter off (and frozen)
        elif layer.disable_adapters or layer.active_adapters != [name] or \
                layer.lora_A[name].weight.requires_grad != trainable:
            layer.enable_adapters(True)
            layer.set_adapter(name, inference_mode=not trainable)

@torch.no_grad()
def teacher_from_base(layers):
    """Start the EMA teacher at the bare base (--teacher-start base): its B factors := 0, so B·A = 0. A continued run's
    teacher would otherwise start at base + the first concept's LoRA, whose in-context copy that concept may have
    damaged. Its A stays as it was, and the EMA then moves both factors towards the student's as it always does."""
    for layer in layers:
        if "teacher" in layer.lora_B:
            layer.lora_B["teacher"].weight.zero_()

# --------------------------------------------------------------------------------------------------------------------
# fused loss: the Triton kernel, its PyTorch twin, one autograd.Function, and the backend dispatch behind dopsd_loss
# The loss (maths in "the method") is a weighted MSE, so the only thing worth fusing is memory traffic: one pass that
# reads u_s and u_t and writes what backward needs.
#
# In code d = u_s − u_t, w is a [B] fp32 vector, and flat element j of the contiguous tensor is in sample j // (N/B).
# The fused paths store wd = w·d = (N/2)·∂L/∂u_s in the input dtype and apply 2/N with grad_output in backward: 2·w·d/N
# in fp16 is below the smallest subnormal (6e-8) once N ≳ 1e6, and a GradScaler multiplies only after the underflow.
# Memory traffic per element (examples/bench.py counts it op by op): eager autograd makes 18 N-sized reads and writes,
# 72 B in fp32; the kernel makes 5 (forward: read u_s, u_t, write wd; backward: read wd, write the gradient), 20 B
# fp32 or 10 B bf16.

def _divergence_fwd_torch(u_s, u_t, w):
    """PyTorch forward of the fused op: (loss () fp32, wd = w·d in u_s.dtype). It runs inside
    autograd.Function.forward, so no graph is built and only wd is kept; torch.compile would fuse it into one loop."""
    math_dtype = torch.promote_types(u_s.dtype, torch.float32)    # fp32 for bf16/fp16 inputs, float64 stays float64
    bshape = (u_s.shape[0],) + (1,) * (u_s.dim() - 1)               # (B, 1, ..., 1)
    d = u_s.to(math_dtype) - u_t                                    # (B, ...) type promotion upcasts u_t in-loop
    wd = w.to(math_dtype).view(bshape) * d                          # (B, ...) w(σ_b)·d = (N/2)·∂L/∂u_s
    loss = (torch.dot(wd.view(-1), d.view(-1)) / u_s.numel()).float()   # ()  Σ w·d² / N in fp32, one read of each
    return loss, wd.to(u_s.dtype)

if HAS_TRITON:  # the kernel only exists when triton imports; defining it under `if` keeps the file importable

    @triton.jit
    def _divergence_kernel(
        vs_ptr,          # *[N] student velocity u_s, contiguous, fp32 / bf16 / fp16
        vt_ptr,          # *[N] teacher velocity u_t, same layout (its own dtype; upcast on load)
        w_ptr,           # *[B] fp32 per-sample weight w(σ_b)
        wd_ptr,          # *[N] out: w·(u_s − u_t) in u_s's dtype, = (N/2)·∂L/∂u_s (2/N is applied in backward)
        partial_ptr,     # *[n_blocks] out: fp32 Σ_block w·d² (summed by torch afterwards; no atomics)
        N,               # total number of elements; ints are specialised only on ==1 and %16, so few recompiles
        per_sample,      # N // B; the sample of flat element j is b = j // per_sample
        BLOCK: tl.constexpr,     # elements per program
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)       # int64: N can exceed 2**31 on video latents
        mask = offs < N                                             # the last block is ragged for odd shapes
        vs = tl.load(vs_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # upcast: all math in fp32
        vt = tl.load(vt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = offs // per_sample                                      # sample index; slow int64 div, hidden by the loads
        w = tl.load(w_ptr + b, mask=mask, other=0.0)                # gather w(σ_b); B floats, stays in L1/L2
        d = vs - vt
        wd = w * d                                                  # masked lanes: d = 0 so they add nothing
        tl.store(wd_ptr + offs, wd.to(wd_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + pid, tl.sum(wd * d, axis=0))         # one fp32 partial per block

def _divergence_fwd_triton(u_s, u_t, w, block=1024):
    """Triton forward, same contract. block 1024 × 4 warps = 8 elements a thread: enough bytes in flight for a
    bandwidth-bound op, and ~1000 programs to fill every SM on a 1M-element latent."""
    N = u_s.numel()
    n_blocks = triton.cdiv(N, block)
    wd = torch.empty_like(u_s)                                                        # (B, ...)
    partials = torch.empty(n_blocks, dtype=torch.float32, device=u_s.device)          # (n_blocks,)
    # Triton launches on the *current* CUDA device and stream, so make that the tensors' device (a no-op when it is).
    with torch.cuda.device(u_s.device) if u_s.is_cuda else contextlib.nullcontext():
        _divergence_kernel[(n_blocks,)](u_s, u_t, w, wd, partials, N, N // u_s.shape[0], BLOCK=block, num_warps=4)
    return partials.sum() / N, wd   # two-stage sum: deterministic, unlike an atomic_add into one scalar

class DivergenceLoss(torch.autograd.Function):
    """L and w·d in one forward pass; backward only rescales the stored w·d. Shared by both backends."""

    @staticmethod
    def forward(ctx, u_s, u_t, w, backend):
        # u_s, u_t: (B, ...) any strides (made contiguous: b = j // (N/B) needs it); w: (B,) fp32
        u_s, u_t = u_s.contiguous(), u_t.contiguous()
        ctx.N = u_s.numel()
        if ctx.N == 0:  # mean over zero elements is defined as 0 (not NaN), with an empty gradient; nothing to launch
            loss, wd = u_s.new_zeros((), dtype=torch.float32), torch.zeros_like(u_s)
        else:
            loss, wd = (_divergence_fwd_triton if backend == "triton" else _divergence_fwd_torch)(u_s, u_t, w)
        ctx.save_for_backward(wd if ctx.needs_input_grad[0] else None)  # keep N·s bytes only if u_s needs grad
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        # ∂/∂u_s = grad_output · 2·w·d / N: the 2/N joins grad_output here, in fp32 (see the fp16 note above)
        return ctx.saved_tensors[0] * (g_loss * (2.0 / max(ctx.N, 1))), None, None, None

LOSS_BACKEND = {}   # backend="auto" per device type, e.g. {"cpu": "torch", "cuda": "triton"}; tests clear it

def triton_probe(device):
    """(ok, why) from one launch on a 4-element tensor. A Triton that imports can still fail at its first launch: it
    builds a C launcher stub, and slim CUDA images have no compiler (triton/runtime/build.py). Better here than later."""
    try:
        v = torch.ones(1, 4, device=device)
        loss, wd = _divergence_fwd_triton(v, v * 0, torch.ones(1, device=device))
        ok = math.isclose(loss.item(), 1.0) and bool((wd == 1).all())
        return ok, "test launch passed" if ok else "test launch gave a wrong result"
    except Exception as e:                              # anything at all: the PyTorch path is always there
        return False, f"test launch failed: {(str(e).strip().splitlines() or [type(e).__name__])[0][:120]}"

def _resolve_loss_backend(backend, device, dtype):
    """The path to run. auto: Triton on CUDA if its test launch passes, else PyTorch, chosen once per device type and
    printed with why; the kernel computes in fp32, so other dtypes (float64) take PyTorch. A forced "triton" is checked."""
    kernel_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    if backend == "auto":
        if device.type not in LOSS_BACKEND:
            use, why = False, f"{device.type} tensor, the Triton kernel needs CUDA"
            if not HAS_TRITON:
                why = "triton not installed"
            elif device.type == "cuda":
                use, why = triton_probe(device)        # a test launch: triton may import and still not run
            LOSS_BACKEND[device.type] = "triton" if use else "torch"
            print(f"dopsd_loss: backend={LOSS_BACKEND[device.type]} on {device.type} ({why})")
        return LOSS_BACKEND[device.type] if kernel_dtype else "torch"
    if backend == "triton":
        # Off CUDA the kernel can only run in triton's interpreter, which @triton.jit picks at *decoration* time: a
        # compiled kernel (TRITON_INTERPRET=1 unset, or set after import) dies there with "0 active drivers ([])".
        compiled = HAS_TRITON and isinstance(_divergence_kernel, triton.runtime.jit.JITFunction)
        why = ("triton is not installed; pip install triton" if not HAS_TRITON else
               f"it needs a CUDA tensor, got {device.type} (set TRITON_INTERPRET=1 before triton is imported to run it "
               "on CPU)" if device.type != "cuda" and compiled else
               f"the kernel supports float32/bfloat16/float16, got {dtype}" if not kernel_dtype else None)
        if why:
            raise RuntimeError(f"dopsd_loss: backend='triton' but {why}; or use backend='torch'")
    return backend

# --------------------------------------------------------------------------------------------------------------------
# training
# The run in named pieces: check the arguments -> cache every encoder's output -> attach the two roles to one DiT ->
# the loop, which reads like the paper's algorithm box (roll-out with teacher scoring, clip, AdamW, EMA). Checkpoints,
# grids, DDP, Ctrl-C and the log stay in their own small functions. The families differ only in what FAMILIES lists.

FAMILIES = {  # deploy: the distilled step count (Z-Image-Turbo: 8 DiT forwards in diffusers 0.42; klein 4), no CFG
    "zimage": dict(velocity=zimage_velocity, encode=zimage_encode, decode=zimage_decode, deploy=8, arch="z-image-turbo"),
    "klein": dict(velocity=klein_velocity, encode=klein_encode, decode=klein_decode, deploy=4, arch="flux-2-klein"),
}
KLEIN_TEACHER_SUFFIX = ("Keep the main subject with all its details, the background and the overall composition the "
                        "same as in the reference image.")   # appended to the klein teacher's caption (--teacher-suffix)
MAX_NONFINITE_STREAK = 5
VLM_CONTEXT = 1024            # Z-Image teacher: tokens of the VLM turn kept (image tokens sit at RoPE position ≤ 1025)
DEFAULT_LR = {"zimage": 1e-4, "klein": 2e-5}   # the authors' released recipes

def latent_cell(family, vae):
    """Pixels per cell of the DiT's state grid: the VAE's 2^(blocks-1) (8 for the real ones), ×2 for klein's packing."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * (2 if family == "klein" else 1)

def schedule(family, num_steps, h, w):
    """σ schedule [N+1] for a latent grid h×w (klein's shift depends on the token count h·w, Z-Image's does not)."""
    return zimage_sigmas(num_steps) if family == "zimage" else klein_sigmas(num_steps, h * w)

def student_features(family, text_encoder, tokenizer, prompts):
    """Per-prompt student conditioning: Z-Image [L_i, D]; klein ([L, 3D], None) (no reference image)."""
    if family == "zimage":
        return zimage_text_features(text_encoder, tokenizer, prompts)
    return [(p, None) for p in klein_text_features(text_encoder, tokenizer, prompts, klein_text_layers(text_encoder))]

def collate(conds):
    """Per-sample conditioning -> the batch the family's velocity takes (built once per batch, not once per step)."""
    if torch.is_tensor(conds[0]):                        # Z-Image: a list of [L_i, D] (lengths may differ)
        return list(conds)
    stack = lambda xs: xs[0][None] if len(xs) == 1 else torch.stack(xs)
    return stack([c[0] for c in conds]), None if conds[0][1] is None else stack([c[1] for c in conds])

def read_prompts(flags, file, trigger=None):
    """Prompts from repeated flags, then the lines of a file (blank lines skipped), [V] replaced as in captions."""
    lines = Path(file).read_text(encoding="utf-8").splitlines() if file else []
    prompts = [p.strip() for p in [*(flags or []), *lines]]
    return [p.replace("[V]", trigger) if trigger else p for p in prompts if p]

def check_seed_and_size(seed, resolution=None):
    """The ranges train, check and sample share: a seed of 32 bits (seed << 32 seeds a generator of 64 bits), and a
    bucket size that the VAE's 8× and the DiT's 2×2 patches divide."""
    if not 0 <= seed < 2 ** 32:
        raise UserError(f"--seed {seed}: out of range; pass a seed from 0 to {2 ** 32 - 1}")
    if resolution is not None and (resolution < 64 or resolution % 16):
        raise UserError(f"--resolution must be a multiple of 16, at least 64 (got {resolution})")

def check_ranges(cfg):
    """Refuse a number out of its range. `not lo < x < hi` also refuses nan. inf: an lr of inf is no step size, and a
    timeout of inf minutes overflows the timedelta torchrun's process group takes."""
    counts = {k: getattr(cfg, k) for k in ("rollout_steps", "rank", "max_steps", "batch_size", "grad_accum")}
    for flag, value, ok, want in (
            *((f"--{k.replace('_', '-')}", v, v >= 1, "at least 1") for k, v in counts.items()),
            ("--lr", cfg.lr, cfg.lr is None or 0 < cfg.lr < math.inf, "a positive learning rate, e.g. 1e-4"),
            ("--alpha", cfg.alpha, 0 < cfg.alpha < math.inf, "a positive LoRA alpha (scale = alpha/rank), e.g. "
             "2 × --rank"),
            ("--preserve-weight", cfg.preserve_weight, 0 <= cfg.preserve_weight < math.inf, "0 or a positive weight"),
            ("--dist-timeout", cfg.dist_timeout, 0 < cfg.dist_timeout < math.inf, "a positive number of minutes")):
        if not ok:
            raise UserError(f"{flag} {value}: out of range; pass {want}")
    check_seed_and_size(cfg.seed, cfg.resolution)
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise UserError(f"--ema-decay must be in [0, 1] (got {cfg.ema_decay})")
    if cfg.loss_steps is not None and not 1 <= cfg.loss_steps <= cfg.rollout_steps:
        raise UserError(f"--loss-steps must be from 1 to --rollout-steps {cfg.rollout_steps} (got {cfg.loss_steps})")

def check_teacher_flags(cfg):
    """Refuse a --check-images / --teacher-start that cannot do what it says."""
    if cfg.check_images < 0:
        raise UserError(f"--check-images {cfg.check_images}: out of range; pass 0 (no check) or more")
    if cfg.teacher_start == "base" and not (cfg.init_lora and cfg.method == "dopsd"):
        raise UserError("--teacher-start base: the teacher starts at the base anyway without --init-lora (and SFT has "
                        "none); drop --teacher-start")
    if cfg.teacher_start == "auto" and cfg.init_lora and cfg.method == "dopsd" and not cfg.check_images:
        raise UserError("--teacher-start auto (the default) chooses with the teacher check: pass --check-images 1 or "
                        "more, or --teacher-start init or base")

def check_args(cfg):
    """Refuse impossible values, and a --resume that does not match --out, before anything is loaded. Returns cfg; on
    --resume with --fp8-base auto, the choice the run made (auto depends on free memory: another card would flip it)."""
    ckpt = find_checkpoint(cfg.out, cfg.full)
    other = find_checkpoint(cfg.out, not cfg.full)   # a LoRA run's file, or a --full run's folder
    check_out_path(cfg.out, "--out", folder=True)
    check_device(cfg.device)
    check_ranges(cfg)
    if cfg.loss_steps is not None and cfg.method != "dopsd":
        raise UserError("--loss-steps chooses roll-out states: it needs --method dopsd")
    if min(cfg.sample_every, cfg.save_every) < 0:
        raise UserError("--sample-every and --save-every must be 0 or positive")
    if cfg.resume and not (ckpt or other):
        raise UserError(f"--resume: no checkpoint in {cfg.out}; start without --resume")
    if not cfg.resume and (ckpt or other):
        raise UserError(f"--out {cfg.out} already holds a run; pass --resume to continue it or choose another --out")
    for flag, f in (("--sample-prompts", cfg.sample_prompts), ("--preserve-prompts", cfg.preserve_prompts)):
        if f and not Path(f).is_file():
            raise UserError(f"{flag} {f}: file not found; pass a text file with one prompt a line")
        if f and not read_text_file(f, flag).strip() and flag == "--preserve-prompts":    # (no held-out columns: fine)
            raise UserError(f"{flag} {f}: no prompts in it; write one prompt a line")
    if cfg.preserve_prompts and (cfg.full or cfg.method != "dopsd"):
        raise UserError("--preserve-prompts pulls a LoRA student onto the base model: it needs --method dopsd without "
                        "--full")
    check_teacher_flags(cfg)
    if cfg.init_lora and cfg.full:
        raise UserError("--init-lora continues a LoRA; to continue a --full run, pass its --out folder as --model")
    if Path(cfg.out).resolve() == Path(cfg.model).resolve():
        raise UserError(f"--out {cfg.out} is the --model folder: the run would overwrite the weights it reads; choose "
                        "another --out")
    if cfg.fp8_base == "on" and cfg.full:
        raise UserError("--fp8-base on with --full: the trained weights must stay in bf16 or fp32; drop --fp8-base "
                        "(LoRA runs can use it)")
    if cfg.fp8_base == "on" and cfg.grad_checkpointing == "off":
        raise UserError("--fp8-base on with --grad-checkpointing off: without checkpointing each linear keeps its "
                        "upcast weight for backward and the saving is gone; drop --grad-checkpointing off")
    if cfg.resume:
        saved = check_resume(ckpt or other, cfg)     # the other kind: says which flag differs
        if not ckpt:                                 # a --full checkpoint.pt of dopsd.py before checkpoint/ folders
            raise UserError(f"--resume: {other} was written by an older dopsd.py; train into a new --out with "
                            f"--model {other.parent} if it holds transformer/")
        if cfg.fp8_base == "auto" and saved.get("fp8_base") is not None:
            cfg = replace(cfg, fp8_base="on" if saved["fp8_base"] else "off")
            print(f"--fp8-base auto: {cfg.fp8_base}, as the run being resumed chose (its frozen base stays as it was)")
    return cfg

# --------------------------------------------------------------------------------------------------------------------
# feature cache
# Every encoder output lives on disk: one safetensors file per (image, caption variant) and per prompt, named by a hash
# of everything that shaped its tensors. A second run, a --resume or another rank reads it instead of re-encoding; an
# edited caption or image re-encodes that entry alone; another model or setting never matches an old entry. Training
# reads the entries of each batch by memory map, so neither device memory nor host RAM grows with the dataset.

CACHE_VERSION = 1             # bumped when what an entry holds changes; a new way to name the same files is not that
ENCODE_BATCH = 4              # captions per encoder call while caching: every layer's [4, 512, D] states are kept

def model_folder(repo, pipeline=True):
    """A local folder for a hub id or folder: the cached snapshot, downloaded first if need be (from_pretrained would
    download it a moment later anyway), so that the cache key can name the exact files."""
    if Path(repo).is_dir():
        return Path(repo)
    if pipeline:
        from diffusers import DiffusionPipeline
        return Path(DiffusionPipeline.download(repo))
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo))

def file_identity(f, samples=64, chunk=4096):
    """A name for one file's content that no copy, move or new download changes, read cheaply. In a hub snapshot a
    file is a link to blobs/<its sha256 (LFS) or git sha1>, the hub's own hash of every byte: nothing is read. Else a
    file under 1 MiB is hashed whole, a larger one by its size, its safetensors header (each tensor's name, dtype,
    shape and offsets) and 64 evenly spaced 4 KiB samples of the bytes after it, the first and last included. The
    samples because a header names a layout, which two fine-tunes of one model share byte for byte, while a retrain or
    a merge rewrites most bytes of every tensor it touches. A .bin or .gguf (no header read) gets size and samples.
    256 KiB a file: hashing an 8 GB encoder whole at every launch would take longer than loading it."""
    link = Path(os.readlink(f)) if f.is_symlink() else None
    if link is not None and link.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", link.name):
        return link.name                             # (one hop: blobs/<etag> may link on into a shared xet store)
    size = f.stat().st_size
    if size < 1 << 20:
        return hashlib.sha256(f.read_bytes()).hexdigest()
    h = hashlib.sha256(str(size).encode())
    with open(f, "rb") as fh:
        head = min(8 + int.from_bytes(fh.read(8), "little"), size, 1 << 27) if f.suffix == ".safetensors" else 0
        fh.seek(0)
        h.update(fh.read(head))
        for i in range(samples):
            fh.seek(head + i * max(size - head - chunk, 0) // (samples - 1))
            h.update(fh.read(chunk))
    return h.hexdigest()

def files_identity(folder, subfolders=("",)):
    """A short hash naming the files below folder/subfolders by their paths relative to folder and their contents
    (file_identity): neither where the folder lies nor any mtime enters it, so a copied, moved or re-downloaded model
    finds the entries its original wrote."""
    h = hashlib.sha256()
    for sub in subfolders:
        top = Path(folder) / sub
        files = [top] if top.is_file() else top.rglob("*")    # (a folder's own .cache: hub download metadata)
        for f in sorted(p for p in files if p.is_file() and ".cache" not in p.relative_to(folder).parts):
            h.update(f"{f.relative_to(folder).as_posix()}\0{file_identity(f)}\0".encode())
    return h.hexdigest()[:16]

def cache_plan(cache_dir, family, items, prompts, dopsd, encoders, vlm, suffix, dtype, buckets):
    """Where every entry lives: ({"items": [[entry per caption variant] per item], "prompts": {prompt: entry}}).
    An entry is (path, key): key is the JSON of everything that shaped its tensors -- the encoders' files (encoders,
    and vlm for the Z-Image teacher), the feature dtype, the image's bytes and bucket, the caption and the teacher
    setting -- and its hash names the file. The key is also stored inside the file: nothing is trusted without it."""
    def entry(**parts):
        key = json.dumps({"v": CACHE_VERSION, "family": family, "encoders": encoders, "dtype": str(dtype), **parts},
                         sort_keys=True)
        return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors", key
    teacher = ({"teacher": "vlm", "vlm": vlm, "context": VLM_CONTEXT} if family == "zimage" else
               {"teacher": "reference", "suffix": suffix}) if dopsd else {"teacher": "sft-latents"}
    return {"items": [[entry(image=it.digest, bucket=nearest_bucket(*it.size, buckets), caption=c, **teacher)
                       for c in it.captions] for it in items],
            "prompts": {p: entry(prompt=p) for p in prompts}}

def entry_ok(path, key):
    """True when path is a complete safetensors file written for exactly this key (a truncated file, a file from
    another dopsd version or a hash collision all read False)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("dopsd.key") == key
    except Exception:                                 # SafetensorError (truncated, garbage), OSError
        return False

def all_entries(plan):
    """[(path, key, job)] of every entry of the plan, in a fixed order; job: ("item", i, variant) or ("prompt", text)."""
    todo = [(p, k, ("item", i, v)) for i, es in enumerate(plan["items"]) for v, (p, k) in enumerate(es)]
    return todo + [(p, k, ("prompt", text)) for text, (p, k) in plan["prompts"].items()]

def missing_entries(plan):
    """all_entries() not on disk or not valid, each once. A file that exists but is invalid is named in a warning
    and re-encoded."""
    out = {}
    for p, k, job in all_entries(plan):
        if p not in out and not entry_ok(p, k):
            if p.exists():
                print(f"warning: cache entry {p} is truncated or corrupt (a crash or a full disk?): re-encoding it")
            out[p] = (p, k, job)
    return list(out.values())

def write_entry(path, key, tensors):
    """One entry, written beside its final name and renamed into place: readers see the old file or the whole new
    one, and two ranks or nodes writing the same entry cannot mix their bytes."""
    from safetensors.torch import save_file
    tmp = path.with_name(f"{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"dopsd.key": key})
        os.replace(tmp, path)
    except Exception as e:                            # a full disk (OSError; SafetensorError wraps it): the entries
        tmp.unlink(missing_ok=True)                   # written so far stay valid and are reused
        if not isinstance(e, OSError) and "I/O error" not in str(e):
            raise
        raise WriteFailed(f"--cache-dir {path.parent}: cannot write a cache entry ({io_reason(e)}); the entries "
                          "already written are kept and reused: free space (or pass another --cache-dir) and run the "
                          "same command again") from None

def read_entry(path, device):
    """An entry's tensors on `device`. safetensors maps the file (no copy until touched); on CUDA each tensor is
    pinned first, so the copy to the device is asynchronous."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in ts.items()}
    return {k: v.to(device) for k, v in ts.items()}

def entry_conds(family, e):
    """An entry's tensors -> (student conditioning, teacher conditioning or SFT's clean latents, or None), in the
    forms the family's velocity and collate() take."""
    s = e["s"] if family == "zimage" else (e["s"], None)
    if "t" in e:
        return s, e["t"] if family == "zimage" else (e["t"], e["ref"])
    return s, e.get("x0")                             # SFT's clean latents, or None for a prompt's entry

def read_json(path):
    """A JSON file's object, or {} when it is missing or unreadable (it is only ever a memo)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}

def write_json(path, obj):
    """Write a JSON file beside its final name, then rename it into place (ranks may write it at the same time)."""
    tmp = Path(path).with_name(f"{Path(path).name}.{os.uname().nodename}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)

def check_writable(folder, flag):
    """Create folder and prove a file can be written there, or stop with one line before any model loads."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / f".probe.{os.uname().nodename}.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror or type(e).__name__}); pass a writable "
                        f"folder with {flag}") from None

def cache_footprint(cache_dir, plan):
    """(bytes in the cache folder, its entry files the plan does not name): a stat per file, so that a cache grown
    by other models, settings or dopsd versions is seen at every launch, not when the disk fills."""
    planned = {p.name for p, _, _ in all_entries(plan)}
    files = [f for f in Path(cache_dir).iterdir() if f.is_file()]
    unused = sum(f.suffix == ".safetensors" and f.name not in planned for f in files)
    return sum(f.stat().st_size for f in files), unused

def plan_cache(cfg, family, items, prompts, dopsd, dtype, world):
    """(plan, this rank's share of the missing entries). Ranks on one node split the missing entries by local rank; on
    several nodes each node encodes its share for itself, which is right for a node-local --cache-dir and only
    repeats work (atomically) for a shared one."""
    encoders = files_identity(model_folder(full_run_parts(cfg.model)[0]),
                              ("model_index.json", "text_encoder", "tokenizer", "vae"))
    vlm = files_identity(model_folder(cfg.vlm, pipeline=False)) if family == "zimage" and dopsd else None
    plan = cache_plan(cfg.cache_dir, family, items, prompts, dopsd, encoders, vlm,
                      cfg.teacher_suffix or KLEIN_TEACHER_SUFFIX, dtype, make_buckets(cfg.resolution))
    todo = missing_entries(plan)
    local, local_world = (0, 1) if world == 1 else (int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    total = sum(map(len, plan["items"])) + len(plan["prompts"])
    size, unused = cache_footprint(cfg.cache_dir, plan)
    print(f"feature cache {cfg.cache_dir}: {total - len(todo)} of {total} entries found, {len(todo)} to encode; "
          + (f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB") + " on disk"
          + (f", {unused} entries not used by this run (other models or settings: delete the folder to clear them)"
             if unused else ""))
    # Each rank takes a fixed share of ALL the planned entries and encodes what of it is missing: ranks that scanned
    # the folder at different moments (one already writing) still leave no entry to nobody.
    share = {p for i, (p, _, _) in enumerate(all_entries(plan)) if i % local_world == local}
    mine = [t for t in todo if t[0] in share]
    if world > 1 and todo:
        print(f"rank {local}: encoding {len(mine)} of the {len(todo)} missing cache entries", file=sys.stderr)
    return plan, mine

def fill_cache(plan, mine, family, items, pipe, cfg, dopsd, dtype, device, show):
    """Encode this rank's share of the missing entries with the pipeline's encoders (and, for the Z-Image teacher,
    the hybrid VLM), then wait for every rank and check that the whole plan is on disk."""
    if mine:
        enc = SimpleNamespace(text_encoder=text_model(pipe.text_encoder).to(device).requires_grad_(False),
                              tokenizer=pipe.tokenizer,
                              vae=pipe.vae, dopsd=dopsd, dtype=dtype, suffix=cfg.teacher_suffix or KLEIN_TEACHER_SUFFIX)
        if dopsd and family == "zimage" and any(job[0] == "item" for _, _, job in mine):
            enc.vlm, enc.vtok, enc.vproc = load_hybrid_vlm(cfg.vlm, enc.text_encoder, dtype)
            enc.vlm.to(device)
        encode_missing(family, enc, mine, items, make_buckets(cfg.resolution), show)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()                  # every rank's share is written
    left = missing_entries(plan)
    if left:
        raise RuntimeError(f"{len(left)} feature cache entries are still missing after encoding (first: {left[0][0]})")

def encode_batch(family, enc, jobs, items, buckets):
    """Tensors for a batch of missing entries of one kind (prompts, or items of one bucket): the text features of all
    captions in one encoder call (bit-identical to one at a time on the CPU, where every caption is padded to the same
    length; cuBLAS may pick another kernel for another batch size, so on CUDA the last bits may depend on it). The
    VAE encodes one crop at a time: batched convolutions round differently (~1e-6 here), and a fixed-seed run must
    give the same LoRA whatever the batching. The Z-Image VLM runs one turn at a time (the turns differ in length, and
    padding them would move their RoPE positions). Returns [{name: tensor}]."""
    if jobs[0][0] == "prompt":
        return [{"s": _s(f)} for f in student_features(family, enc.text_encoder, enc.tokenizer, [j[1] for j in jobs])]
    its, caps = [items[j[1]] for j in jobs], [items[j[1]].captions[j[2]] for j in jobs]
    crops = [crop_to(load_rgb(it.path), *nearest_bucket(*it.size, buckets)) for it in its]   # decoded one batch at a time
    out = [{"s": _s(f)} for f in student_features(family, enc.text_encoder, enc.tokenizer, caps)]
    latents = lambda: [FAMILIES[family]["encode"](enc.vae, pil_to_tensor(im)[None])[0] for im in crops]  # [C, h, w]
    if not enc.dopsd:                                 # SFT regresses onto the clean latents
        return [{**o, "x0": z} for o, z in zip(out, latents())]
    if family == "zimage":                            # teacher: the hybrid VLM sees [image, caption]
        ctx = [vlm_features(enc.vlm, enc.vtok, enc.vproc, im, c).to(enc.dtype) for im, c in zip(crops, caps)]
        warn_long("teacher context (template + image + caption)", [(it.path, 0) for it in its], map(len, ctx),
                  VLM_CONTEXT)
        return [{**o, "t": c[:VLM_CONTEXT]} for o, c in zip(out, ctx)]
    texts = [f"{c} {enc.suffix}" for c in caps]       # klein teacher: caption + instruction, image as reference tokens
    warn_long("teacher text (caption + instruction)", [(it.path, 0) for it in its],
              prompt_tokens(enc.tokenizer, texts, False), klein_text_len(enc.tokenizer), "the encoder's ")
    t = student_features(family, enc.text_encoder, enc.tokenizer, texts)
    return [{**o, "t": _s(f), "ref": r} for o, f, r in zip(out, t, latents())]

def _s(features):
    """Student features as stored: Z-Image's [L_i, D] as is, klein's (prompt_embeds [L, 3D], None) -> [L, 3D]."""
    return features if torch.is_tensor(features) else features[0]

def encode_missing(family, enc, todo, items, buckets, show=True):
    """Encode and write the entries in todo ([(path, key, job)]), in batches of ENCODE_BATCH that share a kind and a
    bucket, behind one progress bar."""
    from tqdm import tqdm
    groups = {}
    for p, k, job in todo:                            # prompts together; items by bucket (one crop size per batch)
        kind = "prompt" if job[0] == "prompt" else nearest_bucket(*items[job[1]].size, buckets)
        groups.setdefault(str(kind), []).append((p, k, job))
    its = [(items[j[1]].path, items[j[1]].captions[j[2]]) for _, _, j in todo if j[0] == "item"]
    limit = klein_text_len(enc.tokenizer) if family == "klein" else 512
    warn_long("caption", its, prompt_tokens(enc.tokenizer, [c for _, c in its], family == "zimage"), limit,
              "the encoder's ")
    with tqdm(total=len(todo), desc="caching features", unit="entry", dynamic_ncols=True, disable=not show) as bar:
        for chunk in [g[b:b + ENCODE_BATCH] for g in groups.values() for b in range(0, len(g), ENCODE_BATCH)]:
            for (p, k, _), tensors in zip(chunk, encode_batch(family, enc, [j for _, _, j in chunk], items, buckets)):
                write_entry(p, k, tensors)
            bar.update(len(chunk))

def attach_roles(dit, family, dopsd, full, rank, alpha, seed, autocast, init=None, anchor=False, mesh=None,
                 compute_dtype=torch.float32, teacher_start="init"):
    """The two roles on one DiT -> (student, teacher, trainable, teacher_params); student: (model, x, σ, cond) -> u,
    teacher: (x, σ, cond, adapter="teacher") -> u. LoRA: adapters "student" and "teacher" (an exact copy at first),
    both set to `init` (read_lora_file's factors) if given; teacher_start="base" then starts the teacher at the bare
    base instead (teacher_from_base). anchor: a third, frozen adapter "anchor" holding `init`,
    the model the run started from, for --preserve-prompts to pull onto (fusing it into the base instead would change
    the teacher's base as well, and cannot work on an fp8 base). --full: the DiT itself is the student, and a frozen
    fp32 deep copy the EMA teacher (in bf16 its 1e-4 EMA increments would round away). mesh (--full under torchrun):
    the DiT comes sharded with FSDP2 over it (shard_across_ranks) and the teacher is sharded alike; the lists then
    hold this rank's shards (DTensors)."""
    if full:
        teacher_model, layers = None, None           # no LoRA layers: use_adapter does nothing
        if dopsd:
            teacher_model = copy.deepcopy(dit).eval() if mesh is None else sharded_copy(dit, mesh, compute_dtype)
        trainable = list(dit.requires_grad_(True).parameters())
        teacher_params = list(teacher_model.parameters()) if dopsd else []
    else:
        torch.manual_seed(seed)                      # LoRA's A factors are drawn from the global RNG
        names = ("student",) + ("teacher",) * dopsd + ("anchor",) * anchor
        n = add_lora_adapters(dit, LORA_TARGETS[family], rank, alpha, names)
        if init:
            set_lora(dit, init, names, alpha / rank)
            if dopsd and teacher_start == "base":
                teacher_from_base(lora_layers(dit))
        st = adapter_params(dit, "student")
        trainable, teacher_model, layers = list(st.values()), dit, lora_layers(dit)
        teacher_params = [adapter_params(dit, "teacher")[k] for k in st] if dopsd else []
        print(f"LoRA: {n} linears wrapped (every attention and feed-forward linear), "
              f"{sum(p.numel() for p in trainable):,} trainable parameters")
    velocity = FAMILIES[family]["velocity"]

    # Autocast wraps each forward, not the backward (PyTorch advises against backward inside the region). The teacher
    # hands the DiT back with the student adapter active: a student backward after a teacher switch would find its
    # LoRA frozen and silently collect no gradient. `model` is the DiT, or its DDP wrapper.
    def student(model, x, s, c):
        use_adapter(layers, "student")
        with autocast():
            return velocity(model, x, s, c)

    def teacher(x, s, c, adapter="teacher"):        # adapter=None: the base model, for --preserve-prompts
        use_adapter(layers, adapter, trainable=False)
        with autocast():
            u = velocity(teacher_model, x, s, c)
        use_adapter(layers, "student")
        return u
    return student, teacher, trainable, teacher_params

# --------------------------------------------------------------------------------------------------------------------
# --full under torchrun: FSDP2
# DDP would replicate the fp32 DiT, its fp32 EMA copy, gradients and AdamW's two moments on every GPU (~22 bytes a
# parameter: 129 GiB for Z-Image-Turbo). FSDP2 (torch's fully_shard) keeps 1/N of each on each rank and gathers one
# block at a time for compute. Ranks must then run the same forwards in the same order: the grids are drawn by all of
# them, and checkpoints and transformer/ are written by all of them (torch.distributed.checkpoint, one tensor at a time).

def shard_dit(dit, mesh, compute_dtype):
    """FSDP2 over `mesh`, in place: each repeated transformer block is one unit, the root (embedders, final layer)
    one more, so beside its shards a rank holds at most one block's gathered weights (and the root's). The shards stay
    fp32 (AdamW and the EMA update them in place; in bf16 a 1e-4 EMA step would round away), gradients are
    reduce-scattered in fp32 (a bf16 mean over 8 ranks would drop their low bits), and the gathered copies are what
    one process computes with under autocast: in bf16, each linear's weight and bias in bf16 (autocast's cast for
    F.linear), all else in fp32 (norm weights, pad tokens; gathered in bf16, diffusers' RMSNorm drops its input to
    bf16, and Z-Image's velocity moved by 0.8 %). cast_forward_inputs=False: autocast picks the activations' dtypes
    as in one process (the policy's cast would turn Z-Image's fp32 timestep into bf16). Every unit reshards after its
    forward, the root too: left gathered after a no_grad forward (the teacher, a grid), it would keep stale copies
    that miss the next optimizer or EMA step."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    policy = lambda dt: MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # One policy per unit, so in bf16 a unit's linears are a nested unit of their own. Its cost (Z-Image-Turbo's
    # config): one more all-gather and reduce-scatter per block, of 61 KiB beside the linears' 345 MiB. Gathering all
    # in fp32 for autocast to cast would double the all-gather bytes and the gathered block (690 MiB + 345 MiB of
    # casts), and autocast's weight cache would keep the bf16 cast of every trainable weight until the velocity call
    # returns: the whole DiT (11.5 GiB) on every rank, whatever N.
    blocks = [m for m in dit.modules() if type(m).__name__ in dit._repeated_blocks]   # before sharding renames them
    for unit in blocks + [dit]:                      # bottom-up: a unit takes the parameters no inner unit took
        linears = [m for m in unit.modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, FSDPModule)]
        if compute_dtype != torch.float32 and linears:
            fully_shard(linears, mesh=mesh, mp_policy=policy(compute_dtype))      # one all-gather for all of them
        fully_shard(unit, mesh=mesh, mp_policy=policy(None), reshard_after_forward=True)
    # Z-Image's final linear returns a view, and FSDP2 warns that an in-place op on it would skip its backward
    # all-gather; nothing writes to it (the 2-rank tests compare the gradients)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return dit

def shard_across_ranks(dit, device, world, compute_dtype):
    """Shard the student DiT over every rank (FSDP2) and return the mesh. Only rank 0 loaded its weights (the others
    hold dit_on_meta's): rank 0 sends them tensor by tensor and each rank keeps its shard, so the host RAM of one
    node holds one fp32 DiT at start-up, not one per rank (8 ranks: 8 × 23 GiB for Z-Image)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))   # 1-D: every rank of the job, on its own device
    on_meta = next(dit.parameters()).is_meta
    print(f"sharded: FSDP2 over {world} ranks (the DiT, its EMA teacher, gradients and AdamW: 1/{world} each)")
    full = {} if on_meta else dit.state_dict()       # rank 0: the loaded weights (references, no copy)
    shard_dit(dit.requires_grad_(True), mesh, compute_dtype)
    if on_meta:
        dit.to_empty(device=device)                  # storage for this rank's shards, filled by the broadcast
    set_model_state_dict(dit, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return mesh

def dit_on_meta(model):
    """--model's DiT built from its config on the meta device (no weights, no memory): what ranks > 0 shard."""
    import diffusers
    base, trained = full_run_parts(model)
    name = read_json(trained / "config.json")["_class_name"] if trained else \
        diffusers.DiffusionPipeline.load_config(base)["transformer"][1]
    cls = getattr(diffusers, name)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(trained or base, subfolder=None if trained else "transformer"))

def sharded_copy(dit, mesh, compute_dtype):
    """A frozen copy of the sharded DiT `dit`, sharded alike: built on the meta device (no memory), given storage for
    its shards only, then filled shard by shard from dit's. No rank ever holds a second full model (copy.deepcopy of
    the unsharded DiT would cost every rank 4 bytes a parameter of host RAM; a sharded module cannot be copied)."""
    dit_class = next(c for c in type(dit).__mro__ if c.__name__ in DIT_FAMILY)     # FSDP<Name> -> Name
    with torch.device("meta"):
        twin = dit_class.from_config(dit.config).requires_grad_(False).eval()
    shard_dit(twin, mesh, compute_dtype).to_empty(device=mesh.device_type)
    with torch.no_grad():                            # in place: FSDP gathers from the shards' own storage
        for t, s in zip([*twin.parameters(), *twin.buffers()], [*dit.parameters(), *dit.buffers()], strict=True):
            local_shard(t).copy_(local_shard(s))
    return twin

def local_shard(t):
    """The part of t this rank holds: a DTensor's local shard, or t itself."""
    return t.to_local() if hasattr(t, "to_local") else t

def wrap_ddp(dit, device):
    """PyTorch's own DDP, which averages the student's gradients across ranks in backward. The frozen weights skip its
    start-up broadcast: every rank loads the same files and seeds the LoRA alike (ranks_agree() checks). With
    gradient_as_bucket_view the gradients live in DDP's buckets, not beside them (a second copy: 25 GB for --full
    Z-Image); hence zero_grad(set_to_none=False) under DDP."""
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        dit, [n for n, p in dit.named_parameters() if not p.requires_grad])
    return DistributedDataParallel(dit, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, gradient_as_bucket_view=True)

# --------------------------------------------------------------------------------------------------------------------
# grids and checkpoints
# What a run leaves behind: sample grids and loss.png, an atomic checkpoint (checkpoint.pt, or checkpoint/ for --full)
# and the deliverable (the LoRA with its metadata, or transformer/), and reading them back for --resume.

def draw_row(velocity, conds, preview, decode, vae, autocast):
    """One grid row: velocity (x, σ, cond) -> u, sampled on the deploy schedule from each column's fixed noise, with
    that column's conditioning (conds: one per column; fewer leave the last columns empty)."""
    with autocast():
        images = [decode(vae, euler_sample(lambda x, s: velocity(x, s, collate([c])), noise.to(vae.device),
                                           preview.sigmas))[0] for noise, c in zip(preview.noise, conds)]
    return images + [None] * (len(preview.noise) - len(images))

def save_grid(rows, captions, path, label_width=112):
    """rows: [(label, [PIL or None])] -> one PNG, columns = prompts with their captions wrapped above, written
    atomically. Small images are enlarged; None leaves a cell white (the teacher has no image for a held-out prompt)."""
    import textwrap
    from PIL import Image, ImageDraw
    first = next(im for _, images in rows for im in images if im is not None)
    zoom = max(1, 128 // first.width)
    w, h = first.width * zoom, first.height * zoom
    lines = [textwrap.wrap(cap, max(8, w // 6))[:12] for cap in captions]   # the default font is ~6 px a character
    top = 8 + 11 * max(map(len, lines))
    grid = Image.new("RGB", (label_width + w * len(captions), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(lines):
        draw.multiline_text((label_width + j * w + 2, 4), "\n".join(text), fill="black", spacing=1)
    for i, (label, images) in enumerate(rows):
        draw.text((4, top + i * h + h // 2 - 6), label, fill="black")
        for j, im in enumerate(images):
            if im is not None:
                grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (label_width + j * w, top + i * h))
    save_image(grid, path)

def save_image(im, path):
    """Save a PIL image in the format its extension names (PNG if none), atomically (atomic_write)."""
    from PIL import Image
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    atomic_write(path, lambda f: im.save(f, format=fmt))

def atomic_write(path, write):
    """write(f) into path.tmp, flush it to disk, then rename it onto path: a crash mid-write leaves the previous file
    intact, and a failed write (a full disk) leaves no partial file behind."""
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

def atomic_torch_save(obj, path):
    """torch.save(obj, path), atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))

def sample_grid(run):
    """The base, student and (D-OPSD) teacher rows on the fixed noise -> samples/step_NNNNNN.png, and the loss curve so
    far -> loss.png, by rank 0. The teacher has an image only for the training columns. A sharded DiT needs every rank
    in its forwards: they all draw the same grid (same noise, same prompts), rank 0 writes it."""
    if run.rank > 0 and not run.sharded:
        return
    p = run.preview
    row = lambda v, conds: draw_row(v, conds, p, FAMILIES[run.family]["decode"], run.vae, run.autocast)
    rows = [(p.start_label, p.base), ("student", row(lambda x, s, c: run.student(run.model, x, s, c), p.cond_s))]
    if run.cfg.method == "dopsd":
        rows.append(("teacher+image", row(run.teacher, p.cond_t)))
    if run.rank > 0:
        return
    try:                                             # a grid is worth no run: a full disk warns here, and the
        save_grid(rows, p.captions, run.out / "samples" / f"step_{run.step:06d}.png")    # next save stops the run
        save_loss_curve(run.out / "log.jsonl", run.out / "loss.png")
    except OSError as e:
        print(f"warning: could not write the step {run.step} grid or loss.png in {run.out} ({io_reason(e)}); "
              "training goes on")

def save_loss_curve(log_path, png_path, size=(480, 200), margin=30):
    """log.jsonl -> a small PNG of the loss against the step, drawn with PIL (no plotting library)."""
    from PIL import Image, ImageDraw
    with open(log_path) as f:
        last = {r["step"]: r["loss"] for r in map(json.loads, f)}   # after a resume a step may be logged twice
    pts = [(s, v) for s, v in sorted(last.items()) if math.isfinite(v)]
    if len(pts) < 2:
        return
    (s0, lo), (s1, hi) = (pts[0][0], min(v for _, v in pts)), (pts[-1][0], max(v for _, v in pts))
    (W, H), m = size, margin
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.line([(m + (s - s0) / max(s1 - s0, 1) * (W - 2 * m), H - m - (v - lo) / max(hi - lo, 1e-12) * (H - 2 * m))
               for s, v in pts], fill="black")
    draw.text((4, 4), f"loss, max {hi:.4g}", fill="gray")
    draw.text((4, H - m + 6), f"min {lo:.4g}   steps {s0} to {s1}", fill="gray")
    save_image(im, png_path)

def io_reason(e):
    """'No space left on device' from an OSError, or from safetensors' SafetensorError, which wraps the OS error."""
    m = re.search(r"I/O error: (.*?) \(os error", str(e))
    return getattr(e, "strerror", None) or (m.group(1) if m else (str(e).splitlines() or [type(e).__name__])[0])

def save_run(run):
    """checkpoint.pt (everything --resume needs) and the LoRA, both atomic, by rank 0 once every rank has checked
    that all hold the same weights. Non-finite weights are never written. --full: save_full_run (sharded ranks hold
    different parts, so there is nothing for ranks_agree to compare; FSDP2's collectives keep them one model)."""
    if run.cfg.full:
        return save_full_run(run)
    if run.world > 1 and not ranks_agree(run.trainable + run.teacher_params):
        raise RuntimeError("ranks hold different weights: distributed training went out of sync")
    if run.rank == 0 and run.world > 1:
        print(f"ranks in sync: {run.world} ranks hold identical student and teacher weights")
    raise_on_every_rank(write_run(run) if run.rank == 0 else None, run)

def raise_on_every_rank(failed, run):
    """Raise `failed` (a WriteFailed or None) on every rank if any rank failed: the others wait for the write and must
    not train on alone. A rank that did not fail itself raises a line that points at the one that did."""
    if run.world > 1:
        import torch.distributed as dist
        flag = torch.tensor(float(failed is not None), device=run.device)
        dist.all_reduce(flag)
        if flag.item() and not failed:
            failed = WriteFailed(f"another rank could not write the run's files in {run.out} (rank 0's message says "
                                 "why and what is intact)")
    if failed:
        raise failed

def write_run(run):
    """Rank 0's part of save_run: the files, each written beside its old version and swapped in. Returns None or the
    WriteFailed to raise on every rank."""
    from safetensors import SafetensorError
    ckpt, lora = run.out / "checkpoint.pt", run.out / "pytorch_lora_weights.safetensors"
    if not all(torch.isfinite(p).all() for p in run.trainable):
        print("error: weights are not finite; nothing saved, the previous checkpoint is kept", file=sys.stderr)
        return None
    # A write that fails (a full disk) leaves the previous file in place and no partial one: one line, exit 1.
    state = {"step": run.step, "config": asdict(run.cfg), "nonfinite": run.nonfinite, "world_size": run.world,
             "student": [p.detach().cpu() for p in run.trainable], "optimizer": run.opt.state_dict(),
             "teacher": [p.detach().cpu() for p in run.teacher_params], "fp8_base": run.fp8,
             "init_lora_sha256": run.init_sha}          # the start model, which --resume checks (check_same_start)
    try:
        atomic_torch_save(state, ckpt)
    except OSError as e:
        return checkpoint_failed(run, ckpt, e, kept=ckpt.is_file())
    run.saved_step = run.step
    try:
        save_lora(run.dit, run.pipe_cls, "student", LORA_TARGETS[run.family], lora,
                  lora_card(run.cfg, run.family, run.step))
    except (OSError, SafetensorError) as e:
        return WriteFailed(f"could not write {lora} at step {run.step} ({io_reason(e)}); {ckpt} (step {run.step}) is "
                           "written" + (f" and the previous {lora.name} is intact" if lora.exists() else "") +
                           f": free space, then run again with --resume to write {lora.name}")
    return None

def checkpoint_failed(run, path, e, kept):
    """The WriteFailed for a checkpoint that could not be written (OSError e); kept: the previous one is still there."""
    return WriteFailed(f"could not write {path} at step {run.step} ({io_reason(e)}); " + (
        f"the previous checkpoint{f' (step {run.saved_step})' if run.saved_step else ''} there is intact: free space, "
        "then continue with --resume" if kept else "no checkpoint had been saved yet: free space and train again"))

def save_full_run(run):
    """--full: checkpoint/ (torch.distributed.checkpoint: each rank writes its own shards into checkpoint.tmp/, then
    rank 0 adds meta.json, and the folder is complete once it is there) and transformer/ (gathered one tensor at a
    time); every rank takes part in both. Each is written beside its previous version and swapped in, so a crash or a
    killed rank mid-save leaves the previous one loadable. Non-finite weights are never written."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    ckpt, tmp, failed = run.out / "checkpoint", run.out / "checkpoint.tmp", None
    finite = torch.tensor(float(all(bool(torch.isfinite(local_shard(p)).all()) for p in run.trainable)),
                          device=run.device)         # this rank's shards; then all ranks' (MIN)
    if run.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        print("error: weights are not finite; nothing saved, the previous checkpoint is kept", file=sys.stderr)
        return
    if run.rank == 0:                                # torch's writer expects an empty folder (it overwrites in place)
        shutil.rmtree(tmp, ignore_errors=True)
    if run.world > 1:
        dist.barrier()
    try:
        with warnings.catch_warnings():              # one process: torch warns that it saves without a group
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            dcp.save(full_state(run), checkpoint_id=str(tmp))   # returns on every rank once all shards are written
        if run.rank == 0:
            write_json(tmp / "meta.json", {"step": run.step, "config": asdict(run.cfg), "nonfinite": run.nonfinite,
                                           "world_size": run.world})
            swap_in(tmp, ckpt)
    except (OSError, CheckpointException) as e:
        failed = checkpoint_failed(run, ckpt, e, kept=find_checkpoint(run.out, True) is not None)
    raise_on_every_rank(failed, run)
    run.saved_step = run.step
    failed = export_dit(run.dit, run.out / "transformer", run.rank)
    raise_on_every_rank(failed and WriteFailed(
        f"could not write {run.out / 'transformer'} at step {run.step} ({io_reason(failed)}); {ckpt} (step "
        f"{run.step}) is written: free space, then run again with --resume to write transformer/"), run)

def full_state(run):
    """What a --full checkpoint holds, as the live tensors (dcp.load fills them in place): the student's and the EMA
    teacher's weights by parameter name, and AdamW's state keyed by parameter name too (torch's own mapping, the same
    sharded or not): so N ranks' shards load into any other number of ranks, or one process."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    names = [n for n, _ in run.dit.named_parameters()]
    state = {"student": {n: p.detach() for n, p in zip(names, run.trainable, strict=True)},
             "optimizer": get_optimizer_state_dict(run.dit, run.opt)}
    if run.teacher_params:
        state["teacher"] = {n: p.detach() for n, p in zip(names, run.teacher_params, strict=True)}
    return state

def swap_in(new, path):
    """Replace the folder `path` by the complete folder `new`, so that a kill at any point leaves a complete one where
    find_checkpoint looks: path/ if it exists, else path.old/. path/ only ever appears by this rename of a complete
    folder, so it is complete whenever it exists; path.old/ is cleared and refilled only while path/ exists, and with
    path/ missing (a save that died between the renames) it is the only complete one, kept until `new` is path/."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        remove_folder(old)                           # a leftover (path/ is complete): nothing reads it
        os.replace(path, old)
    os.replace(new, path)
    remove_folder(old)

def remove_folder(folder):
    """Delete `folder` so that no reader ever sees it half-deleted (meta.json left beside a few of ~100 GB of shards):
    it is renamed to folder.del/ (one atomic step, and nothing reads .del), then deleted; the next call clears what a
    kill mid-deletion left there."""
    trash = folder.with_name(folder.name + ".del")
    shutil.rmtree(trash, ignore_errors=True)
    if folder.exists():
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

def export_layout(state, dtype, file_bytes):
    """(file names, [keys per file], {key: bytes}) of save_pretrained's layout for `state` with its floating-point
    tensors in `dtype`: files of at most file_bytes, in key order, named as diffusers names them. From the global
    shapes, so every rank computes the same layout without gathering anything."""
    nbytes = {k: v.numel() * (dtype.itemsize if v.is_floating_point() else v.element_size()) for k, v in state.items()}
    files, size = [[]], 0
    for k in state:
        if files[-1] and size + nbytes[k] > file_bytes:
            files, size = files + [[]], 0
        files[-1].append(k)
        size += nbytes[k]
    names = ["diffusion_pytorch_model.safetensors"] if len(files) == 1 else [
        f"diffusion_pytorch_model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    return names, files, nbytes

def export_dit(dit, folder, rank, file_bytes=2 * 2**30, dtype=torch.bfloat16):
    """The DiT in save_pretrained's format (config.json, with the DiT's own class name: a sharded module's class is
    FSDP<Name>; safetensors files of at most file_bytes, with diffusers' names and index), written by rank 0 into
    folder.tmp and swapped in. Floating-point tensors in `dtype`: bf16, as every reader loads it (half of fp32: 12.3
    GB for Z-Image); the fp32 weights stay in checkpoint/ for --resume. Each tensor is cast where it lies, then
    gathered in turn (a collective: every rank calls this), and the other ranks drop it at once: none holds more than
    one full tensor beside its shards, rank 0 at most one file's worth. Returns None, or the OSError that stopped rank
    0's writing."""
    from safetensors.torch import save_file
    state = dit.state_dict()                         # FSDP2: DTensors (its state_dict hook reshards first)
    cast = lambda v: v.to(dtype) if v.is_floating_point() else v               # integer and bool buffers as they are
    names, files, nbytes = export_layout(state, dtype, file_bytes)
    tmp, failed = folder.with_name(folder.name + ".tmp"), None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, keys in zip(names, files):
        part = {}
        for k in keys:
            v = cast(state[k].detach())              # a sharded DTensor casts its local shard: half the all-gather
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            if rank == 0:
                part[k] = v.to("cpu").contiguous()
        if rank == 0 and not failed:
            try:
                tmp.mkdir(parents=True, exist_ok=True)
                save_file(part, tmp / name, metadata={"format": "pt"})
            except OSError as e:
                failed = e
        del part
    if rank == 0 and not failed:
        try:
            config = json.loads(dit.to_json_string())
            config["_class_name"] = next(c for c in type(dit).__mro__ if c.__name__ in DIT_FAMILY).__name__
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if len(files) > 1:
                index = {"metadata": {"total_size": sum(nbytes.values())},
                         "weight_map": {k: n for n, ks in zip(names, files) for k in ks}}
                (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            swap_in(tmp, folder)
        except OSError as e:
            failed = e
    if failed:                                       # rank 0: the previous folder stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
    return failed

def save_lora(transformer, pipe_cls, adapter, target_regex, path, card):
    """One adapter as a diffusers LoRA file that every loader applies at its trained strength. diffusers scales B·A by
    the metadata's lora_alpha/r; ComfyUI reads no metadata and applies B·A at strength 1.0 (a per-module .alpha tensor
    would tell it, but breaks diffusers' loader for both families). So B is written times alpha/r with lora_alpha = r:
    the same delta in both. `card`: extra metadata for LoRA browsers. checkpoint.pt keeps the factors as trained."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    lora_cfg, tmp = transformer.peft_config[adapter], Path(str(path) + ".d")
    layers = {k: v * (lora_cfg.lora_alpha / lora_cfg.r) if ".lora_B." in k else v
              for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter).items()}
    try:                                             # everything is written into tmp, then one rename
        pipe_cls.save_lora_weights(tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata={
            **lora_cfg.to_dict(), "lora_alpha": lora_cfg.r, "target_modules": target_regex})
        with safe_open(tmp / "pytorch_lora_weights.safetensors", "pt") as f:    # diffusers' header, plus the card
            meta = {**f.metadata(), **card}
        save_file(load_file(tmp / "pytorch_lora_weights.safetensors"), tmp / "with_card", metadata=meta)
        os.replace(tmp / "with_card", path)
    finally:                                         # also after a failed write: no partial file stays behind
        shutil.rmtree(tmp, ignore_errors=True)

def lora_card(cfg, family, step):
    """What LoRA browsers show: ModelSpec keys (github.com/Stability-AI/ModelSpec) where one fits, else dopsd.*. No
    date, so that a fixed-seed run writes the same file every time."""
    fam, base = FAMILIES[family], Path(cfg.model).name if Path(cfg.model).is_dir() else cfg.model  # no local paths
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{fam['arch']}/lora",
            "modelspec.implementation": "diffusers", "modelspec.title": Path(cfg.out).name,
            "modelspec.description": f"{cfg.method} LoRA for {base}, {step} steps (dopsd.py)",
            "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
            "modelspec.trigger_phrase": cfg.trigger or "[V]",
            "modelspec.usage_hint": f"{fam['deploy']} steps, no CFG; strength 1.0 = as trained",
            "dopsd.base_model": base, "dopsd.deploy_steps": str(fam["deploy"]),
            "dopsd.trained_rank_alpha": f"{cfg.rank}/{cfg.alpha:g} (folded into lora_B; lora_alpha = rank here)"}

def check_resume(path, cfg, ckpt=None):
    """Refuse a --resume whose setup differs from the checkpoint's. check_args calls it before anything loads, with
    mmap=True: that reads the pickled dict and maps the tensors without reading them. Another number of ranks is
    fine when the global batch (--batch-size × ranks) is the same: the run then sees the batches it would have.
    Returns the checkpoint's dict (checkpoint/: its meta.json)."""
    try:
        if Path(path).is_dir():                      # a --full run's checkpoint/ folder
            ckpt = json.loads((Path(path) / "meta.json").read_text())
        else:
            ckpt = ckpt or torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        was, was_world = ckpt["config"], ckpt.get("world_size")     # (older checkpoint.pt files: no world_size)
    except Exception as e:                           # torch.load raises one of several types on a damaged file
        raise UserError(f"--resume: cannot read {path} ({type(e).__name__}); it is damaged or not a dopsd.py "
                        "checkpoint: train into a new --out") from None
    world, was_global = int(os.environ.get("WORLD_SIZE", "1")), was["batch_size"] * (was_world or 1)
    if was_world and was_global != cfg.batch_size * world:
        fix = f"--batch-size {was_global // world}" if was_global % world == 0 else f"{was_world} ranks"
        raise UserError(f"--resume: the global batch was --batch-size {was['batch_size']} × {was_world} rank(s) in "
                        f"{path}, now {cfg.batch_size} × {world}; pass {fix} for the same global batch")
    for k in ("model", "method", "rank", "alpha", "full", "grad_accum", "seed", "rollout_steps") + (
            () if was_world else ("batch_size",)):
        if was[k] != getattr(cfg, k):
            raise UserError(f"--resume: --{k.replace('_', '-')} was {was[k]!r} in {path}, now {getattr(cfg, k)!r}; "
                            "use the same value")
    check_same_start(path, ckpt, cfg)
    return ckpt

def file_sha256(path):
    """The sha256 of a file's bytes, or None when there is no such file."""
    if not (path and Path(path).is_file()):
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def check_same_start(path, ckpt, cfg):
    """Refuse a --resume whose start model differs from the run's: an --init-lora with other content (the anchor
    --preserve-prompts pulls onto is rebuilt from that file, and a retrained runs/a has the same path), or an explicit
    --fp8-base other than the base the run trained on. Checkpoints before the sha256 was recorded compare the path."""
    was, sha, fp8 = ckpt["config"].get("init_lora"), ckpt.get("init_lora_sha256"), ckpt.get("fp8_base")
    now = lora_file_of(cfg.init_lora) if cfg.init_lora else None
    now_sha = file_sha256(now)
    if (now_sha != sha) if sha else (was != (str(now) if now else None)):
        said = f"now {cfg.init_lora}" + (f" (sha256 {now_sha[:12]})" if now_sha else "") if now else "now none"
        raise UserError(f"--resume: the run in {path} started from --init-lora {was}" + (f" (sha256 {sha[:12]})" if sha
                        else "") + f", {said}; pass the LoRA file it started from, unchanged")
    if fp8 is not None and cfg.fp8_base != "auto" and (cfg.fp8_base == "on") != fp8:
        raise UserError(f"--resume: the run in {path} trained on a {'float8' if fp8 else 'bf16/fp32'} base, now "
                        f"--fp8-base {cfg.fp8_base}; pass --fp8-base {'on' if fp8 else 'off'} or leave it at auto")

def find_checkpoint(out, full):
    """The run's checkpoint in `out`, or None: checkpoint.pt for LoRA runs (one small file from rank 0); for --full
    the folder checkpoint/ of torch.distributed.checkpoint shards (~16 bytes a parameter in all, every rank writing its
    own), or checkpoint.old/ when a save died between its two renames (swap_in keeps one of the two complete). Never
    checkpoint.tmp/, even complete (meta.json is written last): every save starts by emptying it for torch's writer,
    so a run resumed from there would delete its only checkpoint at its first save."""
    if not full:
        return Path(out) / "checkpoint.pt" if (Path(out) / "checkpoint.pt").is_file() else None
    return next((p for p in (Path(out) / "checkpoint", Path(out) / "checkpoint.old") if (p / "meta.json").is_file()),
                None)

def load_run(path, run):
    """Restore the student, the EMA teacher, AdamW and the step counters into `run`, refusing a changed setup: from
    checkpoint.pt, or (--full) from the checkpoint/ folder whatever number of ranks wrote it: each rank reads the parts
    of the saved shards that overlap its own."""
    cfg = run.cfg
    saved = check_resume(path, cfg, None if cfg.full else torch.load(path, map_location="cpu", weights_only=True))
    if cfg.full:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        state = full_state(run)
        with warnings.catch_warnings():              # one process: torch warns that it loads without a group
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(run.dit, run.opt, state["optimizer"])
    else:
        with torch.no_grad():
            for p, v in zip(run.trainable + run.teacher_params, saved["student"] + saved["teacher"]):
                p.copy_(v)
        run.opt.load_state_dict(saved["optimizer"])
    for group in run.opt.param_groups:               # both restore the old lr: --lr (logged) wins
        group["lr"] = cfg.lr
    run.step, run.nonfinite = saved["step"], saved["nonfinite"]
    print(f"resumed from {path} at step {run.step}"
          + (f" (written by {saved['world_size']} rank(s))" if cfg.full else ""))

# --------------------------------------------------------------------------------------------------------------------
# the training run
# train() checks everything it can before a model loads, train_rank() sets one process up, and train_loop() is the
# algorithm box; micro_step() is one batch's roll-out with teacher scoring and backward.

@dataclass(eq=False)
class TrainingRun:
    """What train_rank sets up and the loop, the grids and the checkpoints read: one object, its fields named here."""
    cfg: TrainConfig
    family: str                      # "zimage" or "klein"
    rank: int                        # this process, of `world` (1 without torchrun); rank 0 writes the files
    world: int
    device: torch.device
    out: Path                        # --out
    cache: object                    # loop_cache(): the feature cache's entry paths and the epoch order
    dit: torch.nn.Module             # the DiT (sharded under FSDP2), holding both roles
    model: torch.nn.Module           # what the student runs: the DiT, or its DDP wrapper
    pipe_cls: type                   # the diffusers pipeline class (a LoRA file's key prefix)
    vae: torch.nn.Module
    autocast: object                 # a context manager factory: bf16 autocast on an accelerator
    preview: object                  # the sample grid's fixed noise, conditioning and base row
    student: object                  # attach_roles()'s callables
    teacher: object
    trainable: list                  # the student's parameters (AdamW's)
    teacher_params: list             # the EMA teacher's, in the same order
    opt: torch.optim.Optimizer
    anchor: str = None               # the adapter --preserve-prompts pulls onto (None: the bare base)
    init_sha: str = None             # sha256 of the --init-lora file the run started from
    fp8: bool = False                # the frozen base is stored in float8 (the --fp8-base choice, kept on --resume)
    sharded: bool = False            # --full under torchrun: FSDP2
    ddp: bool = False                # a LoRA run under torchrun: DDP
    step: int = 0                    # optimizer steps done (a checkpoint saves it, --resume restores it)
    nonfinite: int = 0               # steps skipped for a non-finite loss or gradient
    saved_step: int = None           # the step of the last checkpoint written
    check: dict = None               # the teacher check's verdict before step 1, for log.jsonl's first row
    trained_states: list = field(default_factory=list)   # this step's roll-out states with a loss (--loss-steps)

class CtrlC:
    """First Ctrl-C: `requested` turns true, and the loop saves after the step in flight, so the checkpoint is a
    consistent state. Second Ctrl-C: KeyboardInterrupt, quit at once. Only the main thread can take signals."""

    def __enter__(self):
        self.requested, self.main = False, threading.current_thread() is threading.main_thread()
        self.old = signal.signal(signal.SIGINT, self.handle) if self.main else None
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving after this step (press again to quit without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.main:
            signal.signal(signal.SIGINT, self.old)

def train(cfg):
    """Run D-OPSD (or the SFT baseline) as configured. Returns a process exit code."""
    cfg = check_args(cfg)
    cfg, items, family = read_data(cfg, cfg.method == "dopsd", cfg.rank)
    rank, world, device = setup_distributed(cfg.device, cfg.dist_timeout)
    if cfg.lr is None:
        cfg = replace(cfg, lr=DEFAULT_LR[family])
        if rank == 0:
            print(f"lr: {cfg.lr:g} (the {family} default; --lr to change it)")
    return (train_rank if world == 1 else train_distributed)(cfg, items, family, rank, world, device)

def read_data(cfg, teacher, rank):
    """(cfg with its cache folder and --init-lora file resolved, [Item], family), every file checked before a model
    loads (train, check): the data (bad data stops us here), the cache folder, the model's family, the --init-lora file
    (rank: the most it may have; None: any), and for a Z-Image teacher the --vlm."""
    cache_dir = Path(cfg.cache_dir or Path(parse_data_flag(cfg.data[0])[0]) / ".dopsd_cache")
    memo = read_json(cache_dir / "images.json")      # images decoded by an earlier launch: not decoded again
    items = scan_data(cfg.data, cfg.caption, cfg.trigger, memo)
    check_writable(cache_dir, "--cache-dir")
    try:
        write_json(cache_dir / "images.json", memo)
    except OSError as e:                             # only a memo: the next launch decodes the images again
        print(f"warning: --cache-dir {cache_dir}: cannot write images.json ({io_reason(e)})")
    cfg = replace(cfg, cache_dir=str(cache_dir))
    family = pipeline_family(cfg.model)
    if cfg.init_lora:
        # resolved now: config.json and the checkpoint name the file, whatever folder a later --resume starts in
        cfg = replace(cfg, init_lora=str(check_init_lora(cfg.init_lora, family, rank or 1 << 30, cfg.model).resolve()))
    if family == "zimage" and teacher:
        check_reachable(cfg.vlm, "--vlm", "config.json")
        check_vlm_kind(cfg.vlm)
    return cfg, items, family

def train_distributed(cfg, items, family, rank, world, device):
    """train_rank on every rank, then a teardown that always ends; only rank 0 prints to stdout. All ranks meet at a
    barrier, and the DDP wrapper (its Reducer holds the process group) is gone before the group is destroyed: the other
    order could leave a rank blocked for good in ~ProcessGroupGloo's thread join after rank 0 had exited. A rank that
    loses its peers (one died, or the collective timeout passed) says so in one line and exits 1."""
    import torch.distributed as dist
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null) if rank else contextlib.nullcontext():
            code = train_rank(cfg, items, family, rank, world, device)
        gc.collect()                                  # frees the DDP wrapper even if a reference cycle held it
        dist.barrier()
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)       # the traceback's frames would keep the DDP wrapper alive
        if isinstance(e, KeyboardInterrupt):          # a second Ctrl-C: no barrier, the peers may be mid-collective
            return 130
        if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and re.search(   # gloo: RuntimeError
                r"gloo|onnection|imeout|imed out", str(e)))):
            raise                                     # not a lost peer: a real bug or a UserError, as it is
        code = 1                                      # even when train_rank had finished: the teardown failed
        why = re.sub(r"^\[[^\]]*\] ", "", (str(e).strip().splitlines() or [""])[0])   # drop gloo's source path
        print(f"error: rank {rank} of {world} lost contact with the other ranks (one died, or a collective waited "
              f"over --dist-timeout {cfg.dist_timeout:g} min: {why.split('. ')[0][:120]}); the last checkpoint in "
              f"{cfg.out} is intact, continue with --resume", file=sys.stderr)
    finally:
        gc.collect()
        dist.destroy_process_group()
    return code

def write_config(cfg, family, world):
    """out/config.json: every setting of the run, its family, world size and library versions; out/samples/."""
    import diffusers, peft, transformers
    (Path(cfg.out) / "samples").mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "config.json").write_text(json.dumps({**asdict(cfg), "family": family, "world_size": world,
        "launch_folder": os.getcwd(),                # what a relative --model is relative to (full_run_parts)
        "versions": {m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft)}}, indent=2))

def train_rank(cfg, items, family, rank, world, device):
    """One process of `world`: load, cache the encoders' outputs, attach the two roles, then train_loop. The TrainingRun
    holds what the loop reads and a checkpoint saves. Rank 0 writes the files."""
    out, fam, dopsd = Path(cfg.out), FAMILIES[family], cfg.method == "dopsd"
    dtype, autocast, checkpointing = pick_precision(device, cfg.precision, cfg.grad_checkpointing)
    print(f"{family} | method {cfg.method} | roll-out K={cfg.rollout_steps} | deploy {fam['deploy']} steps, no CFG "
          f"| {'full fine-tuning' if cfg.full else f'LoRA r{cfg.rank}'} | lr {cfg.lr:g}")
    if rank == 0:
        write_config(cfg, family, world)
    extra = read_prompts(cfg.sample_prompt, cfg.sample_prompts, cfg.trigger)         # the grids' held-out columns
    preserve = read_prompts(None, cfg.preserve_prompts, cfg.trigger)        # check_args refused an empty file
    plan, mine = plan_cache(cfg, family, items, extra + preserve, dopsd, dtype, world)
    sharded = cfg.full and world > 1                 # FSDP2; LoRA runs keep DDP (the adapters are small)
    pipe = load_pipeline(cfg.model, dtype, torch.float32 if cfg.full else None, text_encoder=bool(mine),
                         transformer=rank == 0 or not sharded)
    dit = pipe.transformer if pipe.transformer is not None else dit_on_meta(cfg.model)    # ranks > 0 of FSDP2
    pipe_cls, vae = type(pipe), pipe.vae.to(device).requires_grad_(False)
    fill_cache(plan, mine, family, items, pipe, cfg, dopsd, dtype, device, show=rank == 0)
    del pipe                                         # the encoders go: the loop only ever runs the DiT
    free_device(device)
    fp8 = not cfg.full and any_rank(pick_fp8_base(cfg.fp8_base, device, dit, LORA_TARGETS[family], cfg.rank), device)
    if not (fp8 or sharded):                         # the LoRA is drawn where it trains, as it always was; FSDP2
        dit.to(device)                               # moves each block to the device as it shards it
    init = read_lora_file(cfg.init_lora) if cfg.init_lora else None
    mesh = shard_across_ranks(dit, device, world, dtype) if sharded else None
    student, teacher, trainable, teacher_params = attach_roles(
        dit.requires_grad_(False), family, dopsd, cfg.full, cfg.rank, cfg.alpha, cfg.seed, autocast, init,
        anchor=bool(init and preserve), mesh=mesh, compute_dtype=dtype, teacher_start=cfg.teacher_start)
    if fp8:                                          # after the adapters: they stay fp32 (see store_base_in_fp8)
        store_base_in_fp8(dit, dtype)
        dit.to(device)
    if checkpointing or fp8:
        dit.enable_gradient_checkpointing()          # recompute activations in backward: memory for compute
    cache = loop_cache(plan, items, preserve, family, cfg.resolution)
    preview = make_preview(cfg, family, items, extra, plan, dit, vae, device, autocast, rank == 0 or sharded)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=device.type == "cuda")
    run = TrainingRun(cfg=cfg, family=family, rank=rank, world=world, device=device, out=out, cache=cache, dit=dit,
                      model=dit, pipe_cls=pipe_cls, vae=vae, autocast=autocast, preview=preview, student=student,
                      teacher=teacher, trainable=trainable, teacher_params=teacher_params, opt=opt,
                      anchor="anchor" if init and preserve else None, sharded=sharded, ddp=world > 1 and not sharded,
                      init_sha=file_sha256(cfg.init_lora), fp8=fp8)
    if cfg.resume:                                   # before DDP: a refused resume must not leave a wrapper behind
        load_run(find_checkpoint(out, cfg.full), run)
    elif dopsd and cfg.check_images:                 # (every rank: a sharded DiT needs all of them in its forwards)
        check_before_training(run, items, plan)
    run.model = wrap_ddp(dit, device) if run.ddp else dit
    return train_loop(run)

def check_before_training(run, items, plan):
    """The teacher check on --check-images images before step 1, printed and kept for log.jsonl's first row. With
    --teacher-start auto it also picks the teacher's start: the bare base if its teacher copies the images closer
    than the start LoRA's (median look distance), else the start LoRA."""
    cfg, d = run.cfg, lambda rows, k: float(torch.tensor([r[k] for r in rows]).median())
    roles = [("student", lambda x, s, c: run.student(run.dit, x, s, c), "s"), ("teacher", run.teacher, "t")]
    if cfg.init_lora:                                # (adapter None: every adapter off, the bare base)
        roles.append(("base_teacher", lambda x, s, c: run.teacher(x, s, c, adapter=None), "t"))
    chosen = pick_check_images(items, cfg.check_images, cfg.seed)
    rows, run.check, _ = run_check(items, plan, chosen, run.family, roles, run.vae, run.dit, run.autocast, run.device,
                                   cfg, show=run.rank == 0)
    if cfg.teacher_start == "auto" and cfg.init_lora:
        start = "base" if d(rows, "d_base_teacher") < d(rows, "d_teacher") else "init"
        print(f"--teacher-start auto: {start} (the teacher copies these images at look distance "
              f"{d(rows, 'd_teacher'):.3f} from the start LoRA, {d(rows, 'd_base_teacher'):.3f} from the bare base)")
        if start == "base":
            teacher_from_base(lora_layers(run.dit))
        run.check["teacher_start"] = start

def loop_cache(plan, items, preserve, family, resolution):
    """What the loop reads of the cache: entry paths, never tensors. order[j]: the item at epoch position j (an item
    repeated N times holds N positions); bucket_of[j]: its bucket (H, W); files[i][v]: item i's entry for caption
    variant v; preserve: the entries of the --preserve-prompts."""
    buckets = make_buckets(resolution)
    order = [i for i, it in enumerate(items) for _ in range(it.repeat)]
    return dict(family=family, order=order, bucket_of=[nearest_bucket(*items[i].size, buckets) for i in order],
                files=[[p for p, _ in es] for es in plan["items"]], preserve=[plan["prompts"][p][0] for p in preserve])

def batch_entries(cache, positions, mine, seed, micro, device):
    """[(student conditioning, teacher conditioning or x0)] of this rank's slice `mine` of a global batch (epoch
    positions), read from disk. An item with several captions gets one drawn from (seed, micro), for the whole global
    batch, from a generator of its own: the noise stream stays what it is with one caption a image."""
    idx = [cache["order"][j] for j in positions]
    variants = [0] * len(idx)
    if any(len(cache["files"][i]) > 1 for i in idx):
        g = torch.Generator().manual_seed(((seed << 32) + micro) ^ (1 << 62))   # < 2^64 for every valid seed
        variants = [int(torch.randint(len(cache["files"][i]), (1,), generator=g)) for i in idx]
    return [entry_conds(cache["family"], read_entry(cache["files"][i][v], device))
            for i, v in list(zip(idx, variants))[mine]]

def make_preview(cfg, family, items, extra, plan, dit, vae, device, autocast, draw_base):
    """What every sample grid draws: the same noise and prompts each time (up to 4 training captions, then the
    held-out prompts), and (draw_base: rank 0) the row of the model the run starts from, drawn once: the base with
    every adapter off, or with --init-lora the student before its first step (base + that LoRA, labelled "start")."""
    fam, cols, n = FAMILIES[family], range(min(4, len(items))), cfg.resolution // latent_cell(family, vae)
    shown = [entry_conds(family, read_entry(plan["items"][i][0][0], device)) for i in cols]
    preview = SimpleNamespace(
        captions=[items[i].captions[0] for i in cols] + [f"(held out) {p}" for p in extra],
        sigmas=schedule(family, fam["deploy"], n, n), cond_t=[t for _, t in shown] if cfg.method == "dopsd" else [],
        cond_s=[s for s, _ in shown] + [entry_conds(family, read_entry(plan["prompts"][p][0], device))[0]
                                        for p in extra],
        noise=[torch.randn(1, dit.config.in_channels, n, n, generator=torch.Generator().manual_seed(cfg.seed + j))
               for j in range(len(cols) + len(extra))])
    layers, preview.start_label = lora_layers(dit), "start (init)" if cfg.init_lora else "base"
    use_adapter(layers, "student" if cfg.init_lora else None)    # None: every adapter off (and frozen), the base
    preview.base = draw_row(lambda x, s, c: fam["velocity"](dit, x, s, c), preview.cond_s, preview, fam["decode"],
                            vae, autocast) if draw_base else None
    use_adapter(layers, "student")                   # trainable again before DDP or the optimizer look at it
    return preview

def my_share_of_the_batch(run, micro):
    """This rank's slice of micro-batch `micro`: (generator g, slice mine, h, w, noise [b, C, h, w], conditioning).
    The global batch (batch_size × world) and its noise depend on (seed, micro) only, and each rank takes its slice:
    N ranks × batch b train exactly like 1 process × batch N·b, and a resumed run sees the batches an uninterrupted
    one would. g has drawn the noise; the caller draws the rest of the micro-batch's randomness from it."""
    cfg, cache = run.cfg, run.cache
    pos = batch_for_step(cache["bucket_of"], cfg.batch_size * run.world, cfg.seed, micro)   # epoch positions
    h, w = (side // latent_cell(run.family, run.vae) for side in cache["bucket_of"][pos[0]])   # in latent cells
    g = torch.Generator().manual_seed((cfg.seed << 32) + micro)
    mine = slice(run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size)
    noise = torch.randn(len(pos), run.dit.config.in_channels, h, w, generator=g)[mine].to(run.device)  # [b, C, h, w]
    return g, mine, h, w, noise, batch_entries(cache, pos, mine, cfg.seed, micro, run.device)

def micro_step(run, micro):
    """One micro-batch: its loss, with its gradient (scaled by 1/grad_accum) already accumulated in .grad.
    Under DDP the gradient all-reduce runs only on the last backward of the optimizer step: the K roll-out steps and
    the --grad-accum micro-batches would otherwise each pay one."""
    cfg, cache, calls = run.cfg, run.cache, [0]
    g, mine, h, w, noise, conds = my_share_of_the_batch(run, micro)
    cond_s = collate([s for s, _ in conds])
    M, K = cfg.loss_steps or cfg.rollout_steps, cfg.rollout_steps
    trained = sorted(torch.randperm(K, generator=g)[:M].tolist()) if M < K and cfg.method == "dopsd" else None
    run.trained_states += [trained] if trained else []       # for the log (--loss-steps)
    rollouts = (2 if cache["preserve"] else 1) if cfg.method == "dopsd" else 0
    backwards, last = max(1, rollouts * M), (micro + 1) % cfg.grad_accum == 0

    def student_x(x, s, c=cond_s):                   # the student on this batch's captions, or on c
        calls[0] += torch.is_grad_enabled()          # count the forwards that will have a backward
        if run.ddp:                                  # (FSDP2 reduce-scatters every backward into 1/N shards)
            run.model.require_backward_grad_sync = last and calls[0] == backwards
        return run.student(run.model, x, s, c)
    if cfg.method == "dopsd":
        cond_t, sigmas = collate([t for _, t in conds]), schedule(run.family, cfg.rollout_steps, h, w)
        loss = dopsd_rollout(student_x, lambda x, s: run.teacher(x, s, cond_t), noise, sigmas, cfg.loss_space,
                             1.0 / cfg.grad_accum, backend=cfg.loss_backend, trained=trained)[0]
        # --preserve-prompts: on-policy from new noise, onto the model the run started from (the base, adapters off;
        # with --init-lora the frozen anchor adapter), with a loss at the same states as the main roll-out
        if cache["preserve"]:
            pick = torch.randint(len(cache["preserve"]), (len(noise) * run.world,), generator=g)[mine].tolist()
            noise_p = torch.randn(len(noise) * run.world, *noise.shape[1:], generator=g)[mine].to(run.device)
            cond_p = collate([entry_conds(run.family, read_entry(cache["preserve"][i], run.device))[0] for i in pick])
            loss = loss + cfg.preserve_weight * dopsd_rollout(
                lambda x, s: student_x(x, s, cond_p), lambda x, s: run.teacher(x, s, cond_p, adapter=run.anchor),
                noise_p, sigmas, cfg.loss_space, cfg.preserve_weight / cfg.grad_accum, backend=cfg.loss_backend,
                trained=trained)[0]
        return loss
    u = torch.rand(cfg.batch_size * run.world, generator=g)[mine]   # SFT: σ from the family's shifted density
    x0 = torch.stack([x0 for _, x0 in conds])
    sigma = sft_sigma(run.family, u, h * w, FAMILIES[run.family]["deploy"]).to(run.device)
    loss = sft_loss(student_x, x0, noise, sigma, backend=cfg.loss_backend)
    (loss / cfg.grad_accum).backward()
    return loss

def train_loop(run):
    """The algorithm box: for each step, roll out and score every micro-batch (gradients accumulate), clip, AdamW,
    EMA towards the student, log. A non-finite step is skipped; Ctrl-C saves after the step in flight."""
    cfg, first, streak, stop = run.cfg, run.step, 0, False
    bar, log = progress_bar_and_log(run)
    try:
        with CtrlC() as ctrl_c, bar, log:
            while run.step < cfg.max_steps and not stop and streak < MAX_NONFINITE_STREAK:
                t0, run.trained_states, loss = time.perf_counter(), [], 0.0
                for m in range(cfg.grad_accum):             # roll-out, teacher, loss, backward: .grad accumulates
                    loss = loss + micro_step(run, run.step * cfg.grad_accum + m).detach() / cfg.grad_accum
                gnorm = torch.nn.utils.clip_grad_norm_(run.trainable, 1.0)   # equal on every rank: synced
                loss, stop = sync_loss_and_stop(loss, ctrl_c.requested, run.world, run.device)
                gnorm = gnorm.item()                                 # host syncs, after the collective, for the log
                if gnorm == 0 and run.step == first:                 # the student's LoRA got no gradient at all
                    return no_gradient_error()
                skipped = not (math.isfinite(loss) and math.isfinite(gnorm))
                if not skipped:                                      # else: drop this gradient, keep the weights
                    run.opt.step()
                    ema_update(run.teacher_params, run.trainable, cfg.ema_decay)
                run.opt.zero_grad(set_to_none=not run.ddp)    # under DDP .grad are views into its buckets: keep them
                streak = streak + 1 if skipped else 0
                run.step, run.nonfinite = run.step + 1, run.nonfinite + skipped
                log_step(log, bar, run, loss, gnorm, time.perf_counter() - t0, skipped)
                # One process: a Ctrl-C during this step counts now. Several: only the flag all ranks agreed on at
                # the sync, or one rank would save (a collective) while the others went on to the next step.
                stop = stop or (run.world == 1 and ctrl_c.requested)
                if not stop and streak < MAX_NONFINITE_STREAK:       # else: the loop ends and saves once, below
                    periodic_grid_and_checkpoint(run)
            save_run(run)
            if stop and streak < MAX_NONFINITE_STREAK:
                print(f"interrupted: checkpoint saved at step {run.step}; continue with --resume", file=sys.stderr)
                return 130
            sample_grid(run)
    except KeyboardInterrupt:
        print("\nstopped: nothing saved since the last checkpoint", file=sys.stderr)
        if run.world > 1:
            raise                                     # train_distributed ends this rank without a barrier
        return 130
    return end_of_run(run, streak)

def progress_bar_and_log(run):
    """A tqdm bar (rank 0 only) and log.jsonl opened for appending (os.devnull on the other ranks)."""
    from tqdm import tqdm
    bar = tqdm(total=run.cfg.max_steps, initial=run.step, desc=run.cfg.method, dynamic_ncols=True,
               disable=run.rank > 0)
    return bar, open(run.out / "log.jsonl", "a") if run.rank == 0 else open(os.devnull, "w")

def no_gradient_error():
    """Exit code 1 for a first step whose gradient is exactly 0: training would silently do nothing."""
    print("\nerror: the student's gradient is exactly 0 at the first step: its adapter was frozen or "
          "switched away before backward, so training would silently do nothing", file=sys.stderr)
    return 1

def periodic_grid_and_checkpoint(run):
    """A sample grid every --sample-every steps and a checkpoint every --save-every (0: only at the end)."""
    if run.cfg.sample_every and run.step % run.cfg.sample_every == 0:
        sample_grid(run)
    if run.cfg.save_every and run.step % run.cfg.save_every == 0:
        save_run(run)

def end_of_run(run, streak):
    """The exit code and last line of a run that finished its steps (0) or stopped on non-finite losses (1)."""
    if streak >= MAX_NONFINITE_STREAK:
        print(f"error: the loss was not finite for {streak} steps in a row (up to step {run.step}); lower --lr, or "
              "check the data; the last finite weights are saved", file=sys.stderr)
        return 1
    made = run.out / ("transformer" if run.cfg.full else "pytorch_lora_weights.safetensors")
    print(f"done: {run.step} steps, {run.nonfinite} skipped. {'DiT' if run.cfg.full else 'LoRA'}: {made}; "
          f"grid: {run.out / 'samples' / f'step_{run.step:06d}.png'} (the student row should take on the data's look "
          f"and stay sharp at {FAMILIES[run.family]['deploy']} steps, like the base row above it)"
          + (f"; loss: {run.out / 'loss.png'}" if (run.out / "loss.png").is_file() else ""))
    return 0

def sync_loss_and_stop(loss, stop, world, device):
    """(loss averaged over ranks as a float, for the log; stop on every rank if any rank's Ctrl-C asked for it)."""
    if world > 1:
        import torch.distributed as dist
        both = torch.stack([loss / world, torch.tensor(float(stop), device=device)])
        dist.all_reduce(both)
        loss, stop = both[0], bool(both[1] > 0)
    return loss.item(), stop

def log_step(log, bar, run, loss, gnorm, seconds, skipped):
    """One line of log.jsonl, and the progress bar's numbers."""
    print(json.dumps({"step": run.step, "loss": loss, "lr": run.cfg.lr, "grad_norm": gnorm, "sec": round(seconds, 4),
                      "skipped": skipped, **({"trained_states": run.trained_states} if run.trained_states else {}),
                      **({"check": run.check} if run.check else {})}), file=log, flush=True)
    run.check = None                                 # (logged once, with the first step)
    bar.set_postfix(loss=f"{loss:.4g}", s_per_step=f"{seconds:.2f}", skipped=run.nonfinite)
    bar.update(1)

# --------------------------------------------------------------------------------------------------------------------
# the teacher check
# D-OPSD can teach the student at most what the teacher does with the image in context: that is its ceiling. `check`
# measures it before any GPU hour is spent. Per image, from one fixed noise at the deploy step count: the student's
# sample from the caption alone and the teacher's with the image, each compared with the image itself. No backward,
# two roll-outs an image (three with --init-lora: the bare base's teacher too). `train` runs it on a few images
# before its first step.
#
# The comparison cannot be per pixel: the teacher copies a look, not a layout (on the toy its pixel RMS is no closer
# to the image than the student's, 0.98-1.02×, while it copies the style 2.8× closer). look_distance compares the two
# images' distributions of small patches at four scales (a sliced Wasserstein distance, as GAN papers measure texture
# and colour statistics): where a patch sits does not count, what the patches look like does -- the colours, textures
# and parts of a style, an object or a face (an object's parts, not their arrangement: a face with its features
# swapped around would pass). Both images are resized to one working size first, so the number means the same at any
# resolution; and the verdict uses only ratios of distances to one image, so it means the same for any image.

# Calibrated on the toy's five sets (examples/toy/README.md, "The teacher check"): the gain halfway, geometrically,
# between the best set the teacher cannot copy (1.48) and the worst it can (2.33); the spread ratio halfway between a
# style the base draws from its caption (1.10) and the nearest set it does not (2.14).
CHECK_GAIN = 1.85    # teachable: the teacher is at least this many times closer to the images than the student
CHECK_NEAR = 1.5     # already known: the student is within this many times the set's own spread of the images

def look_signature(image, size=128, patch=5, levels=4, directions=64, quantiles=128):
    """An image's look as [levels, quantiles, directions]: at `levels` scales (a box blur of 1, 2, 4, 8 px, and 5×5
    patches whose taps sit that far apart, at every position), the distribution of its RGB patches, projected on
    `directions` fixed random unit vectors and summarised by `quantiles` quantiles of each projection. The image is
    first resized so its short side is `size`. Every position, not every other: a stride would make the look depend on
    where the pattern starts. The same seed draws the same directions for every image."""
    from PIL import Image
    s, g = size / min(image.size), torch.Generator().manual_seed(0)
    x = pil_to_tensor(image.convert("RGB").resize((max(4 * patch, round(image.width * s)), max(4 * patch, round(
        image.height * s))), Image.Resampling.BICUBIC))[None]              # [1, 3, H, W] in [-1, 1]
    q, out = torch.linspace(0, 1, quantiles), []
    for k in (2 ** l for l in range(levels)):
        blurred = torch.nn.functional.avg_pool2d(x, k, stride=1) if k > 1 else x
        p = torch.nn.functional.unfold(blurred, patch, dilation=k)[0].T     # [n, 3·patch²] every position's patch
        d = torch.randn(p.shape[1], directions, generator=g)
        out.append(torch.quantile(p @ (d / d.norm(dim=0)), q, dim=0))      # [quantiles, directions]
    return torch.stack(out)

def look_distance(a, b):
    """Sliced Wasserstein distance between two images' patch distributions (PIL images or their look_signature),
    averaged over scales and directions: 0 = the same look. Where a patch sits does not count."""
    sa, sb = (x if torch.is_tensor(x) else look_signature(x) for x in (a, b))
    return (sa - sb).abs().mean().item()

def measure_checks(items, plan, chosen, family, roles, vae, channels, autocast, device, seed, buckets, show=True,
                   keep=16, spread_of=8):
    """The teacher check's numbers, one image at a time: for each chosen item, every role's sample on the deploy
    schedule from the item's own noise (seed, item), its look_distance to the training crop, the teacher's gain
    (student distance / teacher distance) and `near` (student distance / the set's own spread: the crop's median
    distance to up to `spread_of` other images of a fixed pool). roles: [(name, velocity (x, σ, cond) -> u, "s" for
    the caption's features or "t" for the teacher's)]. Returns ([row per item], {row: thumbnails} of the `keep` lowest
    gains): memory stays flat however many images are checked."""
    from tqdm import tqdm
    fam, cell, rows, thumbs = FAMILIES[family], latent_cell(family, vae), [], {}
    crop = lambda i: crop_to(load_rgb(items[i].path), *nearest_bucket(*items[i].size, buckets))
    thumb = lambda im: im.resize((max(1, im.width * 160 // max(im.size)), max(1, im.height * 160 // max(im.size))))
    pool = {i: look_signature(crop(i)) for i in chosen[:spread_of + 1]}    # what the set's own spread is taken on
    for i in tqdm(chosen, desc="teacher check", unit="image", dynamic_ncols=True, disable=not show):
        H, W = nearest_bucket(*items[i].size, buckets)
        cond = dict(zip("st", entry_conds(family, read_entry(plan["items"][i][0][0], device))))
        noise = torch.randn(1, channels, H // cell, W // cell, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + i)).to(device)                                # [1, C, h, w]
        sigmas = schedule(family, fam["deploy"], H // cell, W // cell)
        with autocast():
            ims = {name: fam["decode"](vae, euler_sample(lambda x, s: v(x, s, collate([cond[k]])), noise, sigmas))[0]
                   for name, v, k in roles}
        ims["image"] = crop(i)
        target = pool[i] if i in pool else look_signature(ims["image"])
        d = {name: look_distance(ims[name], target) for name, _, _ in roles}
        spread = [look_distance(p, target) for j, p in pool.items() if j != i][:spread_of]
        spread = float(torch.tensor(spread).median()) if spread else 0.0   # 0: one image, or copies of one image
        rows.append({"file": str(items[i].path), "caption": items[i].captions[0],
                     **{f"d_{name}": v for name, v in d.items()}, "gain": d["student"] / max(d["teacher"], 1e-12),
                     "near": d["student"] / spread if spread > 0 else None})
        thumbs[len(rows) - 1] = {name: thumb(im) for name, im in ims.items()}
        if len(thumbs) > keep:                       # keep only the worst images' thumbnails for check.png
            thumbs.pop(max(thumbs, key=lambda j: rows[j]["gain"]))
    return rows, thumbs

def check_verdict(rows):
    """The verdict over the checked images, with the medians behind it: teachable (the teacher is CHECK_GAIN× closer
    to the images than the student), already known (it is not, and the student is already within CHECK_NEAR× the
    set's own spread), or not teachable (neither: the teacher cannot copy the images any better than the student)."""
    med = lambda k: float(torch.tensor([r[k] for r in rows]).median())
    gain = med("gain")
    near = med("near") if all(r["near"] is not None for r in rows) else None
    verdict = ("teachable" if gain >= CHECK_GAIN else "undecided (one image, or copies of one: no spread to compare)"
               if near is None else "already known" if near <= CHECK_NEAR else "not teachable")
    return {"verdict": verdict, "gain": gain, "near": near, "thresholds": {"gain": CHECK_GAIN, "near": CHECK_NEAR},
            "images": len(rows)}

def print_check(rows, summary):
    """One line per image, worst (lowest gain) first, then the verdict with its numbers."""
    for r in sorted(rows, key=lambda r: r["gain"]):
        print(f"  gain {r['gain']:5.2f}  student {r['d_student']:.3f}  teacher {r['d_teacher']:.3f}"
              + (f"  base teacher {r['d_base_teacher']:.3f}" if "d_base_teacher" in r else "")
              + f"  {Path(r['file']).name}: {r['caption'][:60]}")
    near = f"{summary['near']:.2f}" if summary["near"] is not None else "-"
    print(f"teacher check: {summary['verdict']} on {summary['images']} image(s): the teacher with the image is "
          f"{summary['gain']:.2f}× closer to it than the student (teachable from {CHECK_GAIN}×); the student is "
          f"{near}× the set's own spread from it (already known up to {CHECK_NEAR}×)")

def check_roles(dit, family, init=None):
    """The check's roles on a DiT as loaded: the start student (from the caption) and its teacher (with the image);
    with an --init-lora file, the start is base + that LoRA (one adapter at the file's own rank) and the bare base's
    teacher is measured too (what --teacher-start base would train with)."""
    velocity = FAMILIES[family]["velocity"]
    if not init:
        base = lambda x, s, c: velocity(dit, x, s, c)
        return [("student", base, "s"), ("teacher", base, "t")]
    factors = read_lora_file(init)
    r = max(A.shape[0] for A, _ in factors.values())
    add_lora_adapters(dit, LORA_TARGETS[family], r, r, ("start",))
    set_lora(dit, factors, ("start",), 1.0)
    layers = lora_layers(dit)
    on = lambda name: lambda x, s, c: use_adapter(layers, name, trainable=False) or velocity(dit, x, s, c)
    return [("student", on("start"), "s"), ("teacher", on("start"), "t"), ("base_teacher", on(None), "t")]

def pick_check_images(items, count, seed):
    """Indices of the items to check: all (count None or >= the set), else `count` drawn by seed, in order."""
    if count is None or count >= len(items):
        return list(range(len(items)))
    return sorted(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:count].tolist())

def run_check(items, plan, chosen, family, roles, vae, dit, autocast, device, cfg, show=True):
    """Measure, print: (rows, summary, thumbnails) of the teacher check on the chosen items."""
    rows, thumbs = measure_checks(items, plan, chosen, family, roles, vae, dit.config.in_channels, autocast, device,
                                  cfg.seed, make_buckets(cfg.resolution), show)
    summary = check_verdict(rows)
    print_check(rows, summary)
    return rows, summary, thumbs

def write_check(out, rows, summary, thumbs, names):
    """check.json (the verdict, its numbers, every image's) and check.png: rows image | student | teacher (| base
    teacher), one column for each of the worst images (thumbs), lowest gain first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "check.json", lambda f: f.write(json.dumps({**summary, "per_image": rows}, indent=2).encode()))
    worst = sorted(thumbs, key=lambda j: rows[j]["gain"])
    save_grid([(name.replace("_", " "), [thumbs[j][name] for j in worst]) for name in ("image", *names)],
              [f"gain {rows[j]['gain']:.2f}: {rows[j]['caption']}" for j in worst], out / "check.png")

def check(cfg):
    """`dopsd.py check`: the teacher check on the training data, before training; writes check.json and check.png
    into --out. Returns a process exit code."""
    check_out_path(cfg.out, "--out", folder=True)
    check_device(cfg.device)
    check_seed_and_size(cfg.seed, cfg.resolution)
    if cfg.check_images is not None and cfg.check_images < 1:
        raise UserError(f"--check-images {cfg.check_images}: out of range; pass at least 1, or leave it out to "
                        "check every image")
    cfg, items, family = read_data(cfg, teacher=True, rank=None)
    device = pick_device(cfg.device)
    dtype, autocast, _ = pick_precision(device, cfg.precision, None)
    plan, mine = plan_cache(cfg, family, items, [], True, dtype, 1)
    pipe = load_pipeline(cfg.model, dtype, text_encoder=bool(mine))
    fill_cache(plan, mine, family, items, pipe, cfg, True, dtype, device, show=True)
    dit, vae = pipe.transformer.to(device).requires_grad_(False), pipe.vae.to(device).requires_grad_(False)
    del pipe                                         # the encoders go: only the DiT and the VAE draw
    free_device(device)
    roles = check_roles(dit, family, cfg.init_lora)
    chosen = pick_check_images(items, cfg.check_images, cfg.seed)
    rows, summary, thumbs = run_check(items, plan, chosen, family, roles, vae, dit, autocast, device, cfg)
    write_check(cfg.out, rows, summary, thumbs, [name for name, _, _ in roles])
    print(f"wrote {Path(cfg.out) / 'check.json'} and {Path(cfg.out) / 'check.png'}")
    return 0

# --------------------------------------------------------------------------------------------------------------------
# sampling
# The family's deploy recipe (Z-Image-Turbo 8 steps, klein 4; no CFG), with our own Euler loop -- the same function
# that draws the training grids, and equal to the diffusers pipeline's output (test_dopsd.py checks both).

# The family a LoRA is for, from its key names when it carries no ModelSpec metadata (another tool's file). Z-Image:
# layers.N / noise_refiner.N / context_refiner.N with .attention / .feed_forward; klein: (single_)transformer_blocks.N,
# or BFL's double_blocks.N / single_blocks.N. "[._]" also reads kohya's flattened names (lora_unet_layers_0_...).
LORA_KEYS = {"zimage": r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward)[._]",
             "klein": r"(^|[._])(transformer_blocks|double_blocks|single_blocks)[._]\d+[._]"}
DIT_FAMILY = {"ZImageTransformer2DModel": "zimage", "Flux2Transformer2DModel": "klein"}   # a --full run's DiT class

def lora_source(weights, scale=1.0, flag="--lora"):
    """--lora -> ("full", a --full run's transformer/ folder) or ("lora", the .safetensors file); refuses a path that
    is neither, and a --lora-scale on a --full run. flag: the option the errors name (examples/eval.py: --full too)."""
    p = Path(weights)
    if (p / "transformer" / "config.json").is_file():
        if scale != 1.0:
            raise UserError(f"--lora-scale {scale}: {p} is a --full run (a whole DiT), it has no LoRA to scale; drop "
                            "--lora-scale")
        return "full", p / "transformer"
    if not p.exists():
        raise UserError(f"{flag} {p}: not found; pass a dopsd.py train --out folder or its "
                        "pytorch_lora_weights.safetensors")
    file = p if p.is_file() else p / "pytorch_lora_weights.safetensors"
    if not file.is_file():
        raise UserError(f"{flag} {p}: no pytorch_lora_weights.safetensors or transformer/ found; pass a dopsd --out "
                        "folder")
    return "lora", file

def weights_family(kind, path, flag="--lora"):
    """The family trained weights are for, from headers only: a --full run's transformer/config.json; a LoRA's
    ModelSpec metadata (lora_card), else its key names. None when nothing tells."""
    from safetensors import SafetensorError, safe_open
    if kind == "full":
        try:
            return DIT_FAMILY.get(json.loads((path / "config.json").read_text()).get("_class_name"))
        except (OSError, ValueError, AttributeError):
            return None
    try:
        with safe_open(str(path), "pt") as f:        # the header: key names and metadata, no tensor is read
            meta, keys = f.metadata() or {}, list(f.keys())
    except (OSError, SafetensorError) as e:
        raise UserError(f"{flag} {path}: not a safetensors file ({str(e).splitlines()[0][:80]}); pass the "
                        "pytorch_lora_weights.safetensors that dopsd.py train wrote, or its --out folder") from None
    arch = meta.get("modelspec.architecture", "")
    by_meta = [f for f, spec in FAMILIES.items() if arch.startswith(spec["arch"] + "/")]
    by_keys = [f for f, rx in LORA_KEYS.items() if any(re.search(rx, k) for k in keys)]
    return by_meta[0] if by_meta else by_keys[0] if len(by_keys) == 1 else None

def check_image_name(path, flag="--out"):
    """Refuse an image file name PIL cannot write (x.xyz, no extension, a format PIL only reads) by writing a 16×16
    image in memory -- before sampling, not after it, when the images would be lost."""
    from PIL import Image
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise UserError(f"{flag} {path}: " + (f"{ext} is no image format PIL knows" if ext else "no file extension")
                        + "; end the name in .png, .jpg or .webp")
    try:
        Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)
    except (KeyError, OSError, ValueError):          # KeyError: PIL only reads it (.psd); OSError: not from RGB (.xbm)
        raise UserError(f"{flag} {path}: PIL cannot write an RGB image as {fmt}; end the name in .png, .jpg or "
                        ".webp") from None

def load_weights(pipe, weights, scale=1.0):
    """A LoRA file/folder from `train` at `scale` (1.0 = as trained), or a --full run folder (it holds transformer/).
    Returns a label for what was loaded."""
    kind, path = lora_source(weights, scale)
    if kind == "full":
        pipe.transformer = type(pipe.transformer).from_pretrained(path, dtype=pipe.transformer.dtype)
        return "trained (--full)"
    # A LoRA whose layers match nothing in this DiT (another model, another size): peft raises
    # NoMatchingPeftModuleError, diffusers a ValueError ("Invalid adapter checkpoint", or set_adapters finding no
    # adapter when every key was dropped), a RuntimeError on a shape mismatch. sample() checked the family already.
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="dopsd")
        pipe.set_adapters(["dopsd"], [scale])
    except (ValueError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"--lora {path}: its layers do not fit this model ({type(e).__name__}: {why}); nothing was "
                        "written: pass a LoRA trained on this --model") from None
    return f"LoRA, scale {scale:g}"

def check_sample_args(out, lora, lora_scale, compare, steps, seed, height, width, device):
    """Everything the arguments and files can tell, before any weight is read. Returns lora_source(lora) or None."""
    if height % 16 or width % 16 or min(height, width) < 16:
        raise UserError(f"--height/--width must be multiples of 16 (got {height}×{width})")
    if compare and not lora:
        raise UserError("--compare needs --lora: it draws the base model beside the trained one")
    check_out_path(out, "--out", folder=False)
    check_image_name(out)
    check_device(device)
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: out of range; pass at least 1, or leave it out for the deploy count")
    if not math.isfinite(lora_scale):
        raise UserError(f"--lora-scale {lora_scale}: not a finite number; pass e.g. 1.0 (as trained) or 0.5")
    check_seed_and_size(seed)
    return lora_source(lora, lora_scale) if lora else None

def sample(model, prompt, out, lora=None, lora_scale=1.0, compare=False, steps=None, seed=0, height=1024, width=1024,
           device="auto", precision="auto", fp8_base="auto"):
    """Render each prompt (a string or a list) with the deploy settings (or `steps`) and the trained weights if given.
    One prompt: the image; several, or compare=True (the base model above the LoRA, same noise): one grid."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    source = check_sample_args(out, lora, lora_scale, compare, steps, seed, height, width, device)
    family = pipeline_family(model)
    trained = weights_family(*source) if lora else None
    if trained and trained != family:
        raise UserError(f"--lora {lora}: trained for {FAMILIES[trained]['arch']}, but --model {model} is "
                        f"{FAMILIES[family]['arch']}; pass the --model it was trained on")
    fam, device = FAMILIES[family], pick_device(device)
    dtype, autocast, _ = pick_precision(device, precision, None)
    pipe = load_pipeline(model, dtype)
    te = text_model(pipe.text_encoder).to(device)
    conds = [student_features(family, te, pipe.tokenizer, [p])[0] for p in prompts]
    pipe.text_encoder.to("cpu")                      # the features are made: the DiT gets the device to itself
    free_device(device)                              # (and mem_get_info sees the encoder's memory as free)
    cell, steps = latent_cell(family, pipe.vae), steps or fam["deploy"]
    h, w = height // cell, width // cell
    preview = SimpleNamespace(sigmas=schedule(family, steps, h, w), noise=[torch.randn(
        1, pipe.transformer.config.in_channels, h, w, generator=torch.Generator().manual_seed(seed + j))
        for j in range(len(prompts))])                                     # CPU noise: the same on any device
    row = lambda: draw_row(lambda x, s, c: fam["velocity"](pipe.transformer, x, s, c), conds, preview, fam["decode"],
                           pipe.vae, autocast)
    fp8, rows = pick_fp8_base(fp8_base, device, pipe.transformer), []
    place = lambda: (store_base_in_fp8(pipe.transformer, dtype) if fp8 else None, pipe.transformer.to(device))
    pipe.vae.to(device)
    if compare and source[0] == "full":              # the base first: the trained DiT replaces it
        place()
        rows.append(("base", row()))
        pipe.transformer.to("cpu")                   # off the device before the trained DiT comes (the casting
        free_device(device)                          # hooks hold reference cycles: only gc frees it)
    label = load_weights(pipe, lora, lora_scale) if lora else "base"
    place()                                          # fp8 after the LoRA is in: its factors stay as loaded
    if compare and source[0] == "lora":              # the same DiT with the LoRA off, on the same noise
        pipe.disable_lora()
        rows.append(("base", row()))
        pipe.enable_lora()
    rows.append((label, row()))
    write_sample(rows, prompts, out)
    print(f"wrote {out} ({len(prompts)} prompt(s){', base and LoRA' if compare else ''}, {width}×{height}, {steps} "
          f"steps, seed {seed}{'+column' if len(prompts) > 1 else ''})")
    return 0

def write_sample(rows, prompts, out):
    """One image, or a grid of rows × prompts, written atomically; a failed write says what is intact."""
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if len(rows) == 1 and len(prompts) == 1:
            save_image(rows[0][1][0], out)
        else:
            save_grid(rows, prompts, out)
    except OSError as e:
        raise WriteFailed(f"could not write {out} ({io_reason(e)}); nothing was written" + (
            ", the previous file there is intact" if Path(out).is_file() else "") + ": free space and sample again"
            ) from None

# --------------------------------------------------------------------------------------------------------------------
# CLI

def build_parser():
    p = argparse.ArgumentParser(prog="dopsd.py", description="D-OPSD: fine-tune a few-step model, keep it few-step.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, cls, text in (("train", TrainConfig, "train a LoRA (or the full DiT) with D-OPSD or the SFT baseline"),
                            ("sample", SampleConfig, "render prompts with the deploy settings: an image, or a grid "
                             "(several --prompt, --compare)"),
                            ("check", CheckConfig, "will D-OPSD teach this data? the teacher with each image "
                             "against the student, before training")):
        s = sub.add_parser(name, help=text)
        for f in fields(cls):                        # one flag per field: rank -> --rank (f.type is the class itself)
            kw = dict(f.metadata)
            if f.type is bool:
                kw["action"] = "store_true"
            elif not kw.get("required"):
                kw = {"type": type(f.default) if f.default is not None else str, "default": f.default, **kw}
                kw["help"] += " (default %(default)s)" if f.default is not None else ""
            s.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p

def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    try:
        cmd = args.pop("cmd")
        return (train(TrainConfig(**args)) if cmd == "train" else check(CheckConfig(**args)) if cmd == "check" else
                sample(**args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code

if __name__ == "__main__":
    sys.exit(main())

