"""Continual tuning on the toy turbo model (issue 23): teach concept A, then concept B on top of it, and measure what
happens to A, to few-step sampling and to the old prompts. Everything goes through `dopsd.py train` from the committed
model in examples/toy/model, as in reproduce.py, whose evaluation, training and learning-rate rule this reuses.

The concepts: A = "[V] style" (world.HELD_OUT, reproduce.py's concept, the same 6 images); B = "[W] style"
(world.HELD_OUT_2, 6 images of their own, world.FINETUNE_2). The gate below checks that B is new: the pre-training
styles are redrawn from make_turbo.py's fixed seed and B's distance to the nearest is measured, and the base is
measured drawing it from "[W] style" (it cannot) and the teacher from a reference image (it can), as make_turbo's
gate measures [V].

  stage 1   A = [V] from the base by D-OPSD + --preserve-prompts (reproduce.py's KEEP): reproduce.py's recipe that
            learns [V] without painting it onto other prompts. (Plain D-OPSD paints [V] onto every prompt there, so
            after it "A kept" and "B leaked onto A's prompts" could not be told apart.)
  stage 2   B = [W] from A, three ways, each continuing A's LoRA file with --init-lora:
    sft             --method sft                                   flow matching on B's images
    dopsd           --method dopsd                                 D-OPSD, no anchor
    dopsd-preserve  --method dopsd --preserve-prompts KEEP_AB      + an on-policy roll-out pulled onto base + A on
                                                                   A's 6 training captions and KEEP (old prompts
                                                                   that the evaluation never uses)
  references: B alone (B from the base by stage 1's recipe, to B_LENGTHS only: a reference at its ceiling) and
  A + B stacked (A's and B-alone's files as two adapters of the pipeline, each at strength 1.0: what a user does
  without continual tuning)
One learning-rate rule for every training, reproduce.py's: the LR of LR_SWEEP with the lowest validation style
distance of the concept being taught after the shortest length, training seed 0, on validation prompts and noise the
evaluation never uses. By default its choices are read from reproduce.py's results.json per method (RULE_FROM: the
same rule, method and recipe, on [V]); --sweep applies it here, on [W]. Each (method, seed) trains once and is
measured at every length of LENGTHS (constant LR).

Measured at the deploy step count (4), fixed noise (reproduce.NOISE), training seeds 0-2:
  B learnt       [W] prompts (shapes/colours not in B's images): style distance to [W]; ceiling: the teacher
  A kept         [V] prompts (reproduce's NEW_PROMPTS): style distance to [V], against A's own after stage 1
  few steps      sharpness of the [W] samples relative to the [W] teacher's; 4-step vs 32-step RMS on [W] prompts
                 (the first noise seed only: 32 steps cost twice all the 4-step samples together)
  old prompts    reproduce's OLD_UNNAMED / OLD_NAMED: colour fidelity, named styles kept, RMS to the base, and
                 leakage: the unnamed prompts' style distance to [W] (and to [V]) falling below the base's

Pre-registered predictions (written before the first full run; predictions() scores them on the means over seeds;
"late" = every length >= 150):
  P1 B learnt     both D-OPSD arms' [W] distance within 0.05 of the teacher's ceiling at every late length
  P2 A lost       without an anchor A is not kept: [V] distance rises by more than 0.1 over A's after stage 1 by
                  the longest length, for SFT and for plain D-OPSD alike (in reproduce.py both paint their concept
                  onto every prompt, and [V] and [W] captions differ by one token)
  P3 A kept       D-OPSD + anchor keeps A: [V] distance within 0.05 of A's after stage 1 at every length, and its
                  leakage onto unnamed old prompts (the base's distance to [W] minus its) at most a third of plain
                  D-OPSD's at every late length
  P4 few steps    both D-OPSD arms' sharpness >= 0.9 of the teacher's at every length, and SFT's 4-vs-32-step RMS
                  above both D-OPSD arms' at every length (as in reproduce.py)
  P5 one file     the stacked pair keeps A worse than the one continual file: A + B-alone's [V] distance at least
                  0.05 above D-OPSD + anchor's at B alone's longest length (B-alone never saw [V] prompts, so
                  nothing stops it drawing [W] on them, and stacking adds both deltas)

Then the deliverable: D-OPSD + anchor's seed-0 file after A then B, loaded by diffusers' Flux2KleinPipeline at
strength 1.0 (load_lora_weights, nothing else), draws both concepts; and applying the file as ComfyUI does (W + B·A at
strength 1.0, no metadata read) gives the same images.

Run as: python examples/toy/continual.py                       # results in examples/toy/results
        python examples/toy/continual.py --stop-after 10       # in parts: no job starts after 10 min; run it again
                                                               # to continue (finished jobs are kept in --work)
        python examples/toy/continual.py --quick --out /tmp/c  # a shortened end-to-end run (1.4 min)
Run time on 2 quiet CPU cores: about 15 min, estimated from its jobs timed alone (each 50-step stage-2 job and stage
1's 100 steps, seed 0, reproduced the recorded metrics to 1e-4): 2 workers × ~13.4 min of jobs, 1 min in the main
process (gate 29 s, grid 21 s). The recorded run took 55 min in 5 parts on a shared machine, where the same training
loops ran about 3x slower (stage 1, seed 0: 176 s recorded, 56 s alone).
"""
import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import dopsd  # noqa: E402
import reproduce as rp  # noqa: E402
import world  # noqa: E402

