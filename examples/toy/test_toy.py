"""Tests of the toy turbo model (examples/toy): it loads like a real klein checkpoint and goes through dopsd.py
train/sample unchanged; its world's renderer and metrics are what the toy experiments measure with.

Beside the example it tests; run by the README's test command (python -m pytest -q) with the rest. Shared
helpers and fixtures are test_dopsd.py's, imported from there."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dopsd  # noqa: E402
from test_dopsd import ROOT, lora_weights  # noqa: E402


# ---------------------------------------------------------------------------------------------------- toy turbo model
# examples/toy/model: the committed CPU-trained, step-distilled klein (examples/toy/make_turbo.py). It is loaded like
# a real checkpoint and must go through dopsd.py train/sample unchanged.

TOY = ROOT / "examples" / "toy"


def test_toy_model_is_a_distilled_klein_under_20_mb():
    from diffusers import Flux2KleinPipeline
    pipe = Flux2KleinPipeline.from_pretrained(TOY / "model")
    assert pipe.config.is_distilled and dopsd.pipeline_family(str(TOY / "model")) == "klein"
    assert sum(f.stat().st_size for f in (TOY / "model").rglob("*") if f.is_file()) < 20 * 2**20
    assert dopsd.klein_text_len(pipe.tokenizer) == 48 and dopsd.latent_cell("klein", pipe.vae) == 8


def test_toy_sample_equals_the_diffusers_pipeline(tmp_path):
    """dopsd.py sample on the toy = Flux2KleinPipeline at 4 steps, same noise (text length 48, layers 1/2/3)."""
    import numpy as np
    from diffusers import Flux2KleinPipeline
    from PIL import Image
    assert dopsd.main(["sample", "--model", str(TOY / "model"), "--prompt", "a red circle", "--height", "64",
                       "--width", "64", "--seed", "3", "--out", str(tmp_path / "s.png")]) == 0
    pipe = Flux2KleinPipeline.from_pretrained(TOY / "model")
    noise = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=1.0, latents=noise,
               text_encoder_out_layers=dopsd.klein_text_layers(pipe.text_encoder), max_sequence_length=48).images[0]
    ours = np.asarray(Image.open(tmp_path / "s.png"), dtype=int)
    assert ours.shape == (64, 64, 3) and np.abs(ours - np.asarray(ref, dtype=int)).max() <= 1


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_toy_model_trains_on_the_toy_data(tmp_path, method):
    """The README quick start, shortened: both methods train a LoRA on examples/toy/data and move its weights."""
    assert dopsd.main(["train", "--model", str(TOY / "model"), "--data", str(TOY / "data"), "--out",
                       str(tmp_path / "o"), "--resolution", "64", "--max-steps", "3", "--rank", "4",
                       "--sample-every", "0", "--lr", "1e-3", "--method", method]) == 0
    lora = lora_weights(tmp_path / "o")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())


def _toy_world():
    import sys
    sys.path.insert(0, str(TOY))
    import world
    return world


def test_toy_world_instances_of_one_style_are_not_pixel_aligned_but_measure_alike():
    """World v2: two images of one style differ pixel for pixel (phase, period), yet their style distance is far
    below that of two styles; a model cannot memorise the style's pixels, and the metric still reads the style."""
    import numpy as np
    world = _toy_world()
    rng = np.random.default_rng(0)
    same, other, pixels = [], [], []
    for _ in range(24):
        s, o = world.random_style(rng), world.random_style(rng)
        colour = world.visible_colours(s)[0]
        a, b = world.render(s, "circle", colour, rng), world.render(s, "ring", colour, rng)
        c = world.render(o, "circle", world.visible_colours(o)[0], rng)
        sa = world.style_stats(a)
        same.append(world.style_distance(sa, world.style_stats(b)))
        other.append(world.style_distance(sa, world.style_stats(c)))
        frame = world.frame_mask()
        pixels.append(np.abs(np.asarray(a, float) - np.asarray(b, float))[frame].mean() / 255)
    assert np.mean(pixels) > 0.05 and np.mean(same) < np.mean(other) / 5


def test_toy_fidelity_metrics_read_real_world_images_right():
    """Colour and shape fidelity are 1 on real world images, and a wrong colour or shape scores 0."""
    import numpy as np
    world = _toy_world()
    rng = np.random.default_rng(1)
    for i in range(30):
        s = world.random_style(rng)
        shape, colour = world.SHAPES[i % 6], world.visible_colours(s)[i % len(world.visible_colours(s))]
        im = world.render(s, shape, colour, rng)
        wrong = next(c for c in world.COLOURS if c != colour)
        assert world.colour_fidelity(im, colour) > 0.97 and world.colour_fidelity(im, wrong) < 0.03
        assert world.shape_of(im) == shape


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    """examples/toy/teacher_check.py's five fine-tuning sets, written once: {name: folder}."""
    spec = importlib.util.spec_from_file_location("teacher_check", TOY / "teacher_check.py")
    tc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tc)
    return tc.write_sets(tmp_path_factory.mktemp("sets"))


@pytest.mark.parametrize("name, verdict", [("v", "teachable"), ("named", "already known"), ("noise", "not teachable")])
def test_the_teacher_check_tells_the_toys_three_kinds_of_data_apart(toy_sets, tmp_path, name, verdict):
    """`dopsd.py check` on the toy model: the held-out [V] style (the teacher copies it from the image, the base
    cannot draw it) is teachable, a style its caption names is already known, and per-pixel noise (the toy VAE cannot
    hold it, so the teacher draws its grey average) is not teachable. CHECK_GAIN and CHECK_NEAR were calibrated on
    these sets (examples/toy/README.md): this pins that calibration."""
    assert dopsd.main(["check", "--model", str(TOY / "model"), "--data", str(toy_sets[name]), "--resolution", "64",
                       "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "check.json").read_text())["verdict"] == verdict


slow = pytest.mark.skipif(os.environ.get("DOPSD_SLOW") != "1", reason="slow (~2 min): set DOPSD_SLOW=1 to run")


@slow
def test_reproduce_quick_runs_end_to_end(tmp_path):
    """examples/toy/reproduce.py --quick: every method trains, is evaluated, and the table and grids are written."""
    spec = importlib.util.spec_from_file_location("reproduce", TOY / "reproduce.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    assert rep.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == {f"{m}@{n}" for m in rep.METHODS for n in (5, 10)}
    assert all(all(v == v for v in r[0].values()) for r in res["runs"].values())          # no NaN
    assert "| dopsd" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "grid_new_concept.png").is_file() and (tmp_path / "grid_old_prompts.png").is_file()
