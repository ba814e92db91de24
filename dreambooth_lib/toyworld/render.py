"""The toy world's renderer: 32 px pictures of bold objects in simple scenes, with ground truth.

Every picture is drawn from a `Spec` (what is in it) and a seed (texture details: grass blades,
snow flakes, spots), so the same (spec, seed) always gives identical pixels. Captions mention
the class always, the colour and context sometimes, the pattern never. Subjects (`SUBJECTS`)
are specific instances carrying a marking that no caption word describes and that pretraining
pictures never contain: the base model cannot draw it from text, DreamBooth must learn it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SIZE = 32  # output side in pixels
SUPER = 4  # drawn at SUPER x SIZE then downsampled, for anti-aliased edges
CLASSES = ("star", "ball", "cube", "heart", "fish")
COLOURS = {
    "red": (215, 35, 35),
    "blue": (35, 75, 225),
    "green": (30, 165, 55),
    "yellow": (245, 215, 25),
    "purple": (145, 45, 200),
    "orange": (250, 125, 15),
}
CONTEXTS = ("grass", "snow", "beach", "night", "water", "brick")
CONTEXT_PHRASES = {
    "grass": "on the grass",
    "snow": "in the snow",
    "beach": "on the beach",
    "night": "at night",
    "water": "in the water",
    "brick": "in front of a brick wall",
}
STYLES = ("photo", "sketch")
STYLE_PHRASES = {"photo": "a photo of", "sketch": "a pencil sketch of"}
PATTERNS = ("plain", "stripes", "spots", "shine")  # intra-class variety that captions never mention

# name -> fixed attributes. `marking` is drawn only for subjects (never in pretraining data). Three
# look-alike pairs share class and colour and differ only by their marking (the fine-grained case,
# DreamBench's two similar dogs). New subjects go at the end: a subject's photos are seeded by its
# position here.
SUBJECTS = {
    "marked_star": dict(cls="star", colour="yellow", pattern="plain", marking="white_disc"),
    "cross_cube": dict(cls="cube", colour="blue", pattern="plain", marking="white_cross"),
    "banded_star": dict(cls="star", colour="yellow", pattern="plain", marking="white_band"),  # ~ marked_star
    "dotted_cube": dict(cls="cube", colour="blue", pattern="plain", marking="white_dots"),  # ~ cross_cube
    "ringed_ball": dict(cls="ball", colour="red", pattern="plain", marking="white_ring"),
    "banded_ball": dict(cls="ball", colour="red", pattern="plain", marking="white_band"),  # ~ ringed_ball
    "dotted_heart": dict(cls="heart", colour="purple", pattern="plain", marking="white_dots"),
    "striped_fish": dict(cls="fish", colour="orange", pattern="plain", marking="white_stripe"),
}


def lookalike_pairs() -> list[tuple[str, str]]:
    """Pairs of subjects with the same class and colour: only their markings tell them apart."""
    names = list(SUBJECTS)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if (SUBJECTS[a]["cls"], SUBJECTS[a]["colour"]) == (SUBJECTS[b]["cls"], SUBJECTS[b]["colour"])]


@dataclass(frozen=True)
class Spec:
    """Ground truth of one picture (what the oracle is trained to recover)."""

    cls: str
    colour: str
    context: str
    style: str
    pattern: str
    size: float  # object radius as a fraction of the image side
    cx: float  # object centre, fractions of the side
    cy: float
    angle: float  # small rotation in degrees (stars, fish tilt)
    mention_colour: bool = True  # caption says the colour (photos only)
    mention_context: bool = True  # caption says the context
    subject: Optional[str] = None  # name in SUBJECTS, or None for an ordinary instance


def sample_spec(
    rng: np.random.Generator,
    cls: Optional[str] = None,
    colour: Optional[str] = None,
    context: Optional[str] = None,
    style: Optional[str] = None,
    subject: Optional[str] = None,
    p_mention_colour: float = 0.7,
    p_mention_context: float = 0.8,
    p_sketch: float = 0.25,
) -> Spec:
    """Draw a random spec; any attribute given is fixed. A subject fixes class, colour and pattern."""
    pattern = None
    if subject is not None:
        if subject not in SUBJECTS:
            raise ValueError(f"unknown subject {subject!r}; known: {sorted(SUBJECTS)}")
        fixed = SUBJECTS[subject]
        cls, colour, pattern = fixed["cls"], fixed["colour"], fixed["pattern"]
    for name, value, allowed in (("cls", cls, CLASSES), ("colour", colour, COLOURS), ("context", context, CONTEXTS), ("style", style, STYLES)):
        if value is not None and value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    context = context or CONTEXTS[rng.integers(len(CONTEXTS))]
    style = style or ("sketch" if rng.random() < p_sketch else "photo")
    pattern = pattern or PATTERNS[rng.integers(len(PATTERNS))]
    size = float(rng.uniform(0.26, 0.40))
    margin = size + 0.04
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    return Spec(
        cls=cls, colour=colour, context=context, style=style, pattern=pattern, size=size, cx=cx, cy=cy,
        angle=float(rng.uniform(-15, 15)),
        mention_colour=bool(rng.random() < p_mention_colour) and style == "photo",
        mention_context=bool(rng.random() < p_mention_context),
        subject=subject,
    )


def caption(spec: Spec) -> str:
    """Caption of a spec, e.g. 'a photo of a red star on the grass' (pattern and marking never said)."""
    noun = f"{spec.colour} {spec.cls}" if spec.mention_colour else spec.cls
    article = "an" if noun[0] in "aeiou" else "a"
    text = f"{STYLE_PHRASES[spec.style]} {article} {noun}"
    return f"{text} {CONTEXT_PHRASES[spec.context]}" if spec.mention_context else text


# ---------------------------------------------------------------------------------------------
# drawing


def _shade(rgb, k: float) -> tuple:
    """k > 0 blends towards white, k < 0 towards black."""
    target = 255 if k > 0 else 0
    return tuple(int(c + (target - c) * abs(k)) for c in rgb)


def _background(context: str, rng: np.random.Generator, w: int) -> Image.Image:
    img = Image.new("RGB", (w, w))
    d = ImageDraw.Draw(img)
    u = w / SIZE  # one output pixel
    if context == "grass":
        horizon = int(w * rng.uniform(0.3, 0.45))
        d.rectangle([0, 0, w, horizon], fill=(150, 200, 245))
        d.rectangle([0, horizon, w, w], fill=(70, 150, 45))
        for _ in range(90):
            x, y = rng.uniform(0, w), rng.uniform(horizon, w)
            d.line([x, y, x + rng.uniform(-u, u), y - rng.uniform(1.5, 3) * u], fill=(35, 100, 25), width=int(u * 0.7))
    elif context == "snow":
        horizon = int(w * rng.uniform(0.3, 0.45))
        d.rectangle([0, 0, w, horizon], fill=(175, 185, 205))
        d.rectangle([0, horizon, w, w], fill=(245, 247, 252))
        for _ in range(40):
            x, y, r = rng.uniform(0, w), rng.uniform(0, w), u * rng.uniform(0.4, 0.8)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255) if y < horizon else (200, 210, 230))
    elif context == "beach":
        sea, sand = int(w * rng.uniform(0.2, 0.3)), int(w * rng.uniform(0.4, 0.5))
        d.rectangle([0, 0, w, sea], fill=(140, 205, 250))
        d.rectangle([0, sea, w, sand], fill=(25, 105, 185))
        d.rectangle([0, sand, w, w], fill=(235, 205, 140))
        for _ in range(50):
            x, y, r = rng.uniform(0, w), rng.uniform(sand, w), u * 0.4
            d.ellipse([x - r, y - r, x + r, y + r], fill=(190, 160, 100))
    elif context == "night":
        d.rectangle([0, 0, w, w], fill=(15, 20, 55))
        for _ in range(25):
            x, y = rng.uniform(0, w), rng.uniform(0, w)
            d.rectangle([x, y, x + u * 0.5, y + u * 0.5], fill=(230, 230, 200))
        mx, r = (w * 0.15 if rng.random() < 0.5 else w * 0.85), 3.5 * u
        d.ellipse([mx - r, w * 0.14 - r, mx + r, w * 0.14 + r], fill=(250, 245, 200))
    elif context == "water":
        d.rectangle([0, 0, w, w], fill=(30, 120, 200))
        phase = rng.uniform(0, 2 * math.pi)
        for row in np.arange(2.5, SIZE, 4.0) * u:
            xs = np.linspace(0, w, 40)
            ys = row + 0.9 * u * np.sin(xs / (3 * u) + phase + row)
            d.line(list(zip(xs, ys)), fill=(130, 200, 245), width=int(u * 0.8))
    elif context == "brick":
        d.rectangle([0, 0, w, w], fill=(200, 195, 185))  # mortar
        bh, bw = 4 * u, 8 * u
        off = rng.uniform(0, bw)
        for i, y in enumerate(np.arange(0, w, bh)):
            for x in np.arange(-bw + off + (bw / 2) * (i % 2), w, bw):
                tone = rng.uniform(-0.12, 0.12)
                d.rectangle([x + u * 0.4, y + u * 0.4, x + bw - u * 0.4, y + bh - u * 0.4], fill=_shade((160, 60, 40), tone))
    else:
        raise ValueError(f"unknown context {context!r}")
    return img


def _outline_points(spec: Spec, w: int) -> list:
    """Polygon of the object's silhouette in canvas pixels (cube/ball/fish handled in _draw_object)."""
    cx, cy, r = spec.cx * w, spec.cy * w, spec.size * w
    rot = math.radians(spec.angle)
    if spec.cls == "star":
        pts = []
        for k in range(10):
            a = rot - math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if spec.cls == "heart":
        t = np.linspace(0, 2 * math.pi, 60)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        s = r / 16.5
        return list(zip(cx + s * x, cy + s * (y + 1.5)))
    if spec.cls == "cube":  # isometric hexagon silhouette
        a = r * 0.62
        return [(cx - a, cy - a * 0.35), (cx - a * 0.45, cy - a * 0.95), (cx + a * 1.05, cy - a * 0.95),
                (cx + a * 1.05, cy + a * 0.55), (cx + a * 0.55, cy + a * 1.15), (cx - a, cy + a * 1.15)]
    raise AssertionError(spec.cls)