STAGE1 = ["--method", "dopsd", "--preserve-prompts", "{keep}"]
# The D-OPSD arms start their teacher at A, as every run did when these arms were recorded (dopsd.py's default is now
# --teacher-start auto, which takes the bare base on this toy: examples/toy/teacher_check.py compares the two).
ARMS = {"sft": ["--method", "sft", "--init-lora", "{a}"],
        "dopsd": ["--method", "dopsd", "--init-lora", "{a}", "--teacher-start", "init"],
        "dopsd-preserve": ["--method", "dopsd", "--init-lora", "{a}", "--preserve-prompts", "{keep_ab}",
                           "--teacher-start", "init"],
        "b-alone": STAGE1}
STAGE1_STEPS = 100           # reproduce.py: D-OPSD + preservation is at its ceiling from 50 steps on
LENGTHS = (50, 150, 300)
B_LENGTHS = LENGTHS[:2]      # B alone is a reference: at its ceiling by 50 steps, like A (reproduce.py)
# The learning-rate rule's choice per method, as reproduce.py's sweep made it on [V] (results.json "lrs"): the same
# rule, methods and recipe; --sweep re-runs the rule here instead, on [W] (~5 min more on 2 quiet cores).
RULE_FROM = {"stage1": "dopsd-preserve", "sft": "sft", "dopsd": "dopsd", "dopsd-preserve": "dopsd-preserve",
             "b-alone": "dopsd-preserve"}
SEEDS = (0, 1, 2)
NEAR, RISE, SHARP = 0.05, 0.1, 0.9
PART_FILE = "parts.json"     # the wall time of every part of the run, summed in the report


def log(msg):
    rp.log(msg)


def write_keep_ab(path):
    """Stage 2's --preserve-prompts: A's training captions and reproduce.py's KEEP (none of them evaluated)."""
    lines = [world.caption(s, c, world.TRIGGER) for s, c in world.FINETUNE] + [rp.named_caption(*k) for k in rp.KEEP]
    path.write_text("\n".join(lines) + "\n")
    return path


class Evaluator(rp.Evaluator):
    """reproduce.py's Evaluator for two concepts: self.refs are B's images (the stage-2 teacher's references)."""

    def __init__(self, data_v, data_w):
        self.load(data_w)
        self.refs_v = self.encode([dopsd.load_rgb(p) for p in sorted(Path(data_v).glob("*.png"))])
        self.style_of = dict(v=world.style_reference(world.HELD_OUT, np.random.default_rng(0)),
                             w=world.style_reference(world.HELD_OUT_2, np.random.default_rng(0)))
        self.held = self.style_of["v"]                          # what reproduce's validation() measures
        self.named = {n: world.style_reference(s, np.random.default_rng(0)) for n, s in world.NAMED.items()}
        self.prompts = dict(w=[world.caption(s, c, world.TRIGGER_2) for s, c in world.NEW_PROMPTS_2],
                            v=[world.caption(s, c, world.TRIGGER) for s, c in world.NEW_PROMPTS],
                            unnamed=[world.caption(s, c) for s, c in rp.OLD_UNNAMED],
                            named=[rp.named_caption(*p) for p in rp.OLD_NAMED])
        self.reference = dict(teacher=self.images(self.prompts["w"], rp.NOISE, teacher=True),
                              teacher_v=self.images(self.prompts["v"], rp.NOISE, teacher=True, refs=self.refs_v),
                              unnamed=self.images(self.prompts["unnamed"], rp.NOISE))

    def load_loras(self, loras):
        """Each LoRA file as its own adapter at strength 1.0 (two files: stacked, as a user would stack them)."""
        names = [f"l{i}" for i in range(len(loras))]
        for name, f in zip(names, loras):
            self.pipe.load_lora_weights(str(Path(f).parent), weight_name=Path(f).name, adapter_name=name)
        if names:
            self.pipe.set_adapters(names, [1.0] * len(names))

    def validation(self, lora, concept="v"):
        """The learning-rate rule's score: [V] as reproduce.py scores it, or [W] on world.VAL_PROMPTS_2."""
        if concept == "v":
            return super().validation(lora)
        self.load_loras([lora])
        try:
            ims = self.images([world.caption(s, c, world.TRIGGER_2) for s, c in world.VAL_PROMPTS_2], rp.VAL_NOISE)
            return self.style(ims, self.style_of["w"])[0]
        finally:
            self.pipe.unload_lora_weights()

    def measure(self, loras, many=True):
        """The metrics of the base with `loras` (a list of files, stacked at 1.0) and its samples. The 4-vs-32-step
        comparison (many) uses the first noise seed only: 32 steps cost twice all the 4-step samples together."""
        self.load_loras(loras)
        try:
            ims = {k: self.images(p, rp.NOISE) for k, p in self.prompts.items()}
            many = self.images(self.prompts["w"], rp.NOISE[:1], rp.MANY) if many else None
        finally:
            if loras:
                self.pipe.unload_lora_weights()
        return self.metrics(ims, many), ims

    def metrics(self, ims, many=None):
        sharp = lambda xs: np.mean([world.sharpness(im) for im in xs])
        named = [world.style_distance(world.style_stats(im), self.named[rp.OLD_NAMED[k % 6][2]])
                 for k, im in enumerate(ims["named"])]
        m = dict(w_style=self.style(ims["w"], self.style_of["w"])[0], v_style=self.style(ims["v"])[0],
                 sharpness=sharp(ims["w"]) / sharp(self.reference["teacher"]),
                 colour_w=world.fidelity(ims["w"], world.NEW_PROMPTS_2)[0],
                 colour_v=world.fidelity(ims["v"], world.NEW_PROMPTS)[0],
                 named_kept=float(np.mean(named)), retention=world.rms(ims["unnamed"], self.reference["unnamed"]),
                 leak_w=self.style(ims["unnamed"], self.style_of["w"])[0], leak_v=self.style(ims["unnamed"])[0],
                 colour_old=float(np.mean([world.fidelity(ims["unnamed"], rp.OLD_UNNAMED)[0],
                                           world.fidelity(ims["named"], rp.OLD_NAMED)[0]])))
        if many is not None:
            m["agree_4_32"] = world.rms(ims["w"][:len(many)], many)
        return m


