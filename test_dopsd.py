"""
Tests for dopsd.py, read as a specification. Offline, CPU, tiny random-weight models of the real architectures.

Run as:  python -m pytest -q            (this file and the tests of examples/; about 5 min on 2 cores)

Groups, in dopsd.py's section order: the method (roll-out, loss and EMA on toy velocity fields) -> data checks (before
any model loads) -> device, models and conditioning -> roll-out vs the diffusers pipeline, teacher -> the fused loss ->
the feature cache -> end to end through main(argv) (train, sample, LoRA interop with the pipelines, --resume, the
run's safety nets, torchrun, FSDP2). A behaviour both families share is one test parametrised over `family`
("zimage", "klein"); a klein-only one (reference tokens, the SFT baseline on VAE latents) sits in its group. The tests
of examples/ sit beside them (examples/test_*.py, examples/toy/test_*.py) and use this file's fixtures.
The tiny models are built once per session by examples/make_tiny.py and loaded by path, like real checkpoints.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import: the fused-loss kernel then runs on the CPU
# One intra-op thread (set before torch loads; subprocesses inherit it): the tiny models gain nothing from two
# (a bf16 resume test: 12.3 s with 2, 12.2 s with 1), and beside a CPU-heavy process two threads spin-wait on each
# other (23.3 s with 2, 12.0 s with 1), which would stretch the suite and its bounded subprocesses.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import dopsd  # noqa: E402


def _load_example(name):
    spec = importlib.util.spec_from_file_location(Path(name).stem, ROOT / "examples" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_close(a, b, atol=0.0, rtol=0.0, what="", normwise=False):
    """|a − b| ≤ atol + rtol·|b| per element; normwise=True: max|a − b| ≤ rtol·max|b| instead (near-zero elements of b
    then don't blow the tolerance up: the fused-loss tests compare whole tensors this way)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    d = (a - b).abs()
    if not d.numel():
        return
    tol = rtol * max(b.abs().max().item(), 1e-30) if normwise else atol + rtol * b.abs()
    assert bool((d <= tol).all()), f"{what}: max diff {d.max().item():.3e}, mean diff {d.mean().item():.3e}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny Z-Image pipeline, the tiny Qwen3-VL and two small datasets (.txt and metadata.jsonl)."""
    mt, root = _load_example("make_tiny.py"), tmp_path_factory.mktemp("tiny")
    mt.make_zimage(root / "zimage")
    mt.make_vlm(root / "vlm")
    mt.make_klein(root / "klein")
    mt.make_demo_data(root / "data")
    mt.make_demo_data_jsonl(root / "data_jsonl")
    small = root / "small"                                  # 2 images: enough for the train/resume runs, and fast
    small.mkdir()
    for name in ("rgb.jpg", "rgba.png"):
        (small / name).write_bytes((root / "data" / name).read_bytes())
        stem = Path(name).stem
        (small / f"{stem}.txt").write_text((root / "data" / f"{stem}.txt").read_text())
    return {k: root / k for k in ("zimage", "vlm", "klein", "data", "data_jsonl", "small")}


@pytest.fixture(scope="session")
def pipe(tiny):
    from diffusers import ZImagePipeline
    return ZImagePipeline.from_pretrained(tiny["zimage"])


@pytest.fixture(scope="session")
def klein_pipe(tiny):
    """A tiny Flux2KleinPipeline (is_distilled=True), loaded by path."""
    from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline.from_pretrained(tiny["klein"])


def family_fixture(request, family, zimage="pipe", klein="klein_pipe"):
    """The session fixture of that family (the pipeline, by default; or `trained` / `klein_trained`)."""
    return request.getfixturevalue(zimage if family == "zimage" else klein)


def tiny_dit(tiny, family, dtype=torch.float32):
    """A fresh tiny DiT of the family, loaded by path."""
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel
    cls = {"zimage": ZImageTransformer2DModel, "klein": Flux2Transformer2DModel}[family]
    return cls.from_pretrained(tiny[family] / "transformer", dtype=dtype)


# The diffusers pipelines' own sampling settings (distilled: no CFG; klein guidance 1 = off)
PIPE_KW = {"zimage": dict(num_inference_steps=8, guidance_scale=0.0),
           "klein": dict(num_inference_steps=4, guidance_scale=1.0, text_encoder_out_layers=(1, 2, 3))}


def train_args(tiny, out, *extra, data="small", model="zimage"):
    """A short train command line on the tiny models. The teacher check before step 1 is off (it costs ~6 s a run
    here, for look signatures of 64-px images); its tests pass --check-images, which the last flag given wins."""
    return ["train", "--data", str(tiny[data]), "--model", str(tiny[model]), "--vlm", str(tiny["vlm"]),
            "--out", str(out), "--resolution", "64", "--rollout-steps", "2", "--rank", "4", "--sample-every", "0",
            "--lr", "1e-3", "--check-images", "0", "--teacher-start", "init", *extra]


def lora_weights(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "pytorch_lora_weights.safetensors"))


# ---------------------------------------------------------------------------------------------------- the method
# dopsd.py's family-free method on toy velocity fields (a linear u = W·x): no diffusers, no models, milliseconds.

def test_one_dopsd_step_moves_the_student_towards_the_teacher_at_the_states_it_visited():
    """After one roll-out and one gradient step, the student's velocity is closer to the frozen teacher's at every state
    the student's own roll-out visited, and the teacher was called at exactly those states."""
    g = torch.Generator().manual_seed(0)
    W = (torch.eye(4) + 0.3 * torch.randn(4, 4, generator=g)).requires_grad_(True)     # the student θ
    W_t = torch.eye(4) - 0.3 * torch.randn(4, 4, generator=g)                          # the teacher φ, frozen
    visited, sigmas = [], dopsd.zimage_sigmas(4)
    student = lambda x, s: x @ W.T
    teacher = lambda x, s: visited.append(x.clone()) or x @ W_t.T
    _, x_end = dopsd.dopsd_rollout(student, teacher, torch.randn(8, 4, generator=g), sigmas, space="v")
    x = visited[0]
    for k, seen in enumerate(visited):                  # the teacher saw the student's own Euler states
        assert torch.equal(seen, x)
        x = x + (sigmas[k + 1] - sigmas[k]) * student(x, None).detach()
    assert len(visited) == 4 and torch.equal(x, x_end)
    gap = lambda W: [((x @ W.T - x @ W_t.T) ** 2).mean().item() for x in visited]
    assert all(after < before for after, before in zip(gap(W.detach() - 0.1 * W.grad), gap(W.detach())))


def test_reference_gradient_is_closed_form():
    """Autograd through the reference gives ∂L/∂u_s = 2·w·(u_s − u_t)/N."""
    vs, vt, sigma = make_inputs((2, 3, 5), torch.float64)
    _, grad = reference64(vs, vt, sigma)
    expected = 2 * sigma.double().view(2, 1, 1) ** 2 * (vs - vt).detach() / vs.numel()
    assert_close(grad, expected, rtol=1e-12, what="closed-form grad", normwise=True)


def test_the_teacher_runs_M_times_per_rollout_and_the_student_has_M_backwards():
    """At the K − M unchosen states the teacher is not called and the student runs without grad."""
    calls = {"teacher": 0, "grad": 0, "no_grad": 0}

    def student(x, s):
        calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return x * w
    w = torch.tensor(0.5, requires_grad=True)
    teacher = lambda x, s: calls.__setitem__("teacher", calls["teacher"] + 1) or x * 0
    dopsd.dopsd_rollout(student, teacher, torch.randn(2, 3), dopsd.zimage_sigmas(4), trained=[1, 3])
    assert calls == {"teacher": 2, "grad": 2, "no_grad": 2} and w.grad is not None


def test_ema_moves_the_teacher_towards_the_student():
    """φ <- μφ + (1-μ)θ exactly; μ = 1 leaves the teacher untouched."""
    t, s = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.full((2,), 3.0)]
    dopsd.ema_update(t, s, 0.9)
    assert_close(t[0], torch.full((3,), 0.1), 1e-7)
    assert_close(t[1], torch.full((2,), 0.9 * 1 + 0.1 * 3), 1e-6)
    before = [x.clone() for x in t]
    dopsd.ema_update(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, t))


def test_the_method_section_comes_first_and_the_readme_map_names_every_section_in_order():
    """dopsd.py's family-free method section starts by line 200 and is at most 150 lines, and README.md's map of the
    file names every section of dopsd.py (the title after each rule, up to a colon), in the file's order."""
    lines = (ROOT / "dopsd.py").read_text(encoding="utf-8").splitlines()
    rules = [i for i, l in enumerate(lines) if l.startswith("# ----")]
    names = [lines[i + 1][2:].split(":")[0] for i in rules]
    method = rules[names.index("the method")]
    assert method < 200 and rules[names.index("the method") + 1] - method <= 150
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    at = readme.index("## How dopsd.py is organised")
    for name in names:
        at = readme.index("**" + name, at)         # ValueError: the map lacks the section or has it out of order


# ---------------------------------------------------------------------------------------------------- data checks


def run_bad(args, capsys):
    code = dopsd.main(args)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    return err


def bad_args(data):
    # --model points nowhere: if the data check did not stop us first, the error would be about the model.
    return ["train", "--data", str(data), "--model", "/nonexistent/model", "--out", str(data) + "_out"]


# The list of mistakes dopsd.py catches, one row each (README.md, "Bad input", points here). A row: (id, command, the
# flags changed from the good command line GOOD[command] -- None drops a flag, True passes it bare --, exit code, a
# fragment of the message). "{name}" is a file or folder the bad_files fixture builds. Every row stops with one line,
# no traceback and, except the LOADS_MODEL rows (a mistake only loading can show), before any weight is read. A new
# check adds a row.
GOOD = {"train": {"--data": "{data}", "--model": "{zimage}", "--vlm": "{vlm}", "--out": "{out}", "--resolution": "64",
                  "--rollout-steps": "2", "--rank": "4", "--sample-every": "0", "--lr": "1e-3"},
        "sample": {"--model": "{zimage}", "--prompt": "a red circle", "--out": "{out}.png", "--height": "64",
                   "--width": "64"},
        "check": {"--data": "{data}", "--model": "{zimage}", "--vlm": "{vlm}", "--out": "{out}", "--resolution": "64"}}
BAD_INPUTS = [
    # train: the data (one message names every bad file of the folder)
    ("data-missing", "train", {"--data": "{nope}"}, 2, "nope: folder not found"),
    ("data-is-a-file", "train", {"--data": "{file}"}, 2, "file: is a file, not a folder"),
    ("data-without-images", "train", {"--data": "{no_images}"}, 2, "no images (.png .jpg .jpeg .webp .bmp) found"),
    ("data-corrupt-image", "train", {"--data": "{corrupt}"}, 2, "unreadable or corrupt image(s) (broken.png)"),
    ("data-image-over-pil-limit", "train", {"--data": "{huge}"}, 2,
     "larger than PIL's limit of 200,000 pixels (2 × Image.MAX_IMAGE_PIXELS) (huge.png): downscale them"),
    ("data-image-too-small", "train", {"--data": "{thin}"}, 2, "smaller than 64 px on a side (thin.png)"),
    ("data-uncaptioned", "train", {"--data": "{uncaptioned}"}, 2, "without a caption (a.png)"),
    ("data-caption-not-utf8", "train", {"--data": "{caption_not_utf8}"}, 2, "not UTF-8 text (k0.txt): save each as"),
    ("data-jsonl-not-utf8", "train", {"--data": "{jsonl_not_utf8}"}, 2, "metadata.jsonl: not UTF-8 text (byte 0xff"),
    ("data-jsonl-bad-row", "train", {"--data": "{jsonl_bad_row}"}, 2, "line 1 is not a JSON object"),
    ("data-repeat-0", "train", {"--data": "{nope}:0"}, 2, "must be a whole number of at least 1 (got '0')"),
    ("data-repeat-negative", "train", {"--data": "{data}:-2"}, 2,
     "data:-2: the repeat count after ':' must be a whole number of at least 1 (got '-2')"),
    ("data-repeat-not-a-number", "train", {"--data": "{data}:abc"}, 2, "a whole number of at least 1 (got 'abc')"),
    ("data-repeat-fraction", "train", {"--data": "{data}:1.5"}, 2, "must be a whole number of at least 1 (got '1.5')"),
    ("cache-dir-under-a-file", "train", {"--cache-dir": "{file}/cache"}, 2, "/cache: cannot write there"),
    # train: every number's range
    ("resolution-not-16", "train", {"--resolution": "100"}, 2, "--resolution must be a multiple of 16"),
    ("resolution-under-64", "train", {"--resolution": "32"}, 2, "at least 64 (got 32)"),
    ("rollout-steps-0", "train", {"--rollout-steps": "0"}, 2, "--rollout-steps 0: out of range; pass at least 1"),
    ("rank-0", "train", {"--rank": "0"}, 2, "--rank 0: out of range"),
    ("max-steps-0", "train", {"--max-steps": "0"}, 2, "--max-steps 0: out of range"),
    ("batch-size-0", "train", {"--batch-size": "0"}, 2, "--batch-size 0: out of range"),
    ("grad-accum-0", "train", {"--grad-accum": "0"}, 2, "--grad-accum 0: out of range"),
    ("lr-negative", "train", {"--lr": "-1"}, 2, "--lr -1.0: out of range; pass a positive learning rate"),
    ("lr-0", "train", {"--lr": "0"}, 2, "--lr 0.0: out of range"),
    ("lr-nan", "train", {"--lr": "nan"}, 2, "--lr nan: out of range"),
    ("alpha-0", "train", {"--alpha": "0"}, 2, "--alpha 0.0: out of range"),
    ("ema-decay-over-1", "train", {"--ema-decay": "1.5"}, 2, "--ema-decay must be in [0, 1]"),
    ("ema-decay-negative", "train", {"--ema-decay": "-0.1"}, 2, "--ema-decay must be in [0, 1]"),
    ("loss-steps-0", "train", {"--loss-steps": "0"}, 2, "--loss-steps must be from 1 to --rollout-steps 2"),
    ("loss-steps-over-k", "train", {"--loss-steps": "3"}, 2, "--loss-steps must be from 1 to --rollout-steps 2"),
    ("loss-steps-with-sft", "train", {"--loss-steps": "1", "--method": "sft"}, 2, "it needs --method dopsd"),
    ("sample-every-negative", "train", {"--sample-every": "-1"}, 2, "--sample-every and --save-every must be 0"),
    ("save-every-negative", "train", {"--save-every": "-1"}, 2, "--sample-every and --save-every must be 0"),
    ("preserve-weight-negative", "train", {"--preserve-weight": "-1"}, 2, "--preserve-weight -1.0: out of range"),
    ("dist-timeout-0", "train", {"--dist-timeout": "0"}, 2, "--dist-timeout 0.0: out of range"),
    ("dist-timeout-inf", "train", {"--dist-timeout": "inf"}, 2, "--dist-timeout inf: out of range"),
    ("seed-negative", "train", {"--seed": "-1"}, 2, "--seed -1: out of range"),
    ("seed-over-32-bits", "train", {"--seed": str(2 ** 32)}, 2, f"--seed {2 ** 32}: out of range"),
    # train: --out, --resume, the prompt files
    ("out-is-a-file", "train", {"--out": "{file}"}, 2, "is a file, not a folder"),
    ("out-under-a-file", "train", {"--out": "{file}/run"}, 2, "is a file, so nothing can be created under it"),
    ("out-holds-a-run", "train", {"--out": "{run}"}, 2, "already holds a run; pass --resume"),
    ("resume-without-checkpoint", "train", {"--resume": True}, 2, "--resume: no checkpoint in"),
    ("resume-another-rank", "train", {"--out": "{run}", "--resume": True, "--rank": "8"}, 2,
     "--resume: --rank was 4 in"),
    ("resume-another-model", "train", {"--out": "{run}", "--resume": True, "--model": "{klein}"}, 2,
     "--resume: --model was"),
    ("resume-damaged-checkpoint", "train", {"--out": "{damaged_run}", "--resume": True}, 2, "--resume: cannot read"),
    ("sample-prompts-missing", "train", {"--sample-prompts": "{nope}"}, 2, "--sample-prompts"),
    ("sample-prompts-not-utf8", "train", {"--sample-prompts": "{text_not_utf8}"}, 2, "not UTF-8 text (byte 0xff"),
    ("preserve-prompts-missing", "train", {"--preserve-prompts": "{nope}"}, 2, "file not found"),
    ("preserve-prompts-empty", "train", {"--preserve-prompts": "{empty_file}"}, 2, "no prompts in it"),
    ("preserve-prompts-with-full", "train", {"--preserve-prompts": "{prompts}", "--full": True}, 2,
     "it needs --method dopsd without --full"),
    ("preserve-prompts-with-sft", "train", {"--preserve-prompts": "{prompts}", "--method": "sft"}, 2,
     "it needs --method dopsd without --full"),
    ("init-lora-missing", "train", {"--init-lora": "{nope}"}, 2, "--init-lora"),
    ("init-lora-other-family", "train", {"--init-lora": "{klein_lora}"}, 2, "trained for flux-2-klein, but --model"),
    ("init-lora-rank-above-rank", "train", {"--init-lora": "{zimage_lora}", "--rank": "2"}, 2,
     "its rank is 4, above --rank 2"),
    ("init-lora-musubi-module-not-in-model", "train", {"--init-lora": "{musubi_stray_lora}"}, 2,
     "a kohya/musubi LoRA with 1 module(s) this model does not have or dopsd.py does not train (first: layers_7_"),
    ("init-lora-lokr", "train", {"--init-lora": "{lokr_lora}"}, 2, "a LyCORIS LoKr, not a LoRA"),
    ("init-lora-with-full", "train", {"--init-lora": "{zimage_lora}", "--full": True}, 2, "to continue a --full run"),
    ("fp8-base-with-full", "train", {"--fp8-base": "on", "--full": True}, 2, "--fp8-base on with --full"),
    ("fp8-base-without-checkpointing", "train", {"--fp8-base": "on", "--grad-checkpointing": "off"}, 2,
     "--fp8-base on with --grad-checkpointing off"),
    # train: models and device
    ("model-mistyped-path", "train", {"--model": "./no/such/folder"}, 2, "--model ./no/such/folder: no such local"),
    ("model-mistyped-abs-path", "train", {"--model": "/data/models/zimage"}, 2, "/data/models/zimage: no such local"),
    ("model-without-index", "train", {"--model": "{empty_dir}"}, 2, "cannot read model_index.json"),
    ("model-unsupported", "train", {"--model": "{unsupported}"}, 2, "StableDiffusionPipeline is not supported"),
    ("model-klein-base", "train", {"--model": "{klein_base}"}, 2, "not step-distilled"),
    ("vlm-mistyped-path", "train", {"--vlm": "./no/such/vlm"}, 2, "--vlm ./no/such/vlm: no such local folder"),
    ("vlm-not-a-qwen3-vl", "train", {"--vlm": "{zimage}/text_encoder"}, 2, "text_encoder: a qwen3 model; the "
     "Z-Image teacher needs a Qwen3-VL"),
    ("device-unknown", "train", {"--device": "gpu"}, 2, "--device gpu: not a device name"),
    ("device-unsupported", "train", {"--device": "meta"}, 2, "--device meta: dopsd.py runs on cpu, cuda or mps"),
    ("device-absent-gpu", "train", {"--device": "cuda:99"}, 2, "--device cuda:99: "),
    # train: what argparse refuses (usage, then the error)
    ("args-rank-not-int", "train", {"--rank": "four"}, 2, "argument --rank: invalid int value: 'four'"),
    ("args-method-unknown", "train", {"--method": "dpo"}, 2, "argument --method: invalid choice"),
    ("args-no-data", "train", {"--data": None}, 2, "--data"),
    # sample: output, numbers, device
    ("sample-out-unknown-extension", "sample", {"--out": "{out}.xyz"}, 2, ".xyz is no image format PIL knows"),
    ("sample-out-no-extension", "sample", {"--out": "{out}"}, 2, "no file extension; end the name in .png"),
    ("sample-out-read-only-format", "sample", {"--out": "{out}.psd"}, 2, "PIL cannot write an RGB image as PSD"),
    ("sample-out-is-a-folder", "sample", {"--out": "{empty_dir}"}, 2, "is a folder; pass a file name"),
    ("sample-out-under-a-file", "sample", {"--out": "{file}/x.png"}, 2, "is a file, so nothing can be created"),
    ("sample-height-not-16", "sample", {"--height": "100"}, 2, "--height/--width must be multiples of 16"),
    ("sample-width-under-16", "sample", {"--width": "8"}, 2, "--height/--width must be multiples of 16"),
    ("sample-steps-0", "sample", {"--steps": "0"}, 2, "--steps 0: out of range"),
    ("sample-lora-scale-nan", "sample", {"--lora-scale": "nan"}, 2, "--lora-scale nan: not a finite number"),
    ("sample-seed-negative", "sample", {"--seed": "-1"}, 2, "--seed -1: out of range"),
    ("sample-device-unknown", "sample", {"--device": "gpu"}, 2, "--device gpu: not a device name"),
    ("sample-compare-without-lora", "sample", {"--compare": True}, 2, "--compare needs --lora"),
    # sample: the model and the LoRA (its header only: key names and metadata)
    ("sample-model-mistyped-path", "sample", {"--model": "./no/such/folder"}, 2, "no such local folder"),
    ("sample-model-unsupported", "sample", {"--model": "{unsupported}"}, 2, "supported families: ZImagePipeline"),
    ("sample-model-klein-base", "sample", {"--model": "{klein_base}"}, 2, "not step-distilled"),
    ("sample-lora-missing", "sample", {"--lora": "{nope}"}, 2, "nope: not found"),
    ("sample-lora-folder-without-lora", "sample", {"--lora": "{empty_dir}"}, 2, "no pytorch_lora_weights.safetensors"),
    ("sample-lora-not-safetensors", "sample", {"--lora": "{not_safetensors}"}, 2, "not a safetensors file"),
    ("sample-klein-lora-on-zimage", "sample", {"--lora": "{klein_lora}"}, 2,
     "trained for flux-2-klein, but --model"),
    ("sample-zimage-lora-on-klein", "sample", {"--lora": "{zimage_lora}", "--model": "{klein}"}, 2,
     "trained for z-image-turbo, but --model"),
    ("sample-full-run-on-klein", "sample", {"--lora": "{full_run}", "--model": "{klein}"}, 2,
     "trained for z-image-turbo, but --model"),
    ("sample-lora-scale-on-full-run", "sample", {"--lora": "{full_run}", "--lora-scale": "0.5"}, 2,
     "is a --full run (a whole DiT), it has no LoRA to scale"),
    ("sample-lora-matches-no-layer", "sample", {"--lora": "{alien_lora}"}, 2, "its layers do not fit this model"),
    # train: the teacher check and the teacher's start
    ("check-images-negative", "train", {"--check-images": "-1"}, 2, "--check-images -1: out of range"),
    ("teacher-start-without-init-lora", "train", {"--teacher-start": "base"}, 2,
     "--teacher-start base: the teacher starts at the base anyway without --init-lora"),
    ("teacher-start-auto-without-check", "train", {"--init-lora": "{zimage_lora}", "--check-images": "0"}, 2,
     "--teacher-start auto (the default) chooses with the teacher check"),
    # check: the same data, model and LoRA checks as train, and its own numbers
    ("check-images-zero", "check", {"--check-images": "0"}, 2, "--check-images 0: out of range"),
    ("check-data-missing", "check", {"--data": "{nope}"}, 2, "nope: folder not found"),
    ("check-out-is-a-file", "check", {"--out": "{file}"}, 2, "is a file, not a folder"),
    ("check-resolution-not-16", "check", {"--resolution": "100"}, 2, "--resolution must be a multiple of 16"),
    ("check-seed-negative", "check", {"--seed": "-1"}, 2, "--seed -1: out of range"),
    ("check-device-unknown", "check", {"--device": "gpu"}, 2, "--device gpu: not a device name"),
    ("check-model-unsupported", "check", {"--model": "{unsupported}"}, 2, "StableDiffusionPipeline is not supported"),
    ("check-init-lora-missing", "check", {"--init-lora": "{nope}"}, 2, "nope: not found"),
    ("check-init-lora-other-family", "check", {"--init-lora": "{klein_lora}"}, 2, "trained for flux-2-klein"),
    ("check-vlm-not-a-qwen3-vl", "check", {"--vlm": "{zimage}/text_encoder"}, 2, "a qwen3 model"),
    ("args-check-images-not-int", "check", {"--check-images": "x"}, 2, "argument --check-images: invalid int value"),
    # sample: what argparse refuses
    ("args-sample-steps-not-int", "sample", {"--steps": "x"}, 2, "argument --steps: invalid int value"),
    ("args-sample-no-prompt", "sample", {"--prompt": None}, 2, "--prompt"),
    ("args-sample-precision-unknown", "sample", {"--precision": "fp8"}, 2, "argument --precision: invalid choice"),
]
LOADS_MODEL = {"sample-lora-matches-no-layer"}      # its keys name no family: only loading it can tell


