"""The DreamBooth paper's evaluation metrics (Ruiz et al., CVPR 2023, Sec. 4.1 and Table 3).

Subject fidelity: DINO (ViT-S/16 CLS token) and CLIP-I (CLIP image embedding), each the mean
cosine similarity over all (generated, real) image pairs. Prompt fidelity: CLIP-T, the mean
cosine similarity of each image to its prompt. Prior preservation: PRES, DINO similarity of the
fine-tuned model's plain class-prompt images to the real subject (lower = less language drift).
Diversity: DIV, mean pairwise LPIPS among images of one prompt (higher = more diverse).

Encoders are loaded once (`load_dino`, `load_clip`) and passed to every metric. Images are
preprocessed by the checkpoint's own image processor with transformers' PIL backend, so the
numbers are the same with or without torchvision installed.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer, ViTModel

DINO_ID = "facebook/dino-vits16"  # the paper's DINO ViT-S/16
CLIP_ID = "openai/clip-vit-base-patch32"
DIV_LPIPS = "DIV (LPIPS)"
DIV_DINO_FALLBACK = "DIV (fallback: 1 - DINO cos)"  # no LPIPS weights given

Images = Sequence[Image.Image] | torch.Tensor  # PIL list, or a float (B, 3, H, W) batch in [0, 1]


@dataclass
class Encoder:
    kind: str  # "dino" or "clip"
    model: torch.nn.Module
    processor: object  # the checkpoint's image processor (PIL backend)
    device: torch.device
    name: str  # hub id or folder it came from
    tokenizer: object | None = None  # CLIP only


@dataclass
class Encoders:
    """What `evaluate.evaluate_run` scores with; a missing one leaves its metrics empty."""

    dino: Encoder | None = None
    clip: Encoder | None = None
    lpips: Callable | None = None  # lpips(x, y) -> distances, x/y (N, 3, H, W) in [-1, 1]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _missing_message(what: str, model: str, reason: object, default_id: str, model_cls: str) -> str:
    return (
        f"could not load the {what} encoder from '{model}' ({reason}). {what} scores need real pretrained "
        f"weights. Online (e.g. Colab): pass a hub id such as '{default_id}'; it downloads once into the "
        f"Hugging Face cache. Offline: on a connected machine run `{model_cls}.from_pretrained('{default_id}')"
        ".save_pretrained(FOLDER)` and save its AutoImageProcessor"
        + (" and CLIPTokenizer" if what == "CLIP" else "")
        + " to the same FOLDER, then pass FOLDER; or fill the HF cache there and set HF_HUB_OFFLINE=1 here."
    )


def _looks_like_path(model: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a folder."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_parts(model: str, local_files_only: bool | None, what: str, default_id: str, loaders: dict) -> dict:
    """Call each `from_pretrained` in `loaders` on `model`; any failure becomes one clear error."""
    model_cls = loaders["model"][0].__name__
    path = Path(model).expanduser()
    if not path.exists() and _looks_like_path(model):
        raise FileNotFoundError(_missing_message(what, model, f"folder {path} does not exist", default_id, model_cls))
    source = str(path) if path.exists() else model
    if local_files_only is None:
        local_files_only = path.exists() or _offline()
    parts = {}
    for key, (cls, kwargs) in loaders.items():
        try:
            parts[key] = cls.from_pretrained(source, local_files_only=local_files_only, **kwargs)
        except (OSError, ValueError) as err:  # hub/cache misses are OSError; bad repo ids ValueError
            raise FileNotFoundError(_missing_message(what, model, err, default_id, model_cls)) from err
    return parts


def load_dino(model: str = DINO_ID, device=None, local_files_only: bool | None = None) -> Encoder:
    """DINO ViT from a hub id or a save_pretrained folder (safetensors only, no remote code).

    `local_files_only=None`: a folder or HF_HUB_OFFLINE=1 never touches the network.
    """
    device = torch.device(device) if device is not None else default_device()
    parts = _load_parts(
        model,
        local_files_only,
        "DINO",
        DINO_ID,
        {
            # The paper's embedding is the CLS token, so the (randomly initialised) pooler is left out.
            "model": (ViTModel, dict(add_pooling_layer=False, use_safetensors=True)),
            "processor": (AutoImageProcessor, dict(backend="pil")),
        },
    )
    return Encoder("dino", parts["model"].to(device).eval(), parts["processor"], device, model)


def load_clip(model: str = CLIP_ID, device=None, local_files_only: bool | None = None) -> Encoder:
    """CLIP (image + text towers) from a hub id or a save_pretrained folder (safetensors only)."""
    device = torch.device(device) if device is not None else default_device()
    parts = _load_parts(
        model,
        local_files_only,
        "CLIP",
        CLIP_ID,
        {
            "model": (CLIPModel, dict(use_safetensors=True)),
            "processor": (AutoImageProcessor, dict(backend="pil")),
            "tokenizer": (CLIPTokenizer, {}),
        },
    )
    return Encoder("clip", parts["model"].to(device).eval(), parts["processor"], device, model, parts["tokenizer"])


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def to_pil(images: Images) -> list[Image.Image]:
    """PIL list (converted to RGB) or a float (B, 3, H, W) batch in [0, 1] (quantised to 8 bits,
    like a saved image) -> list of RGB PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image batch must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.detach().float().cpu()
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"image batch values must lie in [0, 1], got [{x.min():.3f}, {x.max():.3f}]: map [-1, 1] data with (x + 1) / 2"
            )
        arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]
    return [im.convert("RGB") for im in images]


