"""Benchmarks for dopsd.py: what one D-OPSD optimizer step costs against its floor and against SFT, its memory as K
grows, what the feature cache saves, whether our sampler adds anything to the diffusers pipeline, and the fused loss.

Run as:  python examples/bench.py                      # full run: ~8 min on 2 CPU cores (CUDA when present)
         python examples/bench.py --quick              # smoke run of every measurement, small DiT: ~1 min
         python examples/bench.py --wait-idle 300      # on a shared machine: wait for idle cores before each part
         python examples/bench.py --threads 1 --keep /tmp/bench --only train,floor      (see --help)

Prints one small table per measurement, PASS/FAIL per goal, then ONE final JSON line with everything (machine, model,
settings, every number, goals, the other processes' CPU load per part). Exit code 0, or 1 with --strict if a goal fails.

The model: a Z-Image pipeline built offline in a temp dir from examples/make_tiny.py's tokenizer, Qwen3 text encoder,
Qwen3-VL and VAE, with a bigger DiT (see FULL) so that the DiT dominates every step. What is measured:
  train     seconds per optimizer step of the REAL training loop -- dopsd.main(["train", ...]) in-process -- for
            --method dopsd (K = 4) and --method sft on the same data, batch and seed: the `sec` field of
            OUT/log.jsonl, median after warm-up, over alternating runs SFT, D-OPSD, SFT, D-OPSD, SFT; and their ratio.
            During these runs every text-encoder / VLM / VAE-encoder forward is counted (goal: none in the loop).
  preserve  a D-OPSD step with --preserve-prompts (a second roll-out, onto the base model) over one without,
            alternating runs as in train; its floor is 2.0.
  floor     the floor, measured on this DiT: student forward, forward+backward and teacher forward, interleaved with
            whole D-OPSD and SFT steps in one process (a drift-free cross-check of the train-loop ratio).
  loss_steps  a D-OPSD step with --loss-steps M = 4, 1, 2 at K = 4 (a loss at M of the K states), in rounds, each
            against M = K and against its pass-count floor on this DiT's floor timings.
  reencode  a D-OPSD step with the feature cache vs one that re-encodes caption and image every step (public recipe).
  memory    the step's own peak memory at K = 2, 4, 8, step-wise backward (dopsd's default) vs one backward over the
            whole roll-out; one fresh subprocess per configuration.
  sampler   dopsd's sampling path (what `dopsd.sample` runs after loading) vs ZImagePipeline.__call__: same embeds,
            8 steps, size and seed.
  loss      the fused divergence loss vs the naive autograd composition (fwd+bwd time, saved bytes, bytes touched;
            on CUDA also the Triton kernel's GB/s vs a copy).
  cache     the disk feature cache at N = 50 and 1,000 generated 256-px images, tiny models, both families: time from
            launch to the first optimizer step on a fresh cache and again on the same cache, peak RSS, size on disk;
            and 2 torchrun ranks on a fresh cache, counting what each encodes.
Goals (PASS/FAIL): D-OPSD/SFT step-time ratio <= 6.0 at K = 4 (CPU fp32); peak at K = 8 <= 1.15 x peak at K = 2
(step-wise); encoders never run inside the loop; our sampler no more than 5 % slower than the pipeline; the
--loss-steps 1 step at most 0.5 x the M = K step at K = 4; a second run on a filled cache reaches its first step in at
most 0.2 x the first run's time at N = 1,000, peak RSS grows at most 15 % from N = 50 to 1,000, and 2 ranks split the
encoding.
Timings are medians over repeats after a warm-up. On a shared machine they are only as good as its idle cores: the CPU
time other processes used during each part is measured (foreign_cores) and a warning says when it distorts the numbers.
"""
import argparse
import contextlib
import ctypes
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
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import dopsd  # noqa: E402
from dopsd import HAS_TRITON, _divergence_fwd_triton, dopsd_loss  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# settings
# The benchmark DiT. Real Z-Image-Turbo: dim 3840, 30 layers + 2 + 2 refiner layers, 30 heads of 128, 1024 px ->
# 4096 image tokens, a teacher context of ~600 tokens (576 image + caption) and a student caption of ~100, LoRA r64.
# What we keep from it, at a size a 2-core CPU runs in minutes:
#   * the token proportions: 512 px -> 64x64 latent -> 1024 image tokens; the teacher's VLM always sees the crop at
#     >= 512^2 px (dopsd.vlm_features), i.e. >= 256 image tokens + caption (~300, padded to 320) vs the student's ~45
#     (padded to 64): teacher/student sequence 1344/1088 = 1.24 (real ~1.13). At 256 px it would be 576/320 = 1.8 and
#     the teacher forward alone would push the ratio past 6 -- an artefact of a tiny image, not of the method.
#   * LoRA rank relative to width: r64 on dim 3840 is 1.7 %; r4 on dim 256 is 1.6 % (alpha = 2 r keeps the scale 2).
#   * head dim 64 with sum(axes_dims) = 16 + 24 + 24 = dim / n_heads; 2 refiner layers like the real model.
# dim 256 x 4 layers (8.5 M parameters) makes the DiT >> everything else (the tiny encoders are ~0.1 M), yet one
# K = 4 step stays at a few seconds on 2 cores.
FULL = dict(dim=256, n_heads=4, n_layers=4, n_refiner_layers=2, axes_dims=[16, 24, 24], resolution=512, rank=4,
            n_images=4,               # a "handful" of training pairs; all square -> one bucket -> equal step shapes
            train_pairs=2,                    # D-OPSD train runs, each between two SFT runs (bench_train_alternating)
            dopsd_steps=12, dopsd_warmup=2,   # per run; the first steps (AdamW state, lazy inits) are not timed
            sft_steps=12, sft_warmup=2,
            mem_ks=(2, 4, 8), reencode_repeats=5, floor_repeats=5, sampler_repeats=5, loss_repeats=20,
            cache_ns=(50, 1000))              # dataset sizes of the cache phase (tiny models, 256 px images)
# --quick: every code path once, small and fast; the numbers are NOT meaningful (e.g. at 128 px the teacher's
# 320-token context dwarfs 64 image tokens, so the ratio goal fails there by construction).
QUICK = dict(dim=128, n_heads=2, n_layers=2, n_refiner_layers=1, axes_dims=[16, 24, 24], resolution=128, rank=4,
             n_images=2, train_pairs=1, dopsd_steps=3, dopsd_warmup=1, sft_steps=4, sft_warmup=1,
             mem_ks=(2, 8), reencode_repeats=2, floor_repeats=2, sampler_repeats=2, loss_repeats=3,
             cache_ns=(10, 40))