def _draw_object(img: Image.Image, spec: Spec, rng: np.random.Generator) -> None:
    w = img.width
    cx, cy, r = spec.cx * w, spec.cy * w, spec.size * w
    u = w / SIZE
    base = COLOURS[spec.colour]
    dark = _shade(base, -0.65)
    mask = Image.new("L", (w, w), 0)
    md = ImageDraw.Draw(mask)
    if spec.cls == "ball":
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif spec.cls == "fish":
        flip = -1 if spec.angle < 0 else 1  # half the fish face left
        md.ellipse([cx - r * 0.75, cy - r * 0.5, cx + r * 0.75, cy + r * 0.5], fill=255)
        tail = [(cx - flip * r * 0.6, cy), (cx - flip * r, cy - r * 0.5), (cx - flip * r, cy + r * 0.5)]
        md.polygon(tail, fill=255)
    else:
        md.polygon(_outline_points(spec, w), fill=255)

    # fill: base colour plus an unmentioned pattern in shades of the same colour (never white)
    fill = Image.new("RGB", (w, w), base)
    fd = ImageDraw.Draw(fill)
    if spec.pattern == "stripes":
        step = 4 * u
        for k in np.arange(-w, w, step):
            fd.line([k, 0, k + w, w], fill=_shade(base, -0.35), width=int(1.6 * u))
    elif spec.pattern == "spots":
        for _ in range(7):
            x, y, rr = cx + rng.uniform(-r, r) * 0.7, cy + rng.uniform(-r, r) * 0.7, u * rng.uniform(1.0, 1.6)
            fd.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_shade(base, -0.4))
    elif spec.pattern == "shine":
        rr = r * 0.45
        fd.ellipse([cx - r * 0.55 - rr / 2, cy - r * 0.55 - rr / 2, cx - r * 0.55 + rr, cy - r * 0.55 + rr], fill=_shade(base, 0.45))
    img.paste(fill, (0, 0), mask)

    d = ImageDraw.Draw(img)
    lw = int(0.9 * u)
    if spec.cls == "ball":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=dark, width=lw)
    elif spec.cls == "fish":
        flip = -1 if spec.angle < 0 else 1
        d.ellipse([cx - r * 0.75, cy - r * 0.5, cx + r * 0.75, cy + r * 0.5], outline=dark, width=lw)
        d.polygon(tail, outline=dark, width=lw)
        ex, ey, er = cx + flip * r * 0.38, cy - r * 0.12, 1.3 * u
        d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(10, 10, 10))
    else:
        pts = _outline_points(spec, w)
        if spec.cls == "cube":  # lighter top face, darker side face, front-face edges
            a = r * 0.62
            top = [pts[0], pts[1], pts[2], (cx + a * 0.55, cy - a * 0.35)]
            side = [(cx + a * 0.55, cy - a * 0.35), pts[2], pts[3], pts[4]]
            d.polygon(top, fill=_shade(base, 0.35), outline=dark, width=lw)
            d.polygon(side, fill=_shade(base, -0.3), outline=dark, width=lw)
        d.polygon(pts, outline=dark, width=lw)
    _draw_marking(img, d, spec, u, mask)


