"""
Tests for dopsd.py, read as a specification. Offline, CPU, tiny random-weight models of the real architectures.

Run as:  python -m pytest -q            (about 2 minutes on 2 cores)

Groups: data checks (before any model loads) -> conditioning -> roll-out vs the diffusers pipeline -> teacher/EMA ->
end-to-end train/sample/resume through main(argv) -> LoRA interop with ZImagePipeline.load_lora_weights.
The tiny models are built once per session by examples/make_tiny.py and loaded by path, like real checkpoints.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import dopsd  # noqa: E402


def _make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "examples" / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def assert_close(a, b, atol, rtol=0.0, what=""):
    d = (a.double() - b.double()).abs()
    tol = atol + rtol * b.double().abs()
    assert bool((d <= tol).all()), f"{what}: max diff {d.max().item():.3e}, mean diff {d.mean().item():.3e}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny Z-Image pipeline, the tiny Qwen3-VL and two small datasets (.txt and metadata.jsonl)."""
    mt, root = _make_tiny(), tmp_path_factory.mktemp("tiny")
    mt.make_zimage(root / "zimage")
    mt.make_vlm(root / "vlm")
    mt.make_demo_data(root / "data")
    mt.make_demo_data_jsonl(root / "data_jsonl")
    small = root / "small"                                  # 2 images: enough for the train/resume runs, and fast
    small.mkdir()
    for name in ("rgb.jpg", "rgba.png"):
        (small / name).write_bytes((root / "data" / name).read_bytes())
        stem = Path(name).stem
        (small / f"{stem}.txt").write_text((root / "data" / f"{stem}.txt").read_text())
    return {k: root / k for k in ("zimage", "vlm", "data", "data_jsonl", "small")}


@pytest.fixture(scope="session")
def pipe(tiny):
    from diffusers import ZImagePipeline
    return ZImagePipeline.from_pretrained(tiny["zimage"])


def train_args(tiny, out, *extra, data="small"):
    return ["train", "--data", str(tiny[data]), "--model", str(tiny["zimage"]), "--vlm", str(tiny["vlm"]),
            "--out", str(out), "--resolution", "64", "--rollout-steps", "2", "--rank", "4", "--sample-every", "0",
            "--lr", "1e-3", *extra]


def lora_weights(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "pytorch_lora_weights.safetensors"))


# ---------------------------------------------------------------------------------------------------- data checks


def run_bad(args, capsys):
    code = dopsd.main(args)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    return err


def bad_args(data):
    # --model points nowhere: if the data check did not stop us first, the error would be about the model.
    return ["train", "--data", str(data), "--model", "/nonexistent/model", "--out", str(data) + "_out"]


def test_missing_data_folder_is_named(tmp_path, capsys):
    """A missing --data folder stops with its name."""
    err = run_bad(bad_args(tmp_path / "nope"), capsys)
    assert "nope" in err and "not found" in err


def test_folder_without_images_is_reported(tmp_path, capsys):
    """A folder with no images (other files ignored) says so."""
    (tmp_path / "notes.txt").write_text("hello")
    assert "no images" in run_bad(bad_args(tmp_path), capsys)


def test_every_corrupt_image_is_listed(tiny, tmp_path, capsys):
    """All unreadable images are named in one message, before any model is loaded."""
    (tmp_path / "good.png").write_bytes((tiny["data"] / "rgba.png").read_bytes())
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "half.jpg").write_bytes((tiny["data"] / "rgb.jpg").read_bytes()[:200])
    err = run_bad(bad_args(tmp_path), capsys)
    assert "broken.png" in err and "half.jpg" in err and "good.png" not in err and "model" not in err.lower()


def test_too_small_images_are_listed(tmp_path, capsys):
    """Images under 64 px on a side are named."""
    from PIL import Image
    Image.new("RGB", (32, 100)).save(tmp_path / "tiny.png")
    (tmp_path / "tiny.txt").write_text("x")
    assert "tiny.png" in run_bad(bad_args(tmp_path), capsys)


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
    items = dict(dopsd.scan_dataset(tmp_path, caption="a photo of [V]", trigger="sks"))
    assert items[tmp_path / "a.png"] == "a photo of sks" and items[tmp_path / "b.png"] == "a sks dog"


def test_metadata_jsonl_captions_are_read(tiny):
    """metadata.jsonl rows {file_name, text} caption the images."""
    items = dopsd.scan_dataset(tiny["data_jsonl"])
    rows = [json.loads(l) for l in (tiny["data_jsonl"] / "metadata.jsonl").read_text().splitlines() if l.strip()]
    assert {p.name: c for p, c in items} == {r["file_name"]: r["text"] for r in rows}


