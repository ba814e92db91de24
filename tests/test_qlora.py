"""QLoRA on FLUX.1 (quantize_base): LoRA over a transformer quantized by bitsandbytes while it loads, on a
tiny FLUX.1 [dev] whose Linear inputs are multiples of 64 (bitsandbytes' 4-bit CPU kernels work in blocks
of 64). diffusers 0.42's bitsandbytes quantizer refuses to run without a GPU (its validate_environment);
bitsandbytes 0.50.2 itself runs NF4 and LLM.int8 forward and backward on the CPU, so these tests lift only
that GPU check (`cpu_quantizer`) and run the rest of the path as a user's GPU would."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from diffusers import FluxPipeline
from diffusers.quantizers.bitsandbytes import bnb_quantizer
from PIL import Image
from safetensors.torch import load_file

import dreambooth_lib.models as M
import dreambooth_lib.train as T
from dreambooth_lib import data, families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.sample import load_pipeline, read_run, set_lora_scales
from dreambooth_lib.tiny import save_tiny_flux_pipeline

from conftest import fixed_batch_losses, flow_image

T5_TOKENS = 8


@pytest.fixture(scope="module")
def wide_flux_dir(tmp_path_factory):
    """Tiny FLUX.1 [dev], 64 wide with FLUX.1's 16 latent channels: every transformer Linear quantizes on a CPU."""
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux_wide"), width=64, latent_channels=16)


@pytest.fixture
def cpu_quantizer(monkeypatch):
    """diffusers' bitsandbytes quantizers without their "No GPU found" refusal (nothing else is changed)."""
    for quantizer in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *args, **kwargs: None)


def make_cfg(model, instance_dir, out, **kw) -> TrainConfig:
    base = dict(pretrained_model=str(model), instance_dir=str(instance_dir), output_dir=str(out), class_noun="dog",
                identifier="sks", resolution=32, with_prior_preservation=False, max_train_steps=2, learning_rate=2e-2,
                checkpointing_steps=0, validation_steps=0, optimizer="adamw", max_sequence_length=T5_TOKENS,
                use_lora=True, lora_rank=8, quantize_base="nf4")
    return TrainConfig(**{**base, **kw})


def test_refused_before_model_work(wide_flux_dir, tiny_model_dir, instance_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "load_tokenizer", lambda cfg: pytest.fail("bad input reached model work"))
    run = tmp_path / "run"
    if not torch.cuda.is_available():  # here diffusers' own refusal, turned into what to do
        with pytest.raises(data.InputError, match=r"quantize_base = 'nf4': diffusers' bitsandbytes quantizer cannot run "
                                                  r"here \(No GPU found.*needs a CUDA GPU"):
            T.train(make_cfg(wide_flux_dir, instance_dir, run), progress=False)
    for bad, message in [(dict(quantize_base="fp4"), r"quantize_base = 'fp4': use one of \('no', 'nf4', 'int8'\)"),
                         (dict(use_lora=False), "set use_lora = True")]:
        with pytest.raises(data.InputError, match=message):
            T.train(make_cfg(wide_flux_dir, instance_dir, run, **bad), progress=False)
    # A bitsandbytes diffusers cannot use, on a machine with a GPU: named, with the upgrade to make.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bnb_quantizer, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(data.InputError, match=r"requires the latest version of bitsandbytes.*pip install -U bitsandbytes"):
        families.check_quantization(make_cfg(wide_flux_dir, instance_dir, run, quantize_base="int8"))
    assert not run.exists()


def test_sd_refuses_quantize_base(tiny_model_dir, instance_dir, tmp_path, cpu_quantizer):
    with pytest.raises(data.InputError, match="QLoRA is offered for the FLUX transformers"):
        families.check(make_cfg(tiny_model_dir, instance_dir, tmp_path))


