"""The model-family seam: detection from model_index.json, explicit choice, clear errors before model work."""

from __future__ import annotations

import json
import shutil

import pytest

import dreambooth_lib.train as T
from dreambooth_lib import data, families
from dreambooth_lib.config import TOY_MODEL_DIR, TrainConfig


def test_the_family_is_read_from_model_index(tiny_model_dir):
    assert families.detect(str(tiny_model_dir)) == "sd" and families.detect(TOY_MODEL_DIR) == "sd"
    assert families.of(TrainConfig(pretrained_model=str(tiny_model_dir))) is families.sd
    assert families.resolve("sd", "/not/read/when/named") is families.sd  # a named family wins, nothing is read


def test_unknown_or_missing_models_fail_with_what_to_do(tiny_model_dir, tmp_path, instance_dir):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(data.InputError, match=r"flux: its model_index.json names 'FluxPipeline'.*sd: StableDiffusionPipeline"):
        families.detect(str(flux))
    with pytest.raises(data.InputError, match="no model_index.json"):
        families.detect(str(tmp_path))
    with pytest.raises(data.InputError, match="model_family = 'flux': use 'auto'"):
        data.validate_config(TrainConfig(model_family="flux", instance_dir=str(instance_dir), class_noun="dog"))
    # train() stops at the family, before loading a tokenizer or a model.
    cfg = TrainConfig(pretrained_model=str(flux), instance_dir=str(instance_dir), class_noun="dog",
                      output_dir=str(tmp_path / "run"), resolution=32)
    with pytest.raises(data.InputError, match="FluxPipeline"):
        T.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_prepare_training_refuses_models_of_another_family(tiny_model_dir, tmp_path, instance_dir):
    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), instance_dir=str(instance_dir), resolution=32,
                      with_prior_preservation=False)
    models = T.load_models(cfg)
    assert models.family == "sd" and models.text_encoders == (models.text_encoder,)
    models.family = "sdxl"  # as if built by another family's loader
    with pytest.raises(data.InputError, match="set model_family"):
        T.prepare_training(cfg, models, T.make_accelerator(cfg), T.load_tokenizer(cfg), [], [])
