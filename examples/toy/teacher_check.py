"""Will D-OPSD teach this? `dopsd.py check` on the toy turbo model, scored against what D-OPSD then learns, and a
continued run whose teacher starts at the bare base (`--teacher-start`), issue 33. Everything goes through dopsd.py
from the committed model in examples/toy/model, with reproduce.py's and continual.py's recipes and evaluation.

Five fine-tuning sets of 6 images (world.py's shapes and colours; each image its own instance of its background):
  v          "[V] style": the held-out style, reproduce.py's concept (the quick start's data)
  w          "[W] style": the second held-out style, continual.py's B
  named      the NAMED style "ocean", captioned by name: the base already draws it from the caption
  confetti   4-px blocks of random colours behind the shapes, "[C] style": the VAE can hold it, but it is no style of the
             family (two colours as stripes, checks or a gradient) from which pre-training taught the teacher to copy
  noise      i.i.d. colour noise per pixel, "[N] style": the toy VAE keeps one 8-channel latent cell per 4×4 pixels,
             which cannot hold 48 independent values, so the teacher can copy only the noise's average (grey)

The verdict's two thresholds were calibrated on these five sets' check numbers before any training (dopsd.py's
CHECK_GAIN, CHECK_NEAR: the gain halfway, geometrically, between the best uncopyable set and the worst copyable one; the
spread ratio halfway between the named set and the nearest other): so the verdicts below are the calibration, not a
test of it. The predictions are what was written before the training runs:

  P1 verdicts   v and w teachable, named already known, confetti and noise not teachable (the calibration)
  P2 ranking    the check's gain ranks the five sets as D-OPSD then learns them: Spearman's rho >= 0.8 between the
                gain and what 150 D-OPSD steps (seed 0) bring the student (its median look distance to the set's images
                before / after, on the check's own noise)
  P3 a teacher  continual tuning (A = [V] by continual.py's stage 1, then B = [W] from A with --init-lora): the bare
     undamaged  base's teacher copies [W] closer than the continued one (style distance on [W] prompts), and
                `--teacher-start auto` measures the same and takes base on every seed
  P4 B learnt   with --teacher-start base, plain D-OPSD's [W] distance after 150 steps is at least 0.03 below
                --teacher-start init's, and within 0.05 of B alone from the base (continual.json: 0.406)
  P5 A kept     with --teacher-start base and the anchor (--preserve-prompts onto base + A), [V] distance stays within
                0.05 of A's after stage 1, as the anchor arm with the init teacher does

Run as: python examples/toy/teacher_check.py            # results in examples/toy/results/teacher_check.{md,json}
        python examples/toy/teacher_check.py --quick --out /tmp/t   # a shortened end-to-end run
Run time: 33 min measured on this project's 2-core machine with the test suite running beside it, one thread (5 sets
× 150 steps and their checks, then 3 seeds × (A's 100 steps + 5 arms of B × 150 steps)); --quick took 4.5 min.
"""
import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import continual as ct  # noqa: E402
import dopsd  # noqa: E402
import reproduce as rp  # noqa: E402
import world  # noqa: E402

STEPS, SEEDS = 150, (0, 1, 2)
ARMS = {"init": ["--teacher-start", "init"], "base": ["--teacher-start", "base"], "auto": ["--teacher-start", "auto"],
        "init+anchor": ["--teacher-start", "init", "--preserve-prompts", "{keep_ab}"],
        "base+anchor": ["--teacher-start", "base", "--preserve-prompts", "{keep_ab}"]}
LR = {"plain": 3e-3, "anchor": 1e-3}     # continual.py's stage-2 choices (reproduce.py's rule: dopsd, dopsd-preserve)