def _draw_marking(img: Image.Image, d: ImageDraw.ImageDraw, spec: Spec, u: float, mask: Image.Image) -> None:
    """The subject's distinguishing feature: white, bold, inexpressible in the caption vocabulary.
    Draws nothing (and uses no random numbers) for other pictures, so they are as before subjects existed."""
    if spec.subject is None:
        return
    w = SIZE * u
    cx, cy, r = spec.cx * w, spec.cy * w, spec.size * w
    marking = SUBJECTS[spec.subject]["marking"]
    white, edge = (255, 255, 255), (40, 40, 40)
    if marking in ("white_band", "white_stripe"):  # a band across the body, dark-edged, cut to the silhouette
        # the horizontal band is wide: a white area, not a pair of lines that a horizon seen through a
        # generated object could mimic (a 0.34 r band: the oracle called 8 of 144 base-model stars banded)
        half = 0.25 * r if marking == "white_band" else 0.17 * r
        for colour, h in ((edge, half + 0.6 * u), (white, half)):
            band = Image.new("L", img.size, 0)
            box = [0, cy - h, w, cy + h] if marking == "white_band" else [cx - h, 0, cx + h, w]
            ImageDraw.Draw(band).rectangle(box, fill=255)
            img.paste(Image.new("RGB", img.size, colour), (0, 0), ImageChops.multiply(band, mask))
    elif marking == "white_ring":
        rr = 0.5 * r
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=white, width=int(1.4 * u))
    elif marking == "white_dots" and spec.cls == "cube":  # two dots on the front face, diagonal (a die's 2)
        a = r * 0.62
        fx, fy, k, rr = cx - a * 0.22, cy + a * 0.4, a * 0.38, 0.32 * a
        for x, y in ((fx - k, fy - k), (fx + k, fy + k)):
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=white, outline=edge, width=int(0.5 * u))
    elif marking == "white_dots":  # two dots side by side, like eyes
        rr = 0.17 * r
        for x in (cx - 0.33 * r, cx + 0.33 * r):
            d.ellipse([x - rr, cy - 0.1 * r - rr, x + rr, cy - 0.1 * r + rr], fill=white, outline=edge, width=int(0.5 * u))
    elif marking == "white_disc":
        rr = 0.3 * r
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(255, 255, 255), outline=(40, 40, 40), width=int(0.6 * u))
    elif marking == "white_cross":  # a plus sign on the cube's front face
        a = r * 0.62
        fx, fy, h = cx - a * 0.22, cy + a * 0.4, a * 0.58
        d.line([fx - h, fy, fx + h, fy], fill=(255, 255, 255), width=int(2.0 * u))
        d.line([fx, fy - h, fx, fy + h], fill=(255, 255, 255), width=int(2.0 * u))
    else:
        raise AssertionError(marking)