@pytest.fixture(scope="session")
def bad_files(tiny, tmp_path_factory):
    """The files and folders BAD_INPUTS names, as {name: path}, built once: each bad in one way only."""
    from PIL import Image
    from safetensors.torch import save_file
    root, f = tmp_path_factory.mktemp("bad"), {k: str(v) for k, v in tiny.items()}

    def folder(name, **files):                       # files: {file name: bytes, or (w, h) for an image}
        (root / name).mkdir()
        for n, v in files.items():
            if isinstance(v, tuple):
                Image.new("RGB", v, "gray").save(root / name / n)
            else:
                (root / name / n).write_bytes(v)
        f[name] = str(root / name)
    shutil.copytree(tiny["small"], root / "data")
    f.update(data=str(root / "data"), nope=str(root / "nope"))
    folder("no_images", **{"notes.txt": b"hello"})
    folder("corrupt", **{"good.png": (64, 64), "good.txt": b"ok", "broken.png": b"\x89PNG\r\n\x1a\n garbage",
                         "broken.txt": b"ok"})
    folder("huge", **{"huge.png": (600, 400), "huge.txt": b"ok"})         # over the test's 100,000-pixel limit × 2
    folder("thin", **{"thin.png": (32, 100), "thin.txt": b"ok"})
    folder("uncaptioned", **{"a.png": (64, 64)})
    folder("caption_not_utf8", **{"k0.png": (64, 64), "k0.txt": "a [V] cat".encode("utf-16")})   # BOM ff fe
    folder("jsonl_not_utf8", **{"k0.png": (64, 64), "metadata.jsonl": b'{"file_name": "k0.png", "text": "\xff"}\n'})
    folder("jsonl_bad_row", **{"k0.png": (64, 64), "k0.txt": b"ok", "metadata.jsonl": b"not json\n"})
    folder("empty_dir")
    folder("unsupported", **{"model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline"}).encode()})
    index = json.loads((tiny["klein"] / "model_index.json").read_text())
    folder("klein_base", **{"model_index.json": json.dumps({**index, "is_distilled": False}).encode()})
    folder("full_run")                               # a --full run of Z-Image: what sample reads of it
    (root / "full_run" / "transformer").mkdir()
    (root / "full_run" / "transformer" / "config.json").write_text('{"_class_name": "ZImageTransformer2DModel"}')
    for name, data in (("file", b"x"), ("empty_file", b""), ("prompts", b"a dog\n"), ("text_not_utf8", b"caf\xff\n"),
                       ("not_safetensors", b"this is not a safetensors file")):
        (root / name).write_bytes(data)
        f[name] = str(root / name)
    lora = lambda keys, **meta: {"tensors": {k: torch.zeros(4, 4) for k in keys}, "metadata": meta or None}
    for name, spec in (("klein_lora", lora(["transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight"])),
                       ("zimage_lora", lora(["transformer.x.lora_A.weight"], **{
                           "modelspec.architecture": "z-image-turbo/lora"})),
                       ("alien_lora", lora(["transformer.no_such_module.lora_A.weight",
                                            "transformer.no_such_module.lora_B.weight"])),
                       ("musubi_stray_lora", lora([f"lora_unet_layers_{i}_attention_to_q.lora_{f}.weight"
                                                   for i in (0, 7) for f in ("down", "up")])),   # the tiny has 2 layers
                       ("lokr_lora", lora(["lora_unet_layers_0_attention_to_q.lokr_w1",
                                           "lora_unet_layers_0_attention_to_q.lokr_w2"]))):
        save_file(spec["tensors"], root / f"{name}.safetensors", metadata=spec["metadata"])
        f[name] = str(root / f"{name}.safetensors")
    for name, data in (("run", None), ("damaged_run", b"not a checkpoint")):  # an existing run: rank 4, tiny zimage
        (root / name).mkdir()
        cfg = dataclasses.replace(dopsd.TrainConfig(), model=f["zimage"], rank=4, rollout_steps=2)
        if data is None:
            torch.save({"step": 1, "config": dataclasses.asdict(cfg)}, root / name / "checkpoint.pt")
        else:
            (root / name / "checkpoint.pt").write_bytes(data)
        f[name] = str(root / name)
    return f


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_stops_in_one_line_before_any_model_loads(row, bad_files, tmp_path, monkeypatch, capsys):
    """Each BAD_INPUTS row exits with its code and one line holding its fragment, no traceback, and (but for the
    LOADS_MODEL rows) before any weight is read: every loader is patched to fail the test."""
    import diffusers
    import transformers
    from PIL import Image
    name, cmd, changes, code, fragment = row
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # so that the "huge" image is 0.24 MP, not 225 MP

    def read_weights(*args, **kwargs):
        raise AssertionError(f"{name}: model weights were read; this mistake must stop before any model loads")
    if name not in LOADS_MODEL:
        for owner, attr in ((dopsd, "load_pipeline"), (dopsd, "load_hybrid_vlm"), (diffusers.DiffusionPipeline,
                            "from_pretrained"), (diffusers.ModelMixin, "from_pretrained"),
                            (transformers.PreTrainedModel, "from_pretrained")):
            monkeypatch.setattr(owner, attr, read_weights)
    paths = {**bad_files, "out": str(tmp_path / "out")}
    flags = {**GOOD[cmd], **changes}
    argv = [cmd] + [a for k, v in flags.items() if v is not None
                    for a in ([k] if v is True else [k, v.format(**paths)])]
    try:
        got = dopsd.main(argv)
    except SystemExit as e:                          # argparse: the usage line, then the error
        got = e.code
    err = capsys.readouterr().err
    assert got == code and fragment in err and "Traceback" not in err, f"exit {got}, stderr:\n{err}"
    assert sum("error:" in line for line in err.splitlines()) == 1, err        # one line says what is wrong


def test_the_bad_input_table_covers_every_command_and_every_number():
    """BAD_INPUTS has at least 40 rows, every command, and an out-of-range row for every numeric flag."""
    numeric = {"--" + f.name.replace("_", "-") for cls in (dopsd.TrainConfig, dopsd.SampleConfig, dopsd.CheckConfig)
               for f in dataclasses.fields(cls) if f.type in (int, float)}
    covered = {k for _, _, changes, _, _ in BAD_INPUTS for k in changes}
    assert len(BAD_INPUTS) >= 40 and {r[1] for r in BAD_INPUTS} == {"train", "sample", "check"}
    assert numeric <= covered, f"numeric flags without a row: {sorted(numeric - covered)}"


def test_a_folder_named_with_a_colon_and_a_number_is_taken_as_it_is(tiny, tmp_path):
    """--data x:3, where a folder is really named 'x:3', scans that folder once an epoch rather than x three times."""
    folder = shutil.copytree(tiny["small"], tmp_path / "x:3")
    assert dopsd.parse_data_flag(str(folder)) == (str(folder), 1) and len(dopsd.scan_data([str(folder)])) == 2


def test_images_sharing_a_caption_file_are_named_in_a_warning(tmp_path, capsys):
    """k0.png and k0.jpg both read k0.txt: both train, and one warning line names them (likely a mistake, not fatal)."""
    from PIL import Image
    for name in ("k0.png", "k0.jpg", "k1.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a [V] cat")
    assert len(dopsd.scan_dataset(tmp_path)) == 3
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "k0.jpg, k0.png share the caption k0.txt" in out and "k1" not in out


def test_every_corrupt_image_is_listed(tiny, tmp_path, capsys):
    """All unreadable images are named in one message, before any model is loaded."""
    (tmp_path / "good.png").write_bytes((tiny["data"] / "rgba.png").read_bytes())
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "half.jpg").write_bytes((tiny["data"] / "rgb.jpg").read_bytes()[:200])
    err = run_bad(bad_args(tmp_path), capsys)
    assert "broken.png" in err and "half.jpg" in err and "good.png" not in err and "model" not in err.lower()


def test_uncaptioned_images_are_listed_with_the_fix(tmp_path, capsys):
    """Images with no caption are named, and the message says how to fix it."""
    from PIL import Image
    for n in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / n)
    err = run_bad(bad_args(tmp_path), capsys)
    assert "a.png" in err and "b.png" in err and "--caption" in err


def test_caption_flag_and_trigger_fill_captions(tmp_path):
    """--caption covers uncaptioned images; --trigger replaces [V]."""
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a [V] dog")
    items = {it.path: it.captions for it in dopsd.scan_dataset(tmp_path, caption="a photo of [V]", trigger="sks")}
    assert items[tmp_path / "a.png"] == ("a photo of sks",) and items[tmp_path / "b.png"] == ("a sks dog",)


def test_metadata_jsonl_captions_are_read(tiny):
    """metadata.jsonl rows {file_name, text} caption the images."""
    items = dopsd.scan_dataset(tiny["data_jsonl"])
    rows = [json.loads(l) for l in (tiny["data_jsonl"] / "metadata.jsonl").read_text().splitlines() if l.strip()]
    assert {it.path.name: it.captions for it in items} == {r["file_name"]: (r["text"],) for r in rows}


def test_data_scans_with_pils_size_limit_switched_off(tiny, monkeypatch):
    """Image.MAX_IMAGE_PIXELS = None (PIL's documented way to lift its size limit) scans a folder as usual."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert len(dopsd.scan_dataset(tiny["data"])) == len(list(tiny["data"].glob("*.txt")))


def test_every_image_mode_becomes_rgb_without_clipping(tiny):
    """RGBA, P, L, CMYK, 16-bit... all load as 8-bit RGB; 16-bit grey keeps its tones instead of saturating."""
    for path, *_ in dopsd.scan_dataset(tiny["data"]):
        im = dopsd.load_rgb(path)
        assert im.mode == "RGB", path
        if "16" in path.name:
            assert 10 < sum(im.convert("L").tobytes()) / (im.width * im.height) < 245


def test_buckets_are_multiples_of_16_and_batches_share_one():
    """Bucket sides are multiples of 16 near resolution²; a micro-batch never mixes buckets."""
    buckets = dopsd.make_buckets(1024)
    assert all(h % 16 == 0 and w % 16 == 0 and 0.8 < h * w / 1024 ** 2 < 1.2 for h, w in buckets)
    assert dopsd.nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    bucket_of = [(64, 64), (48, 80), (64, 64), (48, 80), (64, 64)]
    for i in range(12):
        idx = dopsd.batch_for_step(bucket_of, 2, seed=3, index=i)
        assert len({bucket_of[j] for j in idx}) == 1
        assert idx == dopsd.batch_for_step(bucket_of, 2, seed=3, index=i)       # a pure function of (seed, index)


def test_crop_covers_the_bucket():
    """Resize-to-cover + centre crop gives exactly the bucket size."""
    from PIL import Image
    assert dopsd.crop_to(Image.new("RGB", (300, 100)), 64, 80).size == (80, 64)


# ---------------------------------------------------------------------------------------------------- models & features


def test_explicit_cuda_index_becomes_the_current_device(monkeypatch, capsys):
    """--device cuda:1 makes GPU 1 the current CUDA device: Triton launches there, not on GPU 0."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert dopsd.pick_device("cuda:1") == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]
    dopsd.pick_device("cpu")
    assert calls == [torch.device("cuda", 1)]


@pytest.mark.parametrize("device,bf16,ckpt", [("cuda", True, True), ("mps", True, True), ("cpu", False, False)])
def test_auto_precision_is_bf16_and_checkpointing_on_any_accelerator(device, bf16, ckpt, capsys):
    """auto: bf16 weights + autocast + checkpointing on cuda and mps, fp32 without checkpointing on CPU; printed."""
    dtype, autocast, checkpointing = dopsd.pick_precision(torch.device(device))
    assert (dtype == torch.bfloat16, checkpointing) == (bf16, ckpt)
    assert ("autocast" in capsys.readouterr().out) == bf16
    assert dopsd.pick_precision(torch.device("cpu"), "bf16", "on")[0::2] == (torch.bfloat16, True)
    assert "--precision" in capsys.readouterr().out


@pytest.mark.parametrize("device,mps,fix", [("cuda:1", False, "CUDA_VISIBLE_DEVICES"), ("auto", True, "--device cpu")])
def test_torchrun_refuses_a_device_index_and_mps(monkeypatch, device, mps, fix):
    """Under torchrun every rank takes cuda:LOCAL_RANK, and mps has no multi-process backend: both are said, not
    silently replaced (a Mac used to train on CPU)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    with pytest.raises(dopsd.UserError, match=fix):
        dopsd.setup_distributed(device)


ENCODE_PROMPT = {"zimage": dict(do_classifier_free_guidance=False), "klein": dict(text_encoder_out_layers=(1, 2, 3))}
FEATURE_WIDTH = {"zimage": 32, "klein": 3 * 32}         # the tiny encoders' D = 32; klein concatenates 3 layers


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_student_features_match_the_pipelines_encode_prompt(request, family):
    """The student's text features equal the pipeline's encode_prompt: Z-Image's per prompt [L_i, D], padding
    stripped; klein's [512, 3D], padded, from the layers at 1/4, 1/2 and 3/4 of the encoder's depth."""
    p = family_fixture(request, family)
    prompts = ["a red circle", "a much longer prompt about a blue square"]
    ours = dopsd.student_features(family, p.text_encoder, p.tokenizer, prompts)
    ours = [o if family == "zimage" else o[0] for o in ours]                    # klein: ([L, 3D], no reference)
    with torch.no_grad():
        ref, _ = p.encode_prompt(list(prompts), device="cpu", **ENCODE_PROMPT[family])
    lengths = [len(o) for o in ours]
    assert [o.shape for o in ours] == [r.shape for r in ref] and {o.shape[1] for o in ours} == {FEATURE_WIDTH[family]}
    assert lengths[0] < lengths[1] if family == "zimage" else lengths == [512, 512]
    assert family == "zimage" or dopsd.klein_text_layers(p.text_encoder) == (1, 2, 3)
    for o, r in zip(ours, ref):
        assert_close(o, r, 1e-6, what=f"{family} student features")


def test_the_hybrid_vlm_holds_the_text_encoders_own_tensors(pipe, tiny, capsys):
    """load_hybrid_vlm replaces the VLM's language model tensor for tensor (the count is printed) with the text
    encoder's own tensors, not copies: no second copy on the device while caching."""
    vlm, _, _ = dopsd.load_hybrid_vlm(tiny["vlm"], pipe.text_encoder, torch.float32)
    assert "46/46" in capsys.readouterr().out
    te = {k.removeprefix("model."): v for k, v in pipe.text_encoder.state_dict().items()}
    lm = vlm.language_model.state_dict()
    assert lm and all(torch.equal(v, te[k]) for k, v in lm.items())
    assert all(te[k].data_ptr() == v.data_ptr() for k, v in lm.items())


