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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/01_data_prep.ipynb)
#
# # 01 · Data preparation
#
# DreamBooth needs three things before training (paper Sec. 3): **3-5 photos of the subject**, a
# **rare identifier** `[V]` to name it ("a photo of [V] star"), and **class images** ("a photo of a star")
# drawn from the frozen model, which the prior-preservation loss keeps the model able to draw.
# This notebook checks the photos with the library, picks the identifier, makes (or reuses) the class
# images and writes the choices to `runs/data_prep.json`, which notebooks 02-05 read.
#
# Defaults: the toy world's subject `data/subjects/marked_star` (a yellow star with a white disc no caption
# ever mentions) and the project's own pretrained toy model `data/toy_model`, so everything runs on a CPU.

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
#@title Parameters
SMOKE = os.environ.get("DREAMBOOTH_SMOKE", "0") == "1"  # CI smoke run: tiny image counts and step numbers
MODEL = ""  #@param {type:"string"}
# "" = the embedded toy model (data/toy_model); real alternatives: "stable-diffusion-v1-5/stable-diffusion-v1-5",
# "stabilityai/stable-diffusion-xl-base-1.0", "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.2-klein-4B"
# (any SD 1.x/2.x, SDXL, FLUX.1 or FLUX.2 [klein] folder or hub id)
SUBJECT_DIR = ""  #@param {type:"string"}
# "" = the toy subject (data/subjects/marked_star); any folder of 3-5 photos, e.g. /content/drive/MyDrive/my_dog
UPLOAD = False  #@param {type:"boolean"}
# Colab only: upload photos from your computer into SUBJECT_DIR (default /content/subject)
CLASS_NOUN = "star"  #@param {type:"string"}
IDENTIFIER = ""  #@param {type:"string"}
# "" = pick a rare single-token word automatically (paper Sec. 4.1); or your own, e.g. "sks"
RESOLUTION = 0  #@param {type:"integer"}
# training side in pixels; 0 = the model's native size (32 for the toy model, 512 for SD 1.5, 1024 for SDXL
# and FLUX); a multiple of 8 (FLUX: 16)
NUM_CLASS_IMAGES = 100  #@param {type:"integer"}
CLASS_INFERENCE_STEPS = 25  #@param {type:"integer"}

# %%
import json
import warnings

import matplotlib.pyplot as plt
from PIL import Image

from dreambooth_lib import class_images, data, families, models, validate
from dreambooth_lib.config import TOY_MODEL_DIR, TrainConfig
from dreambooth_lib.sample import save_grid

if SMOKE:
    NUM_CLASS_IMAGES, CLASS_INFERENCE_STEPS = 2, 2
IN_COLAB = "google.colab" in sys.modules
MODEL = MODEL or TOY_MODEL_DIR
SUBJECT_DIR = SUBJECT_DIR or ("/content/subject" if UPLOAD else str(ROOT / "data/subjects/marked_star"))
RUNS = ROOT / ("runs/smoke" if SMOKE else "runs")  # shared with notebooks 02-05
IMAGES = RUNS / "images"  # figures; the README's copies in images/ change only by `make figures`
resolution = RESOLUTION or families.native_resolution(MODEL)  # what training will use
print(f"model: {MODEL} ({families.detect(MODEL)}, {resolution} px)\nsubject photos: {SUBJECT_DIR}\nruns: {RUNS}")

# %% [markdown]
# ## Subject photos
# In Colab, either tick `UPLOAD` (a file picker appears) or point `SUBJECT_DIR` at a Google Drive folder
# (`/content/drive/MyDrive/...`, mounted here). Elsewhere `SUBJECT_DIR` is a local folder.

# %%
if IN_COLAB and SUBJECT_DIR.startswith("/content/drive"):
    from google.colab import drive

    drive.mount("/content/drive")
if IN_COLAB and UPLOAD:
    from google.colab import files

    Path(SUBJECT_DIR).mkdir(parents=True, exist_ok=True)
    for name, content in files.upload().items():
        (Path(SUBJECT_DIR) / name).write_bytes(content)

# %% [markdown]
# The library reads every photo the way training will: EXIF rotation applied, any mode converted to RGB
# (transparency onto white), non-image files skipped. Everything it converted or skipped is listed with
# the reason; unreadable photos stop here with a message naming the file.

# %%
with warnings.catch_warnings(record=True) as skipped:
    warnings.simplefilter("always")
    photos = data.load_instance_images(SUBJECT_DIR, resolution)
for photo in photos:
    print(f"{photo.path.name}: {photo.image.width}x{photo.image.height}" + "".join(f"; {n}" for n in photo.notes))
for w in skipped:
    print(f"warning: {w.message}")
print(f"{len(photos)} subject photos")

fig, axes = plt.subplots(1, len(photos), figsize=(2.2 * len(photos), 2.4), squeeze=False)
for ax, photo in zip(axes[0], photos):
    ax.imshow(photo.image)
    ax.set_title(photo.path.name, fontsize=8)
    ax.axis("off")
IMAGES.mkdir(parents=True, exist_ok=True)
fig.savefig(IMAGES / "instance_images.png", bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Identifier and class noun
# The subject is called "[V] [class noun]". `[V]` should be one token the text encoder has no strong
# meaning for; left empty, the library scans the tokenizer's vocabulary from the rare end for a short
# word that is not a common word or abbreviation. The class noun ties the subject to what the model
# already knows ("star", "dog") and names the class images.

# %%
cfg = TrainConfig(
    pretrained_model=MODEL, instance_dir=SUBJECT_DIR, class_noun=CLASS_NOUN, resolution=RESOLUTION or None,
    num_class_images=NUM_CLASS_IMAGES, class_inference_steps=CLASS_INFERENCE_STEPS,
    class_dir=str(RUNS / "class_images" / f"{Path(MODEL).name}-{CLASS_NOUN}"),
)
tokenizer = models.load_tokenizer(cfg)
cfg.identifier = data.resolve_identifier(tokenizer, IDENTIFIER or None, exclude=[CLASS_NOUN])
validate.validate_config(cfg)  # every check that needs no model: prompts, settings, an old class folder's manifest
instance_prompt, class_prompt = data.build_prompts(cfg, cfg.identifier)
print(f"instance prompt: {instance_prompt!r}\nclass prompt:    {class_prompt!r}")

# %% [markdown]
# ## Class images for prior preservation
# Generated once by the frozen model from the class prompt and reused afterwards: the folder's
# `manifest.json` records how they were made, and a folder made differently is never silently reused.
# You can also put your own class photos in an empty folder and set `class_dir` to it.

# %%
class_paths = class_images.class_image_paths(cfg, class_prompt)
preview = [Image.open(p).convert("RGB") for p in class_paths[:8]]
save_grid(preview, 1, len(preview), IMAGES / "class_images.png")
plt.figure(figsize=(2.2 * len(preview), 2.4))
plt.imshow(Image.open(IMAGES / "class_images.png"))
plt.title(f"{len(class_paths)} class images in {cfg.class_dir}; the first {len(preview)}", fontsize=9)
plt.axis("off")
plt.show()

# %% [markdown]
# ## Hand-off to training
# `runs/data_prep.json` is a `TrainConfig` with the data choices above; notebook 02 starts from it.

# %%
RUNS.mkdir(parents=True, exist_ok=True)
cfg.save_json(RUNS / "data_prep.json")
print(json.dumps({k: cfg.to_dict()[k] for k in ("pretrained_model", "instance_dir", "class_noun", "identifier", "class_dir")}, indent=2))
