"""The paper's claim on the toy turbo model: plain fine-tuning (SFT) washes out few-step samples, D-OPSD learns the new
concept and keeps them. Everything runs through `dopsd.py train`, from the committed model in examples/toy/model.

The new concept is the held-out background style "[V] style" (examples/toy/world.py), taught from 6 images whose
shapes and colours never appear in the evaluation prompts. Three methods, the same optimizer steps and LoRA:
  sft            --method sft                     flow matching on the 6 images (the baseline peers use)
  dopsd          --method dopsd                   EMA teacher at dopsd.py's default decay (0.9999)
  dopsd-frozen   --method dopsd --ema-decay 1.0   the teacher stays the base model
Each method's learning rate is the best of LR_SWEEP by one rule: the lowest new-concept style distance after the
shortest training length, on validation prompts and noise that the evaluation never uses (training seed 0).

Evaluation at the deploy step count (4), on fixed noise, for every training length and seed:
  concept    "[V] style" prompts with unseen shapes/colours: style distance to the held-out style (colour + texture,
             the statistic validated in gate.json), and its contrast relative to the real style's
  quality    sharpness relative to the teacher's samples of the same prompts; 4-step vs 32-step RMS, same noise;
             shape colour error: does the shape still have the prompt's colour (world.colour_error; added after the
             first run's grids showed SFT drawing the training colours, checked on real images before the rerun)
  retention  original-world prompts: RMS to the base model's 4-step samples from the same noise, their style
             distance to the held-out style (a fall from the base's value = the new style leaking into old prompts),
             and their shape colour error
  ceiling    the teacher (base model, caption + instruction, a training image as reference tokens)

Run as: python examples/toy/reproduce.py                       # ~20 min on 2 CPU cores; results in examples/toy/results
        python examples/toy/reproduce.py --quick --out /tmp/r  # a shortened end-to-end run (the slow test)
"""
import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import dopsd  # noqa: E402
import world  # noqa: E402

MODEL = HERE / "model"
METHODS = {"sft": ["--method", "sft"], "dopsd": ["--method", "dopsd"],
           "dopsd-frozen": ["--method", "dopsd", "--ema-decay", "1.0"]}
LENGTHS = (50, 150, 300)
SEEDS = (0, 1, 2)
LR_SWEEP = (3e-4, 1e-3, 3e-3)
LORA = ["--rank", "16", "--alpha", "32", "--batch-size", "2"]
NOISE = (1000, 1001, 1002)          # evaluation noise seeds (the same for every method, length and seed)
VAL_NOISE = (2000,)
VAL_PROMPTS = [("ring", "green"), ("diamond", "orange"), ("cross", "purple")]
OLD_PROMPTS = [("circle", "green"), ("square", "yellow"), ("triangle", "orange"), ("diamond", "red"),
               ("cross", "blue"), ("ring", "white")]
STEPS, MANY = 4, 32


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(method, lr, seed, steps, out, data):
    """Train (or continue, with --resume: the LR is constant, so 100 then 300 steps equals 300 at once) to `steps`."""
    args = ["train", "--model", str(MODEL), "--data", str(data), "--out", str(out), "--resolution", "64",
            "--lr", str(lr), "--seed", str(seed), "--max-steps", str(steps), "--sample-every", "0",
            "--save-every", "0", *LORA, *METHODS[method]] + (["--resume"] if (out / "checkpoint.pt").is_file() else [])
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        code = dopsd.main(args)
    if code != 0:
        raise SystemExit(f"dopsd.py train failed ({code}) for {method} lr {lr} seed {seed}:\n{quiet.getvalue()[-2000:]}")
    return out / "pytorch_lora_weights.safetensors"


