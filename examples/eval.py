"""The paper's evaluation for your own concept: did D-OPSD (or SFT) learn it, keep few-step quality, keep the base?

Given the base model, one or more trained runs (`dopsd.py train --out` folders: LoRA runs with --lora, `--full` runs
with --full) and the training images, this samples every run and the base model at the deploy step count (Z-Image-Turbo
8, klein 4; no CFG) on the same noise -- seed s draws one noise tensor for all prompts of a set, prompt j takes row j,
so every row of the table saw exactly the same starting points -- and prints one table row per model:

  concept    held-out prompts that put [V] in new scenes (a file, the first run's --sample-prompt(s), or the judge's):
             CLIP-T = CLIP image-text cosine with [V] replaced by --class-name, as the authors score it;
             CLIP-I and DINO = mean cosine of the image to every training image (DreamBooth's definitions; DINOv3
             features are mean-pooled patch tokens, as the authors pool them);
             judge = a Qwen3-VL's concept-consistency level, 4 same / 3 mostly / 2 partly / 1 different (the authors'
             four levels), read from its next-token logits over "1".."4" after the training images and the sample;
  quality    PickScore (a CLIP fine-tuned on human preferences, loadable by transformers; the authors' reward model is
             internal, and their suggested HPSv3 needs its own package); sharpness = mean |neighbour pixel
             difference| (examples/toy/world.py's, the toy's figure) relative to the base's on the same noise;
  retention  prompts without the concept (--retain-prompts, or a small default list): CLIP-T, PickScore and sharpness
             as above, DINO cosine to the base's image from the same noise, and pixel RMS to it (world.py's rms;
             0 = the base unchanged).

Every metric model is optional and loads through transformers from a hub id or a local folder; one that cannot load is
one line and its columns are left out (the table header says which models were used). Sampling reuses dopsd.py (its
pipeline loader, LoRA loader, text features, Euler sampler and decoders); nothing of the model is re-implemented here.
Writes --out/report.json (every figure, per seed and per image), --out/table.md and --out/grid.png (the first seed's
images: one row a model, one column a prompt).

Protocol notes (method.md §10): the authors generate 1 MP images at 8 NFE, seed 30 + 100·idx, and score CLIP ViT-H-14
(open_clip), DINOv3 ViT-S+/16, LPIPS (VGG), a Qwen3-VL-8B judge on 4 held-out prompts per training image, and an
internal reward model. README "Evaluation" says which of these are reproduced, approximated and missing.

Run as (the toy: about 10 s on a 2-core CPU after its two runs are trained, README "Evaluation" has the full command):
  python examples/eval.py --model examples/toy/model --lora runs/dopsd --lora runs/sft --resolution 64 \\
      --prompt "a purple diamond, [V] style" --retain-prompt "a green circle"
  python examples/eval.py --lora runs/a --lora runs/b --data ./imgs --class-name dog --out runs/eval \\
      --clip apple/DFN5B-CLIP-ViT-H-14 --clip-processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K \\
      --dino facebook/dinov3-vits16plus-pretrain-lvd1689m --judge Qwen/Qwen3-VL-8B-Instruct \\
      --quality yuvalkirstain/PickScore_v1 --quality-processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K   # Z-Image, 1 GPU
"""
import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE / "toy")]
import dopsd  # noqa: E402
from dopsd import UserError  # noqa: E402
# The model-free figures are the toy's own functions, so eval.py and examples/toy/reproduce.py are one evaluation.
from world import rms, sharpness  # noqa: E402

# Prompts without any concept, for retention when no --retain-prompts is given: everyday subjects a base model draws
# well, so that a change in them is the fine-tune's doing.
DEFAULT_RETAIN = ["a photo of a dog running on a beach", "a bowl of ramen on a wooden table",
                  "a city street at night in the rain", "a portrait of an old man with a grey beard",
                  "a red vintage car parked by a brick wall", "a mountain lake at sunrise"]
JUDGE_REFS = 3                     # training images shown to the judge before each sample
JUDGE_PIXELS = 768 * 768           # the judge sees each image at most this large (the teacher's VLM limit)
LEVELS = {"object": "4 = the same instance, 3 = mostly the same, 2 = partly similar, 1 = a different one",
          "style": "4 = highly consistent, 3 = mostly consistent, 2 = slightly consistent, 1 = not consistent"}
# What each metric flag must point at (config.json's model_type): transformers would load a DINOv3 folder into a
# CLIPModel with every weight random, and only say so in a 70-line load report.
MODEL_TYPES = {"clip": ("clip", "CLIP"), "quality": ("clip", "CLIP-architecture preference model"),
               "dino": ("dinov3_vit", "DINOv3 ViT"), "judge": ("qwen3_vl", "Qwen3-VL")}

# --------------------------------------------------------------------------------------------------------------------
# command line


