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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/04_language_drift.ipynb)
#
# # 04 · Language drift
#
# Fine-tuning on "a photo of [V] star" also moves what the model draws for plain "a photo of a star":
# every star slowly becomes *the* subject. The paper (Sec. 3.3) calls this **language drift** and counters it
# with the prior-preservation loss, which keeps replaying the frozen model's own class images.
# Here the same class prompt and seeds go to three models: the base model, the LoRA run **with** prior
# preservation (notebook 02's `runs/<subject>-lora-prior`) and the same run **without** it
# (`runs/<subject>-lora-noprior`); missing runs are trained here with the library.

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
#@title Drift parameters
SMOKE = os.environ.get("DREAMBOOTH_SMOKE", "0") == "1"  # CI smoke run: 2 seeds, 2 sampler steps
CLASS_PROMPT = ""  #@param {type:"string"}
# "" = the class prompt the run was trained with, e.g. "a photo of a star"
SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]  #@param {type:"raw"}
GUIDANCE = 0.0  #@param {type:"number"}
# 0 = the model family's default: 7.5 (toy model, SD, SDXL), 3.5 (FLUX.1 [dev]'s distilled guidance), 4 (FLUX.2 [klein])
INFERENCE_STEPS = 25  #@param {type:"integer"}
FALLBACK_STEPS = 300  #@param {type:"integer"}
# only used when notebook 02's run is missing: the LoRA steps trained here

# %%
import dataclasses
import json

import matplotlib.pyplot as plt

from dreambooth_lib import families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.sample import generate, load_pipeline, set_lora_scales
from dreambooth_lib.toyworld import oracle as oracle_lib
from dreambooth_lib.toyworld import render
from dreambooth_lib.toyworld.demo import demo_config, recipe
from dreambooth_lib.train import finished_or_train, run_dir

if SMOKE:
    SEEDS, INFERENCE_STEPS, FALLBACK_STEPS = [0, 1], 2, 2
RUNS = ROOT / ("runs/smoke" if SMOKE else "runs")  # shared with notebooks 01-05
IMAGES = RUNS / "images"  # figures; the README's copies in images/ change only by `make figures`
DATA_PREP = RUNS / "data_prep.json"  # written by notebook 01
# Run alone, without notebook 01: the toy world's settings for its subject marked_star.
base = TrainConfig.from_dict(json.loads(DATA_PREP.read_text())) if DATA_PREP.is_file() else demo_config()
if SMOKE:
    base = dataclasses.replace(base, num_class_images=2, class_inference_steps=2)
PRIOR_RUN, NO_PRIOR_RUN = run_dir(RUNS, base), run_dir(RUNS, base, prior=False)
# notebook 02's run, or (run alone) a small LoRA run with prior preservation trained here first
fallback = dataclasses.replace(base, **recipe("lora", base.pretrained_model))  # the LoRA settings for this model
prior = finished_or_train(dataclasses.replace(fallback, max_train_steps=FALLBACK_STEPS,
                                              train_text_encoder=families.trains_text_encoder(base.pretrained_model),
                                              validation_steps=0, output_dir=str(PRIOR_RUN)))
# the same run with lambda's term switched off
no_prior = finished_or_train(dataclasses.replace(TrainConfig.from_dict(prior["config"]), with_prior_preservation=False,
                                                 identifier=prior["identifier"], resume=None,
                                                 output_dir=str(NO_PRIOR_RUN)))
class_prompt = CLASS_PROMPT or prior["class_prompt"]
print(f"class prompt {class_prompt!r}, seeds {SEEDS}\nwith prior: {PRIOR_RUN}\nwithout prior: {NO_PRIOR_RUN}")

# %% [markdown]
# ## Same prompt, same seeds, three models
# The base model is the prior run's pipeline with both LoRA scales at 0 (exactly the base weights).

# %%
model = prior["config"]["pretrained_model"]
pipe = load_pipeline(model, lora_dir=PRIOR_RUN)
GUIDANCE = GUIDANCE or families.of_pipeline(pipe).DEFAULT_GUIDANCE
set_lora_scales(pipe, 0.0, 0.0)
SIZE = prior["config"]["resolution"]  # sampled at the runs' training size (FLUX pipelines default to 1024 px)
rows = {"base model": generate(pipe, class_prompt, SEEDS, GUIDANCE, INFERENCE_STEPS, resolution=SIZE)}
set_lora_scales(pipe, 1.0, 1.0)
rows["with prior"] = generate(pipe, class_prompt, SEEDS, GUIDANCE, INFERENCE_STEPS, resolution=SIZE)
rows["without prior"] = generate(load_pipeline(model, lora_dir=NO_PRIOR_RUN), class_prompt, SEEDS,
                                              GUIDANCE, INFERENCE_STEPS, resolution=SIZE)
fig, axes = plt.subplots(len(rows), len(SEEDS), figsize=(1.4 * len(SEEDS), 1.6 * len(rows)), squeeze=False)
for r, (name, images) in enumerate(rows.items()):
    for c, image in enumerate(images):
        axes[r, c].imshow(image, interpolation="nearest")
        axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
    axes[r, 0].set_ylabel(name, fontsize=8)
fig.suptitle(f"{class_prompt!r}, seeds {SEEDS}", fontsize=9)
IMAGES.mkdir(parents=True, exist_ok=True)
fig.savefig(IMAGES / "drift_comparison.png", bbox_inches="tight")
plt.show()

# %% [markdown]
# ## The drift number
# **Toy world.** The oracle knows what each picture shows, so drift is measured directly. We take its
# PRES on the plain class-prompt images above: how strongly images of "a star" show *this* subject (its
# marking, colour, pattern). Higher means more drift. The base model gives the floor, since it has never
# seen the subject.
#
# **Real models.** There is no oracle, so the paper's PRES is used:
# `dreambooth_lib.metrics.pres_score(class_images, real_subject_photos, load_dino())`, the mean cosine similarity
# of DINO ViT-S/16 CLS embeddings over every (class-prompt image, real subject photo) pair. With a large
# sample per model (the paper uses many prompts and seeds), the difference between "with" and "without"
# prior preservation is the effect of the loss's second term.

# %%
subject = Path(prior["config"]["instance_dir"]).name
if subject in render.SUBJECTS:  # a toy-world subject: the oracle knows it
    oracle = oracle_lib.load_oracle()
    drift = {name: oracle_lib.pres(oracle, images, subject) for name, images in rows.items()}
    print(f"PRES (oracle): share of the {class_prompt!r} images that show {subject}; higher = more drift")
    for name, value in drift.items():
        print(f"  {name:27s} {value:.3f}")
else:
    print(f"{subject} is not a toy-world subject, so there is no oracle: compute PRES with "
          "dreambooth_lib.metrics.pres_score and a DINO encoder (dreambooth_lib.metrics.load_dino)")