def test_mismatched_vlm_is_refused(tiny):
    """A VLM whose language model does not match the text encoder stops with a clear error."""
    from transformers import Qwen3Config, Qwen3Model
    other = Qwen3Model(Qwen3Config(vocab_size=265, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12))
    with pytest.raises(dopsd.UserError, match="tensors match"):
        dopsd.load_hybrid_vlm(tiny["vlm"], other, torch.float32)


def test_teacher_features_hold_image_and_caption_tokens(pipe, tiny):
    """Teacher context = template + image + caption tokens of the hybrid VLM, width D, every token kept."""
    vlm, tok, proc = dopsd.load_hybrid_vlm(tiny["vlm"], pipe.text_encoder, torch.float32)
    img = dopsd.crop_to(dopsd.load_rgb(tiny["data"] / "rgb.jpg"), 64, 64)
    f = dopsd.vlm_features(vlm, tok, proc, img, "a red circle")
    s = dopsd.zimage_text_features(pipe.text_encoder, pipe.tokenizer, ["a red circle"])[0]
    assert f.shape[1] == s.shape[1] == 32 and len(s) + 100 < len(f)
    other = dopsd.crop_to(dopsd.load_rgb(tiny["data"] / "cmyk.jpg"), 64, 64)
    assert not torch.allclose(f, dopsd.vlm_features(vlm, tok, proc, other, "a red circle"))   # the image matters


def test_klein_reference_tokens_enter_the_teacher(klein_pipe, tiny):
    """Reference latents encode as the pipeline encodes them, and change the teacher's prediction."""
    img = dopsd.pil_to_tensor(dopsd.crop_to(dopsd.load_rgb(tiny["data"] / "rgb.jpg"), 64, 64))[None]
    ref = dopsd.klein_encode(klein_pipe.vae, img)                                       # [1, 32, 4, 4]
    pipe_ref, pipe_ids = klein_pipe.prepare_image_latents([img], 1, None, "cpu", torch.float32)
    assert_close(ref.flatten(2).transpose(1, 2), pipe_ref, 1e-5, what="reference tokens")
    assert pipe_ids[0, :, 0].eq(10).all()                                               # T = 10, as ours
    pe = dopsd.klein_text_features(klein_pipe.text_encoder, klein_pipe.tokenizer, ["a red circle"], (1, 2, 3))
    x, s = torch.randn(1, 32, 4, 4), torch.tensor([0.9])
    with torch.no_grad():
        plain = dopsd.klein_velocity(klein_pipe.transformer, x, s, (pe, None))
        with_ref = dopsd.klein_velocity(klein_pipe.transformer, x, s, (pe, ref))
        other = dopsd.klein_velocity(klein_pipe.transformer, x, s, (pe, -ref))
    assert (with_ref - plain).abs().mean() > 1e-3 and (with_ref - other).abs().mean() > 1e-3


LORA_LINEARS = {  # family: the DiT's linears a LoRA must wrap (by name), and names that must be among them
    "zimage": (lambda n: ".attention." in n or ".feed_forward." in n, ()),
    "klein": (lambda n: "transformer_blocks." in n, ("to_qkv_mlp_proj", "single_transformer_blocks")),
}


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_lora_wraps_every_block_linear(tiny, family):
    """The LoRA target regex catches every linear it should (counted independently): Z-Image's attention and
    feed-forward linears; klein's double- and single-stream block linears, incl. the fused qkv-mlp projection."""
    tr = tiny_dit(tiny, family)
    wanted, must = LORA_LINEARS[family]
    want = {n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and wanted(n)}
    n = dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS[family], 4, 8)
    got = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if n.endswith("lora_A.student.weight")}
    assert n == len(want) == len(got) == 28 and got == want
    assert all(any(name in g for g in got) for name in must)


def fp8_bytes(module):
    return {dt: sum(p.numel() * p.element_size() for p in module.parameters() if p.dtype == dt)
            for dt in {p.dtype for p in module.parameters()}}


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_an_fp8_base_stores_every_lora_d_linear_in_8_bits_and_keeps_the_factors_fp32(tiny, family):
    """store_base_in_fp8 after the adapters: each LoRA'd base weight is float8, every LoRA factor fp32, and every
    weight stored in float8 costs 1 byte instead of bf16's 2 (counted; what stays bf16: norms, embedders, the modules
    the model class keeps -- a large share of these tiny DiTs, 0.2-0.5 % of the real ones: the memory plan's job)."""
    from diffusers import DiffusionPipeline
    tr = DiffusionPipeline.from_pretrained(tiny[family], dtype=torch.bfloat16).transformer.requires_grad_(False)
    before = sum(fp8_bytes(tr).values())
    dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS[family], 4, 8.0)
    lora = sum(p.numel() * 4 for n, p in tr.named_parameters() if ".lora_" in n)
    dopsd.store_base_in_fp8(tr, torch.bfloat16)
    for layer in dopsd.lora_layers(tr):
        assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
        assert all(p.dtype == torch.float32 for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()])
    n8 = sum(p.numel() for p in tr.parameters() if p.dtype == torch.float8_e4m3fn)
    assert n8 >= sum(layer.base_layer.weight.numel() for layer in dopsd.lora_layers(tr)) > 0
    assert sum(fp8_bytes(tr).values()) - lora == before - n8


def test_the_lora_gradient_through_an_fp8_base_agrees_with_the_bf16_base():
    """On the toy model's trained weights (bf16 compute, checkpointing), the first step's LoRA gradient through an
    fp8-stored base has cosine >= 0.99 with the gradient through the bf16 base, from the same LoRA init."""
    toy = ROOT / "examples" / "toy" / "model"
    grads = []
    for fp8 in (False, True):
        pipe = dopsd.load_pipeline(str(toy), torch.bfloat16)
        tr = pipe.transformer.requires_grad_(False)
        torch.manual_seed(0)
        dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS["klein"], 4, 8.0, ("student",))
        with torch.no_grad():                         # B = 0 would leave A without a gradient: start off the base
            for n, p in tr.named_parameters():
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 1e-3)
        if fp8:
            dopsd.store_base_in_fp8(tr, torch.bfloat16)
        tr.enable_gradient_checkpointing()
        cond = dopsd.student_features("klein", pipe.text_encoder, pipe.tokenizer, ["a red circle on a blue ground"])
        c, h = dopsd.collate(cond), 64 // dopsd.latent_cell("klein", pipe.vae)
        x = torch.randn(1, tr.config.in_channels, h, h, generator=torch.Generator().manual_seed(1))
        x0 = torch.randn(1, tr.config.in_channels, h, h, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u = dopsd.klein_velocity(tr, x, torch.tensor([0.75]), c)
        (u.float() - (x - x0)).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in tr.named_parameters() if ".lora_" in n]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
    assert cos >= 0.99, cos


# ---------------------------------------------------------------------------------------------------- roll-out & teacher


def pipeline_sigmas(family, steps, tokens):
    """The σ schedule the family's diffusers pipeline sets for `steps` steps on `tokens` latent cells."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
    if family == "zimage":
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sch.set_timesteps(sigmas=get_default_z_image_sigmas(steps))
    else:
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096,
                                              time_shift_type="exponential")
        sch.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    return sch.sigmas


# family: (steps, token counts) checked against the pipeline; a schedule pinned by hand: (steps, tokens, σ, tolerance)
SCHEDULES = {"zimage": ((8, [64]), (4, 64, [1, .9, .75, .5, 0], 1e-6)),
             "klein": ((4, [16, 1024, 4096]), (4, 4096, [1, .9674, .9081, .7672, 0], 1e-4))}    # klein at 1024²


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_schedule_is_the_pipelines_own(family):
    """The roll-out's σ schedule is the one the family's pipeline samples with: Z-Image's turbo schedule (4 steps:
    σ = 1, .9, .75, .5, 0; 8 steps: diffusers' deploy schedule), klein's linspace(1, 1/N, N) with the shift that
    grows with the token count."""
    (steps, token_counts), (hand_steps, hand_tokens, hand, tol) = SCHEDULES[family]
    for tokens in token_counts:
        assert_close(dopsd.schedule(family, steps, tokens, 1), pipeline_sigmas(family, steps, tokens), 1e-6,
                     what=f"{steps} steps, {tokens} tokens")
    assert_close(dopsd.schedule(family, hand_steps, hand_tokens, 1), torch.tensor(hand), tol, what="by hand")


def test_the_sft_baseline_samples_sigma_with_the_familys_own_shift():
    """SFT's σ density is the shift each family samples with: Z-Image's static 3, klein's e^μ at the token count (the
    pipeline's own schedule, pinned against klein_sigmas)."""
    u = torch.linspace(1.0, 0.25, 4)
    assert torch.equal(dopsd.sft_sigma("zimage", u, 64, 8), 3 * u / (1 + 2 * u))
    for tokens in (64, 4096):
        assert_close(dopsd.sft_sigma("klein", u.double(), tokens, 4), dopsd.klein_sigmas(4, tokens)[:4].double(),
                     atol=1e-6, what=f"{tokens} tokens")
    assert dopsd.sft_sigma("klein", torch.tensor([0.5]), 64, 4) > 0.85     # shift ~7: 7·0.5/(1 + 6·0.5) = 0.875


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")     # rms_norm under autocast
def test_the_klein_timestep_is_rounded_to_the_dtype_the_dit_computes_in(tiny):
    """σ·1000 reaches the klein DiT rounded as Flux2KleinPipeline rounds it for a bf16 DiT (0.9545: 956 / 1000) on a
    bf16 DiT and on an fp32 one under bf16 autocast (--full on an accelerator); an fp32 DiT without autocast gets σ."""
    dit, seen = tiny_dit(tiny, "klein"), []
    dit.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True)
    x, s = torch.randn(1, dit.config.in_channels, 4, 4), torch.tensor([0.9545])
    cond = (torch.randn(1, 3, dit.config.joint_attention_dim), None)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            dopsd.klein_velocity(dit, x, s, cond)                          # fp32 DiT, bf16 autocast (--full)
        dopsd.klein_velocity(dit, x, s, cond)                              # fp32 DiT (CPU runs)
        dopsd.klein_velocity(dit.to(torch.bfloat16), x, s, cond)           # bf16 DiT, as the pipeline's
    pipeline = (s * 1000).to(torch.bfloat16) / 1000                        # Flux2KleinPipeline: t.to(dtype) / 1000
    assert pipeline.item() == 0.95703125                                   # 956 / 1000, in bf16
    assert [(t.dtype, t.tolist()) for t in seen] == [(pipeline.dtype, pipeline.tolist()), (s.dtype, s.tolist()),
                                                     (pipeline.dtype, pipeline.tolist())]


def to_pipeline_latents(family, vae, x):
    """Our state -> the layout of the pipeline's output_type="latent": Z-Image's as is; klein's un-normalised and
    un-patchified [B, C/4, 2h, 2w] (klein_decode's first lines)."""
    if family == "zimage":
        return x
    mean, std = dopsd._klein_bn(vae)
    z = x * std + mean
    B, C, h, w = z.shape
    return z.reshape(B, C // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * h, 2 * w)


# |klein latents| reach ~6 here; our σ (float64, then fp32) and the scheduler's differ by 1 ulp (6e-8), which four
# steps through the DiT turn into ~3e-5: allow 1e-4.
ROLLOUT_TOL = {"zimage": 1e-5, "klein": 1e-4}


@pytest.mark.parametrize("family,steps,hw", [("zimage", 4, (64, 64)), ("zimage", 8, (64, 64)),
                                             ("klein", 4, (64, 64)), ("klein", 4, (48, 80))])
def test_rollout_equals_the_pipeline_with_zero_lora(request, tiny, family, steps, hw):
    """With a zero LoRA, the student's few-step roll-out (and euler_sample) reproduces the diffusers pipeline's own
    latents from the same noise: Z-Image at 4 and 8 steps, klein on a square and a non-square grid."""
    pipe, tr = family_fixture(request, family), tiny_dit(tiny, family)
    distilled = {"is_distilled": True} if family == "klein" else {}           # klein's flag is config, not a component
    p = type(pipe)(**{**pipe.components, "transformer": tr}, **distilled)
    cond = dopsd.collate(dopsd.student_features(family, p.text_encoder, p.tokenizer, ["a red circle", "a cross"]))
    (H, W), cell = hw, dopsd.latent_cell(family, p.vae)
    noise = torch.randn(2, tr.config.in_channels, H // cell, W // cell, generator=torch.Generator().manual_seed(0))
    dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS[family], 4, 8)            # B = 0: equal to the base model
    f = lambda x, s: dopsd.FAMILIES[family]["velocity"](tr, x, s, cond)
    sigmas = dopsd.schedule(family, steps, H // cell, W // cell)
    _, ours = dopsd.dopsd_rollout(f, f, noise, sigmas, stepwise=False)
    plain = dopsd.euler_sample(f, noise, sigmas)
    ref = p(prompt_embeds=cond if family == "zimage" else cond[0], latents=noise.clone(), num_inference_steps=steps,
            guidance_scale=PIPE_KW[family]["guidance_scale"], height=H, width=W, output_type="latent").images
    for x, what in ((ours, "roll-out"), (plain, "euler_sample")):
        assert_close(to_pipeline_latents(family, p.vae, x), ref, ROLLOUT_TOL[family], what=f"{what} vs pipeline")


@pytest.fixture()
def two_role_dit(tiny, request):
    """A fresh tiny DiT with student + teacher adapters, the student's B made non-zero so it differs from the teacher.
    Parametrise indirectly with torch.bfloat16 for the accelerator path: bf16 base weights, fp32 LoRA factors."""
    from diffusers import ZImageTransformer2DModel
    dtype = getattr(request, "param", torch.float32)
    tr = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer", dtype=dtype)
    tr.requires_grad_(False)
    dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS["zimage"], 4, 8)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B.student" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    caps = [torch.randn(7, 32, generator=torch.Generator().manual_seed(1)), torch.randn(9, 32)]
    ctx = [torch.randn(20, 32, generator=torch.Generator().manual_seed(2)), torch.randn(25, 32)]

    def student(x, s):
        dopsd.use_adapter(dopsd.lora_layers(tr), "student")
        return dopsd.zimage_velocity(tr, x, s, caps)

    def teacher(x, s):
        dopsd.use_adapter(dopsd.lora_layers(tr), "teacher", trainable=False)
        return dopsd.zimage_velocity(tr, x, s, ctx)
    return tr, student, teacher


def grads(tr, name):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in tr.named_parameters() if f".{name}." in n}


def test_teacher_adapter_gets_no_gradient(two_role_dit):
    """After a roll-out and its backward, every student factor has a gradient and no teacher factor has one."""
    tr, student, teacher = two_role_dit
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    loss, _ = dopsd.dopsd_rollout(student, teacher, noise, dopsd.zimage_sigmas(4))
    assert loss > 0
    assert all(g is None for g in grads(tr, "teacher").values())
    assert all(g is not None and g.abs().sum() > 0 for g in grads(tr, "student").values())


def test_all_K_loss_steps_are_the_full_gradient_bit_for_bit(two_role_dit):
    """trained = every step (--loss-steps M = K) is today's roll-out exactly: loss, final state and gradient."""
    tr, student, teacher = two_role_dit
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = []
    for trained in (None, [0, 1, 2, 3]):
        tr.zero_grad(set_to_none=True)
        loss, x = dopsd.dopsd_rollout(student, teacher, noise, dopsd.zimage_sigmas(4), trained=trained)
        out.append((loss, x, grads(tr, "student")))
    (l1, x1, g1), (l2, x2, g2) = out
    assert torch.equal(l1, l2) and torch.equal(x1, x2) and all(torch.equal(g1[n], g2[n]) for n in g1)


def test_one_loss_step_averaged_over_its_K_choices_is_the_full_gradient(two_role_dit):
    """--loss-steps 1: the loss at one state, weighted K, is an unbiased estimate. Averaged over the K choices it is
    the full gradient; the roll-out's final state is the same whichever state gets the loss."""
    tr, student, teacher = two_role_dit
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    dopsd.dopsd_rollout(student, teacher, noise, dopsd.zimage_sigmas(4))
    full = grads(tr, "student")
    mean = {n: torch.zeros_like(g) for n, g in full.items()}
    for k in range(4):
        tr.zero_grad(set_to_none=True)
        _, x = dopsd.dopsd_rollout(student, teacher, noise, dopsd.zimage_sigmas(4), trained=[k])
        for n, g in grads(tr, "student").items():
            mean[n] += g / 4
    for n in full:
        assert_close(mean[n], full[n], rtol=1e-5, what=n, normwise=True)


def test_stepwise_backward_equals_one_backward(two_role_dit):
    """Backward per step (flat memory) gives the same gradient and loss as one backward over the mean of the K losses."""
    tr, student, teacher = two_role_dit
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    l1, x1 = dopsd.dopsd_rollout(student, teacher, noise, dopsd.zimage_sigmas(4), stepwise=True)
    g1 = grads(tr, "student")
    tr.zero_grad(set_to_none=True)
    l2, x2 = dopsd.dopsd_rollout(student, teacher, noise, dopsd.zimage_sigmas(4), stepwise=False)
    g2 = grads(tr, "student")
    assert_close(l1, l2, 1e-7, what="loss")
    assert torch.equal(x1, x2)
    for n in g1:
        assert_close(g1[n], g2[n], 1e-7, rtol=1e-5, what=n)


def test_teacher_sees_the_students_state_not_its_own(two_role_dit):
    """Each step's teacher input is the state the student's own Euler steps produced."""
    tr, student, teacher = two_role_dit
    seen = []
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = dopsd.zimage_sigmas(3)
    dopsd.dopsd_rollout(student, lambda x, s: (seen.append(x.clone()), teacher(x, s))[1], noise, sig)
    x = noise
    for k in range(3):
        assert torch.equal(seen[k], x)
        with torch.no_grad():
            x = x + (sig[k + 1] - sig[k]) * student(x, sig[k].expand(1))