def build_parser():
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--model", help="the base diffusers pipeline the runs were trained on (default: the first run's config.json "
                      f"--model, else {dopsd.TrainConfig.model})")
    a("--lora", dest="runs", action="append", type=lambda s: ("lora", s), default=[], metavar="RUN",
      help="a LoRA run: its --out folder or .safetensors (repeat for more rows)")
    a("--full", dest="runs", action="append", type=lambda s: ("full", s), metavar="RUN",
      help="a `train --full` --out folder (repeat for more rows)")
    a("--data", action="append", help="training images folder (default: the first run's config.json --data)")
    a("--prompts", help="held-out prompts, one a line, with [V] where the concept goes (default: the first run's "
                        "--sample-prompt(s); else, with --judge, the judge writes them)")
    a("--prompt", action="append", help="a held-out prompt (repeat; added to --prompts)")
    a("--retain-prompts", help="prompts without the concept, one a line (default: 6 everyday prompts)")
    a("--retain-prompt", action="append", help="a prompt without the concept (repeat; added to --retain-prompts)")
    a("--class-name", default="", help="words that replace [V] in the text CLIP scores, e.g. 'dog' or 'watercolour' "
                                       "(the authors' rule); default: [V] dropped")
    a("--trigger", help="what [V] becomes in the sampled prompts (default: each run's --trigger, else [V] itself)")
    a("--concept", choices=["object", "style"], help="what the judge compares (default: style if the prompts say "
                                                      "'[V] style', else object)")
    a("--seeds", default="0,1", help="comma-separated noise seeds, the same for every model")
    a("--steps", type=int, help="sampling steps (default: the deploy count, Z-Image-Turbo 8, klein 4)")
    a("--resolution", type=int, default=1024, help="square images of this many pixels a side, multiple of 16")
    a("--batch-size", type=int, default=4, help="images per DiT call (the noise does not depend on it)")
    a("--clip", help="CLIP model for CLIP-T / CLIP-I (hub id or folder)")
    a("--clip-processor", help="tokenizer and image processor of --clip if it ships none "
                               "(apple/DFN5B-CLIP-ViT-H-14: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    a("--dino", help="DINOv3 ViT model for DINO similarity (hub id or folder)")
    a("--judge", help="Qwen3-VL instruct model: consistency levels, and the held-out prompts if none are given")
    a("--judge-prompts", type=int, default=4, help="prompts the judge writes per training image (the authors: 4)")
    a("--quality", help="a CLIP-architecture preference model, e.g. yuvalkirstain/PickScore_v1")
    a("--quality-processor", help="tokenizer and image processor of --quality if it ships none "
                                  "(PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    a("--out", default="runs/eval", help="folder for report.json, table.md and grid.png")
    a("--device", default="auto", help="auto (cuda -> mps -> cpu), or e.g. cpu")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 on cuda/mps, fp32 on CPU")
    return p


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]; anything else is one line naming --seeds."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(not 0 <= s < 2 ** 63 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: pass distinct non-negative integers separated by commas, e.g. 0,1,2")
    return seeds


def check_args(args):
    """Everything the command line alone can refuse, before a model loads."""
    dopsd.refuse([(not args.runs, "no run to evaluate: pass --lora RUN (or --full RUN), once per run"),
                  (args.resolution < 16 or args.resolution % 16, f"--resolution {args.resolution}: pass a multiple "
                   "of 16"),
                  (args.steps is not None and args.steps < 1, f"--steps {args.steps}: pass at least 1"),
                  (args.batch_size < 1, f"--batch-size {args.batch_size}: pass at least 1"),
                  (args.judge_prompts < 1, f"--judge-prompts {args.judge_prompts}: pass at least 1")])
    for flag, f in (("--prompts", args.prompts), ("--retain-prompts", args.retain_prompts)):
        if f and not Path(f).is_file():
            raise UserError(f"{flag} {f}: file not found; pass a text file with one prompt a line")
    dopsd.check_out_path(args.out, "--out", folder=True)
    dopsd.check_device(args.device)

# --------------------------------------------------------------------------------------------------------------------
# the runs, their prompts and the training images


def read_runs(specs):
    """[(kind, path)] -> one SimpleNamespace per run: name (a unique row label, never "base"), kind, spec, weights
    path, folder and its config.json ({} for a lone .safetensors)."""
    runs, seen = [], {"base": 1}                     # a run folder named base must not overwrite the base row
    for kind, spec in specs:
        got, path = dopsd.lora_source(spec, flag=f"--{kind}")
        if kind == "full" and got != "full":
            raise UserError(f"--full {spec}: no transformer/ folder in it; pass a `train --full` --out folder, or "
                            "use --lora for a LoRA run")
        folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
        name = folder.resolve().name
        seen[name] = seen.get(name, 0) + 1        # two runs of one name (a/out, b/out) get out and out #2
        runs.append(SimpleNamespace(name=name if seen[name] == 1 else f"{name} #{seen[name]}", kind=got, spec=spec,
                                    path=path, folder=folder, config=dopsd.read_json(folder / "config.json")))
    return runs


