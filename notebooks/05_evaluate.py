# ---
# jupyter:
#   accelerator: GPU
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,jupytext,accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/05_evaluate.ipynb)
#
# # 05 · Evaluation
#
# The paper's protocol (Sec. 4.1): render every evaluation prompt several times, then score **subject
# fidelity** (DINO, CLIP-I: similarity of generated to real subject images), **prompt fidelity** (CLIP-T),
# **diversity** (DIV) and, on plain class-prompt images, **prior preservation** (PRES).
# `dreambooth_lib.evaluate.evaluate_run` does all of it and writes `results.json`, `results.csv` and one grid per
# prompt category. It evaluates notebook 02's run (`runs/<subject>-lora-prior`) and trains a small one if it is missing.

# %%
#@title Setup (in Colab: clone the repo and install requirements.txt, which leaves Colab's torch alone)
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/OWNER/REPO"  # placeholder: the repository these notebooks live in
if "google.colab" in sys.modules:
    checkout = Path("/content") / REPO_URL.rsplit("/", 1)[-1]
    if not checkout.is_dir():
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, str(checkout)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(checkout / "requirements.txt")], check=True)
    os.chdir(checkout / "notebooks")
ROOT = Path.cwd().resolve().parent  # the notebooks run from notebooks/
sys.path.insert(0, str(ROOT))

# %% tags=["parameters"]
#@title Evaluation parameters
SMOKE = os.environ.get("DREAMBOOTH_SMOKE", "0") == "1"  # CI smoke run: 1 prompt per category, 2 images, 2 steps
LIVE_SUBJECT = False  #@param {type:"boolean"}
# real models: a pet or person gets the paper's accessorization prompts too
N_PER_PROMPT = 4  #@param {type:"integer"}
PROMPT_LIMIT = 0  #@param {type:"integer"}
# real models: 0 = every prompt of the protocol; N = the first N of each category
GUIDANCE = 0.0  #@param {type:"number"}
# 0 = the model family's default: 7.5 (toy model, SD, SDXL), 3.5 (FLUX.1 [dev]'s distilled guidance), 4 (FLUX.2 [klein])
INFERENCE_STEPS = 25  #@param {type:"integer"}
REAL_ENCODERS = False  #@param {type:"boolean"}
# load DINO ViT-S/16 and CLIP ViT-B/32 (downloads ~0.5 GB): for real models, pointless on the toy world
FALLBACK_STEPS = 300  #@param {type:"integer"}
# only used when notebook 02's run is missing: the LoRA steps trained here

# %%
import dataclasses
import json

import matplotlib.pyplot as plt
from PIL import Image

from dreambooth_lib import families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.data import load_instance_images
from dreambooth_lib.evaluate import evaluate_run, format_table, load_encoders_for_cli
from dreambooth_lib.metrics import Encoders, default_device
from dreambooth_lib.sample import load_pipeline
from dreambooth_lib.toyworld import demo, render
from dreambooth_lib.toyworld import oracle as oracle_lib
from dreambooth_lib.train import finished_or_train, run_dir

if SMOKE:
    N_PER_PROMPT, PROMPT_LIMIT, INFERENCE_STEPS, FALLBACK_STEPS = 2, 1, 2, 2
RUNS = ROOT / ("runs/smoke" if SMOKE else "runs")  # shared with notebooks 01-05
IMAGES = RUNS / "images"  # figures; the README's copies in images/ change only by `make figures`
DATA_PREP = RUNS / "data_prep.json"  # written by notebook 01
# Run alone, without notebook 01: the toy world's settings for its subject marked_star.
base = TrainConfig.from_dict(json.loads(DATA_PREP.read_text())) if DATA_PREP.is_file() else demo.demo_config()
if SMOKE:
    base = dataclasses.replace(base, num_class_images=2, class_inference_steps=2)
RUN_DIR = run_dir(RUNS, base)  # notebook 02's default run (LoRA with prior preservation)
# notebook 02's run, or (run alone) a small LoRA run (denoiser + text encoder) trained here first
fallback = dataclasses.replace(base, **demo.recipe("lora", base.pretrained_model))  # the LoRA settings for this model
summary = finished_or_train(dataclasses.replace(fallback, max_train_steps=FALLBACK_STEPS,
                                                train_text_encoder=families.trains_text_encoder(base.pretrained_model),
                                                validation_steps=0, output_dir=str(RUN_DIR)))