def test_active_teacher_adapter_holds_no_trainable_parameter(two_role_dit):
    """While the teacher runs, no LoRA factor requires grad (nothing to collect a gradient, nothing for autocast to
    cache); switching back makes exactly the student's factors trainable."""
    tr, student, teacher = two_role_dit
    x = torch.randn(1, 16, 8, 8)
    flags = []
    with torch.no_grad():
        teacher(x, torch.tensor([0.5]))
        flags = [p.requires_grad for n, p in tr.named_parameters() if ".lora_" in n]
        student(x, torch.tensor([0.5]))
    assert flags and not any(flags)
    assert all(p.requires_grad == (".student." in n) for n, p in tr.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize("two_role_dit", [torch.bfloat16], indirect=True)
def test_checkpointing_gives_the_same_bf16_gradients(two_role_dit):
    """bf16 DiT, fp32 LoRA, CPU bf16 autocast around each forward: a roll-out with gradient checkpointing gives the
    student the same gradient as one without (the recomputation replays the forward exactly), and the teacher none."""
    tr, student, teacher = two_role_dit
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for ckpt in (False, True):
        if ckpt:
            tr.enable_gradient_checkpointing()
        tr.zero_grad(set_to_none=True)
        loss, _ = dopsd.dopsd_rollout(lambda x, s: _amp(student, x, s), lambda x, s: _amp(teacher, x, s), noise,
                                      dopsd.zimage_sigmas(4))
        out[ckpt] = loss, grads(tr, "student")
        assert all(g is None for g in grads(tr, "teacher").values())
    assert torch.equal(out[False][0], out[True][0])
    for n, g in out[False][1].items():
        assert g is not None and g.dtype == torch.float32 and g.abs().sum() > 0, n
        assert_close(out[True][1][n], g, 0.0, rtol=1e-6, what=n)


def _amp(f, x, s):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return f(x, s)


def test_lora_layer_under_autocast_keeps_no_fp32_copy_of_its_input(tiny):
    """A LoRA'd linear of a bf16 DiT under bf16 autocast saves its bf16 input once, shared with the base linear: no
    fp32 copy and no second bf16 copy (peft's own input cast is off)."""
    from diffusers import ZImageTransformer2DModel
    tr = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer", dtype=torch.bfloat16)
    dopsd.add_lora_adapters(tr.requires_grad_(False), dopsd.LORA_TARGETS["zimage"], 4, 8, ("student",))
    lin = tr.layers[0].attention.to_q
    x = torch.randn(8, lin.in_features, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x)
    inputs = [t for t in saved if t.shape == x.shape]
    assert inputs and all(t.dtype == torch.bfloat16 for t in inputs)
    assert {t.untyped_storage().data_ptr() for t in inputs} == {x.untyped_storage().data_ptr()}


def test_a_preserve_step_pulls_the_student_towards_the_base_model(tiny):
    """--preserve-prompts' term, in isolation: the student rolls out on a prompt without the concept and is regressed
    onto the base model (every adapter off) at its own states; one SGD step on it moves the student's velocity towards
    the base's. The base callable is exactly the DiT without LoRA, and hands the DiT back with the student trainable."""
    import contextlib
    from diffusers import ZImageTransformer2DModel
    tr = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer").requires_grad_(False)
    plain = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer")
    student, teacher, trainable, _ = dopsd.attach_roles(tr, "zimage", True, False, 4, 8.0, 0, contextlib.nullcontext)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B.student" in n:                                   # a student that has drifted from the base
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    caps = [torch.randn(7, 32, generator=torch.Generator().manual_seed(1))]
    x, s = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.9])
    base = lambda x, s: teacher(x, s, caps, adapter=None)
    with torch.no_grad():
        assert torch.equal(base(x, s), dopsd.zimage_velocity(plain, x, s, caps))
        gap = (student(tr, x, s, caps) - base(x, s)).norm()
    opt = torch.optim.SGD(trainable, lr=0.5)
    dopsd.dopsd_rollout(lambda x, s: student(tr, x, s, caps), base, torch.randn(1, 16, 8, 8), dopsd.zimage_sigmas(2))
    assert sum(p.grad.abs().sum() for p in trainable) > 0             # the student, not the base, got the gradient
    opt.step()
    with torch.no_grad():
        assert (student(tr, x, s, caps) - base(x, s)).norm() < 0.9 * gap


# ---------------------------------------------------------------------------------------------------- fused loss
# The divergence loss: reference, PyTorch path and Triton kernel agree. The kernel runs on CPU through the Triton
# interpreter (TRITON_INTERPRET=1, set at the top of this file before triton is imported); everything is compared
# against divergence_loss_reference evaluated in float64.

from dopsd import HAS_TRITON, LOSS_BACKEND, divergence_loss_reference, dopsd_loss  # noqa: E402

M = dopsd
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative to max|expected|
SHAPES = [(1, 7, 13, 17), (2, 4099), (3, 5), (3, 5, 37, 29)]  # none a multiple of the 1024-element block


def make_inputs(shape, dtype, seed=0, teacher_grad=False):
    """Student/teacher velocities in `dtype` and a per-sample σ in (0.05, 1)."""
    g = torch.Generator().manual_seed(seed)
    vs = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    vt = torch.randn(shape, generator=g).to(dtype).requires_grad_(teacher_grad)
    sigma = 0.05 + 0.95 * torch.rand(shape[0], generator=g)
    return vs, vt, sigma


def reference64(vs, vt, sigma, space="x0", grad_scale=1.0):
    """Loss and ∂L/∂u_s from the reference, in float64, for the same (rounded) inputs."""
    vs64 = vs.detach().double().requires_grad_(True)
    loss = divergence_loss_reference(vs64, vt.detach().double(), sigma.double(), space)
    (grad_scale * loss).backward()
    return loss.detach(), vs64.grad


def run_loss(vs, vt, sigma, space="x0", backend="torch", grad_scale=1.0):
    """Loss and ∂L/∂u_s from the dispatcher."""
    vs.grad = None
    loss = dopsd_loss(vs, vt, sigma, space=space, backend=backend)
    (grad_scale * loss).backward()
    return loss.detach(), vs.grad


# --- 2. Triton kernel vs reference ----------------------------------------------------------------------------------

@needs_triton
def test_triton_kernel_is_interpreted_and_used(monkeypatch):
    """backend='triton' runs the interpreted kernel and never touches the PyTorch path."""
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(M._divergence_kernel, InterpretedFunction)
    monkeypatch.setattr(M, "_divergence_fwd_torch", lambda *a: pytest.fail("fell back to the torch path"))
    vs, vt, sigma = make_inputs((2, 4099), torch.float32)
    assert_close(run_loss(vs, vt, sigma, backend="triton")[0], reference64(vs, vt, sigma)[0], rtol=1e-5, what="loss",
                 normwise=True)


@needs_triton
@pytest.mark.parametrize("space", ["x0", "v"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_reference_fp32(shape, space):
    """fp32: loss and gradient within 1e-5 of the float64 reference on shapes that are not block multiples."""
    vs, vt, sigma = make_inputs(shape, torch.float32)
    loss, grad = run_loss(vs, vt, sigma, space, backend="triton")
    loss_ref, grad_ref = reference64(vs, vt, sigma, space)
    assert_close(loss, loss_ref, rtol=1e-5, what="loss", normwise=True)
    assert_close(grad, grad_ref, rtol=1e-5, what="grad", normwise=True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 7, 13, 17), (2, 4099)], ids=str)
def test_triton_matches_reference_half(shape, dtype):
    """bf16 (2e-2) / fp16 (5e-3): loss and gradient, gradient stored in the input dtype."""
    vs, vt, sigma = make_inputs(shape, dtype)
    loss, grad = run_loss(vs, vt, sigma, backend="triton")
    loss_ref, grad_ref = reference64(vs, vt, sigma)
    assert grad.dtype == dtype
    assert_close(loss, loss_ref, rtol=TOL[dtype], what="loss", normwise=True)
    assert_close(grad, grad_ref, rtol=TOL[dtype], what="grad", normwise=True)


# --- 3. semantics, both backends ------------------------------------------------------------------------------------

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference(dtype):
    """The PyTorch path matches the float64 reference (fp32 1e-5, bf16 2e-2)."""
    vs, vt, sigma = make_inputs((3, 5, 37, 29), dtype)
    loss, grad = run_loss(vs, vt, sigma, backend="torch")
    loss_ref, grad_ref = reference64(vs, vt, sigma)
    assert_close(loss, loss_ref, rtol=TOL[dtype], what="loss", normwise=True)
    assert_close(grad, grad_ref, rtol=TOL[dtype], what="grad", normwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_is_fp32_scalar(backend):
    """bf16 inputs give a 0-D float32 loss."""
    vs, vt, sigma = make_inputs((2, 3, 4), torch.bfloat16)
    loss = dopsd_loss(vs, vt, sigma, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_weights_each_sample_separately(backend):
    """σ = [1, 0] keeps only sample 0: the weight index is b = flat_index // (N/B)."""
    vs, vt, _ = make_inputs((2, 3, 11), torch.float32)
    loss, grad = run_loss(vs, vt, torch.tensor([1.0, 0.0]), backend=backend)
    d0 = (vs - vt).detach()[0]
    assert_close(loss, (d0**2).sum() / vs.numel(), rtol=1e-6, what="loss", normwise=True)
    assert torch.all(grad[1] == 0) and torch.all(grad[0] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_x0_space_is_sigma_squared_times_v_space(backend):
    """With one σ for all samples, the x0-space loss is σ² times the v-space loss."""
    vs, vt, _ = make_inputs((2, 3, 7), torch.float32)
    sigma = torch.full((2,), 0.75)
    lx0 = dopsd_loss(vs, vt, sigma, "x0", backend)
    lv = dopsd_loss(vs, vt, sigma, "v", backend)
    assert_close(lx0, 0.75**2 * lv, rtol=1e-6, what="x0 vs σ²·v", normwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """A permuted view (batch not outermost in memory) and a transposed view give the reference loss and grad."""
    g = torch.Generator().manual_seed(1)
    vs = torch.randn(13, 3, 17, generator=g).permute(1, 0, 2).requires_grad_(True)  # (3, 13, 17), strides (17, 51, 1)
    vt = torch.randn(3, 17, 13, generator=g).transpose(1, 2)                         # (3, 13, 17), transposed
    assert not vs.is_contiguous() and not vt.is_contiguous()
    sigma = torch.tensor([0.2, 0.5, 1.0])
    loss, grad = run_loss(vs, vt, sigma, backend=backend)
    loss_ref, grad_ref = reference64(vs, vt, sigma)
    assert_close(loss, loss_ref, rtol=1e-5, what="loss", normwise=True)
    assert_close(grad, grad_ref, rtol=1e-5, what="grad", normwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    """A teacher tensor that requires grad still has .grad None after backward."""
    vs, vt, sigma = make_inputs((2, 3, 5), torch.float32, teacher_grad=True)
    dopsd_loss(vs, vt, sigma, backend=backend).backward()
    assert vt.grad is None and vs.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_grad_output(backend):
    """(3·L).backward() gives 3 × ∂L/∂u_s (backward only rescales the stored gradient)."""
    vs, vt, sigma = make_inputs((2, 1000), torch.float32)
    _, grad = run_loss(vs, vt, sigma, backend=backend, grad_scale=3.0)
    assert_close(grad, 3.0 * reference64(vs, vt, sigma)[1], rtol=1e-5, what="grad", normwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradient_survives_small_differences(backend):
    """fp16 with |d| ~ 1e-3 and loss scaling: 2·w·d/N would underflow, the stored w·d does not."""
    g = torch.Generator().manual_seed(2)
    vs = torch.randn(2, 4099, generator=g).half().requires_grad_(True)
    vt = (vs.detach().float() + 1e-3 * torch.randn(2, 4099, generator=g)).half()
    sigma = torch.full((2,), 0.1)                                   # w = 0.01, so 2·w·d/N ≈ 5e-9 < fp16's 6e-8
    _, grad = run_loss(vs, vt, sigma, backend=backend, grad_scale=65536.0)  # what a GradScaler does
    _, grad_ref = reference64(vs, vt, sigma, grad_scale=65536.0)
    assert_close(grad, grad_ref, rtol=2e-2, what="grad", normwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensor_gives_zero_loss(backend):
    """numel 0: loss 0 (not NaN), fp32, and backward gives an empty gradient."""
    vs = torch.zeros(2, 0, 5, requires_grad=True)
    loss = dopsd_loss(vs, torch.zeros(2, 0, 5), torch.ones(2), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and vs.grad.shape == (2, 0, 5)


# --- 4. dispatch and errors -------------------------------------------------------------------------------------------

def test_auto_picks_torch_on_cpu_and_prints_once(capsys, monkeypatch):
    """backend='auto' on a CPU tensor takes the PyTorch path and says so exactly once."""
    LOSS_BACKEND.clear()
    monkeypatch.setattr(M, "_divergence_fwd_triton", lambda *a: pytest.fail("auto took triton on CPU"))
    vs, vt, sigma = make_inputs((2, 3), torch.float32)
    dopsd_loss(vs, vt, sigma)
    dopsd_loss(vs, vt, sigma)
    out = capsys.readouterr().out
    assert out.count("dopsd_loss: backend=") == 1 and "backend=torch on cpu" in out
    assert LOSS_BACKEND == {"cpu": "torch"}


def test_auto_falls_back_to_torch_when_the_triton_test_launch_fails(monkeypatch, capsys):
    """auto on CUDA test-launches the kernel once; a launch that fails (no C compiler on a slim CUDA image, or here,
    a CPU-only torch) picks the PyTorch path and says why, instead of crashing at the first loss."""
    monkeypatch.setattr(dopsd, "LOSS_BACKEND", {})
    assert dopsd._resolve_loss_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    assert "backend=torch on cuda (test launch failed:" in capsys.readouterr().out
    assert dopsd.triton_probe(torch.device("cpu")) == (True, "test launch passed")      # the interpreted kernel


def test_module_imports_and_runs_without_triton(monkeypatch):
    """With triton unimportable the module still imports, HAS_TRITON is False and auto computes the loss."""
    monkeypatch.setitem(sys.modules, "triton", None)                # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("_no_triton_copy", M.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAS_TRITON is False and not hasattr(mod, "_divergence_kernel")
    vs, vt, sigma = make_inputs((2, 3), torch.float32)
    assert_close(mod.dopsd_loss(vs, vt, sigma), reference64(vs, vt, sigma)[0], rtol=1e-6, what="loss", normwise=True)


def test_forced_triton_without_triton_raises(monkeypatch):
    """backend='triton' with triton missing raises a one-line RuntimeError naming the problem."""
    monkeypatch.setattr(M, "HAS_TRITON", False)
    vs, vt, sigma = make_inputs((2, 3), torch.float32)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        dopsd_loss(vs, vt, sigma, backend="triton")


@needs_triton
def test_forced_triton_on_cpu_with_a_compiled_kernel_raises(monkeypatch):
    """backend='triton' on a CPU tensor with a compiled kernel -- TRITON_INTERPRET=1 unset when the kernel was defined,
    or set only after -- raises a RuntimeError saying how to get the interpreter, not triton's "0 active drivers"."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")                     # a fresh copy of the module gets a compiled kernel
    spec = importlib.util.spec_from_file_location("_compiled_copy", M.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("TRITON_INTERPRET", "1")                     # too late for mod's @triton.jit
    vs, vt, sigma = make_inputs((2, 3), torch.float32)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor.*TRITON_INTERPRET=1 before triton is imported"):
        mod.dopsd_loss(vs, vt, sigma, backend="triton")


@needs_triton
def test_forced_triton_on_cpu_runs_in_the_interpreter(monkeypatch):
    """With the kernel interpreted (TRITON_INTERPRET=1 at import, as in this file), backend='triton' runs on a CPU
    tensor and gives the reference loss, whatever the variable says now."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vs, vt, sigma = make_inputs((2, 3), torch.float32)
    torch.testing.assert_close(dopsd_loss(vs, vt, sigma, backend="triton"),
                               divergence_loss_reference(vs, vt, sigma).float())


@needs_triton
def test_forced_triton_rejects_float64():
    """The kernel computes in fp32, so float64 on backend='triton' is refused (auto would use torch)."""
    vs, vt, sigma = make_inputs((2, 3), torch.float64)
    with pytest.raises(RuntimeError, match="supports float32/bfloat16/float16"):
        dopsd_loss(vs, vt, sigma, backend="triton")


def test_shape_mismatch_raises():
    """u_s and u_t of different shapes raise a ValueError showing both shapes."""
    with pytest.raises(ValueError, match=r"\(2, 3\) and u_t \(2, 4\)"):
        dopsd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))


@pytest.mark.parametrize("sigma", [torch.ones(3), torch.ones(2, 1), torch.tensor(1.0), 0.5], ids=str)
def test_sigma_not_batch_shaped_raises(sigma):
    """sigma must be a tensor of shape (B,); anything else is a ValueError naming (B,)."""
    with pytest.raises(ValueError, match=r"sigma must be a tensor of shape \(B,\) = \(2,\)"):
        dopsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), sigma)


def test_unknown_space_raises():
    """space other than 'x0'/'v' is a ValueError."""
    with pytest.raises(ValueError, match="space must be 'x0'"):
        dopsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), space="eps")


def test_unknown_backend_raises():
    """backend other than auto/triton/torch is a ValueError."""
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch'"):
        dopsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), backend="cuda")


def test_argument_on_another_device_raises():
    """A sigma (or teacher) on another device than u_s is a ValueError naming it, not a crash inside a
    kernel (the meta device stands in for a GPU here)."""
    with pytest.raises(ValueError, match="sigma is on meta but u_s is on cpu"):
        dopsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, device="meta"))


def test_integer_velocities_raise():
    """Integer velocities are a ValueError: the loss is defined on float tensors only."""
    with pytest.raises(ValueError, match="velocities must be float"):
        dopsd_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.ones(2))


# ---------------------------------------------------------------------------------------------------- feature cache


def cache_files(folder):
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).glob("*.safetensors")}


def copy_data(src, dst):
    dst.mkdir()
    for p in Path(src).iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_reused_cache_gives_the_same_lora_bit_for_bit(tiny, tmp_path, capsys):
    """A second run on the same cache encodes nothing and writes exactly the LoRA of the run that filled it."""
    cache = ["--cache-dir", str(tmp_path / "cache"), "--max-steps", "2"]
    assert dopsd.main(train_args(tiny, tmp_path / "a", *cache)) == 0
    assert "0 of 2 entries found, 2 to encode" in capsys.readouterr().out
    assert dopsd.main(train_args(tiny, tmp_path / "b", *cache)) == 0
    assert "2 of 2 entries found, 0 to encode" in capsys.readouterr().out
    a, b = lora_weights(tmp_path / "a"), lora_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_edited_caption_re_encodes_exactly_one_entry(tiny, tmp_path, capsys):
    """Entries are keyed by content: after one caption changes, only that (image, caption) entry is written anew."""
    data = copy_data(tiny["small"], tmp_path / "data")
    cache = ["--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--method", "sft"]
    args = lambda out: ["train", "--data", str(data)] + train_args(tiny, out, *cache)[3:]   # [3:]: from --model on
    assert dopsd.main(args(tmp_path / "a")) == 0
    before = cache_files(tmp_path / "cache")
    (data / "rgb.txt").write_text("an edited caption in [V] style")
    capsys.readouterr()
    assert dopsd.main(args(tmp_path / "b")) == 0
    after = cache_files(tmp_path / "cache")
    assert "1 of 2 entries found, 1 to encode" in capsys.readouterr().out
    assert len(set(after) - set(before)) == 1 and all(after[k] == before[k] for k in before)


def test_a_corrupt_entry_is_named_and_re_encoded(tiny, tmp_path, capsys):
    """A truncated entry (a crash or a full disk) is detected by its header, named in a warning and written again."""
    cache = ["--cache-dir", str(tmp_path / "cache"), "--max-steps", "1", "--method", "sft"]
    assert dopsd.main(train_args(tiny, tmp_path / "a", *cache)) == 0
    victim = sorted(Path(tmp_path / "cache").glob("*.safetensors"))[0]
    key = dopsd_key(victim)
    victim.write_bytes(victim.read_bytes()[:-7])
    assert not dopsd.entry_ok(victim, key)
    capsys.readouterr()
    assert dopsd.main(train_args(tiny, tmp_path / "b", *cache)) == 0
    out = capsys.readouterr().out
    assert f"cache entry {victim} is truncated or corrupt" in out and "1 of 2 entries found, 1 to encode" in out
    assert dopsd.entry_ok(victim, key)