_EV = {}


def evaluator(data_v, data_w):
    """This process's Evaluator (a pipeline is not shared across processes)."""
    if (data_v, data_w) not in _EV:
        _EV[(data_v, data_w)] = Evaluator(data_v, data_w)
    return _EV[(data_v, data_w)]


def run_job(job):
    """One training run through its lengths: {'metrics': [one per length], 'stacked': [A + this run per length]}
    (stacked only when job['stack'] names A's file), or {'val': score} for a learning-rate sweep job. The last
    length's LoRA file is kept as job['keep'] when given."""
    torch.set_num_threads(job.get("threads", 2))
    ev, run = evaluator(job["data_v"], job["data_w"]), Path(job["run"])
    out = dict(metrics=[], stacked=[])
    shutil.rmtree(run, ignore_errors=True)           # a job killed half-way starts again from step 0
    for n in job["lengths"]:
        t = time.time()
        lora, sec = rp.train(job["args"], job["lr"], job["seed"], n, run, job["data"])
        if job.get("sweep"):
            out["val"] = ev.validation(lora, job["concept"])
            continue
        m = dict(ev.measure([lora])[0], sec=sec)
        out["metrics"].append(m)
        if job.get("stack"):
            out["stacked"].append(ev.measure([job["stack"], lora], many=False)[0])
        log(f"{job['key']} {n} steps ({time.time() - t:.0f}s): " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    if job.get("keep"):                              # whole or not at all: another job may be waiting for it
        shutil.copy(lora, job["keep"] + ".tmp")
        os.replace(job["keep"] + ".tmp", job["keep"])
    shutil.rmtree(run)
    return out


def run_cached(jobs, work, workers, deadline):
    """run_job over the jobs whose result work/jobs/<key>.json does not exist yet, in `workers` processes of 1 thread
    (as reproduce.run_jobs), each once the files in its 'needs' exist; no job starts after `deadline`. Returns
    {key: result} once all are done, else None (the finished ones stay on disk: the next part skips them)."""
    folder = work / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    path = lambda j: folder / f"{j['key']}.json"
    save = lambda j, r: path(j).write_text(json.dumps(r))
    queue = [j for j in jobs if not path(j).is_file()]
    ready = lambda: next((j for j in queue if all(Path(f).is_file() for f in j.get("needs", ()))), None)
    if workers == 1:
        while queue and time.time() < deadline and ready():
            j = ready()
            queue.remove(j)
            save(j, run_job(j))
    elif queue and time.time() < deadline:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {}
            while queue or pending:
                while queue and len(pending) < workers and time.time() < deadline and ready():
                    j = ready()
                    queue.remove(j)
                    pending[pool.submit(run_job, dict(j, threads=1))] = j
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    save(pending.pop(f), f.result())
    if all(path(j).is_file() for j in jobs):
        return {j["key"]: json.loads(path(j).read_text()) for j in jobs}
    return None


def pick_lr(results):
    """reproduce.pick_lrs' rule on finished sweep jobs {key: {'val': score}} of one method: the lowest score's LR."""
    scores = {float(k.rsplit("_", 1)[1]): r["val"] for k, r in results.items()}
    return min(scores, key=scores.get), scores


def pretraining_styles(limit=None):
    """The 4,000 pre-training styles, redrawn as make_turbo.stage_data draws them (its seed, its order); the first
    `limit` only, if given."""
    import make_turbo
    rng = np.random.default_rng(200)
    names = list(world.NAMED)
    named = [names[rng.integers(len(names))] if rng.random() < make_turbo.NAMED_SHARE else None
             for _ in range(make_turbo.N_STYLES)]
    return [world.NAMED[n] if n else world.random_style(rng) for n in named[:limit]]


def gate_concept(ev, style, trigger, seeds=5):
    """make_turbo's gate_teacher for any concept: colour and texture distance to the style of 16 prompts' 4-step
    samples, drawn by the teacher with other instances of it as reference, from text alone, and from text with its
    trigger (mean ± std over noise seeds)."""
    rng = np.random.default_rng(300)
    ref, vis = world.style_reference(style, rng), world.visible_colours(style)
    combos = [(s, c) for s in world.SHAPES for c in world.COLOURS]
    prompts = [world.caption(*combos[(7 * i) % len(combos)]) for i in range(16)]
    rows = {}
    for seed in range(seeds):
        refs = [world.render(style, world.SHAPES[(5 * i + seed) % 6], vis[i % len(vis)], rng)
                for i in range(len(prompts))]
        for k, ims in (("with_ref", ev.images(prompts, (seed,), teacher=True, refs=ev.encode(refs))),
                       ("no_ref", ev.images(prompts, (seed,))),
                       ("trigger_no_ref", ev.images([f"{p}, {trigger}" for p in prompts], (seed,)))):
            st = [world.style_stats(im) for im in ims]
            rows.setdefault(k + "_colour", []).append(np.mean([world.colour_distance(s, ref) for s in st]))
            rows.setdefault(k + "_texture", []).append(np.mean([world.texture_distance(s, ref) for s in st]))
    return {k: [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)] for k, v in rows.items()}