def check_families(runs, family):
    """Refuse a run trained for another model family than --model's, from the weights' headers (no tensor read)."""
    for r in runs:
        trained = dopsd.weights_family(r.kind, r.path, f"--{r.kind}")
        if trained and trained != family:
            raise UserError(f"--{r.kind} {r.spec}: trained for {dopsd.FAMILIES[trained]['arch']}, but --model is "
                            f"{dopsd.FAMILIES[family]['arch']}; pass the --model it was trained on")


def recorded_path(run, value):
    """A path that a run's config.json recorded as it was typed: relative to the folder that run was started in. That
    folder is the run's folder less its recorded --out, so the path is found from any working directory."""
    p, out, folder = Path(value), Path(run.config.get("out") or ""), run.folder.resolve()
    if p.is_absolute() or out.is_absolute() or not out.parts or folder.parts[-len(out.parts):] != out.parts:
        return str(p)                                # (an --out with .. in it: the start folder is not known)
    start = folder.parents[len(out.parts) - 1]
    return str(start / p) if (start / p).exists() else str(p)     # else a hub id, or moved: as recorded


def prompt_lines(flags, file, flag):
    """Prompts from repeated flags, then a file's non-blank lines."""
    lines = list(flags or [])
    if file:
        lines += dopsd.read_text_file(file, flag).splitlines()
    return [p.strip() for p in lines if p.strip()]


def config_prompts(run):
    """A run's own held-out prompts: its --sample-prompt flags and --sample-prompts file (if it is still there)."""
    file = run.config.get("sample_prompts")
    file = recorded_path(run, file) if file else None
    return prompt_lines(run.config.get("sample_prompt"), file if file and Path(file).is_file() else None,
                        "--sample-prompts")


def retain_prompts(args):
    prompts = prompt_lines(args.retain_prompt, args.retain_prompts, "--retain-prompts") or DEFAULT_RETAIN
    bad = [p for p in prompts if "[V]" in p]
    dopsd.refuse([(bad, f"--retain-prompts: '{bad[0] if bad else ''}' holds [V]; retention prompts are prompts "
                   "without the concept: remove [V] from them")])
    return prompts


def training_items(args, run):
    """The training images ([dopsd.Item], captions with [V] kept): --data, else the first run's recorded --data
    (each FOLDER:N found again from where that run was started); [] when neither is here."""
    caption = run.config.get("caption")              # a run trained with --caption has no .txt files to read
    if args.data:
        return dopsd.scan_data(args.data, caption)
    specs = []
    for spec in run.config.get("data") or []:
        folder, repeat = dopsd.parse_data_flag(spec)
        specs.append(recorded_path(run, folder) + (f":{repeat}" if repeat > 1 else ""))
    if not specs or not all(Path(dopsd.parse_data_flag(s)[0]).is_dir() for s in specs):
        return []                                    # score() says what that leaves out
    return dopsd.scan_data(specs, caption)


def clip_text(prompt, class_name, trigger):
    """The text CLIP scores: [V] (or the run's trigger word) replaced by the class name, spaces tidied."""
    for word in ("[V]", *([trigger] if trigger else [])):
        prompt = prompt.replace(word, class_name)
    return re.sub(r"\s+([,.])", r"\1", re.sub(r"\s{2,}", " ", prompt)).strip()

# --------------------------------------------------------------------------------------------------------------------
# sampling: dopsd.py's own sampler, on noise that every model shares


def release(device):
    """Give an accelerator's cached memory back between models (on the CPU there is no cache, and gc costs seconds)."""
    if device.type != "cpu":
        dopsd.free_device(device)


def seed_noise(seeds, n, shape):
    """{seed: [n, C, h, w]}: one draw per seed for a whole prompt set (prompt j takes row j), on the CPU, so the noise
    is the same on any device, for every model and any --batch-size -- and the same as examples/toy/reproduce.py
    draws it."""
    return {s: torch.randn(n, *shape, generator=torch.Generator().manual_seed(s)) for s in seeds}


def encode(family, pipe, texts, device, batch=4):
    """{text: the student's conditioning} for every distinct text; then the text encoder leaves the device."""
    te, uniq, feats = dopsd.text_model(pipe.text_encoder).to(device), list(dict.fromkeys(texts)), {}
    for i in range(0, len(uniq), batch):
        feats.update(zip(uniq[i:i + batch], dopsd.student_features(family, te, pipe.tokenizer, uniq[i:i + batch])))
    pipe.text_encoder.to("cpu")
    release(device)                        # the DiT gets the device to itself
    return feats


