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
# pets and people: adds the paper's accessorization prompts
N_PER_PROMPT = 4  #@param {type:"integer"}
PROMPT_LIMIT = 0  #@param {type:"integer"}
# 0 = every prompt of the protocol; N = the first N of each category
GUIDANCE = 7.5  #@param {type:"number"}
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

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.data import load_instance_images
from dreambooth_lib.evaluate import evaluate_run, format_table, load_encoders_for_cli
from dreambooth_lib.metrics import Encoders, default_device
from dreambooth_lib.sample import load_pipeline
from dreambooth_lib.train import train

if SMOKE:
    N_PER_PROMPT, PROMPT_LIMIT, INFERENCE_STEPS, FALLBACK_STEPS = 2, 1, 2, 2
RUNS = ROOT / ("runs/smoke" if SMOKE else "runs")  # shared with notebooks 01-05
IMAGES = RUNS / "images" if SMOKE else ROOT / "images"  # smoke figures never overwrite the committed ones
DATA_PREP = RUNS / "data_prep.json"  # written by notebook 01
base = (TrainConfig.from_dict(json.loads(DATA_PREP.read_text())) if DATA_PREP.is_file()
        else TrainConfig(instance_dir=str(ROOT / "data/subjects/marked_star"), class_noun="star", resolution=32,
                         num_class_images=100, class_inference_steps=25))  # as notebooks 01/02 default
if SMOKE:
    base = dataclasses.replace(base, num_class_images=2, class_inference_steps=2)
RUN_DIR = RUNS / f"{Path(base.instance_dir).name}-lora-prior"  # notebook 02's default run
if not (RUN_DIR / "summary.json").is_file():  # run alone: train a small LoRA run first
    train(dataclasses.replace(base, use_lora=True, train_text_encoder=True, learning_rate=1e-4,
                              max_train_steps=FALLBACK_STEPS, validation_steps=0, output_dir=str(RUN_DIR)))
summary = json.loads((RUN_DIR / "summary.json").read_text())
run_cfg = summary["config"]
print(f"run: {RUN_DIR} ({summary['steps']} steps), identifier {summary['identifier']!r}")

# %% [markdown]
# ## Encoders
# DINO and CLIP scores need real pretrained image encoders. The toy world's 32 px pictures are far outside
# what those encoders were trained on, so here they stay unloaded and the toy world's **oracle** scores
# the images instead: a classifier trained on the renderer's ground truth, which knows what every picture shows.

# %%
encoders = Encoders()
if REAL_ENCODERS:
    encoders, notes = load_encoders_for_cli(None, None, default_device())
    print("\n".join(notes))

# %% [markdown]
# ## Run the protocol

# %%
# LoRA: base model + the run's adapter; full fine-tune: the run folder is a complete pipeline.
pipe = load_pipeline(run_cfg["pretrained_model"], lora_dir=RUN_DIR) if run_cfg["use_lora"] else load_pipeline(RUN_DIR)
subject_images = [im.image for im in load_instance_images(run_cfg["instance_dir"], resolution=0)]
result = evaluate_run(
    pipe, subject_images, run_cfg["class_noun"], summary["identifier"], LIVE_SUBJECT, encoders,
    n_per_prompt=N_PER_PROMPT, guidance_scale=GUIDANCE, num_inference_steps=INFERENCE_STEPS,
    prompt_limit=PROMPT_LIMIT or None, out_dir=RUN_DIR / "evaluation",
)
print(format_table(result))

# %% [markdown]
# ## Metrics by prompt category

# %%
columns = [c for c in result["columns"] if any(isinstance(row.get(c), float) for row in result["rows"].values())]
categories = list(result["rows"])
if columns:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(columns) * len(categories)), 3.5))
    width = 0.8 / len(categories)
    for k, category in enumerate(categories):
        values = [result["rows"][category].get(c) for c in columns]
        ax.bar([i + k * width for i in range(len(columns))], [v if isinstance(v, float) else 0.0 for v in values],
               width, label=category)
    ax.set_xticks([i + width * (len(categories) - 1) / 2 for i in range(len(columns))], columns)
    ax.legend(fontsize=8)
    ax.set_title(f"{RUN_DIR.name}: {N_PER_PROMPT} images per prompt", fontsize=9)
    IMAGES.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGES / "evaluation_metrics.png", bbox_inches="tight")
    plt.show()
else:
    print("no metric computed: set REAL_ENCODERS for DINO/CLIP, or use the toy world (oracle)")

# %% [markdown]
# ## Example grids per prompt category
# Rows: prompts (the first few of the category); columns: seeds. All images are under `evaluation/images/`.

# %%
for category, path in result["files"]["grids"].items():
    plt.figure(figsize=(6, 6))
    plt.imshow(Image.open(path), interpolation="nearest")
    plt.title(category, fontsize=9)
    plt.axis("off")
    plt.show()