def gate(ev, quick=False):
    """Is [W] new? Its distance to the nearest pre-training style, to [V] and the NAMED styles; and what the base
    draws for it and the teacher copies of it, beside the same for [V]. quick: 100 styles and 1 noise seed."""
    stats = lambda s: world.style_stats(world.render_background(s))
    w = stats(world.HELD_OUT_2)
    pre = [world.style_distance(w, stats(s)) for s in pretraining_styles(100 if quick else None)]
    return dict(w_nearest_pretraining_style=round(min(pre), 4), margin=world.HELD_OUT_MARGIN,
                w_to_v_and_named=round(min(world.style_distance(w, stats(s))
                                           for s in [world.HELD_OUT, *world.NAMED.values()]), 4),
                w=gate_concept(ev, world.HELD_OUT_2, world.TRIGGER_2, 1 if quick else 5),
                v=gate_concept(ev, world.HELD_OUT, world.TRIGGER, 1 if quick else 5))


def cached(path, make):
    """make()'s JSON result, computed once and kept at path."""
    if not path.is_file():
        path.write_text(json.dumps(make(), indent=2))
    return json.loads(path.read_text())


def fill(args, **paths):
    """dopsd.py arguments with {a}, {keep}, {keep_ab} replaced by those paths."""
    out = []
    for a in args:
        for k, v in paths.items():
            a = a.replace("{" + k + "}", str(v))
        out.append(a)
    return out


def job(cfg, key, args, lr, seed, lengths, data, **more):
    return dict(key=key, args=args, lr=lr, seed=seed, lengths=lengths, data=str(data), data_v=str(cfg.data_v),
                data_w=str(cfg.data_w), run=str(cfg.work / "runs" / key), **more)


def stage1(cfg, deadline):
    """A = [V] from the base, every seed: (lr, the rule's scores or None, jobs), or None if stopped by the deadline.
    With --sweep, the rule's sweep on [V] runs here first. A's files: work/A_<seed>.safetensors."""
    lr, scores = cfg.lrs["stage1"], None
    if cfg.sweep:
        sweep = [job(cfg, f"s1_sweep_{lr:g}", fill(STAGE1, keep=cfg.keep), lr, 0, cfg.lengths[:1], cfg.data_v,
                     sweep=True, concept="v") for lr in rp.LR_SWEEP]
        res = run_cached(sweep, cfg.work, cfg.workers, deadline)
        if res is None:
            return None
        lr, scores = pick_lr(res)
    return lr, scores, [job(cfg, f"s1_{s}", fill(STAGE1, keep=cfg.keep), lr, s, (cfg.stage1_steps,), cfg.data_v,
                            keep=str(cfg.work / f"A_{s}.safetensors")) for s in cfg.seeds]


