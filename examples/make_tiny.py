"""Tiny random-weight Z-Image-Turbo, FLUX.2-klein and Qwen3-VL checkpoints, built offline from configs.

The models are the *real* architectures (the same diffusers / transformers classes as the hub checkpoints) shrunk to
~0.1-0.6 M parameters each, saved with save_pretrained so that everything downstream loads them by path exactly like
Tongyi-MAI/Z-Image-Turbo, black-forest-labs/FLUX.2-klein-4B and Qwen/Qwen3-VL-4B-Instruct. No network, no GPU, no
torchvision. The weights are random (fixed seed), so images are noise: this is for tests and smoke runs, not quality.

Run as: python examples/make_tiny.py --out tiny            (--metrics: also the metric models of examples/eval.py)

    tiny/zimage      ZImagePipeline        (Qwen3Model text encoder, AutoencoderKL, ZImageTransformer2DModel)
    tiny/klein       Flux2KleinPipeline    (Qwen3ForCausalLM, AutoencoderKLFlux2, Flux2Transformer2DModel), distilled
    tiny/vlm         Qwen3VLForConditionalGeneration + tokenizer + image processor (the Z-Image teacher's VLM)
    tiny/clip        CLIPModel + tokenizer + image processor (examples/eval.py's CLIP and PickScore; --metrics)
    tiny/dino        DINOv3ViTModel + preprocessor config (examples/eval.py's DINO; --metrics)
    tiny/data        8 small images in mixed formats/modes + same-name .txt captions containing "[V]"
    tiny/data_jsonl  the same kind of images, captions in metadata.jsonl

klein's text_encoder_out_layers is a __call__ / encode_prompt argument, not a config entry, and its default (9, 18, 27)
needs >= 27 encoder layers: with the 4-layer tiny encoder pass text_encoder_out_layers=KLEIN_TEXT_LAYERS.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                       Flux2Transformer2DModel, ZImagePipeline, ZImageTransformer2DModel)
from PIL import Image, ImageDraw
from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen3Config, Qwen3ForCausalLM, Qwen3Model,
                          Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLTextConfig)

SEED = 0
# One tiny Qwen3 shared by all three models. The VLM's text config must equal it exactly, so that the teacher trick
# "copy the Z-Image text encoder into vlm.model.language_model" matches every tensor by name and shape.
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, tie_word_embeddings=True)  # Qwen3-4B ties its embeddings too
ROPE_THETA = 1e6  # Qwen3-4B's value (Qwen3-VL-4B uses 5e6; kept equal here on purpose)
# klein takes hidden_states[9, 18, 27] of a 36-layer Qwen3 (1/4, 1/2, 3/4 depth); the same fractions of 4 layers.
# Not (2, 3, 4): hidden_states[-1] is the output after the final RMSNorm (std ~1 vs ~0.02 for the others here),
# which the real choice never touches.
KLEIN_TEXT_LAYERS = (1, 2, 3)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
THINK = ["<think>", "</think>"]  # added tokens, but not "special" in the real Qwen3 tokenizer either

# Minimal Qwen3 / Qwen3-VL chat template. String content renders as in Qwen3; list content as in Qwen3-VL (an image
# item becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor later expands). enable_thinking=False
# appends the empty think block (klein); true or unset appends nothing (Z-Image).
CHAT_TEMPLATE = r"""{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif item['type'] == 'video' or 'video' in item -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in item -%}
{{- item['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}"""


# -----------------------------------------------------------------------------
# Shared pieces: tokenizer, text config, weight sanity

def build_tokenizer():
    """Byte-level Qwen2Tokenizer with 265 tokens: one per byte, <|endoftext|>, and the Qwen chat/vision/think tokens."""
    # No merges, so every byte is its own token; the real tokenizer has 151k BPE tokens but the same pipeline
    # (NFC -> Qwen regex split -> byte-level), so templates and special tokens behave identically.
    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    for s in ["<|endoftext|>"] + SPECIAL + THINK:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                         eos_token="<|im_end|>", additional_special_tokens=SPECIAL, padding_side="right",
                         model_max_length=131072)
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in THINK])  # whole tokens, ids from vocab
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) == 265, len(tok)
    return tok


def text_config(tok, cls=None):
    """The tiny Qwen3 text config (Qwen3Config, or the given config class, e.g. Qwen3VLTextConfig)."""
    return (cls or Qwen3Config)(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TEXT,
                                rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})


