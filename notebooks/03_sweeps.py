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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/notebooks/03_sweeps.ipynb)
#
# # 03 · Sweeps: LoRA scales, guidance, prompt suites
#
# A LoRA run adds $\Delta W = \tfrac{\alpha}{r} BA$ to the attention weights of the denoiser (the UNet;
# FLUX: the transformer) and the text encoder.
# At sampling time each component's update can be scaled separately, $W + s\,\Delta W$, with `s = 0` the base
# model and `s = 1` the model as trained (`dreambooth_lib.sample.set_lora_scales`, i.e. diffusers
# `set_adapters`; the LoRA is never fused, so every scale stays adjustable). This notebook sweeps
# denoiser scale x text-encoder scale, then guidance x scale, renders the paper's prompt categories, and ends
# with sliders. It uses notebook 02's LoRA run (`runs/<subject>-lora-prior`) and trains a small one if it is missing.

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
#@title Sweep parameters
SMOKE = os.environ.get("DREAMBOOTH_SMOKE", "0") == "1"  # CI smoke run: 2x2 grids, 2 sampler steps
PROMPT = "a photo of {identifier} {class_noun} in the water"  #@param {type:"string"}
# a context the subject photos never show (recontextualization); on the toy model, water keeps the
# subject's white disc visible (on snow it vanishes, so the grid could not show the subject appear)
SEED = 0  #@param {type:"integer"}
GUIDANCE = 0.0  #@param {type:"number"}
# 0 = the model family's default: 7.5 (toy model, SD, SDXL), 3.5 (FLUX.1 [dev]'s distilled guidance), 4 (FLUX.2 [klein])
INFERENCE_STEPS = 25  #@param {type:"integer"}
SCALES = [0.0, 0.25, 0.5, 0.75, 1.0]  #@param {type:"raw"}
GUIDANCE_SCALES = [1, 3, 5, 7, 9, 11, 13]  #@param {type:"raw"}
SUITE_SCALE_DENOISER = 1.0  #@param {type:"slider", min:0, max:1, step:0.05}
SUITE_SCALE_TEXT_ENCODER = 1.0  #@param {type:"slider", min:0, max:1, step:0.05}
SUITE_SEEDS = [0, 1, 2, 3]  #@param {type:"raw"}
FALLBACK_STEPS = 300  #@param {type:"integer"}
# only used when notebook 02's run is missing: the LoRA steps trained here

# %%
import dataclasses
import json

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display
from PIL import Image

from dreambooth_lib import families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.sample import generate, load_pipeline, lora_scale_grid, save_grid, scale_guidance_grid, set_lora_scales
from dreambooth_lib.toyworld.demo import demo_config, recipe
from dreambooth_lib.train import finished_or_train, run_dir

if SMOKE:
    INFERENCE_STEPS, SCALES, GUIDANCE_SCALES, SUITE_SEEDS, FALLBACK_STEPS = 2, [0.0, 1.0], [1, 13], [0], 2
RUNS = ROOT / ("runs/smoke" if SMOKE else "runs")  # shared with notebooks 01-05
IMAGES = RUNS / "images"  # figures; the README's copies in images/ change only by `make figures`
DATA_PREP = RUNS / "data_prep.json"  # written by notebook 01
# Run alone, without notebook 01: the toy world's settings for its subject marked_star.
base = TrainConfig.from_dict(json.loads(DATA_PREP.read_text())) if DATA_PREP.is_file() else demo_config()
if SMOKE:
    base = dataclasses.replace(base, num_class_images=2, class_inference_steps=2)
RUN_DIR = run_dir(RUNS, base)  # notebook 02's default run (LoRA with prior preservation)
# notebook 02's run, or (run alone) a small LoRA run (denoiser + text encoder) trained here first
fallback = dataclasses.replace(base, **recipe("lora", base.pretrained_model))  # the LoRA settings for this model
summary = finished_or_train(dataclasses.replace(fallback, max_train_steps=FALLBACK_STEPS,
                                                train_text_encoder=families.trains_text_encoder(base.pretrained_model),
                                                validation_steps=0, output_dir=str(RUN_DIR)))
identifier, class_noun = summary["identifier"], summary["config"]["class_noun"]
prompt = PROMPT.format(identifier=identifier, class_noun=class_noun)
pipe = load_pipeline(summary["config"]["pretrained_model"], lora_dir=RUN_DIR)  # adapter "subject", not fused
GUIDANCE = GUIDANCE or families.of_pipeline(pipe).DEFAULT_GUIDANCE
SIZE = summary["config"]["resolution"]  # sampled at the run's training size (FLUX pipelines default to 1024 px)
IMAGES.mkdir(parents=True, exist_ok=True)
print(f"run: {RUN_DIR}\nprompt: {prompt!r}")


def show(image, title):
    """Small images (the toy model draws 32 px) are enlarged without smoothing."""
    plt.figure(figsize=(min(14, 1.6 * image.width / 32 + 2), min(14, 1.6 * image.height / 32 + 1)))
    plt.imshow(image, interpolation="nearest")
    plt.title(title, fontsize=9)
    plt.axis("off")
    plt.show()


