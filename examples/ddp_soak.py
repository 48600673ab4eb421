"""
ddp_soak.py -- does a 2-rank torchrun of dopsd.py always end? Runs it many times in a row, optionally beside a
CPU-heavy process, then kills one rank mid-run and checks that the job ends non-zero and the checkpoint still loads.
LoRA runs use DDP; with --full the runs are --full, sharded with FSDP2, and checkpoint into checkpoint/ folders.

Why: a torchrun job whose rank hangs in teardown after the work is done bills a cluster for hours. The hang was a
race (one run in five beside a busy process), so one passing run proves little; twenty in a row under load do.

Run as:
  python examples/ddp_soak.py --runs 20 --busy            # ~6 min on 2 CPU cores; prints a line per run + a summary
  python examples/ddp_soak.py --runs 0 --kill             # only the kill-one-rank check
  python examples/ddp_soak.py --runs 20 --busy --kill --full   # the same for --full (FSDP2)
Every run is bounded (--timeout s); past it the whole process group is killed, so no rank survives a failing run.
"""

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_models(root):
    """The test suite's tiny random-weight Z-Image, Qwen3-VL and data (examples/make_tiny.py), built once."""
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "examples" / "make_tiny.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    mt.make_zimage(root / "zimage")
    mt.make_vlm(root / "vlm")
    mt.make_demo_data(root / "data")


def command(root, out, steps, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "dopsd.py"), "train", "--data", str(root / "data"), "--model", str(root / "zimage"),
            "--vlm", str(root / "vlm"), "--out", str(out), "--resolution", "64", "--rollout-steps", "2",
            "--rank", "4", "--sample-every", "0", "--lr", "1e-3", "--max-steps", str(steps), *extra]


def start(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def descendants(pid):
    """Every process below pid, read from /proc. torchrun starts each rank in a session of its own
    (start_new_session=True in torch's subprocess handler), so killing torchrun's process group misses the ranks."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after "pid (comm)": state, ppid, ...
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue                                           # the process ended while we looked
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found, todo = found + kids, todo + kids
    return found


def finish(proc, timeout):
    """(exit code, or None if it had to be killed; stdout, stderr, seconds). Past `timeout` the launcher and every
    process below it are killed, so no rank outlives a hung run (and holds its pipes open for ever)."""
    t0 = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        return None, out, err, time.perf_counter() - t0


def soak(root, runs, timeout, extra=()):
    results = []
    for i in range(runs):
        t0 = time.perf_counter()
        code, out, err, _ = finish(start(command(root, root / f"run{i}", 2, extra)), timeout)
        ok = code == 0 and ("sharded: FSDP2 over 2 ranks" if "--full" in extra else "ranks in sync: 2 ranks") in out
        results.append({"run": i, "code": code, "seconds": round(time.perf_counter() - t0, 1), "ok": ok})
        print(f"run {i + 1:2d}/{runs}: exit {code}, {results[-1]['seconds']} s{'' if ok else '  FAILED: ' + err[-300:]}",
              flush=True)
    return results


def checkpoint_step(out, full):
    """The step of the run's checkpoint, read through torch's own loader (so it proves the checkpoint loads)."""
    import torch
    if not full:
        return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(out / "checkpoint", out / "loaded.pt")             # every shard read back
    assert torch.load(out / "loaded.pt", weights_only=False)["student"]
    return json.loads((out / "checkpoint" / "meta.json").read_text())["step"]


def kill_one_rank(root, timeout, dist_timeout_min=2.0, extra=()):
    """Start a long run that checkpoints every step, kill rank 1 after the first checkpoint, time the job's end."""
    out, full = root / "killed", "--full" in extra
    proc = start(command(root, out, 10_000, ["--save-every", "1", "--dist-timeout", str(dist_timeout_min), *extra]))
    ckpt, t0 = out / ("checkpoint/meta.json" if full else "checkpoint.pt"), time.perf_counter()
    while not ckpt.is_file() and proc.poll() is None and time.perf_counter() - t0 < timeout:
        time.sleep(0.2)
    time.sleep(1.0)                                             # mid-run: a few steps past the first checkpoint
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = sorted(int(p) for p in workers)                     # torchrun's children: rank 0, rank 1 (by start order)
    if len(ranks) < 2:
        finish(proc, 5)
        return {"ok": False, "why": f"expected 2 ranks under torchrun, found {ranks}"}
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.perf_counter()
    code, _, err, _ = finish(proc, timeout)
    ended = time.perf_counter() - killed
    step = checkpoint_step(out, full)                          # the last checkpoint loads
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    return {"ok": code not in (None, 0) and ended < dist_timeout_min * 60, "exit": code,
            "seconds_to_end": round(ended, 1), "checkpoint_step": step, "our_line": lines[-1] if lines else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--runs", type=int, default=20, help="consecutive 2-rank runs (default %(default)s)")
    p.add_argument("--busy", action="store_true", help="keep a CPU-heavy process running beside them")
    p.add_argument("--kill", action="store_true", help="then kill one rank mid-run and check the job ends")
    p.add_argument("--full", action="store_true", help="--full runs (FSDP2) instead of LoRA runs (DDP)")
    p.add_argument("--timeout", type=float, default=180, help="seconds before a run counts as hung (default %(default)s)")
    a = p.parse_args(argv)
    busy = subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10**6))"]) if a.busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            tiny_models(root)
            extra = ["--full"] if a.full else []
            results = soak(root, a.runs, a.timeout, extra)
            summary = {"runs": len(results), "ended_ok": sum(r["ok"] for r in results), "busy": a.busy, "full": a.full,
                       "max_seconds": max((r["seconds"] for r in results), default=None)}
            if a.kill:
                summary["kill_one_rank"] = kill_one_rank(root, a.timeout, extra=extra)
    finally:
        if busy:
            busy.kill()
    print(json.dumps(summary))
    return 0 if summary["ended_ok"] == summary["runs"] and summary.get("kill_one_rank", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
