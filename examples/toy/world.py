"""The toy world (v2): coloured shapes on a parametric background *style*, named in words for some styles only.

An image is a named shape in a named colour ("a red circle") drawn near the centre of a 64×64 background. The
background is a style: two colours mixed as soft stripes, checks or a linear gradient, with an angle and a period.
Every image is a fresh *instance* of its style: a random phase (or, for a gradient, offset) and a small jitter in
period, so two images of one style are never pixel-aligned and a style cannot be learnt as a fixed set of pixels.
Most captions say nothing about the style, so a text-only model can only guess one; a few styles (NAMED) are always
captioned by name ("a red circle, ocean style"), so text controls those. A model that sees an image of the style in
its context (D-OPSD's teacher) can copy it, phase aside. One style, HELD_OUT, never appears in pre-training: it is
the new concept, "[V] style", that examples/toy/reproduce.py teaches.

The style statistics below read only the border frame (FRAME px wide), which shapes never reach, so they measure the
background whatever the shape. They are checked on real world images in make_turbo.py before any model is judged by
them (same style: small distance; another style: large).

Shared by make_turbo.py (pre-training data, gate) and reproduce.py (fine-tuning data, evaluation).
"""
import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64                      # image side in pixels (4× VAE -> 16×16 latent -> 8×8 DiT tokens after 2×2 packing)
FRAME = 10                     # border width in pixels that shapes never touch: the style is measured there
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 70, 215), "yellow": (240, 215, 40),
           "white": (250, 250, 250), "black": (15, 15, 15), "purple": (135, 45, 180), "orange": (245, 130, 20)}
KINDS = ["stripes", "checks", "gradient"]
# The new concept: inside the family's ranges (so an in-context model can copy it), but excluded from pre-training
# together with everything within HELD_OUT_MARGIN of it in the style distance below.
HELD_OUT = dict(kind="stripes", c1=(0.10, 0.45, 0.50), c2=(0.95, 0.70, 0.45), angle=0.6, period=13.0)
HELD_OUT_MARGIN = 0.35
TRIGGER = "[V] style"          # the new concept's words; no pre-training caption contains them
# Styles with a name: pre-training always captions them "..., <name> style", so an old name has a style to keep and
# a model can bind words to a style. Unnamed styles stay HELD_OUT_MARGIN away from all of them.
NAMED = {"ocean": dict(kind="stripes", c1=(0.05, 0.15, 0.45), c2=(0.55, 0.80, 0.95), angle=0.0, period=16.0),
         "desert": dict(kind="gradient", c1=(0.55, 0.30, 0.12), c2=(0.92, 0.80, 0.55), angle=1.2, period=16.0),
         "forest": dict(kind="checks", c1=(0.08, 0.30, 0.10), c2=(0.55, 0.75, 0.35), angle=0.3, period=18.0),
         "candy": dict(kind="stripes", c1=(0.90, 0.45, 0.70), c2=(0.98, 0.92, 0.95), angle=2.3, period=11.5),
         "night": dict(kind="checks", c1=(0.05, 0.05, 0.18), c2=(0.40, 0.35, 0.65), angle=1.0, period=22.0),
         "rust": dict(kind="stripes", c1=(0.35, 0.12, 0.05), c2=(0.80, 0.50, 0.30), angle=1.9, period=20.0)}


# The fine-tuning set of the new concept (reproduce.py, the README quick start): 6 images of HELD_OUT, shapes and
# colours from a subset; NEW_PROMPTS use only shapes and colours that never appear in it.
# Every colour here is one of visible_colours(HELD_OUT).
FINETUNE = [("circle", "red"), ("square", "blue"), ("triangle", "white"), ("circle", "blue"), ("square", "white"),
            ("triangle", "red")]
NEW_PROMPTS = [("diamond", "purple"), ("cross", "orange"), ("ring", "black"), ("diamond", "orange"),
               ("cross", "black"), ("ring", "purple")]


def caption(shape, colour, style_words=None):
    """'a red circle', 'a red circle, ocean style' (a NAMED style) or, for the new concept,
    'a red circle, [V] style'."""
    return f"a {colour} {shape}" + (f", {style_words}" if style_words else "")


def named_words(name):
    return f"{name} style"


def _far_from_every_named(s):
    st = style_stats(render_background(s))
    return all(style_distance(st, style_stats(render_background(o))) > HELD_OUT_MARGIN
               for o in [HELD_OUT, *NAMED.values()])


