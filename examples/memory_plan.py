"""
memory_plan.py -- GPU memory of a dopsd.py training run, from config files alone, before any weight is downloaded.

Every component (DiT, text encoder, VAE, the Z-Image teacher's Qwen3-VL) is built from its config.json on the meta
device: shapes, no storage, no weight file read. The student LoRA is attached exactly as dopsd.py attaches it, so the
counts are exact; only the activations are estimated, by a per-token formula calibrated on CPU (see ACT_COEF).
With hub ids in place of folders, only the JSON files are fetched.

Run as:
  python examples/memory_plan.py --model examples/configs/Z-Image-Turbo --vlm examples/configs/Qwen3-VL-4B-Instruct
  python examples/memory_plan.py --model examples/configs/FLUX.2-klein-9B --rank 32 --resolution 768 --data ./imgs
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dopsd  # noqa: E402

# It answers "does my GPU fit?" before a 20 GB download: every component is built from its config.json
# on the meta device (shapes, no storage, no weight file read), the LoRA is attached exactly as train() attaches it,
# and the bytes a CUDA run holds are added up. Only activations are estimated, by the formula below.
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


def memory_plan(model, vlm=None, family=None, method="dopsd", full=False, rank=64, resolution=1024, batch_size=1,
                n_images=1, rollout_steps=4, dtype=torch.bfloat16, grad_checkpointing=True):
    """Bytes a CUDA run of `train` holds, from config files only: {row: bytes}, plus "params" and "setup" dicts.

    model, vlm: local folders or hub ids; only model_index.json and each component's config.json are read."""
    import diffusers, transformers
    family = dopsd.pipeline_family(model) if family is None else family   # refuses unsupported pipelines early
    index, distill, e = diffusers.DiffusionPipeline.load_config(model), method == "dopsd", dtype.itemsize

    def meta(lib, cls, path, sub=None):                    # a component with every tensor on the meta device
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

    count = lambda m: sum(p.numel() for p in m.parameters())
    dit, te, vae = (meta(*index[k], model, k) for k in ("transformer", "text_encoder", "vae"))
    n = {"dit": count(dit), "text_encoder": count(te), "vae": count(vae), "vlm": 0}
    if distill and family == "zimage":                      # dopsd keeps vlm.model: no lm_head (tied anyway)
        n["vlm"] = count(meta("transformers", "Qwen3VLForConditionalGeneration", vlm).model)
    if full:
        n["trainable"] = n["dit"]
    else:                                                   # the student adapter exactly as train() attaches it
        with torch.device("meta"):
            dopsd.add_lora_adapters(dit.requires_grad_(False), dopsd.LORA_TARGETS[family], rank, 2.0 * rank,
                                    ("student",))
        n["trainable"] = sum(p.numel() for k, p in dit.named_parameters() if ".lora_" in k)
    S, L, D = (resolution // 16) ** 2, 512, te.config.hidden_size   # image tokens, text tokens, encoder width
    text = L * D * e * (1 if family == "zimage" else 3)     # student caption features, [≤512, D] or [512, 3D]
    if not distill:                                         # SFT: clean latents, fp32 [C, h, w]
        cache = text + 4 * dit.config.in_channels * S * (4 if family == "zimage" else 1)
    elif family == "zimage":                                # + the VLM's context, [≤1024, D]
        cache = text + 1024 * D * e
    else:                                                   # + caption & instruction [512, 3D], reference latents fp32
        cache = 2 * text + 4 * dit.config.in_channels * S
    act = {gc: batch_size * dit_activations(family, dit.config, S, L, rank, full, gc) for gc in (True, False)}
    copies = e * n["trainable"]                             # autocast's cached bf16 copies of the trainable weights
    plan = {"dit": n["dit"] * (4 if full else e), "text_encoder": n["text_encoder"] * e, "vlm": n["vlm"] * e,
            "vae": n["vae"] * e,
            "adapters": 4 * n["dit"] * distill if full else 4 * n["trainable"] * (1 + distill),   # fp32 EMA DiT or LoRAs
            "gradients": 4 * n["trainable"], "optimizer": 8 * n["trainable"], "autocast_copies": copies,
            "cache_per_image": cache,
            "activations_gc": act[True], "activations_no_gc": act[False]}
    plan["peak_caching"] = plan["text_encoder"] + plan["vlm"] + plan["vae"] + n_images * cache   # DiT still on CPU
    resident = ("dit", "vae", "adapters", "gradients", "optimizer", "autocast_copies")
    plan["peak_training"] = sum(plan[k] for k in resident) + n_images * cache + act[grad_checkpointing]
    plan["params"] = n
    plan["setup"] = dict(family=family, method=method, full=full, rank=rank, resolution=resolution, tokens=(S, L),
                         batch_size=batch_size, n_images=n_images, rollout_steps=rollout_steps, dtype=str(dtype)[6:],
                         grad_checkpointing=grad_checkpointing)
    return plan


def format_plan(plan):
    """The plan as the table main() prints."""
    s, n, full = plan["setup"], plan["params"], plan["setup"]["full"]
    distill = s["method"] == "dopsd"
    size = lambda b: next(f"{b / 2**p:7.2f} {u}" for p, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                          if b >= 2**p or not p)
    cnt = lambda k: f"{n[k] / 1e9:.3f} B" if n[k] >= 1e8 else f"{n[k] / 1e6:.1f} M" if n[k] >= 1e6 else f"{n[k]:,}"
    dt, enc = s["dtype"], "text encoder + VLM" if n["vlm"] else "text encoder"
    rows = [("DiT weights", f"{cnt('dit')} params, {'fp32, trained in place' if full else dt + ', frozen'}",
             plan["dit"]),
            ("text encoder", f"{cnt('text_encoder')}, {dt}; caching only, freed before the loop", plan["text_encoder"]),
            ("VLM (teacher context)", f"{cnt('vlm')}, {dt}; caching only, freed before the loop", plan["vlm"]),
            ("VAE", f"{cnt('vae')}, {dt}; stays on the GPU (sample grids)", plan["vae"]),
            ("EMA teacher DiT", f"{cnt('dit')}, fp32 (in bf16 the EMA increments would round away)", plan["adapters"])
            if full else ("LoRA factors", f"{cnt('trainable')} per adapter, fp32, "
                          f"{'student + teacher' if distill else 'student'}", plan["adapters"]),
            ("gradients", f"{cnt('trainable')}, fp32", plan["gradients"]),
            ("AdamW state", f"2 × {cnt('trainable')}, fp32", plan["optimizer"]),
            ("autocast copies", f"{cnt('trainable')}, {dt} copies of the trainable weights, cached for the roll-out",
             plan["autocast_copies"]),
            ("cached features", f"per image; {s['n_images']} image(s) held on the GPU", plan["cache_per_image"]),
            ("activations", f"one roll-out step, the same for any K: S={s['tokens'][0]} image + L={s['tokens'][1]} "
             "text tokens", plan["activations_gc"]),
            ("", "... the same without gradient checkpointing", plan["activations_no_gc"]),
            ("peak while caching", f"{enc} + VAE + cache (the DiT waits in CPU RAM)", plan["peak_caching"]),
            ("peak while training", f"all of the above but the encoders; activations "
             f"{'with' if s['grad_checkpointing'] else 'without'} checkpointing", plan["peak_training"])]
    head = (f"memory plan, GPU bytes from config files: {s['family']}, {s['method']}, "
            f"{'full fine-tuning' if full else 'LoRA r%d' % s['rank']}, {s['resolution']}² px, "
            f"batch {s['batch_size']}, K={s['rollout_steps']}, {dt} autocast, "
            f"checkpointing {'on' if s['grad_checkpointing'] else 'off'}")
    body = [f"  {a:<21} {b:<76} {size(c)}" for a, b, c in rows if c or a in ("gradients", "AdamW state")]
    return "\n".join([head, *body, "  not included: CUDA context and allocator slack (~1-2 GiB), the VAE's transient "
                      "encode/decode buffers;", "  with torchrun every GPU holds all of the above; the gradients are "
                      "views into DDP's all-reduce buckets, no second copy"])


def main(argv=None):
    d = dopsd.TrainConfig(data="")
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default=d.model, help="diffusers pipeline: hub id or folder (default %(default)s)")
    p.add_argument("--vlm", default=d.vlm, help="the Z-Image teacher's Qwen3-VL (default %(default)s)")
    p.add_argument("--data", help="the training folder: its images are counted for the feature cache (default: 1)")
    p.add_argument("--method", default=d.method, choices=["dopsd", "sft"])
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of a LoRA")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default %(default)s)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="bucket side in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per micro-batch (default %(default)s)")
    p.add_argument("--rollout-steps", type=int, default=d.rollout_steps, help="K (default %(default)s)")
    p.add_argument("--grad-checkpointing", default="on", choices=["on", "off"], help="(default %(default)s)")
    a = p.parse_args(argv)
    data = Path(a.data) if a.data else None
    n = sum(f.suffix.lower() in dopsd.IMAGE_EXTS for f in data.iterdir()) if data and data.is_dir() else 1
    try:
        print(format_plan(memory_plan(a.model, a.vlm, method=a.method, full=a.full, rank=a.rank,
                                      resolution=a.resolution, batch_size=a.batch_size, n_images=max(n, 1),
                                      rollout_steps=a.rollout_steps, grad_checkpointing=a.grad_checkpointing == "on")))
    except dopsd.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