def stage2(cfg, deadline):
    """B = [W] by every arm of ARMS, every seed, through cfg.lengths: (lrs, the rule's scores, jobs), or None if
    stopped. A job needs its seed's A file. With --sweep, the rule's sweep on [W] (from A of seed 0) runs here."""
    a = lambda s: cfg.work / f"A_{s}.safetensors"
    args = lambda arm, s: fill(ARMS[arm], a=a(s), keep=cfg.keep, keep_ab=cfg.keep_ab)
    lrs, sweeps = ({}, {}) if cfg.sweep else ({arm: cfg.lrs[arm] for arm in ARMS}, None)
    if cfg.sweep:
        jobs = {arm: [job(cfg, f"s2_sweep_{arm}_{lr:g}", args(arm, 0), lr, 0, cfg.lengths[:1], cfg.data_w,
                          sweep=True, concept="w") for lr in rp.LR_SWEEP] for arm in ARMS}
        res = run_cached([j for js in jobs.values() for j in js], cfg.work, cfg.workers, deadline)
        if res is None:
            return None
        for arm, js in jobs.items():
            lrs[arm], sweeps[arm] = pick_lr({j["key"]: res[j["key"]] for j in js})
            log(f"lr rule {arm}: " + ", ".join(f"{k:g} -> {v:.3f}" for k, v in sweeps[arm].items())
                + f" => {lrs[arm]:g}")
    order = ["dopsd-preserve", "b-alone", "dopsd", "sft"]             # longest first: the pool ends together
    return lrs, sweeps, [job(cfg, f"s2_{arm}_{s}", args(arm, s), lrs[arm], s,
                             cfg.b_lengths if arm == "b-alone" else cfg.lengths, cfg.data_w, needs=[str(a(s))],
                             keep=str(cfg.work / f"{arm}_{s}.safetensors"),
                             **({"stack": str(a(s))} if arm == "b-alone" else {}))
                         for arm in order for s in cfg.seeds]


def run_stages(cfg, deadline):
    """Both stages in one pool (a stage-2 job starts once its seed's A exists): (stage 1, stage 2) summaries, or None
    if the deadline stopped the run first. --sweep runs stage 1 on its own first: stage 2's sweep needs A."""
    one = stage1(cfg, deadline)
    if one is None or (cfg.sweep and run_cached(one[2], cfg.work, cfg.workers, deadline) is None):
        return None
    two = stage2(cfg, deadline)
    if two is None:
        return None
    res = run_cached(one[2] + two[2], cfg.work, cfg.workers, deadline)
    if res is None:
        return None
    return (dict(lr=one[0], sweep=one[1], runs=[res[j["key"]] for j in one[2]]),
            dict(lrs=two[0], sweeps=two[1], runs={arm: [res[f"s2_{arm}_{s}"] for s in cfg.seeds] for arm in ARMS}))


def per_length(runs, lengths, field="metrics"):
    """{length: [metric dict per seed]} of one arm's runs."""
    return {n: [r[field][i] for r in runs] for i, n in enumerate(lengths)}


def predictions(res, lengths, b_last, base, ceiling_w, a_v):
    """The pre-registered predictions (module docstring) on the means over seeds: [(claim, held, numbers)].
    res: {arm or 'stacked': {length: [metric dict per seed]}}; b_last: the stacked pair's longest length; a_v: A's
    [V] distance after stage 1."""
    M = lambda arm, n, k: float(np.mean([m[k] for m in res[arm][n]]))
    late, last = [n for n in lengths if n >= 150] or list(lengths[1:]), lengths[-1]
    dopsd_arms = ("dopsd", "dopsd-preserve")
    out = []
    ok = all(M(arm, n, "w_style") <= ceiling_w + NEAR for arm in dopsd_arms for n in late)
    out.append((f"P1 B learnt: both D-OPSD arms' [W] distance within {NEAR} of the ceiling ({ceiling_w:.3f}) at "
                f"every length >= {late[0]}", ok, "; ".join(f"{arm} " + ", ".join(
                    f"{n}: {M(arm, n, 'w_style'):.3f}" for n in late) for arm in dopsd_arms)))
    ok = all(M(arm, last, "v_style") > a_v + RISE for arm in ("sft", "dopsd"))
    out.append((f"P2 A lost without an anchor: SFT's and plain D-OPSD's [V] distance more than {RISE} above A's after "
                f"stage 1 ({a_v:.3f}) at {last} steps", ok,
                ", ".join(f"{arm} {M(arm, last, 'v_style'):.3f}" for arm in ("sft", "dopsd"))))
    leak = lambda arm, n: max(0.0, base["leak_w"] - M(arm, n, "leak_w"))
    ok = (all(M("dopsd-preserve", n, "v_style") <= a_v + NEAR for n in lengths)
          and all(leak("dopsd-preserve", n) <= leak("dopsd", n) / 3 for n in late))
    out.append((f"P3 A kept with the anchor: D-OPSD + anchor's [V] distance within {NEAR} of A's ({a_v:.3f}) at every "
                f"length, and its leakage onto old prompts at most a third of plain D-OPSD's at every length >= "
                f"{late[0]}", ok, "; ".join(f"{n}: [V] {M('dopsd-preserve', n, 'v_style'):.3f}, leakage "
                                            f"{leak('dopsd-preserve', n):.3f} vs {leak('dopsd', n):.3f}"
                                            for n in lengths)))
    ok = (all(M(arm, n, "sharpness") >= SHARP for arm in dopsd_arms for n in lengths)
          and all(M("sft", n, "agree_4_32") > max(M(arm, n, "agree_4_32") for arm in dopsd_arms) for n in lengths))
    out.append((f"P4 few steps: both D-OPSD arms' sharpness >= {SHARP} at every length, SFT's 4-vs-32 RMS above "
                "both D-OPSD arms' at every length", ok, "; ".join(
                    f"{n}: sharpness " + "/".join(f"{M(arm, n, 'sharpness'):.3f}" for arm in dopsd_arms)
                    + ", 4-vs-32 sft/dopsd/+anchor " + "/".join(f"{M(arm, n, 'agree_4_32'):.3f}"
                                                               for arm in ("sft", *dopsd_arms)) for n in lengths)))
    ok = M("stacked", b_last, "v_style") >= M("dopsd-preserve", b_last, "v_style") + NEAR
    out.append((f"P5 one file beats stacking: A + B-alone stacked keeps A at least {NEAR} worse ([V] distance) than "
                f"D-OPSD + anchor, both at {b_last} steps", ok, f"stacked {M('stacked', b_last, 'v_style'):.3f} vs "
                f"{M('dopsd-preserve', b_last, 'v_style'):.3f}"))
    return out


