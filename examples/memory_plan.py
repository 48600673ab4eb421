"""
memory_plan.py -- GPU memory, host RAM and disk of a dopsd.py training run, from config files alone.
Nothing is downloaded but JSON files: it answers "does my GPU fit?" before a 20 GB download.

Every component (DiT, text encoder, VAE, the Z-Image teacher's Qwen3-VL) is built from its config.json on the meta
device: shapes, no storage, no weight file read. The student LoRA is attached exactly as dopsd.py attaches it, and an
fp8 base is cast by dopsd.py's own store_base_in_fp8, so the counts are exact; only the activations are estimated, by
a per-token formula calibrated on CPU (see ACT_COEF). With hub ids in place of folders, only the JSON files are fetched.
--fit finds, for 12, 16 and 24 GiB GPUs and a bf16 or fp8 base, the largest resolution and LoRA rank that fit.

Run as:
  python examples/memory_plan.py --model examples/configs/Z-Image-Turbo --vlm examples/configs/Qwen3-VL-4B-Instruct
  python examples/memory_plan.py --model examples/configs/FLUX.2-klein-9B --base-precision fp8 --data ./imgs
  python examples/memory_plan.py --fit --vlm examples/configs/Qwen3-VL-4B-Instruct --model
      examples/configs/Z-Image-Turbo examples/configs/FLUX.2-klein-4B examples/configs/FLUX.2-klein-9B
"""

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dopsd  # noqa: E402

# Every count is exact but the activations, estimated by the formula below.
#
# Activations of ONE student forward with grad: the roll-out backpropagates step by step, so K does not enter. Bytes
# per token per block that autograd saves under CUDA bf16 autocast (d = DiT width, f = MLP width, r = LoRA rank):
#   Z-Image       48d + 8f + 14r  six RMSNorms keep a bf16 input and an fp32 copy (36d); the linears' bf16 inputs,
#                                 attention's q, k, v, out (8d); SwiGLU w1·x, w3·x, silu (6f); 7 rank-r hiddens
#   klein double  28d + 8f + 12r  per token of either stream: 2 LayerNorms, fp32 under CUDA autocast (8d), qk-norms
#                                 in fp32 (8d), attention (8d), linear_in + silu (6f), the linears' bf16 inputs
#   klein single  28d + 8f + 4r   LayerNorm (4d), the fused qkv+MLP output kept whole (6d + 4f), qk-norms (8d), rope
#                                 q, k and attention out (6d), silu (2f), bf16 casts of the LoRA'd linears' inputs
#   --full        96d / 48d / 42d + 8f: no LoRA, but norm and modulation multiplies also keep their other operand
# peft's own input cast is off (add_lora_adapters), so a LoRA'd linear whose input is already bf16 shares the copy its
# base linear saves. With the cast on, each kept its own: measured 8d more per token for Z-Image, 6d for klein's
# double blocks; the single blocks' LoRA inputs come out of fp32 ops, so autocast casts them afresh either way.
# S = (H/16)(W/16) image tokens, L = 512 text tokens (the encoders' limit: exact for klein, which pads; an upper bound
# for Z-Image captions). Z-Image pads both to multiples of 32 and refines each alone before the joint layers.
# Gradient checkpointing keeps each block's input (2d per token) and recomputes one block at a time. Apart from this,
# autocast caches a bf16 copy of every trainable fp32 weight while a student forward runs, and linear saves it for
# backward: 2 bytes per trainable parameter (the "autocast copies" row; for --full a second DiT). The teacher's
# adapter is frozen while it runs, so its casts are not cached.
# Calibration (test_dopsd.py, "activation formula"): CPU bf16 autocast, one student forward, bytes of the distinct
# storages saved_tensors_hooks sees (CPU autocast keeps LayerNorm in bf16: cuda=False drops 2d per LayerNorm). Tiny
# DiTs: whole forward within 5%, LoRA and --full. The version with peft's cast on was also checked at real width
# (Z-Image d=3840, klein-4B d=3072, LoRA r64): every block whose input carries grad within 0.3%.
# An fp8 base adds one thing: a block's LoRA'd linears keep their weights' bf16 copies (for the input gradient) from
# its recompute to its backward, the "fp8 upcast" row; measured the same way on the tiny DiTs, it is exact.
ACT_COEF = {"zimage": [(48, 48, 14, 0)], "klein": [(28, 20, 12, 2), (28, 14, 4, 1)]}   # (d, d more if full, r, LNs)