K_MAIN = 4                            # the goal's roll-out length (dopsd's default --rollout-steps)
PHASES = ("train", "preserve", "floor", "loss_steps", "reencode", "memory", "sampler", "loss", "cache")   # run order
GOALS = dict(ratio=6.0, mem=1.15, sampler=0.05, loss_steps=0.5, cache_reuse=0.2, cache_rss=0.15)
PROMPT = "a red circle in [V] style"  # sampler prompt (any caption works; the embeds are shared by both paths)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_times(fns, device, repeats, warmup):
    """{name: [seconds]} of each fn in {name: fn}: `warmup` untimed rounds, then `repeats` rounds, interleaved (the
    order alternates per round) so that drift and other processes' load hit every path alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------------------------------
# machine and load

def machine_info(device):
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    mem_gb = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        mem_gb = round(int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20, 1)
    import diffusers, peft, transformers
    info = dict(cpu=cpu, arch=platform.machine(), cores=os.cpu_count(),
                usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                torch_threads=torch.get_num_threads(), ram_gb=mem_gb, device=str(device),
                gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                versions={m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft)},
                python=platform.python_version(), triton=HAS_TRITON)
    return info


class LoadMeter:
    """CPU time used by OTHER processes while a phase ran, in cores (0 = the machine was ours alone).

    /proc/stat busy jiffies of the whole machine minus this process's and its waited-for children's CPU time (os.times).
    On a 2-core machine 0.5 foreign cores already slow a 2-thread torch job by far more than 25 % (threads wait for
    each other at every op), so anything above ~0.2 is flagged."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy, own = self._busy(), self._own()
        self.wall = wall
        self.foreign = None if busy is None else max(0.0, (busy - self.busy0) - (own - self.own0)) / max(wall, 1e-9)
        return False

    @staticmethod
    def _busy():
        try:
            f = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal: everything but idle and iowait was unavailable to us
        return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


# --------------------------------------------------------------------------------------------------------------------
# the benchmark model

def _load_make_tiny():
    """examples/make_tiny.py as a module (imported by path: examples/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_tiny", HERE / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_bench_model(root, s):
    """root/zimage (make_tiny's Z-Image pipeline with the DiT of `s` swapped in), root/vlm, root/data. Returns info."""
    from diffusers import ZImageTransformer2DModel
    mt = _load_make_tiny()
    pipe = mt.make_zimage(root / "zimage")        # tokenizer, Qwen3 text encoder, VAE, scheduler exactly as make_tiny
    torch.manual_seed(mt.SEED)
    # Overridden vs make_tiny: dim / n_layers / n_refiner_layers / n_heads / axes_dims (see FULL). cap_feat_dim must
    # stay the text encoder's width (32), in_channels 16 (the VAE's latents; the Omni placeholder is 2*2*16).
    assert sum(s["axes_dims"]) == s["dim"] // s["n_heads"]
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=s["dim"],
                                  n_layers=s["n_layers"], n_refiner_layers=s["n_refiner_layers"], n_heads=s["n_heads"],
                                  n_kv_heads=s["n_heads"], cap_feat_dim=mt.TEXT["hidden_size"],
                                  axes_dims=s["axes_dims"], axes_lens=[1536, 512, 512])
    mt.init_dit_(tr)                                # unit-scale activations, pad tokens non-zero (as make_tiny)
    shutil.rmtree(root / "zimage" / "transformer")
    tr.save_pretrained(root / "zimage" / "transformer")
    mt.make_vlm(root / "vlm")
    # Data: make_tiny's drawings, cropped square to exactly the bucket size, so every batch has the same shape and the
    # per-step times are comparable (mixed aspect ratios would make the step time depend on the batch drawn).
    data = root / "data"
    data.mkdir(parents=True)
    R = s["resolution"]
    for i in range(s["n_images"]):
        img, caption = mt.draw_sample(i)
        dopsd.crop_to(img, R, R).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption + "\n")
    return dict(dit_params=mt.n_params(tr), text_encoder_params=mt.n_params(pipe.text_encoder),
                vae_params=mt.n_params(pipe.vae), dim=s["dim"], n_layers=s["n_layers"],
                n_refiner_layers=s["n_refiner_layers"], n_heads=s["n_heads"], resolution=R,
                image_tokens=(R // 16) ** 2, n_images=s["n_images"], lora_rank=s["rank"], lora_alpha=2 * s["rank"])


class Harness:
    """train()'s set-up and optimizer step, assembled from dopsd's own functions so that ONE step can be run alone
    (memory), with encoders in the loop (re-encoding) or in pieces (floor). Mirrors dopsd.train_rank for one process:
    dtype/autocast/gradient checkpointing per device, feature builders, LoRA adapters, closures, clip, AdamW, EMA.
    The train-loop timing never uses this (it runs dopsd.main); the floor part prints both, so they can be compared."""

    def __init__(self, root, s, device, keep_encoders=False):
        self.device, self.cuda = device, device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32       # as train(): bf16 + autocast on CUDA
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.cuda else nullcontext
        pipe = dopsd.load_pipeline(str(root / "zimage"), self.dtype)
        self.tr, self.vae, te, tok = pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer
        items = dopsd.scan_dataset(str(root / "data"))
        buckets = dopsd.make_buckets(s["resolution"])
        self.crops = []
        for it in items:
            im = dopsd.load_rgb(it.path)
            self.crops.append(dopsd.crop_to(im, *dopsd.nearest_bucket(im.height, im.width, buckets)))
        self.captions = [it.captions[0] for it in items]
        te.to(device).requires_grad_(False)
        vlm, vtok, vproc = dopsd.load_hybrid_vlm(str(root / "vlm"), te, self.dtype)
        vlm.to(device)
        self.encode_s = lambda i: dopsd.student_features("zimage", te, tok, [self.captions[i]])[0]
        self.encode_t = lambda i: dopsd.vlm_features(vlm, vtok, vproc, self.crops[i], self.captions[i]).to(self.dtype)
        self.cond_s = [self.encode_s(i) for i in range(len(items))]
        self.cond_t = [self.encode_t(i) for i in range(len(items))]
        self.vae.to(device).requires_grad_(False)   # SFT's targets, as train() caches them for --method sft
        self.x0 = [dopsd.zimage_encode(self.vae, dopsd.pil_to_tensor(im)[None])[0] for im in self.crops]
        if not keep_encoders:                       # train() frees them after the cache; so does the memory child
            del te, vlm, self.encode_s, self.encode_t
        self.tr.to(device).requires_grad_(False)
        self.C = self.tr.config.in_channels
        self.h = self.w = s["resolution"] // dopsd.latent_cell("zimage", self.vae)
        torch.manual_seed(0)
        dopsd.add_lora_adapters(self.tr, dopsd.LORA_TARGETS["zimage"], s["rank"], 2 * s["rank"])
        self.layers = dopsd.lora_layers(self.tr)
        st = dopsd.adapter_params(self.tr, "student")
        self.trainable = list(st.values())
        self.teacher_params = [dopsd.adapter_params(self.tr, "teacher")[k] for k in st]
        if self.cuda:
            self.tr.enable_gradient_checkpointing()
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=self.cuda)

    def student(self, x, s, c):
        dopsd.use_adapter(self.layers, "student")
        return dopsd.zimage_velocity(self.tr, x, s, c)

    def teacher(self, x, s, c):
        dopsd.use_adapter(self.layers, "teacher")
        return dopsd.zimage_velocity(self.tr, x, s, c)

    def conds(self, i, reencode=False):
        """(student, teacher) conditioning of pair i, collated for a batch of one: from the cache, or recomputed."""
        if reencode:
            return dopsd.collate([self.encode_s(i)]), dopsd.collate([self.encode_t(i)])
        return dopsd.collate([self.cond_s[i]]), dopsd.collate([self.cond_t[i]])

    def noise(self, index):
        g = torch.Generator().manual_seed(index)
        return torch.randn(1, self.C, self.h, self.w, generator=g).to(self.device)

    def step(self, K, index=0, stepwise=True, reencode=False):
        """One D-OPSD optimizer step on pair index % n, exactly as train()'s loop body (batch 1, grad_accum 1)."""
        i = index % len(self.captions)
        cs, ct = self.conds(i, reencode)
        with self.autocast():
            loss, _ = dopsd.dopsd_rollout(lambda x, s: self.student(x, s, cs), lambda x, s: self.teacher(x, s, ct),
                                          self.noise(index), dopsd.schedule("zimage", K, self.h, self.w), "x0", 1.0,
                                          stepwise=stepwise)
        self._finish(loss, ema=True)

    def sft_step(self, index=0):
        """One SFT optimizer step on pair index % n, as train()'s --method sft branch (flow matching at a random σ)."""
        i = index % len(self.captions)
        cs, _ = self.conds(i)
        g = torch.Generator().manual_seed(index)
        noise = torch.randn(1, self.C, self.h, self.w, generator=g).to(self.device)
        u = torch.rand(1, generator=g)
        sig = (3 * u / (1 + 2 * u)).to(self.device)                   # train()'s shifted σ density (shift 3)
        with self.autocast():
            loss = dopsd.sft_loss(lambda x, s: self.student(x, s, cs), self.x0[i][None], noise, sig)
            loss.backward()
        self._finish(loss, ema=False)                                  # SFT has no teacher to update

    def _finish(self, loss, ema):
        gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        loss.item(), gnorm.item()                   # train()'s one host sync per step
        self.opt.step()
        if ema:
            dopsd.ema_update(self.teacher_params, self.trainable, 0.9999)
        self.opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------------------------
# 1 + 4. step time of the real training loop, with every encoder call counted

class EncoderCalls:
    """Counts forwards of the text encoder (Qwen3Model), the VLM (Qwen3VLModel) and the VAE encoder while active, and
    snapshots the counts when the training loop starts (the first dopsd_rollout / sft_loss call).

    Class-level wraps of exactly those three forwards (the DiT is untouched, so timing is unaffected), plus wraps of
    the two module globals train() calls once per micro-batch; everything is restored on exit."""

    def __enter__(self):
        from diffusers.models.autoencoders.vae import Encoder
        from transformers import Qwen3Model, Qwen3VLModel
        self.calls = {"text_encoder": 0, "vlm": 0, "vae_encoder": 0}
        self.at_loop_start = None
        self._saved = []
        for key, cls in (("text_encoder", Qwen3Model), ("vlm", Qwen3VLModel), ("vae_encoder", Encoder)):
            self._wrap(cls, "forward", self._counting(key, cls.forward))
        for name in ("dopsd_rollout", "sft_loss"):
            self._wrap(dopsd, name, self._loop_marker(getattr(dopsd, name)))
        return self

    def _wrap(self, owner, name, fn):
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, fn)

    def _counting(self, key, fwd):
        def forward(*args, **kwargs):
            self.calls[key] += 1
            return fwd(*args, **kwargs)
        return forward

    def _loop_marker(self, fn):
        def wrapped(*args, **kwargs):
            if self.at_loop_start is None:
                self.at_loop_start = dict(self.calls)
            return fn(*args, **kwargs)
        return wrapped

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        return False

    def summary(self):
        start = self.at_loop_start or dict(self.calls)
        return {"before_loop": start, "in_loop": {k: self.calls[k] - start[k] for k in self.calls}}


