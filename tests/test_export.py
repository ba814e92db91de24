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


def test_kohya_file_holds_every_tensor_under_kohya_names_with_alphas(lora_run, tiny_model_dir, capsys):
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
        # From the run folder: its base model and trigger words, as its summary.json records them.
        assert f.metadata()["ss_sd_model_name"] == str(tiny_model_dir.resolve())
        assert "'sks dog'" in f.metadata()["ss_training_comment"]
    # the same LoRA, the same bytes (safetensors writes its metadata in hash order; export sorts it)
    assert export_lora(lora_run, out.with_name("again.safetensors")).read_bytes() == out.read_bytes()


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


# --- FLUX.1: sd-scripts' names, read back by diffusers' own kohya FLUX reader ----------------------------------------

FLUX_DOUBLE_TARGETS = [f"transformer_blocks.0.{m}" for m in (  # double block 0 only: the tiny model is 32 wide
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")]


def lora_deltas(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """{module name: scaling x B @ A} of every LoRA layer of `model` (the update the adapter adds to W)."""
    return {name: (m.scaling[adapter] * m.lora_B[adapter].weight @ m.lora_A[adapter].weight).detach()
            for name, m in model.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


def test_flux_lora_exports_to_kohya_and_diffusers_reads_back_the_same_updates(tmp_path):
    from conftest import write_photos
    from diffusers import FluxPipeline

    from dreambooth_lib.tiny import save_tiny_flux_pipeline

    model = save_tiny_flux_pipeline(tmp_path / "flux")
    write_photos(tmp_path / "photos")
    common = dict(pretrained_model=str(model), instance_dir=str(tmp_path / "photos"), class_noun="dog", identifier="sks",
                  resolution=32, with_prior_preservation=False, max_train_steps=2, learning_rate=5e-2, optimizer="adamw",
                  checkpointing_steps=0, validation_steps=0, use_lora=True, lora_rank=4, lora_alpha=8,
                  max_sequence_length=8)
    T.train(TrainConfig(**common, output_dir=str(tmp_path / "run"), train_text_encoder=True,
                        lora_modules=FLUX_DOUBLE_TARGETS), progress=False, log=lambda *a: None)
    out = export_lora(tmp_path / "run")
    with safe_open(out, "pt") as f:
        kohya, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert header["ss_network_module"] == "networks.lora_flux"
    assert all(KOHYA_KEY.match(k) for k in kohya), [k for k in kohya if not KOHYA_KEY.match(k)]
    # q, k, v fused into one layer of rank 3 x 4, block-diagonal; alpha 3 x 8 keeps the scale 8 / 4 = 2
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert kohya["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (96, 12)
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 24.0
    assert float(kohya["lora_unet_double_blocks_0_img_mlp_2.alpha"]) == 8.0
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)

    ours, theirs = FluxPipeline.from_pretrained(model), FluxPipeline.from_pretrained(model)
    ours.load_lora_weights(tmp_path / "run", adapter_name="a")
    theirs.load_lora_weights(out, adapter_name="a")  # through diffusers' _convert_kohya_flux_lora_to_diffusers
    for part in ("transformer", "text_encoder"):
        a, b = lora_deltas(getattr(ours, part), "a"), lora_deltas(getattr(theirs, part), "a")
        assert a.keys() == b.keys() and len(a) == (12 if part == "transformer" else 8), part
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
        assert max(float(d.abs().max()) for d in a.values()) > 1e-4  # trained, not the zero init

    # The default targets include the single block's q/k/v: at this width diffusers' reader could not split them.
    T.train(TrainConfig(**common, output_dir=str(tmp_path / "single")), progress=False, log=lambda *a: None)
    with pytest.raises(InputError, match="lora_unet_single_blocks_0_linear1: a 32-wide single block"):
        export_lora(tmp_path / "single")


def test_flux_kohya_fused_layers_round_trip_at_flux1_width(tmp_path):
    """FLUX.1's real widths (3072, MLP 12288), rank 2, one double and one single block: every default target and
    the modulations, through flux_to_kohya and back through diffusers' reader; the single block's unused MLP part is
    written as zeros and read back as a zero update."""
    from diffusers import FluxPipeline

    from dreambooth_lib.export import flux_to_kohya

    g, w, r = torch.Generator().manual_seed(0), 3072, 2
    shapes = {f"transformer_blocks.0.{m}": (w, o) for m, o in [
        ("attn.to_q", w), ("attn.to_k", w), ("attn.to_v", w), ("attn.to_out.0", w), ("attn.add_q_proj", w),
        ("attn.add_k_proj", w), ("attn.add_v_proj", w), ("attn.to_add_out", w), ("ff.net.0.proj", 4 * w),
        ("ff_context.net.0.proj", 4 * w), ("norm1.linear", 6 * w), ("norm1_context.linear", 6 * w)]}
    shapes |= {"transformer_blocks.0.ff.net.2": (4 * w, w), "transformer_blocks.0.ff_context.net.2": (4 * w, w)}
    shapes |= {f"single_transformer_blocks.0.{m}": (i, o) for m, i, o in [
        ("attn.to_q", w, w), ("attn.to_k", w, w), ("attn.to_v", w, w), ("proj_out", 5 * w, w), ("norm.linear", w, 3 * w)]}
    ours = {}
    for module, (fan_in, fan_out) in shapes.items():
        ours[f"transformer.{module}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
        ours[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, r, generator=g)
    save_file(flux_to_kohya(ours, {"r": r, "lora_alpha": 4}), tmp_path / "k.safetensors")
    back = FluxPipeline.lora_state_dict(tmp_path / "k.safetensors")
    back = back[0] if isinstance(back, tuple) else back
    for module, (fan_in, _) in shapes.items():  # the updates B @ A, seen through 3 random inputs (cheaper than W)
        a, b = (f"transformer.{module}.lora_{x}.weight" for x in "AB")
        x = torch.randn(fan_in, 3, generator=g)
        torch.testing.assert_close(back[b] @ (back[a] @ x), 2.0 * ours[b] @ (ours[a] @ x), msg=module)  # scale 4 / 2
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    assert set(back) - {k for m in shapes for k in (f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight")} \
        == {f"{mlp}.lora_A.weight", f"{mlp}.lora_B.weight"}
    assert not back[f"{mlp}.lora_B.weight"].any()
