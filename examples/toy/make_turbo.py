"""Build the toy step-distilled FLUX.2-klein ("toy turbo") on a CPU, with the real architecture, and measure its gate.

The model is a tiny Flux2KleinPipeline (Flux2Transformer2DModel, AutoencoderKLFlux2, Qwen3ForCausalLM text encoder,
a byte-level BPE tokenizer) trained from scratch on the world of examples/toy/world.py. It is built to show D-OPSD on
a laptop: it must be (a) step-distilled -- sharp at 4 steps where its undistilled self is blurry -- and (b) able to
draw a background style from an image in its context, because D-OPSD's teacher is nothing more than that ability.

Stages (each checkpoints into --work and resumes where it stopped; `all` runs them in order):
  vae        train the 4× VAE (MSE + L1, tiny KL), then set its latent BatchNorm statistics from the data
  data       render the pre-training set (world v2: 4 instances per style, a third of the styles NAMED in the
             caption), cache VAE latents and text features
  pretrain   flow matching on the caption (10 % dropped: the unconditional model CFG needs); half of each batch also
             sees another instance of the same style as reference tokens with dopsd.py's teacher instruction
             appended -- exactly the context dopsd.py builds for klein, never pixel-aligned with the target
  cfg        measure the undistilled model at each CFG scale of CFG_CHOICES: how GUIDANCE was chosen
  distill    4-step distillation on the pipeline's own schedule: each Euler jump regresses onto the undistilled
             model's 6-sub-step path under CFG (GUIDANCE) over the same interval, from the same state
  save       write the Flux2KleinPipeline folder (is_distilled=True) that `dopsd.py --model` loads
  gate       measure the gate metrics (validated on world images first), print them, write gate.json beside the model

Every model call goes through dopsd.py's own klein functions (text features, latent packing, reference tokens,
schedule), so the toy is conditioned exactly as dopsd.py conditions a real klein checkpoint.

Run as: python examples/toy/make_turbo.py                     # ~80 min on 2 CPU cores (65 with --reuse-vae); resumes
        python examples/toy/make_turbo.py --stage gate        # re-measure the committed model's gate
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent.parent)]
import dopsd  # noqa: E402
import world  # noqa: E402
from make_tiny import CHAT_TEMPLATE, SPECIAL, THINK  # noqa: E402

TEXT_LEN = 48                  # the toy's text length (real klein: 512); stored as the tokenizer's model_max_length
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, tie_word_embeddings=True)
DIT = dict(patch_size=1, in_channels=32, num_layers=2, num_single_layers=4, attention_head_dim=32,
           num_attention_heads=4, joint_attention_dim=3 * 64, timestep_guidance_channels=256, mlp_ratio=3.0,
           axes_dims_rope=(8, 8, 8, 8), rope_theta=2000, guidance_embeds=False)
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
           sample_size=world.SIZE)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
SUFFIX = dopsd.KLEIN_TEACHER_SUFFIX
DEPLOY = 4
TOKENS = (world.SIZE // 8) ** 2                  # 8×8 = 64 image tokens


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and text encoder

def all_captions():
    """Every caption the toy world can produce: unnamed, named-style and new-concept ones, their teacher versions,
    and the empty caption (dropped captions in pre-training: the unconditional branch of the distillation's CFG)."""
    words = [None, world.TRIGGER] + [world.named_words(n) for n in world.NAMED]
    caps = [world.caption(s, c, t) for s in world.SHAPES for c in world.COLOURS for t in words]
    return caps + [f"{c} {SUFFIX}" for c in caps] + [""]


def build_tokenizer():
    """A byte-level BPE Qwen2Tokenizer whose merges are learnt on the toy's captions and the teacher instruction,
    so a caption is a handful of tokens and TEXT_LEN = 64 holds template + caption + instruction. Byte-level keeps
    any other text readable (as bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = all_captions() + ["user\n", "assistant\n", "\n\n"] * 20
    bpe.train_from_iterator(corpus * 5, trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(bpe.to_str())["model"]
    vocab = dict(spec["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    for s in ["<|endoftext|>"] + SPECIAL + THINK:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                         eos_token="<|im_end|>", additional_special_tokens=SPECIAL, padding_side="right",
                         model_max_length=TEXT_LEN)
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in THINK])
    tok.chat_template = CHAT_TEMPLATE
    longest = max(dopsd.prompt_tokens(tok, all_captions(), False))              # klein's template, thinking off
    assert longest <= TEXT_LEN, f"teacher caption needs {longest} tokens > TEXT_LEN {TEXT_LEN}"
    return tok


def build_text_encoder(tok):
    """Random tiny Qwen3 (never trained: the DiT learns to read its features, as klein reads Qwen3's)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TEXT,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return Qwen3ForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------------------------
# VAE

def world_batch(rng, n, styles=None):
    """n random world images as a [n, 3, 64, 64] tensor in [-1, 1] (and their (style, shape, colour)); each image a
    fresh instance of its style, its colour one that stands out from it (world.visible_colours)."""
    meta, ims = [], []
    for i in range(n):
        s = styles[i] if styles else world.random_style(rng)
        vis = world.visible_colours(s)
        shape, colour = world.SHAPES[rng.integers(6)], vis[rng.integers(len(vis))]
        ims.append(dopsd.pil_to_tensor(world.render(s, shape, colour, rng)))
        meta.append((s, shape, colour))
    return torch.stack(ims), meta


def stage_vae(work, steps=1000, batch=24, reuse=None):
    """Train the VAE, or (reuse: a Flux2KleinPipeline folder) take that model's VAE: world v2 draws the same
    components as v1, so v1's VAE (trained here in 12 min) serves it unchanged."""
    from diffusers import AutoencoderKLFlux2
    path = work / "vae.pt"
    if reuse is not None and not path.is_file():
        vae = AutoencoderKLFlux2.from_pretrained(Path(reuse) / "vae")
        dopsd.atomic_torch_save({"vae": vae.state_dict(), "step": steps, "done": True, "from": str(reuse)}, path)
        log(f"vae: reused {reuse}/vae")
        return vae.eval()
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start = 0
    if path.is_file():
        st = torch.load(path, weights_only=False)
        vae.load_state_dict(st["vae"]), opt.load_state_dict(st["opt"])
        start = st["step"]
    rng = np.random.default_rng(100 + start)
    bank, _ = world_batch(rng, 3000)                                  # re-drawn each resume; fine for a VAE
    t0 = time.time()
    vae.train()
    for step in range(start, steps):
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = bank[torch.randint(len(bank), (batch,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
        if (step + 1) % 250 == 0 or step == steps - 1:
            dopsd.atomic_torch_save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, path)
    vae.eval()
    # klein normalises packed latents with the VAE's BatchNorm running statistics: set them from the data.
    with torch.no_grad():
        x, _ = world_batch(np.random.default_rng(7), 512)
        z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mode() for i in range(0, 512, 64)])   # [512, C, 16, 16]
        B, C, h, w = z.shape
        z = z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, h // 2, w // 2)
        vae.bn.running_mean.copy_(z.mean((0, 2, 3)))
        vae.bn.running_var.copy_(z.var((0, 2, 3)))
    dopsd.atomic_torch_save({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": steps, "done": True}, path)
    return vae


def load_vae(work):
    from diffusers import AutoencoderKLFlux2
    vae = AutoencoderKLFlux2(**VAE)
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=False)["vae"])
    return vae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# data: rendered once, encoded once (VAE latents, text features), then only the DiT runs

N_STYLES, GROUP = 4000, 4      # 4000 training styles × 4 images; an image's reference is another of its group
NAMED_SHARE = 1 / 3            # groups of a NAMED style (captioned by name); the rest are unnamed random styles


@torch.no_grad()
def stage_data(work):
    vae, tok = load_vae(work), build_tokenizer()
    te = build_text_encoder(tok)
    tok.save_pretrained(work / "text"), te.save_pretrained(work / "text")   # the features below belong to these
    rng = np.random.default_rng(200)
    names = list(world.NAMED)
    named = [names[rng.integers(len(names))] if rng.random() < NAMED_SHARE else None for _ in range(N_STYLES)]
    styles = [world.NAMED[n] if n else world.random_style(rng) for n in named]
    lats, caps = [], []
    cap_index = {c: i for i, c in enumerate(all_captions())}
    t0 = time.time()
    for i in range(0, N_STYLES, 32):
        group = [s for s in styles[i:i + 32] for _ in range(GROUP)]
        words = [world.named_words(n) if n else None for n in named[i:i + 32] for _ in range(GROUP)]
        x, meta = world_batch(rng, len(group), group)
        lats.append(dopsd.klein_encode(vae, x))                                 # [n, 32, 8, 8]
        caps += [cap_index[world.caption(sh, co, w)] for (_, sh, co), w in zip(meta, words)]
        if i % 640 == 0:
            log(f"data {i * GROUP}/{N_STYLES * GROUP} images ({time.time() - t0:.0f}s)")
    feats = dopsd.klein_text_features(te, tok, all_captions(), dopsd.klein_text_layers(te), max_len=TEXT_LEN)
    torch.save({"lat": torch.cat(lats), "cap": torch.tensor(caps), "feats": feats, "styles": styles, "named": named,
                "captions": all_captions()}, work / "data.pt")
    log(f"data: {len(caps)} images, {feats.shape[0]} captions -> {work / 'data.pt'}")


def teacher_caption_index(captions):
    """caption index -> index of the same caption with dopsd.py's teacher instruction appended."""
    where = {c: i for i, c in enumerate(captions)}
    return torch.tensor([where.get(f"{c} {SUFFIX}", i) for i, c in enumerate(captions)])


def partners(n, generator):
    """For image j, a random other image of its style group (its reference)."""
    j = torch.arange(n)
    k = torch.randint(1, GROUP, (n,), generator=generator)
    return (j // GROUP) * GROUP + (j % GROUP + k) % GROUP


def build_dit(seed=0):
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    tr = Flux2Transformer2DModel(**DIT)
    torch.nn.init.zeros_(tr.proj_out.weight)          # start at u = 0, as DiT-style models do
    return tr


def train_sigmas(n, generator, mu=1.9):
    """Training σ: half uniform, half shifted towards 1 like klein's few-step schedule (exp(mu) ≈ 7 at 64 tokens)."""
    t = torch.rand(n, generator=generator)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / t.clamp(1e-4, 1) - 1))
    return torch.where(torch.rand(n, generator=generator) < 0.5, t, shifted).clamp(1e-3, 1.0)


def batch_conditions(d, idx, with_ref, gen):
    """(prompt_embeds [b, L, 3D], ref latents [b, 32, 8, 8] or None): the student's or the teacher's context."""
    cap = d["cap"][idx]
    if not with_ref:
        return d["feats"][cap], None
    return d["feats"][d["tcap"][cap]], d["lat"][partners(len(d["lat"]), gen)[idx]]


def load_data(work):
    d = torch.load(work / "data.pt", weights_only=False)
    d["tcap"] = teacher_caption_index(d["captions"])
    d["empty"] = d["captions"].index("")
    return d


CAPTION_DROP = 0.1             # text-only pre-training batches with the empty caption: the CFG's unconditional model


def drop_captions(d, feats, gen):
    """feats [b, L, 3D] with a CAPTION_DROP share of rows replaced by the empty caption's features."""
    drop = torch.rand(len(feats), generator=gen) < CAPTION_DROP
    return torch.where(drop.view(-1, 1, 1), d["feats"][d["empty"]], feats)


def ema_(avg, model, decay):
    with torch.no_grad():
        for a, p in zip(avg.parameters(), model.parameters()):
            a.lerp_(p, 1 - decay)


def lr_at(step, steps, peak, warm=200):
    return peak * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def run_training(work, name, steps, loss_fn, model, lr, batch, log_every=50, extra=None):
    """Shared loop: AdamW, warm-up + cosine, grad clip 1, EMA 0.999, checkpoint every 200 steps, resume."""
    path = work / f"{name}.pt"
    avg = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen, start = torch.Generator().manual_seed(sum(map(ord, name))), 0
    if path.is_file():
        st = torch.load(path, weights_only=False)
        model.load_state_dict(st["model"]), avg.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start = st["step"]
        log(f"{name}: resumed at step {start}")
    t0, losses = time.time(), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(model, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_(avg, model, 0.999 if step > 500 else 0.99)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            el = time.time() - t0
            msg = f"{name} {step + 1}/{steps} loss {np.mean(losses):.4f} | {el / (step + 1 - start):.2f} s/step"
            if extra and (step + 1) % (log_every * 10) == 0:
                msg += " | " + extra(avg)
            log(msg)
            losses = []
        if (step + 1) % 200 == 0 or step == steps - 1:
            dopsd.atomic_torch_save({"model": model.state_dict(), "ema": avg.state_dict(), "opt": opt.state_dict(),
                                     "gen": gen.get_state(), "step": step + 1}, path)
    return avg


PRETRAIN_STEPS, PRETRAIN_BATCH = 4500, 48


def stage_pretrain(work, steps=None):
    d = load_data(work)
    tr = build_dit()
    log(f"DiT: {sum(p.numel() for p in tr.parameters()):,} parameters; data {len(d['lat'])} images")
    probe_gen = torch.Generator().manual_seed(5)
    probe = torch.randint(len(d["lat"]), (64,), generator=probe_gen)
    probe_noise = torch.randn(64, 32, 8, 8, generator=probe_gen)

    def loss_fn(model, batch, gen):
        total = 0.0
        for with_ref in (False, True):                # half the batch text-only, half with a reference image
            idx = torch.randint(len(d["lat"]), (batch // 2,), generator=gen)
            x0, eps = d["lat"][idx], torch.randn(batch // 2, 32, 8, 8, generator=gen)
            s = train_sigmas(batch // 2, gen)
            x = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
            cond = batch_conditions(d, idx, with_ref, gen)
            cond = cond if with_ref else (drop_captions(d, cond[0], gen), None)
            u = dopsd.klein_velocity(model, x, s, cond)
            total = total + (u - (eps - x0)).pow(2).mean() / 2
        return total

    @torch.no_grad()
    def probe_fn(model):                              # does the reference help? x0 error at σ = 0.9, with vs without
        x0, s = d["lat"][probe], torch.full((64,), 0.9)
        x = 0.1 * x0 + 0.9 * probe_noise
        errs = []
        for with_ref in (False, True):
            u = dopsd.klein_velocity(model, x, s, batch_conditions(d, probe, with_ref, torch.Generator().manual_seed(0)))
            errs.append((x - 0.9 * u - x0).pow(2).mean().item())
        return f"probe x0-MSE@0.9 text-only {errs[0]:.3f} with-ref {errs[1]:.3f}"

    avg = run_training(work, "pretrain", steps or PRETRAIN_STEPS, loss_fn, tr, 6e-4, PRETRAIN_BATCH, extra=probe_fn)
    torch.save(avg.state_dict(), work / "base.pt")


# ---------------------------------------------------------------------------------------------------------------
# step distillation: 4 Euler jumps on the pipeline's own schedule, each regressed onto the undistilled model's
# 8-sub-step path over the same σ interval from the same state (a trajectory bank, computed once)

SUB, BANK, DISTILL_STEPS = 6, 1536, 800
GUIDANCE = 2.0                 # the undistilled model's CFG scale that the distilled model learns (README: how chosen)


def guided_velocity(model, x, s, cond, empty, g=GUIDANCE):
    """Classifier-free guidance u(∅) + g·(u(c) − u(∅)), ∅ = the empty caption and no reference. Real turbo models
    are distilled from their guided base, so that one pass does what two do there; the toy's is too."""
    u = dopsd.klein_velocity(model, x, s, cond)
    if g == 1:
        return u
    u0 = dopsd.klein_velocity(model, x, s, (empty.expand(len(x), -1, -1), None))
    return u0 + g * (u - u0)


@torch.no_grad()
def teacher_bank(base, d, n, gen, sigmas, sub=SUB, chunk=128):
    """n trajectories of the undistilled model under CFG: states at the 5 schedule points [n, 5, 32, 8, 8], caption
    indices, and whether each used a reference (then: its reference latents)."""
    xs, caps, refs, with_ref = [], [], [], []
    t0 = time.time()
    for i in range(0, n, chunk):
        use_ref = (i // chunk) % 2 == 1                              # alternate chunks: text-only / with reference
        idx = torch.randint(len(d["lat"]), (chunk,), generator=gen)
        cond = batch_conditions(d, idx, use_ref, gen)
        x = torch.randn(chunk, 32, 8, 8, generator=gen)
        states = [x]
        for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            for s, s_next in zip(np.linspace(a, b, sub + 1)[:-1], np.linspace(a, b, sub + 1)[1:]):
                x = x + (s_next - s) * guided_velocity(base, x, torch.full((chunk,), float(s)), cond,
                                                       d["feats"][d["empty"]])
            states.append(x)
        xs.append(torch.stack(states, 1))
        caps.append(d["cap"][idx])
        refs.append(cond[1] if use_ref else torch.zeros(chunk, 32, 8, 8))
        with_ref.append(torch.full((chunk,), use_ref))
        log(f"bank {i + chunk}/{n} ({time.time() - t0:.0f}s)")
    return dict(x=torch.cat(xs), cap=torch.cat(caps), ref=torch.cat(refs), with_ref=torch.cat(with_ref))


def stage_distill(work, steps=None):
    d = load_data(work)
    base = build_dit()
    base.load_state_dict(torch.load(work / "base.pt"))
    base.requires_grad_(False).eval()
    sigmas = dopsd.klein_sigmas(DEPLOY, TOKENS)                       # [5]: 1, .955, .875, .70, 0 at 64 tokens
    bank_path = work / "bank.pt"
    if not bank_path.is_file():
        torch.save(teacher_bank(base, d, BANK, torch.Generator().manual_seed(11), sigmas), bank_path)
    bank = torch.load(bank_path)
    student = copy.deepcopy(base).requires_grad_(True).train()

    def loss_fn(model, batch, gen):
        total = 0.0
        for use_ref in (False, True):
            pool = torch.nonzero(bank["with_ref"] == use_ref).squeeze(1)
            j = pool[torch.randint(len(pool), (batch // 2,), generator=gen)]
            k = torch.randint(DEPLOY, (batch // 2,), generator=gen)              # which of the 4 jumps
            x, x_next = bank["x"][j, k], bank["x"][j, k + 1]
            s, s_next = sigmas[k], sigmas[k + 1]
            target = (x_next - x) / (s_next - s).view(-1, 1, 1, 1)             # the sub-stepped path's mean velocity
            cap = bank["cap"][j]
            cond = (d["feats"][d["tcap"][cap]], bank["ref"][j]) if use_ref else (d["feats"][cap], None)
            u = dopsd.klein_velocity(model, x, s, cond)
            total = total + (u - target).pow(2).mean() / 2
        return total

    avg = run_training(work, "distill", steps or DISTILL_STEPS, loss_fn, student, 2e-4, 48)
    torch.save(avg.state_dict(), work / "turbo.pt")


# ---------------------------------------------------------------------------------------------------------------
# save: a Flux2KleinPipeline folder, loaded like the real checkpoint

MODEL_CARD = """# toy turbo: a CPU-trained, step-distilled FLUX.2-klein

Built by `examples/toy/make_turbo.py` (random init, trained from scratch on world v2 of `examples/toy/world.py`):
64×64 px, 4× VAE, 8×8 = 64 image tokens, 4-step deploy, no CFG at inference (the undistilled model's CFG 2 is
distilled in). A `Flux2KleinPipeline` folder with
`is_distilled=True`; load it like the real checkpoint. Its gate metrics are in `gate.json`.

In diffusers, pass the toy's text length and encoder layers (its tokenizer has model_max_length 48; the encoder has
4 layers, read at 1/4, 1/2, 3/4 depth as klein reads its 36):

    pipe = Flux2KleinPipeline.from_pretrained("examples/toy/model")
    image = pipe("a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                 max_sequence_length=48, text_encoder_out_layers=(1, 2, 3)).images[0]

`dopsd.py` reads both from the model itself.
"""


def stage_save(work, out):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    tok, te = AutoTokenizer.from_pretrained(work / "text"), Qwen3ForCausalLM.from_pretrained(work / "text")
    tr = build_dit()
    tr.load_state_dict(torch.load(work / "turbo.pt"))
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=load_vae(work),
                              text_encoder=te.eval(), tokenizer=tok, transformer=tr, is_distilled=True)
    pipe.save_pretrained(out)
    (Path(out) / "README.md").write_text(MODEL_CARD)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    log(f"saved {out} ({size / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------------------------
# gate: is it step-distilled, and can its in-context teacher draw a style it never saw?

SEEDS, MANY = 5, 32


def mean_std(per_seed):
    a = np.asarray(per_seed, dtype=np.float64)
    return [round(float(a.mean()), 4), round(float(a.std()), 4)]


def named_prompts(per_name=2):
    """(caption, name, shape, colour) for every NAMED style, in colours that stand out from it."""
    out = []
    for k, (name, style) in enumerate(world.NAMED.items()):
        vis = world.visible_colours(style)
        for j in range(per_name):
            shape, colour = world.SHAPES[(k + 2 * j) % 6], vis[(k + j) % len(vis)]
            out.append((world.caption(shape, colour, world.named_words(name)), name, shape, colour))
    return out


class Sampler:
    """Text features, reference latents and Euler sampling (optionally under CFG) through dopsd.py's klein code."""

    def __init__(self, pipe):
        self.pipe, self.tok, self.te, self.vae = pipe, pipe.tokenizer, pipe.text_encoder, pipe.vae
        self.empty = self.text([""])

    def text(self, prompts):
        return torch.stack([c[0] for c in dopsd.student_features("klein", self.te, self.tok, prompts)])

    def ref(self, images):
        return dopsd.klein_encode(self.vae, torch.stack([dopsd.pil_to_tensor(im) for im in images]))

    @torch.no_grad()
    def __call__(self, tr, prompts, seed, steps, ref=None, guidance=1.0):
        noise = torch.randn(len(prompts), 32, 8, 8, generator=torch.Generator().manual_seed(seed))
        cond = (self.text(prompts), ref)
        x = dopsd.euler_sample(lambda x, s: guided_velocity(tr, x, s, cond, self.empty, guidance), noise,
                               dopsd.klein_sigmas(steps, TOKENS))
        return dopsd.klein_decode(self.vae, x)


def validate_metrics(rng, n=96):
    """The statistics on real world images: two instances of one style vs two styles, sharpness vs a blurred copy,
    and colour / shape fidelity of real images (1.0 = the metric reads every real image right)."""
    from PIL import ImageFilter
    rows = {k: [] for k in ("same_style_colour", "same_style_texture", "other_style_colour", "other_style_texture",
                            "sharpness_real", "sharpness_real_blurred_1_5px", "colour_fidelity_real",
                            "shape_fidelity_real")}
    for i in range(n):
        s, o = world.random_style(rng), world.random_style(rng)
        co = world.visible_colours(s)[i % len(world.visible_colours(s))]
        a = world.render(s, world.SHAPES[i % 6], co, rng)
        b = world.render(s, world.SHAPES[(i + 2) % 6], co, rng)                 # same style, another instance
        c = world.render(o, world.SHAPES[(i + 2) % 6], world.visible_colours(o)[0], rng)
        sa, sb, sc = world.style_stats(a), world.style_stats(b), world.style_stats(c)
        rows["same_style_colour"].append(world.colour_distance(sa, sb))
        rows["same_style_texture"].append(world.texture_distance(sa, sb))
        rows["other_style_colour"].append(world.colour_distance(sa, sc))
        rows["other_style_texture"].append(world.texture_distance(sa, sc))
        rows["sharpness_real"].append(world.sharpness(a))
        rows["sharpness_real_blurred_1_5px"].append(world.sharpness(a.filter(ImageFilter.GaussianBlur(1.5))))
        rows["colour_fidelity_real"].append(world.colour_fidelity(a, co))
        rows["shape_fidelity_real"].append(world.shape_fidelity(a, world.SHAPES[i % 6]))
    return {k: mean_std(v) for k, v in rows.items()}


def gate_vae(pipe, sampler, rng, combos):
    """The metrics after a VAE round trip of real images: what the VAE alone costs every model."""
    pairs = [combos[i % len(combos)] for i in range(48)]
    styles = [world.random_style(rng) for _ in pairs]
    pairs = [(s, world.visible_colours(st)[i % len(world.visible_colours(st))])
             for i, ((s, _), st) in enumerate(zip(pairs, styles))]
    ims = [world.render(st, sh, co, rng) for st, (sh, co) in zip(styles, pairs)]
    rec = dopsd.klein_decode(pipe.vae, sampler.ref(ims))
    st = [(world.style_stats(a), world.style_stats(b)) for a, b in zip(ims, rec)]
    cf, sf = world.fidelity(rec, pairs)
    return dict(vae_roundtrip_colour=mean_std([world.colour_distance(a, b) for a, b in st]),
                vae_roundtrip_texture=mean_std([world.texture_distance(a, b) for a, b in st]),
                vae_roundtrip_rms=round(world.rms(ims, rec), 4), vae_roundtrip_colour_fidelity=round(cf, 4),
                vae_roundtrip_shape_fidelity=round(sf, 4))


def gate_distillation(work, sampler, turbo, prompts, pairs, rng, combos):
    """4 steps vs many from the same noise, sharpness, and prompt following: distilled vs undistilled (under CFG)."""
    base = build_dit()
    base.load_state_dict(torch.load(work / "base.pt"))
    base.eval()
    rows = {k: [] for k in ("turbo4_vs_base32", "base4_vs_base32", "turbo4_vs_turbo32", "sharp_turbo4",
                            "sharp_base4", "sharp_base32", "sharp_real", "sharp_real_vae", "colour_fidelity_base32",
                            "shape_fidelity_base32")}
    for seed in range(SEEDS):
        b32 = sampler(base, prompts, seed, MANY, guidance=GUIDANCE)
        b4 = sampler(base, prompts, seed, DEPLOY, guidance=GUIDANCE)
        t4, t32 = sampler(turbo, prompts, seed, DEPLOY), sampler(turbo, prompts, seed, MANY)
        rows["turbo4_vs_base32"].append(world.rms(t4, b32)), rows["base4_vs_base32"].append(world.rms(b4, b32))
        rows["turbo4_vs_turbo32"].append(world.rms(t4, t32))
        for k, ims in (("sharp_turbo4", t4), ("sharp_base4", b4), ("sharp_base32", b32)):
            rows[k].append(np.mean([world.sharpness(im) for im in ims]))
        real = [world.render(world.random_style(rng), *combos[(7 * i) % len(combos)], rng) for i in range(16)]
        rows["sharp_real"].append(np.mean([world.sharpness(im) for im in real]))
        rows["sharp_real_vae"].append(np.mean([world.sharpness(im) for im in
                                               dopsd.klein_decode(sampler.vae, sampler.ref(real))]))
        cf, sf = world.fidelity(b32, pairs)
        rows["colour_fidelity_base32"].append(cf), rows["shape_fidelity_base32"].append(sf)
    out = {k: mean_std(v) for k, v in rows.items()}
    out["note"] = (f"pixel RMS distances in [0,1] units, {len(prompts)} prompts x {SEEDS} noise seeds (mean ± std over "
                   f"seeds); the undistilled model samples under CFG {GUIDANCE}, many = {MANY} Euler steps")
    return out


def gate_prompt_following(sampler, turbo, prompts, pairs, named):
    """The distilled model at 4 steps, text only: colour and shape fidelity on unnamed and named-style prompts, and
    whether a style's name draws that style (distance to it vs to the other named styles)."""
    rng = np.random.default_rng(301)
    refs = {n: world.style_reference(st, rng) for n, st in world.NAMED.items()}
    rows = {k: [] for k in ("colour_fidelity_unnamed", "shape_fidelity_unnamed", "colour_fidelity_named",
                            "shape_fidelity_named", "named_distance_to_own_style", "named_distance_to_other_named",
                            "unnamed_distance_to_nearest_named")}
    for seed in range(SEEDS):
        ims = sampler(turbo, prompts, seed, DEPLOY)
        cf, sf = world.fidelity(ims, pairs)
        rows["colour_fidelity_unnamed"].append(cf), rows["shape_fidelity_unnamed"].append(sf)
        rows["unnamed_distance_to_nearest_named"].append(np.mean([min(world.style_distance(world.style_stats(im), r)
                                                                      for r in refs.values()) for im in ims]))
        nims = sampler(turbo, [c for c, *_ in named], seed, DEPLOY)
        cf, sf = world.fidelity(nims, [(s, c) for _, _, s, c in named])
        rows["colour_fidelity_named"].append(cf), rows["shape_fidelity_named"].append(sf)
        st = [world.style_stats(im) for im in nims]
        rows["named_distance_to_own_style"].append(np.mean([world.style_distance(s, refs[n])
                                                            for s, (_, n, *_) in zip(st, named)]))
        rows["named_distance_to_other_named"].append(np.mean([np.mean([world.style_distance(s, r) for m, r in
                                                                       refs.items() if m != n])
                                                              for s, (_, n, *_) in zip(st, named)]))
    return {k: mean_std(v) for k, v in rows.items()}


def gate_teacher(sampler, turbo, prompts, combos, rng):
    """The teacher's ceiling: the held-out style drawn with other instances of it as reference (never pixel-aligned
    with the sample) vs without; and how far the output's frame is from its reference's, pixel for pixel."""
    hs = world.style_reference(world.HELD_OUT, rng)
    vis = world.visible_colours(world.HELD_OUT)
    rows = {k: [] for k in ("with_ref_colour", "with_ref_texture", "no_ref_colour", "no_ref_texture",
                            "trigger_no_ref_colour", "trigger_no_ref_texture", "with_ref_contrast",
                            "frame_rms_output_to_its_reference", "frame_rms_two_real_instances")}
    frame = world.frame_mask()
    frame_rms = lambda a, b: float(np.sqrt((((np.asarray(a, float) - np.asarray(b, float)) / 255)[frame] ** 2).mean()))
    for seed in range(SEEDS):
        refs = [world.render(world.HELD_OUT, world.SHAPES[(5 * i + seed) % 6], vis[i % len(vis)], rng)
                for i in range(len(prompts))]
        teach = sampler(turbo, [f"{p} {SUFFIX}" for p in prompts], seed, DEPLOY, ref=sampler.ref(refs))
        plain = sampler(turbo, prompts, seed, DEPLOY)
        trig = sampler(turbo, [f"{p}, {world.TRIGGER}" for p in prompts], seed, DEPLOY)
        for k, ims in (("with_ref", teach), ("no_ref", plain), ("trigger_no_ref", trig)):
            st = [world.style_stats(im) for im in ims]
            rows[k + "_colour"].append(np.mean([world.colour_distance(s, hs) for s in st]))
            rows[k + "_texture"].append(np.mean([world.texture_distance(s, hs) for s in st]))
        rows["with_ref_contrast"].append(np.mean([world.style_stats(im)["contrast"] for im in teach]))
        rows["frame_rms_output_to_its_reference"].append(np.mean([frame_rms(a, b) for a, b in zip(teach, refs)]))
        other = [world.render(world.HELD_OUT, "circle", "red", rng) for _ in refs]
        rows["frame_rms_two_real_instances"].append(np.mean([frame_rms(a, b) for a, b in zip(other, refs)]))
    out = {k: mean_std(v) for k, v in rows.items()}
    out["held_out_contrast_real"] = round(float(np.linalg.norm(hs["colour"][3:] - hs["colour"][:3])), 4)
    return out


def gate_swap(sampler, turbo, prompts, rng):
    """Reference of style A -> the output's style distance to A vs to another style B."""
    to_a, to_b = [], []
    for seed in range(SEEDS):
        A = [world.random_style(rng) for _ in prompts]
        B = [world.random_style(rng) for _ in prompts]
        refs = [world.render(a, world.SHAPES[(3 * i + seed) % 6], world.visible_colours(a)[0], rng)
                for i, a in enumerate(A)]
        st = [world.style_stats(im) for im in sampler(turbo, [f"{p} {SUFFIX}" for p in prompts], seed, DEPLOY,
                                                      ref=sampler.ref(refs))]
        to_a.append(np.mean([world.style_distance(s, world.style_reference(a, rng, 2))
                                for s, a in zip(st, A)]))
        to_b.append(np.mean([world.style_distance(s, world.style_reference(b, rng, 2))
                                for s, b in zip(st, B)]))
    return dict(distance_to_reference_style=mean_std(to_a), distance_to_other_style=mean_std(to_b))


def gate_pipeline(out, sampler, turbo, prompt):
    """Max grey-level difference between Flux2KleinPipeline and dopsd.py's sampler, same noise, 4 steps."""
    from diffusers import Flux2KleinPipeline
    p2 = Flux2KleinPipeline.from_pretrained(out)
    noise = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sampler(turbo, [prompt], 0, DEPLOY)[0]
    theirs = p2(prompt=prompt, height=world.SIZE, width=world.SIZE, num_inference_steps=DEPLOY, guidance_scale=1.0,
                latents=noise, text_encoder_out_layers=dopsd.klein_text_layers(p2.text_encoder),
                max_sequence_length=TEXT_LEN).images[0]
    return int(np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max())


CFG_CHOICES = (1.0, 2.0, 3.0, 4.5)


def stage_cfg(work, steps=16):
    """How GUIDANCE was chosen, before distillation: the undistilled model's colour fidelity, shape fidelity and
    sharpness at each of CFG_CHOICES (24 unnamed + 12 named prompts, 2 noise seeds). The rule, fixed beforehand: the
    smallest scale within 0.02 of the best unnamed colour fidelity among those > 1."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    base = build_dit()
    base.load_state_dict(torch.load(work / "base.pt"))
    base.eval()
    parts = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(work / "text"), vae=load_vae(work),
                            text_encoder=Qwen3ForCausalLM.from_pretrained(work / "text").eval())
    sampler, combos, named = Sampler(parts), [(s, c) for s in world.SHAPES for c in world.COLOURS], named_prompts()
    pairs = [combos[(7 * i + 3) % len(combos)] for i in range(24)]
    rows = {}
    for g in CFG_CHOICES:
        r = []
        for seed in range(2):
            ims = sampler(base, [world.caption(*p) for p in pairs], 50 + seed, steps, guidance=g)
            nims = sampler(base, [c for c, *_ in named], 60 + seed, steps, guidance=g)
            r.append((*world.fidelity(ims, pairs), np.mean([world.sharpness(im) for im in ims]),
                      world.fidelity(nims, [(sh, c) for _, _, sh, c in named])[0]))
        rows[g] = np.mean(r, 0)
        log(f"CFG {g}: colour fidelity {rows[g][0]:.3f} (named {rows[g][3]:.3f}), shape fidelity {rows[g][1]:.3f}, "
            f"sharpness {rows[g][2]:.4f}")
    best = max(rows[g][0] for g in CFG_CHOICES if g > 1)
    log(f"rule: CFG {min(g for g in CFG_CHOICES if g > 1 and rows[g][0] >= best - 0.02)} (GUIDANCE is {GUIDANCE})")


def stage_gate(work, out):
    pipe = dopsd.load_pipeline(str(out), torch.float32)              # through dopsd.py: family + distilled checks
    sampler, turbo = Sampler(pipe), pipe.transformer.eval()
    rng = np.random.default_rng(300)
    gate = {"world": "v2", "metric_validation_on_world_images": validate_metrics(rng)}
    combos = [(s, c) for s in world.SHAPES for c in world.COLOURS]
    gate["metric_validation_on_world_images"].update(gate_vae(pipe, sampler, rng, combos))
    log(f"metric validation: {gate['metric_validation_on_world_images']}")
    pairs = [combos[(7 * i) % len(combos)] for i in range(16)]
    prompts = [world.caption(*p) for p in pairs]
    if (work / "base.pt").is_file():
        gate["distillation"] = gate_distillation(work, sampler, turbo, prompts, pairs, rng, combos)
        log(f"distillation: {gate['distillation']}")
    gate["prompt_following"] = gate_prompt_following(sampler, turbo, prompts, pairs, named_prompts())
    log(f"prompt following: {gate['prompt_following']}")
    gate["teacher_ceiling_held_out"] = gate_teacher(sampler, turbo, prompts, combos, rng)
    log(f"teacher ceiling: {gate['teacher_ceiling_held_out']}")
    gate["swap_sensitivity"] = gate_swap(sampler, turbo, prompts, rng)
    log(f"swap: {gate['swap_sensitivity']}")
    gate["pipeline_agreement_max_abs_grey_levels"] = gate_pipeline(out, sampler, turbo, prompts[0])
    gate["model_size_mib"] = round(sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20, 2)
    (Path(out) / "gate.json").write_text(json.dumps(gate, indent=2))
    print(json.dumps(gate, indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", choices=["all", "vae", "data", "pretrain", "cfg", "distill", "save",
                                                      "gate"])
    p.add_argument("--work", default=str(HERE / "work"), help="checkpoints and caches (not committed)")
    p.add_argument("--out", default=str(HERE / "model"), help="the finished Flux2KleinPipeline folder")
    p.add_argument("--reuse-vae", default=None, metavar="PIPELINE",
                   help="take the VAE of this pipeline folder instead of training one (e.g. the v1 toy model)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    stages = ["vae", "data", "pretrain", "cfg", "distill", "save", "gate"] if args.stage == "all" else [args.stage]
    run = dict(vae=lambda: stage_vae(work, reuse=args.reuse_vae), data=lambda: stage_data(work),
               pretrain=lambda: stage_pretrain(work), cfg=lambda: stage_cfg(work),
               distill=lambda: stage_distill(work),
               save=lambda: stage_save(work, out), gate=lambda: stage_gate(work, out))
    for s in stages:
        log(f"stage {s}")
        run[s]()


if __name__ == "__main__":
    main()