@pytest.mark.parametrize("quantize_base, layer", [("nf4", Linear4bit), ("int8", Linear8bitLt)])
def test_lora_over_a_quantized_base_lowers_the_loss(quantize_base, layer, wide_flux_dir, instance_dir, tmp_path,
                                                     cpu_quantizer):
    cfg = make_cfg(wide_flux_dir, instance_dir, tmp_path, quantize_base=quantize_base, train_batch_size=4)
    models = M.load_models(cfg, device="cpu")
    to_q = models.denoiser.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, layer) and M.is_quantized(models.denoiser)
    assert to_q.weight.dtype == (torch.uint8 if quantize_base == "nf4" else torch.int8)  # packed 4-bit / int8 codes
    before = to_q.weight.detach().clone()
    pixels = data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)], cfg, None)
    state = T.prepare_training(cfg, models, T.make_accelerator(cfg), pixels, ["a photo of sks dog"] * 4,
                               log=lambda _: None)
    to_q = models.denoiser.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, layer)  # peft's bitsandbytes LoRA layer wraps the quantized one
    trained = [n for n, p in state.models.denoiser.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    losses = fixed_batch_losses(state)  # before training, then every second of 8 steps
    # Measured: nf4 1.364 -> 1.174, int8 1.361 -> 1.205 (8 steps of the 4 items), falling at every check.
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.92 * losses[0], losses
    assert torch.equal(to_q.base_layer.weight, before)  # the quantized base never changes


def test_qlora_resumes_exactly_and_its_lora_loads_into_the_unquantized_model(wide_flux_dir, instance_dir, tmp_path,
                                                                           cpu_quantizer):
    common = dict(max_train_steps=4, checkpointing_steps=2, lr_scheduler="linear", lora_alpha=16)
    whole = T.train(make_cfg(wide_flux_dir, instance_dir, tmp_path / "whole", **common), progress=False,
                    log=lambda *_: None)
    resumed = T.train(make_cfg(wide_flux_dir, instance_dir, tmp_path / "resumed",
                               resume=str(tmp_path / "whole" / "checkpoint-2"), **common), progress=False,
                      log=lambda *_: None)
    assert [h["loss"] for h in resumed["loss_history"]] == [h["loss"] for h in whole["loss_history"]]
    a = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())  # plain LoRA tensors: nothing quantized is saved

    # The stock, unquantized FluxPipeline reads it (alpha 16 / rank 8 kept: scale 2); scale 0 is the base exactly.
    base = flow_image(FluxPipeline.from_pretrained(wide_flux_dir), T5_TOKENS)
    pipe = load_pipeline(tmp_path / "whole", device="cpu")  # the run folder: base model + its LoRA
    assert not M.is_quantized(pipe.transformer)
    assert {m.scaling["subject"] for m in pipe.transformer.modules() if hasattr(m, "scaling")} == {2.0}
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)
    assert np.array_equal(flow_image(pipe, T5_TOKENS), base)
    set_lora_scales(pipe, denoiser=1.0, text_encoder=0.0)
    assert np.abs(flow_image(pipe, T5_TOKENS) - base).max() > 1e-4

    # quantize="nf4" (on CUDA "auto" for this run): the LoRA on the 4-bit base it was trained on, as a 16 GB GPU
    # samples it; scale 0 is that base exactly.
    assert read_run(tmp_path / "whole").quantize_base == "nf4"  # what "auto" reads (of a checkpoint too, below)
    checkpoint = load_pipeline(tmp_path / "whole" / "checkpoint-2", device="cpu", quantize="nf4")
    assert isinstance(checkpoint.transformer.transformer_blocks[0].attn.to_q.base_layer, Linear4bit)
    nf4_base = flow_image(load_pipeline(wide_flux_dir, device="cpu", quantize="nf4"), T5_TOKENS)
    assert np.abs(nf4_base - base).max() > 1e-4  # 4-bit weights: another model than the bf16 one
    pipe = load_pipeline(tmp_path / "whole", device="cpu", quantize="nf4")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, Linear4bit)
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)
    assert np.array_equal(flow_image(pipe, T5_TOKENS), nf4_base)
    set_lora_scales(pipe, denoiser=1.0, text_encoder=0.0)
    assert np.abs(flow_image(pipe, T5_TOKENS) - nf4_base).max() > 1e-4