COLUMNS = [("w_style", "[W] prompts: dist. to [W] ↓"), ("v_style", "[V] prompts: dist. to [V] ↓"),
           ("sharpness", "[W]: sharpness (teacher = 1)"), ("agree_4_32", "[W]: 4 vs 32 steps RMS ↓"),
           ("colour_w", "[W]: colour fidelity ↑"), ("colour_v", "[V]: colour fidelity ↑"),
           ("named_kept", "old named: dist. to own style ↓"), ("retention", "old unnamed: RMS to base ↓"),
           ("leak_w", "old unnamed: dist. to [W] (fall = leak)"), ("leak_v", "old unnamed: dist. to [V] (fall = leak)"),
           ("colour_old", "old: colour fidelity ↑"), ("sec", "training s")]
LABELS = {"sft": "A then B: SFT --init-lora", "dopsd": "A then B: D-OPSD --init-lora",
          "dopsd-preserve": "A then B: D-OPSD --init-lora + anchor", "b-alone": "B alone (from the base)",
          "stacked": "A + B alone, stacked at 1.0"}


def table_rows(cfg, s1, s2, res, base, ceilings):
    rows = [("base", 0, [base]), ("teacher, [W] reference (ceiling)", 0, [ceilings["w"]]),
            ("teacher, [V] reference", 0, [ceilings["v"]]),
            (f"A = [V] after stage 1 (lr {s1['lr']:g})", cfg.stage1_steps, [r["metrics"][0] for r in s1["runs"]])]
    for arm in (*ARMS, "stacked"):
        lr = "" if arm == "stacked" else f" (lr {s2['lrs'][arm]:g})"
        rows += [(LABELS[arm] + lr, n, res[arm][n]) for n in res[arm]]
    return rows


def report(cfg, gate_res, s1, s2, base, ceilings, demo, wall):
    """continual.md (gate, table, predictions scored, deliverable) and continual.json."""
    res = {arm: per_length(s2["runs"][arm], cfg.b_lengths if arm == "b-alone" else cfg.lengths) for arm in ARMS}
    res["stacked"] = per_length(s2["runs"]["b-alone"], cfg.b_lengths, "stacked")
    a_v = float(np.mean([r["metrics"][0]["v_style"] for r in s1["runs"]]))
    preds = predictions(res, cfg.lengths, cfg.b_lengths[-1], base, ceilings["w"]["w_style"], a_v)
    g = gate_res
    md = (f"Toy turbo model, continual tuning (examples/toy/continual.py). {len(cfg.seeds)} training seed(s) (mean ± "
          f"std), {len(rp.NOISE)} noise seeds × 6 prompts per cell, {rp.STEPS}-step samples. Stage 2's steps come "
          f"after A's {cfg.stage1_steps}; its training seconds do not include them. Run time {wall / 60:.1f} min on "
          f"{cfg.workers} worker process(es), the sum of {len(cfg.parts)} part(s).\n\n"
          f"**Is [W] new?** Its style distance to the nearest of the 4,000 pre-training styles is "
          f"{g['w_nearest_pretraining_style']:.3f} (the margin kept around [V]: {g['margin']}), to [V] and the named "
          f"styles {g['w_to_v_and_named']:.3f}. Colour / texture distance to the style, 16 prompts × 5 noise seeds:\n\n"
          "| concept | teacher, another instance as reference | base, caption only | base, caption + trigger |\n"
          "|---|---|---|---|\n" + "".join(
              f"| {c} | {g[k]['with_ref_colour'][0]:.3f} / {g[k]['with_ref_texture'][0]:.3f} | "
              f"{g[k]['no_ref_colour'][0]:.3f} / {g[k]['no_ref_texture'][0]:.3f} | "
              f"{g[k]['trigger_no_ref_colour'][0]:.3f} / {g[k]['trigger_no_ref_texture'][0]:.3f} |\n"
              for c, k in (("[W] style", "w"), ("[V] style", "v")))
          + "\n" + rp.table(table_rows(cfg, s1, s2, res, base, ceilings), COLUMNS)
          + "\n\nPre-registered predictions (continual.py's docstring), scored on the means:\n\n"
          + "\n".join(f"- **{'held' if ok else 'did not hold'}**: {claim}. {nums}" for claim, ok, nums in preds)
          + "\n\n" + demo_text(demo) + "\n")
    print(md)
    (cfg.out / "continual.md").write_text(md)
    (cfg.out / "continual.json").write_text(json.dumps(dict(
        lengths=cfg.lengths, b_lengths=cfg.b_lengths, seeds=cfg.seeds, lrs=cfg.lrs, stage1_steps=cfg.stage1_steps,
        wall_s=round(wall, 1), parts=cfg.parts,
        gate=g, stage1=s1, stage2=s2, base=base, ceilings=ceilings, deliverable=demo,
        predictions=[dict(claim=c, held=ok, numbers=nums) for c, ok, nums in preds]), indent=2))


