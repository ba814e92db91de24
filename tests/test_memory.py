"""memory.py: the "auto" checkpointing / optimizer / class-batch decisions for given device sizes (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from dreambooth_lib import memory

GB = 1e9
# Stable Diffusion 1.5 (stable-diffusion-v1-5 configs): parameter counts and the UNet config keys the estimate reads.
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, transformer_layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))
UNET, TEXT, VAE, LORA4 = 859_520_964, 123_060_480, 83_653_863, 797_184
T4, GPU24, GPU80 = 15.0 * GB, 23.0 * GB, 79.0 * GB  # free memory after the CUDA context


def sd15_plan(free, method="full", images=2, resolution=512, unet_config=SD15_UNET, **fixed) -> memory.MemoryPlan:
    """Plan for SD1.5 at fp16 mixed precision, as train.memory_plan sizes it."""
    if method == "full":  # trained UNet in fp32, frozen text encoder and VAE in fp16
        weights, trainable = UNET * 4 + (TEXT + VAE) * 2, UNET
    else:  # LoRA: everything frozen in fp16, adapters in fp32
        weights, trainable = (UNET + TEXT + VAE) * 2 + LORA4 * 4, LORA4
    acts = {c: memory.activation_bytes(unet_config, images, resolution, 2, c) for c in (False, True)}
    return memory.plan_memory(free, weights, trainable, acts, half_copy_bytes=2, **fixed)


def test_unet_width_counts_channels_and_layers_per_level():
    # 2 resnets x (320 x 2 + 640 x 2 / 4 + 1280 x 2 / 16 + 1280 / 64), the last level without attention
    assert memory.unet_width(SD15_UNET) == 2 * (640 + 320 + 160 + 20) == 2280
    assert memory.unet_width(SDXL_UNET) == 2 * (320 + 640 * 3 / 4 + 1280 * 11 / 16) == 3360
    # linear in images and latent pixels, 2x in fp32
    one = memory.activation_bytes(SD15_UNET, 1, 512, 2, False)
    assert memory.activation_bytes(SD15_UNET, 2, 1024, 4, False) == pytest.approx(16 * one)


def test_estimates_bound_the_h200_measurements_from_above_and_not_by_much():
    # measured peak allocated, SD1.5 512 px, 1 + 1 images, fp16, 8-bit AdamW (shared/measurements/gpu-h200-2026-11-27)
    cases = [("full", False, 10.00), ("full", True, 9.54), ("lora", False, 4.60), ("lora", True, 2.81)]
    for method, ckpt, measured in cases:
        plan = sd15_plan(1000 * GB, method, gradient_checkpointing=ckpt, optimizer="adamw8bit")
        assert measured <= plan.estimated_peak_gb <= 1.35 * measured, (method, ckpt, plan.reason)


def test_auto_on_a_16gb_t4_24gb_and_80gb_card():
    t4, mid, big = sd15_plan(T4), sd15_plan(GPU24), sd15_plan(GPU80)
    # T4: AdamW's fp32 states (6.9 GB) do not fit beside the weights and grads; 8-bit without checkpointing does
    # (estimate 13.2 GB <= 90 % of 15 GB; measured 10.0 GB on the H200).
    assert (t4.optimizer, t4.gradient_checkpointing) == ("adamw8bit", False) and t4.estimated_peak_gb <= 0.9 * 15
    assert (mid.optimizer, mid.gradient_checkpointing) == ("adamw", False) and mid.estimated_peak_gb == pytest.approx(18.35, abs=0.01)
    assert (big.optimizer, big.gradient_checkpointing) == ("adamw", False)
    assert "adamw, checkpointing off" in mid.reason and "fits 90% of 23.0 GB free" in mid.reason
    # 2 + 2 images on the T4: only 8-bit with checkpointing fits; LoRA fits anywhere without either.
    t4_batch2 = sd15_plan(T4, images=4)
    assert (t4_batch2.optimizer, t4_batch2.gradient_checkpointing) == ("adamw8bit", True)
    lora = sd15_plan(T4, "lora")
    assert (lora.optimizer, lora.gradient_checkpointing) == ("adamw", False) and lora.estimated_peak_gb < 5


def test_fixed_values_are_kept_and_a_misfit_is_said_plainly():
    forced = sd15_plan(T4, images=4, gradient_checkpointing=False)
    assert (forced.optimizer, forced.gradient_checkpointing) == ("adamw8bit", False)  # the cheaper optimizer, as set
    assert "NOTHING FITS" in forced.reason
    ckpt_on = sd15_plan(GPU80, gradient_checkpointing=True)
    assert (ckpt_on.optimizer, ckpt_on.gradient_checkpointing) == ("adamw", True)
    assert sd15_plan(GPU80, optimizer="adamw8bit").optimizer == "adamw8bit"
    xl = sd15_plan(T4, resolution=1024, unet_config=SDXL_UNET)  # SDXL-sized activations on a T4 (full fine-tune)
    assert (xl.optimizer, xl.gradient_checkpointing) == ("adamw8bit", True) and "NOTHING FITS" in xl.reason


def test_cpu_keeps_the_previous_defaults():
    cpu = memory.plan_memory(None, 1e6, 1000, {False: 1e6, True: 1e5})
    assert (cpu.optimizer, cpu.gradient_checkpointing, cpu.estimated_peak_gb) == ("adamw8bit", False, None)
    assert "not a CUDA device" in cpu.reason
    assert memory.plan_memory(None, 1, 1, {False: 1, True: 1}, gradient_checkpointing=True, optimizer="adamw").to_dict()[
        "optimizer"] == "adamw"


def test_class_batch_size_from_free_memory():
    weights = (UNET + TEXT + VAE) * 2  # fp16 pipeline
    per_t4 = memory.class_batch_size(T4, SD15_UNET, 512, 2, weights)
    assert per_t4 == 16  # (13.5 - 2.1 GB) / 0.67 GB per image (2 UNet rows under guidance) = 16.9 -> 16
    assert memory.class_batch_size(GPU24, SD15_UNET, 512, 2, weights) == 16
    assert memory.class_batch_size(GPU80, SD15_UNET, 512, 2, weights) == memory.CLASS_BATCH_MAX == 32
    # CPU: available RAM, the weights already counted as used, at most the images to make; fp32 there.
    assert memory.class_batch_size(16 * GB, SD15_UNET, 512, 4, 0, most=200) == 8  # 14.4 GB / 1.35 GB per image = 10.7
    assert memory.class_batch_size(16 * GB, SD15_UNET, 64, 4, 0, most=200) == 200  # 64 px: every image in one call
    assert memory.class_batch_size(16 * GB, SD15_UNET, 64, 4, 0, most=3) == 3
    assert memory.class_batch_size(3 * GB, SD15_UNET, 512, 2, weights) == 1  # barely room for the weights: 1, not 0


def test_bf16_on_a_gpu_without_bf16_units_is_named_as_emulated(monkeypatch):
    # torch.cuda.is_bf16_supported() is True on a T4 (it counts emulation): the capability decides
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    warning = memory.bf16_hardware_warning("cuda:0")
    assert "Tesla T4 (compute capability 7.5) has no bf16 units" in warning and "FLUX needs bf16" in warning
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # L4
    assert memory.bf16_hardware_warning("cuda:0") is None
    assert memory.bf16_hardware_warning("cpu") is None


def test_a_pipeline_that_fits_only_part_by_part_takes_turns_on_the_gpu(monkeypatch):
    t4 = 15.0 * GB  # a free Colab T4
    sd15 = {"unet": 1.72 * GB, "text_encoder": 0.25 * GB, "vae": 0.17 * GB}  # fp16
    flux_nf4 = {"transformer": 6.5 * GB, "text_encoder_2": 9.5 * GB, "text_encoder": 0.25 * GB, "vae": 0.17 * GB}
    flux_bf16 = {**flux_nf4, "transformer": 23.8 * GB}
    assert memory.pipeline_placement(sd15, t4) == "device"
    assert memory.pipeline_placement(flux_nf4, t4) == "model_offload"
    assert memory.pipeline_placement(flux_bf16, t4) == "sequential_offload"
    assert memory.pipeline_placement(flux_bf16, 40 * GB) == "device"

    class Pipe:  # what place_pipeline uses of a diffusers pipeline; records which placement it was given
        def __init__(self, sizes):
            self.components = {name: torch.nn.Linear(n, 1, bias=False) for name, n in sizes.items()}
            self.placed = None

        def to(self, device):
            self.placed = "device"

        def enable_model_cpu_offload(self, device):
            self.placed = "model_offload"

        def enable_sequential_cpu_offload(self, device):
            self.placed = "sequential_offload"

    # parameter counts as bytes / 4 (fp32 Linear weights): the FLUX NF4 shape of sizes, scaled to a 15-byte "T4"
    pipe = Pipe({"transformer": 650, "text_encoder_2": 950, "vae": 17})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15_00 * 4, 16_00 * 4))
    lines = []
    resident = memory.place_pipeline(pipe, pipe.components["transformer"], torch.device("cuda"), lines.append)
    assert pipe.placed == "model_offload" and resident == 650 * 4  # the denoiser alone is there while it runs
    assert "take turns on the GPU" in lines[0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30_00 * 4, 32_00 * 4))
    assert memory.place_pipeline(pipe, pipe.components["transformer"], torch.device("cuda"), lines.append) == 1617 * 4
    assert pipe.placed == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5_00 * 4, 16_00 * 4))
    memory.place_pipeline(pipe, pipe.components["transformer"], torch.device("cuda"), lines.append)
    assert pipe.placed == "sequential_offload" and "text_encoder_2 alone does not fit" in lines[-1]


def test_fits_free_memory_reads_the_device_now(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GB, 16 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * GB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * GB)
    assert memory.fits_free_memory("cuda:0", 8.9 * GB) and not memory.fits_free_memory("cuda:0", 9.5 * GB)  # T5-XXL
    # 2 GB that torch holds unused (the last step's activations) count as free
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * GB)
    assert memory.fits_free_memory("cuda:0", 9.5 * GB)
    assert memory.fits_free_memory("cpu", 1e15)
