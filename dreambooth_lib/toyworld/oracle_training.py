"""Training and checking the toy world's oracle (oracle.py): freshly rendered, labelled pictures, the
augmentations that make it cope with generated images (shifts, rescaling, blur, noise, colour jitter,
the VAE's encode/decode round trip), the training loop, and per-head accuracy on a fresh set.

    python -m dreambooth_lib.toyworld oracle-train     # writes data/oracle
    python -m dreambooth_lib.toyworld oracle-eval      # per-head accuracy, fresh and after the VAE round trip
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dreambooth_lib.fsio import follow_umask
from dreambooth_lib.toyworld import render
from dreambooth_lib.toyworld.oracle import IGNORE, LABELS, ORACLE_DIR, SPEC_FIELD, Oracle, OracleNet, _to_float


# ---------------------------------------------------------------------------------------------
# training data


def label_row(spec: render.Spec) -> list[int]:
    """Head labels of a spec, in LABELS order; the colour of a sketch is IGNORE."""
    row = []
    for head, values in LABELS.items():
        value = getattr(spec, SPEC_FIELD[head])
        if head == "subject":
            value = value or "none"
        row.append(IGNORE if head == "colour" and spec.style == "sketch" else values.index(value))
    return row


def oracle_specs(n: int, rng: np.random.Generator, p_sketch: float = 0.35) -> list[render.Spec]:
    """Balanced mix: 1/3 subjects, 1/6 hard negatives (a subject's class AND colour, any pattern, no
    marking), 1/2 ordinary pictures; every context, size, position and both styles throughout."""
    names = list(render.SUBJECTS)
    specs = []
    for i in range(n):
        kind, name = i % 6, names[(i // 6) % len(names)]
        if kind < 2:
            specs.append(render.sample_spec(rng, subject=name, p_sketch=p_sketch))
        elif kind == 2:
            fixed = render.SUBJECTS[name]
            specs.append(render.sample_spec(rng, cls=fixed["cls"], colour=fixed["colour"], p_sketch=p_sketch))
        else:
            specs.append(render.sample_spec(rng, p_sketch=p_sketch))
    return specs


def render_labelled(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n pictures from `oracle_specs` as uint8 (n, 3, 32, 32) and their labels (n, heads)."""
    rng = np.random.default_rng(seed)
    specs = oracle_specs(n, rng)
    seeds = rng.integers(0, 2**31, size=n)
    pixels = np.stack([np.asarray(render.render(s, int(k))) for s, k in
                       tqdm(zip(specs, seeds), total=n, desc="render", mininterval=5)])
    labels = torch.tensor([label_row(s) for s in specs])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels


def load_vae(path: str | Path):
    """The AutoencoderKL of a pipeline folder (`<path>/vae`) or a vae folder itself."""
    from diffusers import AutoencoderKL

    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--vae {path}: no vae/config.json or config.json there; give a diffusers "
                                "pipeline folder (e.g. data/toy_model) or its vae subfolder")
    return AutoencoderKL.from_pretrained(folder).eval()