def demo_text(d):
    return (f"**The deliverable** (D-OPSD + anchor, seed 0, {d['steps']} steps after A): one file, {d['modules']} "
            f"modules, lora_alpha = r = {d['rank']} in its metadata and no .alpha keys, so ComfyUI's strength 1.0 "
            f"(W + B·A) is what diffusers applies. Loaded by `Flux2KleinPipeline.load_lora_weights` alone, at 4 "
            f"steps: [V] prompts {d['v_style']:.3f} from [V] (base {d['base_v_style']:.3f}), [W] prompts "
            f"{d['w_style']:.3f} from [W] (base {d['base_w_style']:.3f}); B·A added to the base weights by hand, as "
            f"ComfyUI does, gives the same images to {d['comfy_max_grey_levels']} grey level(s).")


@torch.no_grad()
def deliverable(lora, ev, steps):
    """The one file after A then B, through diffusers' pipeline at strength 1.0, and as ComfyUI applies it (W + B·A,
    the metadata unread): style distances of [V] and [W] prompts, and the two paths' largest pixel difference."""
    from diffusers import Flux2KleinPipeline
    from safetensors import safe_open
    prompts = ev.prompts["v"] + ev.prompts["w"]
    noise = torch.randn(len(prompts), 32, 8, 8, generator=torch.Generator().manual_seed(rp.NOISE[0]))

    def draw(pipe):
        return pipe(prompt=prompts, height=world.SIZE, width=world.SIZE, num_inference_steps=rp.STEPS,
                    guidance_scale=1.0, latents=noise.clone(), max_sequence_length=pipe.tokenizer.model_max_length,
                    text_encoder_out_layers=dopsd.klein_text_layers(pipe.text_encoder)).images
    dist = lambda ims, style: ev.style(ims, ev.style_of[style])[0]
    plain = Flux2KleinPipeline.from_pretrained(rp.MODEL)
    base = draw(plain)
    pipe = Flux2KleinPipeline.from_pretrained(rp.MODEL)
    pipe.load_lora_weights(str(Path(lora).parent), weight_name=Path(lora).name)
    ims = draw(pipe)
    with safe_open(str(lora), "pt") as f:
        meta, t = json.loads(f.metadata()["lora_adapter_metadata"]), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["transformer.r"] == meta["transformer.lora_alpha"] and not any(k.endswith(".alpha") for k in t)
    modules = dict(plain.transformer.named_modules())
    downs = [k for k in t if k.endswith(".lora_A.weight")]
    for k in downs:                                    # ComfyUI's arithmetic: W += strength · up @ down
        name = k.removeprefix("transformer.").removesuffix(".lora_A.weight")
        modules[name].weight += t[k.replace(".lora_A.", ".lora_B.")] @ t[k]
    comfy = draw(plain)
    n = len(ev.prompts["v"])
    grey = max(int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max()) for a, b in zip(ims, comfy))
    return dict(steps=steps, modules=len(downs), rank=meta["transformer.r"], v_style=dist(ims[:n], "v"),
                w_style=dist(ims[n:], "w"), base_v_style=dist(base[:n], "v"), base_w_style=dist(base[n:], "w"),
                comfy_max_grey_levels=grey)