def dit_activations(family, c, S, L, rank, full=False, checkpointing=True, cuda=True):
    """Bytes autograd keeps for one student forward of the DiT with config c (a dict), batch 1; see the formula."""
    pad = lambda n: -(-n // 32) * 32
    if family == "zimage":
        d = c["dim"]
        blocks = [(c["n_refiner_layers"], pad(S)), (c["n_refiner_layers"], pad(L)), (c["n_layers"], pad(S) + pad(L))]
        coef = ACT_COEF["zimage"] * 3                                       # refiners and main layers: same block
        f = int(d / 3 * 8)
    else:
        d, coef = c["num_attention_heads"] * c["attention_head_dim"], ACT_COEF["klein"]
        blocks, f = [(c["num_layers"], S + L), (c["num_single_layers"], S + L)], int(d * c["mlp_ratio"])
    per_token = [(a + x * full - 2 * ln * (not cuda)) * d + 8 * f + cr * rank * (not full) for a, x, cr, ln in coef]
    if not checkpointing:
        return sum(n * T * p for (n, T), p in zip(blocks, per_token))
    return sum(n * T * 2 * d for n, T in blocks) + max(T * p for (n, T), p in zip(blocks, per_token) if n)


HEADROOM = 1.5 * 2**30    # --fit: kept free for the CUDA context and the allocator's slack, which the plan leaves out
ENTRY_HEADER = 1024       # a cache file's safetensors header (tensor names and shapes, the entry's key: its caption)
PREVIEW = 4               # training images whose conditioning the sample grids keep on the device (make_preview)
FIT_RESOLUTIONS, FIT_RANKS, FIT_GIB = range(64, 1537, 64), (1, 2, 4, 8, 16, 32, 64, 128), (12, 16, 24)
count = lambda m: sum(p.numel() for p in m.parameters())


def _meta(lib, cls, path, sub=None):
    """A component with every tensor on the meta device, from its config.json alone."""
    import diffusers, transformers
    try:
        with torch.device("meta"):
            if lib == "diffusers":
                k = getattr(diffusers, cls)
                return k.from_config(k.load_config(path, subfolder=sub))
            return getattr(transformers, cls)(transformers.AutoConfig.from_pretrained(path, subfolder=sub or ""))
    except (OSError, ValueError, TypeError) as err:
        raise dopsd.UserError(f"{path}{'/' + sub if sub else ''}: cannot read config.json ({type(err).__name__}); "
                              "pass a local folder with the config files, e.g. "
                              "examples/configs/Qwen3-VL-4B-Instruct") from None


@functools.lru_cache(maxsize=None)
def _encoders(model, vlm, teacher_vlm):
    """Counts of the text encoder and VAE and, for the Z-Image teacher, of its Qwen3-VL: whole (as it loads to CPU)
    and without its language model, whose tensors are the text encoder's own (load_hybrid_vlm assigns them)."""
    import diffusers
    index = diffusers.DiffusionPipeline.load_config(model)
    te, vae = (_meta(*index[k], model, k) for k in ("text_encoder", "vae"))
    n = dict(text_encoder=count(dopsd.text_model(te)), text_encoder_all=count(te),   # the GPU gets no LM head
             vae=count(vae), vlm=0, vlm_total=0, width=te.config.hidden_size,
             layers=te.config.num_hidden_layers, mlp=te.config.intermediate_size,
             vocab=0)          # dopsd runs the encoder without its LM head (dopsd.text_model): no logits
    if teacher_vlm:                                         # dopsd keeps vlm.model: no lm_head (tied anyway)
        v = _meta("transformers", "Qwen3VLForConditionalGeneration", vlm).model
        n.update(vlm_total=count(v), vlm=count(v) - count(v.language_model))
    return n


@functools.lru_cache(maxsize=None)
def _dit(model, family, full, dtype):
    """The DiT on the meta device as train() sets it up. LoRA: loaded in dtype, the student adapter attached by
    add_lora_adapters, then stored in float8 by dopsd.store_base_in_fp8 (diffusers' enable_layerwise_casting, which
    runs on meta). Returns counts and the base's bytes both ways, each parameter at its actual dtype, and the largest
    block's float8 weights that a checkpointed recompute upcasts and keeps until that block's backward.
    The adapter is attached at rank 1: a LoRA'd linear holds r·(in + out) factor weights, so rank r has exactly r
    times as many ("trainable" is per unit of rank), and nothing else here depends on the rank; one build then
    serves every rank --fit tries (test_lora_count_equals_add_lora_adapters checks it against a real attach)."""
    import diffusers
    dit = _meta(*diffusers.DiffusionPipeline.load_config(model)["transformer"], model, "transformer")
    n = dict(config=dict(dit.config), dit=count(dit))
    if full:                                                # FSDP2's units: each repeated block, then the root
        blocks = [count(b) for b in dit.modules() if type(b).__name__ in dit._repeated_blocks]
        return {**n, "trainable": n["dit"], "block": max(blocks), "root": n["dit"] - sum(blocks)}
    for p in dit.parameters():                              # load_pipeline's dtype (on meta: the label only)
        p.data = p.data.to(dtype)
    with torch.device("meta"):
        dopsd.add_lora_adapters(dit.requires_grad_(False), dopsd.LORA_TARGETS[family], 1, 2.0, ("student",))
    base = lambda: [(k, p) for k, p in dit.named_parameters() if ".lora_" not in k]
    nbytes = lambda: sum(p.numel() * p.element_size() for _, p in base())
    n.update(trainable=sum(p.numel() for k, p in dit.named_parameters() if ".lora_" in k), bytes=nbytes())
    dopsd.store_base_in_fp8(dit, dtype)                     # after the adapters, as train_rank calls it
    f8 = torch.float8_e4m3fn
    blocks = [b for m in dit.children() if isinstance(m, torch.nn.ModuleList) for b in m]   # the checkpointed blocks
    # autograd keeps a linear's weight only to get the gradient of its input: the LoRA'd linears (their inputs carry
    # grad); a modulation linear's input (the timestep embedding) does not, so its upcast copy goes at once
    block = lambda b: sum(p.numel() for k, p in b.named_parameters()
                          if k.endswith("base_layer.weight") and p.dtype == f8)
    return {**n, "fp8_bytes": nbytes(), "fp8": sum(p.numel() for _, p in base() if p.dtype == f8),
            "fp8_block": max(map(block, blocks), default=0)}


def memory_plan(model, vlm=None, family=None, method="dopsd", full=False, rank=64, resolution=1024, batch_size=1,
                n_images=1, rollout_steps=4, dtype=torch.bfloat16, grad_checkpointing=True, base_precision="bf16",
                world_size=1):
    """Bytes of a CUDA run of `train`, from config files only: {row: bytes}, plus "params", "host" and "setup" dicts.
    GPU: peak_caching (first run: the encoders fill the cache) and peak_training; host RAM: host_peak; disk: the
    feature cache (entry_disk per entry, disk for n_images images, one caption each). base_precision: "bf16" = the
    frozen DiT as loaded (dtype), "fp8" = stored in float8 e4m3 (dopsd.py --fp8-base on). world_size: GPUs under
    torchrun; --full is then sharded with FSDP2 (dopsd.shard_dit) and the GPU rows are per GPU; a LoRA run uses DDP,
    which replicates everything (the same per GPU as one GPU).

    model, vlm: local folders or hub ids; only model_index.json and each component's config.json are read."""
    family = dopsd.pipeline_family(model) if family is None else family   # refuses unsupported pipelines early
    distill, e, fp8, zimage = method == "dopsd", dtype.itemsize, base_precision == "fp8", family == "zimage"
    dopsd.refuse([
        (base_precision not in ("bf16", "fp8"), f"--base-precision {base_precision}: bf16 or fp8"),
        (fp8 and full, "--base-precision fp8 with --full: the trained weights must stay in bf16 or fp32 (dopsd.py "
         "refuses --fp8-base with --full); drop one of them"),
        (fp8 and not grad_checkpointing, "--base-precision fp8 with checkpointing off: each linear would keep its "
         "upcast weight for backward and the saving would be gone (dopsd.py turns checkpointing on)")])
    enc = _encoders(model, vlm, distill and zimage)
    d = _dit(model, family, full, dtype)
    n = {"dit": d["dit"], "dit_fp8": d["fp8"] if fp8 else 0, "trainable": d["trainable"] * (1 if full else rank),
         **{k: enc[k] for k in ("text_encoder", "text_encoder_all", "vae", "vlm", "vlm_total", "mlp", "vocab")}}
    # Feature cache entries (one file per image and caption variant): the student caption features, [≤512, D] for
    # Z-Image (its padding stripped: an upper bound), [512, 3D] for klein; then the teacher's part: the VLM's context
    # [≤VLM_CONTEXT, D] (Z-Image), or the caption + instruction features [512, 3D] and the reference latents, fp32
    # [C, h, w] (klein); SFT: the clean latents, fp32.
    S, L, D, C = (resolution // 16) ** 2, 512, enc["width"], d["config"]["in_channels"]
    text = L * D * e * (1 if zimage else 3)
    entry = (text + 4 * C * S * (4 if zimage else 1) if not distill else
             text + dopsd.VLM_CONTEXT * D * e if zimage else 2 * text + 4 * C * S)
    act = {gc: batch_size * dit_activations(family, d["config"], S, L, rank, full, gc) for gc in (True, False)}
    encode = min(dopsd.ENCODE_BATCH, n_images)              # entries encoded per encoder call
    lora = 4 * n["trainable"] * (1 + distill)               # fp32 student (+ teacher) factors
    N = world_size if full else 1                           # the DiT-sized rows are split N ways by FSDP2
    plan = {"dit": 4 * n["dit"] // N if full else d["fp8_bytes"] if fp8 else d["bytes"],
            "text_encoder": n["text_encoder"] * e, "vlm": n["vlm"] * e, "vae": n["vae"] * e,
            "adapters": 4 * n["dit"] * distill // N if full else lora,   # fp32 EMA DiT or the LoRA factors
            "gradients": 4 * n["trainable"] // N, "optimizer": 8 * n["trainable"] // N,
            # autocast's cached bf16 copies of the trainable weights; sharded, FSDP2 gathers them in bf16 already
            "autocast_copies": 0 if N > 1 else e * n["trainable"],
            # FSDP2 (dopsd.shard_dit): two blocks gathered in bf16 (the one computing, the next one prefetched) and
            # the root; in backward one block's unsharded bf16 gradient and its fp32 copy for the reduce-scatter
            "fsdp_gathered": e * (2 * d["block"] + d["root"]) if N > 1 else 0,
            "fsdp_gradient": (e + 4) * d["block"] if N > 1 else 0,
            "fp8_upcast": e * d["fp8_block"] if fp8 else 0,
            # output_hidden_states: every layer's [B, 512, D] (both encoders pad to 512 tokens) until the call returns;
            # on top, the larger of one layer's MLP (gate, up, their product: 3 × [B, 512, F]) and, for klein, the
            # LM head's logits [B, 512, vocab], which Qwen3ForCausalLM computes though dopsd reads hidden states only
            "encoder_states": (enc["layers"] + 1) * encode * L * D * e,
            "encoder_transient": encode * L * e * max(3 * enc["mlp"], enc["vocab"]),
            "entries_caching": encode * entry, "entries_training": (batch_size + min(PREVIEW, n_images)) * entry,
            "entry_disk": entry + ENTRY_HEADER, "disk": n_images * (entry + ENTRY_HEADER),
            "activations_gc": act[True], "activations_no_gc": act[False]}
    plan["peak_caching"] = sum(plan[k] for k in ("text_encoder", "vlm", "vae", "encoder_states", "encoder_transient",
                                                 "entries_caching"))
    resident = ("dit", "vae", "adapters", "gradients", "optimizer", "autocast_copies", "fp8_upcast", "entries_training",
                "fsdp_gathered", "fsdp_gradient")
    plan["peak_training"] = sum(plan[k] for k in resident) + act[grad_checkpointing]
    # Host RAM: load_pipeline puts every component on the CPU in its load dtype (the DiT in fp32 for --full); the
    # VAE and the text encoder then move to the GPU, the Z-Image VLM loads whole to CPU before its language model is
    # swapped for the text encoder's, and the DiT waits in CPU RAM until the cache is full. An fp8 base gets its LoRA
    # on the CPU, is cast there, then moves. After that only the batch being read (entries_training) stays.
    dit_host = n["dit"] * (4 if full else e)
    plan["host"] = {"loading": dit_host + n["text_encoder_all"] * e + plan["vae"],
                    "vlm": dit_host + n["vlm_total"] * e, "lora": dit_host + lora * fp8}
    plan["host_peak"] = max(plan["host"].values())
    plan["params"] = n
    plan["setup"] = dict(family=family, method=method, full=full, rank=rank, resolution=resolution, tokens=(S, L),
                         batch_size=batch_size, n_images=n_images, rollout_steps=rollout_steps, dtype=str(dtype)[6:],
                         grad_checkpointing=grad_checkpointing, base_precision=base_precision, world_size=world_size)
    return plan


def size(b):
    return next(f"{b / 2**p:7.2f} {u}" for p, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                if b >= 2**p or not p)


def format_plan(plan):
    """The plan as the table main() prints."""
    s, n, full, fp8 = plan["setup"], plan["params"], plan["setup"]["full"], plan["setup"]["base_precision"] == "fp8"
    distill, dt, N = s["method"] == "dopsd", s["dtype"], s["world_size"] if full else 1
    per = f"; 1/{N} of it per GPU (FSDP2 shards)" if N > 1 else ""
    cnt = lambda k: f"{n[k] / 1e9:.3f} B" if n[k] >= 1e8 else f"{n[k] / 1e6:.1f} M" if n[k] >= 1e6 else f"{n[k]:,}"
    enc = "text encoder + VLM" if n["vlm"] else "text encoder"
    dit = ("fp32, trained in place" if full else f"{n['dit_fp8'] / n['dit']:.1%} float8 e4m3 (LoRA'd linears), the "
           f"rest {dt} (norms, embedders), frozen" if fp8 else f"{dt}, frozen")
    top = (f"{s['n_images']} image(s), one entry each (a caption list: one per variant), of up to "
           f"{size(plan['entry_disk']).strip()}" + (" (captions ≤ 512, VLM context ≤ 1024 tokens)" if n["vlm"]
                                                     else ""))
    host = {"loading": "DiT + text encoder + VAE as the pipeline loads to CPU",
            "vlm": "the DiT and the whole VLM, loading before its language model is swapped for the text encoder's",
            "lora": "the DiT and its fp32 LoRA, before the cast to fp8"}[max(plan["host"], key=plan["host"].get)]
    rows = [
        ("- GPU while caching", "first run only; the DiT waits in CPU RAM", None),
        ("text encoder", f"{cnt('text_encoder')}, {dt}; freed before the loop", plan["text_encoder"]),
        ("VLM vision tower", f"{cnt('vlm')}, {dt}; its language model is the text encoder's own tensors",
         plan["vlm"]),
        ("VAE", f"{cnt('vae')}, {dt}; stays on the GPU (sample grids)", plan["vae"]),
        ("encoder states", f"{min(dopsd.ENCODE_BATCH, s['n_images'])} captions × 512 tokens × every layer "
         "(output_hidden_states)", plan["encoder_states"]),
        ("", "+ one layer's MLP over those tokens", plan["encoder_transient"]),
        ("entries in flight", "the encoder batch's outputs, then written to disk", plan["entries_caching"]),
        ("peak while caching", f"{enc} + VAE + the batch being encoded", plan["peak_caching"]),
        ("- GPU while training", "", None),
        ("DiT weights", f"{cnt('dit')} params, {dit}{per}", plan["dit"]),
        ("fp8 upcast", "one block's weights in bf16, from its recompute to its backward", plan["fp8_upcast"]),
        ("VAE", "", plan["vae"]),
        ("EMA teacher DiT", f"{cnt('dit')}, fp32 (in bf16 the EMA increments would round away){per}", plan["adapters"])
        if full else ("LoRA factors", f"{cnt('trainable')} per adapter, fp32, "
                      f"{'student + teacher' if distill else 'student'}", plan["adapters"]),
        ("gradients", f"{cnt('trainable')}, fp32{per}", plan["gradients"]),
        ("AdamW state", f"2 × {cnt('trainable')}, fp32{per}", plan["optimizer"]),
        ("FSDP2 gathered", f"two blocks in {dt} (computing + prefetched) and the root", plan["fsdp_gathered"]),
        ("FSDP2 gradients", f"one block's unsharded {dt} gradient + its fp32 copy for the reduce-scatter",
         plan["fsdp_gradient"]),
        ("autocast copies", f"{cnt('trainable')}, {dt} copies of the trainable weights, cached for the roll-out",
         plan["autocast_copies"]),
        ("cache entries", f"batch {s['batch_size']} + {min(PREVIEW, s['n_images'])} sample-grid image(s), read "
         "from disk", plan["entries_training"]),
        ("activations", f"one roll-out step, the same for any K: S={s['tokens'][0]} image + L={s['tokens'][1]} "
         "text tokens", plan["activations_gc"]),
        ("", "... the same without gradient checkpointing" + (" (not with an fp8 base)" if fp8 else ""),
         plan["activations_no_gc"]),
        ("peak while training", f"all of the above but the encoders; activations "
         f"{'with' if s['grad_checkpointing'] else 'without'} checkpointing", plan["peak_training"]),
        ("- host RAM and disk", "", None),
        ("peak host RAM", f"{host}; afterwards only the batch being read", plan["host_peak"]),
        ("cache on disk", top, plan["disk"])]
    gpus = (f"per GPU, --full sharded over {N} GPUs with FSDP2: the weights, EMA teacher, gradients and AdamW state "
            "1/N each; the host-RAM row is rank 0's (the only one that loads the fp32 DiT)" if N > 1 else
            "with torchrun every GPU holds all of the above; the gradients are views into DDP's all-reduce buckets, "
            "no second copy" + ("; --full under torchrun is sharded (--world-size N)" if full else ""))
    head = (f"memory plan from config files: {s['family']}, {s['method']}, "
            f"{'full fine-tuning' if full else 'LoRA r%d' % s['rank']}, {s['resolution']}² px, "
            f"batch {s['batch_size']}, K={s['rollout_steps']}, {dt} autocast, base {s['base_precision']}, "
            f"checkpointing {'on' if s['grad_checkpointing'] else 'off'}")
    body = [f" {a}" + (f" ({b})" if b else "") if c is None else f"  {a:<20} {b:<84} {size(c)}"
            for a, b, c in rows if c is None or c or a in ("gradients", "AdamW state")]
    return "\n".join([head, *body, "  not included: CUDA context and allocator slack (~1-2 GiB; --fit keeps "
                      f"{HEADROOM / 2**30:g} GiB free), the VAE's transient encode/decode buffers, the libraries' "
                      "host RAM;", f"  {gpus}"])


def fit(model, vlm=None, gib=FIT_GIB, headroom=HEADROOM, **kw):
    """For a bf16 and an fp8 base: the peaks at 1024² and rank 64, and for each GPU size in gib the largest resolution
    in FIT_RESOLUTIONS (at rank 64) and the largest rank in FIT_RANKS (at 1024²) whose run fits, that is
    max(peak while caching, peak while training) + headroom ≤ size. None where nothing fits.
    Returns {"bf16" | "fp8": {"caching": bytes, "training": bytes, "fits": {gib: (resolution, rank)},
    "training_only": {gib: (resolution, rank)}}} (training_only: the same ignoring the caching phase)."""
    dopsd.refuse([(kw.get("full"), "--fit looks for a LoRA's resolution and rank: drop --full")])
    kw = {k: v for k, v in kw.items() if k not in ("resolution", "rank", "base_precision", "grad_checkpointing")}
    out = {}
    for prec in ("bf16", "fp8"):
        plan = lambda res, r: memory_plan(model, vlm, resolution=res, rank=r, base_precision=prec, **kw)
        ref, row = plan(1024, 64), {"fits": {}, "training_only": {}}
        row.update(caching=ref["peak_caching"], training=ref["peak_training"])
        for key, need in (("fits", lambda p: max(p["peak_caching"], p["peak_training"])),
                          ("training_only", lambda p: p["peak_training"])):
            for g in gib:
                ok = lambda p: need(p) + headroom <= g * 2**30
                row[key][g] = (next((r for r in reversed(FIT_RESOLUTIONS) if ok(plan(r, 64))), None),
                               next((r for r in reversed(FIT_RANKS) if ok(plan(1024, r))), None))
        out[prec] = row
    return out


def format_fit(fits, headroom=HEADROOM):
    """{name: fit()} as a markdown table, one row per model and base precision."""
    gib = list(next(iter(fits.values()))["bf16"]["fits"])
    g = lambda b: f"{b / 2**30:.1f}"
    cell = lambda f: " · ".join([f"{f[0]}²" if f[0] else "—", f"r{f[1]}" if f[1] else "—"])
    lines = ["| model | base | GiB at 1024², r64: caching / training | "
             + " | ".join(f"{x} GiB" for x in gib) + " |", "|---|---|---|" + "---|" * len(gib)]
    for name, fit_ in fits.items():
        for prec, row in fit_.items():
            cells = []
            for x in gib:
                c = cell(row["fits"][x])
                if row["fits"][x] != row["training_only"][x]:   # the caching phase is what does not fit
                    c += f" (training alone: {cell(row['training_only'][x])})"
                cells.append(c)
            lines.append(f"| {name} | {prec} | {g(row['caching'])} / {g(row['training'])} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines + [f"cells: the largest resolution at LoRA r64 · the largest rank at 1024² whose run "
                              f"fits, i.e. max(caching, training peak) + {headroom / 2**30:g} GiB (CUDA context, "
                              "allocator slack) ≤ the GPU's memory; — : none"])


def main(argv=None):
    d = dopsd.TrainConfig(data="")
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", nargs="+", default=[d.model],
                   help="diffusers pipeline(s): hub id or folder; several print one plan (or --fit row) each "
                        "(default %(default)s)")
    p.add_argument("--vlm", default=d.vlm, help="the Z-Image teacher's Qwen3-VL (default %(default)s)")
    p.add_argument("--data", action="append", help="a training folder (FOLDER or FOLDER:N, repeatable): its images "
                   "are counted for the feature cache on disk")
    p.add_argument("--images", type=int, help="the number of training images, instead of --data (default: 100; "
                   "the GPU peaks are the same for any number from 8 up)")
    p.add_argument("--method", default=d.method, choices=["dopsd", "sft"])
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA")
    p.add_argument("--world-size", type=int, default=1, help="GPUs under torchrun: --full is sharded over them "
                   "(FSDP2), and the plan is per GPU (default %(default)s)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default %(default)s)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="bucket side in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per micro-batch (default %(default)s)")
    p.add_argument("--rollout-steps", type=int, default=d.rollout_steps, help="K (default %(default)s)")
    p.add_argument("--grad-checkpointing", default="on", choices=["on", "off"], help="(default %(default)s)")
    p.add_argument("--base-precision", default="bf16", choices=["bf16", "fp8"],
                   help="the frozen DiT as loaded, or stored in float8 (dopsd.py --fp8-base on) (default %(default)s)")
    p.add_argument("--fit", action="store_true", help="for 12, 16 and 24 GiB and a bf16 or fp8 base: the largest "
                   "resolution at r64 and the largest rank at 1024² that fit, as a markdown table")
    p.add_argument("--headroom", type=float, default=HEADROOM / 2**30,
                   help="--fit: GiB kept free for the CUDA context and allocator slack (default %(default)s)")
    a = p.parse_args(argv)
    try:
        n = a.images
        if n is None and a.data:
            folders = [Path(dopsd.parse_data_flag(x)[0]) for x in a.data]
            dopsd.refuse([(not f.is_dir(), f"--data {f}: not a folder") for f in folders])
            n = sum(f.suffix.lower() in dopsd.IMAGE_EXTS for x in folders for f in x.iterdir())
        dopsd.refuse([(n is not None and n < 1, f"--images {n} / --data: no images to plan for"),
                      (a.world_size < 1, f"--world-size {a.world_size}: pass the number of GPUs, 1 or more")])
        kw = dict(method=a.method, full=a.full, batch_size=a.batch_size, n_images=n or 100,
                  rollout_steps=a.rollout_steps)
        if a.fit:
            print(format_fit({Path(m).name: fit(m, a.vlm, headroom=a.headroom * 2**30, **kw) for m in a.model},
                             a.headroom * 2**30))
        for m in [] if a.fit else a.model:
            print(format_plan(memory_plan(m, a.vlm, rank=a.rank, resolution=a.resolution,
                                          grad_checkpointing=a.grad_checkpointing == "on",
                                          base_precision=a.base_precision, world_size=a.world_size, **kw)))
    except dopsd.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
