"""The model-family seam: detection from model_index.json, explicit choice, clear errors before model work."""

from __future__ import annotations

import json
import shutil

import pytest

import dreambooth_lib.models as M
import dreambooth_lib.validate as V
import dreambooth_lib.train as T
from dreambooth_lib import data, families
from dreambooth_lib.config import TOY_FLOW_MODEL_DIR, TOY_MODEL_DIR, TrainConfig
from dreambooth_lib.tiny import save_tiny_pipeline


def test_the_family_is_read_from_model_index(tiny_model_dir):
    assert families.detect(str(tiny_model_dir)) == "sd" and families.detect(TOY_MODEL_DIR) == "sd"
    assert families.of(TrainConfig(pretrained_model=str(tiny_model_dir))) is families.sd
    assert families.resolve("sd", "/not/read/when/named") is families.sd  # a named family wins, nothing is read


def test_unknown_or_missing_models_fail_with_what_to_do(tiny_model_dir, tmp_path, instance_dir):
    sana = tmp_path / "sana"  # a family the library does not read (FLUX.1 was this test's example until it was added)
    sana.mkdir()
    (sana / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    with pytest.raises(data.InputError, match=r"sana: its model_index.json names 'SanaPipeline'.*sd: StableDiffusionPipeline"):
        families.detect(str(sana))
    with pytest.raises(data.InputError, match="no model_index.json"):
        families.detect(str(tmp_path))
    with pytest.raises(data.InputError, match="model_family = 'sana': use 'auto'"):
        V.validate_config(TrainConfig(model_family="sana", instance_dir=str(instance_dir), class_noun="dog"))
    # train() stops at the family, before loading a tokenizer or a model.
    cfg = TrainConfig(pretrained_model=str(sana), instance_dir=str(instance_dir), class_noun="dog",
                      output_dir=str(tmp_path / "run"), resolution=32)
    with pytest.raises(data.InputError, match="SanaPipeline"):
        T.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_gated_hub_model_says_to_accept_its_licence_and_log_in(monkeypatch, tmp_path, instance_dir):
    import httpx2
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import GatedRepoError

    def gated(model, **_):  # what diffusers' load_config does with huggingface_hub's answer for a gated repo
        try:
            raise GatedRepoError("401: access to this model is restricted",
                                 response=httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co")))
        except GatedRepoError:
            raise EnvironmentError(f"{model} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(DiffusionPipeline, "load_config", gated)
    cfg = TrainConfig(pretrained_model="black-forest-labs/FLUX.1-dev", instance_dir=str(instance_dir),
                      class_noun="dog", output_dir=str(tmp_path / "run"), resolution=32)
    with pytest.raises(data.InputError, match=r"gated hub repository.*huggingface.co/black-forest-labs/FLUX.1-dev.*hf auth login"):
        T.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_prepare_training_refuses_models_of_another_family(tiny_model_dir, tmp_path, instance_dir):
    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), instance_dir=str(instance_dir), resolution=32,
                      with_prior_preservation=False)
    models = M.load_models(cfg)
    assert models.family is families.sd and isinstance(models.text_encoders, tuple) and len(models.text_encoders) == 1
    models.family = families.sdxl  # as if built by another family's loader
    with pytest.raises(data.InputError, match="set model_family"):
        T.prepare_training(cfg, models, T.make_accelerator(cfg), [], [])


def test_resolution_follows_the_model_unless_set(tmp_path, instance_dir):
    for name, sample_size, vae_blocks, side in (("sd15", 64, 4, 512), ("sdxl", 128, 4, 1024), ("toyish", 8, 3, 32)):
        for part, config in (("unet", {"sample_size": sample_size}), ("vae", {"block_out_channels": [8] * vae_blocks})):
            (tmp_path / name / part).mkdir(parents=True)
            (tmp_path / name / part / "config.json").write_text(json.dumps(config))  # configs only: nothing else is read
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))  # the family
        assert families.native_resolution(str(tmp_path / name)) == side
    assert TrainConfig().resolution is None
    assert families.with_native_resolution(TrainConfig()).resolution == 32  # the toy model: what the CLI trains at
    assert families.with_native_resolution(TrainConfig(resolution=64)).resolution == 64  # a set value wins
    small = save_tiny_pipeline(tmp_path / "small", sample_size=8)  # 16 px pictures
    summary = T.train(TrainConfig(pretrained_model=str(small), instance_dir=str(instance_dir), class_noun="dog",
                                  identifier="sks", with_prior_preservation=False, max_train_steps=1, optimizer="adamw",
                                  checkpointing_steps=0, validation_steps=0, output_dir=str(tmp_path / "run"),
                                  mixed_precision="auto"),
                      progress=False)
    assert summary["config"]["resolution"] == 16
    assert summary["config"]["mixed_precision"] == "no"  # "auto" on a CPU


def test_auto_mixed_precision_is_the_familys_half_precision_on_cuda_and_none_on_a_cpu():
    # configs only: the committed toy models stand for SD (fp16) and FLUX.2 (bf16; fp16 overflows FLUX)
    for model, on_cuda in ((TOY_MODEL_DIR, "fp16"), (TOY_FLOW_MODEL_DIR, "bf16")):
        cfg = TrainConfig(pretrained_model=model, mixed_precision="auto")
        assert families.with_family_defaults(cfg, cuda=True).mixed_precision == on_cuda
        assert families.with_family_defaults(cfg, cuda=False).mixed_precision == "no"
        families.check(families.with_family_defaults(cfg, cuda=True))  # FLUX's fp16 refusal is not triggered
    set_value = TrainConfig(pretrained_model=TOY_FLOW_MODEL_DIR, mixed_precision="no")
    assert families.with_family_defaults(set_value, cuda=True).mixed_precision == "no"  # a set value wins
