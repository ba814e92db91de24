"""DreamBooth (Ruiz et al., CVPR 2023) as small functions: data, loss, training, sampling, metrics."""

import logging

# Two third-party warnings printed by every run, about code paths this library never takes; each is dropped
# by its exact text on the logger that raises it, nothing else is: transformers' image processors falling
# back to PIL without torchvision (diffusers' pipeline modules import CLIPImageProcessor and
# SiglipImageProcessor; we never process images with them), and bitsandbytes' 4-bit CPU kernel it could not
# load (no 4-bit layers here).
KNOWN_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}
for _logger, _text in KNOWN_NOISE.items():
    logging.getLogger(_logger).addFilter(lambda record, text=_text: text not in record.getMessage())
