"""The paper's two central claims on the toy turbo model (world v2), through `dopsd.py train` from the committed model
in examples/toy/model: (1) D-OPSD learns a new concept and keeps few-step quality as training goes on, where plain
fine-tuning (SFT) loses it; (2) D-OPSD retains prior knowledge better than SFT.

The new concept is the held-out background style "[V] style" (examples/toy/world.py), taught from 6 images, each its
own instance of the style (no two pixel-aligned), whose shapes and colours never appear in the evaluation prompts.
Four methods, the same LoRA, the same optimizer steps:
  sft             --method sft                       flow matching on the 6 images (the baseline peers use)
  dopsd           --method dopsd                     EMA teacher at dopsd.py's default decay (0.9999)
  dopsd-frozen    --method dopsd --ema-decay 1.0     the teacher stays the base model: does the EMA cause drift?
  dopsd-preserve  --method dopsd --preserve-prompts  + an on-policy roll-out onto the base on KEEP (old prompts
                                                     that the evaluation never uses), weight 1
Each method's learning rate is the best of LR_SWEEP by one rule: the lowest new-concept style distance after the
shortest training length, on validation prompts and noise that the evaluation never uses (training seed 0).
Each (method, seed) trains once to 1,000 steps and is evaluated at 50, 150, 300 and 1,000 on the way (constant LR).

Evaluation at the deploy step count (4), on fixed noise, for every training length and seed:
  concept    "[V] style" prompts with unseen shapes/colours: style distance to the held-out style (colour + texture,
             validated in gate.json), contrast relative to the real style's, sharpness relative to the teacher's
             samples, 4-step vs 32-step RMS, and colour / shape fidelity (world.colour_fidelity, shape_fidelity)
  retention  old prompts. Named ones ("a red square, ocean style"): style distance to their own named style (kept =
             low, as the base). Unnamed ones: pixel RMS to the base's samples from the same noise, and their style
             distance to [V] (the base's is high; a fall = the new style leaking in). Colour fidelity on both.
  ceiling    the teacher (base model, caption + instruction, a training image as reference tokens)

Pre-registered predictions (from the paper, written before the v2 run; PREDICTIONS below scores them):
  SFT       sharpness or style distance worsen past SFT's best length, and retention falls with length
  D-OPSD    style distance within 0.05 of the ceiling and sharpness >= 0.9 of the teacher's at every length >= 150,
            and retention better than SFT's at the same length
  +preserve leakage onto unnamed old prompts (base's style distance to [V] minus the method's) at most a third of
            plain D-OPSD's at every length >= 150, with style distance still within 0.05 of the ceiling

Run as: python examples/toy/reproduce.py                       # ~35 min on 2 CPU cores; results in examples/toy/results
        python examples/toy/reproduce.py --quick --out /tmp/r  # a shortened end-to-end run (the slow test)
"""
import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import dopsd  # noqa: E402
import world  # noqa: E402

MODEL = HERE / "model"
METHODS = {"sft": ["--method", "sft"], "dopsd": ["--method", "dopsd"],
           "dopsd-frozen": ["--method", "dopsd", "--ema-decay", "1.0"],
           "dopsd-preserve": ["--method", "dopsd", "--preserve-prompts", "{keep}"]}
LENGTHS = (50, 150, 300, 1000)
SEEDS = (0, 1, 2)
LR_SWEEP = (3e-4, 1e-3, 3e-3)
LORA = ["--rank", "16", "--alpha", "32", "--batch-size", "2"]
NOISE = (1000, 1001, 1002)          # evaluation noise seeds (the same for every method, length and seed)
VAL_NOISE = (2000,)
VAL_PROMPTS = [("diamond", "black"), ("cross", "purple"), ("ring", "orange")]     # the 3 combinations NEW_PROMPTS skip
OLD_UNNAMED = [("circle", "green"), ("square", "yellow"), ("triangle", "orange"), ("diamond", "red"),
               ("cross", "blue"), ("ring", "white")]
OLD_NAMED = [("square", "red", "ocean"), ("ring", "blue", "desert"), ("cross", "yellow", "forest"),
             ("diamond", "green", "candy"), ("circle", "orange", "night"), ("triangle", "white", "rust")]
KEEP = [("circle", "blue", None), ("square", "green", None), ("triangle", "purple", None), ("diamond", "white", None),
        ("cross", "red", None), ("ring", "yellow", None), ("circle", "white", "ocean"), ("triangle", "green", "desert"),
        ("square", "purple", "forest"), ("ring", "red", "candy")]          # --preserve-prompts: none is evaluated