@torch.no_grad()
def draw(pipe, family, conds, noise, sigmas, autocast, batch, bar):
    """Images of one prompt set: conditioning j from noise row j, `batch` prompts per DiT call -> list of PIL."""
    fam, images = dopsd.FAMILIES[family], []
    for i in range(0, len(conds), batch):
        cond = dopsd.collate(conds[i:i + batch])
        with autocast():
            x = dopsd.euler_sample(lambda x, s: fam["velocity"](pipe.transformer, x, s, cond),
                                   noise[i:i + batch].to(pipe.vae.device), sigmas)
            images += fam["decode"](pipe.vae, x)
        bar.update(len(conds[i:i + batch]))
    return images


def load_row(pipe, row, device):
    """Put a row's weights into the pipeline (the base row: none); returns the function that restores the base DiT."""
    if row.kind == "base":
        return lambda: None
    if row.kind == "lora":
        dopsd.load_weights(pipe, row.spec)
        return pipe.unload_lora_weights
    base = pipe.transformer.to("cpu")                # a --full run is a second DiT: the base waits on the CPU
    release(device)
    dopsd.load_weights(pipe, row.spec)
    pipe.transformer.eval().to(device)

    def restore():
        pipe.transformer = None                      # (drop the trained DiT before the base comes back)
        release(device)
        pipe.transformer = base.to(device)
    return restore


def sample_all(model, family, rows, sets, seeds, steps, resolution, batch, device, dtype, autocast):
    """{row name: {set name: {seed: [PIL per prompt]}}} for every row (the base first), on shared noise.
    sets: {set name: prompts, with [V] where each row's trigger goes}."""
    from tqdm import tqdm
    pipe = dopsd.load_pipeline(model, dtype)
    pipe.transformer.eval()
    texts = {(r.name, k): [p.replace("[V]", r.trigger) for p in ps] for r in rows for k, ps in sets.items()}
    feats = encode(family, pipe, [t for ts in texts.values() for t in ts], device)
    h = w = resolution // dopsd.latent_cell(family, pipe.vae)
    sigmas = dopsd.schedule(family, steps, h, w)
    noise = {k: seed_noise(seeds, len(ps), (pipe.transformer.config.in_channels, h, w)) for k, ps in sets.items()}
    pipe.transformer.to(device), pipe.vae.to(device)
    images = {}
    with tqdm(total=len(rows) * len(seeds) * sum(map(len, sets.values())), desc="sampling", unit="img") as bar:
        for r in rows:
            restore = load_row(pipe, r, device)
            images[r.name] = {k: {s: draw(pipe, family, [feats[t] for t in texts[r.name, k]], noise[k][s], sigmas,
                                          autocast, batch, bar) for s in seeds} for k in sets}
            restore()
    del pipe
    release(device)
    return images

# --------------------------------------------------------------------------------------------------------------------
# metric models: each optional, loaded through transformers one at a time, after the diffusion model has left


def check_model_type(kind, path):
    """Refuse, before any weight is read, a folder of another architecture than `kind` needs (a DINOv3 as --clip)."""
    from transformers import AutoConfig
    want, what = MODEL_TYPES[kind]
    got = AutoConfig.from_pretrained(path).model_type
    dopsd.refuse([(got != want, f"--{kind} {path}: a {got} model; pass a {what} ({want}) model")])


def load_metric(kind, path, device, dtype, processor=None):
    """The metric model `kind` ("clip", "dino", "judge", "quality") from a hub id or folder, or None after one line
    saying why it is skipped (not found, offline, not that architecture): a missing metric drops its columns only."""
    flag = f"--{kind}"
    try:
        dopsd.check_reachable(path, flag, "config.json")
        if processor:
            dopsd.check_reachable(processor, f"{flag}-processor", "tokenizer_config.json")
        check_model_type(kind, path)
        model = LOADERS[kind](path, dtype, processor)
    except Exception as e:                           # any failure here costs a column, never the evaluation
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        print(f"{kind}: skipped, {why if isinstance(e, UserError) else f'{flag} {path}: {type(e).__name__}: {why}'}")
        return None
    model.net.to(device).eval().requires_grad_(False)
    print(f"{kind}: {path}")
    return model