def init_dit_(model, pad_std=0.02):
    """Re-initialise a random DiT so that every input visibly matters; returns the all-zero tensors it filled.

    diffusers 0.42.1 zero-inits nothing that matters (no DiT-style zero final layer or adaLN), but its nn.Linear
    default, kaiming_uniform(a=sqrt(5)), has std 1/sqrt(3 fan_in): every bias-free Linear shrinks the signal ~0.6x. In
    FLUX.2 the chain timestep MLP -> modulation Linear then yields adaLN gates of std ~0.03, so the blocks barely touch
    the residual stream: swapping the text context moved the output by 0.5% of its std (Z-Image: 20%). A teacher
    context or a LoRA on attention would be nearly invisible in tests. LeCun-normal, std 1/sqrt(fan_in), keeps
    activations at unit scale instead (FLUX.2: context effect 8%, timestep effect 34% of the output std).
    The learned pad tokens (Z-Image x_pad_token / cap_pad_token) start at exactly 0, a special case no real
    checkpoint has; any all-zero matrix (also a zero-init final layer in other versions) gets small noise.
    """
    filled = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, pad_std)
                filled.append(name)
    return filled


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Models

def make_zimage(path, dit=None):
    """Save a tiny ZImagePipeline (Z-Image-Turbo layout) to path and return it.

    dit: optional ZImageTransformer2DModel arguments that replace the tiny ones (e.g. a wider DiT for a GPU check;
    keep sum(axes_dims) = dim / n_heads and cap_feat_dim = 32). None builds exactly the tiny model."""
    torch.manual_seed(SEED)  # each builder seeds itself, so results do not depend on call order
    tok = build_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    # 4 blocks -> vae_scale_factor 8 as in the Flux-1 VAE. shift_factor defaults to None, which crashes the Z-Image
    # decode line latents / scaling_factor + shift_factor, so set the real values.
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=8,
                        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = Qwen3Model(text_config(tok)).eval()
    # sum(axes_dims) must equal dim / n_heads = 32 (even per axis); cap_feat_dim = text hidden size;
    # in_channels stays 16 because the Omni placeholder is hard-coded to 2*2*16.
    config = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
                  n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
    transformer = ZImageTransformer2DModel(**{**config, **(dit or {})})
    init_dit_(transformer)  # fills x_pad_token, cap_pad_token
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                          transformer=transformer)
    pipe.save_pretrained(path)
    return pipe


def make_klein(path, dit=None):
    """Save a tiny distilled Flux2KleinPipeline (FLUX.2-klein-4B layout) to path and return it.

    dit: optional Flux2Transformer2DModel arguments that replace the tiny ones (keep sum(axes_dims_rope) =
    attention_head_dim and joint_attention_dim = 96). None builds exactly the tiny model.

    Sample / encode with text_encoder_out_layers=KLEIN_TEXT_LAYERS: the default (9, 18, 27) raises IndexError here.
    """
    torch.manual_seed(SEED)
    tok = build_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(16,) * 4, layers_per_block=1, latent_channels=8, norm_num_groups=8,
                             sample_size=64)
    # The latent BatchNorm ships with mean 0 / var 1, which would make "forgot to (de)normalise" bugs invisible.
    # Give it running stats like a trained checkpoint has.
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    text_encoder = Qwen3ForCausalLM(text_config(tok)).eval()
    # Packed latents have 4 * 8 = 32 channels; joint_attention_dim = len(KLEIN_TEXT_LAYERS) * text hidden = 96;
    # sum(axes_dims_rope) = attention_head_dim.
    config = dict(patch_size=1, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=len(KLEIN_TEXT_LAYERS) * TEXT["hidden_size"],
                  timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
                  guidance_embeds=False)
    transformer = Flux2Transformer2DModel(**{**config, **(dit or {})})
    init_dit_(transformer)  # mostly for the adaLN gates, see init_dit_
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=True)  # registered in model_index.json
    pipe.save_pretrained(path)
    return pipe


