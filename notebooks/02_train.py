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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/02_train.ipynb)
#
# # 02 · Training
#
# Fine-tunes the model on the subject with the objective of the paper (Sec. 3.3):
#
# $$\mathbb{E}\big[\|\hat\epsilon_\theta(x_t, t, c_{[V]\,\mathrm{class}}) - \epsilon\|^2\big] + \lambda\,\mathbb{E}\big[\|\hat\epsilon_\theta(x'_t, t', c_{\mathrm{class}}) - \epsilon'\|^2\big]$$
#
# where the second term (prior preservation, weight $\lambda$) replays the frozen model's own class images.
# Everything below is one call, `dreambooth_lib.train.train(cfg)`; this notebook sets `cfg`, reports the
# hardware, and shows the loss curve and the validation grids the run wrote. It starts from the data
# choices of notebook 01 (`runs/data_prep.json`) when they exist, otherwise from the toy subject.

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
#@title Training parameters
SMOKE = os.environ.get("DREAMBOOTH_SMOKE", "0") == "1"  # CI smoke run: 2 steps, tiny grids
MODEL = ""  #@param {type:"string"}
# "" = the model chosen in notebook 01, else the embedded toy model (data/toy_model);
# real alternatives: "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0",
# "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-klein-4B"
# (resolution follows the model; another model than notebook 01's gets its own class images)
SUBJECTS = ""  #@param {type:"string"}
# "" = one subject (notebook 01's, else the toy subject marked_star). Several subjects in one run: "toy" (the toy
# world's marked_star and cross_cube) or a JSON file listing them, e.g. [{"instance_dir": "photos/rex",
# "class_noun": "dog"}, {"instance_dir": "photos/tom", "class_noun": "cat", "identifier": "zwx"}]; an identifier
# left out is picked (distinct from the others), class images are made once per class noun, batches alternate subjects
METHOD = "lora"  #@param ["lora", "full"]
LORA_RANK = 0  #@param {type:"slider", min:0, max:64, step:1}
# 0 = auto, as TrainConfig's lora_rank="auto" (config.AUTO_RECIPES): 32 on the toy model (swept, see docs/toy_world.md), 4 on Stable Diffusion
TRAIN_TEXT_ENCODER = True  #@param {type:"boolean"}
# needed for the text-encoder LoRA scale of notebook 03; off where the family trains none (FLUX.2 [klein])
MAX_TRAIN_STEPS = 0  #@param {type:"integer"}
# 0 = auto: toy model LoRA 1600 / full 400; Stable Diffusion LoRA 400 / full 800
LEARNING_RATE = 0.0  #@param {type:"number"}
# 0 = auto, as TrainConfig's learning_rate="auto" (config.AUTO_RECIPES): toy model LoRA 1e-3 / full 1e-4;
# Stable Diffusion LoRA 1e-4 / full 5e-6 (paper / diffusers recipe). The text encoder's rate follows the same rule
PRIOR_PRESERVATION = True  #@param {type:"boolean"}
PRIOR_LOSS_WEIGHT = 1.0  #@param {type:"number"}
# lambda in the objective above
USE_8BIT_ADAM = "auto"  #@param ["auto", "yes", "no"]
# auto = on a GPU, torch AdamW when its fp32 states fit the free memory, else bitsandbytes AdamW8bit; torch AdamW on a CPU
MIXED_PRECISION = "auto"  #@param ["auto", "no", "fp16", "bf16"]
# auto = the family's half precision on a GPU (Stable Diffusion fp16, FLUX bf16), none on a CPU
GRADIENT_CHECKPOINTING = "auto"  #@param ["auto", "on", "off"]
# auto = only when the step would not fit the GPU's free memory without it (~1.9x slower steps); never on a CPU
VALIDATION_STEPS = 100  #@param {type:"integer"}
CHECKPOINTING_STEPS = 200  #@param {type:"integer"}
SEED = 0  #@param {type:"integer"}
SAVE_TO_DRIVE = False  #@param {type:"boolean"}
DRIVE_FOLDER = "/content/drive/MyDrive/dreambooth_runs"  #@param {type:"string"}

# %%
import dataclasses
import json
import shutil

import matplotlib.pyplot as plt
import torch
from PIL import Image

from dreambooth_lib import families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.toyworld.demo import demo_config, recipe
from dreambooth_lib.train import run_dir, train

RUNS = ROOT / ("runs/smoke" if SMOKE else "runs")  # shared with notebooks 01 and 03-05
IMAGES = RUNS / "images"  # figures; the README's copies in images/ change only by `make figures`
DATA_PREP = RUNS / "data_prep.json"  # written by notebook 01
if DATA_PREP.is_file():
    base = TrainConfig.from_dict(json.loads(DATA_PREP.read_text()))
else:  # run alone: the toy world's settings for its subject marked_star (identifier picked at training time)
    base = demo_config()
cuda = torch.cuda.is_available()
model = MODEL or base.pretrained_model
if model != base.pretrained_model:  # notebook 01's class images and resolution were for its model
    base = dataclasses.replace(base, class_dir=None, resolution=None)
if TRAIN_TEXT_ENCODER and not families.trains_text_encoder(model, lora=METHOD == "lora"):
    print(f"TRAIN_TEXT_ENCODER off: {families.resolve('auto', model).LABEL} keeps its text encoder frozen in a {METHOD}")
    TRAIN_TEXT_ENCODER = False
settings = recipe(METHOD, model)  # rank, rates, batch, steps for this model; a non-zero value above wins
settings.update({k: v for k, v in (("lora_rank", LORA_RANK), ("max_train_steps", MAX_TRAIN_STEPS),
                                   ("learning_rate", LEARNING_RATE)) if v})
