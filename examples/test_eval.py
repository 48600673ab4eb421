"""
Tests for examples/eval.py, read as a specification. Offline, CPU: tiny random CLIP, DINOv3 and Qwen3-VL models of the
real architectures (examples/make_tiny.py --metrics) score tiny dopsd.py runs of the tiny Z-Image pipeline.

Run as:  python -m pytest -q examples/test_eval.py        (about 11 s on 2 cores; `python -m pytest -q` collects it)

The runs, the models and one evaluation of every row with every metric model are built once (module fixtures); the
tests read that evaluation, or run eval.py once more where a behaviour needs other flags.
"""
import contextlib
import io
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dopsd  # noqa: E402
from test_dopsd import _load_example as _load  # noqa: E402


ev = _load("eval.py")
HELD = ["a [V] on the moon", "a [V] in a garden"]
RETAIN = ["--retain-prompt", "a red car", "--retain-prompt", "a bowl of soup"]
ALL_FIGURES = {"clip_t", "clip_i", "dino", "judge", "quality", "sharpness_rel", "retain_clip_t", "retain_quality",
               "retain_sharpness_rel", "retain_dino", "retain_rms"}


def merge_lora(model, lora, out):
    """A `train --full`-shaped run folder (out/transformer/) holding the base DiT with a LoRA fused into it."""
    import diffusers
    pipe = diffusers.DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()                       # (keeps the fused weights, drops the LoRA layers)
    pipe.transformer.save_pretrained(out / "transformer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Z-Image pipeline, Qwen3-VL (teacher and judge), CLIP, DINOv3, 2 training images; two 1-step runs
    through dopsd.py's main (D-OPSD with HELD as its --sample-prompt, and SFT); a byte-identical copy of the first
    run; and `merged`, a --full run whose DiT is the base with the first run's LoRA fused in."""
    mt, root = _load("make_tiny.py"), tmp_path_factory.mktemp("tiny_eval")
    for name, build in (("zimage", mt.make_zimage), ("vlm", mt.make_vlm), ("clip", mt.make_clip),
                        ("dino", mt.make_dino), ("all", mt.make_demo_data)):
        build(root / name)
    (root / "data").mkdir()
    for name in ("rgb.jpg", "rgba.png"):
        shutil.copy(root / "all" / name, root / "data" / name)
        shutil.copy(root / "all" / f"{Path(name).stem}.txt", root / "data" / f"{Path(name).stem}.txt")
    for run, extra in (("dopsd", [a for p in HELD for a in ("--sample-prompt", p)]), ("sft", ["--method", "sft"])):
        assert dopsd.main(["train", "--data", str(root / "data"), "--model", str(root / "zimage"), "--vlm",
                           str(root / "vlm"), "--out", str(root / run), "--resolution", "64", "--rollout-steps", "2",
                           "--rank", "4", "--max-steps", "1", "--sample-every", "0", "--lr", "1e-2", *extra]) == 0
    shutil.copytree(root / "dopsd", root / "copy")
    merge_lora(root / "zimage", root / "dopsd" / "pytorch_lora_weights.safetensors", root / "merged")
    return root


def run_eval(tiny, out, *extra, runs=(("--lora", "dopsd"),)):
    """eval.py's main on tiny runs at 64², seed 0, two retention prompts; --model comes from the first run's config."""
    args = [*[a for flag, r in runs for a in (flag, str(tiny / r))], "--resolution", "64", "--seeds", "0", *RETAIN,
            "--out", str(out), *extra]
    return ev.main(args)


@pytest.fixture(scope="module")
def full_eval(tiny, tmp_path_factory):
    """eval.py on the D-OPSD run, the merged --full run, the SFT run and the copy, every metric model given, 2 seeds,
    2 steps (for time): (exit code, stdout, report, output folder)."""
    out, buf = tmp_path_factory.mktemp("eval"), io.StringIO()
    with contextlib.redirect_stdout(buf):              # (a module-scoped fixture cannot take capsys)
        code = run_eval(tiny, out, "--seeds", "0,1", "--steps", "2", "--clip", str(tiny / "clip"), "--dino",
                        str(tiny / "dino"), "--judge", str(tiny / "vlm"), "--quality", str(tiny / "clip"),
                        "--class-name", "toy",
                        runs=(("--lora", "dopsd"), ("--full", "merged"), ("--lora", "sft"), ("--lora", "copy")))
    return code, buf.getvalue(), json.loads((out / "report.json").read_text()), out


def table_rows(text):
    """The model names of a printed table's rows."""
    return [line.split("|")[1].strip() for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]


def stderr_lines(capsys):
    """What went to stderr, less progress bars (tqdm writes there too)."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if not re.search(r"\d+%\|", line)]

# --------------------------------------------------------------------------------------------------------------------
# the table: a row per run plus the base, the columns of the metric models given


def test_runs_give_one_row_each_plus_the_base(full_eval):
    """Runs end to end: the printed table, table.md and report.json have the base and one row per run, in order."""
    code, text, report, out = full_eval
    assert code == 0
    assert table_rows(text) == ["base", "dopsd", "merged", "sft", "copy"]
    assert table_rows((out / "table.md").read_text()) == table_rows(text)
    assert list(report["figures"]) == table_rows(text) and (out / "grid.png").is_file()


def test_every_metric_model_given_gives_its_columns_and_is_named_in_the_header(full_eval, tiny):
    """All four metric models given: every figure in every row, and the header line names each model used."""
    code, text, report, _ = full_eval
    assert all(ALL_FIGURES <= fig.keys() for fig in report["figures"].values())
    assert (f"metric models: clip {tiny / 'clip'}, dino {tiny / 'dino'}, judge {tiny / 'vlm'}, quality "
            f"{tiny / 'clip'}") in text.splitlines()


def test_the_model_defaults_to_the_first_runs_own(full_eval, tiny):
    """No --model: the base pipeline is the one the first run's config.json names."""
    assert full_eval[2]["model"] == str(tiny / "zimage")

# --------------------------------------------------------------------------------------------------------------------
# honest defaults: the same noise for every row, the authors' [V] rule, the base as the reference


def test_identical_loras_give_identical_rows(full_eval):
    """A run and its byte-identical copy sample the same images on the same noise: every figure is equal; a
    different run, and the base, differ."""
    figs = full_eval[2]["figures"]
    assert figs["copy"] == figs["dopsd"]
    assert figs["sft"] != figs["dopsd"] and figs["base"] != figs["dopsd"]


def test_a_full_run_is_sampled_with_its_own_dit(full_eval):
    """A --full run holding the LoRA fused into the base gives the LoRA's row (to float rounding), not the base's;
    the runs after it are sampled on the base DiT again (the copy still equals the LoRA)."""
    figs = full_eval[2]["figures"]
    for k in ALL_FIGURES - {"judge"}:
        assert figs["merged"][k]["value"] == pytest.approx(figs["dopsd"][k]["value"], rel=1e-3, abs=1e-6), k
    assert figs["merged"]["retain_rms"]["value"] > 0


def test_the_noise_does_not_depend_on_the_batch_size(tiny, tmp_path):
    """One image per DiT call or all of them in one: the same images, so the same figures."""
    figs = []
    for b in ("1", "4"):
        assert run_eval(tiny, tmp_path / b, "--steps", "1", "--batch-size", b) == 0
        figs.append(json.loads((tmp_path / b / "report.json").read_text())["figures"]["dopsd"])
    for k in figs[0]:
        assert figs[0][k]["value"] == pytest.approx(figs[1][k]["value"], rel=1e-4, abs=1e-6), k


def test_held_out_prompts_come_from_the_runs_config(full_eval):
    """No --prompts: the first run's --sample-prompt lines are the held-out set."""
    assert full_eval[2]["prompts"]["held"] == HELD


def test_clip_reads_the_class_name_for_v(full_eval):
    """CLIP scores the held-out prompts with [V] replaced by --class-name, as the authors do."""
    assert full_eval[2]["prompts"]["clip_text"] == ["a toy on the moon", "a toy in a garden"]


def test_the_base_is_its_own_retention_reference(full_eval):
    """The base row: RMS 0 and DINO cosine 1 to itself, sharpness 1 relative to itself, on both prompt sets."""
    base = full_eval[2]["figures"]["base"]
    assert base["retain_rms"]["value"] == 0
    assert base["sharpness_rel"]["value"] == pytest.approx(1) and base["retain_sharpness_rel"]["value"] == 1
    assert base["retain_dino"]["value"] == pytest.approx(1, abs=1e-5)


def test_model_free_figures_are_world_py_functions():
    """Sharpness and retention RMS are examples/toy/world.py's, the toy's own evaluation (one evaluation, not two)."""
    world = sys.modules["world"]
    assert ev.sharpness is world.sharpness and ev.rms is world.rms

# --------------------------------------------------------------------------------------------------------------------
# metric models are optional; a mistake is one line


def test_a_missing_metric_model_is_one_line_and_drops_only_its_columns(tiny, tmp_path, capsys):
    """--clip pointing nowhere: one 'clip: skipped' line, no traceback; DINO and the model-free figures still come."""
    assert run_eval(tiny, tmp_path, "--steps", "1", "--clip", str(tmp_path / "no_such_clip"), "--dino",
                    str(tiny / "dino")) == 0
    out = capsys.readouterr()
    skipped = [line for line in (out.out + out.err).splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("clip: skipped") and "no_such_clip" in skipped[0]
    assert "Traceback" not in out.out + out.err
    fig = json.loads((tmp_path / "report.json").read_text())["figures"]["dopsd"]
    assert "clip_t" not in fig and "dino" in fig and "retain_rms" in fig


def test_a_metric_model_of_another_architecture_is_one_line(tiny, tmp_path, capsys):
    """A DINOv3 folder as --clip and a CLIP folder as --judge: one line each naming what it is, before any weight is
    read; the evaluation goes on without them."""
    assert run_eval(tiny, tmp_path, "--steps", "1", "--clip", str(tiny / "dino"), "--judge", str(tiny / "clip")) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert skipped == [f"clip: skipped, --clip {tiny / 'dino'}: a dinov3_vit model; pass a CLIP (clip) model",
                       f"judge: skipped, --judge {tiny / 'clip'}: a clip model; pass a Qwen3-VL (qwen3_vl) model"]


def test_a_clip_that_ships_no_processor_takes_the_clip_processors(tiny, tmp_path):
    """A CLIP folder of weights alone (as apple/DFN5B-CLIP-ViT-H-14 ships): --clip-processor gives it a tokenizer and
    an image processor, and its CLIP-T equals that of the same CLIP shipped whole."""
    (tmp_path / "bare").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / "clip" / name, tmp_path / "bare" / name)
    figs = []
    for clip in ([str(tmp_path / "bare"), "--clip-processor", str(tiny / "clip")], [str(tiny / "clip")]):
        assert run_eval(tiny, tmp_path / "out", "--steps", "1", "--clip", *clip) == 0
        figs.append(json.loads((tmp_path / "out" / "report.json").read_text())["figures"]["dopsd"]["clip_t"])
    assert figs[0] == figs[1]


def test_the_steps_default_to_the_deploy_count(tiny, tmp_path):
    """No --steps: Z-Image-Turbo's 8 (the distilled step count the runs are deployed at)."""
    assert run_eval(tiny, tmp_path) == 0
    assert json.loads((tmp_path / "report.json").read_text())["steps"] == 8


@pytest.mark.parametrize("argv, flag", [
    (["--lora", "{tmp}/no_such_run"], "--lora"),
    (["--full", "{tiny}/dopsd"], "--full"),
    (["--full", "{tmp}/no_such_run"], "error: --full "),                   # not "--lora": the flag typed
    (["--lora", "{tiny}/dopsd", "--data", "{tmp}/no_such_data"], "--data"),
    (["--lora", "{tiny}/dopsd", "--prompts", "{tmp}/no_such_file.txt"], "--prompts"),
    (["--lora", "{tiny}/dopsd", "--seeds", "0,x"], "--seeds"),
    (["--lora", "{tiny}/dopsd", "--retain-prompt", "a [V] at home"], "--retain-prompts"),
    (["--lora", "{tiny}/dopsd", "--resolution", "50"], "--resolution"),
    (["--lora", "{tiny}/dopsd", "--out", "{tiny}/data/rgb.jpg"], "--out"),
    ([], "--lora"),
])
def test_a_mistake_on_the_command_line_is_one_line(tiny, tmp_path, capsys, argv, flag):
    """A wrong path, a bad value or no run at all: exit 2 and one error line naming the flag, before a model loads."""
    out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
    code = ev.main([a.format(tmp=tmp_path, tiny=tiny) for a in argv] + out)
    err = stderr_lines(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


def test_without_held_out_prompts_the_fix_is_one_line(tiny, tmp_path, capsys):
    """A LoRA file without a run folder's config and no --prompts: one error line naming --prompts, exit 2."""
    lora = tmp_path / "lone.safetensors"
    shutil.copy(tiny / "dopsd" / "pytorch_lora_weights.safetensors", lora)
    code = ev.main(["--model", str(tiny / "zimage"), "--lora", str(lora), "--out", str(tmp_path / "o")])
    err = stderr_lines(capsys)
    assert code == 2 and len(err) == 1 and "--prompts FILE" in err[0]

# --------------------------------------------------------------------------------------------------------------------
# the judge writes held-out prompts when none are given


def test_the_judges_prompt_lines_are_read_without_their_list_markers():
    """A reply's lines that hold [V] and 3+ words are prompts, list markers stripped; the preamble is not."""
    reply = "Here are two prompts:\n1. a [V] on a beach at dawn\n- [V] floating in space, oil painting\n* a [V]\n"
    assert ev.prompts_in_reply(reply, 4) == ["a [V] on a beach at dawn", "[V] floating in space, oil painting"]
    assert ev.prompts_in_reply(reply, 1) == ["a [V] on a beach at dawn"]


def test_a_judge_that_writes_no_usable_prompt_is_one_line(tiny, tmp_path, capsys):
    """--judge writes the held-out prompts when none are given; a random judge's text holds no [V]: one line."""
    lora = tmp_path / "lone.safetensors"
    shutil.copy(tiny / "dopsd" / "pytorch_lora_weights.safetensors", lora)
    code = ev.main(["--model", str(tiny / "zimage"), "--lora", str(lora), "--out", str(tmp_path / "o"), "--data",
                    str(tiny / "data"), "--judge", str(tiny / "vlm"), "--judge-prompts", "1", "--device", "cpu"])
    err = stderr_lines(capsys)
    assert code == 2 and len(err) == 1 and "wrote no usable held-out prompt" in err[0]

# --------------------------------------------------------------------------------------------------------------------
# runs as the user has them on disk


def test_a_run_folder_named_base_keeps_the_base_row(tiny, tmp_path):
    """Rows are named by run folder; one named 'base' becomes 'base #2', so the base row is never overwritten."""
    shutil.copytree(tiny / "dopsd", tmp_path / "base")
    assert [r.name for r in ev.read_runs([("lora", str(tmp_path / "base")), ("lora", str(tiny / "dopsd"))])] == [
        "base #2", "dopsd"]


def test_recorded_paths_are_found_from_another_working_directory(tmp_path, monkeypatch):
    """A run's config.json records --data as typed; eval.py finds it from the run's folder and its recorded --out."""
    (tmp_path / "start" / "imgs").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    run = ev.SimpleNamespace(folder=tmp_path / "start" / "runs" / "a", config={"out": "runs/a"})
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert ev.recorded_path(run, "imgs") == str(tmp_path / "start" / "imgs")
    assert ev.recorded_path(run, "org/model-id") == "org/model-id"          # (not a path there: a hub id, as it was)


def test_readme_eval_commands_parse():
    """Every `python examples/eval.py ...` line in examples/README.md parses with eval.py's parser (no stale flags)."""
    text = (ROOT / "examples" / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"python examples/eval\.py (.+)", text)
    assert len(commands) >= 2
    for c in commands:
        ev.build_parser().parse_args(shlex.split(c.split("#")[0]))