@torch.no_grad()
def _embed(images: Images, encoder: Encoder, batch_size: int) -> torch.Tensor:
    pil = to_pil(images)
    if not pil:
        raise ValueError(f"no images to embed with {encoder.kind.upper()}")
    out = []
    for start in range(0, len(pil), batch_size):
        pixels = encoder.processor(images=pil[start : start + batch_size], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(encoder.device, dtype=encoder.model.dtype)
        if encoder.kind == "dino":
            feats = encoder.model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token
        else:
            feats = encoder.model.get_image_features(pixel_values=pixels).pooler_output  # projected embedding
        out.append(feats.float().cpu())
    return torch.cat(out)


def dino_embed(images: Images, dino: Encoder, batch_size: int = 32) -> torch.Tensor:
    """(N, D) DINO CLS-token embeddings."""
    return _embed(images, dino, batch_size)


def clip_image_embed(images: Images, clip: Encoder, batch_size: int = 32) -> torch.Tensor:
    """(N, D) CLIP image embeddings (after the visual projection)."""
    return _embed(images, clip, batch_size)


@torch.no_grad()
def clip_text_embed(prompts: Sequence[str], clip: Encoder, batch_size: int = 32) -> torch.Tensor:
    """(N, D) CLIP text embeddings. CLIP's text attention is causal and pools at the end token, so
    padding within a batch does not change a prompt's embedding."""
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = clip.tokenizer(
            list(prompts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=clip.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(clip.device)
        out.append(clip.model.get_text_features(**tokens).pooler_output.float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Pure math on embeddings (float64 so that results do not depend on batching)
# ---------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (a_i, b_j): the paper's DINO / CLIP-I / PRES."""
    return float((_unit(a) @ _unit(b).T).mean())


def mean_paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of row i of a with row i of b: CLIP-T (image i vs its prompt)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((_unit(a) * _unit(b)).sum(-1).mean())


def mean_within_cosine(a: torch.Tensor) -> float:
    """Mean cosine similarity over unordered pairs i < j of one set."""
    if len(a) < 2:
        raise ValueError("need at least 2 embeddings for pairwise similarity within a set")
    sim = _unit(a) @ _unit(a).T
    i, j = torch.triu_indices(len(a), len(a), offset=1)
    return float(sim[i, j].mean())


# ---------------------------------------------------------------------------------------------
# The metrics
# ---------------------------------------------------------------------------------------------


def dino_score(gen: Images, real: Images, dino: Encoder, batch_size: int = 32) -> float:
    """Subject fidelity: mean DINO cosine over all (generated, real) pairs (paper: 0.668 for SD)."""
    return mean_cosine(dino_embed(gen, dino, batch_size), dino_embed(real, dino, batch_size))


def clip_i_score(gen: Images, real: Images, clip: Encoder, batch_size: int = 32) -> float:
    """Subject fidelity: mean CLIP image-embedding cosine over all (generated, real) pairs."""
    return mean_cosine(clip_image_embed(gen, clip, batch_size), clip_image_embed(real, clip, batch_size))


def strip_identifier(prompt: str, identifier: str | None) -> str:
    """'a sks dog on the beach' -> 'a dog on the beach': CLIP does not know the rare token."""
    if not identifier:
        return prompt
    return " ".join(re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", " ", prompt).split())


def clip_t_score(
    images: Images, prompts: Sequence[str], clip: Encoder, identifier: str | None = None, batch_size: int = 32
) -> tuple[float, list[str]]:
    """Prompt fidelity: mean cosine of each image to its own prompt, identifier removed.

    Returns (score, the prompts as CLIP saw them)."""
    pil = to_pil(images)
    if len(pil) != len(prompts):
        raise ValueError(f"clip_t_score needs one prompt per image, got {len(pil)} images and {len(prompts)} prompts")
    cleaned = [strip_identifier(p, identifier) for p in prompts]
    score = mean_paired_cosine(clip_image_embed(pil, clip, batch_size), clip_text_embed(cleaned, clip, batch_size))
    return score, cleaned


def pres_score(class_prompt_images: Images, real: Images, dino: Encoder, batch_size: int = 32) -> float:
    """Prior preservation: DINO similarity of the fine-tuned model's 'a [class noun]' images to the
    real subject. High means every member of the class turned into the subject (lower is better)."""
    return mean_cosine(dino_embed(class_prompt_images, dino, batch_size), dino_embed(real, dino, batch_size))


def _lpips_device(lpips_model: Callable) -> torch.device:
    params = list(lpips_model.parameters()) if isinstance(lpips_model, torch.nn.Module) else []
    return params[0].device if params else torch.device("cpu")


@torch.no_grad()
def _lpips_mean_pairwise(images: list[Image.Image], lpips_model: Callable, batch_size: int) -> float:
    device = _lpips_device(lpips_model)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    x = x / 127.5 - 1  # LPIPS expects [-1, 1]
    pairs = list(itertools.combinations(range(len(images)), 2))
    dists = []
    for start in range(0, len(pairs), batch_size):
        i, j = map(list, zip(*pairs[start : start + batch_size]))
        dists.append(torch.as_tensor(lpips_model(x[i].to(device), x[j].to(device))).reshape(-1).double().cpu())
    return float(torch.cat(dists).mean())


def div_per_prompt(
    images_per_prompt: Sequence[Images], lpips_model: Callable | None = None, dino: Encoder | None = None, batch_size: int = 32
) -> tuple[list[float], str]:
    """Diversity of each prompt's images: mean pairwise LPIPS distance when an LPIPS model is given
    (the paper's DIV), otherwise 1 - mean pairwise DINO cosine, labelled as the fallback.

    Returns (one value per prompt, the metric's name: DIV_LPIPS or DIV_DINO_FALLBACK)."""
    groups = [to_pil(g) for g in images_per_prompt]
    if any(len(g) < 2 for g in groups):
        raise ValueError("diversity needs at least 2 images per prompt (n_per_prompt >= 2)")
    if lpips_model is not None:
        return [_lpips_mean_pairwise(g, lpips_model, batch_size) for g in groups], DIV_LPIPS
    if dino is not None:
        return [1.0 - mean_within_cosine(dino_embed(g, dino, batch_size)) for g in groups], DIV_DINO_FALLBACK
    raise ValueError("div_score needs an LPIPS callable (lpips_model=...) or a DINO encoder for the fallback (dino=...)")


def div_score(
    images_per_prompt: Sequence[Images], lpips_model: Callable | None = None, dino: Encoder | None = None, batch_size: int = 32
) -> tuple[float, str]:
    """Mean of `div_per_prompt` over prompts; returns (value, metric name) so LPIPS and the DINO
    fallback are never mixed up."""
    values, name = div_per_prompt(images_per_prompt, lpips_model, dino, batch_size)
    return float(np.mean(values)), name
