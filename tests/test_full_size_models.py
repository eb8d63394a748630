"""The full-size random-weight SDXL has the real model's shapes, so its compute is the real model's."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights

from imagine_plugins.full_size_sdxl import full_size_sdxl_components

# These tests run torch on pytest's own thread: conftest runs them last.
pytestmark = pytest.mark.torch_in_test_thread

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0 (the SDXL paper's
# 2.6B UNet and 817M of text encoders).
PUBLISHED_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


@pytest.fixture(scope="module")
def components() -> dict[str, torch.nn.Module]:
    # Shapes without storage: 3.5 billion parameters cost nothing here.
    with init_empty_weights():
        return full_size_sdxl_components()


def test_every_network_has_the_published_parameter_count(components) -> None:
    counts = {name: sum(parameter.numel() for parameter in module.parameters()) for name, module in components.items()}
    assert counts == PUBLISHED_PARAMETERS


def test_the_networks_fit_together_at_1024px(components) -> None:
    """One denoising step and a decode, run on shapes alone, as the SDXL pipeline wires them."""
    with torch.device("meta"):
        tokens = torch.zeros(1, 77, dtype=torch.long)
        clip_l = components["text_encoder"](tokens, output_hidden_states=True)
        openclip = components["text_encoder_2"](tokens, output_hidden_states=True)
        prompt = torch.cat([clip_l.hidden_states[-2], openclip.hidden_states[-2]], dim=-1)
        latents = torch.zeros(2, 4, 128, 128)
        noise = components["unet"](
            latents,
            torch.zeros(2),
            encoder_hidden_states=prompt.expand(2, -1, -1),
            added_cond_kwargs={"text_embeds": openclip.text_embeds.expand(2, -1), "time_ids": torch.zeros(2, 6)},
        ).sample
        image = components["vae"].decode(noise[:1]).sample
    assert tuple(noise.shape) == (2, 4, 128, 128)
    assert tuple(image.shape) == (1, 3, 1024, 1024)
