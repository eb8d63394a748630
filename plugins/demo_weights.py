"""Tiny random-weight parts the built-in plugins build their demo models from.

The folders the plugins write with these have the same on-disk layout as the
real checkpoints (diffusers pipeline folders, UNet files, LoRA files), so the
service's real loading code runs against them unchanged, only with tiny channel
counts so that generation takes a fraction of a second on a CPU.

torch, diffusers, transformers and peft are imported inside the functions: the
builds run in a child process (`imagine.devtools.demo_models`), and importing
this module must stay cheap for the service itself.
"""

from __future__ import annotations

import pathlib
from typing import Any

# Shared by all text encoders: the UNets' cross-attention sizes derive from it.
TEXT_HIDDEN_SIZE = 32
# SDXL pooled-embedding size (text_encoder_2 projection).
SDXL_PROJECTION_DIM = 32
SDXL_TIME_EMBED_DIM = 8
LORA_RANK = 4
# peft zero-initialises lora_B, which makes a fresh LoRA a no-op; this standard
# deviation is large enough for a LoRA to visibly change the image.
LORA_B_STD = 1.0

# Noise schedule shared by SD1.5 and SDXL (values from the real scheduler configs).
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values (CLIP's mapping)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    remapped = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(remapped))]


def _clip_vocab() -> dict[str, int]:
    # Same shape as CLIP's vocab minus the learned merges: every byte alone and
    # word-final, then the two special tokens, so any text tokenizes without unk.
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def clip_tokenizer(pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    # The pipelines pad every prompt to model_max_length tokens, as with the real CLIP.
    return CLIPTokenizer(vocab=_clip_vocab(), merges=[], pad_token=pad_token, model_max_length=77)


def clip_text_config(projection_dim: int | None = None, **shape: Any) -> Any:
    """A CLIP text encoder's config for the demo tokenizer: tiny unless `shape` says otherwise."""
    from transformers import CLIPTextConfig

    vocab = _clip_vocab()
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    tiny = {
        "vocab_size": len(vocab),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 2 * TEXT_HIDDEN_SIZE,
        # The SDXL pipeline reads the penultimate layer, so at least two are needed.
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_act": "quick_gelu",
    }
    return CLIPTextConfig(
        **(tiny | shape),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=1,
        **extra,
    )


def text_encoder() -> Any:
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config()).eval()


def text_encoder_with_projection() -> Any:
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(clip_text_config(projection_dim=SDXL_PROJECTION_DIM)).eval()


def vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give the real downscale factor of 8. The last decoder blocks
    # run at full image resolution, hence the tiny channel counts, and the
    # mid-block attention over every latent pixel would double the decode time
    # at 1024px, hence none.
    autoencoder = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    ).eval()
    _encode_like_a_trained_vae(autoencoder)
    return autoencoder


def _encode_like_a_trained_vae(autoencoder: Any) -> None:
    """Give the random encoder the two properties image-to-image relies on in a trained one.

    A trained VAE encodes almost deterministically (a tiny posterior variance)
    and its scaling factor brings latents to unit variance, the scale the noise
    schedules assume. Random weights give neither: sampled latents would be
    mostly noise, and far smaller than the noise a schedule adds, so an input
    image would barely count. The gain is set on a fixed colour ramp; only the
    encoder's last 1x1 convolution changes, which text to image never runs.
    """
    import torch

    channels = autoencoder.config.latent_channels
    ramp = torch.linspace(-1, 1, 64)
    card = torch.stack([ramp.expand(64, 64), ramp[:, None].expand(64, 64), -ramp.expand(64, 64)])[None]
    quant_conv = autoencoder.quant_conv
    with torch.no_grad():
        spread = autoencoder.encode(card).latent_dist.mean.std()
        gain = 1 / (autoencoder.config.scaling_factor * spread)
        quant_conv.weight[:channels] *= gain
        quant_conv.bias[:channels] *= gain
        # The log-variance half: a standard deviation of exp(-15), as good as none.
        quant_conv.weight[channels:] = 0
        quant_conv.bias[channels:] = -30.0


def unet(sample_size: int, cross_attention_dim: int, in_channels: int = 4, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    # Attention only on the half-resolution level, with two wide heads: on a
    # CPU, attention over full-resolution latents or many narrow heads would
    # dominate the step time.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        # Despite its name, diffusers reads this as the number of heads.
        attention_head_dim=2,
        cross_attention_dim=cross_attention_dim,
        **extra,
    ).eval()


def sdxl_unet(in_channels: int = 4) -> Any:
    """The demo SDXL UNet; 9 input channels make an inpainting one (latents, mask, masked image)."""
    return unet(
        in_channels=in_channels,
        # Default generation size 1024px, as the real SDXL.
        sample_size=128,
        # Prompt embeddings are both text encoders' hidden states concatenated.
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # Six micro-conditioning numbers (sizes, crop) plus the pooled prompt embedding.
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
    )


def sdxl_pipeline(vae: Any, text_encoder: Any, text_encoder_2: Any, unet: Any, scheduler: Any) -> Any:
    """An SDXL pipeline of these components, with the demo's CLIP-shaped tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        # As in the real SDXL: CLIP-L pads with <|endoftext|>, OpenCLIP-G with "!".
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def sdxl_base_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULE, timestep_spacing="leading")


def save_sdxl(folder: pathlib.Path, seed: int, scheduler: Any) -> None:
    """A tiny SDXL pipeline folder; one seed per pipeline, the components drawing from it in a fixed order."""
    import torch

    torch.manual_seed(seed)
    pipe = sdxl_pipeline(
        vae=vae(scaling_factor=0.13025),
        text_encoder=text_encoder(),
        text_encoder_2=text_encoder_with_projection(),
        unet=sdxl_unet(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def save_sdxl_inpaint_unet(folder: pathlib.Path, seed: int) -> None:
    """A tiny SDXL inpainting model's UNet, in `folder/unet` as in an inpainting pipeline folder."""
    import torch

    torch.manual_seed(seed)
    sdxl_unet(in_channels=9).save_pretrained(folder / "unet", safe_serialization=True)


def save_random_lora(pipe: Any, folder: pathlib.Path, name: str, seed: int) -> None:
    """Save a random LoRA on an SD1.5 pipeline's UNet attention projections, in diffusers format."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_RANK,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    pipe.unet.add_adapter(config, adapter_name=name)
    with torch.no_grad():
        for param_name, param in pipe.unet.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.normal_(std=LORA_B_STD)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=name),
        weight_name=f"{name}.safetensors",
        safe_serialization=True,
    )
    pipe.unet.delete_adapters(name)