def _clip(path, dtype, processor=None):
    """CLIPModel (or PickScore, a CLIPModel) + tokenizer + PIL image processor (the torchvision-free backend)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel
    src = processor or path
    return SimpleNamespace(net=CLIPModel.from_pretrained(path, dtype=dtype), tok=AutoTokenizer.from_pretrained(src),
                           ip=CLIPImageProcessorPil.from_pretrained(src))


def _dino(path, dtype, processor=None):
    """DINOv3 ViT + its preprocessing numbers (its image processor class needs torchvision; the numbers do not)."""
    from transformers import AutoModel
    from transformers.image_processing_base import ImageProcessingMixin
    cfg = ImageProcessingMixin.get_image_processor_dict(path)[0]
    size = cfg.get("size", {"height": 224, "width": 224})
    return SimpleNamespace(net=AutoModel.from_pretrained(path, dtype=dtype), size=(size["width"], size["height"]),
                           mean=cfg.get("image_mean", [0.485, 0.456, 0.406]),
                           std=cfg.get("image_std", [0.229, 0.224, 0.225]))


def _judge(path, dtype, processor=None):
    """Qwen3-VL instruct model with its LM head (it answers), tokenizer and PIL image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration
    return SimpleNamespace(net=Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype),
                           tok=AutoTokenizer.from_pretrained(path), ip=AutoImageProcessor.from_pretrained(path))


LOADERS = {"clip": _clip, "dino": _dino, "judge": _judge, "quality": _clip}


def unit(x):
    return torch.nn.functional.normalize(x.float(), dim=-1)


@torch.no_grad()
def clip_images(m, images, batch=16):
    """[N, E] unit CLIP image embeddings."""
    dev, dt = m.net.device, m.net.dtype
    return torch.cat([unit(m.net.get_image_features(pixel_values=m.ip(images=images[i:i + batch], return_tensors="pt")
                                                    ["pixel_values"].to(dev, dt)).pooler_output)
                      for i in range(0, len(images), batch)]).cpu()


@torch.no_grad()
def clip_texts(m, texts):
    """[N, E] unit CLIP text embeddings (cut at the model's 77 positions)."""
    tok = m.tok(texts, padding=True, truncation=True, return_tensors="pt",
                max_length=m.net.config.text_config.max_position_embeddings).to(m.net.device)
    return unit(m.net.get_text_features(**tok).pooler_output).cpu()


@torch.no_grad()
def dino_images(m, images, batch=16):
    """[N, D] unit DINOv3 embeddings: patch tokens averaged (not CLS or registers), as the authors pool them. The
    preprocessing is the processor's own: RGB /255, resize (PIL, antialiased bilinear), ImageNet normalisation."""
    mean, std = torch.tensor(m.mean).view(3, 1, 1), torch.tensor(m.std).view(3, 1, 1)
    skip = 1 + m.net.config.num_register_tokens
    out = []
    for i in range(0, len(images), batch):
        px = torch.stack([(torch.from_numpy(np.asarray(im.convert("RGB").resize(m.size, 2), np.float32) / 255)
                           .permute(2, 0, 1) - mean) / std for im in images[i:i + batch]])
        out.append(unit(m.net(pixel_values=px.to(m.net.device, m.net.dtype)).last_hidden_state[:, skip:].mean(1)))
    return torch.cat(out).cpu()


