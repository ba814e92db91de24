"""Tiny models of the supported architectures (SD 1.x, SDXL, FLUX.1, FLUX.2 [klein]) built in-process (no hub access).

Tests, notebooks and benchmarks use them to exercise exactly the code path users take with
Stable Diffusion: the components are saved as a diffusers pipeline folder and loaded back with
`from_pretrained`. Weights are random: these models prove plumbing, never image quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

# Words of the tiny tokenizer's vocabulary: enough for every prompt the tests write.
TINY_WORDS = (
    "a photo of an the in on with at dog cat star ball mug sks zwx vqp red blue green "
    "grass snow beach night water brick wall pencil sketch painting style"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (vocab entries are written in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(words: list[str], folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIPTokenizer-compatible vocab.json + merges.txt in which each word is one token.

    Every byte (and its end-of-word form) is in the vocabulary, so any text still tokenizes;
    the merges build each listed word left to right.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in dict.fromkeys(words):  # ordered, unique
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(left + right)
            left = left + right
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    (folder / "vocab.json").write_text(json.dumps(vocab_ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_vae(sample_size: int, **config) -> AutoencoderKL:
    """A 2-level AutoencoderKL (2x downsampling, 4 latent channels) for images of 2 * sample_size pixels."""
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=4, sample_size=sample_size * 2, **config)


def tiny_unet(sample_size: int, **config) -> UNet2DConditionModel:
    """A 2-level UNet2DConditionModel on 4 latent channels (widths 8, 16); config: blocks and conditioning."""
    return UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, attention_head_dim=4, norm_num_groups=4, **config)


def build_tiny_components(
    seed: int = 0,
    sample_size: int = 16,
    tokenizer_dir: str | Path | None = None,
    prediction_type: str = "epsilon",
) -> dict:
    """Random tiny UNet/VAE/CLIP text encoder with SD's architecture (8x downsampling off: 2x)."""
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
    vae = tiny_vae(sample_size)
    if tokenizer_dir is None:
        raise ValueError("build_tiny_components needs tokenizer_dir (write_clip_tokenizer writes one)")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_pipeline(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16) -> Path:
    """Build a tiny random SD pipeline and save it as a diffusers folder; returns the folder.

    Load it with `StableDiffusionPipeline.from_pretrained(folder)`, like any SD checkpoint.
    Images are 2 * sample_size pixels wide.
    """
    folder = Path(folder)
    tok_dir = folder / "tokenizer"
    write_clip_tokenizer(TINY_WORDS, tok_dir, model_max_length=16)
    parts = build_tiny_components(seed=seed, sample_size=sample_size, tokenizer_dir=tok_dir, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl_components(seed: int = 0, sample_size: int = 16, tokenizer_dir: str | Path | None = None) -> dict:
    """Random tiny SDXL: two CLIP text encoders (the second with a projection), a UNet whose added
    "text_time" embedding takes the pooled text embedding + 6 size/crop numbers, a 2x VAE."""
    if tokenizer_dir is None:
        raise ValueError("build_tiny_sdxl_components needs tokenizer_dir (write_clip_tokenizer writes one)")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")  # SDXL's second pads with "!"
    hidden, hidden_2, projection, time_dim = 16, 24, 20, 8

    def text_config(hidden_size, **kw):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=32,
                              num_attention_heads=2, num_hidden_layers=3, max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **kw)

    text_encoder = CLIPTextModel(text_config(hidden))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(hidden_2, projection_dim=projection))
    unet = tiny_unet(
        sample_size,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at the top level
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden + hidden_2,  # both encoders' hidden states, concatenated
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    vae = tiny_vae(sample_size, scaling_factor=0.13025,  # SDXL's
                   force_upcast=True)  # SDXL's VAE config: fp16 overflows, pipelines decode in fp32
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_tiny_sdxl_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    """Build a tiny random SDXL pipeline and save it as a diffusers folder (StableDiffusionXLPipeline);
    images are 2 * sample_size pixels wide."""
    folder = Path(folder)
    tok_dir = folder / "tokenizer"
    write_clip_tokenizer(TINY_WORDS, tok_dir, model_max_length=16)
    parts = build_tiny_sdxl_components(seed=seed, sample_size=sample_size, tokenizer_dir=tok_dir)
    StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def write_t5_tokenizer(words: list[str], folder: str | Path) -> T5Tokenizer:
    """A T5 (sentencepiece-unigram) tokenizer whose vocabulary is each word as one piece, plus every
    letter and digit so any text tokenizes; written with save_pretrained (tokenizer.json)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def build_tiny_flux_components(seed: int = 0, tokenizer_dir: str | Path | None = None,
                               t5_tokenizer_dir: str | Path | None = None, guidance_embeds: bool = True,
                               width: int = 32, latent_channels: int = 4) -> dict:
    """Random tiny FLUX.1: a FluxTransformer2DModel (one double- and one single-stream block, 2x2 patches
    of 4 latent channels: in_channels 16), CLIP (pooled text, 32 wide) and T5 (sequence, 32 wide) from
    explicit configs, an 8x VAE with FLUX's scaling and shift factors, FLUX.1's flow-matching scheduler.
    guidance_embeds: [dev] (distilled guidance input) or, False, [schnell]. width=64, latent_channels=16
    (FLUX.1's): every Linear input of the transformer a multiple of 64, the block size bitsandbytes'
    4-bit CPU kernels need (QLoRA tests)."""
    if tokenizer_dir is None or t5_tokenizer_dir is None:
        raise ValueError("build_tiny_flux_components needs tokenizer_dir and t5_tokenizer_dir (write_clip_tokenizer, "
                         "write_t5_tokenizer)")
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir), T5Tokenizer.from_pretrained(t5_tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(d_model=width, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                             relative_attention_num_buckets=8, vocab_size=len(tokenizer_2),
                                             pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=width // 16, joint_attention_dim=width,
                                         pooled_projection_dim=width, guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's factors
    # FLUX.1 [dev]: shift computed per image size at sampling (dynamic); [schnell]: none.
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_tiny_flux_pipeline(folder: str | Path, seed: int = 0, guidance_embeds: bool = True, width: int = 32,
                            latent_channels: int = 4) -> Path:
    """Build a tiny random FLUX.1 [dev] (guidance_embeds=False: [schnell]) pipeline and save it as a
    diffusers folder (FluxPipeline.from_pretrained loads it); its VAE downsamples 8x, so sides are
    multiples of 16 (2x2 latent patches). width / latent_channels: build_tiny_flux_components."""
    folder = Path(folder)
    write_clip_tokenizer(TINY_WORDS, folder / "tokenizer", model_max_length=16)
    write_t5_tokenizer(TINY_WORDS, folder / "tokenizer_2")
    parts = build_tiny_flux_components(seed, folder / "tokenizer", folder / "tokenizer_2", guidance_embeds, width,
                                       latent_channels)
    FluxPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


# Qwen3's chat template as Flux2KleinPipeline uses it (one user turn, generation prompt, thinking off):
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n".
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token: merge the lowest-ranked adjacent pair until none is in `ranks`."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), k) for k, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, k = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:k] + [pieces[k] + pieces[k + 1]] + pieces[k + 2:]
    return pieces


def write_qwen_tokenizer(words: list[str], folder: str | Path, model_max_length: int = 512) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer (byte-level BPE, as GPT-2's: vocab.json + merges.txt, no end-of-word marks) in which
    each word, alone and with its leading space ("Ġ"), is one token; Qwen's chat special tokens and a chat
    template (whose "user" / "assistant" are words too). Each word's merges join the pieces the merges before
    it leave, so earlier words keep their one-token spelling (BPE applies the lowest rank first).
    model_max_length: the text length the model was trained with (families pad prompts to at most this)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    space = bytes_to_unicode()[ord(" ")]
    vocab: list[str] = list(bytes_to_unicode().values())
    ranks: dict[tuple[str, str], int] = {}
    # the chat template's words first: the rare-token identifier picker scans from the highest ids, where `words`
    # ends (pieces of "assistant" such as "Ġass" would otherwise be the rarest whole-word tokens)
    for word in dict.fromkeys(w for word in ("user", "assistant", *words) for w in (word, space + word)):
        pieces = _bpe(list(word), ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab_ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab + QWEN_SPECIAL_TOKENS))}
    (folder / "vocab.json").write_text(json.dumps(vocab_ids))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in ranks) + "\n")
    tokenizer = Qwen2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                               additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], model_max_length=model_max_length)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return Qwen2Tokenizer.from_pretrained(folder)


def build_tiny_flux2_components(seed: int = 0, tokenizer_dir: str | Path | None = None, latent_channels: int = 4,
                                width: int = 32) -> dict:
    """Random tiny FLUX.2 [klein]: a Flux2Transformer2DModel (one double- and one single-stream block, 32 wide,
    no guidance embedding as [klein]), a 28-layer Qwen3 (16 wide: the pipeline reads hidden states 9, 18 and
    27, so its text is 3 x 16 = 48 wide), an 8x AutoencoderKLFlux2 whose latent batch-norm statistics are set
    (random, not the identity, so tests see the normalisation), FLUX.2's flow-matching scheduler.
    width=64, latent_channels=16: every transformer Linear input a multiple of 64 (Qwen3 64 wide, text 192,
    time embedding 64), what bitsandbytes' 4-bit CPU kernels take (QLoRA tests)."""
    if tokenizer_dir is None:
        raise ValueError("build_tiny_flux2_components needs tokenizer_dir (write_qwen_tokenizer writes one)")
    torch.manual_seed(seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir)
    text_width = 16 if width == 32 else width
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=width // 16,
                                          joint_attention_dim=3 * text_width, timestep_guidance_channels=text_width,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), latent_channels=latent_channels, norm_num_groups=4,
                             sample_size=32)
    vae.bn.running_mean.copy_(0.3 * torch.randn(4 * latent_channels))  # the 2x2-patchified latents' statistics
    vae.bn.running_var.copy_(0.5 + torch.rand(4 * latent_channels))
    # The pipeline computes its own mu per image size and step count (compute_empirical_mu): dynamic shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_flux2_pipeline(folder: str | Path, seed: int = 0, is_distilled: bool = False, width: int = 32,
                             latent_channels: int = 4) -> Path:
    """Build a tiny random FLUX.2 [klein] pipeline (is_distilled: the step-distilled [klein], which ignores
    guidance; False: [klein] base, classifier-free guidance) and save it as a diffusers folder
    (Flux2KleinPipeline.from_pretrained loads it); sides are multiples of 16 (8x VAE, 2x2 patches)."""
    folder = Path(folder)
    write_qwen_tokenizer(TINY_WORDS, folder / "tokenizer")
    parts = build_tiny_flux2_components(seed, folder / "tokenizer", latent_channels, width)
    Flux2KleinPipeline(**parts, is_distilled=is_distilled).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_dino(folder: str | Path) -> str | Path:
    """Random ViT-architecture 'DINO' + its image processor, as a save_pretrained folder."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str | Path) -> str | Path:
    """Random CLIP (text + vision towers), image processor and tokenizer in one folder."""
    tok = write_clip_tokenizer(TINY_WORDS, folder)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
