"""The toy world: coloured shapes on a parametric background *style* that captions never name.

An image is a named shape in a named colour ("a red circle") drawn near the centre of a 64×64 background. The
background is a style: two colours mixed as soft stripes, checks or a linear gradient, with an angle and a period.
Captions say nothing about it, so a text-only model can only guess a style; a model that sees an image of the style
in its context (D-OPSD's teacher) can copy it. One style, HELD_OUT, never appears in pre-training: it is the new
concept, "[V] style", that examples/toy/reproduce.py teaches.

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


# The fine-tuning set of the new concept (reproduce.py, the README quick start): 6 images of HELD_OUT, shapes and
# colours from a subset; NEW_PROMPTS use only shapes and colours that never appear in it.
FINETUNE = [("circle", "red"), ("square", "blue"), ("triangle", "white"), ("circle", "black"), ("square", "red"),
            ("triangle", "blue")]
NEW_PROMPTS = [("diamond", "green"), ("cross", "yellow"), ("ring", "orange"), ("diamond", "purple"),
               ("cross", "green"), ("ring", "yellow")]


def caption(shape, colour, trigger=None):
    """'a red circle' or, for the new concept, 'a red circle, [V] style'."""
    return f"a {colour} {shape}" + (f", {trigger}" if trigger else "")


def random_style(rng, exclude_held_out=True):
    """A style drawn from the family. rng: np.random.Generator. Resamples anything too close to HELD_OUT."""
    while True:
        s = dict(kind=KINDS[rng.integers(len(KINDS))], c1=tuple(rng.uniform(0.05, 0.95, 3)),
                 c2=tuple(rng.uniform(0.05, 0.95, 3)), angle=float(rng.uniform(0, math.pi)),
                 period=float(rng.uniform(11, 24)))
        if np.linalg.norm(np.subtract(s["c1"], s["c2"])) < 0.45:       # too little contrast to show a texture
            continue
        if not exclude_held_out or style_distance(style_stats(render_background(s)),
                                                  style_stats(render_background(HELD_OUT))) > HELD_OUT_MARGIN:
            return s


def render_background(style, size=SIZE):
    """style -> [size, size, 3] float array in [0, 1]. Phase is fixed (pattern centred on the image), so a reference
    image of the same style has the same background pixel for pixel wherever no shape covers it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    a = style["angle"]
    u = xx * math.cos(a) + yy * math.sin(a)                  # along the pattern
    v = -xx * math.sin(a) + yy * math.cos(a)                 # across it
    w = 2 * math.pi / style["period"]
    if style["kind"] == "stripes":
        m = 0.5 + 0.5 * np.tanh(2.5 * np.sin(w * u))         # soft square wave
    elif style["kind"] == "checks":
        m = 0.5 + 0.5 * np.tanh(2.5 * np.sin(w * u) * np.sin(w * v) * 2)
    else:                                                    # linear gradient across the whole image
        m = np.clip(u / size + 0.5, 0, 1)
    c1, c2 = np.array(style["c1"]), np.array(style["c2"])
    return c1 * (1 - m[..., None]) + c2 * m[..., None]


def render(style, shape, colour, rng, size=SIZE):
    """One world image (PIL RGB): the style's background and a shape near the centre (4× supersampled edges)."""
    bg = Image.fromarray((render_background(style, size) * 255).round().astype(np.uint8)).resize(
        (size * 4, size * 4), Image.Resampling.NEAREST)
    mask = Image.new("L", bg.size, 0)
    d = ImageDraw.Draw(mask)
    cx, cy = (size / 2 + rng.uniform(-5, 5)) * 4, (size / 2 + rng.uniform(-5, 5)) * 4
    r = rng.uniform(9, 13) * 4                               # half-size: the shape stays inside [FRAME, size-FRAME]
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
    fg = Image.new("RGB", bg.size, COLOURS[colour])
    return Image.composite(fg, bg, mask).resize((size, size), Image.Resampling.BOX)


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


def colour_error(image, colour):
    """How far the shape is from the prompt's colour: the 10th percentile, over the central 32×32 px (where every
    shape lies), of the RGB distance to COLOURS[colour], in [0, 1] units / sqrt(3). Small when some tenth of the
    centre has that colour (a ring or a cross covers about a quarter of it)."""
    a = np.asarray(image, dtype=np.float64)[16:48, 16:48].reshape(-1, 3) / 255.0
    d = np.linalg.norm(a - np.array(COLOURS[colour]) / 255.0, axis=1) / math.sqrt(3)
    return float(np.percentile(d, 10))


def rms(a, b):
    """Pixel RMS distance between two equally long lists of images, in [0, 1] units."""
    pix = lambda ims: np.stack([np.asarray(im, dtype=np.float64) / 255 for im in ims])
    return float(np.sqrt(((pix(a) - pix(b)) ** 2).mean()))


def sharpness(image):
    """Mean absolute difference between neighbouring pixels (both axes), [0, 1] units: blur lowers it."""
    a = np.asarray(image, dtype=np.float64) / 255.0
    return float((np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()) / 2)


def write_finetune_set(out, seed=0):
    """The FINETUNE images of HELD_OUT as PNG + same-name .txt captions ('a red circle, [V] style') in out/."""
    from pathlib import Path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (shape, colour) in enumerate(FINETUNE):
        render(HELD_OUT, shape, colour, rng).save(out / f"{i:02d}_{colour}_{shape}.png")
        (out / f"{i:02d}_{colour}_{shape}.txt").write_text(caption(shape, colour, TRIGGER) + "\n")
    return out


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write the toy's fine-tuning set: 6 images of the held-out '[V] style'.")
    p.add_argument("--out", default="examples/toy/data")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"wrote {len(FINETUNE)} images + captions to {write_finetune_set(a.out, a.seed)}")