def dopsd_key(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.metadata()["dopsd.key"]


def test_an_unwritable_cache_folder_is_one_line_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch):
    """A --cache-dir that cannot be created or written stops with one line and exit 2; no model is loaded."""
    monkeypatch.setattr(dopsd, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("")
    code = dopsd.main(train_args(tiny, tmp_path / "o", "--cache-dir", str(tmp_path / "file" / "cache")))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--cache-dir {tmp_path / 'file' / 'cache'}: cannot write there" in err[0]


def test_a_full_disk_while_caching_is_one_line_and_keeps_the_written_entries(tiny, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing an entry: exit 1, one line naming the cache folder; no temporary file is left, and the
    entries written before it stay valid for the next run."""
    import safetensors.torch
    real, written = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code = dopsd.main(train_args(tiny, tmp_path / "o", "--cache-dir", str(tmp_path / "cache"), "--method", "sft"))
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
    assert code == 1 and len(err) == 1 and "cannot write a cache entry (No space left on device)" in err[0]
    files = list((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files if f.name != "images.json"] == [".safetensors"]


def test_the_encoders_identity_names_their_files_even_inside_a_hub_cache(tmp_path):
    """files_identity, the model part of every cache key, differs between two models whose text encoders differ, also
    when both live under a .cache folder as hub snapshots do; a folder's own .cache (download metadata) is ignored."""
    ids = []
    for name, width in (("a", 32), ("b", 64)):
        folder = tmp_path / ".cache" / "huggingface" / "hub" / name
        (folder / "text_encoder").mkdir(parents=True)
        (folder / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": width}))
        ids.append(dopsd.files_identity(folder, ("text_encoder",)))
        (folder / ".cache").mkdir()
        (folder / ".cache" / "download.lock").write_text(name)
        assert dopsd.files_identity(folder, ("text_encoder",)) == ids[-1]
    assert ids[0] != ids[1]


def planned(tiny, data, cache, capsys, model=None, resolution=64):
    """plan_cache of an SFT run on the tiny Z-Image, no model loaded: (plan, the start-up line it prints)."""
    Path(cache).mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(dopsd.TrainConfig(), data=[str(data)], model=str(model or tiny["zimage"]),
                              cache_dir=str(cache), resolution=resolution, method="sft")
    capsys.readouterr()
    plan, _ = dopsd.plan_cache(cfg, "zimage", dopsd.scan_data(cfg.data), [], False, torch.float32, 1)
    return plan, capsys.readouterr().out.strip()


def fill(plan):
    """Write every entry of the plan as the encoders would (the key is what makes an entry valid)."""
    for path, key, _ in dopsd.all_entries(plan):
        dopsd.write_entry(path, key, {"s": torch.zeros(1)})


def big_model(tiny, folder):
    """A copy of the tiny Z-Image whose text encoder file is over 1 MiB, as real ones are (never loaded here)."""
    from safetensors.torch import save_file
    shutil.copytree(tiny["zimage"], folder)
    save_file({"w": torch.randn(300_000)}, folder / "text_encoder" / "model.safetensors")
    return folder


def new_mtimes(folder):
    """Move every mtime below folder an hour on, as a copy or a download made later would have it."""
    for f in Path(folder).rglob("*"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 3600 * 10**9), follow_symlinks=False)


def hub_download(model, root):
    """The model as huggingface_hub lays a download out: snapshots/REV/PATH are relative links to blobs/SHA256."""
    snap = root / "models--tiny" / "snapshots" / "0123abc"
    for f in sorted(p for p in Path(model).rglob("*") if p.is_file()):
        blob = root / "models--tiny" / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f.read_bytes())
        link = snap / f.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def test_a_copied_model_finds_every_cache_entry(tiny, tmp_path, capsys):
    """A cp -r of the model (every mtime new, its weight file too large to hash whole) finds every entry that the
    original wrote: the key names the files by content, not by where they lie or when they were written."""
    a = big_model(tiny, tmp_path / "a")
    fill(planned(tiny, tiny["small"], tmp_path / "cache", capsys, model=a)[0])
    b = shutil.copytree(a, tmp_path / "b")
    new_mtimes(b)
    line = planned(tiny, tiny["small"], tmp_path / "cache", capsys, model=b)[1]
    assert "2 of 2 entries found, 0 to encode" in line, line


def test_the_data_folder_moved_with_its_cache_to_another_machine_finds_every_entry(tiny, tmp_path, capsys):
    """The data folder and its .dopsd_cache, moved to another folder beside another download of the same hub files
    (another machine), find every entry: the cache travels with the data."""
    data = copy_data(tiny["small"], tmp_path / "here")
    model = big_model(tiny, tmp_path / "model")
    fill(planned(tiny, data, data / ".dopsd_cache", capsys, model=hub_download(model, tmp_path / "hub1"))[0])
    moved = shutil.move(data, tmp_path / "there")
    snapshot = hub_download(model, tmp_path / "hub2")
    new_mtimes(snapshot.parent.parent / "blobs")
    line = planned(tiny, moved, Path(moved) / ".dopsd_cache", capsys, model=snapshot)[1]
    assert "2 of 2 entries found, 0 to encode" in line, line


def test_a_hub_snapshot_file_is_named_by_its_blob_without_being_read(tmp_path):
    """In a hub snapshot a file's identity is its blob's name (the hub's sha256 of its bytes, or git sha1), one link
    away: the bytes are not hashed, also when the blob links on into the hub's shared store."""
    sha = "ab" * 32
    store = tmp_path / "blobs" / "ab" / ("cd" * 32)
    store.parent.mkdir(parents=True)
    store.write_bytes(b"weights")
    (tmp_path / "blobs" / sha).symlink_to(Path("ab") / store.name)
    (tmp_path / "snapshots" / "rev").mkdir(parents=True)
    link = tmp_path / "snapshots" / "rev" / "model.safetensors"
    link.symlink_to(Path("..") / ".." / "blobs" / sha)
    assert dopsd.file_identity(link) == sha          # not the sha256 of b"weights": the name was taken, not the bytes


def test_weights_with_one_header_but_other_values_are_told_apart(tmp_path):
    """Two large weight files with the same tensor names, dtypes and shapes (two fine-tunes of one model) get different
    identities: the header names a layout, so samples of the bytes enter the identity too."""
    from safetensors.torch import save_file
    w = torch.zeros(300_000)
    save_file({"w": w}, tmp_path / "a.safetensors")
    w[150_000:160_000] = 1.0                         # 40 KB changed in the middle of 1.2 MB
    save_file({"w": w}, tmp_path / "b.safetensors")
    assert dopsd.file_identity(tmp_path / "a.safetensors") != dopsd.file_identity(tmp_path / "b.safetensors")


def test_the_cache_line_gives_the_folders_size_and_the_entries_this_run_does_not_use(tiny, tmp_path, capsys):
    """The start-up line says how much the cache folder holds on disk and how many of its entries this run does not
    use (other models or settings), and how to clear them."""
    (tmp_path / "cache").mkdir()
    for name in ("old1", "old2", "old3"):                # 3 entries of another model, 1 MiB each
        (tmp_path / "cache" / f"{name}.safetensors").write_bytes(bytes(2**20))
    line = planned(tiny, tiny["small"], tmp_path / "cache", capsys)[1]
    assert line.endswith("0 of 2 entries found, 2 to encode; 3.0 MiB on disk, 3 entries not used by this run "
                         "(other models or settings: delete the folder to clear them)"), line


def test_a_run_at_another_resolution_encodes_every_image_entry_again(tiny, tmp_path, capsys):
    """An image's entries are keyed by its bucket: at another --resolution every one is encoded again, since SFT's
    latents and klein's reference latents would fit any size and, reused, train on the wrong crop."""
    fill(planned(tiny, tiny["small"], tmp_path / "cache", capsys, resolution=64)[0])
    plan, line = planned(tiny, tiny["small"], tmp_path / "cache", capsys, resolution=96)
    missing = {p for p, _, _ in dopsd.missing_entries(plan)}
    assert all(p in missing for es in plan["items"] for p, _ in es), line


def test_an_unchanged_image_is_not_decoded_again(tiny, tmp_path, monkeypatch):
    """The scan remembers the images it decoded in the cache folder: a second launch reads none of their bytes."""
    memo = {}
    dopsd.scan_data([str(tiny["small"])], memo=memo)
    opened = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self) or b"")
    items = dopsd.scan_data([str(tiny["small"])], memo=memo)
    assert opened == [] and len(items) == 2 and all(len(it.digest) == 64 for it in items)


def test_repeats_count_each_image_n_times_an_epoch(tiny, tmp_path):
    """--data FOLDER:N gives each image of FOLDER N positions per epoch; a plain folder gives one."""
    assert dopsd.parse_data_flag("imgs:3") == ("imgs", 3) and dopsd.parse_data_flag("imgs") == ("imgs", 1)
    items = dopsd.scan_data([f"{tiny['small']}:3", str(tiny["data"])])
    order = dopsd.loop_cache({"items": [[(None, None)] for _ in items], "prompts": {}}, items, [], "zimage", 64)["order"]
    counts = [order.count(i) for i in range(len(items))]
    assert counts == [3, 3] + [1] * (len(items) - 2)


def test_a_caption_list_draws_one_variant_per_step_from_the_seed(tmp_path):
    """metadata.jsonl text may be a list: each step draws one variant per sample, the same for the same (seed, step),
    and all of them over many steps."""
    from PIL import Image
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ["one", "two", "three"]}))
    [item] = dopsd.scan_dataset(tmp_path)
    assert item.captions == ("one", "two", "three")
    cache = {"family": "zimage", "order": [0], "files": [["v0", "v1", "v2"]]}
    drawn = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dopsd, "read_entry", lambda path, device: {"s": path})
        draw = lambda micro: dopsd.batch_entries(cache, [0], slice(0, 1), 0, micro, torch.device("cpu"))[0][0]
        drawn = [draw(micro) for micro in range(30)]
        assert drawn == [draw(micro) for micro in range(30)] and set(drawn) == {"v0", "v1", "v2"}


def test_several_folders_with_repeats_and_caption_lists_train(tiny, tmp_path):
    """Two --data folders, one repeated and one captioned by a list, train end to end."""
    from PIL import Image
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (64, 64), "red").save(extra / "r.png")
    (extra / "metadata.jsonl").write_text(json.dumps({"file_name": "r.png", "text": ["a red [V]", "red, [V]"]}))
    args = train_args(tiny, tmp_path / "o", "--max-steps", "2", "--cache-dir", str(tmp_path / "cache"),
                      "--data", str(extra))
    args[args.index("--data") + 1] = f"{tiny['small']}:2"
    assert dopsd.main(args) == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4      # 2 images + 1 image × 2 variants


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """A 3-step D-OPSD run on the mixed-format folder, through main(argv)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "3", data="data")) == 0
    return out


@pytest.fixture(scope="session")
def klein_trained(tiny, tmp_path_factory):
    """A 3-step D-OPSD run on the tiny klein, through main(argv)."""
    out = tmp_path_factory.mktemp("klein") / "out"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "3", model="klein")) == 0
    return out


def test_train_writes_lora_config_log_and_grid(trained):
    """3 steps write the LoRA, config.json (arguments + versions), log.jsonl (one row a step) and a sample grid."""
    cfg = json.loads((trained / "config.json").read_text())
    rows = [json.loads(l) for l in (trained / "log.jsonl").read_text().splitlines()]
    assert cfg["rank"] == 4 and "diffusers" in cfg["versions"]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 and r["grad_norm"] >= 0 for r in rows)
    assert (trained / "samples" / "step_000003.png").is_file()
    assert any(v.abs().sum() > 0 for k, v in lora_weights(trained).items() if "lora_B" in k)


def test_train_reads_metadata_jsonl(tiny, tmp_path):
    """A metadata.jsonl folder trains like a .txt folder."""
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", data="data_jsonl")) == 0
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()


def pipeline_image(tiny, family, lora, dtype, prompt="a red circle in [V] style", seed=5):
    """The diffusers pipeline's own image, 64², uint8-rounded floats, with our LoRA loaded through load_lora_weights."""
    from diffusers import DiffusionPipeline
    import numpy as np
    p = DiffusionPipeline.from_pretrained(tiny[family], dtype=dtype)
    if lora:
        p.load_lora_weights(str(lora))
    image = p(prompt=prompt, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(seed),
              **PIPE_KW[family]).images[0]
    return np.round(np.asarray(image, dtype=np.float64) * 255)


def our_image(tiny, family, lora, path, *extra, prompt="a red circle in [V] style", seed=5):
    import numpy as np
    from PIL import Image
    args = ["sample", "--model", str(tiny[family]), "--prompt", prompt, "--out", str(path), "--seed", str(seed),
            "--height", "64", "--width", "64", *extra] + (["--lora", str(lora)] if lora else [])
    assert dopsd.main(args) == 0
    return np.asarray(Image.open(path)).astype(np.float64)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_lora_loads_in_the_pipeline_and_matches_our_sampler(request, tiny, tmp_path, family):
    """The diffusers pipeline's load_lora_weights(out) loads our LoRA into all 28 LoRA'd linears, it changes the
    image, and the image equals `dopsd.py sample`'s at the family's deploy steps."""
    import numpy as np
    from diffusers import DiffusionPipeline
    out = family_fixture(request, family, "trained", "klein_trained")
    p = DiffusionPipeline.from_pretrained(tiny[family])
    kw = dict(prompt="a red circle in [V] style", height=64, width=64, output_type="np", **PIPE_KW[family])
    base = p(generator=torch.Generator().manual_seed(5), **kw).images[0]
    p.load_lora_weights(str(out))
    assert sum(1 for n, _ in p.transformer.named_parameters() if "lora_A" in n) == 28
    tuned = p(generator=torch.Generator().manual_seed(5), **kw).images[0]
    ours = our_image(tiny, family, out, tmp_path / "s.png")
    assert np.abs(tuned - base).max() > 1e-3                                      # the LoRA does something
    assert np.abs(ours - np.round(tuned * 255)).max() <= 1                        # ±1 grey level (PNG rounding)


def test_sample_writes_a_png_of_the_asked_size(tiny, tmp_path):
    """`sample --height 64 --width 96` writes a 96×64 PNG."""
    from PIL import Image
    out = tmp_path / "a.png"
    assert dopsd.main(["sample", "--model", str(tiny["zimage"]), "--prompt", "x", "--out", str(out),
                       "--height", "64", "--width", "96", "--steps", "2"]) == 0
    assert Image.open(out).size == (96, 64)


def student_names(tiny, family):
    """The adapter_params order that checkpoint.pt's "student" list follows, from a fresh DiT with our adapters."""
    tr = dopsd.load_pipeline(tiny[family], torch.float32).transformer.requires_grad_(False)
    dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS[family], 4, 128.0)
    return list(dopsd.adapter_params(tr, "student"))


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_the_lora_file_holds_the_trained_delta_at_strength_1_with_alpha_equal_to_rank(request, tiny, family):
    """ComfyUI applies B·A at strength 1.0 and reads no metadata; diffusers scales by the metadata's lora_alpha/r. The
    file holds B × alpha/r with lora_alpha = r, so its B·A equals the trained (B·A)·alpha/r of checkpoint.pt in every
    module (these runs train r 4, alpha 128: a factor 32), and it says what it is to LoRA browsers."""
    from safetensors import safe_open
    out = family_fixture(request, family, "trained", "klein_trained")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta, file = f.metadata(), {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    peft_meta = json.loads(meta["lora_adapter_metadata"])
    assert peft_meta["transformer.r"] == peft_meta["transformer.lora_alpha"] == 4
    names = student_names(tiny, family)
    ck = dict(zip(names, torch.load(out / "checkpoint.pt", weights_only=True)["student"]))
    assert set(file) == set(ck)
    for a in (n for n in names if ".lora_A." in n):
        b = a.replace(".lora_A.", ".lora_B.")
        assert_close(file[b] @ file[a], (ck[b] @ ck[a]) * 32, rtol=1e-6, what=a, normwise=True)
    assert any(ck[n].abs().max() > 0 for n in names if ".lora_B." in n)      # a real delta, not zeros
    assert meta["modelspec.architecture"] == dopsd.FAMILIES[family]["arch"] + "/lora"
    assert meta["modelspec.trigger_phrase"] == "[V]" and meta["modelspec.resolution"] == "64x64"
    assert meta["dopsd.base_model"] == tiny[family].name and meta["dopsd.deploy_steps"] in ("8", "4")  # no local path
    assert meta["dopsd.trained_rank_alpha"].startswith("4/128")


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_the_pipeline_with_our_lora_reproduces_the_in_training_student(request, tiny, family):
    """A diffusers pipeline with pipe.load_lora_weights(out) gives, on a fixed input, the velocity the student had in
    training: its adapter restored from checkpoint.pt into attach_roles' student. The LoRA moves it off the base."""
    import contextlib
    out = family_fixture(request, family, "trained", "klein_trained")
    train_pipe = dopsd.load_pipeline(tiny[family], torch.float32)
    tr = train_pipe.transformer.requires_grad_(False)
    student, _, trainable, _ = dopsd.attach_roles(tr, family, True, False, 4, 128.0, 0, contextlib.nullcontext)
    with torch.no_grad():
        for p, v in zip(trainable, torch.load(out / "checkpoint.pt", weights_only=True)["student"]):
            p.copy_(v)
    deploy = dopsd.load_pipeline(tiny[family], torch.float32)
    cond = dopsd.collate(dopsd.student_features(family, deploy.text_encoder, deploy.tokenizer, ["a red circle"]))
    n = 64 // dopsd.latent_cell(family, deploy.vae)
    x, s = torch.randn(1, deploy.transformer.config.in_channels, n, n, generator=torch.Generator().manual_seed(3)), \
        torch.tensor([0.75])
    velocity = dopsd.FAMILIES[family]["velocity"]
    with torch.no_grad():
        base = velocity(deploy.transformer, x, s, cond)
        deploy.load_lora_weights(str(out))
        u_deploy, u_train = velocity(deploy.transformer, x, s, cond), student(tr, x, s, cond)
    assert_close(u_deploy, u_train, rtol=1e-5, what="deployed vs in-training student", normwise=True)
    assert (u_train - base).abs().max() > 100 * (u_deploy - u_train).abs().max()


def test_loss_steps_equal_to_the_rollout_steps_is_the_default_run_exactly(tiny, tmp_path):
    """--loss-steps 2 of --rollout-steps 2 trains the default run's LoRA bit for bit, and logs no trained states."""
    c, d = tmp_path / "c", tmp_path / "d"
    assert dopsd.main(train_args(tiny, c, "--max-steps", "2")) == 0
    assert dopsd.main(train_args(tiny, d, "--max-steps", "2", "--loss-steps", "2")) == 0
    wc, wd = lora_weights(c), lora_weights(d)
    assert all(torch.equal(wc[k], wd[k]) for k in wc)
    assert "trained_states" not in (d / "log.jsonl").read_text()


def test_held_out_prompts_add_grid_columns_and_the_loss_curve_is_drawn(tiny, tmp_path):
    """--sample-prompt (repeatable) and --sample-prompts FILE add columns after the training captions; the teacher,
    which has no image for them, leaves those cells white; loss.png is drawn next to log.jsonl."""
    import numpy as np
    from PIL import Image
    (tmp_path / "p.txt").write_text("a purple star, [V] style\n\n an orange moon \n")
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "2", "--sample-prompt", "a teal cube",
                                 "--sample-prompts", str(tmp_path / "p.txt"))) == 0
    grid = np.asarray(Image.open(tmp_path / "o" / "samples" / "step_000002.png").convert("L"))
    assert grid.shape[1] == 112 + (2 + 3) * 128                  # labels, 2 training images + 3 held out, 128 px each
    teacher = grid[-128:, 112:]
    assert (teacher[:, 2 * 128:] == 255).all() and (teacher[:, : 2 * 128] < 255).any()
    assert Image.open(tmp_path / "o" / "loss.png").size == (480, 200)


def test_preserve_prompts_add_a_second_rollout_to_each_step(tiny, tmp_path, capsys):
    """With --preserve-prompts the same seed trains a different LoRA. At step 1 the student still is the base model,
    so the preserve term, and the loss it adds to the log, is exactly 0; from step 2 on it pulls. With --full, with
    SFT, or with an empty file it is a one-line refusal."""
    (tmp_path / "keep.txt").write_text("a photo of a dog\na bowl of fruit\n")
    (tmp_path / "empty.txt").write_text("\n")
    a, b = tmp_path / "a", tmp_path / "b"
    assert dopsd.main(train_args(tiny, a, "--max-steps", "2")) == 0
    assert dopsd.main(train_args(tiny, b, "--max-steps", "2", "--preserve-prompts", str(tmp_path / "keep.txt"))) == 0
    la, lb = ([json.loads(l)["loss"] for l in (d / "log.jsonl").read_text().splitlines()] for d in (a, b))
    assert lb[0] == la[0] and lb[1] != la[1]
    wa, wb = lora_weights(a), lora_weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    capsys.readouterr()
    for i, extra in enumerate([["--full"], ["--method", "sft"], []]):
        keep = str(tmp_path / ("empty.txt" if not extra else "keep.txt"))
        code = dopsd.main(train_args(tiny, tmp_path / f"r{i}", "--preserve-prompts", keep, *extra))
        assert code == 2 and "--preserve-prompts" in capsys.readouterr().err


