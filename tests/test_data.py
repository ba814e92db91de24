"""Instance images, identifier, prompts, config validation, class images, batches."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.class_images import ClassImageManifest, class_image_dtype, ensure_class_images, weights_fingerprint
from dreambooth_lib.data import (
    DreamBoothDataset,
    InputError,
    build_prompts,
    collate_examples,
    instance_prompts_for,
    load_instance_images,
    preprocess_image,
    resolve_identifier,
)
from dreambooth_lib.validate import validate_config
from dreambooth_lib.tiny import TINY_WORDS, write_clip_tokenizer, write_qwen_tokenizer
from conftest import write_photos


def caught_warnings(fn, *args, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in caught]


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


# --- instance images -------------------------------------------------------------------------


def test_load_instance_images_sorted_rgb(instance_dir):
    images, messages = caught_warnings(load_instance_images, instance_dir, 32)
    assert messages == []
    assert [im.path.name for im in images] == ["photo0.png", "photo1.jpg", "photo2.png", "photo3.jpg"]
    assert all(im.image.mode == "RGB" and im.image.size == (48, 40) for im in images)
    assert all(im.caption is None and im.notes == [] for im in images)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, left red / right blue; orientation 6 = "rotate 90 degrees clockwise to view".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path / "d" / "rot.jpg", Image.fromarray(pixels), exif=exif, quality=95)
    (image,) = load_instance_images(tmp_path / "d", 16)
    assert image.image.size == (20, 40)  # portrait after rotation
    top, bottom = image.image.getpixel((10, 5)), image.image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue at the bottom


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    return image


def _rgba() -> Image.Image:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    return image


def _la() -> Image.Image:
    image = Image.new("LA", (8, 8), (255, 255))
    image.putpixel((0, 0), (0, 0))
    return image


def _gray16() -> Image.Image:
    values = np.full((8, 8), 65535, np.uint16)
    values[0, 0] = 0
    return Image.fromarray(values)


# (file name, image, note fragment, pixel (0,0), pixel (4,4)): transparent pixels become white.
CONVERSIONS = [
    ("rgba.png", _rgba, "transparency", (255, 255, 255), (255, 0, 0)),
    ("la.png", _la, "transparency", (255, 255, 255), (255, 255, 255)),
    ("palette.png", _palette_with_transparency, "transparency", (255, 255, 255), (255, 0, 0)),
    ("gray.png", lambda: Image.new("L", (8, 8), 100), "grayscale", (100, 100, 100), (100, 100, 100)),
    ("gray16.png", _gray16, "16-bit", (0, 0, 0), (255, 255, 255)),  # PIL's convert would clip, not scale
    ("cmyk.jpg", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "CMYK", None, (255, 0, 0)),
]


@pytest.mark.parametrize("name, make, note, corner, middle", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_modes_are_converted_to_rgb_with_a_note(tmp_path, name, make, note, corner, middle):
    save(tmp_path / "d" / name, make())
    (image,) = load_instance_images(tmp_path / "d", 8)
    assert image.image.mode == "RGB"
    assert len(image.notes) == 1 and note in image.notes[0]
    if corner is not None:
        assert image.image.getpixel((0, 0)) == corner
    assert np.abs(np.subtract(image.image.getpixel((4, 4)), middle)).max() <= 2  # JPEG rounding


def _truncated(path: Path) -> None:
    save(path, Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "zero-byte": ("empty.png", lambda p: p.write_bytes(b""), "0 bytes"),
    "truncated png": ("cut.png", _truncated, "truncated"),
    "truncated jpg": ("cut.jpg", _truncated, "truncated"),
    "not an image": ("notes.jpg", lambda p: p.write_text("hello"), "could not be read"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_image_raises_naming_the_file(instance_dir, case):
    name, write, fragment = BAD_FILES[case]
    write(instance_dir / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InputError, match=fragment) as err:
        load_instance_images(instance_dir, 32)
    assert str(instance_dir / name) in str(err.value)


def test_non_image_files_are_skipped_with_a_warning(instance_dir):
    (instance_dir / ".DS_Store").write_bytes(b"\0\1")
    (instance_dir / "notes.txt").write_text("not a caption: no image called notes")
    (instance_dir / "photo0.txt").write_text("a photo of sks dog")  # a caption: no warning
    (instance_dir / "sub").mkdir()
    images, messages = caught_warnings(load_instance_images, instance_dir, 32)
    assert len(images) == 4
    assert len(messages) == 3
    for name in (".DS_Store", "notes.txt", "sub"):
        assert any(str(instance_dir / name) in m and "skipping" in m for m in messages)


def test_small_images_warn(instance_dir):
    _, messages = caught_warnings(load_instance_images, instance_dir, 64)
    assert len(messages) == 4
    assert all("48x40, smaller than resolution 64" in m for m in messages)
    assert str(instance_dir / "photo1.jpg") in messages[1]


def test_missing_or_empty_folder_raises(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_instance_images(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(InputError, match="has no images"), pytest.warns(UserWarning, match="readme.md"):
        load_instance_images(tmp_path / "empty", 32)
    with pytest.raises(InputError, match="instance_dir is not set"):
        load_instance_images("", 32)


def test_captions_are_read_and_filled(instance_dir):
    for i in range(4):
        (instance_dir / f"photo{i}.txt").write_text(f"{{identifier}} {{class_noun}} number  {i}\n")
    images = load_instance_images(instance_dir, 32, use_captions=True)
    assert [im.caption for im in images] == [f"{{identifier}} {{class_noun}} number {i}" for i in range(4)]
    cfg = TrainConfig(class_noun="dog", use_captions=True)
    assert instance_prompts_for(images, cfg, "sks") == [f"sks dog number {i}" for i in range(4)]
    assert instance_prompts_for(images, dataclasses.replace(cfg, use_captions=False), "sks") == ["a photo of sks dog"] * 4

    (instance_dir / "photo2.txt").write_text("a dog without the token")
    images = load_instance_images(instance_dir, 32, use_captions=True)
    with pytest.raises(InputError, match="photo2"):
        instance_prompts_for(images, cfg, "sks")
    (instance_dir / "photo3.txt").unlink()
    with pytest.raises(InputError, match="photo3.txt is missing"):
        load_instance_images(instance_dir, 32, use_captions=True)


# --- preprocessing ---------------------------------------------------------------------------


def _stripes() -> Image.Image:
    """64x32: x < 16 red, 16 <= x < 48 green, x >= 48 blue."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16, 0] = pixels[:, 16:48, 1] = pixels[:, 48:, 2] = 255
    return Image.fromarray(pixels)