def bench_train(root, s, device, method, work, tag="", extra=()):
    """Run `dopsd.py train` in-process for a few steps; return the per-step seconds from log.jsonl and encoder counts.
    extra: more train flags (the preserve phase adds --preserve-prompts)."""
    out = work / f"train_{method}{tag}"
    steps, warmup = s[f"{method}_steps"], s[f"{method}_warmup"]
    argv = ["train", "--data", str(root / "data"), "--model", str(root / "zimage"), "--vlm", str(root / "vlm"),
            "--out", str(out), "--method", method, "--device", str(device),
            "--resolution", str(s["resolution"]),      # the data is exactly this size: one bucket
            "--rollout-steps", str(K_MAIN),            # K = 4 (the default; explicit because it is the goal's K)
            "--rank", str(s["rank"]), "--alpha", str(2 * s["rank"]),   # LoRA r4 for dim 256, see FULL
            "--max-steps", str(steps),
            "--batch-size", "1", "--seed", "0",        # same data, batch and seed for both methods
            "--sample-every", "0",                     # 0 = no grid inside the loop (dopsd still renders the base row
                                                       # before and one grid after it: outside the timed steps)
            "--save-every", "0",                       # 0 = save only at the end, after the last timed step
            "--cache-dir", str(work / f"cache_{method}{tag}"),   # a fresh cache: every run encodes, and is counted
            *extra]
    log = io.StringIO()
    with EncoderCalls() as enc, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        t0 = time.perf_counter()
        rc = dopsd.main(argv)
        wall = time.perf_counter() - t0
    (work / f"train_{method}{tag}.log").write_text(log.getvalue())
    if rc != 0:
        raise RuntimeError(f"dopsd train --method {method} exited {rc}:\n{log.getvalue()[-3000:]}")
    secs = [json.loads(l)["sec"] for l in (out / "log.jsonl").read_text().splitlines() if l.strip()]
    timed = secs[warmup:]
    return dict(method=method, K=K_MAIN if method == "dopsd" else None, sec_per_step=statistics.median(timed),
                sec_min=min(timed), sec_max=max(timed), timed_steps=len(timed), warmup_steps=warmup,
                timed_secs=timed, all_secs=secs, run_wall_s=wall, encoder_calls=enc.summary(), n_pairs=s["n_images"])


def bench_train_alternating(root, s, device, work):
    """SFT, D-OPSD, SFT, D-OPSD, ..., SFT (s["train_pairs"] D-OPSD runs, each bracketed by SFT runs).

    Why not one run each: this machine's speed moves by +-10 % between runs a minute apart (seen: the same SFT step at
    0.51 s in one run and 0.57 s in another), which alone moves the ratio by 0.6. Bracketing every D-OPSD run with SFT
    runs cancels a slow drift, and pooling the runs averages the rest. s/step = median over all timed steps of a
    method; per_run_ratios = each D-OPSD run's median over the mean of its two neighbouring SFT medians (the spread
    says how far to trust the pooled ratio)."""
    sft = [bench_train(root, s, device, "sft", work, "_1")]
    dop = []
    for i in range(s["train_pairs"]):
        dop.append(bench_train(root, s, device, "dopsd", work, f"_{i + 1}"))
        sft.append(bench_train(root, s, device, "sft", work, f"_{i + 2}"))

    def pooled(runs):
        timed = [t for r in runs for t in r["timed_secs"]]
        return dict(runs[0], sec_per_step=statistics.median(timed), sec_min=min(timed), sec_max=max(timed),
                    timed_steps=len(timed), timed_secs=timed, run_medians=[r["sec_per_step"] for r in runs], runs=runs)

    out = {"dopsd": pooled(dop), "sft": pooled(sft)}
    for m_ in ("dopsd", "sft"):
        for k in ("all_secs", "encoder_calls", "run_wall_s"):
            out[m_].pop(k)
    out["ratio"] = out["dopsd"]["sec_per_step"] / out["sft"]["sec_per_step"]
    out["per_run_ratios"] = [d["sec_per_step"] / statistics.mean([sft[i]["sec_per_step"], sft[i + 1]["sec_per_step"]])
                             for i, d in enumerate(dop)]
    return out