class Evaluator:
    """One pipeline; LoRAs are loaded into it and unloaded again. Sampling is dopsd.py's own klein path."""

    def __init__(self, data):
        self.pipe = dopsd.load_pipeline(str(MODEL), torch.float32)
        self.pipe.transformer.eval()
        te, tok, vae = self.pipe.text_encoder, self.pipe.tokenizer, self.pipe.vae
        self.text = lambda ps: torch.stack([c[0] for c in dopsd.student_features("klein", te, tok, ps)])
        self.refs = dopsd.klein_encode(vae, torch.stack([dopsd.pil_to_tensor(dopsd.load_rgb(p))
                                                          for p in sorted(Path(data).glob("*.png"))]))
        rng = np.random.default_rng(0)
        real = [world.style_stats(world.render(world.HELD_OUT, s, c, rng)) for s, c in world.NEW_PROMPTS]
        self.held = dict(colour=np.mean([r["colour"] for r in real], 0), texture=np.mean([r["texture"] for r in real], 0))
        self.held_contrast = float(np.mean([r["contrast"] for r in real]))

    @torch.no_grad()
    def images(self, prompts, noise_seeds, steps=STEPS, teacher=False):
        """4-step samples for every (noise seed, prompt): list of PIL, seed-major."""
        tr, out = self.pipe.transformer, []
        for ns in noise_seeds:
            noise = torch.randn(len(prompts), 32, 8, 8, generator=torch.Generator().manual_seed(ns))
            if teacher:                      # caption + instruction, a training image as reference (cycled)
                ps = [f"{p} {dopsd.KLEIN_TEACHER_SUFFIX}" for p in prompts]
                ref = self.refs[[i % len(self.refs) for i in range(len(prompts))]]
            else:
                ps, ref = prompts, None
            cond = (self.text(ps), ref)
            x = dopsd.euler_sample(lambda x, s: dopsd.klein_velocity(tr, x, s, cond), noise,
                                   dopsd.klein_sigmas(steps, 64))
            out += dopsd.klein_decode(self.pipe.vae, x)
        return out

    def style(self, ims):
        st = [world.style_stats(im) for im in ims]
        return (float(np.mean([world.style_distance(s, self.held) for s in st])),
                float(np.mean([s["contrast"] for s in st])) / self.held_contrast)

    def measure(self, lora, reference, noise=NOISE, prompts=None):
        """The metrics of one model (LoRA file or None = base). reference: the base's and the teacher's samples."""
        if lora is not None:
            dopsd.load_weights(self.pipe, lora)
        try:
            new = [world.caption(s, c, world.TRIGGER) for s, c in (prompts or world.NEW_PROMPTS)]
            old = [world.caption(s, c) for s, c in OLD_PROMPTS]
            ims_new, ims_old = self.images(new, noise), self.images(old, noise)
            if prompts is not None:                                    # LR sweep: the concept distance only
                return dict(style=self.style(ims_new)[0])
            ims_many = self.images(new, noise, MANY)
        finally:
            if lora is not None:
                self.pipe.unload_lora_weights()
        style, contrast = self.style(ims_new)
        sharp = lambda ims: np.mean([world.sharpness(im) for im in ims])
        m = dict(style=style, contrast=contrast, sharpness=sharp(ims_new) / sharp(reference["teacher"]),
                 agree_4_32=world.rms(ims_new, ims_many), colour_new=colour_err(ims_new, prompts or world.NEW_PROMPTS),
                 retention=world.rms(ims_old, reference["old"]), leak_style=self.style(ims_old)[0],
                 colour_old=colour_err(ims_old, OLD_PROMPTS))
        return m, ims_new, ims_old


def references(ev):
    """What measure() compares with: the teacher's new-concept samples and the base's old-prompt samples, on NOISE."""
    return dict(teacher=ev.images([world.caption(s, c, world.TRIGGER) for s, c in world.NEW_PROMPTS], NOISE,
                                  teacher=True),
                old=ev.images([world.caption(s, c) for s, c in OLD_PROMPTS], NOISE))


def pick_lr(name, train_lora, ev, work, length):
    """The one learning-rate rule: the LR of LR_SWEEP with the lowest new-concept style distance after `length`
    steps, on validation prompts and noise the evaluation never uses (training seed 0).
    train_lora(lr, seed, steps, run folder) -> LoRA file."""
    scores = {}
    for lr in LR_SWEEP:
        run = work / f"sweep_{name}_{lr:g}"
        scores[lr] = ev.measure(train_lora(lr, 0, length, run), None, VAL_NOISE, VAL_PROMPTS)["style"]
        shutil.rmtree(run)
    best = min(scores, key=scores.get)
    log(f"lr sweep {name}: " + ", ".join(f"{k:g} -> {v:.3f}" for k, v in scores.items()) + f" => {best:g}")
    return best


def colour_err(ims, pairs):
    """Mean shape colour error of seed-major samples of the (shape, colour) prompts `pairs`."""
    return float(np.mean([world.colour_error(im, pairs[k % len(pairs)][1]) for k, im in enumerate(ims)]))


def fmt(vals):
    a = np.asarray(vals)
    return f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1 else f"{a.mean():.3f}"