STEPS, MANY = 4, 32
NEAR_CEILING, NEAR_SHARP = 0.05, 0.9


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def named_caption(shape, colour, name):
    return world.caption(shape, colour, world.named_words(name) if name else None)


def write_keep(path):
    """The --preserve-prompts file: KEEP's captions, one per line."""
    assert not {(s, c, n) for s, c, n in KEEP} & {*((s, c, None) for s, c in OLD_UNNAMED), *OLD_NAMED}
    path.write_text("\n".join(named_caption(*k) for k in KEEP) + "\n")
    return path


def train(method_args, lr, seed, steps, out, data):
    """Train (or continue, with --resume: the LR is constant, so 100 then 300 steps equals 300 at once) to `steps`.
    Returns (LoRA file, training seconds so far: the sum of log.jsonl's per-step `sec`)."""
    args = ["train", "--model", str(MODEL), "--data", str(data), "--out", str(out), "--resolution", "64",
            "--lr", str(lr), "--seed", str(seed), "--max-steps", str(steps), "--sample-every", "0",
            "--save-every", "0", *LORA, *method_args] + (["--resume"] if (out / "checkpoint.pt").is_file() else [])
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        code = dopsd.main(args)
    if code != 0:
        raise SystemExit(f"dopsd.py train failed ({code}) for {method_args} lr {lr} seed {seed}:\n"
                         f"{quiet.getvalue()[-2000:]}")
    secs = [json.loads(line)["sec"] for line in (out / "log.jsonl").read_text().splitlines()]
    return out / "pytorch_lora_weights.safetensors", float(sum(secs))


class Evaluator:
    """One pipeline; LoRAs are loaded into it and unloaded again. Sampling is dopsd.py's own klein path."""

    def __init__(self, data):
        self.load(data)
        self.held = world.style_reference(world.HELD_OUT, np.random.default_rng(0))
        self.named = {n: world.style_reference(s, np.random.default_rng(0)) for n, s in world.NAMED.items()}
        self.prompts = dict(new=[world.caption(s, c, world.TRIGGER) for s, c in world.NEW_PROMPTS],
                            unnamed=[world.caption(s, c) for s, c in OLD_UNNAMED],
                            named=[named_caption(*p) for p in OLD_NAMED])
        self.reference = dict(teacher=self.images(self.prompts["new"], NOISE, teacher=True),
                              unnamed=self.images(self.prompts["unnamed"], NOISE))

    def load(self, data):
        """The pipeline, its text path, and data's images as the teacher's reference latents (self.refs)."""
        self.pipe = dopsd.load_pipeline(str(MODEL), torch.float32)
        self.pipe.transformer.eval()
        te, tok = self.pipe.text_encoder, self.pipe.tokenizer
        self.text = lambda ps: torch.stack([c[0] for c in dopsd.student_features("klein", te, tok, ps)])
        self.refs = self.encode([dopsd.load_rgb(p) for p in sorted(Path(data).glob("*.png"))])

    def encode(self, images):
        """PIL images -> reference latents."""
        return dopsd.klein_encode(self.pipe.vae, torch.stack([dopsd.pil_to_tensor(im) for im in images]))

    @torch.no_grad()
    def images(self, prompts, noise_seeds, steps=STEPS, teacher=False, refs=None):
        """4-step samples for every (noise seed, prompt): list of PIL, seed-major. teacher: reference latents from
        `refs` (default: the training images, self.refs), cycled."""
        tr, out = self.pipe.transformer, []
        for ns in noise_seeds:
            noise = torch.randn(len(prompts), 32, 8, 8, generator=torch.Generator().manual_seed(ns))
            if teacher:                      # caption + instruction, a training image as reference (cycled)
                refs = self.refs if refs is None else refs
                ps = [f"{p} {dopsd.KLEIN_TEACHER_SUFFIX}" for p in prompts]
                ref = refs[[i % len(refs) for i in range(len(prompts))]]
            else:
                ps, ref = prompts, None
            cond = (self.text(ps), ref)
            x = dopsd.euler_sample(lambda x, s: dopsd.klein_velocity(tr, x, s, cond), noise,
                                   dopsd.klein_sigmas(steps, 64))
            out += dopsd.klein_decode(self.pipe.vae, x)
        return out

    def style(self, ims, ref=None):
        """(mean style distance to ref (default: [V]), mean contrast relative to ref's)."""
        ref = ref or self.held
        st = [world.style_stats(im) for im in ims]
        return (float(np.mean([world.style_distance(s, ref) for s in st])),
                float(np.mean([s["contrast"] for s in st])) / ref["contrast"])

    def validation(self, lora):
        """The learning-rate rule's score: new-concept style distance on VAL_PROMPTS and VAL_NOISE."""
        dopsd.load_weights(self.pipe, lora)
        try:
            return self.style(self.images([world.caption(s, c, world.TRIGGER) for s, c in VAL_PROMPTS], VAL_NOISE))[0]
        finally:
            self.pipe.unload_lora_weights()

    def measure(self, lora):
        """The metrics of one model (LoRA file, or None = the base) and its new / old-prompt samples."""
        if lora is not None:
            dopsd.load_weights(self.pipe, lora)
        try:
            ims = {k: self.images(p, NOISE) for k, p in self.prompts.items()}
            many = self.images(self.prompts["new"], NOISE, MANY)
        finally:
            if lora is not None:
                self.pipe.unload_lora_weights()
        style, contrast = self.style(ims["new"])
        sharp = lambda xs: np.mean([world.sharpness(im) for im in xs])
        colour_new, shape_new = world.fidelity(ims["new"], world.NEW_PROMPTS)
        named = [world.style_distance(world.style_stats(im), self.named[OLD_NAMED[k % 6][2]])
                 for k, im in enumerate(ims["named"])]
        colour_old = np.mean([world.fidelity(ims["unnamed"], OLD_UNNAMED)[0],
                              world.fidelity(ims["named"], OLD_NAMED)[0]])
        m = dict(style=style, contrast=contrast, sharpness=sharp(ims["new"]) / sharp(self.reference["teacher"]),
                 agree_4_32=world.rms(ims["new"], many), colour_new=colour_new, shape_new=shape_new,
                 named_kept=float(np.mean(named)), retention=world.rms(ims["unnamed"], self.reference["unnamed"]),
                 leak_style=self.style(ims["unnamed"])[0], colour_old=float(colour_old))
        return m, ims


