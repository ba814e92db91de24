"""LoRA export for other tools: the kohya key format that AUTOMATIC1111, ComfyUI, kohya's sd-scripts,
SD.Next and InvokeAI load (FLUX.1: the sd-scripts names Forge and sd-scripts load; ComfyUI also reads
our FLUX file as it is, `transformer.*` keys).

    python -m dreambooth_lib export-lora runs/dog --format kohya     # -> runs/dog/dog_kohya.safetensors

From a run folder (or checkpoint-N), the file's kohya header also names the base model and the trigger
words ([V] and the class noun) that the run's summary.json records, for the tools' info panels.

The keys are converted by diffusers' own utilities (`convert_unet_state_dict_to_peft`,
`convert_state_dict_to_peft`, `convert_state_dict_to_kohya`), the same ones its training scripts use,
for every component in the file (unet, text_encoder, text_encoder_2), so SD 1.x/2.x and SDXL LoRAs
go through one path. Two things diffusers' converter does not know, and we add:
- the alphas: it writes alpha = rank, but an adapter trained with another lora_alpha has the scale
  alpha / rank, which the file's LoraConfig metadata records (weights.save_weights writes it);
- the text encoders' `text_model.` level: transformers >= 5 dropped it from CLIPTextModel's module
  names, while kohya names (lora_te1_text_model_encoder_layers_0_...) come from the classic layout
  (diffusers strips it again when it loads such a file).

FLUX.1: diffusers 0.42 reads sd-scripts' FLUX LoRAs (`_convert_kohya_flux_lora_to_diffusers`) but has no
writer, so `flux_to_kohya` writes the names that reader maps (BFL's module names: double_blocks_{i}_img_attn_qkv,
single_blocks_{i}_linear1, ...). sd-scripts fuses q, k, v (and a single block's MLP input) into one layer; our
separate adapters become one of rank parts x r with a block-diagonal up matrix, which that reader splits back
exactly and which any kohya loader applies as the same update. The reader assumes FLUX.1's widths for single
blocks (3072, MLP 12288), so a LoRA with single-block layers of another width is refused.

FLUX.2 [klein]: the same names through diffusers' FLUX.2 reader (`_convert_kohya_flux2_lora_to_diffusers`, no
writer either): double blocks as FLUX.1's (ff.linear_in / linear_out as img_mlp_0 / img_mlp_2), a single
block's fused attn.to_qkv_mlp_proj as linear1 and attn.to_out as linear2, one part each (no width assumed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors.torch import save_file

from . import families
from .errors import InputError
from .fsio import publish, sort_safetensors_metadata
from .sample import is_run, read_run
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
        hint = (" It holds a full fine-tune (unet/ or transformer/ folder), a diffusers pipeline: load it with "
                "from_pretrained; only LoRA runs (use_lora=True) export to LoRA formats."
                if (path / "unet").is_dir() or (path / "transformer").is_dir() else
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


# FLUX.1 (diffusers' module names) -> sd-scripts' (BFL's), with the part of a fused layer: (name, index, parts).
FLUX_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
               "attn.to_out.0": ("img_attn_proj", 0, 1), "ff.net.0.proj": ("img_mlp_0", 0, 1),
               "ff.net.2": ("img_mlp_2", 0, 1), "norm1.linear": ("img_mod_lin", 0, 1),
               "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
               "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
               "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
               "norm1_context.linear": ("txt_mod_lin", 0, 1)}
FLUX_SINGLE = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
               "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1)}
FLUX_WIDTH = 3072  # the single-block widths diffusers' reader assumes (MLP: 4x)
# FLUX.2 [klein]: the double blocks' feed-forwards are ff.linear_in / linear_out; single blocks fuse q, k, v and
# the MLP input in one diffusers layer already, which the FLUX.2 reader maps to linear1 whole.
FLUX2_DOUBLE = {k: v for k, v in FLUX_DOUBLE.items() if "norm1" not in k and ".net." not in k} | {
    "ff.linear_in": ("img_mlp_0", 0, 1), "ff.linear_out": ("img_mlp_2", 0, 1),
    "ff_context.linear_in": ("txt_mlp_0", 0, 1), "ff_context.linear_out": ("txt_mlp_2", 0, 1)}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", 0, 1), "attn.to_out": ("linear2", 0, 1)}


def flux_to_kohya(state: dict[str, torch.Tensor], config: dict | None = None, double: dict = FLUX_DOUBLE,
                  single: dict = FLUX_SINGLE, label: str = "FLUX.1") -> dict[str, torch.Tensor]:
    """The transformer part of a FLUX.1 LoRA file (transformer.<module>.lora_A / lora_B) -> sd-scripts' keys
    lora_unet_{double,single}_blocks_{i}_<layer>.lora_down / lora_up / alpha. config: its LoraConfig fields
    (the file's metadata); alpha keeps the scale lora_alpha / r (without one: 1). double / single / label:
    FLUX2_DOUBLE, FLUX2_SINGLE, "FLUX.2 [klein]" for a FLUX.2 LoRA."""
    config = config or {}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InputError("the transformer LoRA has per-layer ranks or alphas (rank_pattern / alpha_pattern), which "
                         "this export does not map")
    groups: dict[str, dict] = {}  # kohya layer -> {"parts": n, index: (A, B)}
    for key in (k for k in state if k.endswith(".lora_A.weight")):
        module = key[len("transformer."):-len(".lora_A.weight")]
        blocks, _, rest = module.partition(".")
        index, _, layer = rest.partition(".")
        table = {"transformer_blocks": ("double_blocks", double), "single_transformer_blocks": ("single_blocks", single)}
        if blocks not in table or layer not in table[blocks][1]:
            raise InputError(f"transformer.{module}: kohya's {label} format names the blocks' attention, MLP and "
                             "modulation layers only; export a LoRA of those (lora_modules 'default' or 'attention')")
        kind, names = table[blocks]
        name, part, parts = names[layer]
        group = groups.setdefault(f"lora_unet_{kind}_{index}_{name}", {"parts": parts})
        group[part] = (state[key], state[key.replace(".lora_A.", ".lora_B.")])
    out = {}
    for name, group in groups.items():
        parts = group.pop("parts")
        down, up = zip(*group.values())
        r, width = down[0].shape
        if any(d.shape[0] != r for d in down):
            raise InputError(f"{name}: its parts have different ranks; kohya's fused layer needs one")
        if parts == 4 and width != FLUX_WIDTH:
            raise InputError(f"{name}: a {width}-wide single block; diffusers' reader of kohya FLUX files assumes "
                             f"FLUX.1's {FLUX_WIDTH}, so this export could not be read back. Use the file as it is "
                             "(FluxPipeline and ComfyUI read its transformer.* keys)")
        if parts == 1:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down[0], up[0]
        else:  # q, k, v (, mlp) side by side: down stacked, up block-diagonal, a missing part all zeros
            dims = [width] * 3 + ([4 * width] if parts == 4 else [])
            fused_up = up[0].new_zeros(sum(dims), parts * r)
            fused_down = down[0].new_zeros(parts * r, width)
            for part, (a, b) in group.items():
                row = sum(dims[:part])
                fused_down[part * r:(part + 1) * r] = a
                fused_up[row:row + dims[part], part * r:(part + 1) * r] = b
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = fused_down, fused_up
        rank = out[f"{name}.lora_down.weight"].shape[0]
        out[f"{name}.alpha"] = torch.tensor(float(config.get("lora_alpha", r) * rank / config.get("r", r)))
    return out


def export_lora(path: str | Path, out: str | Path | None = None, format: str = "kohya") -> Path:
    """Write the LoRA of a run folder / checkpoint / file in `format`; returns the new file.
    Default out: <folder>/<folder name>_kohya.safetensors (not a name load_lora_weights(folder) picks)."""
    if format not in FORMATS:
        raise InputError(f"format {format!r}: use one of {FORMATS}")
    file, state, configs = read_lora(path)
    run = read_run(path, check_sources=False) if Path(path).is_dir() and is_run(path) else None
    # FLUX.2 by its run's family or layer names only it has (attention-only: the same kohya names as FLUX.1's)
    tables = ((FLUX2_DOUBLE, FLUX2_SINGLE, families.flux2.LABEL)
              if families.lora_family(state, run.family if run else None) is families.flux2 else ())
    flux = {k: v for k, v in state.items() if k.startswith("transformer.")}
    kohya = to_kohya({k: v for k, v in state.items() if k not in flux}, configs) if len(flux) < len(state) else {}
    if flux:  # FLUX: its transformer in sd-scripts' names, CLIP (text_encoder) as for SD
        kohya |= flux_to_kohya(flux, configs.get("transformer"), *tables)
    out = Path(out) if out else file.parent / f"{file.parent.resolve().name}_{format}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # kohya's own header, for the tools' info panels (FLUX.2: no module name, none known here)
    if not tables:
        metadata["ss_network_module"] = "networks.lora_flux" if flux else "networks.lora"
    ranks = {int(v.shape[0]) for k, v in kohya.items() if k.endswith("lora_down.weight")}
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    if len(ranks) == len(alphas) == 1:
        metadata |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": f"{alphas.pop():g}"}
    if run:  # read without its sources: the base model is not needed to export
        subjects = run.subjects or [dict(identifier=run.identifier, class_noun=run.class_noun)]  # several: each one's
        trigger = "', '".join(" ".join(w for w in (r["identifier"], r["class_noun"]) if w) for r in subjects)
        metadata |= {"ss_sd_model_name": run.base_model, "ss_training_comment": f"DreamBooth; prompt it with '{trigger}'"}
    tmp = out.with_name(f".tmp-{out.name}")
    save_file({k: v.contiguous() for k, v in kohya.items()}, tmp, metadata=metadata)
    sort_safetensors_metadata(tmp)
    publish(tmp, out)
    return out