COLUMNS = [("style", "style dist. to [V] ↓"), ("contrast", "contrast (real = 1)"),
           ("sharpness", "sharpness (teacher = 1)"), ("agree_4_32", "4 vs 32 steps RMS ↓"),
           ("colour_new", "shape colour error ↓"), ("retention", "old prompts: RMS to base ↓"),
           ("leak_style", "old prompts: style dist. to [V] (base ≈ high)"), ("colour_old", "old prompts: colour error ↓")]


def table(rows):
    """rows: [(label, steps, [metric dict per seed])] -> markdown table."""
    lines = ["| model | steps | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for label, steps, ms in rows:
        lines.append(f"| {label} | {steps} | " + " | ".join(fmt([m[k] for m in ms]) if k in ms[0] else "–"
                                                            for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="table, JSON and grids go here")
    p.add_argument("--quick", action="store_true", help="shortened run: 1 seed, lengths 5/10, no sweep (for tests)")
    p.add_argument("--work", default=None, help="training runs (default: a temporary folder, deleted at the end)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    lengths, seeds = ((5, 10), (0,)) if args.quick else (LENGTHS, SEEDS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile
    work = Path(args.work or tempfile.mkdtemp(prefix="dopsd_toy_"))
    t0 = time.time()
    data = world.write_finetune_set(work / "data")
    ev = Evaluator(data)
    base_ref = references(ev)
    base, base_new, base_old = ev.measure(None, base_ref)
    # The teacher only ever draws new-concept prompts with an image in context: the other columns don't apply.
    teacher_m = dict(style=ev.style(base_ref["teacher"])[0], contrast=ev.style(base_ref["teacher"])[1],
                     sharpness=1.0, colour_new=colour_err(base_ref["teacher"], world.NEW_PROMPTS))
    log(f"base: {base}\nteacher (ceiling): style {teacher_m['style']:.3f}")

    # ---- learning rate: the same rule for every method
    lrs = {m: 3e-4 if args.quick else pick_lr(m, lambda lr, seed, n, run, m=m: train(m, lr, seed, n, run, data), ev,
                                              work, lengths[0]) for m in METHODS}

    # ---- the runs: each (method, seed) trains once, evaluated at every length on the way (constant LR + resume)
    results, grids = {}, {}
    for method in METHODS:
        for seed in seeds:
            run = work / f"{method}_{seed}"
            for steps in lengths:
                t = time.time()
                m, ims_new, ims_old = ev.measure(train(method, lrs[method], seed, steps, run, data), base_ref)
                results.setdefault((method, steps), []).append(m)
                if seed == seeds[0] and steps == lengths[-1]:
                    grids[method] = (ims_new, ims_old)
                log(f"{method} seed {seed} {steps} steps ({time.time() - t:.0f}s): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
            shutil.rmtree(run)

    rows = [("base", 0, [base]), ("teacher (ceiling)", 0, [teacher_m])]
    rows += [(f"{method} (lr {lrs[method]:g})", steps, results[(method, steps)]) for method in METHODS for steps in lengths]
    md = table(rows)
    wall = time.time() - t0
    print(md)
    header = (f"Toy turbo model, {len(seeds)} training seed(s) (mean ± std), {len(NOISE)} noise seeds × "
              f"{len(world.NEW_PROMPTS)} prompts per cell, {STEPS}-step samples; wall time {wall / 60:.1f} min.\n\n")
    (out / "results.md").write_text(header + md + "\n")
    (out / "results.json").write_text(json.dumps(dict(
        lrs=lrs, lengths=lengths, seeds=seeds, wall_s=round(wall, 1), base=base, teacher=teacher_m,
        runs={f"{k[0]}@{k[1]}": v for k, v in results.items()}), indent=2))
    # grids: rows base / SFT / D-OPSD, columns prompts, noise seed NOISE[0]
    n = len(world.NEW_PROMPTS)
    caps_new = [f"{c} {s}" for s, c in world.NEW_PROMPTS]
    caps_old = [f"{c} {s}" for s, c in OLD_PROMPTS]
    dopsd.save_grid([("base", base_new[:n]), ("teacher", base_ref["teacher"][:n])]
                    + [(m, grids[m][0][:n]) for m in METHODS], caps_new, out / "grid_new_concept.png")
    dopsd.save_grid([("base", base_old[:n])] + [(m, grids[m][1][:n]) for m in METHODS], caps_old,
                    out / "grid_old_prompts.png")
    if args.work is None:
        shutil.rmtree(work)
    log(f"done in {wall / 60:.1f} min: {out / 'results.md'}, grids in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
