#!/usr/bin/python3
"""Builds a reproducible evaluation hub of "generative models" from real photos.

A model is a rendering style (colour grade, tone curve, texture, grain, blur,
quantisation, compression...) with its own random jitter; its "samples" are the
platform prompt set's contents rendered in that style, each with a little
per-image jitter on top. Contents are crops of the photos that Debian's
python3-skimage ships. Query images show held-out photos (content no spec has
seen) rendered by each model.

Layout written under OUT:
  models/<id>/manifest.jsonl   {"image": "images/007.jpg", "prompt": "..."}
  models/<id>/model.json       {"downloads": N, "card": "...", "style": "...", "params": {...}}
  queries.jsonl                {"image": "queries/q0001.jpg", "model": "<true id>", "content": "..."}
  hub.json                     the whole recipe (seed, styles, sources, splits)

Deterministic in --seed. Needs python3-numpy, python3-pil, python3-skimage (Debian).
"""
import argparse
import json
import math
import os
import random
import sys

import numpy as np
from PIL import Image, ImageFilter

SKIMAGE_DATA = "/usr/lib/python3/dist-packages/skimage/data"

# (file, description). Colour and grey photos; grey ones are rendered as RGB.
SOURCES = [
    ("astronaut.png", "an astronaut in a white spacesuit"),
    ("chelsea.png", "a tabby cat"),
    ("coffee.png", "a cup of coffee on a saucer"),
    ("rocket.jpg", "a rocket on a launch pad"),
    ("motorcycle_left.png", "a motorcycle in a garage"),
    ("hubble_deep_field.jpg", "galaxies in deep space"),
    ("ihc.png", "stained tissue under a microscope"),
    ("retina.jpg", "the retina of an eye"),
    ("horse.png", "the silhouette of a horse"),
    ("camera.png", "a cameraman with a tripod"),
    ("brick.png", "a brick wall"),
    ("coins.png", "old coins on a table"),
    ("grass.png", "a field of grass"),
    ("gravel.png", "a gravel path"),
    ("moon.png", "craters on the moon"),
    ("page.png", "a page of printed text"),
    ("clock_motion.png", "a clock on a wall"),
    ("cell.png", "a living cell"),
    ("color.png", "a colour wheel"),
    ("phantom.png", "a medical phantom scan"),
    ("motorcycle_right.png", "a red motorcycle seen from the side"),
    ("logo.png", "a snake logo"),
]

REGIONS = [
    ("whole", "a wide view of {}"),
    ("centre", "a close-up of {}"),
    ("left", "{}, left part"),
    ("right", "{}, right part"),
    ("top", "{}, upper part"),
    ("bottom", "{}, lower part"),
]


# ---------------------------------------------------------------- style operations
# Each op takes an HxWx3 float32 array in [0, 1] and returns one.

def op_grade(img, rng, gain=(1, 1, 1), gamma=(1, 1, 1), lift=0.0, **_):
    g = np.asarray(gain, np.float32)
    gm = np.asarray(gamma, np.float32)
    out = np.clip(img * g, 0, 1) ** gm
    return lift + (1 - lift) * out


def op_saturation(img, rng, factor=1.0, **_):
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(lum[..., None] + factor * (img - lum[..., None]), 0, 1)


def op_contrast(img, rng, factor=1.0, pivot=0.5, **_):
    return np.clip(pivot + factor * (img - pivot), 0, 1)


def op_scurve(img, rng, strength=4.0, **_):
    s = 1 / (1 + np.exp(-strength * (img - 0.5)))
    lo, hi = 1 / (1 + math.exp(strength * 0.5)), 1 / (1 + math.exp(-strength * 0.5))
    return (s - lo) / (hi - lo)


def op_posterize(img, rng, levels=4, **_):
    lv = max(2, int(round(levels)))
    return np.round(img * (lv - 1)) / (lv - 1)