run_cfg = summary["config"]
print(f"run: {RUN_DIR} ({summary['steps']} steps), identifier {summary['identifier']!r}")

# %% [markdown]
# ## Run the protocol
# **Toy world** (a subject of `data/subjects/`): the toy world's **oracle**, a classifier trained on the renderer's
# ground truth, scores the images, on prompts written in the words the toy model was pretrained on:
# subject fidelity (share of images showing the subject), prompt fidelity (share showing everything the prompt
# asked for), DIV and PRES. **DINO, CLIP-I and CLIP-T are not computed here: they need real pretrained
# encoders** (DINO ViT-S/16, CLIP ViT-B/32), which measure nothing useful on 32 px toy pictures.
#
# **Real models**: `dreambooth_lib.evaluate.evaluate_run` with the paper's prompts and DINO / CLIP encoders
# (`REAL_ENCODERS`); the table also lists the paper's Table 1 rows for comparison.

# %%
# LoRA: base model + the run's adapter; full fine-tune: the run folder is a complete pipeline.
pipe = load_pipeline(run_cfg["pretrained_model"], lora_dir=RUN_DIR) if run_cfg["use_lora"] else load_pipeline(RUN_DIR)
GUIDANCE = GUIDANCE or families.of_pipeline(pipe).DEFAULT_GUIDANCE
subject, identifier, class_noun = Path(run_cfg["instance_dir"]).name, summary["identifier"], run_cfg["class_noun"]
seeds = list(range(N_PER_PROMPT))
if subject in render.SUBJECTS:
    suites = demo.sample_suites(pipe, subject, f"{identifier} {class_noun}", seeds, GUIDANCE, INFERENCE_STEPS)
    class_prompt, class_images = demo.class_prompt_images(pipe, subject, seeds, GUIDANCE, INFERENCE_STEPS)
    table = demo.score(oracle_lib.load_oracle(), suites, class_images, subject)
    print(demo.format_table(table, ["subject_fidelity", "prompt_fidelity", "div", "pres"]))
    print("DINO, CLIP-I and CLIP-T: not computed; they need real pretrained encoders (toy world: oracle metrics above)")
    examples = {category: [(r["prompt"], r["images"]) for r in rows] for category, rows in suites.items()}
else:
    encoders = load_encoders_for_cli(None, None, default_device())[0] if REAL_ENCODERS else Encoders()
    subject_images = [im.image for im in load_instance_images(run_cfg["instance_dir"], resolution=0)]
    result = evaluate_run(pipe, subject_images, class_noun, identifier, LIVE_SUBJECT, encoders, n_per_prompt=N_PER_PROMPT,
                          seeds=seeds, guidance_scale=GUIDANCE, num_inference_steps=INFERENCE_STEPS,
                          prompt_limit=PROMPT_LIMIT or None, out_dir=RUN_DIR / "evaluation",
                          resolution=run_cfg["resolution"])  # the run's training size (FLUX pipelines: 1024 px)
    print(format_table(result))
    table = {row: {c: values.get(c) for c in result["columns"]} for row, values in result["rows"].items()}
    examples = {category: [("", [Image.open(path)])] for category, path in result["files"]["grids"].items()}

# %% [markdown]
# ## Metrics by prompt category

# %%
metrics = [m for m in dict.fromkeys(k for row in table.values() for k in row) if any(
    isinstance(row.get(m), float) for row in table.values())]
if metrics:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(metrics) * len(table)), 3.5))
    width = 0.8 / len(table)
    for k, (name, row) in enumerate(table.items()):
        ax.bar([i + k * width for i in range(len(metrics))],
               [row[m] if isinstance(row.get(m), float) else 0.0 for m in metrics], width, label=name)
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(metrics))], metrics)
    ax.legend(fontsize=8)
    ax.set_title(f"{RUN_DIR.name}: {N_PER_PROMPT} images per prompt", fontsize=9)
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "evaluation_metrics.png", bbox_inches="tight")
    plt.show()
else:
    print("no metric computed: set REAL_ENCODERS for DINO / CLIP")

# %% [markdown]
# ## Example grids per prompt category
# Toy world: one row per prompt, one column per seed. Real models: the grid `evaluate_run` saved per category
# (all images are under `evaluation/images/`).

# %%
for category, rows in examples.items():
    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols + 3, 1.2 * len(rows) + 0.5), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
        axes[r, 0].text(-0.1, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(category, fontsize=9)
    plt.show()