_EV = {}


def evaluator(data):
    """This process's Evaluator (one per worker: a pipeline is not shared across processes)."""
    if data not in _EV:
        _EV[data] = Evaluator(data)
    return _EV[data]


def run_job(job):
    """One training run through its lengths, evaluated at each: a dict of the job plus 'metrics' (one per length),
    'val' (the learning-rate rule's score, for a sweep job) and, when asked, the last length's samples."""
    torch.set_num_threads(job.get("threads", 2))
    ev, run, out = evaluator(job["data"]), Path(job["run"]), dict(job, metrics=[])
    for n in job["lengths"]:
        t = time.time()
        lora, sec = train(job["args"], job["lr"], job["seed"], n, run, job["data"])
        if job.get("sweep"):
            out["val"] = ev.validation(lora)
            continue
        m, ims = ev.measure(lora)
        out["metrics"].append(dict(m, sec=sec))
        if job.get("keep_images") and n == job["lengths"][-1]:
            out["images"] = ims
        log(f"{job['name']} lr {job['lr']:g} seed {job['seed']} {n} steps ({time.time() - t:.0f}s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    shutil.rmtree(run)
    return out


def run_jobs(jobs, workers):
    """run_job over jobs, in `workers` processes of 1 thread each (the toy's ops are too small for 2 threads to pay:
    two processes give more samples per second on 2 cores), or in this process when workers == 1."""
    if workers == 1:
        return [run_job(j) for j in jobs]
    import multiprocessing
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_job, [dict(j, threads=1) for j in jobs]))


def pick_lrs(methods, data, work, length, workers):
    """The one learning-rate rule: per method, the LR of LR_SWEEP with the lowest validation style distance after
    `length` steps (training seed 0). methods: {name: dopsd.py arguments}."""
    jobs = [dict(name=name, args=args, lr=lr, seed=0, lengths=(length,), data=data, sweep=True,
                 run=str(work / f"sweep_{name}_{lr:g}")) for name, args in methods.items() for lr in LR_SWEEP]
    scores = {}
    for r in run_jobs(jobs, workers):
        scores.setdefault(r["name"], {})[r["lr"]] = r["val"]
    for name, s in scores.items():
        log(f"lr sweep {name}: " + ", ".join(f"{k:g} -> {v:.3f}" for k, v in s.items()) + f" => {min(s, key=s.get):g}")
    return {name: min(s, key=s.get) for name, s in scores.items()}


def fmt(vals):
    a = np.asarray(vals)
    return f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1 else f"{a.mean():.3f}"