def bench_preserve(root, s, device, work):
    """The cost of --preserve-prompts: D-OPSD steps with and without it, alternating (plain, preserve, plain, ...)
    like the train phase. Its floor is 2.0: a second roll-out of K student forward+backward and K base forwards (the
    base model sees text only, a shorter context than the teacher's, so slightly under 2 is possible)."""
    prompts = work / "preserve_prompts.txt"
    prompts.write_text("a photo of a dog on grass\na bowl of fruit on a table\n")
    plain, kept = [bench_train(root, s, device, "dopsd", work, "_plain_1")], []
    for i in range(s["train_pairs"]):
        kept.append(bench_train(root, s, device, "dopsd", work, f"_preserve_{i + 1}",
                                extra=("--preserve-prompts", str(prompts))))
        plain.append(bench_train(root, s, device, "dopsd", work, f"_plain_{i + 2}"))
    med = lambda runs: statistics.median(t for r in runs for t in r["timed_secs"])
    return dict(plain_s=med(plain), preserve_s=med(kept), ratio=med(kept) / med(plain),
                per_run_ratios=[k["sec_per_step"] / statistics.mean([plain[i]["sec_per_step"],
                                                                    plain[i + 1]["sec_per_step"]])
                                for i, k in enumerate(kept)])


def bench_loss_steps(root, s, device, work, ms=(K_MAIN, 1, 2)):
    """Seconds per D-OPSD step with --loss-steps M at K = 4, in rounds of M = 4, 1, 2 (drift hits each alike), and
    each M's ratio to M = K. Its pass-count floor: (K - M) student forwards + M (student forward+backward + teacher
    forward), over K of the latter; print_loss_steps evaluates it with the floor phase's timings of this DiT."""
    runs = {m: [] for m in ms}
    for i in range(s["train_pairs"]):
        for m in ms:
            runs[m].append(bench_train(root, s, device, "dopsd", work, f"_M{m}_{i + 1}", extra=("--loss-steps", str(m))))
    med = {m: statistics.median(t for r in rs for t in r["timed_secs"]) for m, rs in runs.items()}
    return dict(K=K_MAIN, sec_per_step=med, ratio_vs_K={m: med[m] / med[K_MAIN] for m in ms})


def print_loss_steps(r, floor):
    for m, sec in sorted(r["sec_per_step"].items(), key=lambda kv: -kv[0]):
        line = f"   M = {m}: {sec:.3f} s/step, {r['ratio_vs_K'][m]:.2f} x the M = K step"
        if floor:                                    # the pass-count floor of this ratio, on this DiT's own timings
            full = floor["fwdbwd_s"] + floor["fwd_t"]
            line += f" (floor {((r['K'] - m) * floor['fwd_s'] + m * full) / (r['K'] * full):.2f})"
        print(line)


def print_preserve(r):
    print(f"   D-OPSD step {r['plain_s']:.3f} s | with --preserve-prompts {r['preserve_s']:.3f} s | ratio "
          f"{r['ratio']:.2f} (floor 2.0: a second roll-out; per run {', '.join(f'{x:.2f}' for x in r['per_run_ratios'])})")


# --------------------------------------------------------------------------------------------------------------------
# floor: this DiT's own forward / backward / teacher-forward times, so the ratio can be judged against what the
# method must do rather than against a rule of thumb

def bench_floor(h, s):
    """Median seconds of the pieces one D-OPSD step is made of, and of whole harness steps, all interleaved in one
    process (so machine drift hits every piece alike), at a mid-schedule state with the cached contexts.

    fwd_s: student forward, no grad (one forward-equivalent); fwdbwd_s: student forward + loss + backward (what one
    SFT step computes, and what each roll-out step computes for the student); fwd_t: teacher forward, no grad, with
    its longer multimodal context. Floor of one D-OPSD step = K (fwdbwd_s + fwd_t); of one SFT step = fwdbwd_s.
    dopsd_step / sft_step: complete optimizer steps (Harness.step / sft_step), a drift-free cross-check of the ratio
    measured on the train loop."""
    cs, ct = h.conds(0)
    x = h.noise(0)
    sig = dopsd.schedule("zimage", K_MAIN, h.h, h.w)[1].expand(1).to(h.device)
    target = torch.zeros_like(x)
    n, it = len(h.captions), iter(range(10**9))

    def fwd_s():
        with torch.no_grad(), h.autocast():
            h.student(x, sig, cs)

    def fwd_t():
        with torch.no_grad(), h.autocast():
            h.teacher(x, sig, ct)

    def fwdbwd_s():
        with h.autocast():
            dopsd_loss(h.student(x, sig, cs), target, sig).backward()
        h.opt.zero_grad(set_to_none=True)

    t = _median_times({"fwd_s": fwd_s, "fwdbwd_s": fwdbwd_s, "fwd_t": fwd_t,
                       "dopsd_step": lambda: h.step(K_MAIN, next(it) % n), "sft_step": lambda: h.sft_step(next(it) % n)},
                      h.device, s["floor_repeats"], 1)
    r = {k: statistics.median(v) for k, v in t.items()}
    r["bwd_over_fwd"] = (r["fwdbwd_s"] - r["fwd_s"]) / r["fwd_s"]
    r["teacher_over_student_fwd"] = r["fwd_t"] / r["fwd_s"]
    r["dopsd_step_floor_s"] = K_MAIN * (r["fwdbwd_s"] + r["fwd_t"])
    r["sft_step_floor_s"] = r["fwdbwd_s"]
    r["ratio_floor_measured"] = r["dopsd_step_floor_s"] / r["sft_step_floor_s"]
    r["ratio_floor_nominal"] = 4 * K_MAIN / 3      # the rule of thumb: bwd = 2 fwd, teacher = student
    r["ratio_harness"] = r["dopsd_step"] / r["sft_step"]
    r["dopsd_step_over_floor"] = r["dopsd_step"] / r["dopsd_step_floor_s"] - 1
    r["sft_step_over_floor"] = r["sft_step"] / r["sft_step_floor_s"] - 1
    r["tokens_student_caption"] = len(h.cond_s[0])
    r["tokens_teacher_context"] = len(h.cond_t[0])
    # dopsd's only per-step work outside the DiT that is large enough to see: switching the active LoRA adapter
    # over the cached LoRA layers, 2K times per step
    t0 = time.perf_counter()
    for _ in range(10):
        dopsd.use_adapter(h.layers, "teacher")
        dopsd.use_adapter(h.layers, "student")
    r["adapter_switches_per_step_s"] = (time.perf_counter() - t0) / 20 * 2 * K_MAIN
    return r


# --------------------------------------------------------------------------------------------------------------------
# 3. feature cache vs re-encoding every step