def op_duotone(img, rng, dark=(0.1, 0.05, 0.0), light=(1.0, 0.9, 0.7), **_):
    lum = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    return (1 - lum) * np.asarray(dark, np.float32) + lum * np.asarray(light, np.float32)


def op_gray(img, rng, **_):
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(lum[..., None], 3, axis=2)


def op_blur(img, rng, radius=1.0, **_):
    return pil_filter(img, ImageFilter.GaussianBlur(radius=max(0.1, radius)))


def op_sharpen(img, rng, radius=2.0, percent=150, **_):
    return pil_filter(img, ImageFilter.UnsharpMask(radius=radius, percent=int(percent), threshold=2))


def op_median(img, rng, size=5, **_):
    s = int(size) | 1
    return pil_filter(img, ImageFilter.MedianFilter(size=s))


def op_mode(img, rng, size=5, **_):
    s = int(size) | 1
    return pil_filter(img, ImageFilter.ModeFilter(size=s))


def op_grain(img, rng, sigma=0.05, mono=True, **_):
    h, w, _ = img.shape
    if mono:
        n = rng.normal(0, sigma, (h, w, 1)).astype(np.float32)
    else:
        n = rng.normal(0, sigma, (h, w, 3)).astype(np.float32)
    return np.clip(img + n, 0, 1)


def op_vignette(img, rng, strength=0.5, **_):
    h, w, _ = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2
    return img * np.clip(1 - strength * r2 / 2, 0, 1)[..., None]