def test_every_image_mode_becomes_rgb_without_clipping(tiny):
    """RGBA, P, L, CMYK, 16-bit... all load as 8-bit RGB; 16-bit grey keeps its tones instead of saturating."""
    for path, _ in dopsd.scan_dataset(tiny["data"]):
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


def test_unsupported_pipeline_names_the_supported_families(tmp_path, capsys):
    """A pipeline class we don't support stops with a message naming the ones we do."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "ZImagePipeline" in run_bad(["sample", "--model", str(tmp_path), "--prompt", "x"], capsys)


def test_student_features_match_the_pipeline_encoder(pipe):
    """The student's text features equal ZImagePipeline.encode_prompt's (shape [L_i, D], padding stripped)."""
    prompts = ["a red circle", "a much longer prompt about a blue square"]
    ours = dopsd.zimage_text_features(pipe.text_encoder, pipe.tokenizer, prompts)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    assert [o.shape for o in ours] == [r.shape for r in ref] and ours[0].shape[1] == 32 and len(ours[0]) < len(ours[1])
    for o, r in zip(ours, ref):
        assert_close(o, r, 1e-6, what="student features")


def test_hybrid_vlm_takes_every_text_encoder_tensor(pipe, tiny, capsys):
    """The VLM's language model is replaced tensor for tensor, and the count is printed."""
    vlm, _, _ = dopsd.load_hybrid_vlm(tiny["vlm"], pipe.text_encoder, torch.float32)
    assert "46/46" in capsys.readouterr().out
    te = pipe.text_encoder.state_dict()
    for k, v in vlm.language_model.state_dict().items():
        assert torch.equal(v, te[k]), k


def test_mismatched_vlm_is_refused(tiny):
    """A VLM whose language model does not match the text encoder stops with a clear error."""
    from transformers import Qwen3Config, Qwen3Model
    other = Qwen3Model(Qwen3Config(vocab_size=265, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12))
    with pytest.raises(dopsd.UserError, match="tensors match"):
        dopsd.load_hybrid_vlm(tiny["vlm"], other, torch.float32)


def test_teacher_features_hold_image_and_caption_tokens(pipe, tiny):
    """Teacher context = template + image + caption tokens of the hybrid VLM, width D, at most 1024 tokens."""
    vlm, tok, proc = dopsd.load_hybrid_vlm(tiny["vlm"], pipe.text_encoder, torch.float32)
    img = dopsd.crop_to(dopsd.load_rgb(tiny["data"] / "rgb.jpg"), 64, 64)
    f = dopsd.vlm_features(vlm, tok, proc, img, "a red circle")
    s = dopsd.zimage_text_features(pipe.text_encoder, pipe.tokenizer, ["a red circle"])[0]
    assert f.shape[1] == s.shape[1] == 32 and len(s) + 100 < len(f) <= 1024
    assert len(dopsd.vlm_features(vlm, tok, proc, img, "a red circle", max_len=50)) == 50
    other = dopsd.crop_to(dopsd.load_rgb(tiny["data"] / "cmyk.jpg"), 64, 64)
    assert not torch.allclose(f, dopsd.vlm_features(vlm, tok, proc, other, "a red circle"))   # the image matters


def test_lora_wraps_every_attention_and_feed_forward_linear(tiny):
    """The LoRA target regex catches every linear of every attention and feed-forward block (counted independently)."""
    from diffusers import ZImageTransformer2DModel
    tr = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer")
    want = {n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
            and (".attention." in n or ".feed_forward." in n)}
    n = dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS["zimage"], 4, 8)
    got = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if n.endswith("lora_A.student.weight")}
    assert n == len(want) == len(got) == 28 and got == want


# ---------------------------------------------------------------------------------------------------- roll-out & teacher


def test_schedule_is_the_turbo_schedule():
    """4 steps: σ = 1, .9, .75, .5, 0; 8 steps equals diffusers' own Z-Image deploy schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
    assert_close(dopsd.zimage_sigmas(4), torch.tensor([1, .9, .75, .5, 0]), 1e-6, what="4-step")
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(sigmas=get_default_z_image_sigmas(8))
    assert_close(dopsd.zimage_sigmas(8), sch.sigmas, 1e-6, what="8-step")


@pytest.mark.parametrize("steps", [4, 8])
def test_rollout_equals_the_pipeline_with_zero_lora(pipe, tiny, steps):
    """With a zero LoRA, the student's few-step roll-out reproduces ZImagePipeline's own latents from the same noise."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    tr = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer")
    p = ZImagePipeline(**{**pipe.components, "transformer": tr})
    caps = dopsd.zimage_text_features(p.text_encoder, p.tokenizer, ["a red circle", "a blue square"])
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS["zimage"], 4, 8)            # B = 0: equal to the base model
    f = lambda x, s: dopsd.zimage_velocity(tr, x, s, caps)
    _, ours = dopsd.dopsd_rollout(f, f, noise, dopsd.zimage_sigmas(steps), stepwise=False)
    plain = dopsd.euler_sample(f, noise, dopsd.zimage_sigmas(steps))
    ref = p(prompt_embeds=caps, latents=noise.clone(), num_inference_steps=steps, guidance_scale=0.0,
            height=64, width=64, output_type="latent").images
    assert_close(ours, ref, 1e-5, what="roll-out vs pipeline")
    assert_close(plain, ref, 1e-5, what="euler_sample vs pipeline")