def test_sample_compare_draws_the_base_above_the_lora_and_scale_0_is_the_base(tiny, trained, tmp_path):
    """`sample --compare` with two prompts: one grid, base row above the LoRA row, same noise; --lora-scale 0 makes the
    LoRA row the base row, scale 1 moves it."""
    import numpy as np
    from PIL import Image
    rows = {}
    for scale in ("0", "1"):
        path = tmp_path / f"{scale}.png"
        assert dopsd.main(["sample", "--model", str(tiny["zimage"]), "--lora", str(trained), "--prompt", "a red circle",
                           "--prompt", "a blue square in [V] style", "--compare", "--lora-scale", scale, "--out",
                           str(path), "--height", "64", "--width", "64"]) == 0
        g = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert g.shape[1] == 112 + 2 * 128
        rows[scale] = g[-256:-128, 112:], g[-128:, 112:]          # (base, LoRA), each 2 cells of 128 px
    assert (rows["0"][0] == rows["0"][1]).all() and (rows["0"][0] == rows["1"][0]).all()
    assert np.abs(rows["1"][1] - rows["1"][0]).max() > 10


@pytest.mark.parametrize("flag", ["--model", "--vlm"])
def test_an_unreachable_hub_id_fails_at_once_in_one_line(tiny, tmp_path, monkeypatch, capsys, flag):
    """A hub id that is no folder, not cached, with the hub unreachable (here nothing listens on the endpoint) is one
    line naming the flag, the id and the fix, before any model loads: no half-minute retry storm."""
    import time
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    args = train_args(tiny, tmp_path / "o")
    args[args.index(flag) + 1] = "nobody/no-such-model"
    t0 = time.perf_counter()
    code = dopsd.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{flag} nobody/no-such-model" in err[0] and "hf download" in err[0]
    assert time.perf_counter() - t0 < 20


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_sample_with_an_fp8_base_keeps_the_lora_fp32_and_draws_base_and_lora(tiny, trained, tmp_path, monkeypatch):
    """sample --fp8-base on --compare: the DiT is cast after the LoRA is loaded, so the factors stay as diffusers
    loads them into a bf16 pipeline (bf16, not 8 bits), and the grid has the base row (LoRA off) above the LoRA row."""
    seen, real = {}, dopsd.store_base_in_fp8

    def spy(tr, dtype):
        real(tr, dtype)
        seen["lora"] = {p.dtype for n, p in tr.named_parameters() if ".lora_" in n}
        seen["base"] = {p.dtype for n, p in tr.named_parameters() if n.endswith("base_layer.weight")}
    monkeypatch.setattr(dopsd, "store_base_in_fp8", spy)
    out = tmp_path / "grid.png"
    assert dopsd.main(["sample", "--model", str(tiny["zimage"]), "--lora", str(trained), "--prompt", "a red circle",
                       "--out", str(out), "--height", "64", "--width", "64", "--steps", "2", "--compare",
                       "--precision", "bf16", "--fp8-base", "on"]) == 0
    assert seen == {"lora": {torch.bfloat16}, "base": {torch.float8_e4m3fn}} and out.is_file()


def effective(factors):
    """{module: B·A} of read_lora_file's factors (their scale already folded into B)."""
    return {k: (B.double() @ A.double()) for k, (A, B) in factors.items()}


def test_init_lora_with_no_new_step_holds_the_input_loras_effective_weights(tiny, trained, tmp_path):
    """--init-lora, before any step: student, teacher and anchor hold the input LoRA's B·A·scale exactly, at a larger
    --rank too; the file saved from the student is the input's delta; a ComfyUI-style file (diffusion_model. prefix,
    lora_down / lora_up, .alpha) reads as the same delta."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file
    src = dopsd.read_lora_file(trained / "pytorch_lora_weights.safetensors")
    pipe = DiffusionPipeline.from_pretrained(tiny["zimage"])
    tr = pipe.transformer.requires_grad_(False)
    dopsd.attach_roles(tr, "zimage", True, False, 8, 24.0, 0, contextlib.nullcontext, src, anchor=True)
    dopsd.save_lora(tr, type(pipe), "student", dopsd.LORA_TARGETS["zimage"], tmp_path / "s.safetensors", {})
    for name in ("teacher", "anchor"):
        assert all(torch.equal(a, b) for a, b in zip(dopsd.adapter_params(tr, "student").values(),
                                                     dopsd.adapter_params(tr, name).values()))
    want, got = effective(src), effective(dopsd.read_lora_file(tmp_path / "s.safetensors"))
    assert want.keys() == got.keys() and any(v.abs().sum() > 0 for v in want.values())
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, normwise=True, what=k)
    comfy = {}
    for k, (A, B) in src.items():                      # the same delta as rank-4 factors with alpha 2: B · (2 / 4)
        comfy[f"diffusion_model.{k}.lora_down.weight"], comfy[f"diffusion_model.{k}.lora_up.weight"] = A, B * 2
        comfy[f"diffusion_model.{k}.alpha"] = torch.tensor(2.0)
    save_file(comfy, tmp_path / "comfy.safetensors")
    other = effective(dopsd.read_lora_file(tmp_path / "comfy.safetensors"))
    assert all(torch.allclose(other[k], want[k], rtol=1e-6, atol=0) for k in want)


# Other trainers' names for the modules our LoRA covers, per block (comfyui-lora.md §3): {theirs: the diffusers modules
# it covers}; several = one fused linear whose B stacks their rows in that order, under one A.
COMFY_ZIMAGE = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
                "attention.out": ("attention.to_out.0",),
                **{f"feed_forward.w{j}": (f"feed_forward.w{j}",) for j in (1, 2, 3)}}
BFL_DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
              "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
              "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
BFL_SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
# A file's key style: (prefix, what stands for a dot, down factor, up factor)
KEY_STYLES = {"kohya": ("lora_unet_", "_", "lora_down", "lora_up"),
              "comfy": ("diffusion_model.", ".", "lora_A", "lora_B")}


def their_layout(dit, family, names):
    """{module name in the file: the tiny DiT's modules it covers}: names "diffusers" (each module its own), or
    ComfyUI's (Z-Image) / BFL's (klein) names of the tiny models' blocks."""
    if names == "diffusers":
        return {n: (n,) for n, m in dit.named_modules()
                if isinstance(m, torch.nn.Linear) and re.fullmatch(dopsd.LORA_TARGETS[family], n)}
    if family == "zimage":
        return {f"{b}.{k}": tuple(f"{b}.{m}" for m in v) for b in ("layers.0", "layers.1", "noise_refiner.0",
                                                                  "context_refiner.0") for k, v in COMFY_ZIMAGE.items()}
    return {**{f"double_blocks.{i}.{k}": tuple(f"transformer_blocks.{i}.{m}" for m in v)
               for i in (0, 1) for k, v in BFL_DOUBLE.items()},
            **{f"single_blocks.{i}.{k}": tuple(f"single_transformer_blocks.{i}.{m}" for m in v)
               for i in (0, 1) for k, v in BFL_SINGLE.items()}}


def write_their_lora(path, dit, layout, style, alpha, rank=4):
    """A rank-4 LoRA file of random factors in that layout and KEY_STYLES style (.alpha tensors if alpha). Returns the
    delta it means, {diffusers module: B·A·alpha/r}, a fused B's row slice for each of q, k, v."""
    from safetensors.torch import save_file
    prefix, dot, down, up = KEY_STYLES[style]
    mods, g, tensors, want = dict(dit.named_modules()), torch.Generator().manual_seed(0), {}, {}
    for name, covers in layout.items():
        key, outs = prefix + name.replace(".", dot), [mods[m].out_features for m in covers]
        A, B = torch.randn(rank, mods[covers[0]].in_features, generator=g), torch.randn(sum(outs), rank, generator=g)
        tensors[f"{key}.{down}.weight"], tensors[f"{key}.{up}.weight"] = A, B
        if alpha:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        for m, rows in zip(covers, B.split(outs)):
            want[m] = rows.double() @ A.double() * ((alpha or rank) / rank)
    save_file(tensors, path)
    return want


# (id, family, module names, key style, alpha): musubi-tuner's own files (kohya names: Z-Image's diffusers modules,
# klein's BFL ones), ComfyUI's fused Z-Image attention, ai-toolkit's BFL klein file (no alpha), OneTrainer-like kohya
# names of klein's diffusers modules
THEIR_LORAS = [("musubi-zimage", "zimage", "diffusers", "kohya", 8.0),
               ("musubi-klein", "klein", "theirs", "kohya", 2.0),
               ("comfy-fused-qkv-zimage", "zimage", "theirs", "comfy", 16.0),
               ("bfl-klein", "klein", "theirs", "comfy", None),
               ("kohya-diffusers-klein", "klein", "diffusers", "kohya", 4.0)]


@pytest.mark.parametrize("case", THEIR_LORAS, ids=[c[0] for c in THEIR_LORAS])
def test_init_lora_reads_other_trainers_names_into_the_files_effective_weights(tiny, tmp_path, case):
    """--init-lora reads kohya/musubi, ComfyUI and BFL names (the family check too): every adapter holds the file's
    B·A·alpha/r, and the three modules of a fused q|k|v each their row slice of B under the shared A."""
    _, family, names, style, alpha = case
    dit = tiny_dit(tiny, family).requires_grad_(False)
    want = write_their_lora(tmp_path / "l.safetensors", dit, their_layout(dit, family, names), style, alpha)
    assert dopsd.weights_family("lora", tmp_path / "l.safetensors") == family      # what sample --lora checks
    file = dopsd.check_init_lora(tmp_path / "l.safetensors", family, 8, tiny[family])
    dopsd.attach_roles(dit, family, False, False, 8, 24.0, 0, contextlib.nullcontext, dopsd.read_lora_file(file))
    got = {n: m.lora_B["student"].weight.double() @ m.lora_A["student"].weight.double() * (24.0 / 8)
           for n, m in dit.named_modules() if hasattr(m, "lora_A")}
    assert got.keys() == want.keys() and len(want) == 28
    for k in want:
        assert_close(got[k], want[k], rtol=1e-6, normwise=True, what=k)


def test_the_first_preserve_loss_is_exactly_zero_when_the_student_starts_at_the_anchor(tiny, trained, tmp_path,
                                                                                       monkeypatch):
    """With --init-lora, --preserve-prompts pulls onto base + that LoRA: at the first step the student IS the anchor,
    so the preserve roll-out's loss is exactly 0 (onto the bare base, as before, it would not be)."""
    losses, real = [], dopsd.dopsd_rollout

    def rollout(*a, **k):
        out = real(*a, **k)
        losses.append(out[0].item())
        return out
    monkeypatch.setattr(dopsd, "dopsd_rollout", rollout)
    (tmp_path / "keep.txt").write_text("a green square\n")
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", "--init-lora", str(trained),
                                 "--preserve-prompts", str(tmp_path / "keep.txt"))) == 0
    assert len(losses) == 2 and losses[0] > 0 and losses[1] == 0.0


@pytest.fixture(scope="session")
def strong_init(trained, tmp_path_factory):
    """The `trained` run's LoRA with lora_B × 30: an --init-lora whose change of the tiny model's images is plain."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src, path = trained / "pytorch_lora_weights.safetensors", tmp_path_factory.mktemp("init") / "pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file({k: v * 30 if ".lora_B." in k else v for k, v in lora_weights(trained).items()}, path, metadata=meta)
    return path


def test_with_init_lora_the_grids_first_row_is_the_start_model(tiny, strong_init, tmp_path, monkeypatch):
    """With --init-lora the grid's first row is the model the run starts from, base + that LoRA, labelled "start":
    its first cell is `sample --lora` of the init LoRA on the same caption and seed (±1 grey level), not the base."""
    import numpy as np
    grids = []
    monkeypatch.setattr(dopsd, "save_grid", lambda rows, captions, path: grids.append((rows, captions)))
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", "--init-lora", str(strong_init))) == 0
    (label, images), caption = grids[0][0][0], grids[0][1][0]
    assert label.startswith("start")
    first = np.asarray(images[0]).astype(np.float64)
    assert np.abs(first - our_image(tiny, "zimage", strong_init, tmp_path / "s.png", prompt=caption, seed=0)).max() <= 1
    assert np.abs(first - our_image(tiny, "zimage", None, tmp_path / "b.png", prompt=caption, seed=0)).max() > 10


def test_the_preserve_rollout_pulls_onto_the_start_model_while_the_teacher_moves(tiny, strong_init, tmp_path,
                                                                                 monkeypatch):
    """--preserve-prompts' target stays the model the run started from (base + --init-lora): with --ema-decay 0 the
    EMA teacher becomes the student after step 1, yet the preserve roll-out's target velocity at a fixed state is the
    same at step 2 as at step 1."""
    targets, real = [], dopsd.dopsd_rollout

    def rollout(student, teacher, noise, sigmas, *a, **k):
        x = torch.randn(1, noise.shape[1], 8, 8, generator=torch.Generator().manual_seed(0))    # a fixed state
        with torch.no_grad():
            targets.append(teacher(x, sigmas[:1].expand(len(x))))
        return real(student, teacher, noise, sigmas, *a, **k)
    monkeypatch.setattr(dopsd, "dopsd_rollout", rollout)
    (tmp_path / "keep.txt").write_text("a green square\n")
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "2", "--ema-decay", "0", "--init-lora",
                                 str(strong_init), "--preserve-prompts", str(tmp_path / "keep.txt"))) == 0
    main, keep = targets[0::2], targets[1::2]                  # per step: the main roll-out, then the preserve one
    assert len(keep) == 2 and torch.equal(keep[0], keep[1])
    ck = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(t, s) for t, s in zip(ck["teacher"], ck["student"]))       # μ = 0: teacher = student,
    start = lora_weights(strong_init.parent)
    assert any(not torch.equal(v, start[k]) for k, v in lora_weights(tmp_path / "o").items())   # which has moved


def test_every_optimizer_step_takes_the_gradient_clipped_to_norm_1(tiny, tmp_path):
    """The student's gradient is clipped to norm 1 before AdamW steps; log.jsonl records the norm before clipping."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    seen = []

    def hook(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
    handle = register_optimizer_step_pre_hook(hook)
    try:
        assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "2", "--loss-space", "v")) == 0
    finally:
        handle.remove()
    logged = [json.loads(l)["grad_norm"] for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert min(logged) > 2 and len(seen) == 2                  # the raw gradient is well over the cap here
    assert all(abs(n - 1.0) < 1e-4 for n in seen), seen


def test_the_sft_baseline_trains_klein_on_its_vae_latents(tiny, tmp_path):
    """--method sft runs on klein too (its normalised VAE latents as targets) and writes a LoRA."""
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "2", "--method", "sft", model="klein")) == 0
    assert (tmp_path / "o" / "pytorch_lora_weights.safetensors").is_file()


# --- the teacher check: will D-OPSD teach this data? ------------------------------------------------------------------
# The verdict's rule on hand-made numbers; then `check` and `train`'s check before step 1 through main(argv). The toy's
# verdicts on real concepts (teachable, already known, not teachable) are examples/toy/test_toy.py's.

def check_rows(*rows):
    """Per-image rows of score_checks from (student distance, teacher distance, student distance / the set's spread)."""
    return [{"d_student": s, "d_teacher": t, "gain": s / t, "near": n} for s, t, n in rows]


def test_the_check_says_teachable_when_the_teacher_is_clearly_closer_to_the_images():
    """Median gain (student distance / teacher distance) at CHECK_GAIN or more: teachable, however far the student."""
    g = dopsd.CHECK_GAIN
    rows = check_rows((0.2 * g * 1.01, 0.2, 3.0), (0.1 * g * 1.5, 0.1, 0.5), (0.1, 0.2, 9.0))
    assert dopsd.check_verdict(rows)["verdict"] == "teachable"
    assert dopsd.check_verdict(check_rows((0.2 * g * 0.99, 0.2, 3.0)))["verdict"] != "teachable"


def test_the_check_says_already_known_when_the_student_is_as_close_as_the_sets_own_spread():
    """Gain under CHECK_GAIN and the student within CHECK_NEAR × the set's own spread: already known."""
    n = dopsd.CHECK_NEAR
    assert dopsd.check_verdict(check_rows((0.2, 0.2, n), (0.2, 0.21, 0.5 * n)))["verdict"] == "already known"


def test_the_check_says_not_teachable_when_the_teacher_is_no_closer_and_the_student_is_far():
    """Gain under CHECK_GAIN and the student further than CHECK_NEAR × the set's spread: not teachable."""
    n = dopsd.CHECK_NEAR
    summary = dopsd.check_verdict(check_rows((0.3, 0.29, 2 * n), (0.3, 0.3, 1.1 * n), (0.5, 0.4, 3 * n)))
    assert summary["verdict"] == "not teachable" and summary["images"] == 3 and summary["near"] == 2 * n


def test_the_check_is_undecided_without_a_spread_to_compare_when_the_teacher_is_no_closer():
    """One image, or copies of one image (no spread: near is None): under CHECK_GAIN the verdict is undecided."""
    assert dopsd.check_verdict(check_rows((0.2, 0.2, None)))["verdict"].startswith("undecided")


def test_look_distance_ignores_where_things_are_and_sees_what_they_look_like():
    """The check's measure: an image shifted by a quarter of its width is nearer to itself than an image of other
    colours and textures is, while per pixel it is further; and the same image at another resolution is ~0 away."""
    from PIL import Image
    import numpy as np
    stripes = lambda c: Image.fromarray((torch.tensor(c).view(1, 1, 3) * ((torch.arange(128) // 8 % 2).view(
        1, 128, 1).expand(128, 128, 1))).to(torch.uint8).numpy())
    a, other = stripes([200, 40, 40]), stripes([40, 200, 40]).rotate(90)
    shifted = Image.fromarray(np.asarray(a)[:, list(range(36, 128)) + list(range(36))])
    pix = lambda x, y: np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float)).mean()
    assert pix(a, shifted) > pix(a, other) * 0.5 and dopsd.look_distance(a, shifted) < dopsd.look_distance(a, other) / 4
    assert dopsd.look_distance(a, a.resize((256, 256), Image.Resampling.NEAREST)) < 0.05 * dopsd.look_distance(a, other)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_check_prints_one_line_per_image_worst_first_and_writes_json_and_grid(tiny, tmp_path, capsys, family,
                                                                             monkeypatch):
    """`check` on the tiny models: a line per image in rising gain, the verdict line, check.json with every image's
    distances, and check.png with the rows image, student and teacher."""
    grids, real = [], dopsd.save_grid
    monkeypatch.setattr(dopsd, "save_grid", lambda rows, *a: grids.append([r[0] for r in rows]) or real(rows, *a))
    out = tmp_path / "c"
    assert dopsd.main(["check", "--data", str(tiny["small"]), "--model", str(tiny[family]), "--vlm", str(tiny["vlm"]),
                       "--resolution", "64", "--out", str(out)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  gain")]
    gains = [float(l.split()[1]) for l in lines]
    report = json.loads((out / "check.json").read_text())
    assert len(lines) == 2 and gains == sorted(gains) and report["images"] == 2 and len(report["per_image"]) == 2
    assert report["verdict"] in ("teachable", "already known", "not teachable")
    assert all(r["d_student"] > 0 and r["d_teacher"] > 0 for r in report["per_image"])
    assert grids == [["image", "student", "teacher"]] and (out / "check.png").is_file()


def test_check_with_init_lora_also_measures_the_bare_bases_teacher(tiny, strong_init, tmp_path, capsys):
    """With --init-lora the start is base + that LoRA, and a fourth row measures the bare base's teacher, which
    differs from the start's."""
    out = tmp_path / "c"
    assert dopsd.main(["check", "--data", str(tiny["small"]), "--model", str(tiny["zimage"]), "--vlm",
                       str(tiny["vlm"]), "--resolution", "64", "--out", str(out), "--init-lora", str(strong_init),
                       "--check-images", "1"]) == 0
    rows = json.loads((out / "check.json").read_text())["per_image"]
    assert len(rows) == 1 and rows[0]["d_base_teacher"] != rows[0]["d_teacher"]
    assert "base teacher" in capsys.readouterr().out


def test_train_prints_the_check_before_step_1_and_logs_it_with_step_1(tiny, tmp_path, capsys):
    """train runs the teacher check on --check-images images before its first step: the verdict is printed before
    training starts and stored in log.jsonl's first row only; --resume does not check again."""
    out = tmp_path / "o"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "2", "--check-images", "2")) == 0
    printed = capsys.readouterr().out
    assert printed.index("teacher check:") < printed.index("done:")
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["check"]["images"] == 2 and "check" not in rows[1]
    assert dopsd.main(train_args(tiny, out, "--max-steps", "3", "--check-images", "2", "--resume")) == 0
    assert "teacher check:" not in capsys.readouterr().out


