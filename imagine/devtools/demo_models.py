"""Tiny random-weight stand-ins for the real models, built offline.

The folders written here have the same on-disk layout as the real checkpoints
(diffusers pipeline folders, SDXL-Lightning UNet files, LoRA files), so the
service's real loading code runs against them unchanged, only with tiny
channel counts so that generation takes a fraction of a second on a CPU.

Heavy libraries are imported inside the functions: importing this module must
stay cheap for code that only needs `ensure_demo_models` to decide nothing
has to be built.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagine.settings import Settings

# Bump whenever the models built here change, so existing folders get rebuilt.
DEMO_MODELS_VERSION: int = 1

MARKER_NAME = ".demo-models-version"
LIGHTNING_STEPS = (1, 2, 4, 8)
LORA_NAMES = ("pixel-art", "watercolor")
DEMO_LORA_DIR = "loras"

# Shared by all text encoders: the UNets' cross-attention sizes derive from it.
_TEXT_HIDDEN_SIZE = 32
# SDXL pooled-embedding size (text_encoder_2 projection).
_SDXL_PROJECTION_DIM = 32
_SDXL_TIME_EMBED_DIM = 8
_LORA_RANK = 4
# peft zero-initialises lora_B, which makes a fresh LoRA a no-op; this standard
# deviation is large enough for a LoRA to visibly change the image.
_LORA_B_STD = 1.0

# Noise schedule shared by SD1.5 and SDXL (values from the real scheduler configs).
_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def build_demo_models(target: pathlib.Path) -> None:
    """Write all demo models under `target`, deterministically; marker last."""
    target.mkdir(parents=True, exist_ok=True)
    _build_sdxl(target / "sdxl", seed=0, scheduler=sdxl_base_scheduler())
    _build_sdxl(target / "sdxl-turbo", seed=1, scheduler=_sdxl_turbo_scheduler())
    _build_lightning(target / "sdxl-lightning", first_seed=10)
    sd15 = _build_sd15(target / "sd15", seed=2)
    _build_loras(sd15, target / DEMO_LORA_DIR, first_seed=20)
    _make_world_readable(target)
    # Written last: a folder without it is incomplete whatever else it holds.
    (target / MARKER_NAME).write_text(f"{DEMO_MODELS_VERSION}\n")


# Which demo folder stands in for each model's real weights.
DEMO_SOURCES = {"sdxl": "sdxl", "sdxl-turbo": "sdxl-turbo", "sd15-lora": "sd15"}


def _lightning_checkpoints(folder: pathlib.Path) -> dict[str, str]:
    return {
        str(steps): str(folder / "sdxl-lightning" / f"sdxl_lightning_{steps}step_unet.safetensors")
        for steps in LIGHTNING_STEPS
    }


def demo_settings(settings: Settings, folder: pathlib.Path) -> Settings:
    """The same settings with every model's weights and the LoRA folder pointing at the demo models."""
    options = {name: dict(table) for name, table in settings.models.options.items()}
    for name, subfolder in DEMO_SOURCES.items():
        options.setdefault(name, {})["source"] = str(folder / subfolder)
    # Lightning's base defaults to sdxl's source, so the two share components here too.
    options.setdefault("sdxl-lightning", {})["checkpoints"] = _lightning_checkpoints(folder)
    return settings.replace(models={"options": options, "lora_dir": str(folder / DEMO_LORA_DIR)})


