"""The toy world's oracle: a small CNN that reads the renderer's ground truth back out of a picture,
and the paper's metrics (Ruiz et al. 2023, Sec. 4.1) computed with it instead of DINO/CLIP.

One shared conv trunk, five heads: class, colour, context, style and subject (none / each name in
`render.SUBJECTS`). It is trained on freshly rendered pictures only, with augmentation so it copes
with generated images: shifts and rescaling, blur, noise, mild colour jitter and the VAE's
encode/decode round trip (generated images come out of that decoder): toyworld/oracle_training.py.

Metrics, named after the paper's:
  subject fidelity  share of generated images the oracle identifies as the subject   (cf. DINO, CLIP-I)
  prompt fidelity   share matching ALL prompted attributes (context, colour, style)  (cf. CLIP-T)
  PRES              share of plain class-prompt images identified as the subject     (language drift)
  DIV               mean pairwise (1 - cosine) of oracle features within one prompt  (cf. LPIPS DIV)

    oracle = load_oracle("data/oracle")
    oracle.predict([image])[0]["subject"]        # 'marked_star'
    subject_fidelity(oracle, images, "marked_star")
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from dreambooth_lib.config import REPO
from dreambooth_lib.toyworld import render

ORACLE_DIR = str(REPO / "data" / "oracle")
LABELS = {
    "class": render.CLASSES,
    "colour": tuple(render.COLOURS),
    "context": render.CONTEXTS,
    "style": render.STYLES,
    "subject": ("none", *render.SUBJECTS),
}
SPEC_FIELD = {"class": "cls", "colour": "colour", "context": "context", "style": "style", "subject": "subject"}
IGNORE = -1  # label of a head that cannot be known: the colour of a (grey) pencil sketch


# ---------------------------------------------------------------------------------------------
# model


class OracleNet(nn.Module):
    """Conv trunk 32 -> 16 -> 8 -> 4 px, global average pool, one linear head per attribute.

    One conv at full resolution keeps the compute small (CPU training) while its 3x3 filters still
    see the subjects' 2-3 px markings before the first pooling."""

    def __init__(self, width: int = 16, labels: dict = LABELS):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.trunk = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 8 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(8 * w, len(values)) for name, values in labels.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = self.trunk(x)
        return feats, {name: head(feats) for name, head in self.heads.items()}