# %% [markdown]
# ## Denoiser scale x text-encoder scale (fixed guidance and seed)
# Rows: text-encoder scale; columns: denoiser (UNet / transformer) scale, labelled u. The text-encoder LoRA
# changes what the prompt *means* (does the identifier point at the subject), the denoiser's LoRA how it is
# *drawn*. A LoRA trained without the text encoder has no text-encoder weights, and its rows are identical.

# %%
grid, _ = lora_scale_grid(pipe, prompt, SCALES, SCALES, SEED, guidance_scale=GUIDANCE, resolution=SIZE,
                          num_inference_steps=INFERENCE_STEPS, path=IMAGES / "sweep_lora_scales.png")
show(grid, f"rows: text-encoder scale {SCALES}, columns: denoiser scale {SCALES}; guidance {GUIDANCE}, seed {SEED}")

# %% [markdown]
# ## Guidance x LoRA scale (fixed seed)
# Rows: classifier-free guidance scale; columns: one LoRA scale for both components. Low guidance ignores
# the prompt; very high guidance oversaturates. Strong LoRA scales often want less guidance.

# %%
grid, _ = scale_guidance_grid(pipe, prompt, SCALES, GUIDANCE_SCALES, SEED, num_inference_steps=INFERENCE_STEPS,
                              path=IMAGES / "sweep_guidance.png", resolution=SIZE)
show(grid, f"rows: guidance {GUIDANCE_SCALES}, columns: LoRA scale {SCALES}; seed {SEED}")

# %% [markdown]
# ## Prompt suites (paper Sec. 4.3 applications)
# One row per prompt, same seeds in every row. The toy world knows colours, contexts (grass, snow, beach,
# night, water, brick wall) and the pencil-sketch style; it has no words for expressions or viewpoints, so those
# rows show what a model does with unknown words. With Stable Diffusion all five categories are meaningful.

# %%
PROMPT_SUITES = {
    "recontextualization": ["a photo of {identifier} {class_noun} on the beach", "a photo of {identifier} {class_noun} at night",
                            "a photo of {identifier} {class_noun} in the water"],
    "property modification": ["a photo of a red {identifier} {class_noun}", "a photo of a blue {identifier} {class_noun}"],
    "expression": ["a photo of a happy {identifier} {class_noun}", "a photo of a sleepy {identifier} {class_noun}"],
    "novel view": ["a photo of {identifier} {class_noun} seen from above", "a photo of {identifier} {class_noun} seen from behind"],
    "art renditions": ["a pencil sketch of {identifier} {class_noun}",
                       "a painting of {identifier} {class_noun} in the style of Vincent van Gogh"],
}
if SMOKE:
    PROMPT_SUITES = {category: prompts[:1] for category, prompts in PROMPT_SUITES.items()}
suite = [(c, p.format(identifier=identifier, class_noun=class_noun)) for c, ps in PROMPT_SUITES.items() for p in ps]
set_lora_scales(pipe, SUITE_SCALE_DENOISER, SUITE_SCALE_TEXT_ENCODER)
images = generate(pipe, [p for _, p in suite for _ in SUITE_SEEDS], SUITE_SEEDS * len(suite), guidance_scale=GUIDANCE,
                  num_inference_steps=INFERENCE_STEPS, resolution=SIZE)
grid = save_grid(images, len(suite), len(SUITE_SEEDS), IMAGES / "prompt_suites.png")
show(grid, f"LoRA scales denoiser {SUITE_SCALE_DENOISER} / text encoder {SUITE_SCALE_TEXT_ENCODER}, seeds {SUITE_SEEDS}")
for row, (category, p) in enumerate(suite):
    print(f"row {row}: [{category}] {p}")

# %% [markdown]
# ## Interactive: sliders re-render one image
# Each move re-renders with the **loaded** pipeline (no reload; the adapter's scales are simply set again) and
# a fixed seed. The callback is also called once below, so headless CI exercises it.

# %%
denoiser_slider = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="LORA_SCALE_DENOISER",
                                  continuous_update=False, style={"description_width": "initial"})
text_slider = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.05, description="LORA_SCALE_TEXT_ENCODER",
                                  continuous_update=False, style={"description_width": "initial"})
guidance_slider = widgets.FloatSlider(value=GUIDANCE, min=1.0, max=13.0, step=0.5, description="GUIDANCE",
                                      continuous_update=False)
prompt_box = widgets.Text(value=prompt, description="prompt", continuous_update=False, layout={"width": "90%"})
canvas = widgets.Output()


def render(_change=None):
    """Set the scales on the live pipeline and draw the prompt with SEED; returns the image."""
    set_lora_scales(pipe, denoiser_slider.value, text_slider.value)
    image = generate(pipe, prompt_box.value, [SEED], guidance_scale=guidance_slider.value,
                     num_inference_steps=INFERENCE_STEPS, progress=False, resolution=SIZE)[0]
    with canvas:
        canvas.clear_output(wait=True)
        display(image.resize((256, 256), Image.Resampling.NEAREST))
    return image


for control in (denoiser_slider, text_slider, guidance_slider, prompt_box):
    control.observe(render, names="value")
display(widgets.VBox([denoiser_slider, text_slider, guidance_slider, prompt_box, canvas]))
first = render()
print(f"rendered {first.size[0]}x{first.size[1]} at denoiser {denoiser_slider.value}, text encoder {text_slider.value}, "
      f"guidance {guidance_slider.value}")
