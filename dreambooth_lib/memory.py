"""What fits on the device: the "auto" choices of gradient checkpointing, optimizer and class-image batch.

Each choice is a pure function of sizes (free device memory, parameter counts, batch, resolution), so
tests can ask what a 16 GB T4 or an 80 GB H100 would get. The training-step estimate is an upper bound:
every term at once (weights, fp32 grads, optimizer states, the half-precision weight copies autocast
keeps for backward, saved activations), although backward frees activations while it creates
gradients. Measured on an H200 for SD1.5 at 512 px, 1 + 1 images, fp16, 8-bit AdamW (peak allocated):
full fine-tune 10.00 GB without checkpointing (estimate 13.2), 9.54 GB with (estimate 11.4); LoRA r4
4.60 GB without (the calibration point of the activation constant below), 2.81 GB with.
"""

from __future__ import annotations

import math
import resource
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from accelerate import cpu_offload
from accelerate.hooks import remove_hook_from_module

GB = 1e9
HEADROOM = 0.9  # share of free memory an estimate may fill: the rest for fragmentation and cuDNN/cuBLAS workspaces
# Optimizer state bytes per trainable parameter: AdamW keeps m and v in fp32; 8-bit AdamW (bitsandbytes,
# torchao) keeps them in 8 bits with a scale per block (tensors under 4,096 elements stay 32-bit: biases, norms).
STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "adamw8bit-torchao": 2.0}
# Saved-activation bytes per "width unit" (see unet_width) per latent pixel per image per activation byte,
# from SD1.5 LoRA r4 on the H200: 2.46 GB without checkpointing, 0.66 GB with (peak minus the fp16
# weights' 2.13 GB), for 2 images of 64x64 latents in fp16 with unet_width 2,280; rounded up.
ACTIVATION_UNITS = {False: 66.0, True: 18.0}  # keyed by gradient checkpointing on/off


def unet_width(config: dict) -> float:
    """Activation size of one latent pixel of a diffusers UNet, in channel units: per resolution level,
    channels x (resnets + transformer layers), each level 4x fewer pixels. SD1.5: 2,280; SDXL: 3,360."""
    channels, kinds = config["block_out_channels"], config["down_block_types"]
    layers, depth = config["layers_per_block"], config.get("transformer_layers_per_block", 1)
    width = 0.0
    for i, (c, kind) in enumerate(zip(channels, kinds)):
        n = layers[i] if isinstance(layers, (list, tuple)) else layers
        t = depth[i] if isinstance(depth, (list, tuple)) else depth
        t = max(t) if isinstance(t, (list, tuple)) else t
        width += n * c * (1 + (t if "CrossAttn" in kind else 0)) / 4**i
    return width


