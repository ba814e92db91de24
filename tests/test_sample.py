"""sample.py on the tiny model: LoRA save/load round trip, scales 0/0 = base, per-seed images, grids."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import dreambooth_lib.checkpoint as CK
import dreambooth_lib.models as M
import dreambooth_lib.weights as W
import dreambooth_lib.train as T
from dreambooth_lib import families
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.sample import generate, load_pipeline, lora_scale_grid, save_grid, scale_guidance_grid, set_lora_scales

PROMPT = "a photo of sks dog"


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


ATTENTION = families.sd.LORA_PRESETS["default"]
WITH_FF = [*ATTENTION, "ff.net.0.proj", "ff.net.2"]  # the transformer blocks' feed-forward layers too


@pytest.fixture(params=[ATTENTION, WITH_FF], ids=["attention", "attention+ff"])
def lora_dir(tiny_model_dir, tmp_path, request):
    """A pipeline with trained-looking (non-zero B) UNet + text-encoder LoRA, saved like train.py does."""
    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), use_lora=True, train_text_encoder=True,
                      lora_modules=request.param)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    M.add_lora(pipe.unet, pipe.text_encoder, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, 0.5)  # gaussian init leaves B = 0 (a no-op adapter)
    pipe.set_progress_bar_config(disable=True)
    in_memory = generate(pipe, PROMPT, [0, 1], num_inference_steps=2, progress=False)
    W.save_weights(tmp_path / "lora", pipe.unet, pipe.text_encoder, cfg)
    return tmp_path / "lora", in_memory


def test_the_same_lora_is_saved_as_the_same_bytes(tiny_model_dir, tmp_path):
    """safetensors writes its metadata map in hash order (it changes from save to save within one process) and
    peft keeps target_modules as a set (its order follows PYTHONHASHSEED): save_weights sorts both."""
    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), use_lora=True, train_text_encoder=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    M.add_lora(pipe.unet, pipe.text_encoder, cfg)
    files = []
    for k in range(8):  # 2 metadata keys: unsorted, 8 saves all alike by chance 1 time in 128
        W.save_weights(tmp_path / f"lora{k}", pipe.unet, pipe.text_encoder, cfg)
        files.append((tmp_path / f"lora{k}" / W.LORA_WEIGHTS).read_bytes())
    assert all(f == files[0] for f in files)
    size = int.from_bytes(files[0][:8], "little")
    meta = json.loads(files[0][8:8 + size])["__metadata__"]  # as written (safe_open's metadata() is a hash map)
    assert list(meta) == sorted(meta) == ["format", "lora_adapter_metadata"]
    adapters = json.loads(meta["lora_adapter_metadata"])
    targets = {k: v for k, v in adapters.items() if k.endswith(".target_modules")}
    assert set(targets) == {"unet.target_modules", "text_encoder.target_modules"}
    assert all(v == sorted(v) and len(v) > 1 for v in targets.values())


def test_lora_round_trip_and_zero_scales(tiny_model_dir, lora_dir):
    folder, in_memory = lora_dir
    base = generate(load_pipeline(tiny_model_dir, device="cpu"), PROMPT, [0, 1], num_inference_steps=2, progress=False)
    pipe = load_pipeline(tiny_model_dir, lora_dir=folder, device="cpu")
    loaded = generate(pipe, PROMPT, [0, 1], num_inference_steps=2, progress=False)
    assert np.array_equal(arrays(loaded), arrays(in_memory))  # stock load_lora_weights gives the same model
    assert not np.array_equal(arrays(loaded), arrays(base))  # ... which is not the base model
    set_lora_scales(pipe, denoiser=0.0, text_encoder=0.0)
    assert np.array_equal(arrays(generate(pipe, PROMPT, [0, 1], num_inference_steps=2, progress=False)), arrays(base))
    set_lora_scales(pipe, denoiser=0.0, text_encoder=1.0)  # the components are separate knobs
    te_only = generate(pipe, PROMPT, [0, 1], num_inference_steps=2, progress=False)
    assert not np.array_equal(arrays(te_only), arrays(base)) and not np.array_equal(arrays(te_only), arrays(loaded))


def test_an_image_depends_only_on_its_seed(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    batch = generate(pipe, PROMPT, [5, 7, 9], num_inference_steps=2, batch_size=2, progress=False)
    alone = generate(pipe, PROMPT, [7], num_inference_steps=2, progress=False)
    assert np.abs(arrays(batch[1:2]) - arrays(alone)).max() <= 1  # batching may round differently
    assert not np.array_equal(arrays(batch[:1]), arrays(batch[1:2]))
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(pipe, [PROMPT, PROMPT], [0], num_inference_steps=2)


def test_grids_are_written_with_their_parameters(tiny_model_dir, lora_dir, tmp_path):
    pipe = load_pipeline(tiny_model_dir, lora_dir=lora_dir[0], device="cpu")
    grid, params = lora_scale_grid(pipe, PROMPT, [0.0, 1.0], [0.0, 0.5, 1.0], seed=3, num_inference_steps=2,
                                   path=tmp_path / "scales.png")
    assert grid.size == (2 * 128, 3 * 128) and (tmp_path / "scales.png").is_file()  # 32 px cells enlarged x4 for labels
    assert params["cells"][1] == dict(row=0, col=1, unet_scale=1.0, te_scale=0.0)
    grid, params = scale_guidance_grid(pipe, PROMPT, [0.0, 1.0], [1.0, 7.5], seed=3, num_inference_steps=2)
    assert grid.size == (2 * 128, 2 * 128) and len(params["cells"]) == 4
    assert params["guidance"] == "classifier-free guidance scale"
    images = generate(pipe, PROMPT, [0, 1], num_inference_steps=2, progress=False)
    plain = save_grid(images, 1, 2, tmp_path / "g" / "plain.png")
    labelled = save_grid(images, 1, 2, tmp_path / "labelled.png", labels=["a", "b"])
    assert plain.size == (64, 32) and labelled.size == (256, 128)
    # the enlargement is nearest-neighbour: away from the label, each picture pixel becomes a 4x4 block
    assert labelled.crop((0, 124, 128, 128)).resize((32, 1), Image.NEAREST).tobytes() == plain.crop((0, 31, 32, 32)).tobytes()


def test_a_lora_trained_with_dropout_samples_without_it(tiny_model_dir, tmp_path):
    # A file whose LoraConfig metadata carries the dropout (save_weights now writes 0, but older files and
    # other tools' do not): load_lora_weights builds those Dropout layers in train mode.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    cfg = TrainConfig(pretrained_model=str(tiny_model_dir), use_lora=True, train_text_encoder=True, lora_dropout=0.5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    M.add_lora(pipe.unet, pipe.text_encoder, cfg)
    named = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, **{f"{n}_lora_layers": W.lora_layers(m) for n, m in named.items()},
        **{f"{n}_lora_adapter_metadata": m.peft_config["default"].to_dict() for n, m in named.items()})
    pipe = load_pipeline(tiny_model_dir, lora_dir=tmp_path, device="cpu")
    dropouts = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.5]
    assert dropouts and not any(m.training for c in (pipe.unet, pipe.text_encoder, pipe.vae) for m in c.modules())
    first, again = (arrays(generate(pipe, PROMPT, [0, 1], num_inference_steps=2, progress=False)) for _ in range(2))
    assert np.array_equal(first, again)


def test_a_damaged_lora_file_or_checkpoint_is_named_before_sampling(tiny_model_dir, tmp_path):
    # A copy that stopped early: the file is named, not a safetensors traceback from deep in diffusers.
    from dreambooth_lib.data import InputError
    from test_train import make_cfg
    from conftest import write_photos

    write_photos(tmp_path / "photos")
    cfg = make_cfg(tiny_model_dir, tmp_path / "photos", tmp_path / "run", use_lora=True, max_train_steps=2,
                   checkpointing_steps=1)
    T.train(cfg, progress=False)
    lora_file = tmp_path / "run" / W.LORA_WEIGHTS
    lora_file.write_bytes(lora_file.read_bytes()[:100])
    with pytest.raises(InputError, match=f"LoRA {lora_file} is cut short or corrupt"):
        load_pipeline(tiny_model_dir, lora_dir=tmp_path / "run", device="cpu")
    state = tmp_path / "run" / "checkpoint-2" / CK.STATE_TENSORS
    state.write_bytes(b"")
    with pytest.raises(InputError, match=f"checkpoint {state.parent} is damaged.*checkpoint-1"):
        load_pipeline(state.parent, device="cpu")
    assert load_pipeline(tmp_path / "run" / "checkpoint-1", device="cpu") is not None  # the one it names works