def bench_reencode(h, s):
    """Median seconds of one K = 4 optimizer step with the cached features vs with the student's text features and the
    teacher's VLM features recomputed for the batch inside the step (what the public recipe does every step). The same
    pairs and noise in both; runs interleaved. Also the encoders alone, per pair.

    With make_tiny's 0.05 M-parameter encoders the compute overhead here is ~1 %. Estimated for Z-Image at 1024 px,
    per step: Qwen3-4B on the 512 padded caption tokens (~4 TFLOP) + Qwen3-VL-4B on ~600 tokens and 2304 patches
    (~7 TFLOP), against 4 x (3 student + 1 teacher) forward-equivalents of the 6 B DiT on ~4200 tokens (~900 TFLOP):
    also ~1 %. The cache's real saving there is memory: 2 x 4 B encoder weights (16 GB in bf16) off the GPU.
    """
    n, it = len(h.captions), iter(range(10**9))
    t = _median_times({"cached": lambda: h.step(K_MAIN, next(it) % n),
                       "reencode": lambda: h.step(K_MAIN, next(it) % n, reencode=True)},
                      h.device, s["reencode_repeats"], 1)
    enc = _median_times({"text": lambda: h.encode_s(0), "vlm": lambda: h.encode_t(0)}, h.device,
                        s["reencode_repeats"], 1)
    r = {"cached_s": statistics.median(t["cached"]), "reencode_s": statistics.median(t["reencode"]),
         "text_encoder_s": statistics.median(enc["text"]), "vlm_s": statistics.median(enc["vlm"]),
         "cached_all": t["cached"], "reencode_all": t["reencode"]}
    r["overhead"] = r["reencode_s"] / r["cached_s"] - 1
    # The two steps differ by exactly the encoder calls, so their time per step is the overhead itself, free of the
    # step-to-step noise (half the min-max range of the cached steps) that a ~1 % difference between whole steps
    # drowns in here.
    r["overhead_encoders"] = (r["text_encoder_s"] + r["vlm_s"]) / r["cached_s"]
    r["step_noise"] = (max(t["cached"]) - min(t["cached"])) / 2 / r["cached_s"]
    return r


# --------------------------------------------------------------------------------------------------------------------
# 2. peak memory of one step, step-wise vs one backward, in a fresh process per configuration

def _memory_child(args):
    """In a fresh process: set up, one warm-up step, then ONE measured step; print its memory as a JSON line.

    CPU: the step's own transient memory = VmHWM (peak RSS, reset via /proc/self/clear_refs just before the step)
    minus VmRSS just before it. Counted: everything the step allocates and touches -- autograd activations of the
    student graph(s), teacher forward transients, the fused loss's saved w*d, the LoRA gradients (re-allocated every
    step: zero_grad(set_to_none=True)), AdamW/EMA temporaries. Not counted: weights, cached features, AdamW state
    (allocated by the warm-up step), the interpreter. The parent runs us with a fixed glibc mmap threshold (64 KiB),
    so every tensor of 64 KiB or more is its own mapping and goes back to the OS when freed: RSS then follows live
    tensor bytes instead of hiding reused heap pages that the warm-up step left resident.
    CUDA: max_memory_allocated - memory_allocated, after reset_peak_memory_stats (tensor bytes, no allocator cache)."""
    cfg = json.loads(args)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    with contextlib.redirect_stdout(sys.stderr):    # keep stdout for the one JSON line
        h = Harness(Path(cfg["root"]), cfg["s"], device)
        h.step(cfg["K"], 0, stepwise=cfg["stepwise"])                 # warm-up: AdamW state, lazy inits
        import gc
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            h.step(cfg["K"], 1, stepwise=cfg["stepwise"])
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)             # hand back what the heap still holds
            status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                          # reset VmHWM to the current RSS
            before = status("VmRSS:")
            h.step(cfg["K"], 1, stepwise=cfg["stepwise"])
            peak = status("VmHWM:")
    print(json.dumps({"K": cfg["K"], "stepwise": cfg["stepwise"], "before_bytes": before, "peak_bytes": peak,
                      "step_bytes": peak - before}))