def random_style(rng, exclude_held_out=True):
    """An unnamed style drawn from the family. rng: np.random.Generator. Resamples anything within HELD_OUT_MARGIN
    of HELD_OUT or of a NAMED style, so neither the new concept nor a named style is ever drawn unnamed."""
    while True:
        s = dict(kind=KINDS[rng.integers(len(KINDS))], c1=tuple(rng.uniform(0.05, 0.95, 3)),
                 c2=tuple(rng.uniform(0.05, 0.95, 3)), angle=float(rng.uniform(0, math.pi)),
                 period=float(rng.uniform(11, 24)))
        if np.linalg.norm(np.subtract(s["c1"], s["c2"])) < 0.45:       # too little contrast to show a texture
            continue
        if not exclude_held_out or _far_from_every_named(s):
            return s


def instance(style, rng):
    """One image's copy of a style: random phases (stripes, checks) or offset (gradient) and the period jittered by
    up to ±7 %, so that images of one style are not pixel-aligned."""
    return dict(style, phase=float(rng.uniform(0, 2 * math.pi)), phase2=float(rng.uniform(0, 2 * math.pi)),
                offset=float(rng.uniform(-0.2, 0.2)), period=style["period"] * float(rng.uniform(0.93, 1.07)))


def render_background(style, size=SIZE):
    """style -> [size, size, 3] float array in [0, 1]. A style without phase/offset (from instance()) is centred on
    the image; the statistics below do not depend on the phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    a = style["angle"]
    u = xx * math.cos(a) + yy * math.sin(a)                  # along the pattern
    v = -xx * math.sin(a) + yy * math.cos(a)                 # across it
    w, p1, p2 = 2 * math.pi / style["period"], style.get("phase", 0.0), style.get("phase2", 0.0)
    if style["kind"] == "stripes":
        m = 0.5 + 0.5 * np.tanh(2.5 * np.sin(w * u + p1))    # soft square wave
    elif style["kind"] == "checks":
        m = 0.5 + 0.5 * np.tanh(2.5 * np.sin(w * u + p1) * np.sin(w * v + p2) * 2)
    else:                                                    # linear gradient across the whole image
        m = np.clip(u / size + 0.5 + style.get("offset", 0.0), 0, 1)
    c1, c2 = np.array(style["c1"]), np.array(style["c2"])
    return c1 * (1 - m[..., None]) + c2 * m[..., None]


def shape_mask(shape, cx, cy, r, size=SIZE):
    """Coverage of one shape in [0, 1], [size, size] (4× supersampled, box-filtered). cx, cy, r in pixels."""
    mask = Image.new("L", (size * 4, size * 4), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = cx * 4, cy * 4, r * 4
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * .55, cy - r * .55, cx + r * .55, cy + r * .55], fill=0)
    elif shape == "square":
        d.rectangle([cx - r * .85, cy - r * .85, cx + r * .85, cy + r * .85], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * .8), (cx - r, cy + r * .8)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif shape == "cross":
        t = r * .35
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    else:
        raise ValueError(shape)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


def render(style, shape, colour, rng, size=SIZE):
    """One world image (PIL RGB): a fresh instance() of the style and a shape near the centre. The shape's half-size
    keeps it inside [FRAME, size - FRAME]."""
    bg = render_background(instance(style, rng), size)
    cx, cy = size / 2 + rng.uniform(-5, 5), size / 2 + rng.uniform(-5, 5)
    m = shape_mask(shape, cx, cy, rng.uniform(9, 13), size)[..., None]
    a = bg * (1 - m) + np.array(COLOURS[colour]) / 255.0 * m
    return Image.fromarray((a * 255).round().astype(np.uint8))


def frame_mask(size=SIZE, width=FRAME):
    yy, xx = np.mgrid[0:size, 0:size]
    return np.minimum(np.minimum(xx, yy), np.minimum(size - 1 - xx, size - 1 - yy)) < width       # [size, size]


LAGS = [(0, 2), (0, 4), (0, 6), (0, 8), (2, 0), (4, 0), (6, 0), (8, 0), (2, 2), (4, 4), (2, -2), (4, -4)]


def style_stats(image):
    """Background statistics of one image (PIL or [H, W, 3] in [0, 1]) from its border frame:
    colours [6] = the dark and the bright end of the background's main colour axis (mean of the pixels below the
    15th / above the 85th percentile along it), texture [12] = autocorrelation of the projected signal at LAGS."""
    a = np.asarray(image, dtype=np.float64)
    a = a / 255.0 if a.max() > 1.5 else a
    mask = frame_mask(a.shape[0])
    px = a[mask]                                                        # [N, 3]
    m = px.mean(0)
    cov = np.cov((px - m).T) + 1e-9 * np.eye(3)
    axis = np.linalg.eigh(cov)[1][:, -1]
    axis = axis if axis.sum() >= 0 else -axis                           # dark -> bright
    t = (px - m) @ axis
    lo, hi = np.percentile(t, [15, 85])
    colours = np.concatenate([px[t <= lo].mean(0), px[t >= hi].mean(0)])
    sig = np.zeros(a.shape[:2])
    sig[mask] = t
    var = (t ** 2).mean() + 1e-6
    tex = []
    H = a.shape[0]
    for dy, dx in LAGS:
        ys, ye = max(0, -dy), H - max(0, dy)
        xs, xe = max(0, -dx), H - max(0, dx)
        both = mask[ys:ye, xs:xe] & mask[ys + dy:ye + dy, xs + dx:xe + dx]
        prod = sig[ys:ye, xs:xe] * sig[ys + dy:ye + dy, xs + dx:xe + dx]
        tex.append(prod[both].mean() / var)
    return dict(colour=colours, texture=np.array(tex), contrast=float(np.linalg.norm(colours[3:] - colours[:3])))


def colour_distance(s1, s2):
    """RMS difference of the two background colours, in [0, 1] RGB units."""
    return float(np.sqrt(((s1["colour"] - s2["colour"]) ** 2).mean()))


def texture_distance(s1, s2):
    """RMS difference of the autocorrelation profiles (range 0..2)."""
    return float(np.sqrt(((s1["texture"] - s2["texture"]) ** 2).mean()))


def style_distance(s1, s2):
    """One number: colour + texture distance (each roughly 0 for the same style and 0.3-1 for different ones)."""
    return colour_distance(s1, s2) + texture_distance(s1, s2)


# Prompt following: which pixels are the shape, what colour they are, and which shape they make. Checked on real
# world images in make_turbo.py's gate (1.0 would be perfect there) before any model is judged by them.
PALETTE = np.array(list(COLOURS.values()), dtype=np.float64) / 255.0          # [8, 3]
SHAPE_PX = 0.2         # a centre pixel this far (RGB, [0, 1] units) from the background's colour line is the shape's


def shape_pixels(image):
    """The shape's pixels: those of the central [FRAME, SIZE - FRAME) square further than SHAPE_PX from the segment
    between the background's two colours (style_stats; extended by a quarter each way, since they are tail means).
    Returns (the mask's inner pixels [N, 3] in [0, 1], the mask [SIZE - 2 FRAME]^2)."""
    a = np.asarray(image, dtype=np.float64)
    a = a / 255.0 if a.max() > 1.5 else a
    c = style_stats(a)["colour"]
    lo, hi = c[:3], c[3:]
    lo, hi = lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo)
    px = a[FRAME:-FRAME, FRAME:-FRAME]                                    # [44, 44, 3]
    t = np.clip(((px - lo) @ (hi - lo)) / max(float((hi - lo) @ (hi - lo)), 1e-9), 0, 1)
    d = np.linalg.norm(px - (lo + t[..., None] * (hi - lo)), axis=-1)
    mask = d > SHAPE_PX
    inner = mask.copy()                                                   # minus the edge: box-filtered blends
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return px[inner], mask