def test_preprocess_center_crop_values():
    out = preprocess_image(_stripes(), 32)  # short side already 32: no resize, crop x in [16, 48)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[1], torch.ones(32, 32)) and torch.equal(out[0], -torch.ones(32, 32))
    assert torch.equal(out[2], -torch.ones(32, 32))


def test_preprocess_resizes_short_side():
    out = preprocess_image(_stripes().resize((128, 64), Image.Resampling.NEAREST), 32)
    assert out.shape == (3, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[1, :, 4:28], torch.ones(32, 24), atol=0.02)  # the green middle band


def test_preprocess_random_crop_and_flip_follow_the_generator():
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)), "L")  # pixel = 4 * x

    def crop(seed, flip=False):
        return preprocess_image(ramp, 32, center_crop=False, random_flip=flip, generator=torch.Generator().manual_seed(seed))

    lefts = set()
    for seed in range(12):
        out = crop(seed)
        assert torch.equal(out, crop(seed))
        x = (out[0, 0] + 1) * 127.5 / 4
        left = int(x[0].round())
        assert torch.allclose(x, torch.arange(left, left + 32, dtype=torch.float32), atol=1e-3)  # a contiguous window
        lefts.add(left)
    assert len(lefts) > 3 and min(lefts) >= 0 and max(lefts) <= 32

    flipped = [seed for seed in range(12) if (crop(seed, True)[0, 0, 0] > crop(seed, True)[0, 0, -1])]
    assert 0 < len(flipped) < 12  # both outcomes happen
    for seed in range(12):  # the flip is drawn after the crop: same window, mirrored
        assert torch.equal(crop(seed, True), crop(seed).flip(-1) if seed in flipped else crop(seed))


