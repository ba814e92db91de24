"""The main job: DreamBooth on a toy-world subject, measured by the oracle, plus the paper's ablations.

    python -m dreambooth_lib.toyworld demo      # train (prior on), grids, oracle metrics table, JSON
    python -m dreambooth_lib.toyworld ablate    # prior on/off; correct / no / wrong class noun

Both write under their output folder (runs/..., git-ignored), so running them leaves the checkout
as it was; `--images-dir images` (make figures, make ablations) refreshes the README's copies.

The same library calls run on Stable Diffusion; only the model, the subject photos and the metric
(oracle here, DINO/CLIP there: `python -m dreambooth_lib evaluate`) change.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from dreambooth_lib import families
from dreambooth_lib.config import REPO, TOY_MODEL_DIR, TrainConfig, is_toy_model, repo_relative, resolve_auto
from dreambooth_lib.sample import generate, load_pipeline
from dreambooth_lib.toyworld import oracle as oracle_lib
from dreambooth_lib.toyworld import render
from dreambooth_lib.train import train

SUBJECTS_DIR = REPO / "data" / "subjects"
SEEDS = list(range(8))  # images per prompt; image k of every prompt uses seed k
PRES_SEEDS = list(range(32))  # class-prompt images for PRES: with 8, one image moves PRES by 0.125


# What changes when the toy base model is the flow model (data/toy_flow_model, FLUX.2 [klein] architecture), each
# measured over training seeds 0-2 (docs/toy_world.md):
# - guidance 4 for every picture scored (the toy SD model's 7 oversaturates it);
# - class images drawn without guidance (1.0): the prior should keep the model's conditional distribution, which
#   sampling then guides once. Class images drawn at 4 compound the guidance: fine-tuning on nothing but its own
#   guided class pictures moved "a photo of a star" to night (unguided 0.12 -> 0.34 of the pictures, at 4 0.34 ->
#   0.59) and PRES 0.094 -> 0.141; DreamBooth's PRES (256 pictures) was 0.13-0.17 with them, 0.05-0.08 without;
# - the transformer at 2e-4 (1e-4: recontextualization subject fidelity 0.71) with Qwen3 frozen, as diffusers'
#   klein script: trained at 5e-5 it measured the same (0.896 on each seed vs 0.896-0.917, PRES alike).
FLOW_GUIDANCE = 4.0
FLOW_RECIPE = dict(learning_rate=2e-4, train_text_encoder=False, class_guidance_scale=1.0)


def guidance_for(model: str) -> float:
    """Classifier-free guidance of the pictures the demo renders and scores with `model`."""
    return 7.0 if families.detect(model) == "sd" else FLOW_GUIDANCE


def demo_config(subject: str = "marked_star", output_dir: str = "runs/toy_demo", model: str = TOY_MODEL_DIR,
                **overrides) -> TrainConfig:
    """The toy world's default DreamBooth settings (full fine-tune, prior preservation on).

    Differences from the SD defaults in TrainConfig, and why (swept on marked_star, docs/toy_world.md):
    32 px pictures; fewer class images and sampler steps (a 3-minute CPU budget); a UNet learning
    rate of 1e-4 instead of SD's 5e-6 (a 6M-parameter model trained from scratch); the text encoder
    trained at 3e-5, since the identifier's embedding must move (UNet-only runs reached subject
    fidelity ~0.4; 1e-4 and more drew the training backgrounds whatever the prompt; 4e-5 learnt the
    subject as well but kept less diversity than the run without the prior); 4 instance + 4 class
    pictures per step, nearly free on a CPU at 32 px and steadier than 1 + 1 (800 steps of 1 + 1
    overfit: subject 0.90 but the prompted context only 0.29); torch's AdamW, not 8-bit AdamW: the
    toy model's states are 55 MB, and bitsandbytes' CPU kernel (single-threaded blockwise quantization)
    took 60 % of each step (37 of 62 s of the demo's training, profiled).
    """
    values = dict(
        pretrained_model=model, instance_dir=str(SUBJECTS_DIR / subject),
        class_noun=render.SUBJECTS[subject]["cls"], resolution=render.SIZE, with_prior_preservation=True,
        num_class_images=100, class_batch_size=50, class_inference_steps=25, class_guidance_scale=7.0,
        max_train_steps=400, learning_rate=1e-4, train_text_encoder=True, text_encoder_lr=3e-5,
        train_batch_size=4, optimizer="adamw",
        checkpointing_steps=0, validation_steps=0, output_dir=output_dir, seed=0,
    )
    if families.detect(model) != "sd":
        values.update(FLOW_RECIPE)
    values.update(overrides)
    return TrainConfig(**values)


# LoRA on the toy model needs a larger rank, rate and step count than SD's (rank 4 at lr 1e-4 learnt
# almost nothing here; 800 steps gave subject fidelity 0.17, or 0.42-0.88 over 3 seeds with the text
# encoder at 3e-4; 1,600 steps 0.90-0.96 over 3 seeds): swept in docs/toy_world.md and
# images/toy_recipe_sweep*.json. With prior preservation, like the demo. Rank and rates are TrainConfig's
# "auto" ones for the toy model (config.AUTO_RECIPES); the batch and steps are these.
TOY_LORA = dict(use_lora=True, train_batch_size=1, max_train_steps=1600)
RECIPE_FIELDS = ("use_lora", "lora_rank", "learning_rate", "text_encoder_lr", "train_batch_size", "max_train_steps")


def recipe(method: str, model: str) -> dict:
    """Rank, rates, batch and steps for `method` ("lora" or "full") on `model`: the swept toy-world
    settings on the embedded toy model (TOY_LORA / demo_config), the usual Stable Diffusion ones on
    any other model (full fine-tune for 800 steps; LoRA for 400 steps, as diffusers' DreamBooth-LoRA
    example). Rank and rates are TrainConfig's "auto" ones (config.resolve_auto), as train() picks them."""
    if method not in ("lora", "full"):
        raise ValueError(f"method {method!r}: use 'lora' or 'full'")
    if is_toy_model(model):
        settings = TrainConfig(**TOY_LORA) if method == "lora" else demo_config()
    else:
        settings = TrainConfig(use_lora=True, max_train_steps=400) if method == "lora" else TrainConfig()
    settings = resolve_auto(dataclasses.replace(settings, pretrained_model=model))[0]
    return {k: getattr(settings, k) for k in RECIPE_FIELDS}


def sample_suites(pipe, subject: str, subject_phrase: str, seeds=SEEDS, guidance_scale: float = 7.0,
                  steps: int = 25, batch_size: int = 64) -> dict[str, list[dict]]:
    """Render every prompt of the subject's suites: {category: [{prompt, expected, images}]}.

    subject_phrase names the subject as it was trained: "gtc star", or "gtc" / "gtc ball" in the
    class-noun ablations (the suites' templates say "{identifier} <true class noun>"). All prompts go
    through the sampler together, batch_size images a call (each image keeps its own seed): at 32 px
    a sampler call costs little more for 64 images than for 8.
    """
    cls = render.SUBJECTS[subject]["cls"]
    rows = [(category, template.replace("{identifier} " + cls, subject_phrase), expected)
            for category, items in oracle_lib.prompt_suite(subject).items() for template, expected in items]
    seeds = list(seeds)
    images = generate(pipe, [prompt for _, prompt, _ in rows for _ in seeds], seeds * len(rows), guidance_scale, steps,
                      batch_size=batch_size, progress=False, resolution=render.SIZE)
    out: dict[str, list[dict]] = {}
    for k, (category, prompt, expected) in enumerate(rows):
        out.setdefault(category, []).append(dict(prompt=prompt, expected=expected,
                                                 images=images[k * len(seeds):(k + 1) * len(seeds)]))
    return out


def class_prompt_images(pipe, subject: str, seeds=PRES_SEEDS, guidance_scale: float = 7.0, steps: int = 25):
    """The plain class prompt ("a photo of a star") with fixed seeds: what PRES scores."""
    prompt = oracle_lib.class_prompt(subject)
    return prompt, generate(pipe, prompt, list(seeds), guidance_scale, steps, batch_size=len(seeds), progress=False,
                            resolution=render.SIZE)


def score(oracle, suites: dict, class_images: list[Image.Image], subject: str,
          base_class_images: list[Image.Image] | None = None) -> dict:
    """Oracle metrics named after the paper's, per category and overall; with the base model's
    class-prompt pictures (same seeds), also how far the class prompt's backgrounds moved."""
    table = {}
    for category, rows in suites.items():
        images = [im for r in rows for im in r["images"]]
        table[category] = dict(
            subject_fidelity=oracle_lib.subject_fidelity(oracle, images, subject),
            prompt_fidelity=sum(oracle_lib.prompt_fidelity(oracle, r["images"], r["expected"]) for r in rows) / len(rows),
            div=sum(oracle_lib.div(oracle, r["images"]) for r in rows) / len(rows),
        )
    n = len(table)
    table["overall"] = {k: sum(t[k] for t in table.values()) / n for k in ("subject_fidelity", "prompt_fidelity", "div")}
    table["overall"]["pres"] = oracle_lib.pres(oracle, class_images, subject)
    table["overall"]["class_div"] = oracle_lib.div(oracle, class_images)
    if base_class_images is not None:
        shift = oracle_lib.attribute_shift(oracle, base_class_images, class_images, "context")
        table["overall"]["class_context_shift"] = shift["total_variation"]
        table["overall"]["class_contexts"] = dict(base_model=shift["before"], fine_tuned=shift["after"])
    return table


def save_figure(rows: list[tuple[str, list[Image.Image]]], path: Path, title: str = "") -> Path:
    """One labelled row per prompt (pictures are 32 px: drawn large, nearest-neighbour)."""
    cols = max(len(ims) for _, ims in rows)
    fig = Figure(figsize=(1.1 * cols + 2.6, 1.15 * len(rows) + 0.4))  # no pyplot: leaves a notebook's backend alone
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
        axes[r][0].text(-0.1, 0.5, label, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=2.4 / (1.1 * cols + 2.6), right=0.99, wspace=0.05, hspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _histogram(shares: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))


def format_table(rows: dict[str, dict], columns: list[str]) -> str:
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_tuned(cfg: TrainConfig):
    """The fine-tuned pipeline: a full pipeline folder, or the base model + LoRA weights."""
    if cfg.use_lora:
        return load_pipeline(cfg.pretrained_model, lora_dir=cfg.output_dir)
    return load_pipeline(cfg.output_dir)


def run_demo(subject: str = "marked_star", output_dir: str = "runs/toy_demo", images_dir: Path | None = None,
             log=print, model: str = TOY_MODEL_DIR, **overrides) -> dict:
    """Train, render the suites and the class prompt before/after, score with the oracle, save PNGs + JSON
    (figures in images_dir, default <output_dir>/figures)."""
    started = time.time()
    images_dir = Path(images_dir) if images_dir else Path(output_dir) / "figures"
    cfg = demo_config(subject, output_dir, model, **overrides)
    guidance = guidance_for(model)
    summary = train(cfg, log=log)
    identifier, class_noun = summary["identifier"], cfg.class_noun
    oracle = oracle_lib.load_oracle()
    base, tuned = load_pipeline(cfg.pretrained_model), load_tuned(cfg)

    suites = sample_suites(tuned, subject, f"{identifier} {class_noun}", guidance_scale=guidance)
    class_prompt, before = class_prompt_images(base, subject, guidance_scale=guidance)
    _, after = class_prompt_images(tuned, subject, guidance_scale=guidance)
    table = score(oracle, suites, after, subject, base_class_images=before)
    table["overall"]["pres_base_model"] = oracle_lib.pres(oracle, before, subject)
    base_suites = sample_suites(base, subject, f"{identifier} {class_noun}", seeds=SEEDS[:4], guidance_scale=guidance)
    base_subject = oracle_lib.subject_fidelity(oracle, [im for rows in base_suites.values() for r in rows for im in r["images"]], subject)
    table["overall"]["subject_fidelity_base_model"] = base_subject

    tag = f"toy_demo_{subject}" if is_toy_model(model) else f"toy_demo_{Path(model).name}_{subject}"
    real = [Image.open(p).convert("RGB") for p in sorted(Path(cfg.instance_dir).glob("*.png"))]
    figures = [save_figure([("training photos", real)], images_dir / f"{tag}_training.png", f"{subject}: the {len(real)} training pictures")]
    for category, rows in suites.items():
        figures.append(save_figure([(r["prompt"], r["images"]) for r in rows], images_dir / f"{tag}_{category}.png",
                                   f"DreamBooth ({'LoRA' if cfg.use_lora else 'full'}, prior on, "
                                   f"{families.of(cfg).LABEL}): {category}"))
    figures.append(save_figure([(f"base: {class_prompt}", before[:8]), (f"fine-tuned: {class_prompt}", after[:8])],
                               images_dir / f"{tag}_class_before_after.png", "the plain class prompt before vs after"))

    columns = ["subject_fidelity", "prompt_fidelity", "div"]
    result = dict(
        subject=subject, identifier=identifier, class_noun=class_noun, instance_prompt=summary["instance_prompt"],
        class_prompt=class_prompt, metrics=table, seeds=SEEDS, pres_seeds=PRES_SEEDS, guidance_scale=guidance, sampler_steps=25,
        train=dict(steps=summary["steps"], final_loss=summary["final_loss"], wall_time_s=summary["wall_time_s"],
                   seconds_per_step=summary["seconds_per_step"], optimizer=summary["optimizer"],
                   peak_memory_mb=summary["peak_memory_mb"], device=summary["device"]),
        config=cfg.to_dict(), figures=[repo_relative(f) for f in figures], wall_time_s=time.time() - started,
        note="oracle metrics (toy world); DINO / CLIP-I / CLIP-T need real encoders: python -m dreambooth_lib evaluate",
    )
    out = Path(output_dir) / "demo_metrics.json"
    out.write_text(json.dumps(result, indent=2))
    (images_dir / f"{tag}_metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    log(format_table({k: v for k, v in table.items() if k != "overall"}, columns))
    o = table["overall"]
    log(f"overall: subject fidelity {o['subject_fidelity']:.3f}, prompt fidelity {o['prompt_fidelity']:.3f}, "
        f"PRES {o['pres']:.3f} (base model {o['pres_base_model']:.3f}), DIV {o['div']:.3f}; "
        f"base model produced the subject {base_subject:.3f} of the time")
    log(f"class prompt backgrounds moved by {o['class_context_shift']:.2f} (total variation; base "
        f"{_histogram(o['class_contexts']['base_model'])} -> fine-tuned {_histogram(o['class_contexts']['fine_tuned'])})")
    log(f"demo done in {result['wall_time_s']:.0f}s: metrics in {out}, figures in {images_dir}/{tag}_*.png")
    return result


ABLATIONS = {
    # name: (overrides of demo_config, what it tests)
    "prior": ({}, "full fine-tune with prior preservation (the paper's method)"),
    "no_prior": ({"with_prior_preservation": False}, "the same without the prior loss"),
    "no_class_noun": ({"with_prior_preservation": False, "instance_prompt_template": "a photo of {identifier}"},
                      "instance prompt without a class noun (paper Table 4)"),
    "wrong_class_noun": ({"with_prior_preservation": False, "class_noun": "ball"}, "a wrong class noun (paper Table 4)"),
    "lora": (recipe("lora", TOY_MODEL_DIR),
             "LoRA (rank 32, UNet attention + text encoder q/k/v/out, 1,600 steps of 1 + 1) with prior"),
}


def run_ablations(subject: str = "marked_star", output_root: str = "runs/toy_ablations", images_dir: Path | None = None,
                  names=tuple(ABLATIONS), log=print, **overrides) -> dict:
    """Each ablation trains from the same base with the same seed, then is scored on the same prompts
    (table and figure in images_dir, default <output_root>/figures)."""
    images_dir = Path(images_dir) if images_dir else Path(output_root) / "figures"
    oracle = oracle_lib.load_oracle()
    base_model = demo_config(subject, output_root, **overrides).pretrained_model
    guidance = guidance_for(base_model)
    _, base_class_images = class_prompt_images(load_pipeline(base_model), subject, guidance_scale=guidance)
    results = {}
    for name in names:
        changes, what = ABLATIONS[name]
        cfg = demo_config(subject, f"{output_root}/{name}", **{**overrides, **changes})
        summary = train(cfg, log=log, progress=False)
        tuned = load_tuned(cfg)
        # Prompts always name the subject the way it was trained, and the class prompt is the TRUE class.
        noun = cfg.class_noun if "{class_noun}" in cfg.instance_prompt_template else ""
        suites = sample_suites(tuned, subject, f"{summary['identifier']} {noun}".strip(), guidance_scale=guidance)
        _, class_images = class_prompt_images(tuned, subject, guidance_scale=guidance)
        metrics = score(oracle, suites, class_images, subject, base_class_images)
        results[name] = dict(what=what, instance_prompt=summary["instance_prompt"], metrics=metrics["overall"],
                             per_category={k: v for k, v in metrics.items() if k != "overall"})
        log(f"{name}: {json.dumps(metrics['overall'])}")
    write_ablation_report(results, images_dir, log)
    return results


ABLATION_COLUMNS = ["recontext_subject_fidelity", "recontext_context_followed", "subject_fidelity",
                    "prompt_fidelity", "pres", "div", "class_div", "class_context_shift"]


def write_ablation_report(results: dict, images_dir: Path, log=print) -> None:
    """toy_ablations.{json,md,png} from run_ablations' results (or the JSON it wrote, reloaded)."""
    rows = {}
    for name, r in results.items():
        recontext = r["per_category"]["recontextualization"]
        rows[name] = dict(r["metrics"], recontext_subject_fidelity=recontext["subject_fidelity"],
                          recontext_context_followed=recontext["prompt_fidelity"])
    table = format_table(rows, ABLATION_COLUMNS)
    images_dir.mkdir(parents=True, exist_ok=True)
    (images_dir / "toy_ablations.json").write_text(json.dumps(results, indent=2))
    (images_dir / "toy_ablations.md").write_text(table + "\n")
    plot_ablations(rows, images_dir / "toy_ablations.png")
    log(table)
    log(f"ablations written to {images_dir}/toy_ablations.{{json,md,png}}")


def plot_ablations(rows: dict[str, dict], path: Path) -> None:
    metrics = ["recontext_subject_fidelity", "recontext_context_followed", "subject_fidelity", "prompt_fidelity",
               "pres", "div", "class_context_shift"]
    x = np.arange(len(metrics))
    width = 0.8 / len(rows)
    fig = Figure(figsize=(11, 3.8))
    ax = fig.subplots()
    for i, (name, row) in enumerate(rows.items()):
        ax.bar(x + i * width, [row[m] for m in metrics], width, label=name)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, [m.replace("_", " ").replace("recontext ", "recontext.\n")
                                                    for m in metrics], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("toy world ablations (oracle metrics; PRES and class context shift: lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