def _to_sketch(img: Image.Image) -> Image.Image:
    """Grayscale pencil look: dark strokes where the photo has edges, on light paper with faint shading."""
    g = np.asarray(img.convert("L"), dtype=np.float32)
    gx = np.zeros_like(g)
    gy = np.zeros_like(g)
    gx[:, 1:-1] = g[:, 2:] - g[:, :-2]
    gy[1:-1, :] = g[2:, :] - g[:-2, :]
    edges = np.clip(np.hypot(gx, gy) * 2.2, 0, 200)
    paper = 238 + 0.12 * (g - 128)  # faint tonal shading keeps dark scenes (night) recognisable
    out = np.clip(paper - edges, 0, 255).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


def render(spec: Spec, seed: int) -> Image.Image:
    """Draw `spec` as a SIZE x SIZE RGB PIL image; deterministic in (spec, seed)."""
    rng = np.random.default_rng(seed)
    img = _background(spec.context, rng, SIZE * SUPER)
    _draw_object(img, spec, rng)
    if spec.style == "sketch":
        img = _to_sketch(img)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def render_dataset(n: int, seed: int, **spec_kwargs) -> tuple[np.ndarray, list[Spec]]:
    """n random pictures as a uint8 array (n, SIZE, SIZE, 3) plus their specs; reproducible from seed."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, **spec_kwargs) for _ in range(n)]
    seeds = rng.integers(0, 2**31, size=n)
    pixels = np.stack([np.asarray(render(s, int(k))) for s, k in zip(specs, seeds)])
    return pixels, specs


# Subject photos: 5 per subject in 3 contexts, so snow/night/water stay unseen for recontextualization.
SUBJECT_PHOTO_CONTEXTS = ("grass", "brick", "grass", "beach", "brick")


def subject_specs(subject: str, seed: int = 0) -> list[Spec]:
    """The 5 fixed specs of a subject's photos (varied size and position, photo style)."""
    rng = np.random.default_rng(seed + 1000 * (list(SUBJECTS).index(subject) + 1))
    return [dataclasses.replace(sample_spec(rng, context=c, style="photo", subject=subject), mention_colour=False)
            for c in SUBJECT_PHOTO_CONTEXTS]


def write_subject_images(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write <root>/<subject>/0{0..4}.png (DreamBench layout: one folder per subject); returns the folders."""
    root = Path(root)
    out = {}
    for name in SUBJECTS:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(subject_specs(name, seed)):
            render(spec, seed=seed * 100 + i).save(folder / f"{i:02d}.png")
        out[name] = folder
    return out