def test_teacher_start_base_starts_the_ema_teacher_at_the_bare_base_and_resumes_bit_exactly(tiny, strong_init,
                                                                                              tmp_path):
    """--init-lora with --teacher-start base: the student starts at the LoRA, the teacher at the bare base (B = 0);
    1 step + --resume to 2 equal 2 straight steps."""
    flags = ("--init-lora", str(strong_init), "--teacher-start", "base", "--ema-decay", "1.0")
    a = resumed_equals_straight(tiny, tmp_path, 1, 2, *flags)
    ck = torch.load(a / "checkpoint.pt", weights_only=True)
    names = list(dopsd.read_lora_file(strong_init))
    assert len(ck["teacher"]) == 2 * len(names) and all(not t[..., :4].any() for t in ck["teacher"][1::2])


def test_teacher_start_auto_takes_the_start_whose_teacher_copies_the_images_closer(tiny, strong_init, tmp_path,
                                                                                    capsys):
    """--teacher-start auto prints both teachers' distances, takes the closer one's start, and logs the choice."""
    out = tmp_path / "o"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "1", "--ema-decay", "1.0", "--init-lora",
                                 str(strong_init), "--teacher-start", "auto", "--check-images", "2")) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("--teacher-start auto:"))
    start, init_d, base_d = re.fullmatch(r"--teacher-start auto: (\w+) .* ([\d.]+) from the start LoRA, ([\d.]+) from "
                                         r"the bare base\)", line).groups()
    assert start == ("base" if float(base_d) < float(init_d) else "init")
    teacher_b = torch.load(out / "checkpoint.pt", weights_only=True)["teacher"][1::2]
    assert all(not t.any() for t in teacher_b) == (start == "base")
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["check"]["teacher_start"] == start


# --- --resume: one test per claim -------------------------------------------------------------------------------------
# Each claim runs the same check, resumed_equals_straight; the sharded --full resume is in the FSDP2 part below.

def resumed_equals_straight(tiny, tmp_path, stop, end, *flags, model="zimage"):
    """The interrupted-vs-uninterrupted check every resume claim makes: `end` straight steps into a/, and `stop` steps
    then --resume to `end` into b/, with the same flags, end with the same LoRA file and the same EMA teacher in
    checkpoint.pt, bit for bit. Returns a/."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert dopsd.main(train_args(tiny, a, "--max-steps", str(end), *flags, model=model)) == 0
    assert dopsd.main(train_args(tiny, b, "--max-steps", str(stop), *flags, model=model)) == 0
    assert dopsd.main(train_args(tiny, b, "--max-steps", str(end), "--resume", *flags, model=model)) == 0
    wa, wb = lora_weights(a), lora_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (torch.load(d / "checkpoint.pt", weights_only=True)["teacher"] for d in (a, b))
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))     # the EMA teacher too
    return a


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    """The default path (fp32, LoRA): 2 steps + --resume to 4 give exactly the LoRA and teacher of 4 straight steps."""
    resumed_equals_straight(tiny, tmp_path, 2, 4)


def test_a_loss_steps_run_resumes_bit_exactly_and_logs_the_states_it_trained(tiny, tmp_path):
    """--rollout-steps 4 --loss-steps 1: the trained state is drawn from the step's seed, so 2 steps + --resume to 3
    equal 3 straight steps; log.jsonl names the one state trained at each step."""
    a = resumed_equals_straight(tiny, tmp_path, 2, 3, "--rollout-steps", "4", "--loss-steps", "1")
    rows = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["trained_states"]) == 1 and len(r["trained_states"][0]) == 1 for r in rows)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_bf16_checkpointed_run_resumes_bit_exactly_and_its_lora_loads_in_the_pipeline(tiny, tmp_path, family):
    """The accelerator path on CPU (bf16 weights, fp32 LoRA, bf16 autocast, gradient checkpointing): 2 steps + resume
    to 3 equal 3 straight steps bit for bit; `sample --precision bf16` with the LoRA matches the bf16 pipeline with
    load_lora_weights, and the LoRA changes the image."""
    import numpy as np
    a = resumed_equals_straight(tiny, tmp_path, 2, 3, "--precision", "bf16", "--grad-checkpointing", "on",
                                model=family)
    assert all(v.dtype == torch.float32 for v in lora_weights(a).values())      # the factors stayed fp32
    rows = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    ours = our_image(tiny, family, a, tmp_path / "s.png", "--precision", "bf16")
    theirs, exact = (pipeline_image(tiny, family, a, dtype) for dtype in (torch.bfloat16, torch.float32))
    assert np.abs(theirs - pipeline_image(tiny, family, None, torch.bfloat16)).max() > 20     # the LoRA is in
    # bf16 itself moves these tiny random-weight images by a few grey levels (klein: up to ~30 at a pixel), so the
    # bar is diffusers' own bf16 error: our bf16 sampler must land as close to the fp32 image as the bf16 pipeline.
    err_ours, err_pipe = np.abs(ours - exact).mean(), np.abs(theirs - exact).mean()
    assert err_ours <= 1.25 * err_pipe + 0.1, (err_ours, err_pipe)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_an_fp8_base_run_resumes_bit_exactly_and_its_lora_loads_on_a_bf16_base(tiny, tmp_path, family, capsys):
    """--fp8-base on (bf16 compute, CPU): 1 step + resume to 2 equal 2 straight steps bit for bit, the factors are
    fp32, and the LoRA loads in the bf16 diffusers pipeline, where it changes the image."""
    import numpy as np
    a = resumed_equals_straight(tiny, tmp_path, 1, 2, "--precision", "bf16", "--fp8-base", "on", model=family)
    assert capsys.readouterr().out.count("base weights: float8 e4m3") == 3                 # each of the three runs
    wa = lora_weights(a)
    assert all(v.dtype == torch.float32 for v in wa.values()) and any(v.abs().sum() > 0 for v in wa.values())
    base, with_lora = (pipeline_image(tiny, family, lora, torch.bfloat16) for lora in (None, a))
    assert np.abs(with_lora - base).max() > 0


def test_a_continued_run_resumes_bit_exactly(tiny, trained, tmp_path):
    """A run continued from --init-lora, with --preserve-prompts (whose anchor is base + that LoRA): 1 step + --resume
    to 2 equal 2 straight steps, bit for bit."""
    (tmp_path / "keep.txt").write_text("a green square\n")
    resumed_equals_straight(tiny, tmp_path, 1, 2, "--init-lora", str(trained), "--preserve-prompts",
                            str(tmp_path / "keep.txt"))


def test_resume_refuses_an_init_lora_file_whose_content_changed(tiny, trained, strong_init, tmp_path, capsys):
    """--resume checks the --init-lora file by content: the same path holding other weights (the LoRA was retrained
    since) is refused in one line naming both sha256s, before any model loads."""
    init = tmp_path / "init.safetensors"
    shutil.copy(strong_init, init)
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", "--init-lora", str(init))) == 0
    shutil.copy(trained / "pytorch_lora_weights.safetensors", init)                     # retrained in place
    capsys.readouterr()
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "2", "--resume", "--init-lora", str(init))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--init-lora" in err and err.count("sha256") == 2, err


def test_resume_accepts_the_same_init_lora_at_another_path(tiny, strong_init, tmp_path):
    """The start is the file's content, not its path: the same LoRA copied elsewhere resumes."""
    shutil.copy(strong_init, tmp_path / "moved.safetensors")
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", "--init-lora", str(strong_init))) == 0
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "2", "--resume", "--init-lora",
                                 str(tmp_path / "moved.safetensors"))) == 0


def test_a_relative_init_lora_is_resolved_when_the_run_starts(tiny, strong_init, tmp_path, monkeypatch):
    """--init-lora init.safetensors, relative to the folder the run starts in, is recorded as an absolute path."""
    (tmp_path / "w").mkdir()
    shutil.copy(strong_init, tmp_path / "w" / "init.safetensors")
    monkeypatch.chdir(tmp_path / "w")
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", "--init-lora", "init.safetensors")) == 0
    recorded = json.loads((tmp_path / "o" / "config.json").read_text())["init_lora"]
    assert Path(recorded).is_absolute() and Path(recorded) == tmp_path / "w" / "init.safetensors"


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_resume_keeps_the_fp8_base_the_run_chose_and_refuses_another(tiny, tmp_path, capsys):
    """--fp8-base is decided once: a --resume with auto (on a card where auto would decide otherwise: here a CPU,
    where auto is off) keeps the float8 base, so 1 step + resume equals 2 straight steps; an explicit
    --fp8-base off is one line, before any model loads."""
    flags = ("--precision", "bf16", "--fp8-base", "on")
    a, b = tmp_path / "a", tmp_path / "b"
    assert dopsd.main(train_args(tiny, a, "--max-steps", "2", *flags)) == 0
    assert dopsd.main(train_args(tiny, b, "--max-steps", "1", *flags)) == 0
    capsys.readouterr()
    assert dopsd.main(train_args(tiny, b, "--max-steps", "2", "--resume", "--precision", "bf16", "--fp8-base",
                                 "off")) == 2
    assert "--fp8-base on" in capsys.readouterr().err
    assert dopsd.main(train_args(tiny, b, "--max-steps", "2", "--resume", "--precision", "bf16")) == 0
    assert "base weights: float8" in capsys.readouterr().out
    wa, wb = lora_weights(a), lora_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_trains_at_the_learning_rate_it_is_given(tiny, tmp_path):
    """--resume with another --lr trains (and logs) at that lr: the optimizer state does not bring the old one back."""
    out = tmp_path / "o"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "1")) == 0
    args = train_args(tiny, out, "--max-steps", "2", "--resume")
    args[args.index("--lr") + 1] = "5e-4"
    assert dopsd.main(args) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {g["lr"] for g in ck["optimizer"]["param_groups"]} == {5e-4}
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["lr"] == 5e-4


# --- what a run does when something goes wrong ------------------------------------------------------------------------