cfg = dataclasses.replace(
    base,
    **settings,
    pretrained_model=model,
    train_text_encoder=TRAIN_TEXT_ENCODER,
    with_prior_preservation=PRIOR_PRESERVATION,
    prior_loss_weight=PRIOR_LOSS_WEIGHT,
    optimizer={"yes": "adamw8bit", "no": "adamw"}.get(USE_8BIT_ADAM, "auto" if cuda else "adamw"),
    mixed_precision=MIXED_PRECISION,
    gradient_checkpointing={"on": True, "off": False}.get(GRADIENT_CHECKPOINTING, "auto"),
    validation_steps=VALIDATION_STEPS,
    checkpointing_steps=CHECKPOINTING_STEPS,
    seed=SEED,
    resume="latest",  # re-running continues an interrupted run (e.g. a Colab disconnect) from its newest checkpoint
    validation_prompts=["a photo of {identifier} {class_noun} in the snow", "a pencil sketch of {identifier} {class_noun}"],
)
if SUBJECTS:  # several subjects: their own folders, class nouns and identifiers; class images per class in the run
    subjects = ([dict(instance_dir=c.instance_dir, class_noun=c.class_noun)
                 for c in map(demo_config, ("marked_star", "cross_cube"))] if SUBJECTS == "toy"
                else json.loads(Path(SUBJECTS).read_text()))
    cfg = dataclasses.replace(cfg, subjects=subjects, instance_dir="", class_noun="", identifier=None, class_dir=None)
if SMOKE:
    cfg = dataclasses.replace(cfg, max_train_steps=2, validation_steps=2, num_validation_images=2,
                              validation_inference_steps=2, checkpointing_steps=0, num_class_images=2,
                              class_inference_steps=2)
# One folder per subject(s), method (and base model), found again by notebooks 03-05.
cfg.output_dir = str(run_dir(RUNS, cfg, METHOD, PRIOR_PRESERVATION))
RUN_NAME = Path(cfg.output_dir).name
print(json.dumps(cfg.to_dict(), indent=1))

# %% [markdown]
# ## Hardware
# Peak GPU memory measured on an H200 for Stable Diffusion 1.5 at 512 px, 1 + 1 images, fp16, 8-bit Adam:
# full UNet 10.0 GB without gradient checkpointing, 9.5 GB with; LoRA r4 4.6 GB without, 2.8 GB with (a free
# Colab T4 has 15 GB). "auto" above picks the fastest setting whose estimate fits; training prints its
# "memory plan" and summary.json keeps it. SDXL at 1024 px needs LoRA with
# gradient checkpointing on a T4 (aim: <= 15 GB, not yet measured) and ~24 GB for a full fine-tune; its VAE
# runs in fp32 under fp16 unless `vae_model` names an fp16-fixed one. The toy model needs none of that.

# %%
if cuda:
    gpu = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(f"device: {gpu.name}, {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free")
else:
    print(f"device: CPU only ({os.cpu_count()} cores); optimizer {cfg.optimizer}, mixed precision {families.with_family_defaults(cfg).mixed_precision}")

# %% [markdown]
# ## Train
# One progress bar over the optimizer steps; validation grids and checkpoints are written into the run folder.

# %%
summary = train(cfg)
print(f"{summary['steps']} steps in {summary['wall_time_s']:.0f} s on {summary['device']}, optimizer {summary['optimizer']}, "
      f"{summary['trainable_parameters']:,} trained parameters, peak memory {summary['peak_memory_mb']:.0f} MB "
      f"({summary['memory']})")
for s in summary.get("subjects") or [dict(name=Path(cfg.instance_dir).name, identifier=summary["identifier"],
                                          instance_prompt=summary["instance_prompt"])]:
    print(f"subject {s['name']}: identifier {s['identifier']!r}, prompt {s['instance_prompt']!r}")
print(f"weights: {summary['weights']}")

# %% [markdown]
# ## Loss curve
# The per-step loss is noisy by nature (each step draws one timestep per image); look at the trend. With prior
# preservation the total is instance loss + lambda x prior loss.

# %%
history = summary["loss_history"]
steps = [h["step"] for h in history]
plt.figure(figsize=(7, 3.5))
for key in ("loss", "instance_loss", "prior_loss") if cfg.with_prior_preservation else ("loss",):
    plt.plot(steps, [h[key] for h in history], label=key, alpha=0.8)
plt.xlabel("optimizer step")
plt.ylabel("MSE")
plt.legend()
plt.title(RUN_NAME)
IMAGES.mkdir(parents=True, exist_ok=True)
plt.savefig(IMAGES / "loss_curve.png", bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Validation grids
# One row per validation prompt, the same seeds at every step, so rows can be compared across steps.

# %%
grids = sorted((Path(cfg.output_dir) / "validation").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
fig, axes = plt.subplots(len(grids), 1, figsize=(6, 2.2 * len(grids)), squeeze=False)
for ax, path in zip(axes[:, 0], grids):
    ax.imshow(Image.open(path), interpolation="nearest")
    ax.set_title(path.stem, fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Save
# The run folder holds the weights (LoRA: `pytorch_lora_weights.safetensors`; full: a diffusers pipeline),
# `summary.json`, checkpoints and validation grids. In Colab, tick `SAVE_TO_DRIVE` to copy it to Google Drive.

# %%
if SAVE_TO_DRIVE and "google.colab" in sys.modules:
    from google.colab import drive

    drive.mount("/content/drive")
    target = Path(DRIVE_FOLDER) / RUN_NAME
    shutil.copytree(cfg.output_dir, target, dirs_exist_ok=True)
    print(f"copied {cfg.output_dir} to {target}")
print(f"run folder: {cfg.output_dir}")