def visible_colours(style, margin=0.35):
    """The COLOURS a shape may take on this style: those at least `margin` from the segment between its two colours,
    so that a shape always stands out from its background (the world never hides one)."""
    c1, c2 = np.array(style["c1"]), np.array(style["c2"])
    t = np.clip(((PALETTE - c1) @ (c2 - c1)) / float((c2 - c1) @ (c2 - c1)), 0, 1)
    d = np.linalg.norm(PALETTE - (c1 + t[:, None] * (c2 - c1)), axis=1)
    return [c for c, di in zip(COLOURS, d) if di >= margin]


def colour_fidelity(image, colour):
    """Of the shape's pixels, the fraction whose nearest COLOURS entry is the prompt's colour (0 if none)."""
    px, _ = shape_pixels(image)
    if len(px) == 0:
        return 0.0
    nearest = np.argmin(np.linalg.norm(px[:, None] - PALETTE[None], axis=-1), 1)
    return float((nearest == list(COLOURS).index(colour)).mean())


_TEMPLATES = {}


def _templates():
    """Every shape at every centre (±5 px, 1 px apart) and half-size (9..13 px, 0.5 apart) the world draws, cut to
    the central square: (masks [T, 44·44] bool, shape index [T])."""
    if not _TEMPLATES:
        ms, ks = [], []
        for k, shape in enumerate(SHAPES):
            for dy in range(-5, 6):
                for dx in range(-5, 6):
                    for r in np.arange(9, 13.01, 0.5):
                        m = shape_mask(shape, SIZE / 2 + dx, SIZE / 2 + dy, r)[FRAME:-FRAME, FRAME:-FRAME]
                        ms.append((m > 0.5).ravel()), ks.append(k)
        _TEMPLATES.update(masks=np.stack(ms).astype(np.float32), shape=np.array(ks))
    return _TEMPLATES["masks"], _TEMPLATES["shape"]


