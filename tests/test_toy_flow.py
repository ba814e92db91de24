"""The toy flow model (FLUX.2 [klein] architecture): its tokenizer, its VAE moved over from the toy SD model,
its pretraining, and the text length its tokenizer declares, used in training and by the stock pipeline."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, Flux2KleinPipeline

from dreambooth_lib import families
from dreambooth_lib.config import TOY_FLOW_MODEL_DIR, TOY_MODEL_DIR
from dreambooth_lib.families import flux2
from dreambooth_lib.tiny import write_qwen_tokenizer
from dreambooth_lib.toyworld import render
from dreambooth_lib.toyworld.pretrain import to_tensor
from dreambooth_lib.toyworld.tokenizer import all_captions, caption_words


def test_qwen_tokenizer_makes_every_word_one_token_with_or_without_its_space(tmp_path):
    words = caption_words()
    tokenizer = write_qwen_tokenizer(words, tmp_path / "tok", model_max_length=32)
    for word in words + ["user", "assistant"]:
        assert len(tokenizer(word).input_ids) == 1 and len(tokenizer(" " + word).input_ids) == 1, word
    assert tokenizer.model_max_length == 32
    longest = max(all_captions(), key=lambda c: len(c.split()))
    text = tokenizer.apply_chat_template([{"role": "user", "content": longest}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert len(tokenizer(text).input_ids) <= 32  # pretrain_flow.TEXT_LENGTH holds every caption in the template


def test_flux2_vae_from_the_sd_vae_decodes_and_encodes_the_same():
    from dreambooth_lib.toyworld.pretrain_flow import flux2_vae_from

    source = AutoencoderKL.from_pretrained(Path(TOY_MODEL_DIR) / "vae").eval()
    vae = flux2_vae_from(Path(TOY_MODEL_DIR) / "vae")
    pixels = to_tensor(np.stack([np.asarray(render.render(s, 1)) for s in render.subject_specs("marked_star")[:2]]))
    with torch.no_grad():
        z = source.encode(pixels).latent_dist.mode()
        assert torch.equal(vae.encode(pixels).latent_dist.mode(), z)
        assert torch.equal(vae.decode(z).sample, source.decode(z).sample)


def test_the_tokenizers_length_pads_prompts_in_training_and_in_the_stock_pipeline(tmp_path):
    """A model whose tokenizer declares 32 tokens: the family encodes 32 whatever max_sequence_length asks
    (512 by default), and the pipeline, called with sampling_kwargs, builds the same text conditioning."""
    from dreambooth_lib.tiny import TINY_WORDS, build_tiny_flux2_components

    write_qwen_tokenizer(TINY_WORDS, tmp_path / "tok", model_max_length=32)
    parts = build_tiny_flux2_components(0, tmp_path / "tok")
    pipe = Flux2KleinPipeline(**parts)
    assert flux2.sampling_kwargs(pipe) == {"max_sequence_length": 32}
    ours = flux2.encode_prompts((parts["tokenizer"],), (parts["text_encoder"],), ["a photo of sks dog"],
                                SimpleNamespace(max_sequence_length=512))["encoder_hidden_states"]
    theirs, _ = pipe.encode_prompt(prompt=["a photo of sks dog"], **flux2.sampling_kwargs(pipe))
    assert ours.shape[1] == 32 and torch.equal(ours, theirs)
    # a tokenizer declaring 512 (as Qwen3's): the requested length, as before
    write_qwen_tokenizer(TINY_WORDS, tmp_path / "tok512")
    parts = build_tiny_flux2_components(0, tmp_path / "tok512")
    assert flux2.sampling_kwargs(Flux2KleinPipeline(**parts)) == {"max_sequence_length": 512}
    assert families.get("sd").sampling_kwargs(None) == {}


def test_a_fresh_toy_qwen3_keeps_each_word_distinct_in_the_layers_the_transformer_reads(tmp_path):
    """The word embeddings start N(0, 1): swapping the class word moves that word's hidden state in each stacked
    layer (9, 18, 27) by more than a token's mean norm. The LM init N(0, 0.02) gave 0.65, 0.45, 0.37 of it,
    shrinking with depth (the first model, whose class words stayed nearly indistinct after pretraining)."""
    from dreambooth_lib.toyworld.pretrain_flow import TEXT_LENGTH, TEXT_WIDTH, build_text_encoder, build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    qwen = build_text_encoder(tokenizer, seed=0)
    with torch.no_grad():
        hidden = flux2.encode_prompts((tokenizer,), (qwen,), ["a photo of a star", "a photo of a cube"],
                                      SimpleNamespace(max_sequence_length=TEXT_LENGTH))["encoder_hidden_states"]
    for k, layer in enumerate(flux2.TEXT_LAYERS):
        part = hidden[..., k * TEXT_WIDTH:(k + 1) * TEXT_WIDTH]
        moved = (part[0] - part[1]).norm(dim=-1)
        assert moved[:7].max() == 0  # the chat template's start and "a photo of a": causal, unchanged
        assert moved.max() > part[0].norm(dim=-1).mean(), (layer, moved.max(), part[0].norm(dim=-1).mean())


def test_pretraining_writes_a_klein_pipeline_that_samples_at_the_toy_size(tmp_path):
    from dreambooth_lib.sample import generate, load_pipeline
    from dreambooth_lib.toyworld.pretrain_flow import pretrain_flow

    out = tmp_path / "model"
    log = pretrain_flow(out=out, num_images=32, steps=2, batch_size=4, images_dir=tmp_path, log=lambda *_: None)
    assert log["steps_done"] == 2 and families.detect(str(out)) == "flux2"
    # the committed log names the VAE's source inside the checkout, not this machine's folder
    assert log["vae"].startswith("data/toy_model/vae ")
    pipe = load_pipeline(str(out))
    vae = pipe.vae
    # bn holds the patchified latents' statistics: normalised latents of the same pictures have mean ~0, var ~1
    pixels, _ = render.render_dataset(32, seed=2)
    z = flux2.encode_latents(vae, to_tensor(pixels), None)
    # (var a little under 1: the pipeline divides by sqrt(var + batch_norm_eps), eps = 1e-4)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (z.var(dim=(0, 2, 3)) - 1).abs().max() < 5e-3
    images = generate(pipe, "a photo of a star", [0, 1], 4.0, 2, progress=False, resolution=render.SIZE)
    assert images[0].size == (render.SIZE, render.SIZE)
    # a second cycle keeps the tokenizer and VAE, continues the weights, and logs the first cycle
    again = pretrain_flow(out=tmp_path / "cycle2", init=out, seed=1, num_images=32, steps=1, batch_size=4,
                          images_dir=tmp_path, log=lambda *_: None)
    assert [c["steps_done"] for c in again["earlier_cycles"]] == [2] and again["init"] == str(out)
    for kept in ("vae/diffusion_pytorch_model.safetensors", "vae/config.json", "transformer/config.json",
                 "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json"):
        assert (tmp_path / "cycle2" / kept).read_bytes() == (out / kept).read_bytes(), kept


@pytest.mark.skipif(not (Path(TOY_FLOW_MODEL_DIR) / "model_index.json").is_file(), reason="no data/toy_flow_model")
def test_committed_flow_model_follows_the_prompted_class_context_and_colour():
    """What the committed flow model does (base-eval: class 0.92, colour 0.96, context and style 1.00:
    docs/toy_world.md). The first model fails the cube check: 0 cubes of 8."""
    from dreambooth_lib.sample import generate, load_pipeline
    from dreambooth_lib.toyworld.oracle import load_oracle

    prompts = ["a photo of a star in the snow", "a photo of a blue star at night", "a photo of a cube on the beach",
               "a photo of a heart on the beach"]
    images = generate(load_pipeline(TOY_FLOW_MODEL_DIR), [p for p in prompts for _ in range(8)], list(range(8)) * 4,
                      4.0, 20, batch_size=32, progress=False, resolution=render.SIZE)
    predicted = load_oracle().predict(images)
    assert sum(p["context"] == "snow" for p in predicted[:8]) >= 6, predicted[:8]
    assert sum(p["context"] == "night" and p["colour"] == "blue" for p in predicted[8:16]) >= 6, predicted[8:16]
    for cls, chunk in (("cube", predicted[16:24]), ("heart", predicted[24:])):
        assert sum(p["class"] == cls and p["context"] == "beach" for p in chunk) >= 5, [p["class"] for p in chunk]


def test_the_identifier_picker_finds_a_never_seen_token_in_the_flow_tokenizer(tmp_path):
    """Not a piece of the chat template ("Ġass" of "assistant" once was the rarest whole-word token)."""
    from dreambooth_lib.data import resolve_identifier
    from dreambooth_lib.toyworld.pretrain_flow import build_tokenizer
    from dreambooth_lib.toyworld.tokenizer import rare_tokens

    identifier = resolve_identifier(build_tokenizer(tmp_path / "tok"), None, log=lambda *_: None)
    assert identifier in rare_tokens(set(caption_words()))
