"""Metrics on tiny random DINO/CLIP encoders saved to disk and loaded like real checkpoints."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lib import metrics
from dreambooth_lib.tiny import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    dino = metrics.load_dino(str(save_tiny_dino(root / "dino")), device="cpu")
    clip = metrics.load_clip(str(save_tiny_clip(root / "clip")), device="cpu")
    return dino, clip


def random_images(n, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_hand_computed_cosines():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 2.0]])
    assert metrics.mean_cosine(a, b) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # rows: (1,0)·(0,2) -> 0 and (3,4)·(3,4) -> 1
    assert metrics.mean_paired_cosine(torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [3.0, 4.0]])) == pytest.approx(0.5, abs=1e-12)
    # pairs of {(1,0), (0,1), (1,1)}: 0, 1/sqrt2, 1/sqrt2
    assert metrics.mean_within_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(math.sqrt(2) / 3, abs=1e-12)
    with pytest.raises(ValueError):
        metrics.mean_within_cosine(torch.ones(1, 2))


def test_loaded_through_pil_backend(encoders):
    dino, clip = encoders
    assert type(dino.processor).__name__ == "ViTImageProcessorPil"
    assert type(clip.processor).__name__ == "CLIPImageProcessorPil"
    assert dino.model.pooler is None  # CLS token of last_hidden_state, not a random pooler


def test_identical_sets_score_one(encoders):
    dino, clip = encoders
    img = random_images(1, seed=1)[0]
    assert metrics.dino_score([img] * 3, [img] * 2, dino) == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_i_score([img] * 3, [img] * 2, clip) == pytest.approx(1.0, abs=1e-6)
    assert metrics.pres_score([img] * 2, [img], dino) == pytest.approx(1.0, abs=1e-6)
    other = random_images(1, seed=2)[0]
    assert metrics.dino_score([other], [img], dino) < 0.999


def test_batching_does_not_change_results(encoders):
    dino, clip = encoders
    gen, real = random_images(5, seed=3), random_images(3, seed=4)
    assert torch.allclose(metrics.dino_embed(gen, dino, batch_size=1), metrics.dino_embed(gen, dino, batch_size=4), atol=1e-6)
    assert metrics.dino_score(gen, real, dino, batch_size=2) == pytest.approx(metrics.dino_score(gen, real, dino, batch_size=64), abs=1e-6)
    assert metrics.clip_i_score(gen, real, clip, batch_size=2) == pytest.approx(metrics.clip_i_score(gen, real, clip, batch_size=64), abs=1e-6)
    prompts = ["a sks dog", "a sks dog on the grass in the snow", "a dog", "a red ball", "a sks cat at night"]
    t1, _ = metrics.clip_t_score(gen, prompts, clip, "sks", batch_size=1)
    t5, _ = metrics.clip_t_score(gen, prompts, clip, "sks", batch_size=5)
    assert t1 == pytest.approx(t5, abs=1e-6)


def test_tensor_batch_equals_pil(encoders):
    dino, _ = encoders
    imgs = random_images(3, seed=5)
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]).float() / 255
    assert torch.equal(metrics.dino_embed(batch, dino), metrics.dino_embed(imgs, dino))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.dino_embed(batch * 2 - 1, dino)


def test_clip_t_strips_identifier(encoders):
    _, clip = encoders
    assert metrics.strip_identifier("a sks dog on the grass", "sks") == "a dog on the grass"
    assert metrics.strip_identifier("sks, a <sks> dog with sksa", "<sks>") == "sks, a dog with sksa"
    imgs = random_images(2, seed=6)
    score, cleaned = metrics.clip_t_score(imgs, ["a sks dog on the grass", "a sks dog in the snow"], clip, identifier="sks")
    assert cleaned == ["a dog on the grass", "a dog in the snow"]
    assert score == metrics.clip_t_score(imgs, cleaned, clip)[0]
    assert score != pytest.approx(metrics.clip_t_score(imgs, ["a sks dog on the grass", "a sks dog in the snow"], clip)[0], abs=1e-6)
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.clip_t_score(imgs, ["a dog"], clip)


def test_div_lpips_and_labelled_fallback(encoders):
    dino, _ = encoders
    flat = [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 255, 51)]  # -1, 1, -0.6 in LPIPS range

    def fake_lpips(x, y):  # mean absolute difference: pairs 2.0, 0.4, 1.6
        return (x - y).abs().mean(dim=(1, 2, 3))

    assert metrics.div_score([flat], lpips_model=fake_lpips, batch_size=2) == (pytest.approx(4 / 3, abs=1e-6), metrics.DIV_LPIPS)
    value, name = metrics.div_score([flat, flat[:2]], dino=dino)
    assert name == metrics.DIV_DINO_FALLBACK != metrics.DIV_LPIPS
    per_prompt = [1 - metrics.mean_within_cosine(metrics.dino_embed(g, dino)) for g in (flat, flat[:2])]
    assert value == pytest.approx(np.mean(per_prompt), abs=1e-12)
    same = random_images(1, seed=7) * 3
    assert metrics.div_score([same], dino=dino)[0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="LPIPS"):
        metrics.div_score([flat])


def test_missing_model_says_how_to_provide_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        metrics.load_dino(str(tmp_path / "no" / "such" / "dino"), device="cpu")
    assert "save_pretrained" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="CLIP scores need real pretrained weights"):
        metrics.load_clip(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-dino"):
        metrics.load_dino("no-such-org/no-such-dino", device="cpu", local_files_only=True)
