"""LoRA export for other tools: the kohya key format that AUTOMATIC1111, ComfyUI, kohya's sd-scripts,
SD.Next and InvokeAI load.

    python -m dreambooth_lib export-lora runs/dog --format kohya     # -> runs/dog/dog_kohya.safetensors

The keys are converted by diffusers' own utilities (`convert_unet_state_dict_to_peft`,
`convert_state_dict_to_peft`, `convert_state_dict_to_kohya`), the same ones its training scripts use,
for every component in the file (unet, text_encoder, text_encoder_2), so SD 1.x/2.x and SDXL LoRAs
go through one path. Two things diffusers' converter does not know, and we add:
- the alphas: it writes alpha = rank, but an adapter trained with another lora_alpha has the scale
  alpha / rank, which the file's LoraConfig metadata records (weights.save_weights writes it);
- the text encoders' `text_model.` level: transformers >= 5 dropped it from CLIPTextModel's module
  names, while kohya names (lora_te1_text_model_encoder_layers_0_...) come from the classic layout
  (diffusers strips it again when it loads such a file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors.torch import save_file

from .errors import InputError
from .fsio import publish
from .weights import LORA_WEIGHTS

FORMATS = ("kohya",)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def read_lora(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """(file, state dict, LoraConfig metadata by component) of a run folder, checkpoint or LoRA file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: pass the output_dir (or checkpoint-N folder) of a LoRA run")
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        hint = (" It holds a full fine-tune (unet/ folder), a diffusers pipeline: load it with from_pretrained; "
                "only LoRA runs (use_lora=True) export to LoRA formats." if (path / "unet").is_dir() else
                " Pass the output_dir (or checkpoint-N folder) of a LoRA run, or its .safetensors file.")
        raise InputError(f"{path} has no LoRA weights ({file.name} not found).{hint}")
    state, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(file.parent), weight_name=file.name, return_lora_metadata=True)
    if network_alphas is not None:  # diffusers converted it on reading: a kohya / A1111 file already
        raise InputError(f"{file} is already in the kohya / A1111 format: nothing to export")
    if not any(".lora" in k for k in state):
        raise InputError(f"{file} holds no LoRA tensors (no '.lora' keys): is it a LoRA file written by train?")
    components = {}
    for key, value in (metadata or {}).items():  # "unet.lora_alpha" -> components["unet"]["lora_alpha"]
        component, _, field = key.partition(".")
        components.setdefault(component, {})[field] = value
    return file, state, components


def to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our file's keys (unet '.lora.down', text encoders '.lora_linear_layer.down') -> peft's lora_A / lora_B,
    with diffusers' converters; text encoder keys get the classic `text_model.` level back."""
    peft = convert_unet_state_dict_to_peft(state)
    if any("lora_linear_layer" in k for k in peft):
        peft = convert_state_dict_to_peft(peft)
    out = {}
    for key, value in peft.items():
        component, _, rest = key.partition(".")
        if component in TEXT_ENCODERS and not rest.startswith(("text_model.", "text_projection.")):
            key = f"{component}.text_model.{rest}"
        out[key] = value
    return out


def to_kohya(state: dict[str, torch.Tensor], configs: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """LoRA state dict (our file's keys) -> kohya keys `lora_unet_..`, `lora_te1_..`, `lora_te2_..` with
    `.lora_down.weight`, `.lora_up.weight` and `.alpha`. configs: LoraConfig fields per component (the
    file's metadata); without them alpha = rank, which is also what diffusers assumes when loading."""
    configs = configs or {}
    for component, config in configs.items():
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise InputError(f"the {component} LoRA has per-layer ranks or alphas (rank_pattern / alpha_pattern), "
                             "which this export does not map: export with diffusers' own tools")
    kohya = convert_state_dict_to_kohya(to_peft(state))
    prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        component = next(c for p, c in prefixes.items() if key.startswith(p))
        rank = kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
        config = configs.get(component, {})
        # The scale alpha / r must survive: kohya's loaders scale by alpha / (this layer's rank).
        alpha = config.get("lora_alpha", rank) * rank / config.get("r", rank)
        kohya[key] = torch.tensor(float(alpha))
    return kohya


def export_lora(path: str | Path, out: str | Path | None = None, format: str = "kohya") -> Path:
    """Write the LoRA of a run folder / checkpoint / file in `format`; returns the new file.
    Default out: <folder>/<folder name>_kohya.safetensors (not a name load_lora_weights(folder) picks)."""
    if format not in FORMATS:
        raise InputError(f"format {format!r}: use one of {FORMATS}")
    file, state, configs = read_lora(path)
    kohya = to_kohya(state, configs)
    out = Path(out) if out else file.parent / f"{file.parent.resolve().name}_{format}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}  # kohya's own header, for the tools' info panels
    ranks = {int(v.shape[0]) for k, v in kohya.items() if k.endswith("lora_down.weight")}
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    if len(ranks) == len(alphas) == 1:
        metadata |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": f"{alphas.pop():g}"}
    tmp = out.with_name(f".tmp-{out.name}")
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp, metadata=metadata)
    publish(tmp, out)
    return out