def bench_memory(root, s, device, threads):
    """{stepwise|one_backward: {K: step MB}} from one subprocess per (K, mode), run one after another."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",     # fixed (not adaptive) threshold, see _memory_child
               MALLOC_TRIM_THRESHOLD_="131072")                 # and give freed heap tops back promptly
    res = {"stepwise": {}, "one_backward": {}, "peak_rss_mb": {"stepwise": {}, "one_backward": {}}}
    for K in s["mem_ks"]:
        for stepwise in (True, False):
            arg = json.dumps({"root": str(root), "s": s, "device": str(device), "K": K, "stepwise": stepwise,
                              "threads": threads})
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-child", arg], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"memory child K={K} stepwise={stepwise} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            mode = "stepwise" if stepwise else "one_backward"
            res[mode][K] = r["step_bytes"] / 2**20
            res["peak_rss_mb"][mode][K] = r["peak_bytes"] / 2**20
    ks = list(s["mem_ks"])
    sw, ob = res["stepwise"], res["one_backward"]
    res["k8_over_k2_stepwise"] = sw[ks[-1]] / sw[ks[0]]
    res["k8_over_k2_one_backward"] = ob[ks[-1]] / ob[ks[0]]
    # sanity: one backward keeps K graphs, so it must grow with K (by roughly one step's activations per step);
    # step-wise keeps one, so it must not. If not, the measurement (not the code) is suspect.
    res["sane"] = bool(all(ob[a] < ob[b] for a, b in zip(ks, ks[1:])) and ob[ks[-1]] > 1.5 * sw[ks[-1]])
    return res


# --------------------------------------------------------------------------------------------------------------------
# 5. our sampler vs the diffusers pipeline

def bench_sampler(root, s, device):
    """Median seconds of dopsd's sampling path vs ZImagePipeline.__call__: same prompt embeds, 8 steps, size, seed,
    no CFG, both ending in a PIL image. Ours is the code dopsd.sample runs after loading the model and encoding the
    prompt (euler_sample over the family's velocity, then the family's decode); model loading and prompt encoding are
    left out of both. Interleaved runs; also the largest pixel difference between the two images (expect <= 1)."""
    from diffusers import ZImagePipeline
    cuda = device.type == "cuda"
    pipe = ZImagePipeline.from_pretrained(str(root / "zimage"), dtype=torch.bfloat16 if cuda else torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    fam, R, seed = dopsd.FAMILIES["zimage"], s["resolution"], 0
    tr, vae = pipe.transformer, pipe.vae
    cond = dopsd.collate(dopsd.student_features("zimage", pipe.text_encoder, pipe.tokenizer, [PROMPT]))
    h = w = R // dopsd.latent_cell("zimage", vae)
    steps = fam["deploy"]                                               # 8, Z-Image-Turbo's deploy count

    def ours():                                                         # = dopsd.sample after its loading lines
        noise = torch.randn(1, tr.config.in_channels, h, w, generator=torch.Generator().manual_seed(seed))
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            x = dopsd.euler_sample(lambda x, s: fam["velocity"](tr, x, s, cond), noise.to(device),
                                   dopsd.schedule("zimage", steps, h, w))
            return fam["decode"](vae, x)[0]

    def theirs():
        return pipe(prompt_embeds=cond, num_inference_steps=steps, guidance_scale=0.0, height=R, width=R,
                    generator=torch.Generator().manual_seed(seed)).images[0]

    import numpy as np
    diff = int(np.abs(np.asarray(ours(), np.int16) - np.asarray(theirs(), np.int16)).max())
    t = _median_times({"ours": ours, "pipeline": theirs}, device, s["sampler_repeats"], 1)
    r = {"ours_s": statistics.median(t["ours"]), "pipeline_s": statistics.median(t["pipeline"]), "steps": steps,
         "max_pixel_diff": diff, "ours_all": t["ours"], "pipeline_all": t["pipeline"]}
    r["rel_diff"] = r["ours_s"] / r["pipeline_s"] - 1
    return r


# --------------------------------------------------------------------------------------------------------------------
# 6. the fused divergence loss (unchanged from the first version of this file)

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
        if name == "triton":  # a Triton launch is not an aten op: add its reads of u_s, u_t and write of w·d by hand
            res[f"{name}_bytes_per_elem"] += 3 * s
    res["speedup_torch_vs_naive"] = res["naive_ms"] / res["torch_ms"]

    if device.type == "cuda" and HAS_TRITON:
        # forward kernel alone: reads u_s and u_t, writes w·d (plus 4 bytes per 1024-element block of partials)
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


def print_loss_table(r):
    print(f"{r['device']} {r['dtype']} shape {r['shape']} ({r['numel'] / 1e6:.2f}M elements)")
    print(f"  {'path':8s} | {'fwd+bwd ms':>10s} | {'saved MB':>8s} | {'B/elem touched':>14s}")
    for p in ("naive", "torch", "triton"):
        if f"{p}_ms" in r:
            print(f"  {p:8s} | {r[p + '_ms']:10.2f} | {r[p + '_saved_bytes'] / 2**20:8.2f} | "
                  f"{r[p + '_bytes_per_elem']:14.1f}")
    print(f"  torch path speed-up over naive: {r['speedup_torch_vs_naive']:.2f}x")
    if "triton_fwd_gbps" in r:
        print(f"  triton fwd kernel {r['triton_fwd_gbps']:.0f} GB/s vs copy {r['copy_gbps']:.0f} GB/s "
              f"({100 * r['triton_fraction_of_copy']:.0f}% of copy)")


# --------------------------------------------------------------------------------------------------------------------
# 9. the feature cache at scale: launch to first step, first vs second run, memory against N, ranks splitting the work

def make_cache_data(folder, n, side=256, seed=0):
    """n generated images (a coloured disc or box on a coloured ground; every 4th one 4:3, the others square, so that
    two buckets are in play) with same-name captions."""
    import random
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        w, h = (side * 4 // 3, side) if i % 4 == 3 else (side, side)
        im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(side // 8, side // 3)
        shape = ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"im{i:05d}.png")
        (folder / f"im{i:05d}.txt").write_text(f"picture {i}: a {'disc' if i % 2 else 'box'} in [V] style")


def timed_launch(cmd, log):
    """Run cmd to its end: (seconds from launch to the first line of log -- the first optimizer step --, wall
    seconds, peak RSS in MB of the process, its stdout + stderr)."""
    out = tempfile.TemporaryFile()
    t0, first = time.perf_counter(), None
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if first is None and log.is_file() and log.stat().st_size:
            first = time.perf_counter() - t0
        if pid:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out.seek(0)
    text = out.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed:\n{text[-3000:]}")
    return first, wall, usage.ru_maxrss / 1024, text


def bench_cache(work, s, device):
    """For both families and N in s["cache_ns"]: `dopsd.py train --max-steps 1` on a fresh cache, then again on the
    same cache (a new --out, as a second experiment on the same data would); the time from launch to the first
    optimizer step and the process's peak RSS of each. On CPU the training device is the host, so its memory is the
    RSS; on CUDA the DiT and the batches are all that the device holds, the cache never is. Then 2 torchrun ranks on a
    fresh cache, counting the entries each encoded."""
    mt = _load_make_tiny()
    models = work / "cache_models"
    with contextlib.redirect_stdout(io.StringIO()):
        mt.make_zimage(models / "zimage")
        mt.make_klein(models / "klein")
        mt.make_vlm(models / "vlm")
    for n in s["cache_ns"]:
        make_cache_data(work / f"cache_data_{n}", n)
    r = {"n": list(s["cache_ns"])}
    dev = ["--device", "cpu" if device.type == "cpu" else "cuda"]
    args = lambda fam, n, out, cache: [
        sys.executable, str(HERE.parent / "dopsd.py"), "train", "--data", str(work / f"cache_data_{n}"),
        "--model", str(models / fam), "--vlm", str(models / "vlm"), "--out", str(out), "--cache-dir", str(cache),
        "--resolution", "256", "--rollout-steps", "2", "--rank", "4", "--max-steps", "1", "--sample-every", "0", *dev]
    for fam in ("zimage", "klein"):
        for n in s["cache_ns"]:
            cache = work / f"cache_{fam}_{n}"
            for run in ("first", "second"):
                out = work / f"cache_run_{fam}_{n}_{run}"
                first, wall, rss, _ = timed_launch(args(fam, n, out, cache), out / "log.jsonl")
                r[f"{fam}_{n}_{run}"] = dict(to_first_step_s=first, wall_s=wall, peak_rss_mb=rss)
                print(f"   {fam:6s} N = {n:5d} {run:6s} run: first step after {first:6.1f} s (process {wall:5.1f} s), "
                      f"peak RSS {rss:6.0f} MB", flush=True)
        lo, hi = s["cache_ns"][0], s["cache_ns"][-1]
        r[f"{fam}_second_over_first"] = r[f"{fam}_{hi}_second"]["to_first_step_s"] / r[f"{fam}_{hi}_first"][
            "to_first_step_s"]
        r[f"{fam}_cache_mb"] = sum(f.stat().st_size for f in (work / f"cache_{fam}_{hi}").glob("*")) / 1e6
        r[f"{fam}_rss_growth"] = max(r[f"{fam}_{hi}_{run}"]["peak_rss_mb"] / r[f"{fam}_{lo}_{run}"]["peak_rss_mb"] - 1
                                     for run in ("first", "second"))
    lo = s["cache_ns"][0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + \
        args("klein", lo, work / "cache_run_ddp", work / "cache_ddp")[1:]
    _, wall, _, text = timed_launch(cmd, work / "cache_run_ddp" / "log.jsonl")
    import re
    r["ranks_encoded"] = {int(k): int(v) for k, v in re.findall(r"rank (\d+): encoding (\d+) of the", text)}
    r["ranks_total"] = lo
    print(f"   2 torchrun ranks, fresh cache of {lo} entries: encoded {r['ranks_encoded']} ({wall:.0f} s)")
    return r


def print_cache(r):
    for fam in ("zimage", "klein"):
        print(f"   {fam}: N = {r['n'][-1]}: second run / first run, launch to first step = "
              f"{r[f'{fam}_second_over_first']:.3f} (goal <= {GOALS['cache_reuse']}); peak RSS N = {r['n'][-1]} over "
              f"N = {r['n'][0]}: {100 * r[f'{fam}_rss_growth']:+.1f} % (goal <= {100 * GOALS['cache_rss']:.0f} %)")
        print(f"   {fam}: cache on disk at N = {r['n'][-1]}: {r[f'{fam}_cache_mb']:.1f} MB "
              f"({1e3 * r[f'{fam}_cache_mb'] / r['n'][-1]:.0f} kB an image, tiny encoders at 256 px)")


# --------------------------------------------------------------------------------------------------------------------
# goals and report

def check_goals(res, device):
    """{goal: {value, limit, pass}}; pass is None when the measurement did not run (skipped or failed)."""
    tr, mem, sm = (res.get(k) if _ok(res.get(k)) else None for k in ("train", "memory", "sampler"))
    ratio = tr["ratio"] if tr else None
    m = mem["k8_over_k2_stepwise"] if mem else None
    enc = None
    if tr:
        n, runs = tr["dopsd"]["n_pairs"], tr["dopsd"]["runs"] + tr["sft"]["runs"]
        batches = math.ceil(n / dopsd.ENCODE_BATCH)                            # one bucket: captions batched
        expect = {"dopsd": {"text_encoder": batches, "vlm": n, "vae_encoder": 0},  # caption + [image, caption]
                  "sft": {"text_encoder": batches, "vlm": 0, "vae_encoder": n}}    # caption + target latents
        enc = dict(in_loop_calls=sum(sum(r["encoder_calls"]["in_loop"].values()) for r in runs),
                   cache_once_per_pair=all(r["encoder_calls"]["before_loop"] == expect[r["method"]] for r in runs))
    d = sm["rel_diff"] if sm else None
    ls = res["loss_steps"]["ratio_vs_K"][1] if _ok(res.get("loss_steps")) else None
    ca = res.get("cache") if _ok(res.get("cache")) else None
    reuse = max(ca["zimage_second_over_first"], ca["klein_second_over_first"]) if ca else None
    rss = max(ca["zimage_rss_growth"], ca["klein_rss_growth"]) if ca else None
    split = ca and sorted(ca["ranks_encoded"]) == [0, 1] and sum(ca["ranks_encoded"].values()) == ca["ranks_total"] \
        and max(ca["ranks_encoded"].values()) - min(ca["ranks_encoded"].values()) <= 1
    fl = res.get("floor") if _ok(res.get("floor")) else None
    ratio_note = "the goal is for CPU fp32" if device.type == "cpu" else \
        "measured on CUDA bf16 with gradient checkpointing; the goal is for CPU fp32"
    if fl:   # the two drift-free cross-checks, so a verdict decided by noise is visible as such
        ratio_note += (f"; cross-checks: floor on this DiT {fl['ratio_floor_measured']:.2f}, interleaved whole steps "
                       f"{fl['ratio_harness']:.2f}")
    goals = {
        "ratio_dopsd_over_sft_k4": dict(value=ratio, limit=f"<= {GOALS['ratio']}",
                                        ok=ratio is not None and ratio <= GOALS["ratio"], note=ratio_note),
        "mem_k8_over_k2_stepwise": dict(value=m, limit=f"<= {GOALS['mem']}", ok=m is not None and m <= GOALS["mem"],
                                        note=None if mem is None or mem["sane"] else "memory sanity check failed"),
        "encoders_outside_loop": dict(value=enc, limit="0 encoder calls in the loop, one per pair before it",
                                      ok=enc is not None and enc["in_loop_calls"] == 0 and enc["cache_once_per_pair"]),
        "sampler_within_5pct": dict(value=d, limit=f"ours <= (1 + {GOALS['sampler']}) x pipeline",
                                    ok=d is not None and d <= GOALS["sampler"]),
        "loss_steps_m1_over_mk": dict(value=ls, limit=f"<= {GOALS['loss_steps']} (K = {K_MAIN})",
                                      ok=ls is not None and ls <= GOALS["loss_steps"]),
        "cache_second_run_over_first": dict(value=reuse, limit=f"<= {GOALS['cache_reuse']} (launch to first step, "
                                            "largest N, worse family)", ok=reuse is not None and reuse <= GOALS["cache_reuse"]),
        "cache_peak_rss_growth": dict(value=rss, limit=f"<= {GOALS['cache_rss']} (largest N over smallest)",
                                      ok=rss is not None and rss <= GOALS["cache_rss"]),
        "cache_ranks_split": dict(value=ca["ranks_encoded"] if ca else None, limit="2 ranks encode half each",
                                  ok=bool(split)),
    }
    for g in goals.values():
        ok = g.pop("ok")
        g["pass"] = ok if g["value"] is not None else None
    return goals


def _wait_idle(max_wait):
    """Wait (up to max_wait s) until other processes use < 0.1 core, measured over 2 s: a 2-thread torch job on 2
    cores slows down many-fold when anything else runs. Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        with LoadMeter() as lm:
            time.sleep(2)
        if lm.foreign is None or lm.foreign < 0.1:
            break
    return time.perf_counter() - t0


