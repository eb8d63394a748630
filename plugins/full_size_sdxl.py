"""SDXL at its real size with random weights: the real models' compute, without a download.

`imagine demo-models --full-size DIR` writes `DIR/sdxl`, one pipeline folder with the
architecture of stabilityai/stable-diffusion-xl-base-1.0 (the shapes below are
its published configuration: a 2.57-billion-parameter UNet, CLIP ViT-L and
OpenCLIP ViT-bigG text encoders, the SDXL VAE) and random weights. The images
are noise, but every pipeline call costs what the real model's costs, so
`imagine bench` can measure a GPU box against published figures before any
weights are fetched. SDXL-Turbo has the same architecture: pointing both
`models.sdxl.source` and `models.sdxl-turbo.source` at the folder gives both
models (which then share their components in memory).

Only the tokenizers stay the demo models' small byte-level ones: a prompt's
token count, not the vocabulary, sets the text encoders' compute.
"""

from __future__ import annotations

import pathlib
from typing import Any

from imagine_plugins.demo_weights import clip_text_config, sdxl_base_scheduler, sdxl_pipeline

# From the checkpoint's unet/config.json.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    # Despite its name, diffusers reads this as the number of heads per level.
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# From vae/config.json.
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# CLIP's vocabulary size: the embedding tables keep their real size.
_CLIP_VOCAB_SIZE = 49408

# From text_encoder/config.json (CLIP ViT-L/14).
CLIP_L: dict[str, Any] = {
    "vocab_size": _CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# From text_encoder_2/config.json (OpenCLIP ViT-bigG/14, with its projection).
OPENCLIP_BIGG: dict[str, Any] = {
    "vocab_size": _CLIP_VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def full_size_sdxl_components() -> dict[str, Any]:
    """The four SDXL networks at their real size, randomly initialised (on torch's default device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "vae": AutoencoderKL(**SDXL_VAE).eval(),
        "text_encoder": CLIPTextModel(clip_text_config(**CLIP_L)).eval(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(**OPENCLIP_BIGG)).eval(),
        "unet": UNet2DConditionModel(**SDXL_UNET).eval(),
    }


FOLDER = "sdxl"


def build_full_size_sdxl(target: pathlib.Path) -> dict[str, Any]:
    """Write the full-size SDXL pipeline under `target`, in float16 as the released weights (about 7 GB).

    Returns the settings that serve it as both SDXL models.
    """
    import torch

    folder = target / FOLDER

    torch.manual_seed(0)
    # Random initialisation of 3.5 billion parameters takes minutes on a CPU and seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        pipe = sdxl_pipeline(**full_size_sdxl_components(), scheduler=sdxl_base_scheduler())
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return {"models": {"sdxl": {"source": str(folder)}, "sdxl-turbo": {"source": str(folder)}}}
