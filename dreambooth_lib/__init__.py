"""DreamBooth (Ruiz et al., CVPR 2023) as small functions: data, loss, training, sampling, metrics."""