@pytest.fixture()
def two_role_dit(tiny):
    """A fresh tiny DiT with student + teacher adapters, the student's B made non-zero so it differs from the teacher."""
    from diffusers import ZImageTransformer2DModel
    tr = ZImageTransformer2DModel.from_pretrained(tiny["zimage"] / "transformer")
    tr.requires_grad_(False)
    dopsd.add_lora_adapters(tr, dopsd.LORA_TARGETS["zimage"], 4, 8)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B.student" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    caps = [torch.randn(7, 32, generator=torch.Generator().manual_seed(1)), torch.randn(9, 32)]
    ctx = [torch.randn(20, 32, generator=torch.Generator().manual_seed(2)), torch.randn(25, 32)]

    def student(x, s):
        dopsd.use_adapter(tr, "student")
        return dopsd.zimage_velocity(tr, x, s, caps)

    def teacher(x, s):
        dopsd.use_adapter(tr, "teacher")
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


def test_ema_moves_the_teacher_towards_the_student():
    """φ <- μφ + (1-μ)θ exactly; μ = 1 leaves the teacher untouched."""
    t, s = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.full((2,), 3.0)]
    dopsd.ema_update(t, s, 0.9)
    assert_close(t[0], torch.full((3,), 0.1), 1e-7)
    assert_close(t[1], torch.full((2,), 0.9 * 1 + 0.1 * 3), 1e-6)
    before = [x.clone() for x in t]
    dopsd.ema_update(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, t))


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """A 3-step D-OPSD run on the mixed-format folder, through main(argv)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert dopsd.main(train_args(tiny, out, "--max-steps", "3", data="data")) == 0
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


def test_lora_loads_in_the_pipeline_and_matches_our_sampler(tiny, trained, tmp_path):
    """ZImagePipeline.load_lora_weights(out) loads our LoRA, changes the image, and equals `dopsd.py sample`."""
    from diffusers import ZImagePipeline
    import numpy as np
    from PIL import Image
    p = ZImagePipeline.from_pretrained(tiny["zimage"])
    kw = dict(prompt="a red circle in [V] style", num_inference_steps=8, guidance_scale=0.0, height=64, width=64,
              output_type="np")
    base = p(generator=torch.Generator().manual_seed(5), **kw).images[0]
    p.load_lora_weights(str(trained))
    assert sum(1 for n, _ in p.transformer.named_parameters() if "lora_A" in n) == 28
    tuned = p(generator=torch.Generator().manual_seed(5), **kw).images[0]
    assert dopsd.main(["sample", "--model", str(tiny["zimage"]), "--lora", str(trained), "--prompt", kw["prompt"],
                       "--out", str(tmp_path / "s.png"), "--seed", "5", "--height", "64", "--width", "64"]) == 0
    ours = np.asarray(Image.open(tmp_path / "s.png")).astype(np.float64)
    assert np.abs(tuned - base).max() > 1e-3                                      # the LoRA does something
    assert np.abs(ours - np.round(tuned * 255)).max() <= 1                        # ±1 grey level (PNG rounding)


def test_sample_writes_a_png_of_the_asked_size(tiny, tmp_path):
    """`sample --height 64 --width 96` writes a 96×64 PNG."""
    from PIL import Image
    out = tmp_path / "a.png"
    assert dopsd.main(["sample", "--model", str(tiny["zimage"]), "--prompt", "x", "--out", str(out),
                       "--height", "64", "--width", "96", "--steps", "2"]) == 0
    assert Image.open(out).size == (96, 64)


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    """2 steps + --resume to 4 steps gives exactly the weights of 4 straight steps."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert dopsd.main(train_args(tiny, a, "--max-steps", "4")) == 0
    assert dopsd.main(train_args(tiny, b, "--max-steps", "2")) == 0
    assert dopsd.main(train_args(tiny, b, "--max-steps", "4", "--resume")) == 0
    wa, wb = lora_weights(a), lora_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(ta["teacher"], tb["teacher"]))       # the EMA teacher too


def test_existing_run_needs_resume(trained, tiny, capsys):
    """Training into a folder that holds a run, without --resume, refuses instead of overwriting it."""
    assert "--resume" in run_bad(train_args(tiny, trained, "--max-steps", "3", data="data"), capsys)


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