def _phase(res, loads, name, fn, wait_idle=0):
    """Run one measurement; record its result (or its error: the other measurements still run) and foreign load."""
    print(f"\n== {name} ==", flush=True)
    waited = _wait_idle(wait_idle) if wait_idle else 0.0
    with LoadMeter() as lm:
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - a broken measurement is reported in the JSON, not fatal
            traceback.print_exc()
            print(f"   ERROR: {type(e).__name__}: {e}")
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    loads[name] = dict(wall_s=round(lm.wall, 1), waited_for_idle_s=round(waited, 1),
                       foreign_cores=None if lm.foreign is None else round(lm.foreign, 2))
    warn = lm.foreign is not None and lm.foreign > 0.2
    print(f"   ({lm.wall:.0f} s; other processes used {lm.foreign if lm.foreign is not None else float('nan'):.2f} "
          f"cores meanwhile{' -- TIMINGS DISTORTED, rerun on an idle machine' if warn else ''})", flush=True)


def _ok(r):
    return isinstance(r, dict) and "error" not in r


# --------------------------------------------------------------------------------------------------------------------
# printing: one small table per measurement

def print_train(r):
    print(f"   {'method':6s} {'K':>2s} | {'s/step':>7s} | {'min':>6s} | {'max':>6s} | timed steps | per-run medians")
    for m_ in ("dopsd", "sft"):
        x = r[m_]
        print(f"   {m_:6s} {x['K'] or '':>2} | {x['sec_per_step']:7.3f} | {x['sec_min']:6.3f} | {x['sec_max']:6.3f} | "
              f"{x['timed_steps']:4d} ({len(x['runs'])} runs x {x['timed_steps'] // len(x['runs'])}) | "
              + ", ".join(f"{v:.3f}" for v in x["run_medians"]))
    for m_ in ("dopsd", "sft"):
        for i, q in enumerate(r[m_]["runs"]):
            c = q["encoder_calls"]
            print(f"   encoder forwards, {m_} run {i + 1}: before the loop {c['before_loop']}, in the loop {c['in_loop']}")
    print(f"   ratio dopsd/sft = {r['ratio']:.2f} (per D-OPSD run: {', '.join(f'{v:.2f}' for v in r['per_run_ratios'])})"
          f"  goal <= {GOALS['ratio']}; nominal floor 4K/3 = {4 * K_MAIN / 3:.2f}")


def print_floor(r, train):
    print(f"   student fwd {r['fwd_s']:.3f} s | student fwd+bwd {r['fwdbwd_s']:.3f} s (bwd = {r['bwd_over_fwd']:.2f} fwd: "
          f"LoRA computes no base-weight gradients) | teacher fwd {r['fwd_t']:.3f} s (= "
          f"{r['teacher_over_student_fwd']:.2f} student fwd: context {r['tokens_teacher_context']} vs "
          f"{r['tokens_student_caption']} caption tokens)")
    print(f"   floor: dopsd step K(fwd+bwd + teacher fwd) = {r['dopsd_step_floor_s']:.3f} s, sft step fwd+bwd = "
          f"{r['sft_step_floor_s']:.3f} s -> ratio floor {r['ratio_floor_measured']:.2f} on this DiT "
          f"({r['ratio_floor_nominal']:.2f} nominal)")
    print(f"   whole steps, same interleaving: dopsd {r['dopsd_step']:.3f} s ({100 * r['dopsd_step_over_floor']:+.1f} % vs "
          f"floor), sft {r['sft_step']:.3f} s ({100 * r['sft_step_over_floor']:+.1f} %) -> ratio {r['ratio_harness']:.2f}; "
          f"adapter switching {1e3 * r['adapter_switches_per_step_s']:.0f} ms per dopsd step")
    if train:   # the train loop ran minutes earlier: machine drift shows up here, not in the interleaved numbers
        print(f"   train loop (earlier): dopsd {train['dopsd']['sec_per_step']:.3f} s "
              f"({100 * (train['dopsd']['sec_per_step'] / r['dopsd_step_floor_s'] - 1):+.1f} % vs floor), sft "
              f"{train['sft']['sec_per_step']:.3f} s ({100 * (train['sft']['sec_per_step'] / r['sft_step_floor_s'] - 1):+.1f} %)")