def judge_inputs(m, images, text):
    """One user turn [images..., text] for Qwen3-VL, rendered as its chat template renders it (no system prompt),
    with each <|image_pad|> expanded to the image's merged patch count (as dopsd.vlm_features does: the Qwen3-VL
    processor class needs torchvision for its video half)."""
    size = dict(m.ip.size)
    size["longest_edge"] = min(size.get("longest_edge", JUDGE_PIXELS), JUDGE_PIXELS)
    pix = m.ip(images=images, return_tensors="pt", size=size)
    grid = pix["image_grid_thw"]                                             # [n, 3] = (t, h, w) in patches
    vision = "".join("<|vision_start|>" + "<|image_pad|>" * (int(g.prod()) // m.ip.merge_size ** 2)
                     + "<|vision_end|>" for g in grid)
    ids = m.tok(f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt").input_ids
    dev = m.net.device
    return dict(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev),
                mm_token_type_ids=(ids == m.tok.convert_tokens_to_ids("<|image_pad|>")).long().to(dev),
                pixel_values=pix["pixel_values"].to(dev, m.net.dtype), image_grid_thw=grid.to(dev))


def judge_question(concept, n_refs):
    return (f"The first {n_refs} image(s) show a {'subject' if concept == 'object' else 'visual style'}, the "
            f"concept. How consistent is the {'subject' if concept == 'object' else 'style'} of the last image with "
            f"it? {LEVELS[concept]}. Answer with one digit.")


@torch.no_grad()
def judge_levels(m, refs, images, concept):
    """(level [N], expected level [N]): the judge's answer to judge_question for each image after the references,
    read from its next-token logits over the digits 1..4 -- the level a greedy judge answering with a digit gives,
    with no text to parse; the expectation keeps how sure it was."""
    digits = [m.tok.encode(str(k), add_special_tokens=False)[0] for k in range(1, 5)]
    levels, means = [], []
    for im in images:
        logits = m.net(**judge_inputs(m, [*refs, im], judge_question(concept, len(refs))),
                       logits_to_keep=1).logits[0, -1, digits].float()
        p = logits.softmax(-1).cpu()
        levels.append(int(p.argmax()) + 1)
        means.append(float((p * torch.arange(1, 5)).sum()))
    return np.array(levels, float), np.array(means)


def prompts_in_reply(reply, n):
    """The first n lines of a judge's reply that are prompts: list markers ('1.', '2)', '-', '*') stripped, holding
    [V] and at least 3 words (a preamble such as 'Here are 4 prompts:' holds no [V])."""
    lines = [re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", line).strip() for line in reply.splitlines()]
    return [line for line in lines if "[V]" in line and len(line.split()) >= 3][:n]


@torch.no_grad()
def judge_write_prompts(m, items, n, concept):
    """Held-out prompts written by the judge, n per training image, as the authors' script has Qwen3-VL write them:
    new scenes keeping [V] (objects; half realistic, half imaginative) or new subjects '... in [V] style' (styles)."""
    from tqdm import tqdm
    ask = {"object": "Write {n} new text-to-image prompts that put the same subject, written [V], into new scenes: "
                     "at least half realistic, at least half imaginative.",
           "style": "Write {n} new text-to-image prompts for other subjects and compositions drawn in the same "
                    "style, written '[V] style'."}[concept]
    prompts = []
    for it in tqdm(items, desc="judge writes prompts", unit="img"):
        text = (f"This image is captioned: \"{it.captions[0]}\". " + ask.format(n=n)
                + " Each prompt must contain [V]. One prompt a line, no numbering.")
        inputs = judge_inputs(m, [dopsd.load_rgb(it.path)], text)
        out = m.net.generate(**inputs, max_new_tokens=48 * n, do_sample=False)
        prompts += prompts_in_reply(m.tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), n)
    if not prompts:
        raise UserError("--judge wrote no usable held-out prompt (none holds [V]); pass --prompts FILE, one prompt a "
                        "line with [V] where the concept goes")
    return prompts

# --------------------------------------------------------------------------------------------------------------------
# scores: per image first ([seed, prompt] arrays), then pooled over seeds (the table) and per seed (its spread).
# images is sample_all's {row: {set: {seed: [PIL]}}}; texts is {set: the prompts as CLIP reads them}.


def flat(images, row, k):
    """One row's images of set k, seed-major: seed 0's prompts, then seed 1's, ..."""
    return [im for per_seed in images[row][k].values() for im in per_seed]


def by_seed(values, images, k):
    """Per-image values of set k, seed-major -> [S, P] array."""
    return np.asarray(values, dtype=float).reshape(len(images["base"][k]), -1)


def model_free_figures(images):
    """Sharpness of every image, on both prompt sets (world.sharpness: the toy's figure)."""
    return {r: {f"{pre}sharpness": by_seed([sharpness(im) for im in flat(images, r, k)], images, k)
                for pre, k in (("", "held"), ("retain_", "retain"))} for r in images}


def clip_cosines(m, images, texts, row, t):
    """{set: ([S·P, E] unit image embeddings, [S, P] cosine of each image with its prompt)} for one row.
    t: {set: [P, E] unit text embeddings}; image i of a seed-major list goes with prompt i mod P."""
    out = {}
    for k in texts:
        e = clip_images(m, flat(images, row, k))
        out[k] = e, by_seed((e * t[k].repeat(len(e) // len(t[k]), 1)).sum(-1), images, k)
    return out


def clip_figures(m, images, texts, refs, concept, bar):
    """CLIP-T on both prompt sets; CLIP-I, the held-out images' mean cosine to every training image."""
    t = {k: clip_texts(m, v) for k, v in texts.items()}
    ref = clip_images(m, refs) if refs else None
    fig = {}
    for r in images:
        c = clip_cosines(m, images, texts, r, t)
        fig[r] = {"clip_t": c["held"][1], "retain_clip_t": c["retain"][1]}
        if ref is not None:
            fig[r]["clip_i"] = by_seed((c["held"][0] @ ref.T).mean(1), images, "held")
        bar.update()
    return fig


def quality_figures(m, images, texts, refs, concept, bar):
    """PickScore on both prompt sets: the image-text cosine times the model's logit scale, as PickScore is scored."""
    t, scale, fig = {k: clip_texts(m, v) for k, v in texts.items()}, float(m.net.logit_scale.exp()), {}
    for r in images:
        c = clip_cosines(m, images, texts, r, t)
        fig[r] = {"quality": scale * c["held"][1], "retain_quality": scale * c["retain"][1]}
        bar.update()
    return fig


def dino_figures(m, images, texts, refs, concept, bar):
    """DINO: the held-out images' mean cosine to every training image; a retention image's cosine to the base's image
    from the same noise and prompt."""
    ref, base, fig = dino_images(m, refs) if refs else None, dino_images(m, flat(images, "base", "retain")), {}
    for r in images:
        fig[r] = {"retain_dino": by_seed((dino_images(m, flat(images, r, "retain")) * base).sum(-1), images, "retain")}
        if ref is not None:
            fig[r]["dino"] = by_seed((dino_images(m, flat(images, r, "held")) @ ref.T).mean(1), images, "held")
        bar.update()
    return fig


def judge_figures(m, images, texts, refs, concept, bar):
    """The judge's level (and expected level) for every held-out image, against the first JUDGE_REFS training
    images."""
    fig = {}
    for r in images:
        level, expected = judge_levels(m, refs[:JUDGE_REFS], flat(images, r, "held"), concept)
        fig[r] = {"judge": by_seed(level, images, "held"), "judge_expected": by_seed(expected, images, "held")}
        bar.update()
    return fig


SCORERS = {"clip": clip_figures, "dino": dino_figures, "judge": judge_figures, "quality": quality_figures}


def score(args, images, texts, refs, concept, device, dtype):
    """The model-free figures, then each given metric model in turn: loaded, every row scored, let go.
    Returns ({row: {figure: [S, P]}}, {kind: the model used})."""
    from tqdm import tqdm
    fig, used = model_free_figures(images), {}
    wanted = {k: getattr(args, k) for k in SCORERS if getattr(args, k)}
    if not refs and wanted.keys() & {"clip", "dino", "judge"}:
        print("training images: none (no --data, and the first run's recorded --data is not here): CLIP-I, DINO to "
              "them and the judge are left out; pass --data FOLDER")
        wanted.pop("judge", None)
    with tqdm(total=len(wanted) * len(images), desc="scoring", unit="row", disable=not wanted) as bar:
        for kind, path in wanted.items():
            m = load_metric(kind, path, device, dtype, getattr(args, f"{kind}_processor", None))
            if m is None:
                bar.update(len(images))
                continue
            used[kind] = path
            bar.set_postfix_str(kind)
            for r, f in SCORERS[kind](m, images, texts, refs, concept, bar).items():
                fig[r].update(f)
            del m
            release(device)
    return fig, used


def summarise(fig, images):
    """{row: {figure: {"value": pooled over all seeds, "per_seed": [...]}}}. Means pool as means; sharpness is also
    given relative to the base's (mean over mean, the way reproduce.py relates it to its teacher); retention RMS pools
    over every pixel of every seed (world.rms on the whole list, as reproduce.py calls it)."""
    out = {}
    for r, f in fig.items():
        out[r] = {k: {"value": float(v.mean()), "per_seed": v.mean(1).tolist()} for k, v in f.items()}
        for k in ("sharpness", "retain_sharpness"):
            b = fig["base"][k]
            out[r][f"{k}_rel"] = {"value": float(f[k].mean() / b.mean()),
                                  "per_seed": (f[k].mean(1) / b.mean(1)).tolist()}
        out[r]["retain_rms"] = {"value": rms(flat(images, r, "retain"), flat(images, "base", "retain")),
                                "per_seed": [rms(images[r]["retain"][s], images["base"]["retain"][s])
                                             for s in images[r]["retain"]]}
    return out


COLUMNS = [("clip_t", "CLIP-T ↑", 3), ("clip_i", "CLIP-I ↑", 3), ("dino", "DINO ↑", 3),
           ("judge", "judge 1-4 ↑", 2),
           ("quality", "PickScore ↑", 2), ("sharpness_rel", "sharpness (base = 1)", 3),
           ("retain_clip_t", "retain CLIP-T ↑", 3), ("retain_quality", "retain PickScore ↑", 2),
           ("retain_sharpness_rel", "retain sharpness (base = 1)", 3), ("retain_dino", "retain DINO to base ↑", 3),
           ("retain_rms", "retain RMS to base ↓", 3)]


def table(summary):
    """Markdown table, one row per model, the columns some row has; value ± std over seeds when there are several."""
    cols = [c for c in COLUMNS if any(c[0] in s for s in summary.values())]
    cell = lambda f, d: f"{f['value']:.{d}f}" + (f" ± {np.std(f['per_seed']):.{d}f}" if len(f["per_seed"]) > 1 else "")
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(cell(s[k], d) if k in s else "–" for k, _, d in cols) + " |"
              for r, s in summary.items()]
    return "\n".join(lines)


def write_grid(images, captions, path, columns=(8, 4)):
    """The first seed's images, one row a model, the first 8 held-out and 4 retention prompts (dopsd's grid)."""
    seed = next(iter(images["base"]["held"]))
    pick = lambda r: images[r]["held"][seed][:columns[0]] + images[r]["retain"][seed][:columns[1]]
    caps = captions["held"][:columns[0]] + captions["retain"][:columns[1]]
    dopsd.save_grid([(r[:18], pick(r)) for r in images], caps, path)

# --------------------------------------------------------------------------------------------------------------------
# the evaluation, end to end


def heldout_prompts(args, run, items, device, dtype):
    """--prompt/--prompts, else the first run's own sample prompts, else prompts the --judge writes (saved to --out)."""
    held = prompt_lines(args.prompt, args.prompts, "--prompts") or config_prompts(run)
    if held or not args.judge:
        dopsd.refuse([(not held, "no held-out prompts: pass --prompts FILE (one prompt a line, [V] where the concept "
                       "goes), train the runs with --sample-prompt, or pass --judge to have them written")])
        return held
    dopsd.refuse([(not items, "--judge writes the held-out prompts from the training images: pass --data FOLDER, "
                   "or --prompts FILE")])
    judge = load_metric("judge", args.judge, device, dtype)
    dopsd.refuse([(judge is None, f"--judge {args.judge} could not load, and it was to write the held-out prompts: "
                   "pass --prompts FILE or a judge that loads")])
    concept = args.concept or ("style" if any("[V] style" in c for it in items for c in it.captions) else "object")
    held = judge_write_prompts(judge, items, args.judge_prompts, concept)
    (Path(args.out) / "heldout_prompts.txt").write_text("\n".join(held) + "\n")
    print(f"the judge wrote {len(held)} held-out prompts -> {Path(args.out) / 'heldout_prompts.txt'}")
    del judge
    release(device)
    return held


def plan(args):
    """Everything that can be read and refused before a model loads: model, family, rows (the base first), training
    images, retention prompts, seeds, steps."""
    check_args(args)
    seeds, runs = parse_seeds(args.seeds), read_runs(args.runs)
    recorded = runs[0].config.get("model")
    model = args.model or (recorded_path(runs[0], recorded) if recorded else dopsd.TrainConfig.model)
    family = dopsd.pipeline_family(model)
    check_families(runs, family)
    for r in runs:
        r.trigger = args.trigger or r.config.get("trigger") or "[V]"
    base = SimpleNamespace(name="base", kind="base", trigger=runs[0].trigger)   # the base sees the first run's words
    items, retain = training_items(args, runs[0]), retain_prompts(args)
    dopsd.check_writable(args.out, "--out")
    return SimpleNamespace(model=model, family=family, runs=runs, rows=[base, *runs], items=items, retain=retain,
                           seeds=seeds, steps=args.steps or dopsd.FAMILIES[family]["deploy"])


def write_report(args, p, held, texts, concept, images, fig, used):
    """Print the table and write table.md, grid.png and report.json into --out."""
    summary, out = summarise(fig, images), Path(args.out)
    head = (f"{p.model} ({p.family}), {p.steps} steps, {args.resolution}², seeds {p.seeds}, {len(held)} held-out and "
            f"{len(p.retain)} retention prompts, {len(p.items)} training images\nmetric models: "
            + ", ".join(f"{k} {used.get(k, '–')}" for k in SCORERS))
    md = head + "\n\n" + table(summary) + "\n"
    print("\n" + md)
    write_grid(images, {"held": [t.replace("[V]", p.runs[0].trigger) for t in held], "retain": p.retain},
               out / "grid.png")
    (out / "table.md").write_text(md)
    (out / "report.json").write_text(json.dumps(dict(
        model=p.model, family=p.family, steps=p.steps, resolution=args.resolution, seeds=p.seeds, concept=concept,
        metric_models=used, prompts=dict(held=held, retain=p.retain, clip_text=texts["held"]),
        runs={r.name: dict(kind=r.kind, path=str(getattr(r, "path", "")), trigger=r.trigger) for r in p.rows},
        figures=summary, per_image={r: {k: v.tolist() for k, v in f.items()} for r, f in fig.items()}), indent=1))
    print(f"wrote {out / 'report.json'}, {out / 'table.md'}, {out / 'grid.png'}")


def evaluate(args):
    p = plan(args)
    device = dopsd.pick_device(args.device)
    dtype, autocast, _ = dopsd.pick_precision(device, args.precision, None)
    held = heldout_prompts(args, p.runs[0], p.items, device, dtype)
    concept = args.concept or ("style" if any("[V] style" in t for t in held) else "object")
    images = sample_all(p.model, p.family, p.rows, {"held": held, "retain": p.retain}, p.seeds, p.steps,
                        args.resolution, args.batch_size, device, dtype, autocast)
    texts = {"held": [clip_text(t, args.class_name, p.runs[0].trigger) for t in held], "retain": p.retain}
    refs = [dopsd.load_rgb(it.path) for it in p.items]
    fig, used = score(args, images, texts, refs, concept, device, dtype)
    write_report(args, p, held, texts, concept, images, fig, used)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl
    dl.disable_progress_bar(), tl.disable_progress_bar()   # our own bars say how far it is
    try:
        return evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