def make_vlm(path):
    """Save a tiny Qwen3-VL to path and return the model.

    One folder holds model, tokenizer and image processor, as Qwen/Qwen3-VL-4B-Instruct does, so a loader needs
    Qwen3VLForConditionalGeneration / AutoTokenizer / AutoImageProcessor .from_pretrained(path) and nothing else.
    (AutoProcessor does not work without torchvision: the Qwen3VLProcessor needs a video processor.)
    """
    torch.manual_seed(SEED)
    tok = build_tokenizer()
    text = text_config(tok, Qwen3VLTextConfig).to_dict()
    # M-RoPE splits head_dim/2 = 4 frequency pairs over (t, h, w); interleaved as in Qwen3-VL.
    text["rope_parameters"].update(mrope_section=[2, 1, 1], mrope_interleaved=True)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"],  # merger projects into the LM width
                  num_position_embeddings=64, deepstack_visual_indexes=[0])  # 64 = 8x8, must be a perfect square
    ids = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # The PIL backend is what AutoImageProcessor picks without torchvision. Real limits are 256^2..4096^2 px; here
    # 32^2..128^2 px, i.e. 1..16 merged image tokens (patch 16 x merge 2 = 32 px per token).
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               min_pixels=32 * 32, max_pixels=128 * 128,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return model


def make_clip(path):
    """Save a tiny CLIPModel (CLIP ViT-H-14 / PickScore layout) with a tokenizer and a PIL image processor; return it.

    examples/eval.py scores CLIP-T / CLIP-I with it, and PickScore (a fine-tuned CLIP) too. The tokenizer is the tiny
    byte-level one: no BPE merges to ship. eos_token_id=2 keeps CLIP's pooling at the highest token id, which works
    for a tokenizer that adds no end token (the real CLIP tokenizer adds one, and its config says so)."""
    torch.manual_seed(SEED)
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel
    tok = build_tokenizer()
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=2,
                                         bos_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return model


def make_dino(path):
    """Save a tiny DINOv3ViTModel (facebook/dinov3-vits16plus layout: registers, RoPE) and its preprocessor config.

    DINOv3ViTImageProcessor needs torchvision, so the preprocessor_config.json is written as JSON (resize to `size`,
    ImageNet mean/std): examples/eval.py reads those numbers and preprocesses with PIL."""
    torch.manual_seed(SEED)
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, patch_size=16, image_size=32,
                                           num_register_tokens=4)).eval()
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "DINOv3ViTImageProcessor", "size": {"height": 32, "width": 32},
                   "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                   "rescale_factor": 1 / 255, "resample": 2}, f, indent=2)
    return model


# -----------------------------------------------------------------------------
# Demo data: procedurally drawn shapes, deliberately in every awkward file format / PIL mode a loader meets