def to_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float (N, 3, 32, 32) in [-1, 1] (other sizes are resized to the renderer's)."""
    arrays = [np.asarray(im.convert("RGB").resize((render.SIZE, render.SIZE), Image.BILINEAR)
                         if im.size != (render.SIZE, render.SIZE) or im.mode != "RGB" else im) for im in images]
    return _to_float(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


@dataclass
class Oracle:
    net: OracleNet
    labels: dict
    info: dict  # the oracle.json contents (training settings, accuracies)

    @torch.no_grad()
    def _run(self, images: Sequence[Image.Image], batch_size: int = 256):
        if len(images) == 0:
            raise ValueError("oracle: got no images")
        self.net.eval()
        feats, logits = [], {k: [] for k in self.labels}
        for i in range(0, len(images), batch_size):
            f, out = self.net(to_batch(images[i:i + batch_size]))
            feats.append(f)
            for k in self.labels:
                logits[k].append(out[k])
        return torch.cat(feats), {k: torch.cat(v) for k, v in logits.items()}

    def predict(self, images: Sequence[Image.Image]) -> list[dict]:
        """Per image: {head: label} for every head, plus "probs": {head: {label: probability}}."""
        _, logits = self._run(images)
        probs = {k: v.softmax(-1) for k, v in logits.items()}
        out = []
        for i in range(len(images)):
            row = {k: self.labels[k][int(probs[k][i].argmax())] for k in self.labels}
            row["probs"] = {k: dict(zip(self.labels[k], probs[k][i].tolist())) for k in self.labels}
            out.append(row)
        return out

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Penultimate features (N, 8 * width): the pooled trunk output, non-negative (after ReLU)."""
        return self._run(images)[0]


def load_oracle(path: str | Path = ORACLE_DIR) -> Oracle:
    """Read oracle.json (architecture, labels) and oracle.safetensors from the folder `path`."""
    path = Path(path)
    meta_path, weights_path = path / "oracle.json", path / "oracle.safetensors"
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: train the oracle with `python -m dreambooth_lib.toyworld "
                                    f"oracle-train --out {path}`")
    info = json.loads(meta_path.read_text())
    labels = {k: tuple(v) for k, v in info["labels"].items()}
    net = OracleNet(width=info["width"], labels=labels)
    net.load_state_dict(load_file(weights_path))
    return Oracle(net.eval(), labels, info)


# ---------------------------------------------------------------------------------------------
# metrics


def _check_subject(subject: str) -> None:
    if subject not in render.SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}; known: {sorted(render.SUBJECTS)}")


def subject_fidelity(oracle: Oracle, images: Sequence[Image.Image], subject: str) -> float:
    """Share of images the oracle identifies as `subject`."""
    _check_subject(subject)
    return float(np.mean([p["subject"] == subject for p in oracle.predict(images)]))


def prompt_fidelity(oracle: Oracle, images: Sequence[Image.Image], expected: dict) -> float:
    """Share of images matching ALL expected attributes, e.g. {"context": "snow", "class": "star"}."""
    for key, value in expected.items():
        if key not in ("class", "colour", "context", "style"):
            raise ValueError(f"prompt_fidelity: expected key {key!r} is not one of class/colour/context/style")
        if value not in LABELS[key]:
            raise ValueError(f"prompt_fidelity: {key}={value!r} is not one of {list(LABELS[key])}")
    preds = oracle.predict(images)
    return float(np.mean([all(p[k] == v for k, v in expected.items()) for p in preds]))


def pres(oracle: Oracle, images: Sequence[Image.Image], subject: str) -> float:
    """PRES: share of images of the plain class prompt (`class_prompt(subject)`) identified as the
    subject. The base model scores ~0; a fine-tuned model that draws its subject for every "a star"
    has drifted (the paper's language drift); lower is better."""
    return subject_fidelity(oracle, images, subject)


def attribute_shift(oracle: Oracle, before: Sequence[Image.Image], after: Sequence[Image.Image],
                    head: str = "context") -> dict:
    """How far the distribution of one attribute moved between two sets of pictures of the same prompt:
    the total variation distance between the oracle's label histograms (0 = same mix of, e.g.,
    backgrounds; 1 = no label in common), with both histograms. PRES asks only "is it the subject?";
    this catches the class prompt drifting to the training pictures' look (e.g. always at night)."""
    if head not in LABELS:
        raise ValueError(f"attribute_shift: head {head!r} is not one of {list(LABELS)}")
    counts = []
    for images in (before, after):
        if not images:
            raise ValueError("attribute_shift needs pictures on both sides")
        labels = [p[head] for p in oracle.predict(images)]
        counts.append({v: labels.count(v) / len(labels) for v in LABELS[head] if v in labels})
    tv = 0.5 * sum(abs(counts[0].get(v, 0.0) - counts[1].get(v, 0.0)) for v in LABELS[head])
    return dict(total_variation=tv, before=counts[0], after=counts[1])


def div(oracle: Oracle, images: Sequence[Image.Image]) -> float:
    """DIV: mean over pairs i < j of 1 - cos(f_i, f_j), f the oracle's pooled features (non-negative,
    so DIV is in [0, 1]); 0 when all images are identical. Use images of ONE prompt (as the paper)."""
    if len(images) < 2:
        raise ValueError(f"div needs at least 2 images of one prompt, got {len(images)}")
    f = F.normalize(oracle.features(images), dim=-1)
    cos = f @ f.T
    i, j = torch.triu_indices(len(f), len(f), offset=1)
    return float((1 - cos[i, j]).mean())


# ---------------------------------------------------------------------------------------------
# prompt suites (the paper's recontextualization / property modification / art renditions)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_suite(subject: str) -> dict[str, list[tuple[str, dict]]]:
    """{category: [(template, expected)]}; templates keep "{identifier}" as the only placeholder
    (the class noun is filled in), in the renderer's caption words so the base model knows them."""
    _check_subject(subject)
    cls, colour = render.SUBJECTS[subject]["cls"], render.SUBJECTS[subject]["colour"]
    photo, sketch = render.STYLE_PHRASES["photo"], render.STYLE_PHRASES["sketch"]
    return {
        "recontextualization": [(f"{photo} {{identifier}} {cls} {render.CONTEXT_PHRASES[c]}",
                                 {"class": cls, "context": c}) for c in render.CONTEXTS],
        "property": [(f"{photo} {_article(c)} {c} {{identifier}} {cls}", {"class": cls, "colour": c})
                     for c in render.COLOURS if c != colour],
        "art": [(f"{sketch} {{identifier}} {cls}", {"class": cls, "style": "sketch"})]
        + [(f"{sketch} {{identifier}} {cls} {render.CONTEXT_PHRASES[c]}",
            {"class": cls, "style": "sketch", "context": c}) for c in render.CONTEXTS],
    }


PROMPT_SUITES = {name: prompt_suite(name) for name in render.SUBJECTS}


def class_prompt(subject: str) -> str:
    """The plain class prompt whose images PRES scores, e.g. "a photo of a star"."""
    _check_subject(subject)
    return f"{render.STYLE_PHRASES['photo']} a {render.SUBJECTS[subject]['cls']}"


def _match(prompt: str, suite: dict) -> tuple[str, str, dict] | None:
    """(category, template, expected) of a prompt given as a template or filled with any identifier."""
    for category, entries in suite.items():
        for template, expected in entries:
            pattern = re.escape(template).replace(re.escape("{identifier}"), r"\S+")
            if prompt == template or re.fullmatch(pattern, prompt):
                return category, template, expected
    return None


def evaluate_images(oracle: Oracle, images_by_prompt: dict[str, Sequence[Image.Image]], subject: str) -> dict:
    """Score generated images keyed by prompt (suite templates, or them with the identifier filled in;
    optionally `class_prompt(subject)` for PRES). Per prompt, per category and overall: subject
    fidelity and prompt fidelity (image-weighted) and DIV (mean over prompts of the per-prompt DIV)."""
    suite = prompt_suite(subject)
    per_prompt, categories = {}, {}
    result = {"subject": subject, "pres": None}
    for prompt, images in images_by_prompt.items():
        if prompt == class_prompt(subject):
            result["pres"] = pres(oracle, images, subject)
            continue
        found = _match(prompt, suite)
        if found is None:
            raise ValueError(f"evaluate_images: prompt {prompt!r} is not in prompt_suite({subject!r}) nor "
                             f"class_prompt ({class_prompt(subject)!r})")
        category, template, expected = found
        per_prompt[prompt] = dict(category=category, expected=expected, n=len(images),
                                  subject_fidelity=subject_fidelity(oracle, images, subject),
                                  prompt_fidelity=prompt_fidelity(oracle, images, expected),
                                  div=div(oracle, images) if len(images) > 1 else None)
        categories.setdefault(category, []).append(per_prompt[prompt])

    def summary(rows):
        n = sum(r["n"] for r in rows)
        divs = [r["div"] for r in rows if r["div"] is not None]
        return dict(n_prompts=len(rows), n_images=n,
                    subject_fidelity=sum(r["subject_fidelity"] * r["n"] for r in rows) / n,
                    prompt_fidelity=sum(r["prompt_fidelity"] * r["n"] for r in rows) / n,
                    div=float(np.mean(divs)) if divs else None)

    result["per_category"] = {c: summary(rows) for c, rows in categories.items()}
    result["overall"] = summary(list(per_prompt.values())) if per_prompt else None
    result["per_prompt"] = per_prompt
    return result


# ---------------------------------------------------------------------------------------------
# base model check


def base_prompts() -> list[tuple[str, dict]]:
    """Captions varying one attribute at a time (class, colour, context, style), exactly as the
    renderer writes them, with the attributes each one asks for."""
    def spec(**kw):
        fixed = dict(colour="red", context="grass", style="photo", pattern="plain", size=0.3, cx=0.5, cy=0.5, angle=0.0)
        return render.Spec(**{**fixed, **kw})

    out = []
    for cls in render.CLASSES:
        out.append((render.caption(spec(cls=cls, mention_colour=False, mention_context=False)),
                    {"class": cls, "style": "photo"}))
    for cls, colour in zip(itertools.cycle(render.CLASSES), render.COLOURS):
        out.append((render.caption(spec(cls=cls, colour=colour, mention_context=False)),
                    {"class": cls, "colour": colour, "style": "photo"}))
    for cls, context in zip(itertools.cycle(render.CLASSES[1:] + render.CLASSES[:1]), render.CONTEXTS):
        out.append((render.caption(spec(cls=cls, context=context, mention_colour=False)),
                    {"class": cls, "context": context, "style": "photo"}))
    for cls in render.CLASSES:
        out.append((render.caption(spec(cls=cls, style="sketch", mention_colour=False, mention_context=False)),
                    {"class": cls, "style": "sketch"}))
    return out


def base_subject_eval(oracle: Oracle, pipe, n: int = 8, guidance_scale: float = 7.0, steps: int = 25,
                      seed: int = 0, log=print) -> dict:
    """Per subject, before any fine-tuning: the share of the base model's pictures for the subject's
    prompt suite (identifier: the rare token training would pick) and for its plain class prompt that
    the oracle identifies as that subject (target <= 0.05: the base model cannot draw the marking),
    and the suite prompt where that share is highest."""
    from dreambooth_lib.data import resolve_identifier
    from dreambooth_lib.sample import generate

    identifier = resolve_identifier(pipe.tokenizer, None, log=log)
    out = {}
    for name in render.SUBJECTS:
        prompts = [t.format(identifier=identifier) for entries in prompt_suite(name).values() for t, _ in entries]
        flat = [p for p in prompts + [class_prompt(name)] for _ in range(n)]
        images = generate(pipe, flat, seeds=[seed + i for _ in range(len(prompts) + 1) for i in range(n)],
                          guidance_scale=guidance_scale, num_inference_steps=steps, batch_size=16, progress=False,
                          resolution=render.SIZE)
        hits = np.array([p["subject"] == name for p in oracle.predict(images)]).reshape(-1, n).mean(1)
        worst = int(hits[:-1].argmax())
        out[name] = dict(suite=round(float(hits[:-1].mean()), 4), class_prompt=round(float(hits[-1]), 4),
                         worst_prompt=prompts[worst], worst_prompt_share=round(float(hits[worst]), 4))
    return dict(identifier=identifier, n_per_prompt=n, per_subject=out)


def base_eval(oracle: Oracle, model: str | Path, n: int = 8, guidance_scale: float = 7.0, steps: int = 25,
              seed: int = 0, per_subject: bool = True) -> dict:
    """Generate n images per `base_prompts()` caption with the base model; report the share of images
    following each asked-for attribute and the share identified as any subject (should be ~0); with
    per_subject, also `base_subject_eval` (n images per prompt of every subject's suite)."""
    from dreambooth_lib.sample import generate, load_pipeline

    pipe = load_pipeline(model)
    prompts = base_prompts()
    flat = [p for p, _ in prompts for _ in range(n)]
    images = generate(pipe, flat, seeds=[seed + i for _ in prompts for i in range(n)], guidance_scale=guidance_scale,
                      num_inference_steps=steps, batch_size=16, resolution=render.SIZE)
    preds = oracle.predict(images)
    hits = {k: [] for k in ("class", "colour", "context", "style")}
    per_prompt = {}
    for j, (prompt, expected) in enumerate(prompts):
        chunk = preds[j * n:(j + 1) * n]
        for k, v in expected.items():
            hits[k] += [p[k] == v for p in chunk]
        per_prompt[prompt] = float(np.mean([all(p[k] == v for k, v in expected.items()) for p in chunk]))
    return dict(
        model=str(model), n_per_prompt=n, guidance_scale=guidance_scale, steps=steps,
        followed={k: round(float(np.mean(v)), 4) for k, v in hits.items()},
        subject_share=round(float(np.mean([p["subject"] != "none" for p in preds])), 4),
        per_prompt=per_prompt,
        subjects=base_subject_eval(oracle, pipe, n, guidance_scale, steps, seed, log=lambda *_: None)  # stdout is JSON
        if per_subject else None,
    )