def op_pixelate(img, rng, block=8, **_):
    h, w, _ = img.shape
    b = max(2, int(round(block)))
    pil = to_pil(img).resize((max(1, w // b), max(1, h // b)), Image.BILINEAR)
    return from_pil(pil.resize((w, h), Image.NEAREST))


def op_upsample(img, rng, factor=2, **_):
    # Low-resolution generation then bilinear upsampling: a generator-like fingerprint.
    h, w, _ = img.shape
    f = max(1.5, factor)
    pil = to_pil(img).resize((int(w / f), int(h / f)), Image.BOX)
    return from_pil(pil.resize((w, h), Image.BILINEAR))


def op_edges(img, rng, strength=1.0, ink=(0.0, 0.0, 0.0), **_):
    lum = op_gray(img, rng)
    edges = from_pil(to_pil(lum).filter(ImageFilter.FIND_EDGES))[..., :1]
    e = np.clip(edges * 3 * strength, 0, 1)
    return img * (1 - e) + e * np.asarray(ink, np.float32)


def op_sketch(img, rng, strength=1.5, **_):
    lum = op_gray(img, rng)
    edges = from_pil(to_pil(lum).filter(ImageFilter.FIND_EDGES))
    return np.clip(1 - edges * 2.5 * strength, 0, 1)


def op_emboss(img, rng, mix=0.6, **_):
    e = from_pil(to_pil(img).filter(ImageFilter.EMBOSS))
    return np.clip((1 - mix) * img + mix * e, 0, 1)


def op_halftone(img, rng, period=6, **_):
    h, w, _ = img.shape
    p = max(3, int(round(period)))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = (np.sin(2 * np.pi * x / p) * np.sin(2 * np.pi * y / p) + 1) / 2
    return (img > pattern[..., None]).astype(np.float32)


def op_scanlines(img, rng, period=3, depth=0.35, **_):
    h = img.shape[0]
    p = max(2, int(round(period)))
    rows = (np.arange(h) % p == 0).astype(np.float32)
    return img * (1 - depth * rows)[:, None, None]


def op_chroma_shift(img, rng, shift=3, **_):
    s = int(round(shift))
    out = img.copy()
    out[..., 0] = np.roll(img[..., 0], s, axis=1)
    out[..., 2] = np.roll(img[..., 2], -s, axis=1)
    return out


def op_bloom(img, rng, radius=6.0, amount=0.5, **_):
    bright = np.clip(img - 0.6, 0, 1) / 0.4
    glow = pil_filter(bright, ImageFilter.GaussianBlur(radius=radius))
    return np.clip(img + amount * glow, 0, 1)


def op_paper(img, rng, strength=0.08, scale=3.0, **_):
    h, w, _ = img.shape
    n = rng.normal(0, 1, (int(h / scale) + 1, int(w / scale) + 1)).astype(np.float32)
    n = np.asarray(Image.fromarray(n).resize((w, h), Image.BICUBIC))
    return np.clip(img * (1 - strength * np.abs(n))[..., None], 0, 1)


def op_channel_mix(img, rng, order=(2, 0, 1), **_):
    return img[..., list(order)]


def op_invert(img, rng, **_):
    return 1 - img


def op_jpeg(img, rng, quality=20, **_):
    # Handled at save time via the model's quality; here as an explicit re-compression.
    import io
    buf = io.BytesIO()
    to_pil(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return from_pil(Image.open(buf).convert("RGB"))


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}

# Styles: a list of (op, params). Numeric params get jittered per model and per image.
STYLES = {
    "vivid": [("saturation", {"factor": 1.7}), ("contrast", {"factor": 1.25}),
              ("sharpen", {"radius": 2.0, "percent": 160})],
    "faded-film": [("grade", {"gain": (1.05, 1.0, 0.88), "gamma": (0.9, 0.95, 1.05), "lift": 0.12}),
                   ("contrast", {"factor": 0.8}), ("grain", {"sigma": 0.04, "mono": True})],
    "noir": [("gray", {}), ("scurve", {"strength": 7.0}), ("vignette", {"strength": 0.7}),
             ("grain", {"sigma": 0.05, "mono": True})],
    "sepia": [("duotone", {"dark": (0.18, 0.1, 0.04), "light": (1.0, 0.92, 0.72)}),
              ("blur", {"radius": 0.8}), ("vignette", {"strength": 0.5})],
    "cyberpunk": [("duotone", {"dark": (0.05, 0.2, 0.35), "light": (1.0, 0.35, 0.85)}),
                  ("contrast", {"factor": 1.3}), ("chroma_shift", {"shift": 3})],
    "watercolour": [("median", {"size": 7}), ("saturation", {"factor": 1.3}),
                    ("paper", {"strength": 0.1, "scale": 3.0}), ("edges", {"strength": 0.5, "ink": (0.2, 0.15, 0.1)})],
    "oil": [("mode", {"size": 7}), ("sharpen", {"radius": 1.5, "percent": 120})],
    "pencil": [("sketch", {"strength": 1.5}), ("paper", {"strength": 0.06, "scale": 1.5})],
    "pixel-art": [("pixelate", {"block": 8}), ("posterize", {"levels": 5})],
    "pop-halftone": [("saturation", {"factor": 1.8}), ("halftone", {"period": 6})],
    "pastel": [("contrast", {"factor": 0.6, "pivot": 0.8}), ("saturation", {"factor": 0.6}),
               ("blur", {"radius": 1.5})],
    "comic": [("posterize", {"levels": 4}), ("edges", {"strength": 1.5, "ink": (0, 0, 0)})],
    "infrared": [("channel_mix", {"order": (2, 0, 1)}), ("bloom", {"radius": 5.0, "amount": 0.6})],
    "lomo": [("saturation", {"factor": 1.5}), ("scurve", {"strength": 5.0}),
             ("grade", {"gain": (1.0, 1.05, 0.85), "gamma": (1.0, 0.9, 1.1), "lift": 0.0}),
             ("vignette", {"strength": 1.2})],
    "dreamy": [("bloom", {"radius": 8.0, "amount": 0.8}), ("blur", {"radius": 2.0}),
               ("grade", {"gain": (1.05, 0.95, 1.08), "gamma": (1, 1, 1), "lift": 0.05})],
    "crunchy-jpeg": [("saturation", {"factor": 1.2}), ("jpeg", {"quality": 12})],
    "crt": [("scanlines", {"period": 3, "depth": 0.4}), ("chroma_shift", {"shift": 2}),
            ("bloom", {"radius": 3.0, "amount": 0.4})],
    "emboss-metal": [("emboss", {"mix": 0.7}), ("saturation", {"factor": 0.3})],
    "teal-orange": [("grade", {"gain": (1.1, 0.98, 0.85), "gamma": (0.95, 1.0, 0.9), "lift": 0.03}),
                    ("duotone", {"dark": (0.0, 0.2, 0.25), "light": (1.0, 0.8, 0.6)}),
                    ("contrast", {"factor": 1.15})],
    "night-vision": [("gray", {}), ("grade", {"gain": (0.25, 1.0, 0.3), "gamma": (1, 0.8, 1), "lift": 0.0}),
                     ("grain", {"sigma": 0.08, "mono": True}), ("vignette", {"strength": 0.8})],
    "soft-upscale": [("upsample", {"factor": 3.0}), ("saturation", {"factor": 1.1})],
    "inverted": [("invert", {}), ("saturation", {"factor": 1.4})],
}


def to_pil(img):
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def from_pil(pil):
    return np.asarray(pil.convert("RGB"), np.float32) / 255.0


def pil_filter(img, filt):
    return from_pil(to_pil(img).filter(filt))


def jitter_value(v, rng, amount):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return float(v) * (1 + rng.uniform(-amount, amount))
    if isinstance(v, (tuple, list)) and all(isinstance(a, (int, float)) for a in v) and len(v) == 3 \
            and not all(isinstance(a, int) for a in v):
        return tuple(min(1.5, max(0.0, float(a) * (1 + rng.uniform(-amount, amount)))) for a in v)
    return v


def jitter_style(steps, rng, amount):
    return [(op, {k: jitter_value(v, rng, amount) for k, v in params.items()}) for op, params in steps]


def render(img, steps, rng):
    for op, params in steps:
        img = OPS[op](img, rng, **params)
    return np.clip(img, 0, 1)


def load_source(name):
    pil = Image.open(os.path.join(SKIMAGE_DATA, name))
    if pil.mode in ("RGBA", "LA", "P"):
        pil = pil.convert("RGBA")
        bg = Image.new("RGBA", pil.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(bg, pil)
    return pil.convert("RGB")


def crop_for(pil, region, rng, jitter):
    w, h = pil.size
    side = min(w, h)
    if region == "whole":
        cw, ch = w, h
        x0, y0 = 0, 0
    else:
        s = int(side * (0.55 + 0.1 * rng.uniform(-1, 1) * jitter))
        cw = ch = s
        cx = {"centre": w / 2, "left": s / 2, "right": w - s / 2}.get(region, w / 2)
        cy = {"top": s / 2, "bottom": h - s / 2}.get(region, h / 2)
        cx += rng.uniform(-1, 1) * 0.05 * w * jitter
        cy += rng.uniform(-1, 1) * 0.05 * h * jitter
        x0 = int(min(max(0, cx - cw / 2), w - cw))
        y0 = int(min(max(0, cy - ch / 2), h - ch))
    return pil.crop((x0, y0, x0 + cw, y0 + ch))


def render_content(pil_src, region, steps, size, rng, per_image_jitter):
    crop = crop_for(pil_src, region, rng, 1.0)
    w, h = crop.size
    scale = size / min(w, h)
    crop = crop.resize((max(size, int(round(w * scale))), max(size, int(round(h * scale)))), Image.LANCZOS)
    img = np.asarray(crop, np.float32) / 255.0
    return render(img, jitter_style(steps, rng, per_image_jitter), rng)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--models", type=int, default=16, help="number of models in the hub")
    ap.add_argument("--regions", type=int, default=4, help="crops per training photo (<= %d)" % len(REGIONS))
    ap.add_argument("--holdout", type=int, default=5, help="photos kept out of the prompt set, for queries")
    ap.add_argument("--queries-per-model", type=int, default=6)
    ap.add_argument("--size", type=int, default=256, help="shorter side of rendered images")
    ap.add_argument("--model-jitter", type=float, default=0.25, help="relative jitter of a model's style params")
    ap.add_argument("--image-jitter", type=float, default=0.08, help="relative jitter per image")
    ap.add_argument("--quality", type=int, default=92, help="JPEG quality of the saved images")
    ap.add_argument("--styles", default="", help="comma-separated style names (default: all)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    if not os.path.isdir(SKIMAGE_DATA):
        sys.exit("make_hub: %s not found (apt-get install python3-skimage)" % SKIMAGE_DATA)
    rnd = random.Random(args.seed)
    rng = np.random.default_rng(args.seed)

    sources = [s for s in SOURCES if os.path.exists(os.path.join(SKIMAGE_DATA, s[0]))]
    rnd.shuffle(sources)
    holdout, train = sources[:args.holdout], sources[args.holdout:]
    regions = REGIONS[:max(1, min(args.regions, len(REGIONS)))]
    prompts = [(src, reg, tmpl.format(desc)) for src, desc in train for reg, tmpl in regions]

    style_names = [s for s in (args.styles.split(",") if args.styles else sorted(STYLES)) if s]
    for s in style_names:
        if s not in STYLES:
            sys.exit("make_hub: unknown style %r (known: %s)" % (s, ", ".join(sorted(STYLES))))
    rnd.shuffle(style_names)
    cache = {}

    def source(name):
        if name not in cache:
            cache[name] = load_source(name)
        return cache[name]

    os.makedirs(args.out, exist_ok=True)
    models = []
    queries = []
    total = args.models * (len(prompts) + args.queries_per_model)
    done = 0
    for m in range(args.models):
        style = style_names[m % len(style_names)]
        variant = m // len(style_names)
        model_id = "%s-%d" % (style, variant + 1)
        steps = jitter_style(STYLES[style], rng, args.model_jitter)
        mdir = os.path.join(args.out, "models", model_id)
        os.makedirs(os.path.join(mdir, "images"), exist_ok=True)
        with open(os.path.join(mdir, "manifest.jsonl"), "w") as mf:
            for i, (src, reg, prompt) in enumerate(prompts):
                img = render_content(source(src), reg, steps, args.size, rng, args.image_jitter)
                rel = "images/%03d.jpg" % i
                to_pil(img).save(os.path.join(mdir, rel), quality=args.quality)
                mf.write(json.dumps({"image": rel, "prompt": prompt}) + "\n")
                done += 1
                if not args.quiet and done % 50 == 0:
                    print("make_hub: %d/%d images" % (done, total), file=sys.stderr)
        downloads = int(10 ** rnd.uniform(2, 6))
        with open(os.path.join(mdir, "model.json"), "w") as f:
            json.dump({"downloads": downloads, "card": "%s style model" % style.replace("-", " "),
                       "style": style, "params": steps}, f, indent=1)
        models.append({"id": model_id, "style": style, "downloads": downloads})
        qdir = os.path.join(args.out, "queries")
        os.makedirs(qdir, exist_ok=True)
        for q in range(args.queries_per_model):
            src, desc = holdout[q % len(holdout)]
            reg, tmpl = REGIONS[rnd.randrange(len(REGIONS))]
            img = render_content(source(src), reg, steps, args.size, rng, args.image_jitter)
            rel = "queries/q%04d.jpg" % len(queries)
            to_pil(img).save(os.path.join(args.out, rel), quality=args.quality)
            queries.append({"image": rel, "model": model_id, "content": tmpl.format(desc)})
            done += 1
    with open(os.path.join(args.out, "queries.jsonl"), "w") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")
    with open(os.path.join(args.out, "hub.json"), "w") as f:
        json.dump({"seed": args.seed, "models": models, "prompts": [p for _, _, p in prompts],
                   "train_sources": [s for s, _ in train], "holdout_sources": [s for s, _ in holdout],
                   "size": args.size}, f, indent=1)
    if not args.quiet:
        print("make_hub: %d models x %d samples, %d queries -> %s" %
              (len(models), len(prompts), len(queries), args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