# --- identifier and prompts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return write_clip_tokenizer(TINY_WORDS, tmp_path_factory.mktemp("tok"))


def test_auto_identifier_on_the_tiny_tokenizer(tiny_tokenizer):
    logs = []
    # Rarest whole words first: style ... blue are too long, red is an English word, then vqp.
    assert resolve_identifier(tiny_tokenizer, None, log=logs.append) == "vqp"
    vqp_id = tiny_tokenizer.convert_tokens_to_ids("vqp</w>")
    assert len(logs) == 1 and re.fullmatch(
        rf"identifier 'vqp': one token \(id {vqp_id}\), 3 letters, from the rarest \d+% of the vocabulary, "
        "not a common word", logs[0])
    assert resolve_identifier(tiny_tokenizer, None, log=logs.append, exclude={"vqp"}) == "zwx"
    assert resolve_identifier(tiny_tokenizer, None, log=logs.append, exclude={"vqp", "zwx"}) == "sks"


def test_auto_identifier_on_a_byte_level_tokenizer(tmp_path):
    # FLUX.2 [klein]'s Qwen tokenizer marks word starts ("Ġpai"), not word ends ("pai</w>"): the pick is a token
    # that stands alone after a space in a prompt, and an explicit identifier is checked in that position too.
    tokenizer = write_qwen_tokenizer(TINY_WORDS, tmp_path)
    word = resolve_identifier(tokenizer, None, log=lambda _: None, exclude={"star"})
    token_id = tokenizer.convert_tokens_to_ids("\u0120" + word)
    assert tokenizer(" " + word, add_special_tokens=False).input_ids == [token_id]
    assert token_id in tokenizer(f"a photo of {word} star", add_special_tokens=False).input_ids
    with pytest.warns(UserWarning, match=r"is 3 tokens \['Ġ', 'z', 'q'\]"):  # no word of the vocabulary: bytes
        resolve_identifier(tokenizer, "zq")


def test_auto_identifier_filters(tmp_path):
    # Listed last = highest id = "rarest". Every word after "zq" must be rejected, for the reason noted.
    words = ["photo", "zq", "sks", "dogs", "the", "usa", "ooo", "hi5", "Abc", "ufo", "cat"]
    # "dogs" too long, "the"/"cat" English, "usa"/"ufo" abbreviations, "ooo" vowels only,
    # "hi5" not letters, "Abc" not lowercase
    tokenizer = write_clip_tokenizer(words, tmp_path)
    assert resolve_identifier(tokenizer, None, log=lambda _: None) == "sks"
    assert resolve_identifier(tokenizer, None, log=lambda _: None, exclude={"sks"}) == "zq"


def test_user_identifier(tiny_tokenizer):
    (ident, messages) = caught_warnings(resolve_identifier, tiny_tokenizer, " sks ")
    assert ident == "sks" and messages == []
    ident, messages = caught_warnings(resolve_identifier, tiny_tokenizer, "qzj")
    assert ident == "qzj"
    assert len(messages) == 1 and "3 tokens ['q', 'z', 'j</w>']" in messages[0]
    with pytest.raises(InputError, match="one word"):
        resolve_identifier(tiny_tokenizer, "two words")