def save_grid(cfg, ev, path):
    """One grid, noise seed NOISE[0], training seed 0 at the last length: 4 [W], 4 [V] and 4 old prompts (2
    unnamed, 2 named) for the base, the teachers, A, each arm and the stacked pair."""
    pick = lambda ims: ims["w"][:4] + ims["v"][:4] + ims["unnamed"][:2] + ims["named"][:2]
    f = lambda name: str(cfg.work / f"{name}_{cfg.seeds[0]}.safetensors")
    rows = [("base", pick(ev.measure([])[1])),
            ("teacher", ev.reference["teacher"][:4] + ev.reference["teacher_v"][:4] + [None] * 4),
            ("A (stage 1)", pick(ev.measure([f("A")])[1]))]
    rows += [(arm if arm != "b-alone" else "B alone", pick(ev.measure([f(arm)])[1])) for arm in ARMS]
    rows.append(("A + B stacked", pick(ev.measure([f("A"), f("b-alone")])[1])))
    caps = ([f"{c} {s}, [W]" for s, c in world.NEW_PROMPTS_2[:4]] + [f"{c} {s}, [V]" for s, c in world.NEW_PROMPTS[:4]]
            + [f"{c} {s}" for s, c in rp.OLD_UNNAMED[:2]] + [f"{c} {s}, {n}" for s, c, n in rp.OLD_NAMED[:2]])
    dopsd.save_grid(rows, caps, path)


def references(ev):
    """The base's metrics and the two teachers' (the ceilings: sharpness 1 by definition)."""
    base = ev.measure([])[0]
    t_w, t_v = ev.reference["teacher"], ev.reference["teacher_v"]
    return base, dict(w=dict(w_style=ev.style(t_w, ev.style_of["w"])[0], sharpness=1.0,
                             colour_w=world.fidelity(t_w, world.NEW_PROMPTS_2)[0]),
                      v=dict(v_style=ev.style(t_v)[0], colour_v=world.fidelity(t_v, world.NEW_PROMPTS)[0]))


def setup(args):
    """The run's configuration and its files in --work: both fine-tuning sets and the two --preserve-prompts files."""
    import types
    quick = args.quick
    work = Path(args.work or (Path(args.out) / "continual_work" if quick else HERE / "work" / "continual"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = types.SimpleNamespace(out=Path(args.out), work=work, workers=1 if quick else args.jobs,
                                seeds=(0,) if quick else SEEDS, lengths=(5, 10) if quick else LENGTHS,
                                b_lengths=(5, 10) if quick else B_LENGTHS, stage1_steps=10 if quick else STAGE1_STEPS,
                                sweep=args.sweep and not quick)
    chosen = json.loads((HERE / "results" / "results.json").read_text())["lrs"]
    cfg.lrs = {k: 1e-3 if quick else chosen[m] for k, m in RULE_FROM.items()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.data_v = world.write_finetune_set(work / "data_v")
    cfg.data_w = world.write_concept_set(work / "data_w", world.HELD_OUT_2, world.FINETUNE_2, world.TRIGGER_2)
    cfg.keep, cfg.keep_ab = rp.write_keep(work / "keep.txt"), write_keep_ab(work / "keep_ab.txt")
    parts = work / PART_FILE
    cfg.parts = json.loads(parts.read_text()) if parts.is_file() else []
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="continual.md/.json and the grid go here")
    p.add_argument("--work", default=None, help="training runs, A's files and each finished job's result, kept for "
                   "the next part (default examples/toy/work/continual; --quick: OUT/continual_work)")
    p.add_argument("--quick", action="store_true", help="shortened run: 1 seed, lengths 5/10, lr 1e-3")
    p.add_argument("--sweep", action="store_true", help="apply the learning-rate rule here (on [W] for stage 2) "
                   "instead of taking its choices from reproduce.py's results.json")
    p.add_argument("--jobs", type=int, default=2, help="worker processes of 1 thread each")
    p.add_argument("--stop-after", type=float, default=None, help="minutes after which no new job starts; run again "
                   "to continue where it stopped")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    deadline = t0 + 60 * args.stop_after if args.stop_after else float("inf")
    cfg = setup(args)
    ev = evaluator(str(cfg.data_v), str(cfg.data_w))
    gate_res = cached(cfg.work / "gate.json", lambda: gate(ev, args.quick))
    log(f"gate: {gate_res}")
    stages = run_stages(cfg, deadline)
    done = stages is not None
    if done:
        s1, s2 = stages
        base, ceilings = references(ev)
        last = cfg.work / f"dopsd-preserve_{cfg.seeds[0]}.safetensors"
        demo = deliverable(last, ev, cfg.lengths[-1])
        save_grid(cfg, ev, cfg.out / "grid_continual.png")
    cfg.parts.append(dict(started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                          seconds=round(time.time() - t0, 1), finished=done))
    (cfg.work / PART_FILE).write_text(json.dumps(cfg.parts, indent=2))
    if not done:
        log(f"stopped after {(time.time() - t0) / 60:.1f} min (--stop-after): run again to continue")
        return 0
    wall = sum(p["seconds"] for p in cfg.parts)
    report(cfg, gate_res, s1, s2, base, ceilings, demo, wall)
    log(f"done: {wall / 60:.1f} min in {len(cfg.parts)} part(s); {cfg.out / 'continual.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