def activation_bytes(unet_config: dict, images: int, resolution: int, dtype_bytes: int, checkpointing: bool,
                     vae_factor: int = 8) -> float:
    """Estimated bytes the UNet's forward keeps for backward at this batch and resolution."""
    latent_pixels = (resolution // vae_factor) ** 2
    return ACTIVATION_UNITS[checkpointing] * unet_width(unet_config) * latent_pixels * images * dtype_bytes


def step_bytes(weight_bytes: float, trainable_params: int, optimizer: str, activations: float,
               half_copy_bytes: int) -> float:
    """Upper bound of a training step's peak: weights + per trainable parameter (fp32 grad, optimizer
    states, the autocast half copy) + saved activations."""
    return weight_bytes + trainable_params * (4 + STATE_BYTES[optimizer] + half_copy_bytes) + activations


@dataclass
class MemoryPlan:
    gradient_checkpointing: bool
    optimizer: str  # "adamw", "adamw8bit" or "adamw8bit-torchao"
    reason: str  # what was chosen and why, for the log and summary.json
    estimated_peak_gb: float | None = None
    free_gb: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(free_bytes: float | None, weight_bytes: float, trainable_params: int, activations: dict[bool, float],
                half_copy_bytes: int = 0, gradient_checkpointing: bool | str = "auto",
                optimizer: str = "auto", eight_bit: bool = True) -> MemoryPlan:
    """Resolve "auto" gradient checkpointing and optimizer: the fastest combination whose estimate fits
    HEADROOM x free_bytes, in the order (AdamW, no checkpointing) > (8-bit, no checkpointing) >
    (AdamW, checkpointing) > (8-bit, checkpointing). Checkpointing costs ~1.9x per SD1.5 step, 8-bit
    AdamW far less, hence the order. Values the user fixed are kept.

    free_bytes: free device memory plus what the models already hold there (None: not CUDA);
    weight_bytes: the models' weights as they will sit on the device; activations: {checkpointing:
    bytes} (activation_bytes); half_copy_bytes: 2 under fp16/bf16 autocast, else 0. eight_bit=False:
    8-bit AdamW is no choice (FSDP: bitsandbytes cannot step sharded parameters), "auto" means AdamW.
    """
    fixed_ckpt = None if gradient_checkpointing == "auto" else bool(gradient_checkpointing)
    fixed_opt = None if optimizer == "auto" else optimizer
    cpu_default = "adamw8bit" if eight_bit else "adamw"
    if free_bytes is None:  # CPU: memory is the host's; keep the previous defaults (no checkpointing, 8-bit AdamW)
        return MemoryPlan(bool(fixed_ckpt), fixed_opt or cpu_default,
                          "not a CUDA device: " + ", ".join(
                              [f"checkpointing {'on' if fixed_ckpt else 'off'}" + (" (set)" if fixed_ckpt is not None else ""),
                               f"optimizer {fixed_opt or cpu_default}" + (" (set)" if fixed_opt else " (the CPU default)")]))
    budget = HEADROOM * free_bytes
    order = [(o, c) for o, c in [("adamw", False), ("adamw8bit", False), ("adamw", True), ("adamw8bit", True)]
             if eight_bit or o == "adamw"]
    candidates = [(fixed_opt or o, fixed_ckpt if fixed_ckpt is not None else c) for o, c in order]
    candidates = list(dict.fromkeys(candidates))  # fixed values collapse the order
    estimates = {c: step_bytes(weight_bytes, trainable_params, c[0], activations[c[1]], half_copy_bytes) for c in candidates}
    fitting = [c for c in candidates if estimates[c] <= budget]
    choice = fitting[0] if fitting else candidates[-1]
    est = estimates[choice]
    tried = "; ".join(f"{o}{' + checkpointing' if c else ''} {estimates[(o, c)] / GB:.1f} GB" for o, c in candidates)
    verdict = (f"fits {HEADROOM:.0%} of {free_bytes / GB:.1f} GB free" if fitting else
               f"NOTHING FITS {HEADROOM:.0%} of {free_bytes / GB:.1f} GB free: expect out-of-memory; lower "
               "resolution or train_batch_size, or use LoRA")
    reason = f"{choice[0]}, checkpointing {'on' if choice[1] else 'off'}: estimated peak {est / GB:.1f} GB {verdict} (estimates: {tried})"
    return MemoryPlan(choice[1], choice[0], reason, est / GB, free_bytes / GB)


# --- class images ---------------------------------------------------------------------------------

CLASS_BATCH_MAX = 32  # CUDA: past this, a bigger batch only delays the first finished image


def class_batch_size(free_bytes: float, unet_config: dict, resolution: int, dtype_bytes: int,
                     weight_bytes: float, guidance: bool = True, vae_factor: int = 8,
                     most: int = CLASS_BATCH_MAX, activation_bytes=activation_bytes) -> int:
    """Images per sampler call that fit HEADROOM x free_bytes, a power of two (or `most`), 1 to `most`.

    CUDA: free_bytes = free device memory + weight_bytes (the pipeline already placed), most =
    CLASS_BATCH_MAX. CPU: free_bytes = available RAM, weight_bytes = 0 (already counted as used), most =
    the images to make: a CPU sampler call has a fixed cost per step, so larger calls are faster (the toy
    model at 32 px, 2 busy cores: 0.7 img/s in calls of 4, 1.3 of 16, 1.4 of 48), and RAM is the limit.
    Per image: the UNet's inference working set, bounded by its checkpointed training activations
    (block inputs plus one block's temporaries), twice under classifier-free guidance; the VAE decodes
    one image at a time (vae slicing), so it does not grow with the batch. activation_bytes: the
    family's estimate (a transformer's: families/flux.py), called as this module's.
    """
    per_image = activation_bytes(unet_config, 2 if guidance else 1, resolution, dtype_bytes, True, vae_factor)
    fit = math.floor((HEADROOM * free_bytes - weight_bytes) / per_image)
    if fit < 1:
        return 1
    return most if fit >= most else 2 ** int(math.log2(fit))  # a power of two: stable kernels, even shards


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are stored (a 4-bit weight counts its packed bytes)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def fits_free_memory(device, nbytes: float) -> bool:
    """Whether nbytes more fit HEADROOM of the device's free memory now (always, off CUDA): what the driver has
    free plus what torch's caching allocator holds unused (a training step's activations, freed but kept)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return nbytes <= HEADROOM * (torch.cuda.mem_get_info(device)[0] + cached)


def to_be_streamed(encoder, home: torch.device, device) -> bool:
    """text_encoders_on's choice: an encoder away from `device` whose weights do not fit its free memory."""
    return home != torch.device(device) and not fits_free_memory(device, module_bytes(encoder))


@contextmanager
def text_encoders_on(encoders, device, log=None):
    """The text encoders on `device` for the block, then back where they were. Frozen ones wait on the CPU in
    training (prepare_models) and come for the prompt cache and the validation grids. One that does not fit
    the free memory beside what is there (T5-XXL's 9.5 GB next to a QLoRA run's 6.5 GB transformer on a 16 GB
    GPU) stays on the CPU and is streamed: accelerate's cpu_offload brings its weights to `device` layer by
    layer in each forward, and removing its hooks puts them back on the CPU. log: told which are streamed."""
    homes = [next(e.parameters()).device for e in encoders]
    streamed = []
    for encoder, home in zip(encoders, homes):
        if to_be_streamed(encoder, home, device):
            if log:
                log(f"text encoder {type(encoder).__name__} ({module_bytes(encoder) / 2**30:.1f} GB) does not fit "
                    f"the free memory of {device}: streamed layer by layer from the CPU")
            cpu_offload(encoder, execution_device=device)
            streamed.append(encoder)
        else:
            encoder.to(device)
    try:
        yield
    finally:
        for encoder, home in zip(encoders, homes):
            if any(encoder is e for e in streamed):
                remove_hook_from_module(encoder, recurse=True)  # its weights back from meta to the CPU
            else:
                encoder.to(home)


def pipeline_placement(part_bytes: dict[str, float], free_bytes: float) -> str:
    """How a sampling pipeline sits on a CUDA device with free_bytes free (plus what the pipeline already
    holds there): "device" when all its components fit HEADROOM of it; "model_offload" when only each one
    alone does (diffusers' enable_model_cpu_offload: the text encoders, the denoiser and the VAE take turns
    on the GPU; e.g. FLUX.1 with an NF4 transformer, 6.5 GB, and bf16 T5, 9.5 GB, on a 16 GB T4);
    "sequential_offload" when one component alone does not (layer by layer from the CPU: slow)."""
    budget = HEADROOM * free_bytes
    if sum(part_bytes.values()) <= budget:
        return "device"
    return "model_offload" if max(part_bytes.values()) <= budget else "sequential_offload"


def bytes_on_gpu(pipe) -> int:
    """What a pipeline's components already hold on a GPU (a quantized denoiser loads straight onto it)."""
    return sum(module_bytes(m) for m in pipe.components.values()
               if isinstance(m, torch.nn.Module) and any(p.is_cuda for p in m.parameters()))


def place_pipeline(pipe, denoiser, device, log=print, what: str = "sampling") -> int:
    """Put a sampling pipeline on `device` as pipeline_placement says for its free memory (class images,
    sample.load_pipeline); returns the bytes of weights that sit there while the denoiser runs (all of them,
    or the denoiser's alone). what: how the log names the use."""
    device = torch.device(device)
    parts = {name: module_bytes(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    if device.type != "cuda":
        pipe.to(device)
        return sum(parts.values())
    placement = pipeline_placement(parts, torch.cuda.mem_get_info(device)[0] + bytes_on_gpu(pipe))
    if placement == "device":
        pipe.to(device)
        return sum(parts.values())
    sizes = ", ".join(f"{name} {b / 1e9:.1f}" for name, b in parts.items())
    if placement == "model_offload":
        log(f"{what}: the pipeline's weights ({sizes} GB) do not fit the free GPU memory together: "
            "its parts take turns on the GPU (diffusers' model CPU offload)")
        pipe.enable_model_cpu_offload(device=device)
        return module_bytes(denoiser)
    log(f"{what}: {max(parts, key=parts.get)} alone does not fit the free GPU memory ({sizes} GB): sampling "
        "layer by layer from the CPU (diffusers' sequential offload), slowly. Faster: a 4-bit base (QLoRA, "
        "quantize_base='nf4': its class images and samples come from it), or a larger GPU")
    pipe.enable_sequential_cpu_offload(device=device)
    return 0


# --- dtypes and layouts ---------------------------------------------------------------------------

# Precision names of the config -> torch dtypes: mixed_precision says "no" for fp32, the rest "fp32".
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(precision: str) -> torch.dtype:
    return DTYPES[precision]


def bf16_hardware_warning(device) -> str | None:
    """A warning for bf16 on a CUDA GPU without bf16 units (compute capability < 8.0: T4, V100, RTX 20xx), else
    None. torch.cuda.is_bf16_supported() answers True there (it counts emulation), so nothing else says it."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"warning: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 units: "
            "bf16 runs emulated there, not at its fp16 speed. FLUX needs bf16 (fp16 overflows its activations); "
            "an Ampere or newer GPU (A100, L4, A10, RTX 30xx / 40xx) runs it natively")


def use_channels_last(setting: bool | str, device) -> bool:
    """channels_last resolved: "auto" = on CUDA (cuDNN's native layout), off elsewhere."""
    return torch.device(device).type == "cuda" if setting == "auto" else bool(setting)


def peak_memory() -> dict:
    """Peak tensor memory, and (CUDA) what the caching allocator reserved: the part nvidia-smi shows."""
    if torch.cuda.is_available():
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "memory": "cuda max_memory_allocated",
                "peak_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory": "process peak RSS",
            "peak_memory_reserved_mb": None}