@torch.no_grad()
def vae_round_trip(vae, pixels: torch.Tensor, latent_noise: float = 0.0, seed: int = 0,
                   batch_size: int = 512) -> torch.Tensor:
    """uint8 pictures -> VAE encode (posterior mean) -> + N(0, s^2) latent noise, s ~ U(0, latent_noise)
    per picture (generated latents are not exact encodings) -> decode -> uint8, as the pipeline outputs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(pixels), batch_size), desc="vae round trip", mininterval=5):
        z = vae.encode(_to_float(pixels[i:i + batch_size])).latent_dist.mode()
        s = torch.rand(len(z), 1, 1, 1, generator=gen) * latent_noise * z.std()
        x = vae.decode(z + s * torch.randn(z.shape, generator=gen)).sample
        out.append(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (+-2 px) and scale (+-8%), colour jitter that keeps hues apart, blur, pixel noise."""
    n = len(x)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    scale = 1 + 0.16 * (u(n) - 0.5)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = (u(n, 2) - 0.5) * 0.25  # 0.125 of the half-width = 2 px
    x = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), padding_mode="border", align_corners=False)
    brightness = 0.2 * (u(n, 1, 1, 1) - 0.5)
    contrast = 1 + 0.3 * (u(n, 1, 1, 1) - 0.5)
    gain = 1 + 0.08 * (u(n, 3, 1, 1) - 0.5)  # per channel, small: orange/yellow/red must stay distinct
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    x = (x + 1) * gain - 1
    sigma = 0.3 + 0.9 * u(n)
    blur = u(n) < 0.3
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0])[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(-1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3n, 1, 3, 3)
    blurred = F.conv2d(F.pad(x.reshape(1, 3 * n, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"), kernel,
                       groups=3 * n).reshape(x.shape)
    x = torch.where(blur[:, None, None, None], blurred, x)
    x = x + 0.06 * u(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# training and evaluation


def train_oracle(out: str | Path = ORACLE_DIR, vae_path: str | Path | None = None, num_images: int = 36000,
                 steps: int = 4000, batch_size: int = 128, lr: float = 3e-3, width: int = 16, seed: int = 0,
                 num_vae_images: int = 12000, p_vae: float = 0.5, latent_noise: float = 0.3, minutes: float = 30.0,
                 eval_images: int = 3000, log=print) -> dict:
    """Train on freshly rendered pictures, evaluate on a fresh set, write oracle.safetensors + oracle.json.

    The first `num_vae_images` pictures also get a VAE round trip (the costly part on a CPU); a share
    p_vae of every batch is drawn from those round trips. `minutes` caps the whole run."""
    started = time.time()
    vae = load_vae(vae_path) if vae_path is not None else None  # fails early on a bad path
    torch.manual_seed(seed)
    pixels, labels = render_labelled(num_images, seed)
    decoded = vae_round_trip(vae, pixels[:num_vae_images], latent_noise, seed) if vae is not None else None
    n_vae = int(batch_size * p_vae) if vae is not None else 0
    net = OracleNet(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    train_started = time.time()
    budget_s = minutes * 60 - (train_started - started)  # what rendering and round trips left
    bar = tqdm(range(steps), desc="oracle", mininterval=5)
    for step in bar:
        # Warmup then cosine decay over progress = max(step share, time share): a run that the time
        # budget cuts short still anneals its learning rate to ~0.
        progress = max(step / steps, (time.time() - train_started) / max(budget_s, 1.0))
        if progress >= 1.0:
            log(f"oracle: time budget of {minutes} min reached at step {step}")
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, progress / 0.05) * 0.5 * (1 + math.cos(math.pi * progress))
        idx = torch.randint(0, num_images, (batch_size - n_vae,), generator=gen)
        idx_vae = torch.randint(0, len(decoded), (n_vae,), generator=gen) if n_vae else idx[:0]
        x = torch.cat([pixels[idx], decoded[idx_vae]]) if n_vae else pixels[idx]
        y = labels[torch.cat([idx, idx_vae])]
        _, logits = net(augment(_to_float(x), gen))
        loss = sum(F.cross_entropy(logits[k], y[:, j], ignore_index=IGNORE) for j, k in enumerate(LABELS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    train_s = time.time() - started
    oracle = Oracle(net, dict(LABELS), {})
    accuracy = evaluate_oracle(oracle, eval_images, seed=seed + 1, vae=vae)
    info = dict(
        width=width, labels={k: list(v) for k, v in LABELS.items()},
        params=sum(p.numel() for p in net.parameters()),
        training=dict(num_images=num_images, steps_planned=steps, steps_done=step + (progress < 1.0),
                      batch_size=batch_size, lr=lr,
                      seed=seed, vae=str(vae_path) if vae_path else None, num_vae_images=num_vae_images if vae else 0,
                      p_vae=n_vae / batch_size,
                      latent_noise=latent_noise, wall_time_s=round(train_s, 1)),
        accuracy=accuracy,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "oracle.safetensors")
    follow_umask(out / "oracle.safetensors")  # safetensors writes 0600 files
    (out / "oracle.json").write_text(json.dumps(info, indent=1))
    oracle.info = info
    return info


@torch.no_grad()
def _accuracy(net: OracleNet, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    _, logits = net(_to_float(pixels))
    out = {}
    for j, k in enumerate(LABELS):
        keep = labels[:, j] != IGNORE  # colour: photos only
        out[k] = round(float((logits[k].argmax(-1)[keep] == labels[keep, j]).float().mean()), 4)
    subj = LABELS["subject"].index("none")
    pred = logits["subject"].argmax(-1)
    is_subject = labels[:, -1] != subj
    out["subject_false_positive"] = round(float((pred[~is_subject] != subj).float().mean()), 4)
    out["subject_recall"] = round(float((pred[is_subject] == labels[is_subject, -1]).float().mean()), 4)
    names = LABELS["subject"]

    def share(true: str, called: str) -> float:  # of the pictures of `true`, the share called `called`
        return round(float((pred[labels[:, -1] == names.index(true)] == names.index(called)).float().mean()), 4)

    out["subject_recall_per_subject"] = {name: share(name, name) for name in names[1:]}
    # the fine-grained case: how often a subject is called its look-alike (same class and colour)
    out["lookalike_confusion"] = {f"{a} -> {b}": share(a, b) for x, y in render.lookalike_pairs()
                                  for a, b in ((x, y), (y, x))}
    return out


def evaluate_oracle(oracle: Oracle, n: int = 3000, seed: int = 1, vae=None) -> dict:
    """Accuracy per head on n fresh pictures of the training mix (`oracle_specs`, new seed), colour on
    photos only; with a VAE also on their VAE round trips (posterior mean, no latent noise)."""
    pixels, labels = render_labelled(n, seed)
    oracle.net.eval()
    result = {"renderer": _accuracy(oracle.net, pixels, labels), "n": n, "seed": seed}
    if vae is not None:
        result["vae_round_trip"] = _accuracy(oracle.net, vae_round_trip(vae, pixels), labels)
    return result
