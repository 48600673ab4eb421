"""Does `--loss-steps M` buy faster learning per wall-clock second? D-OPSD at K = 4 with M = 4 (every state, today's
default), 2 and 1, on the toy turbo model, through `dopsd.py train`, scored by reproduce.py's own evaluator.

A D-OPSD step's loss is a mean over the K visited states. `--loss-steps M` takes M of them at random, weighted K/M:
an unbiased, noisier estimate of the same gradient, for about (K - M) student forwards + M full passes instead of K
(bench: 0.44x the step time at M = 1). Per optimizer step M < K learns at most as fast; the question is per second.

Same protocol as reproduce.py: each M's learning rate is the best of LR_SWEEP by the lowest new-concept style distance
after 50 steps (reproduce.py's shortest length), on validation prompts and noise the evaluation never uses (seed 0);
then 3 training seeds, evaluated at 25, 50, 75, 100, 150 and 300 optimizer steps, in reproduce.py's worker processes.
"seconds" is the training time of those steps: the sum of log.jsonl's per-step `sec` (the loop only: no model
loading, no evaluation).

Run as: python examples/toy/loss_steps.py          # ~10 min on 2 CPU cores; results/loss_steps.{md,json,png}
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]
import reproduce as rp  # noqa: E402
import world  # noqa: E402

MS = (4, 2, 1)
K = 4
LENGTHS = (25, 50, 75, 100, 150, 300)   # denser than reproduce.py's early lengths: where the curves cross matters
SWEEP_LENGTH = 50                       # reproduce.py's rule: the LR is picked after its shortest length, 50 steps


def plot(results, lengths, path, size=(560, 320), margin=48):
    """Style distance (mean ± std over seeds) against training seconds, one polyline per M, drawn with PIL."""
    from PIL import Image, ImageDraw
    colours = {4: (0, 0, 0), 2: (30, 110, 220), 1: (220, 60, 30)}
    pts = {m: [(np.mean([r["sec"] for r in results[(m, n)]]), np.mean([r["style"] for r in results[(m, n)]]),
                np.std([r["style"] for r in results[(m, n)]])) for n in lengths] for m in MS}
    xs = [p[0] for v in pts.values() for p in v]
    ys = [p[1] + s * k for v in pts.values() for p in v for s in (p[2],) for k in (-1, 1)]
    (W, H), m_ = size, margin
    X = lambda x: m_ + x / max(xs) * (W - 2 * m_)
    Y = lambda y: H - m_ - (y - min(ys)) / max(max(ys) - min(ys), 1e-9) * (H - 2 * m_)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.line([(m_, m_ // 2), (m_, H - m_), (W - m_ // 2, H - m_)], fill="gray")
    for m in MS:
        d.line([(X(x), Y(y)) for x, y, _ in pts[m]], fill=colours[m], width=2)
        for (x, y, s), n in zip(pts[m], lengths):
            d.line([(X(x), Y(y - s)), (X(x), Y(y + s))], fill=colours[m])
            d.text((X(x) + 3, Y(y) - 12), str(n), fill=colours[m])
        d.text((W - m_ - 60, m_ // 2 + 14 * MS.index(m)), f"M = {m}", fill=colours[m])
    d.text((4, 4), f"style distance to [V] (lower is better), max {max(ys):.3f}", fill="black")
    d.text((4, H - m_ - 6), f"{min(ys):.3f}", fill="black")
    d.text((m_, H - m_ + 8), f"training seconds (0 to {max(xs):.0f}); labels: optimizer steps", fill="black")
    im.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "results"), help="loss_steps.md, .json and .png go here")
    p.add_argument("--quick", action="store_true", help="1 seed, lengths 5/10, no sweep (a smoke run)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes of 1 thread each (as reproduce.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    lengths, seeds = ((5, 10), (0,)) if args.quick else (LENGTHS, rp.SEEDS)
    workers = 1 if args.quick else args.jobs
    out, work, t0 = Path(args.out), Path(tempfile.mkdtemp(prefix="dopsd_toy_ls_")), time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = str(world.write_finetune_set(work / "data"))
    methods = {m: ["--method", "dopsd", "--rollout-steps", str(K), "--loss-steps", str(m)] for m in MS}
    lrs = ({m: 3e-4 for m in MS} if args.quick else
           rp.pick_lrs(methods, data, work, SWEEP_LENGTH, workers))            # the learning-rate rule of reproduce.py
    jobs = [dict(name=m, args=methods[m], lr=lrs[m], seed=s, lengths=lengths, data=data, run=str(work / f"M{m}_{s}"))
            for m in MS for s in seeds]
    results = {}
    for r in rp.run_jobs(jobs, workers):
        for n, m in zip(lengths, r["metrics"]):
            results.setdefault((r["name"], n), []).append(m)
    lines = ["| M (K = 4) | lr | steps | training seconds | style dist. to [V] ↓ | sharpness (teacher = 1) |",
             "|---|---|---|---|---|---|"]
    for m in MS:
        for n in lengths:
            rs = results[(m, n)]
            lines.append(f"| {m} | {lrs[m]:g} | {n} | {rp.fmt([r['sec'] for r in rs])} | "
                         f"{rp.fmt([r['style'] for r in rs])} | {rp.fmt([r['sharpness'] for r in rs])} |")
    wall = time.time() - t0
    md = (f"Toy turbo model (world v2), D-OPSD at K = 4 with --loss-steps M; {len(seeds)} training seed(s), "
          f"mean ± std; "
          f"evaluated as in reproduce.py; {workers} worker process(es) of {1 if workers > 1 else 2} thread(s) (the "
          f"seconds are per-step training time in such a process); wall time {wall / 60:.1f} min.\n\n"
          + "\n".join(lines) + "\n")
    print(md)
    (out / "loss_steps.md").write_text(md)
    (out / "loss_steps.json").write_text(json.dumps(dict(lrs=lrs, lengths=lengths, seeds=seeds, wall_s=round(wall, 1),
                                                         runs={f"M{k[0]}@{k[1]}": v for k, v in results.items()}),
                                                    indent=2))
    plot(results, lengths, out / "loss_steps.png")
    shutil.rmtree(work)
    rp.log(f"done in {wall / 60:.1f} min: {out / 'loss_steps.md'}, plot {out / 'loss_steps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
