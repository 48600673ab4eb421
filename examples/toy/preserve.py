"""Does `--preserve-prompts` keep the new style off old prompts? D-OPSD with and without it on the toy turbo model
(world v1), through `dopsd.py train`, scored by reproduce.py's own evaluator.

In world v1 every method paints the new style onto old prompts too (reproduce.py: their style distance to [V] falls
from 1.15 to ~0.09). `--preserve-prompts FILE` adds a second on-policy roll-out per step on prompts without the
concept, pulled onto the base model. The preserve prompts here are old-world captions (shape + colour, no [V]) that
the evaluation's OLD_PROMPTS never use, so retention is measured on prompts the term never saw.

Same protocol as reproduce.py: the learning rate by the same rule (best new-concept style distance after 50 steps on
validation prompts and noise, seed 0), then 3 training seeds evaluated at 50, 150 and 300 steps.

Run as: python examples/toy/preserve.py            # ~20 min on 2 CPU cores; results/preserve.{md,json}
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import reproduce as rp  # noqa: E402
import world  # noqa: E402

KEEP = [("circle", "red"), ("square", "blue"), ("triangle", "white"), ("diamond", "black"), ("cross", "purple"),
        ("ring", "red"), ("circle", "yellow"), ("square", "orange")]     # disjoint from rp.OLD_PROMPTS and NEW_PROMPTS
COLUMNS = [("style", "new: style dist. to [V] ↓"), ("sharpness", "new: sharpness (teacher = 1)"),
           ("leak_style", "old: style dist. to [V] (base 1.15; higher = less bleed)"),
           ("retention", "old: RMS to base ↓"), ("colour_old", "old: colour error ↓"), ("sec", "training seconds")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="preserve.md and .json go here")
    p.add_argument("--quick", action="store_true", help="1 seed, lengths 5/10, no sweep (a smoke run)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    lengths, seeds = ((5, 10), (0,)) if args.quick else (rp.LENGTHS, rp.SEEDS)
    out, work, t0 = Path(args.out), Path(tempfile.mkdtemp(prefix="dopsd_toy_pp_")), time.time()
    out.mkdir(parents=True, exist_ok=True)
    assert not {*KEEP} & {*rp.OLD_PROMPTS, *world.NEW_PROMPTS}
    (work / "keep.txt").write_text("\n".join(world.caption(s, c) for s, c in KEEP) + "\n")
    rp.METHODS = {"dopsd": ["--method", "dopsd"],
                  "dopsd+preserve": ["--method", "dopsd", "--preserve-prompts", str(work / "keep.txt")]}
    data = world.write_finetune_set(work / "data")
    ev = rp.Evaluator(data)
    ref = rp.references(ev)
    lrs = {m: 3e-4 if args.quick else rp.pick_lr(m, lambda lr, seed, n, run, m=m: rp.train(m, lr, seed, n, run, data),
                                                 ev, work, lengths[0]) for m in rp.METHODS}   # reproduce.py's LR rule
    results = {}
    for method in rp.METHODS:
        for seed in seeds:
            run = work / f"{method}_{seed}"
            for n in lengths:
                lora = rp.train(method, lrs[method], seed, n, run, data)
                sec = sum(json.loads(line)["sec"] for line in (run / "log.jsonl").read_text().splitlines())
                m = dict(ev.measure(lora, ref)[0], sec=sec)
                results.setdefault((method, n), []).append(m)
                rp.log(f"{method} seed {seed} {n} steps: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
            shutil.rmtree(run)
    lines = ["| method | lr | steps | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for method in rp.METHODS:
        for n in lengths:
            rs = results[(method, n)]
            lines.append(f"| {method} | {lrs[method]:g} | {n} | " + " | ".join(rp.fmt([r[k] for r in rs])
                                                                          for k, _ in COLUMNS) + " |")
    wall = time.time() - t0
    md = (f"Toy turbo model (world v1), D-OPSD with and without --preserve-prompts ({len(KEEP)} old-world captions "
          f"disjoint from the evaluation's); {len(seeds)} training seed(s), mean ± std; evaluated as in reproduce.py; "
          f"wall time {wall / 60:.1f} min.\n\n" + "\n".join(lines) + "\n")
    print(md)
    (out / "preserve.md").write_text(md)
    (out / "preserve.json").write_text(json.dumps(dict(lrs=lrs, lengths=lengths, seeds=seeds, wall_s=round(wall, 1),
                                                       runs={f"{k[0]}@{k[1]}": v for k, v in results.items()}), indent=2))
    shutil.rmtree(work)
    rp.log(f"done in {wall / 60:.1f} min: {out / 'preserve.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