def test_build_prompts():
    cfg = TrainConfig(class_noun="dog")
    assert build_prompts(cfg, "sks") == ("a photo of sks dog", "a photo of a dog")
    with pytest.raises(InputError, match="instance_prompt_template"):
        build_prompts(dataclasses.replace(cfg, instance_prompt_template="a {identifer} dog"), "sks")


# --- config validation -----------------------------------------------------------------------


def good_config(folder: Path, **changes) -> TrainConfig:
    # A model path that does not exist: validation must never load the model.
    cfg = TrainConfig(pretrained_model="/no/such/model", instance_dir=str(folder), class_noun="dog",
                      resolution=32, identifier="sks")
    return dataclasses.replace(cfg, **changes)


def test_good_config_passes_without_loading_a_model(instance_dir):
    _, messages = caught_warnings(validate_config, good_config(instance_dir))
    assert messages == []
    validate_config(good_config(instance_dir, identifier=None, with_prior_preservation=False, class_noun=""))


BAD_SETTINGS = [
    (dict(max_train_steps=0), "max_train_steps"),
    (dict(max_train_steps=-5), "max_train_steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=-1e-4), "learning_rate"),
    (dict(text_encoder_lr=0.0), "text_encoder_lr"),
    (dict(train_batch_size=0), "train_batch_size"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(prior_loss_weight=-1.0), "prior_loss_weight"),
    (dict(use_lora=True, lora_rank=0), "lora_rank"),
    (dict(use_lora=True, lora_rank=-4), "lora_rank"),
    (dict(use_lora=True, lora_modules=[]), "lora_modules"),
    (dict(snr_gamma=0.0), "snr_gamma"),
    (dict(offset_noise=-0.1), "offset_noise"),
    (dict(resolution=30), "multiple of 8"),
    (dict(num_class_images=0), "num_class_images"),
    (dict(checkpoints_total_limit=0), "checkpoints_total_limit"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(prior_generation_precision="fp8"), "prior_generation_precision"),
    (dict(lr_scheduler="warmup_cosine"), "lr_scheduler"),
    (dict(resume="/no/such/checkpoint"), "resume"),
    (dict(class_noun=""), "needs class_noun"),
    (dict(instance_prompt_template="a photo of a {class_noun}"), "does not contain the identifier"),
    (dict(identifier=None, instance_prompt_template="a photo of a {class_noun}"), "does not contain the identifier"),
    (dict(identifier="two words"), "one word"),
    (dict(instance_dir=""), "instance_dir is not set"),
    (dict(instance_dir="/no/such/folder"), "does not exist"),
]


@pytest.mark.parametrize("changes, fragment", BAD_SETTINGS, ids=[str(c) for c, _ in BAD_SETTINGS])
def test_bad_settings_raise(instance_dir, changes, fragment):
    with pytest.raises(InputError, match=fragment):
        validate_config(good_config(instance_dir, **changes))


def test_validate_config_checks_the_images(instance_dir):
    _, messages = caught_warnings(validate_config, good_config(instance_dir, resolution=64))
    assert len(messages) == 4 and all("smaller than resolution 64" in m for m in messages)
    (instance_dir / ".DS_Store").write_bytes(b"\0")
    _, messages = caught_warnings(validate_config, good_config(instance_dir))
    assert len(messages) == 1 and ".DS_Store" in messages[0]
    (instance_dir / ".DS_Store").unlink()
    (instance_dir / "broken.png").write_bytes(b"")
    with pytest.raises(InputError, match="broken.png"):
        validate_config(good_config(instance_dir))


def test_validate_config_checks_captions(instance_dir):
    for i in range(4):
        (instance_dir / f"photo{i}.txt").write_text("sks dog" if i else "{identifier} on grass")
    validate_config(good_config(instance_dir, use_captions=True))
    (instance_dir / "photo3.txt").write_text("a dog on the beach")
    with pytest.raises(InputError, match="photo3"):
        validate_config(good_config(instance_dir, use_captions=True))


def test_validate_config_checks_a_user_class_dir(instance_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    made = dict(model="/no/such/model", model_weights="/no/such/model@main", class_prompt="a photo of a dog",
                resolution=32, scheduler="X", num_inference_steps=2, guidance_scale=7.5, seed=0)
    (class_dir / "manifest.json").write_text(json.dumps(made))
    validate_config(good_config(instance_dir, class_dir=str(class_dir)))
    with pytest.raises(InputError, match="class_prompt: folder has 'a photo of a dog', this run wants 'a photo of a cat'"):
        validate_config(good_config(instance_dir, class_dir=str(class_dir), class_noun="cat"))
    with pytest.raises(InputError, match="model_weights: folder has '/no/such/model@main'"):
        validate_config(good_config(instance_dir, class_dir=str(class_dir), pretrained_model="/other/model"))
    made["model"] = "no/such/../such/model"  # the same model, spelled another way: its identity matches
    (class_dir / "manifest.json").write_text(json.dumps(made))
    validate_config(good_config(instance_dir, class_dir=str(class_dir)))
    validate_config(good_config(instance_dir, class_dir=str(class_dir), with_prior_preservation=False, class_noun="cat"))


# --- class images ----------------------------------------------------------------------------


def same_up_to_rounding(path: Path, pixels: np.ndarray) -> bool:
    """Other batch sizes change float rounding (~1e-6), which can flip an 8-bit value by one."""
    return np.abs(np.asarray(Image.open(path)).astype(int) - pixels).max() <= 1


def test_class_images_are_generated_once_reused_and_seeded_per_index(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    calls = []

    def make_pipeline():
        calls.append(1)
        return StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)

    manifest = ClassImageManifest(model=str(tiny_model_dir), model_weights=weights_fingerprint(str(tiny_model_dir)),
                                  class_prompt="a photo of a dog", resolution=32,
                                  scheduler="DPMSolverMultistepScheduler(dpmsolver++)", num_inference_steps=2,
                                  guidance_scale=7.5, seed=0)
    quiet = dict(log=lambda _: None)
    class_dir = tmp_path / "class"

    paths = ensure_class_images(class_dir, manifest, 3, make_pipeline, batch_size=2, **quiet)
    assert paths == [class_dir / f"{i:05d}.png" for i in range(3)] and len(calls) == 1
    assert json.loads((class_dir / "manifest.json").read_text()) == dataclasses.asdict(manifest) | {"dtype": "float32"}
    pixels = [np.asarray(Image.open(p)) for p in paths]
    assert pixels[0].shape == (32, 32, 3) and not np.array_equal(pixels[0], pixels[1])
    stamps = [p.stat().st_mtime_ns for p in paths]

    assert ensure_class_images(class_dir, manifest, 3, make_pipeline, batch_size=2, **quiet) == paths
    assert len(calls) == 1  # nothing missing: the model is not even loaded

    paths[1].unlink()
    ensure_class_images(class_dir, manifest, 3, make_pipeline, batch_size=2, **quiet)
    assert len(calls) == 2
    assert [paths[0].stat().st_mtime_ns, paths[2].stat().st_mtime_ns] == [stamps[0], stamps[2]]
    assert same_up_to_rounding(paths[1], pixels[1])  # seeded by index, not by batch

    other = ensure_class_images(tmp_path / "other", manifest, 3, make_pipeline, batch_size=3, **quiet)
    assert all(same_up_to_rounding(p, q) for p, q in zip(other, pixels))

    # A user's folder made with another prompt is an error, and nothing is touched.
    cat = dataclasses.replace(manifest, class_prompt="a photo of a cat")
    with pytest.raises(InputError, match="class_prompt: folder has 'a photo of a dog'"):
        ensure_class_images(class_dir, cat, 3, make_pipeline, user_supplied=True, **quiet)
    assert len(calls) == 3 and [p.stat().st_mtime_ns for p in (paths[0], paths[2])] == [stamps[0], stamps[2]]

    # A managed folder is regenerated; the old images are moved aside, not deleted.
    logs = []
    new = ensure_class_images(class_dir, cat, 3, make_pipeline, batch_size=3, log=logs.append)
    assert len(calls) == 4 and any("moved to" in m for m in logs)
    aside = tmp_path / "class.replaced-1"
    assert np.array_equal(np.asarray(Image.open(aside / "00000.png")), pixels[0])
    assert json.loads((aside / "manifest.json").read_text())["class_prompt"] == "a photo of a dog"
    assert json.loads((class_dir / "manifest.json").read_text())["class_prompt"] == "a photo of a cat"
    assert not np.array_equal(np.asarray(Image.open(new[0])), pixels[0])


def test_weights_fingerprint_changes_with_the_weights_not_the_folder(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(tiny_model_dir))  # moved: the same model
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")  # configs are not weights
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(tiny_model_dir))
    unet_file = next((copy / "unet").glob("*.safetensors"))
    state = load_file(unet_file)
    name = next(iter(state))
    state[name] = state[name] + 1e-3  # retrained in place, e.g. a further pretraining cycle
    save_file(state, unet_file)
    assert weights_fingerprint(str(copy)) != weights_fingerprint(str(tiny_model_dir))
    assert weights_fingerprint("org/model") == "org/model@main" and weights_fingerprint("org/model", "v2") == "org/model@v2"


def test_weights_fingerprint_reads_the_weights_once_until_they_change(tiny_model_dir, tmp_path, monkeypatch):
    # A run asks twice (validating a user's class_dir, then generating class images): SD's 4 GB once.
    import hashlib
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    reads, real_digest = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, algo: reads.append(f.name) or real_digest(f, algo))
    first = weights_fingerprint(str(copy))
    n_files = len(reads)
    assert n_files >= 3 and weights_fingerprint(str(copy)) == first and len(reads) == n_files
    vae_file = next((copy / "vae").glob("*.safetensors"))
    data = vae_file.read_bytes()
    vae_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # rewritten in place, same size
    assert weights_fingerprint(str(copy)) != first and len(reads) == 2 * n_files