def print_reencode(r):
    print(f"   cached step {r['cached_s']:.3f} s | re-encoding step {r['reencode_s']:.3f} s ({100 * r['overhead']:+.1f} %; "
          f"step-to-step noise +-{100 * r['step_noise']:.1f} %)")
    print(f"   the encoders re-encoding adds, per step: text {r['text_encoder_s'] * 1e3:.1f} ms + VLM {r['vlm_s'] * 1e3:.1f} "
          f"ms = {100 * r['overhead_encoders']:.1f} % of a cached step (tiny encoders; see bench_reencode for Z-Image)")


def print_memory(r, s, device):
    how = "VmHWM - VmRSS before the step" if device.type == "cpu" else "max_memory_allocated - memory_allocated"
    print(f"   {'K':>3s} | {'step-wise MB':>12s} | {'one backward MB':>15s}   (the step's own peak: {how})")
    for K in s["mem_ks"]:
        print(f"   {K:3d} | {r['stepwise'][K]:12.1f} | {r['one_backward'][K]:15.1f}")
    k0, k1 = s["mem_ks"][0], s["mem_ks"][-1]
    print(f"   K{k1}/K{k0}: step-wise {r['k8_over_k2_stepwise']:.2f} (goal <= {GOALS['mem']}), one backward "
          f"{r['k8_over_k2_one_backward']:.2f} | sanity (one backward grows with K, step-wise stays below it): "
          f"{'ok' if r['sane'] else 'FAILED -- the memory numbers are suspect'}")


def print_sampler(r, s):
    print(f"   ours {r['ours_s']:.3f} s | ZImagePipeline.__call__ {r['pipeline_s']:.3f} s | {100 * r['rel_diff']:+.1f} % "
          f"({r['steps']} steps, {s['resolution']} px, same embeds and seed; images differ by at most "
          f"{r['max_pixel_diff']} / 255)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small DiT, few repeats: a smoke run (~1.5 min), numbers "
                   "not meaningful")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default, one per core)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)} "
                   "(default: all)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SEC", help="before each measurement, wait up to SEC "
                   "seconds for other processes to leave the CPU (for shared machines; default 0: don't wait)")
    p.add_argument("--keep", metavar="DIR", help="build the model and runs in DIR and keep them (a DIR from an earlier "
                   "bench run is emptied first; default: a temp dir, removed at the end)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a goal fails")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)      # internal: one memory measurement
    a = p.parse_args(argv)
    if a.memory_child:
        return _memory_child(a.memory_child)
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    s = dict(QUICK if a.quick else FULL)
    only = [x for x in PHASES if x in a.only.split(",")]
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    t_logging.set_verbosity_error()

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dopsd_bench_"))
    if a.keep and work.exists() and any(work.iterdir()):
        if not (work / ".dopsd_bench").is_file():   # never empty a folder this script did not make
            p.error(f"--keep {work}: folder exists and is not from a previous bench run; pick a new or empty folder")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".dopsd_bench").touch()
    root = work / "model"
    res, loads = {"quick": a.quick, "settings": dict(s, K=K_MAIN, goals=GOALS)}, {}
    res["machine"] = m = machine_info(device)
    print(f"machine: {m['cpu']} ({m['arch']}), {m['cores']} cores ({m['usable_cores']} usable), {m['ram_gb']} GB RAM, "
          f"torch {m['torch_threads']} threads, " + (f"GPU {m['gpu']}" if m["gpu"] else "no GPU")
          + f" | bench device {device} | " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
          + (" | QUICK run: numbers are not meaningful" if a.quick else ""))
    harness = {}

    def get_harness():                   # built on first use, inside a phase (its errors are that phase's errors)
        if "h" not in harness:
            with contextlib.redirect_stdout(io.StringIO()):
                harness["h"] = Harness(root, s, device, keep_encoders="reencode" in only)
        return harness["h"]

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            res["model"] = mi = build_bench_model(root, s)
        print(f"model: Z-Image DiT dim {mi['dim']}, {mi['n_layers']} layers + {mi['n_refiner_layers']}+"
              f"{mi['n_refiner_layers']} refiner, {mi['n_heads']} heads, {mi['dit_params'] / 1e6:.2f} M params "
              f"(text encoder {mi['text_encoder_params'] / 1e6:.2f} M, VAE {mi['vae_params'] / 1e6:.2f} M) | "
              f"{mi['resolution']}x{mi['resolution']} px -> {mi['image_tokens']} image tokens | LoRA r{mi['lora_rank']} "
              f"alpha {mi['lora_alpha']} | {mi['n_images']} training pairs, batch 1, seed 0, K = {K_MAIN}")
        phases = {
            "train": (lambda: bench_train_alternating(root, s, device, work), print_train),
            "preserve": (lambda: bench_preserve(root, s, device, work), print_preserve),
            "floor": (lambda: bench_floor(get_harness(), s),
                      lambda r: print_floor(r, res["train"] if _ok(res.get("train")) else None)),
            "loss_steps": (lambda: bench_loss_steps(root, s, device, work),
                           lambda r: print_loss_steps(r, res["floor"] if _ok(res.get("floor")) else None)),
            "reencode": (lambda: bench_reencode(get_harness(), s), print_reencode),
            "memory": (lambda: bench_memory(root, s, device, torch.get_num_threads()),
                       lambda r: print_memory(r, s, device)),
            "sampler": (lambda: bench_sampler(root, s, device), lambda r: print_sampler(r, s)),
            "cache": (lambda: bench_cache(work, s, device), print_cache),
            "loss": (lambda: [bench_loss(dev, dtype=dt, repeats=s["loss_repeats"])
                              for dev in ["cpu"] + (["cuda"] if device.type == "cuda" else [])
                              for dt in (torch.float32, torch.bfloat16)],
                     lambda r: [print_loss_table(x) for x in r]),
        }
        for name in only:
            if name == "memory":
                harness.clear()          # free the in-process model before the children run
            measure, show = phases[name]

            def run(measure=measure, show=show):
                r = measure()
                show(r)
                return r
            _phase(res, loads, name, run, a.wait_idle)
    finally:
        harness.clear()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    res["load"] = loads
    res["goals"] = goals = check_goals(res, device)
    print("\n== goals ==")
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else json.dumps(v)
    for k, g in goals.items():
        verdict = "SKIP" if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
        print(f"   {verdict}  {k}: {fmt(g['value'])} (goal {g['limit']})" + (f" [{g['note']}]" if g.get("note") else ""))
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    distorted = [k for k, v in loads.items() if v["foreign_cores"] and v["foreign_cores"] > 0.2]
    print(f"   total wall time {res['wall_s']:.0f} s" + (f"; other processes loaded the CPU during: "
                                                       f"{', '.join(distorted)} (those numbers are unreliable)"
                                                       if distorted else ""))
    print(json.dumps(res, default=str))
    return 1 if a.strict and any(g["pass"] is False for g in goals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