COLUMNS = [("style", "style dist. to [V] ↓"), ("contrast", "contrast (real = 1)"),
           ("sharpness", "sharpness (teacher = 1)"), ("agree_4_32", "4 vs 32 steps RMS ↓"),
           ("colour_new", "colour fidelity ↑"), ("shape_new", "shape fidelity ↑"),
           ("named_kept", "old named: dist. to own style ↓"), ("retention", "old unnamed: RMS to base ↓"),
           ("leak_style", "old unnamed: dist. to [V] (fall = leak)"), ("colour_old", "old: colour fidelity ↑"),
           ("sec", "training s")]


def table(rows, columns=COLUMNS):
    """rows: [(label, steps, [metric dict per seed])] -> markdown table of `columns` [(key, heading)]."""
    lines = ["| model | steps | " + " | ".join(c[1] for c in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for label, steps, ms in rows:
        lines.append(f"| {label} | {steps} | " + " | ".join(fmt([m[k] for m in ms]) if k in ms[0] else "–"
                                                            for k, _ in columns) + " |")
    return "\n".join(lines)


def predictions(res, lengths, ceiling, base):
    """The pre-registered predictions (module docstring), scored on the means over seeds: [(claim, held, numbers)].
    Thresholds fixed before the run: 'worsen' = sharpness down by > 0.05 or style distance up by > 0.02."""
    M = lambda method, n, k: float(np.mean([m[k] for m in res[(method, n)]]))
    late = [n for n in lengths if n >= 150] or list(lengths[1:])
    out = []
    best = min(lengths, key=lambda n: M("sft", n, "style"))
    worse = [n for n in lengths if n > best and (M("sft", n, "sharpness") < M("sft", best, "sharpness") - 0.05
                                                  or M("sft", n, "style") > M("sft", best, "style") + 0.02)]
    falls = all(M("sft", lengths[-1], k) > M("sft", lengths[0], k) for k in ("named_kept", "retention"))
    out.append(("SFT: sharpness or style distance worsen past SFT's best length, and retention falls with length",
                bool(worse) and falls, f"best length {best}; worse at {worse or 'no later length'}; named-style "
                f"distance {M('sft', lengths[0], 'named_kept'):.3f} -> {M('sft', lengths[-1], 'named_kept'):.3f}, "
                f"RMS to base {M('sft', lengths[0], 'retention'):.3f} -> {M('sft', lengths[-1], 'retention'):.3f}"))
    near = all(M("dopsd", n, "style") <= ceiling + NEAR_CEILING and M("dopsd", n, "sharpness") >= NEAR_SHARP
               for n in late)
    better = all(M("dopsd", n, k) < M("sft", n, k) for n in late for k in ("named_kept", "retention"))
    out.append((f"D-OPSD: style within {NEAR_CEILING} of the ceiling and sharpness >= {NEAR_SHARP} at every length "
                f">= {late[0]}, retention better than SFT's", near and better,
                "; ".join(f"{n}: style {M('dopsd', n, 'style'):.3f} (ceiling {ceiling:.3f}), sharpness "
                          f"{M('dopsd', n, 'sharpness'):.3f}, named {M('dopsd', n, 'named_kept'):.3f} vs SFT "
                          f"{M('sft', n, 'named_kept'):.3f}, RMS {M('dopsd', n, 'retention'):.3f} vs SFT "
                          f"{M('sft', n, 'retention'):.3f}" for n in late)))
    leak = lambda method, n: max(0.0, base["leak_style"] - M(method, n, "leak_style"))
    third = all(leak("dopsd-preserve", n) <= leak("dopsd", n) / 3 and
                M("dopsd-preserve", n, "style") <= ceiling + NEAR_CEILING for n in late)
    out.append((f"D-OPSD + preservation: leakage at most a third of D-OPSD's, style within {NEAR_CEILING} of the "
                f"ceiling, at every length >= {late[0]}", third,
                "; ".join(f"{n}: leakage {leak('dopsd-preserve', n):.3f} vs {leak('dopsd', n):.3f}, style "
                          f"{M('dopsd-preserve', n, 'style'):.3f}" for n in late)))
    return out


def save_grids(out, base_ims, teacher_ims, runs):
    """grid_new_concept.png (base, teacher, each method) and grid_old_prompts.png (unnamed then named old prompts),
    noise seed NOISE[0], each method's first seed at its last length."""
    n = len(world.NEW_PROMPTS)
    dopsd.save_grid([("base", base_ims["new"][:n]), ("teacher", teacher_ims[:n])]
                    + [(m, ims["new"][:n]) for m, ims in runs.items()],
                    [f"{c} {s}" for s, c in world.NEW_PROMPTS], out / "grid_new_concept.png")
    old = lambda ims: ims["unnamed"][:len(OLD_UNNAMED)] + ims["named"][:len(OLD_NAMED)]
    dopsd.save_grid([("base", old(base_ims))] + [(m, old(ims)) for m, ims in runs.items()],
                    [f"{c} {s}" for s, c in OLD_UNNAMED] + [f"{c} {s}, {nm}" for s, c, nm in OLD_NAMED],
                    out / "grid_old_prompts.png")


def report(out, lrs, lengths, seeds, base, teacher_m, res, wall, workers):
    """results.md (the table and the predictions, scored) and results.json."""
    rows = [("base", 0, [base]), ("teacher (ceiling)", 0, [teacher_m])]
    rows += [(f"{m} (lr {lrs[m]:g})", n, res[(m, n)]) for m in METHODS for n in lengths]
    preds = predictions(res, lengths, teacher_m["style"], base)
    md = (f"Toy turbo model, world v2. {len(seeds)} training seed(s) (mean ± std), {len(NOISE)} noise seeds × 6 "
          f"prompts per cell, {STEPS}-step samples; wall time {wall / 60:.1f} min on {workers} worker process(es).\n\n"
          + table(rows) + "\n\nPre-registered predictions (reproduce.py's docstring), scored on the means:\n\n"
          + "\n".join(f"- **{'held' if ok else 'did not hold'}**: {claim}. {nums}" for claim, ok, nums in preds) + "\n")
    print(md)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(dict(
        world="v2", lrs=lrs, lengths=lengths, seeds=seeds, wall_s=round(wall, 1), base=base, teacher=teacher_m,
        runs={f"{k[0]}@{k[1]}": v for k, v in res.items()},
        predictions=[dict(claim=c, held=ok, numbers=nums) for c, ok, nums in preds]), indent=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="table, JSON and grids go here")
    p.add_argument("--quick", action="store_true", help="shortened run: 1 seed, lengths 5/10, no sweep (for tests)")
    p.add_argument("--work", default=None, help="training runs (default: a temporary folder, deleted at the end)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes of 1 thread each (1: all in this process)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to re-run (after a change to "
                   "their code path only); the other methods' rows and LRs are read from --out's results.json, and "
                   "the grids are left as they are")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    lengths, seeds = ((5, 10), (0,)) if args.quick else (LENGTHS, SEEDS)
    workers = 1 if args.quick else args.jobs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import tempfile
    work = Path(args.work or tempfile.mkdtemp(prefix="dopsd_toy_"))
    t0 = time.time()
    data = str(world.write_finetune_set(work / "data"))
    keep = write_keep(work / "keep.txt")
    chosen = args.methods.split(",")
    methods = {m: [a.replace("{keep}", str(keep)) for a in v] for m, v in METHODS.items() if m in chosen}
    ev = evaluator(data)
    base, base_ims = ev.measure(None)
    teacher = ev.reference["teacher"]
    colour_t, shape_t = world.fidelity(teacher, world.NEW_PROMPTS)
    teacher_m = dict(style=ev.style(teacher)[0], contrast=ev.style(teacher)[1], sharpness=1.0, colour_new=colour_t,
                     shape_new=shape_t)
    log(f"base: {base}\nteacher (ceiling): {teacher_m}")
    lrs = {m: 3e-4 for m in methods} if args.quick else pick_lrs(methods, data, work, lengths[0], workers)
    order = [m for m in ("dopsd-preserve", "dopsd", "dopsd-frozen", "sft") if m in methods]   # longest first
    jobs = [dict(name=m, args=methods[m], lr=lrs[m], seed=s, lengths=lengths, data=data, run=str(work / f"{m}_{s}"),
                 keep_images=s == seeds[0]) for m in order for s in seeds]
    res, grids = {}, {}
    for r in run_jobs(jobs, workers):
        for n, m in zip(lengths, r["metrics"]):
            res.setdefault((r["name"], n), []).append(m)
        if "images" in r:
            grids[r["name"]] = r["images"]
    wall = time.time() - t0
    if len(methods) < len(METHODS):                  # the rows not re-run, as the last full run measured them
        old = json.loads((out / "results.json").read_text())
        lrs.update({m: old["lrs"][m] for m in METHODS if m not in methods})
        res.update({(k.split("@")[0], int(k.split("@")[1])): v for k, v in old["runs"].items()
                    if k.split("@")[0] not in methods})
    report(out, lrs, lengths, seeds, base, teacher_m, res, wall, workers)
    if len(methods) == len(METHODS):
        save_grids(out, base_ims, teacher, {m: grids[m] for m in METHODS})
    if args.work is None:
        shutil.rmtree(work)
    log(f"done in {wall / 60:.1f} min: {out / 'results.md'}, grids in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