SHAPES = ["circle", "square", "triangle", "ring", "cross", "diamond", "star", "bar"]
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 30),
          "purple": (140, 50, 180), "orange": (240, 130, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
# (file name, (W, H), how it is saved). Sizes in 64..160 px, several aspect ratios, some not multiples of 16.
FILES = [("rgba.png", (96, 64), "RGBA"), ("rgb.jpg", (128, 128), "JPEG"), ("lossy.webp", (64, 96), "WEBP"),
         ("bitmap.bmp", (80, 80), "BMP"), ("palette.png", (150, 100), "P"), ("gray.png", (64, 64), "L"),
         ("cmyk.jpg", (72, 120), "CMYK"), ("gray16.png", (160, 96), "I;16")]


def draw_sample(i):
    """Image i: a coloured shape on a textured (stripes / checks / noise) background, RGB, plus its caption."""
    rng = np.random.default_rng(SEED + i)
    name, (W, H), _ = FILES[i % len(FILES)]
    shape = SHAPES[(i + 3 * (i // len(FILES))) % len(SHAPES)]  # i >= len(FILES) (the jsonl set) shifts the shapes
    color = list(COLORS)[(3 * i + i // len(FILES)) % len(COLORS)]
    yy, xx = np.mgrid[0:H, 0:W]
    base = rng.integers(60, 200, size=3)
    texture = [((xx + yy) // 8) % 2, ((xx // 8) + (yy // 8)) % 2, rng.random((H, W))][i % 3]  # (H, W) in [0, 1]
    bg = base[None, None, :] + 40 * (texture[..., None] - 0.5) + rng.normal(0, 6, (H, W, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    d, c, r = ImageDraw.Draw(img), COLORS[color], min(W, H) // 3
    cx, cy = W // 2 + int(rng.integers(-W // 8, W // 8 + 1)), H // 2 + int(rng.integers(-H // 8, H // 8 + 1))
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "ring":
        d.ellipse(box, outline=c, width=max(3, r // 3))
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape in ("cross", "bar"):
        d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=c)
        if shape == "cross":
            d.rectangle([cx - r // 3, cy - r, cx + r // 3, cy + r], fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
    else:  # five-pointed star: 10 vertices alternating between radius r and r/2.5
        a0 = rng.uniform(0, 2 * np.pi / 5)
        d.polygon([(cx + rr * np.sin(a0 + k * np.pi / 5), cy - rr * np.cos(a0 + k * np.pi / 5))
                   for k, rr in zip(range(10), [r, r / 2.5] * 5)], fill=c)
    if FILES[i % len(FILES)][2] in ("L", "I;16"):
        color = "gray"  # saved as grayscale, so say so
    return img, f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape} in [V] style"


def save_as(img, file, mode):
    """Save an RGB image in the requested format / mode (see FILES)."""
    if mode == "RGBA":  # transparent background, and its RGB zeroed: a bare .convert("RGB") shows black there
        a = np.zeros(img.size[::-1], np.uint8)
        w, h = img.size
        a[h // 6: h - h // 6, w // 6: w - w // 6] = 255
        rgba = np.dstack([np.asarray(img) * (a[..., None] > 0), a])
        Image.fromarray(rgba.astype(np.uint8), "RGBA").save(file)
    elif mode == "JPEG": img.save(file, quality=90)
    elif mode == "WEBP": img.save(file, quality=80)
    elif mode == "BMP": img.save(file)
    elif mode == "P": img.quantize(colors=16).save(file)
    elif mode == "L": img.convert("L").save(file)
    elif mode == "CMYK": img.convert("CMYK").save(file, quality=90)
    elif mode == "I;16":  # 16-bit gray: values up to 65535, so a bare .convert("RGB") clips it to near-white
        g = np.asarray(img.convert("L"), np.uint16) * 257
        Image.fromarray(g).save(file)  # uint16 array -> mode "I;16"
    else: raise ValueError(mode)


def make_demo_data(path):
    """Folder of images with same-name .txt captions. Returns the list of file names."""
    os.makedirs(path, exist_ok=True)
    names = []
    for i, (name, _, mode) in enumerate(FILES):
        img, caption = draw_sample(i)
        save_as(img, os.path.join(path, name), mode)
        with open(os.path.join(path, os.path.splitext(name)[0] + ".txt"), "w") as f:
            f.write(caption + "\n")
        names.append(name)
    return names


def make_demo_data_jsonl(path):
    """Folder of images with captions in metadata.jsonl rows {"file_name", "text"} (HF imagefolder layout)."""
    os.makedirs(path, exist_ok=True)
    rows = []
    for i, (name, _, mode) in enumerate(FILES):
        img, caption = draw_sample(i + len(FILES))  # different drawings, same formats
        save_as(img, os.path.join(path, name), mode)
        rows.append({"file_name": name, "text": caption})
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return [r["file_name"] for r in rows]


# -----------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="tiny", help="output folder; gets zimage/ klein/ vlm/ data/ data_jsonl/")
    p.add_argument("--metrics", action="store_true", help="also clip/ and dino/, the metric models of examples/eval.py")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers' per-save "Writing model shards" bars would bury the summary
    t0 = time.time()
    for name, build in [("zimage", make_zimage), ("klein", make_klein), ("vlm", make_vlm)]:
        t, out = time.time(), os.path.join(args.out, name)
        obj = build(out)
        comps = getattr(obj, "components", None) or {"visual": obj.model.visual, "language": obj.model.language_model}
        parts = {k: n_params(v) for k, v in comps.items() if isinstance(v, torch.nn.Module)}
        print(f"{out:<24} {time.time() - t:5.2f}s  " + ", ".join(f"{k} {v:,}" for k, v in parts.items()))
    for name, build in [("clip", make_clip), ("dino", make_dino)] if args.metrics else []:
        t, out = time.time(), os.path.join(args.out, name)
        n = n_params(build(out))
        print(f"{out:<24} {time.time() - t:5.2f}s  {n:,} parameters")
    for name, build in [("data", make_demo_data), ("data_jsonl", make_demo_data_jsonl)]:
        out = os.path.join(args.out, name)
        print(f"{out:<24} {', '.join(build(out))}")
    print(f"done in {time.time() - t0:.2f}s")


if __name__ == "__main__":
    main()
