"""export-lora --format kohya: every tensor under kohya names with its alpha, and diffusers' kohya loader
gives back the same adapters and the same images as our own file."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dreambooth_lib.weights as W
import dreambooth_lib.train as T
from dreambooth_lib import __main__ as cli
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.data import InputError
from dreambooth_lib.export import export_lora, to_kohya

KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def kohya_name(key: str) -> str:
    """What kohya calls one of our keys, written out here independently of the library (test oracle)."""
    component, rest = key.split(".", 1)
    module, kind = re.match(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$", rest).groups()
    if component.startswith("text_encoder"):
        module = "text_model." + module
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{module.replace('.', '_')}.lora_{kind}.weight"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from conftest import write_photos

    root = tmp_path_factory.mktemp("export")
    write_photos(root / "photos")
    # alpha 8 on rank 4: a scale of 2, which the kohya file must carry as its alpha.
    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), instance_dir=str(root / "photos"), output_dir=str(root / "dog"),
                      class_noun="dog", identifier="sks", resolution=32, with_prior_preservation=False,
                      max_train_steps=3, learning_rate=1e-2, optimizer="adamw", checkpointing_steps=0, validation_steps=0,
                      use_lora=True, train_text_encoder=True, lora_rank=4, lora_alpha=8)
    T.train(cfg, progress=False, log=lambda *a: None)
    return root / "dog"


def test_kohya_file_holds_every_tensor_under_kohya_names_with_alphas(lora_run, capsys):
    assert cli.main(["export-lora", str(lora_run), "--format", "kohya"]) == 0
    out = lora_run / "dog_kohya.safetensors"
    assert str(out) in capsys.readouterr().out
    ours, kohya = load_file(lora_run / W.LORA_WEIGHTS), load_file(out)
    assert any(k.startswith("text_encoder.") for k in ours) and any(k.startswith("unet.") for k in ours)
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)][:3]
    # Every LoRA tensor, under its kohya name, bit for bit; nothing else but one alpha per adapted layer.
    assert {kohya_name(k) for k in ours} == {k for k in kohya if not k.endswith(".alpha")}
    for key, value in ours.items():
        assert torch.equal(kohya[kohya_name(key)], value), key
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert {k.replace(".lora_down.weight", ".alpha") for k in downs} == {k for k in kohya if k.endswith(".alpha")}
    assert {float(kohya[k.replace(".lora_down.weight", ".alpha")]) for k in downs} == {8.0}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "8"


def test_diffusers_loads_the_kohya_file_back_to_the_same_adapters_and_images(lora_run, tiny_model_dir, tmp_path):
    out = export_lora(lora_run, tmp_path / "sks_dog.safetensors")
    # diffusers' own kohya -> diffusers conversion: the alphas come back as network alphas.
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path), weight_name=out.name)
    assert alphas and set(alphas.values()) == {8.0} and len(state) == len(load_file(lora_run / W.LORA_WEIGHTS))

    pipes = {}
    for name, folder, weight in (("ours", lora_run, W.LORA_WEIGHTS), ("kohya", tmp_path, out.name)):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name="subject")
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    for part in ("unet", "text_encoder"):
        a = get_peft_model_state_dict(getattr(pipes["ours"], part), adapter_name="subject")
        b = get_peft_model_state_dict(getattr(pipes["kohya"], part), adapter_name="subject")
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), part
        scales = [{m.scaling["subject"] for m in getattr(p, part).modules() if hasattr(m, "scaling")} for p in pipes.values()]
        assert scales == [{2.0}, {2.0}], part  # alpha 8 / rank 4 in both
    images = [p("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images for p in pipes.values()]
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    base.set_progress_bar_config(disable=True)
    plain = base("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.array_equal(images[0], images[1]) and not np.allclose(images[0], plain)  # the LoRA changes the picture


def test_sdxl_lora_exports_and_loads_back_in_stock_sdxl(tiny_sdxl_dir, tmp_path):
    from conftest import write_photos

    write_photos(tmp_path / "photos")
    cfg = TrainConfig(pretrained_model=str(tiny_sdxl_dir), instance_dir=str(tmp_path / "photos"),
                      output_dir=str(tmp_path / "xl"), class_noun="dog", identifier="sks", resolution=32,
                      with_prior_preservation=False, max_train_steps=2, learning_rate=1e-2, optimizer="adamw",
                      checkpointing_steps=0, validation_steps=0, use_lora=True, train_text_encoder=True, lora_alpha=8)
    T.train(cfg, progress=False, log=lambda *a: None)
    out = export_lora(tmp_path / "xl")
    kohya = load_file(out)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"} and all(KOHYA_KEY.match(k) for k in kohya)
    pipes = []
    for folder, weight in ((tmp_path / "xl", W.LORA_WEIGHTS), (out.parent, out.name)):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        pipe.load_lora_weights(str(folder), weight_name=weight, adapter_name="subject")
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        a, b = (get_peft_model_state_dict(getattr(p, part), adapter_name="subject") for p in pipes)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    images = [p("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images for p in pipes]
    assert np.array_equal(images[0], images[1])


def test_sdxl_text_encoder_2_and_files_without_a_lora_config():
    # Two text encoders (SDXL): diffusers' converter names the second lora_te2_; the alpha follows each component.
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    ours = {f"{c}.encoder.layers.0.self_attn.q_proj.lora_linear_layer.{kind}.weight": w
            for c in ("text_encoder", "text_encoder_2") for kind, w in (("down", down), ("up", up))}
    ours["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"] = down
    ours["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight"] = up
    kohya = to_kohya(ours, {"text_encoder": {"r": 4, "lora_alpha": 4}, "text_encoder_2": {"r": 4, "lora_alpha": 2},
                            "unet": {"r": 4, "lora_alpha": 16}})
    assert {kohya_name(k) for k in ours} | {kohya_name(k).replace(".lora_down.weight", ".alpha") for k in ours if ".down." in k} == set(kohya)
    assert float(kohya["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 2.0
    assert float(kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 4.0
    assert float(kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]) == 16.0
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(kohya)  # diffusers' SDXL kohya loader reads it back
    assert sum(k.startswith("text_encoder_2.") for k in state) == 2 and sorted(alphas.values()) == [2.0, 4.0, 16.0]
    # A file without LoraConfig metadata (older runs): alpha = rank, what diffusers assumes when loading it.
    assert {float(v) for k, v in to_kohya(ours).items() if k.endswith(".alpha")} == {4.0}


def test_clear_errors_for_folders_without_lora_weights(lora_run, tmp_path, capsys):
    (tmp_path / "full" / "unet").mkdir(parents=True)
    assert cli.main(["export-lora", str(tmp_path / "full")]) == 2
    assert "full fine-tune" in capsys.readouterr().err
    assert cli.main(["export-lora", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["export-lora", str(tmp_path / "empty")]) == 2
    assert "no LoRA weights (pytorch_lora_weights.safetensors not found)" in capsys.readouterr().err
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="no LoRA tensors"):
        export_lora(tmp_path / "other.safetensors")
    kohya = export_lora(lora_run, tmp_path / "k.safetensors")
    with pytest.raises(InputError, match="already in the kohya"):
        export_lora(kohya)