def shape_of(image):
    """The SHAPES entry whose best-placed template overlaps the shape's pixels most (IoU), or None if none drawn."""
    _, mask = shape_pixels(image)
    if mask.sum() == 0:
        return None
    masks, kind = _templates()
    m = mask.ravel().astype(np.float32)
    inter = masks @ m                                                     # [T]
    iou = inter / (masks.sum(1) + m.sum() - inter)
    return SHAPES[kind[int(np.argmax(iou))]]


def shape_fidelity(image, shape):
    """1.0 if shape_of(image) is the prompt's shape, else 0.0."""
    return float(shape_of(image) == shape)


def style_reference(style, rng, n=8):
    """Mean statistics of n real instances of a style (they differ in phase and period, not in style): the
    reference a model's samples are measured against."""
    st = [style_stats(render(style, SHAPES[i % 6], visible_colours(style)[0], rng)) for i in range(n)]
    return dict(colour=np.mean([s["colour"] for s in st], 0), texture=np.mean([s["texture"] for s in st], 0),
                contrast=float(np.mean([s["contrast"] for s in st])))


def fidelity(ims, pairs):
    """Mean (colour fidelity, shape fidelity) of images drawn for the (shape, colour, ...) prompts `pairs`, cycled:
    seed-major samples of len(pairs) prompts line up with them."""
    p = [pairs[k % len(pairs)] for k in range(len(ims))]
    return (float(np.mean([colour_fidelity(im, q[1]) for im, q in zip(ims, p)])),
            float(np.mean([shape_fidelity(im, q[0]) for im, q in zip(ims, p)])))


def rms(a, b):
    """Pixel RMS distance between two equally long lists of images, in [0, 1] units."""
    pix = lambda ims: np.stack([np.asarray(im, dtype=np.float64) / 255 for im in ims])
    return float(np.sqrt(((pix(a) - pix(b)) ** 2).mean()))


def sharpness(image):
    """Mean absolute difference between neighbouring pixels (both axes), [0, 1] units: blur lowers it."""
    a = np.asarray(image, dtype=np.float64) / 255.0
    return float((np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()) / 2)


def write_finetune_set(out, seed=0):
    """The FINETUNE images of HELD_OUT (each its own instance) as PNG + same-name .txt captions
    ('a red circle, [V] style') in out/."""
    return write_concept_set(out, HELD_OUT, FINETUNE, TRIGGER, seed)


# The second new concept, "[W] style", that examples/toy/continual.py teaches after [V] (issue 23). Chosen once among
# 3,000 styles drawn from the family (seed 7, contrast >= 0.6, >= 5 visible colours) as the one furthest from every
# pre-training style (make_turbo.py draws them from a fixed seed: continual.py redraws them and checks this): 0.40 to
# the nearest of them, more than HELD_OUT_MARGIN, and 0.82 to HELD_OUT and every NAMED style. Pre-training never
# excluded it, so unlike HELD_OUT its margin is measured, not built in.
HELD_OUT_2 = dict(kind="stripes", c1=(0.23, 0.09, 0.36), c2=(0.94, 0.25, 0.46), angle=3.05, period=11.1)
TRIGGER_2 = "[W] style"
# Its fine-tuning set and evaluation prompts, in its visible colours (green, blue, white, yellow, orange): the
# evaluation's shape-colour pairs never appear in the fine-tuning set, and the validation pairs (the learning-rate
# rule's) in neither.
FINETUNE_2 = [("circle", "green"), ("square", "blue"), ("triangle", "white"), ("circle", "blue"), ("square", "white"),
              ("triangle", "green")]
NEW_PROMPTS_2 = [("diamond", "yellow"), ("cross", "orange"), ("ring", "yellow"), ("diamond", "orange"),
                 ("cross", "yellow"), ("ring", "orange")]
VAL_PROMPTS_2 = [("circle", "yellow"), ("square", "orange"), ("triangle", "yellow")]


def write_concept_set(out, style, pairs, trigger, seed=0):
    """A fine-tuning set of any concept: one image of `style` (each its own instance) per (shape, colour) of
    `pairs`, as PNG + same-name .txt caption ('a green circle, <trigger>') in out/."""
    from pathlib import Path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (shape, colour) in enumerate(pairs):
        render(style, shape, colour, rng).save(out / f"{i:02d}_{colour}_{shape}.png")
        (out / f"{i:02d}_{colour}_{shape}.txt").write_text(caption(shape, colour, trigger) + "\n")
    return out


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write the toy's fine-tuning set: 6 images of the held-out '[V] style'.")
    p.add_argument("--out", default="examples/toy/data")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"wrote {len(FINETUNE)} images + captions to {write_finetune_set(a.out, a.seed)}")