@pytest.mark.parametrize("user_supplied", [False, True])
def test_class_images_follow_the_model_weights_not_its_path(user_supplied, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from dreambooth_lib.train import class_image_paths

    class_dir = tmp_path / "class"
    monkeypatch.chdir(tiny_model_dir.parent)

    def run(model: str) -> tuple[list[Path], list[str]]:
        cfg = TrainConfig(pretrained_model=model, class_noun="dog", resolution=32, num_class_images=2,
                          class_inference_steps=1, class_dir=str(class_dir) if user_supplied else None,
                          output_dir=str(tmp_path / "run"))
        logs = []
        return class_image_paths(cfg, "a photo of a dog", log=logs.append), logs

    paths, logs = run(tiny_model_dir.name)  # relative, as typed in a shell
    assert any("generating 2" in m for m in logs)
    stamps = [p.stat().st_mtime_ns for p in paths]
    copy = tmp_path / "elsewhere" / "copied_model"
    shutil.copytree(tiny_model_dir, copy)
    for model in (str(tiny_model_dir), str(copy)):  # absolute; another folder holding the same weights
        again, logs = run(model)
        assert again == paths and logs == [] and [p.stat().st_mtime_ns for p in again] == stamps

    unet_file = next((copy / "unet").glob("*.safetensors"))  # retrained in place: another model
    state = load_file(unet_file)
    save_file({k: v + 1e-3 if i == 0 else v for i, (k, v) in enumerate(state.items())}, unet_file)
    if user_supplied:
        with pytest.raises(InputError, match="model_weights: folder has"):
            run(str(copy))
        assert [p.stat().st_mtime_ns for p in paths] == stamps
    else:
        _, logs = run(str(copy))
        assert any("moved to" in m for m in logs) and any("generating 2" in m for m in logs)
        assert sorted(p.name for p in (tmp_path / "run" / "class_images.replaced-1").iterdir()) == [
            "00000.png", "00001.png", "manifest.json"]


def test_user_class_images_without_manifest_are_used_as_they_are(tmp_path):
    def make_pipeline():
        raise AssertionError("must not generate")

    manifest = ClassImageManifest("m", "m@main", "a photo of a dog", 32, "S", 2, 7.5, 0)
    photos = write_photos(tmp_path / "mine", n=2)
    quiet = dict(log=lambda _: None)
    assert ensure_class_images(tmp_path / "mine", manifest, 2, make_pipeline, user_supplied=True, **quiet) == photos
    with pytest.raises(InputError, match="has 2 images and no manifest.json"):
        ensure_class_images(tmp_path / "mine", manifest, 3, make_pipeline, user_supplied=True, **quiet)


# --- dataset and batches ---------------------------------------------------------------------


def test_dataset_cycles_and_collate_pairs_prompts_with_values():
    inst = [torch.full((1, 2, 2), float(i)) for i in range(3)]
    cls = [torch.full((1, 2, 2), 100.0 + j) for j in range(5)]
    dataset = DreamBoothDataset(inst, [f"sks dog {i}" for i in range(3)], cls, "a photo of a dog")
    assert len(dataset) == 5
    item = dataset[4]
    assert item["instance_prompt"] == "sks dog 1" and item["instance_values"][0, 0, 0] == 1
    assert item["class_values"][0, 0, 0] == 104 and item["class_prompt"] == "a photo of a dog"

    batch = collate_examples([dataset[i] for i in (2, 0, 1)], with_prior=True)
    assert batch["values"].shape == (6, 1, 2, 2)
    assert batch["values"][:, 0, 0, 0].tolist() == [2, 0, 1, 102, 100, 101]  # all instance rows, then all class rows
    expected_prompt = {float(i): f"sks dog {i}" for i in range(3)} | {100.0 + j: "a photo of a dog" for j in range(5)}
    assert batch["prompts"] == [expected_prompt[v] for v in batch["values"][:, 0, 0, 0].tolist()]

    plain = collate_examples([dataset[i] for i in (2, 0, 1)], with_prior=False)
    assert plain["values"][:, 0, 0, 0].tolist() == [2, 0, 1]
    assert plain["prompts"] == ["sks dog 2", "sks dog 0", "sks dog 1"]

    no_class = DreamBoothDataset(inst, [f"sks dog {i}" for i in range(3)])
    assert len(no_class) == 3 and "class_values" not in no_class[0]
    with pytest.raises(ValueError, match="no class values"):
        collate_examples([no_class[0]], with_prior=True)


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_class_images_sample_in_the_chosen_precision(tiny_model_dir, tmp_path, precision, dtype):
    import logging

    from diffusers import StableDiffusionPipeline

    assert class_image_dtype("auto", "cuda") == torch.float16 and class_image_dtype("auto", "cpu") == torch.float32
    pipes, records = [], []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        manifest = ClassImageManifest(model=str(tiny_model_dir), model_weights="w", class_prompt="a photo of a dog", resolution=32,
                                      scheduler="DPMSolverMultistepScheduler(dpmsolver++)", num_inference_steps=1, guidance_scale=1.0,
                                      seed=0)
        make = lambda: pipes.append(StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)) or pipes[-1]  # noqa: E731
        (path,) = ensure_class_images(tmp_path, manifest, 1, make, device="cpu", log=lambda _: None, precision=precision)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert pipes[0].dtype == dtype and Image.open(path).size == (32, 32)
    kept = [r for r in records if "kept in float32" in r.getMessage()]
    assert bool(kept) == (dtype != torch.float32)  # fp32 on the CPU: no cast, so no diffusers cast warning