def backgrounds(kind):
    """A world.render_background replacement for the two sets outside the family of styles."""
    def render(style, size=world.SIZE):
        rng = np.random.default_rng(int(style.get("phase", 0) * 1e6))      # each instance its own pattern
        if kind == "noise":
            return rng.uniform(0, 1, (size, size, 3))
        return np.kron(rng.uniform(0, 1, (size // 4, size // 4, 3)), np.ones((4, 4, 1)))
    return render


def write_sets(root):
    """The five sets' folders, {name: path}."""
    named = [("circle", "red"), ("square", "green"), ("triangle", "white"), ("circle", "yellow"), ("square", "white"),
             ("triangle", "red")]                                          # colours visible on "ocean"
    sets = {"v": world.write_finetune_set(root / "v"),
            "w": world.write_concept_set(root / "w", world.HELD_OUT_2, world.FINETUNE_2, world.TRIGGER_2),
            "named": world.write_concept_set(root / "named", world.NAMED["ocean"], named, "ocean style")}
    real = world.render_background
    try:
        for name, trigger in (("confetti", "[C] style"), ("noise", "[N] style")):
            world.render_background = backgrounds(name)
            sets[name] = world.write_concept_set(root / name, world.HELD_OUT, world.FINETUNE, trigger)
    finally:
        world.render_background = real
    return sets


def quiet(argv):
    """dopsd.main(argv) with its output kept back; raises on a non-zero exit."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = dopsd.main(argv)
    if code:
        raise SystemExit(f"dopsd.py {' '.join(argv[:1])} failed ({code}):\n{out.getvalue()[-2000:]}")
    return out.getvalue()


def check(data, out, lora=None):
    """dopsd.py check on one set (every image): its check.json."""
    quiet(["check", "--data", str(data), "--model", str(rp.MODEL), "--resolution", "64", "--out", str(out),
           "--cache-dir", str(Path(out).parent / "cache")] + (["--init-lora", str(lora)] if lora else []))
    return json.loads((Path(out) / "check.json").read_text())


def spearman(a, b):
    """Spearman's rank correlation of two equally long lists without ties: 1 - 6·Σd² / (n(n² - 1)), d the rank
    differences. (Exact: np.corrcoef of the ranks gave 0.7999999 for Σd² = 4 of 5, against a bar of 0.8.)"""
    rank = lambda xs: np.argsort(np.argsort(xs))
    d, n = rank(np.array(a)) - rank(np.array(b)), len(a)
    return 1 - 6 * int((d * d).sum()) / (n * (n * n - 1))


def ranking(sets, work, steps):
    """Per set: the check before training, then D-OPSD for `steps` from the base (seed 0) and the check of the
    trained student: {name: {gain, near, verdict, before, after, learnt}}."""
    res = {}
    for name, data in sets.items():
        before = check(data, work / "check" / name)
        lora, _ = rp.train(["--method", "dopsd"], LR["plain"], 0, steps, work / "runs" / name, data)
        after = check(data, work / "check" / f"{name}_after", lora)
        med = lambda r, k: float(np.median([x[k] for x in r["per_image"]]))
        res[name] = dict(gain=before["gain"], near=before["near"], verdict=before["verdict"],
                         before=med(before, "d_student"), after=med(after, "d_student"))
        res[name]["learnt"] = res[name]["before"] / res[name]["after"]
        rp.log(f"{name}: {res[name]}")
    return res


def continual_arms(cfg, ev, seeds, steps):
    """A = [V] per seed (continual.py's stage 1), then B = [W] from A by every arm of ARMS: {arm: [metrics per seed]},
    the start teachers' [W] distance per seed, and the auto arm's choice per seed."""
    out, teachers, chosen = {arm: [] for arm in ARMS}, [], []
    for s in seeds:
        a, _ = rp.train(ct.fill(ct.STAGE1, keep=cfg.keep), cfg.lrs["stage1"], s, cfg.stage1_steps,
                        cfg.work / f"A_{s}", cfg.data_v)
        ev.load_loras([a])
        continued = ev.style(ev.images(ev.prompts["w"], rp.NOISE, teacher=True), ev.style_of["w"])[0]
        ev.pipe.unload_lora_weights()
        teachers.append(continued)
        for arm, flags in ARMS.items():
            args = ["--method", "dopsd", "--init-lora", str(a), *ct.fill(flags, keep_ab=cfg.keep_ab)]
            run = cfg.work / f"B_{arm}_{s}"
            lora, secs = rp.train(args, LR["anchor" if "anchor" in arm else "plain"], s, steps, run, cfg.data_w)
            out[arm].append({**ev.measure([lora], many=False)[0], "seconds": secs})
            if arm == "auto":
                chosen.append(json.loads((run / "log.jsonl").read_text().splitlines()[0])["check"]["teacher_start"])
            rp.log(f"seed {s} {arm}: w_style {out[arm][-1]['w_style']:.3f} v_style {out[arm][-1]['v_style']:.3f}")
    return out, teachers, chosen


def scored(res, arms, teachers, chosen, base_teacher, a_v, b_alone):
    """The predictions, each (name, held, evidence)."""
    m = lambda arm, k: float(np.mean([r[k] for r in arms[arm]]))
    want = dict(v="teachable", w="teachable", named="already known", confetti="not teachable", noise="not teachable")
    rho = spearman([res[n]["gain"] for n in res], [res[n]["learnt"] for n in res])
    return [
        ("P1 verdicts (the calibration)", all(res[n]["verdict"] == v for n, v in want.items()),
         ", ".join(f"{n} {res[n]['verdict']} (gain {res[n]['gain']:.2f}, near {res[n]['near']:.2f})" for n in res)),
        ("P2 ranking: Spearman rho >= 0.8", rho >= 0.8, f"rho {rho:.2f}; " + ", ".join(
            f"{n}: gain {res[n]['gain']:.2f}, learnt {res[n]['learnt']:.2f}" for n in res)),
        ("P3 the bare base's teacher copies [W] closer; auto takes base", base_teacher < min(teachers) and
         all(c == "base" for c in chosen), f"base {base_teacher:.3f}, continued {', '.join(f'{t:.3f}' for t in teachers)}"
         f"; auto chose {', '.join(chosen)}"),
        ("P4 B learnt: base <= init - 0.03 and within 0.05 of B alone", m("base", "w_style") <= m("init", "w_style") - 0.03
         and abs(m("base", "w_style") - b_alone) <= 0.05,
         f"[W] distance: init {m('init', 'w_style'):.3f}, base {m('base', 'w_style'):.3f}, B alone {b_alone:.3f}"),
        ("P5 A kept with base + anchor", abs(m("base+anchor", "v_style") - a_v) <= 0.05,
         f"[V] distance: A {a_v:.3f}, init+anchor {m('init+anchor', 'v_style'):.3f}, base+anchor "
         f"{m('base+anchor', 'v_style'):.3f}")]


def report(out, res, arms, teachers, chosen, base_teacher, preds, wall):
    """teacher_check.md and .json in out."""
    mean = lambda arm, k: f"{np.mean([r[k] for r in arms[arm]]):.3f} ± {np.std([r[k] for r in arms[arm]]):.3f}"
    lines = [f"Toy turbo model, the teacher check (examples/toy/teacher_check.py); wall time {wall / 60:.1f} min.\n",
             "| set | verdict | teacher gain | student / set spread | student's look distance before → after "
             f"{STEPS} D-OPSD steps | learnt (before / after) |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['verdict']} | {r['gain']:.2f} | {r['near']:.2f} | {r['before']:.3f} → {r['after']:.3f} | "
              f"{r['learnt']:.2f} |" for n, r in res.items()]
    lines += ["", f"Continual, B = [W] from A = [V] ({len(teachers)} seed(s), {STEPS} steps, mean ± std). The start "
              f"teachers' [W] distance: bare base {base_teacher:.3f}, base + A {np.mean(teachers):.3f}.", "",
              "| arm | [W] prompts: dist. to [W] ↓ | [V] prompts: dist. to [V] ↓ | old unnamed: RMS to base ↓ | "
              "[W] sharpness |", "|---|---|---|---|---|"]
    lines += [f"| {arm} | {mean(arm, 'w_style')} | {mean(arm, 'v_style')} | {mean(arm, 'retention')} | "
              f"{mean(arm, 'sharpness')} |" for arm in arms]
    lines += ["", f"--teacher-start auto chose: {', '.join(chosen)}.", "", "Predictions (written before the run):", ""]
    lines += [f"- **{'held' if ok else 'did not hold'}**: {name}. {why}" for name, ok, why in preds]
    (out / "teacher_check.md").write_text("\n".join(lines) + "\n")
    (out / "teacher_check.json").write_text(json.dumps(dict(sets=res, arms=arms, teachers=teachers, chosen=chosen,
        base_teacher=base_teacher, predictions=[dict(name=n, held=ok, evidence=w) for n, ok, w in preds],
        wall_s=round(wall, 1)), indent=2))


def recorded():
    """From continual.json: B alone's [W] distance at 150 steps and A's [V] distance after stage 1 (means)."""
    rec = json.loads((HERE / "results" / "continual.json").read_text())
    return (float(np.mean([r["metrics"][-1]["w_style"] for r in rec["stage2"]["runs"]["b-alone"]])),
            float(np.mean([r["metrics"][-1]["v_style"] for r in rec["stage1"]["runs"]])))


def rescore(out):
    """The predictions scored again, and the report rewritten, from a finished run's teacher_check.json."""
    r = json.loads((out / "teacher_check.json").read_text())
    preds = scored(r["sets"], r["arms"], r["teachers"], r["chosen"], r["base_teacher"], *reversed(recorded()))
    report(out, r["sets"], r["arms"], r["teachers"], r["chosen"], r["base_teacher"], preds, r["wall_s"])
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="teacher_check.md/.json go here")
    p.add_argument("--work", default=None, help="runs and sets (default examples/toy/work/teacher_check)")
    p.add_argument("--quick", action="store_true", help="shortened: 10 steps, 1 seed")
    p.add_argument("--rescore", action="store_true", help="score and write the report again from OUT's "
                   "teacher_check.json, without training")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0, out = time.time(), Path(a.out)
    if a.rescore:
        return rescore(out)
    work = Path(a.work or (out / "teacher_check_work" if a.quick else HERE / "work" / "teacher_check"))
    steps, seeds = (10, (0,)) if a.quick else (STEPS, SEEDS)
    cfg = ct.setup(argparse.Namespace(out=str(out), work=str(work / "continual"), quick=a.quick, jobs=1, sweep=False))
    res = ranking(write_sets(work / "sets"), work, steps)
    ev = ct.evaluator(str(cfg.data_v), str(cfg.data_w))
    base_teacher = ev.style(ev.reference["teacher"], ev.style_of["w"])[0]
    arms, teachers, chosen = continual_arms(cfg, ev, seeds, steps)
    b_alone, a_v = recorded()
    preds = scored(res, arms, teachers, chosen, base_teacher, a_v, b_alone)
    report(out, res, arms, teachers, chosen, base_teacher, preds, time.time() - t0)
    rp.log(f"done: {out / 'teacher_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