def test_non_finite_losses_are_skipped_then_stop_the_run(tiny, tmp_path, monkeypatch, capsys):
    """A NaN loss skips the step (weights untouched); 5 in a row stop the run with code 1, saving only finite weights."""
    real = dopsd.dopsd_loss
    monkeypatch.setattr(dopsd, "dopsd_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    code = dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "20"))
    assert code == 1 and "not finite" in capsys.readouterr().err
    rows = [json.loads(l) for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == dopsd.MAX_NONFINITE_STREAK and all(r["skipped"] for r in rows)
    w = lora_weights(tmp_path / "o")
    assert all(torch.isfinite(v).all() for v in w.values())
    assert all(v.abs().sum() == 0 for k, v in w.items() if "lora_B" in k)         # no update was applied


def test_ctrl_c_finishes_the_step_saves_and_exits_cleanly(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 2 finishes that step, saves a checkpoint at step 2 and returns 130 (no traceback)."""
    import signal
    real, calls = dopsd.ema_update, []

    def ema_then_ctrl_c(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)                 # a real SIGINT, as from the keyboard
        real(*a)
    monkeypatch.setattr(dopsd, "ema_update", ema_then_ctrl_c)
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "5")) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert len((tmp_path / "o" / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("target", ["checkpoint", "lora"])
def test_a_disk_that_fills_during_a_save_keeps_the_previous_files(tiny, tmp_path, monkeypatch, capsys, target):
    """The step-2 save fails with ENOSPC half-way through writing checkpoint.pt (or the LoRA): the step-1 file stays
    byte for byte, no partial file is left, and the run ends with exit 1 in one line naming what is intact."""
    import safetensors.torch
    out, kept = tmp_path / "o", {}
    lora = out / "pytorch_lora_weights.safetensors"
    # The write that fails: the first write of checkpoint.pt (or into the LoRA's temp folder) once one exists.
    owner, attr, marker, done = ((torch, "save", "checkpoint.pt.tmp", out / "checkpoint.pt") if target == "checkpoint"
                                 else (safetensors.torch, "save_file", "pytorch_lora_weights.safetensors.d", lora))
    real = getattr(owner, attr)

    def fills_up(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if marker in name and done.is_file() and not kept:
            kept.update({p.name: p.read_bytes() for p in (out / "checkpoint.pt", lora)})
            (open(name, "wb") if isinstance(f, (str, Path)) else f).write(b"partial")   # half a file, then ENOSPC
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(owner, attr, fills_up)
    code = dopsd.main(train_args(tiny, out, "--max-steps", "3", "--save-every", "1"))
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err and "No space left on device" in line and "intact" in line, err
    assert kept and not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".d", "with_card"))]
    if target == "checkpoint":                       # nothing of step 2 was written
        assert (out / "checkpoint.pt").read_bytes() == kept["checkpoint.pt"] and lora.read_bytes() == kept[lora.name]
        assert "the previous checkpoint (step 1) there is intact" in line
    else:                                            # checkpoint.pt is at step 2, the LoRA still at step 1
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
        assert lora.read_bytes() == kept[lora.name] and "--resume" in line


class Killed(BaseException):
    """The process killed at that point: nothing catches it, and nothing after it runs."""


def kill_at(monkeypatch, out, n):
    """From now on, the n-th rename or deletion of a folder out/checkpoint* (0-based) raises Killed: a
    rename before it happens (it is atomic), a deletion after removing every file but meta.json (killed part-way
    through ~100 GB of shards). Returns the list of (operation, folder name) done so far, to count them."""
    real_replace, real_rmtree, done = os.replace, shutil.rmtree, []

    def counts(op, path):
        if Path(path).parent != Path(out) or not Path(path).name.startswith("checkpoint"):
            return False
        done.append((op, Path(path).name))
        return len(done) - 1 == n

    def replace(src, dst):
        if counts("rename", src):
            raise Killed
        real_replace(src, dst)

    def rmtree(path, *a, **k):
        if counts("delete", path):
            for f in Path(path).rglob("*"):
                if f.is_file() and f.name != "meta.json":
                    f.unlink()
            raise Killed
        real_rmtree(path, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return done


def folder_bytes(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(Path(folder).rglob("*")) if f.is_file()}


@pytest.mark.parametrize("start", [("checkpoint",), ("checkpoint.old",), ("checkpoint", "checkpoint.old")])
def test_a_swap_killed_at_any_step_leaves_a_complete_checkpoint_that_the_next_save_replaces(tmp_path, monkeypatch,
                                                                                            start):
    """Whatever a save left (checkpoint/, or only checkpoint.old/ after a kill between the renames, or both), a kill
    at any rename or deletion of swap_in leaves find_checkpoint a complete folder of the step before or the new one,
    and the next save swaps in cleanly."""
    def shards(folder, step):                        # meta.json last, as save_full_run writes it
        folder.mkdir()
        for i in range(3):
            (folder / f"__{i}_0.distcp").write_bytes(bytes([step, i]) * 1000)
        (folder / "meta.json").write_text(json.dumps({"step": step}))
        return folder_bytes(folder)
    complete, through = {}, False
    for n in range(20):                              # killed at its n-th step, until a swap runs through
        out = tmp_path / str(n)
        out.mkdir()
        for i, name in enumerate(start):             # the first is the newest
            complete[len(start) - i] = shards(out / name, len(start) - i)
        complete[3] = shards(out / "checkpoint.tmp", 3)
        with monkeypatch.context() as m, contextlib.suppress(Killed):
            done = kill_at(m, out, n)
            dopsd.swap_in(out / "checkpoint.tmp", out / "checkpoint")
            through = True
        found = dopsd.find_checkpoint(out, True)
        assert found is not None, f"killed at {done[-1:]}: no checkpoint"
        step = json.loads((found / "meta.json").read_text())["step"]
        assert step in (len(start), 3) and folder_bytes(found) == complete[step], f"killed at {done[-1:]}: {found}"
        shutil.rmtree(out / "checkpoint.tmp", ignore_errors=True)      # the next save, not killed
        after = shards(out / "checkpoint.tmp", 4)
        dopsd.swap_in(out / "checkpoint.tmp", out / "checkpoint")
        assert [p.name for p in out.iterdir()] == ["checkpoint"] and folder_bytes(out / "checkpoint") == after
        if through:
            break
    assert through and n >= 2


def test_a_full_save_killed_anywhere_after_a_kill_between_its_renames_leaves_a_checkpoint_that_resume_loads(
        tiny, tmp_path, monkeypatch, capsys):
    """A --full run whose save died between the renames has only checkpoint.old/; its next save, killed at any
    deletion or rename of its checkpoint (the deletion of checkpoint.old/ included), leaves one that --resume loads."""
    first = tmp_path / "first"
    assert dopsd.main(train_args(tiny, first, "--full", "--max-steps", "1")) == 0
    os.replace(first / "checkpoint", first / "checkpoint.old")
    for n in range(20):                              # killed at the n-th step of the step-2 save, until it runs through
        out = tmp_path / str(n)
        shutil.copytree(first, out)
        with monkeypatch.context() as m:
            done = kill_at(m, out, n)
            with contextlib.suppress(Killed):
                assert dopsd.main(train_args(tiny, out, "--full", "--max-steps", "2", "--resume")) == 0
                break
        capsys.readouterr()
        assert dopsd.main(train_args(tiny, out, "--full", "--max-steps", "2", "--resume")) == 0, done
        assert "resumed from" in capsys.readouterr().out
    assert n >= 3 and any(op == "delete" and name.startswith("checkpoint.old") for op, name in done)


def test_backward_runs_outside_autocast(tiny, tmp_path, monkeypatch):
    """With bf16 autocast on, the roll-out (and so every backward in it) starts outside any autocast region: autocast
    wraps each forward only, as PyTorch advises."""
    real, seen = dopsd.dopsd_rollout, []

    def rollout(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*a, **k)
    monkeypatch.setattr(dopsd, "dopsd_rollout", rollout)
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "1", "--precision", "bf16")) == 0
    assert seen == [False]


def test_zero_student_gradient_at_the_first_step_stops_the_run(tiny, tmp_path, monkeypatch, capsys):
    """A first step whose student gradient is exactly 0 (an adapter switched away before backward) stops with code 1
    and a clear line, instead of training nothing for hours."""
    monkeypatch.setattr(dopsd, "dopsd_rollout", lambda student, teacher, noise, *a, **k: (torch.tensor(0.1), noise))
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "3")) == 1
    assert "gradient is exactly 0 at the first step" in capsys.readouterr().err


def test_learning_rate_defaults_to_the_familys_recipe(tiny, tmp_path, capsys):
    """Without --lr, klein trains at the authors' 2e-5 (Z-Image: 1e-4); the value is printed and recorded."""
    args = [a for a in train_args(tiny, tmp_path / "o", "--max-steps", "1", model="klein") if a != "1e-3"]
    assert dopsd.main([a for a in args if a != "--lr"]) == 0
    assert "lr: 2e-05 (the klein default" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["lr"] == 2e-5
    assert dopsd.DEFAULT_LR["zimage"] == 1e-4


@pytest.mark.parametrize("family,what", [("zimage", "teacher context"), ("klein", "teacher text")])
def test_too_long_teacher_context_warns_and_names_the_file(tiny, tmp_path, capsys, family, what):
    """A caption long enough that the teacher's context is cut (Z-Image: the VLM turn past 1024 tokens; klein:
    caption + instruction past the text length) warns once, naming the image."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "long.png").write_bytes((tiny["small"] / "rgba.png").read_bytes())
    (data / "long.txt").write_text(" ".join(["a red circle on a blue square"] * (140 if family == "zimage" else 13)))
    (data / "short.png").write_bytes((tiny["small"] / "rgba.png").read_bytes())
    (data / "short.txt").write_text("a red circle")
    args = train_args(tiny, tmp_path / "o", "--max-steps", "1", model=family)
    args[args.index("--data") + 1] = str(data)
    assert dopsd.main(args) == 0
    warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning:") and what in l]
    assert len(warnings) == 1 and "long.png" in warnings[0] and "short.png" not in warnings[0]


def test_encoders_run_only_while_building_the_cache(tiny, tmp_path, monkeypatch):
    """The text encoder and the VLM run before the loop, never inside it: the VLM once per (image, caption), the text
    encoder once per batch of captions; a second run on the same cache runs neither."""
    calls = {"text": 0, "vlm": 0}
    real_text, real_vlm = dopsd.zimage_text_features, dopsd.vlm_features

    def text(*a, **k):
        calls["text"] += 1
        return real_text(*a, **k)

    def vlm(*a, **k):
        calls["vlm"] += 1
        return real_vlm(*a, **k)
    monkeypatch.setattr(dopsd, "zimage_text_features", text)
    monkeypatch.setattr(dopsd, "vlm_features", vlm)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert dopsd.main(train_args(tiny, tmp_path / "o", "--max-steps", "4", *cache)) == 0
    assert calls == {"text": 2, "vlm": 2}     # 2 images of 2 aspect ratios: one caption batch per bucket; 4 steps
    assert dopsd.main(train_args(tiny, tmp_path / "o2", "--max-steps", "4", *cache)) == 0
    assert calls == {"text": 2, "vlm": 2}


def run_bounded(cmd, timeout):
    """Run cmd; past `timeout` s kill it and every process below it (no orphaned rank survives), and fail."""
    soak = _load_example("ddp_soak.py")
    code, out, err, _ = soak.finish(soak.start(cmd), timeout)
    if code is None:
        pytest.fail(f"{cmd[:6]} did not end within {timeout} s; it and its ranks were killed\n{err[-3000:]}")
    return code, out, err


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            str(ROOT / "dopsd.py"), "train", *args]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tiny, tmp_path):
    """torchrun with 2 CPU ranks × batch 1 ends (bounded) with identical weights on both ranks, equal to 1 process ×
    batch 2; the two ranks split the encoding of a fresh feature cache."""
    args = train_args(tiny, tmp_path / "ddp", "--max-steps", "2", "--batch-size", "1", "--cache-dir",
                      str(tmp_path / "cache"))[1:]
    code, out, err = run_bounded(torchrun(2, *args), 120)             # a hang here used to last for ever
    assert code == 0, err[-3000:]
    assert "ranks in sync: 2 ranks" in out and "distributed: 2 processes, gloo" in out
    assert "rank 0: encoding 1 of the 2 missing" in err and "rank 1: encoding 1 of the 2 missing" in err
    assert dopsd.main(train_args(tiny, tmp_path / "one", "--max-steps", "2", "--batch-size", "2")) == 0
    a, b = lora_weights(tmp_path / "ddp"), lora_weights(tmp_path / "one")
    for k in a:   # normwise: AdamW turns a last-bit difference of a near-zero gradient into up to 2·lr on one element
        assert_close(a[k], b[k], rtol=1e-3, normwise=True, what=k)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_ddp_keeps_gradients_in_its_buckets_and_skips_frozen_weights(two_role_dit):
    """wrap_ddp: gradients are views into DDP's all-reduce buckets (no second copy), and only the trainable student
    adapter is registered and broadcast, not the frozen base DiT or the teacher (a one-rank gloo group)."""
    import torch.distributed as dist
    tr, student, teacher = two_role_dit
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = dopsd.wrap_ddp(tr, torch.device("cpu"))
        frozen = {n for n, p in tr.named_parameters() if not p.requires_grad}
        assert ddp.gradient_as_bucket_view and set(ddp.parameters_to_ignore) == frozen
        assert any(".teacher." in n for n in frozen) and any("lora" not in n for n in frozen)
        assert {id(p) for p in ddp._module_parameters} == {id(p) for n, p in tr.named_parameters() if n not in frozen}
        del ddp
    finally:
        dist.destroy_process_group()


# --- --full under torchrun: FSDP2 -------------------------------------------------------------------------------------

KILL_IN_SAVE = '''"""dopsd.py, with rank 1 SIGKILLed right after writing its shards of the 2nd --full checkpoint (not yet complete)."""
import os, runpy, signal, sys
from torch.distributed.checkpoint import filesystem
real, calls = filesystem.FileSystemWriter.write_data, [0]
def write_data(self, plan, planner):
    done = real(self, plan, planner)
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == 2:
        done.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return done
filesystem.FileSystemWriter.write_data = write_data
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def full_args(tiny, out, family, *extra):
    return train_args(tiny, out, "--full", "--max-steps", "3", *extra, model=family)[1:]


def full_checkpoint(out):
    """A --full run's checkpoint/ as plain tensors: {"student": {name: t}, "teacher": ..., "optimizer": ...}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(Path(out) / "checkpoint", Path(out) / "ck.pt")
    return torch.load(Path(out) / "ck.pt", weights_only=False)


def assert_same_training(a, b):
    """Two --full checkpoints of the same global batch: the EMA teacher within 1e-5 per element; the student within
    1e-5 per element except where AdamW turned a last-bit difference of a near-zero gradient into up to 2·lr (at most
    1 element in 10,000); AdamW's first moment (the averaged gradient, whose scale AdamW's update hides) within
    its largest entry × 1e-4: a wrong reduction (a sum for a mean) would be off by 1/2)."""
    for k in a["teacher"]:
        assert_close(a["teacher"][k], b["teacher"][k], atol=1e-5, what=f"teacher {k}")
    off = sum(int(((a["student"][k] - b["student"][k]).abs() > 1e-5).sum()) for k in a["student"])
    assert off <= sum(v.numel() for v in a["student"].values()) // 10_000, f"{off} student elements differ"
    for k, s in a["optimizer"]["state"].items():
        assert_close(s["exp_avg"], b["optimizer"]["state"][k]["exp_avg"], rtol=1e-4, normwise=True, what=k)


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_a_sharded_dit_gathers_linears_in_bf16_and_norms_and_pad_tokens_in_fp32(tiny, family):
    """Sharded for bf16, the DiT's gathered weights are what one process computes with under autocast: each linear's
    weight and bias in bf16, every other parameter (norm weights, pad tokens) in fp32 (a 1-rank gloo group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    dit = tiny_dit(tiny, family)
    linear = {f"{n}.{k}" for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) for k, _ in
              m.named_parameters()}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dopsd.shard_dit(dit, init_device_mesh("cpu", (1,)), torch.bfloat16)
        for m in dit.modules():
            if isinstance(m, FSDPModule):
                m.unshard()                          # what a forward gathers: the parameters become those copies
        gathered = {n: p.dtype for n, p in dit.named_parameters()}
    finally:
        dist.destroy_process_group()
    wrong = {n: dt for n, dt in gathered.items() if dt != (torch.bfloat16 if n in linear else torch.float32)}
    assert not wrong and set(gathered) - linear, f"gathered in the wrong dtype: {wrong}"


@pytest.fixture(scope="module")
def fsdp_run(tiny, tmp_path_factory):
    """{family: --out of 2 CPU ranks × batch 1, --full D-OPSD, 3 steps} (a fresh cache per family, split by rank)."""
    root, outs = tmp_path_factory.mktemp("fsdp"), {}
    for family in ("zimage", "klein"):
        outs[family] = root / family
        code, out, err = run_bounded(torchrun(2, *full_args(tiny, outs[family], family, "--batch-size", "1",
                                                            "--cache-dir", str(root / f"cache_{family}"))), 180)
        assert code == 0, err[-3000:]
        assert "sharded: FSDP2 over 2 ranks" in out
    return outs


@pytest.mark.parametrize("family", ["zimage", "klein"])
def test_fsdp_two_ranks_train_like_one_process_with_the_same_global_batch(tiny, fsdp_run, tmp_path, family):
    """--full under torchrun shards the DiT and its EMA teacher (each rank writes about half the checkpoint) and
    trains what one process with the global batch trains."""
    one = tmp_path / "one"
    assert dopsd.main(["train", *full_args(tiny, one, family, "--batch-size", "2")]) == 0
    shards = [p.stat().st_size for p in sorted((fsdp_run[family] / "checkpoint").glob("*.distcp"))]
    assert len(shards) == 2 and max(shards) < 0.6 * sum(shards)
    assert_same_training(full_checkpoint(fsdp_run[family]), full_checkpoint(one))


def test_fsdp_two_ranks_under_bf16_autocast_take_the_first_step_of_one_process(tiny, tmp_path):
    """Under --precision bf16 too, 2 sharded ranks × batch 1 take the first step of one process × batch 2: the same
    loss (the forwards of the student and its EMA teacher) and gradient norm (the backward)."""
    args = lambda out, batch: full_args(tiny, tmp_path / out, "zimage", "--precision", "bf16", "--max-steps", "1",
                                        "--batch-size", batch, "--cache-dir", str(tmp_path / "cache"))
    code, out, err = run_bounded(torchrun(2, *args("two", "1")), 180)
    assert code == 0, err[-3000:]
    assert dopsd.main(["train", *args("one", "2")]) == 0
    two, one = (json.loads((tmp_path / o / "log.jsonl").read_text()) for o in ("two", "one"))
    # rtol 1e-5: measured 7e-8 (loss) and 4e-7 (gradient norm) with the one-process dtypes, 2.8e-4 and 4.0e-4 with
    # norms and pad tokens gathered in bf16, so 20x on either side. Later steps drift apart in bf16 either way: each
    # rank rounds its own gradient to bf16 (2e-3 per element), and AdamW turns that into up to 2·lr near zero.
    for k in ("loss", "grad_norm"):
        assert_close(torch.tensor(two[k]), torch.tensor(one[k]), rtol=1e-5, what=k)


@pytest.mark.parametrize("family", ["zimage", "klein", "full_run"])
def test_ranks_above_0_build_the_dit_on_meta_with_the_loaded_dits_names_and_shapes(tiny, fsdp_run, family):
    """Under FSDP2 only rank 0 loads the DiT; the others build it from --model's config with no memory (also from a
    --full run's folder as --model), and rank 0's broadcast then fills their shards (the tests above: bit-equal)."""
    model = str(fsdp_run["zimage"] if family == "full_run" else tiny[family])
    loaded = dopsd.load_pipeline(model, torch.float32, text_encoder=False).transformer
    meta = dopsd.dit_on_meta(model)
    assert type(meta) is type(loaded) and all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in loaded.named_parameters()}


@pytest.fixture(scope="module")
def fsdp_killed(tiny, fsdp_run, tmp_path_factory):
    """A 2-rank --full run whose rank 1 was killed while writing the step-2 checkpoint (--save-every 1)."""
    root = tmp_path_factory.mktemp("killed")
    (root / "kill.py").write_text(KILL_IN_SAVE)
    cmd = torchrun(2, *full_args(tiny, root / "run", "zimage", "--batch-size", "1", "--save-every", "1"))
    cmd.insert(cmd.index(str(ROOT / "dopsd.py")), str(root / "kill.py"))          # kill.py runs dopsd.py
    code, out, err = run_bounded(cmd, 180)
    return root / "run", code, err


def test_a_rank_killed_mid_save_ends_the_job_and_leaves_the_previous_checkpoint(fsdp_killed):
    """A rank killed while writing the step-2 checkpoint ends the whole job, and the step-1 checkpoint stays complete;
    the half-written one never becomes the checkpoint."""
    run, code, err = fsdp_killed
    assert code != 0 and "Signal 9" in err
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == 1     # complete, and loads below
    assert not (run / "checkpoint.tmp" / "meta.json").exists()                        # the half-written one


def test_a_two_rank_fsdp_resume_continues_bit_exactly(tiny, fsdp_run, fsdp_killed, tmp_path):
    """Sharded --full under torchrun: 2 ranks resumed from the step-1 checkpoint the killed run left end with the
    student, EMA teacher and AdamW state of the uninterrupted 2-rank run, bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_killed[0], run)
    code, out, err = run_bounded(torchrun(2, *full_args(tiny, run, "zimage", "--batch-size", "1", "--resume")), 180)
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "at step 1 (written by 2 rank(s))" in out
    a, b = full_checkpoint(run), full_checkpoint(fsdp_run["zimage"])
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in sa[k])


def test_a_checkpoint_of_two_ranks_resumes_in_one_process_with_the_same_global_batch(tiny, fsdp_run, fsdp_killed,
                                                                                      tmp_path, capsys):
    """A 2-rank sharded checkpoint resumes in one process: with another global batch it is a one-line refusal that
    names the batch it was written with; with the same global batch it trains what the 2 ranks trained."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_killed[0], run)
    assert dopsd.main(["train", *full_args(tiny, run, "zimage", "--batch-size", "1", "--resume")]) == 2
    assert "global batch was --batch-size 1 × 2 rank(s)" in capsys.readouterr().err     # says: --batch-size 2
    assert dopsd.main(["train", *full_args(tiny, run, "zimage", "--batch-size", "2", "--resume")]) == 0
    assert "at step 1 (written by 2 rank(s))" in capsys.readouterr().out
    assert_same_training(full_checkpoint(run), full_checkpoint(fsdp_run["zimage"]))


def test_the_exported_transformer_loads_in_the_pipeline_with_the_trained_velocity(fsdp_run, tmp_path):
    """transformer/ of the sharded run is the checkpoint's fp32 student rounded to bf16, in save_pretrained's format;
    split into several files (export_dit's limit) it loads through diffusers' index and gives the same velocity."""
    from diffusers import ZImageTransformer2DModel
    student = {k: v.bfloat16().float() for k, v in full_checkpoint(fsdp_run["zimage"])["student"].items()}
    tr = dopsd.load_pipeline(str(fsdp_run["zimage"]), torch.float32).transformer      # the run folder as --model
    assert all(torch.equal(v, student[k]) for k, v in tr.named_parameters()) and len(student) == len(
        list(tr.parameters()))
    assert dopsd.export_dit(tr, tmp_path / "split", 0, file_bytes=2**16) is None
    assert len(list((tmp_path / "split").glob("*.safetensors"))) > 2
    again = ZImageTransformer2DModel.from_pretrained(tmp_path / "split", dtype=torch.float32)
    assert all(v.dtype == torch.float32 and torch.equal(v, student[k]) for k, v in again.named_parameters())
    x, s = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    caps = [torch.randn(7, tr.config.cap_feat_dim, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():   # equal weights; the velocity to float rounding (in a long pytest process CPU kernels
        # were seen to differ in the last bit between two models with equal weights, by memory placement)
        assert_close(dopsd.zimage_velocity(again, x, s, caps), dopsd.zimage_velocity(tr, x, s, caps), rtol=1e-6,
                     normwise=True, what="velocity")


def test_full_finetuning_saves_a_transformer_that_sample_loads(tiny, tmp_path):
    """--full trains every DiT weight against an EMA copy; the saved transformer/ loads in `sample` and differs."""
    train_full_and_sample(tiny, tmp_path)


def test_the_exported_transformer_is_the_bf16_rounded_dit_and_keeps_integer_buffers(tiny, tmp_path):
    """export_dit writes each floating-point tensor rounded to bf16 (integer buffers as they are), its index counting
    those bytes; diffusers loads it, in fp32 too (upcast)."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import load_file
    dit = tiny_dit(tiny, "zimage")
    dit.register_buffer("counts", torch.tensor([3, 2**40]))
    state = dit.state_dict()
    assert dopsd.export_dit(dit, tmp_path / "t", 0, file_bytes=2**16) is None
    saved = {k: v for f in (tmp_path / "t").glob("*.safetensors") for k, v in load_file(f).items()}
    assert saved.keys() == state.keys() and saved["counts"].dtype == torch.int64 and saved["counts"][1] == 2**40
    floats = {k: v for k, v in saved.items() if k != "counts"}
    assert {v.dtype for v in floats.values()} == {torch.bfloat16}
    assert all(torch.equal(v, state[k].bfloat16()) for k, v in floats.items())
    index = json.loads((tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in saved.values())
    loaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "t", dtype=torch.float32)
    assert all(p.dtype == torch.float32 and torch.equal(p, saved[k].float()) for k, p in loaded.named_parameters())


def train_full_and_sample(tiny, tmp_path):
    """The test above's run: returns its --out."""
    from PIL import Image
    import numpy as np
    out = tmp_path / "full"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "2", "--full", "--lr", "1e-3")) == 0
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    images = []
    for lora in (None, out):
        path = tmp_path / f"{lora is None}.png"
        extra = ["--lora", str(lora)] if lora else []
        assert dopsd.main(["sample", "--model", str(tiny["zimage"]), "--prompt", "x", "--out", str(path),
                           "--height", "64", "--width", "64", "--steps", "2", *extra]) == 0
        images.append(np.asarray(Image.open(path)).astype(int))
    assert np.abs(images[0] - images[1]).max() > 0
    return out


def test_a_full_run_is_the_model_of_the_next_run(tiny, tmp_path):
    """The --out folder of a --full run loads as --model: the trained DiT with the base's encoders, VAE and feature
    cache entries, and it trains again."""
    from safetensors.torch import load_file
    first = train_full_and_sample(tiny, tmp_path)
    pipe = dopsd.load_pipeline(str(first), torch.float32)
    trained = load_file(str(first / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, trained[k]) for k, v in pipe.transformer.state_dict().items() if k in trained)
    assert dopsd.pipeline_family(str(first)) == "zimage"
    args = train_args(tiny, tmp_path / "again", "--max-steps", "1", "--full", "--lr", "1e-3")
    args[args.index("--model") + 1] = str(first)
    assert dopsd.main(args) == 0


def test_a_full_run_given_a_relative_model_is_the_model_of_a_run_started_in_another_folder(tiny, tmp_path,
                                                                                           monkeypatch, capsys):
    """A --full run started with a relative --model resumes with it from the same folder, and its --out is the --model
    of a run started elsewhere: config.json's launch folder locates the base, not the run folder."""
    monkeypatch.chdir(tiny["zimage"].parent)
    out = tmp_path / "full"
    args = train_args(tiny, out, "--max-steps", "1", "--full")
    args[args.index("--model") + 1] = "zimage"
    assert dopsd.main(args) == 0
    args[args.index("--max-steps") + 1] = "2"
    assert dopsd.main([*args, "--resume"]) == 0 and "resumed from" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    base, trained = dopsd.full_run_parts(str(out))
    assert Path(base).resolve() == tiny["zimage"].resolve() and trained == out / "transformer"
    assert dopsd.pipeline_family(str(out)) == "zimage"


def test_ema_decay_one_keeps_the_teacher_at_the_base_model(tiny, tmp_path):
    """--ema-decay 1.0 freezes the teacher adapter at its start (B = 0: the base model) while the student moves."""
    out = tmp_path / "frozen"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "2", "--ema-decay", "1.0", "--loss-space", "v")) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    # adapter_params order: lora_A, lora_B per module; the B factors of the teacher stay exactly zero
    assert all(t.abs().sum() == 0 for t in ck["teacher"] if t.shape[1] == 4)
    assert any(s.abs().sum() > 0 for s in ck["student"] if s.shape[1] == 4)


def test_readme_commands_parse(tmp_path):
    """Every `python dopsd.py ...` line in the README parses with the real argument parser (no stale flags)."""
    import re
    import shlex
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"(?:python|--nproc_per_node \d+) dopsd\.py (.+)", text)
    assert len(commands) >= 6
    parser = dopsd.build_parser()
    for c in commands:
        parser.parse_args(shlex.split(c.split("#")[0]))