def test_klein_qlora_lowers_the_loss_and_its_lora_loads_on_the_plain_and_the_4bit_base(instance_dir, tmp_path,
                                                                                       cpu_quantizer):
    """FLUX.2 [klein] (4 B: ~8 GB in bf16, ~2.3 GB in NF4): the same QLoRA path, on a tiny klein 64 wide."""
    from diffusers import Flux2KleinPipeline

    from dreambooth_lib.tiny import save_tiny_flux2_pipeline

    model = save_tiny_flux2_pipeline(tmp_path / "klein", width=64, latent_channels=16)
    cfg = make_cfg(model, instance_dir, tmp_path / "run", train_batch_size=4, max_train_steps=4)
    models = M.load_models(cfg, device="cpu")
    assert isinstance(models.denoiser.transformer_blocks[0].attn.to_q, Linear4bit) and M.is_quantized(models.denoiser)
    pixels = data.pixel_values([im.image for im in data.load_instance_images(instance_dir, 32)], cfg, None)
    state = T.prepare_training(cfg, models, T.make_accelerator(cfg), pixels, ["a photo of sks dog"] * 4,
                               log=lambda _: None)
    losses = fixed_batch_losses(state)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.95 * losses[0], losses

    T.train(cfg, progress=False, log=lambda *_: None)
    for quantize, base in (("no", flow_image(Flux2KleinPipeline.from_pretrained(model), T5_TOKENS)),
                           ("nf4", flow_image(load_pipeline(model, device="cpu", quantize="nf4"), T5_TOKENS))):
        pipe = load_pipeline(tmp_path / "run", device="cpu", quantize=quantize)
        assert M.is_quantized(pipe.transformer) == (quantize == "nf4")
        set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)
        assert np.array_equal(flow_image(pipe, T5_TOKENS), base), quantize
        set_lora_scales(pipe, denoiser=1.0, text_encoder=0.0)
        assert np.abs(flow_image(pipe, T5_TOKENS) - base).max() > 1e-4, quantize


def test_class_images_of_a_qlora_run_come_from_its_quantized_base(wide_flux_dir, instance_dir, tmp_path, cpu_quantizer,
                                                                  monkeypatch):
    """The prior of the frozen base a QLoRA run trains on (and the one a 16 GB GPU holds with T5): the class-image
    pipeline gets the quantized transformer; the manifest tells those images from the unquantized base's."""
    import json

    from dreambooth_lib.class_images import class_image_paths

    loaded = []
    real = FluxPipeline.from_pretrained.__func__
    monkeypatch.setattr(FluxPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loaded.append(real(cls, *a, **kw)) or loaded[-1]))
    cfg = make_cfg(wide_flux_dir, instance_dir, tmp_path / "run", with_prior_preservation=True, num_class_images=2,
                   class_inference_steps=2, class_guidance_scale=1.0)
    nf4 = class_image_paths(cfg, "a photo of a dog", log=lambda *_: None)
    assert isinstance(loaded[-1].transformer.transformer_blocks[0].attn.to_q, Linear4bit)
    manifest = tmp_path / "run" / "class_images" / "manifest.json"
    assert json.loads(manifest.read_text())["base_quantization"] == "nf4"
    nf4_pixels = [np.asarray(Image.open(p)) for p in nf4]
    # the same settings on the unquantized base: another prior, so the folder is made again
    plain = class_image_paths(dataclasses.replace(cfg, quantize_base="no"), "a photo of a dog", log=lambda *_: None)
    assert not M.is_quantized(loaded[-1].transformer)
    assert json.loads(manifest.read_text())["base_quantization"] is None
    assert (tmp_path / "run" / "class_images.replaced-1" / "00000.png").is_file()
    assert any(not np.array_equal(a, np.asarray(Image.open(p))) for a, p in zip(nf4_pixels, plain))