def prepare_demo_models(target: pathlib.Path) -> bool:
    """`ensure_demo_models` in a child process; True if it built them.

    Building runs torch, and a process serves fastest when its device thread is
    the only thread that ever did: a live thread with an OpenMP team of its own
    (the main thread is always live) halves the device thread's speed on a CPU.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(ensure_demo_models, target).result()


def ensure_demo_models(target: pathlib.Path) -> bool:
    """Build the demo models unless `target` holds the current version.

    Returns True if it built them. The build goes to a temporary sibling folder
    that is renamed into place, so a crash never leaves a broken `target`.
    """
    if _built_version(target) == DEMO_MODELS_VERSION:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_demo_models(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _make_world_readable(root: pathlib.Path) -> None:
    # safetensors writes owner-only (0600) files and mkdtemp makes a 0700
    # folder, yet the models are often built by another user (at image-build
    # time, say) than the one serving them.
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _built_version(target: pathlib.Path) -> int | None:
    try:
        return int((target / MARKER_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


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


def _clip_tokenizer(pad_token: str) -> Any:
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
        "hidden_size": _TEXT_HIDDEN_SIZE,
        "intermediate_size": 2 * _TEXT_HIDDEN_SIZE,
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


def _text_encoder() -> Any:
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config()).eval()


def _text_encoder_with_projection() -> Any:
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(clip_text_config(projection_dim=_SDXL_PROJECTION_DIM)).eval()


def _vae(scaling_factor: float) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks give the real downscale factor of 8. The last decoder blocks
    # run at full image resolution, hence the tiny channel counts, and the
    # mid-block attention over every latent pixel would double the decode time
    # at 1024px, hence none.
    return AutoencoderKL(
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


def _unet(sample_size: int, cross_attention_dim: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    # Attention only on the half-resolution level, with two wide heads: on a
    # CPU, attention over full-resolution latents or many narrow heads would
    # dominate the step time.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
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


def _sdxl_unet() -> Any:
    return _unet(
        # Default generation size 1024px, as the real SDXL.
        sample_size=128,
        # Prompt embeddings are both text encoders' hidden states concatenated.
        cross_attention_dim=2 * _TEXT_HIDDEN_SIZE,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        # Six micro-conditioning numbers (sizes, crop) plus the pooled prompt embedding.
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_PROJECTION_DIM,
    )


def _sd15_unet() -> Any:
    # Default generation size 512px, as the real SD1.5.
    return _unet(sample_size=64, cross_attention_dim=_TEXT_HIDDEN_SIZE)


def _sdxl_turbo_scheduler() -> Any:
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(**_SCHEDULE, timestep_spacing="trailing")


def sdxl_pipeline(vae: Any, text_encoder: Any, text_encoder_2: Any, unet: Any, scheduler: Any) -> Any:
    """An SDXL pipeline of these components, with the demo's CLIP-shaped tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        # As in the real SDXL: CLIP-L pads with <|endoftext|>, OpenCLIP-G with "!".
        tokenizer=_clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def sdxl_base_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading")


def _build_sdxl(folder: pathlib.Path, seed: int, scheduler: Any) -> None:
    import torch

    # One seed per pipeline: the components draw from it in a fixed order.
    torch.manual_seed(seed)
    pipe = sdxl_pipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=_text_encoder(),
        text_encoder_2=_text_encoder_with_projection(),
        unet=_sdxl_unet(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _build_lightning(folder: pathlib.Path, first_seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for offset, steps in enumerate(LIGHTNING_STEPS):
        torch.manual_seed(first_seed + offset)
        save_file(_sdxl_unet().state_dict(), str(folder / f"sdxl_lightning_{steps}step_unet.safetensors"))


def _build_sd15(folder: pathlib.Path, seed: int) -> Any:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215),
        text_encoder=_text_encoder(),
        tokenizer=_clip_tokenizer(pad_token="<|endoftext|>"),
        unet=_sd15_unet(),
        scheduler=PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _build_loras(pipe: Any, folder: pathlib.Path, first_seed: int) -> None:
    for offset, name in enumerate(LORA_NAMES):
        _save_lora(pipe, folder, name, seed=first_seed + offset)


def _save_lora(pipe: Any, folder: pathlib.Path, name: str, seed: int) -> None:
    """Save a random LoRA on the SD1.5 UNet's attention projections, in diffusers format."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(
        r=_LORA_RANK,
        lora_alpha=_LORA_RANK,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    pipe.unet.add_adapter(config, adapter_name=name)
    with torch.no_grad():
        for param_name, param in pipe.unet.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.normal_(std=_LORA_B_STD)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=name),
        weight_name=f"{name}.safetensors",
        safe_serialization=True,
    )
    pipe.unet.delete_adapters(name)
