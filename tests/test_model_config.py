"""The TOML shapes of the Lightning and LoRA settings, mistakes refused at start-up, and a torch-free start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imagine.devtools.demo_models import names_weights
from imagine.plugin.manager import collect_generators, plugin_manager
from imagine.settings import SettingsError, load_settings

TOML = """
[models]
lora_dir = "/srv/loras"
memory_budget_gb = 20

[models.sdxl]
source = "/srv/models/sdxl-base"

[models.sdxl-lightning.checkpoints]
1 = { file = "/srv/lightning/sdxl_lightning_1step_unet_x0.safetensors", prediction_type = "sample" }
2 = "ByteDance/SDXL-Lightning/sdxl_lightning_2step_unet.safetensors"

[models.sd15-lora]
default_loras = { pixel-art = 0.8 }
"""


def generators(tmp_path, text: str):
    config = tmp_path / "imagine.toml"
    config.write_text(text)
    settings = load_settings(config, {})
    return settings, collect_generators(plugin_manager(), settings)


def test_the_documented_configuration_loads(tmp_path) -> None:
    settings, registered = generators(tmp_path, TOML)
    assert settings.models.lora_dir == "/srv/loras"
    assert settings.models.memory_budget_gb == 20.0
    assert names_weights(settings)
    lightning = registered["sdxl-lightning"]
    assert lightning.source == "/srv/models/sdxl-base"  # sdxl's weights, so the two share components
    assert lightning.card.limits.step_choices == (1, 2)
    assert lightning.card.defaults.steps == 2
    assert lightning.checkpoints[1].prediction_type == "sample"
    assert lightning.checkpoints[2].prediction_type == "epsilon"
    lora = registered["sd15-lora"]
    assert [(w.name, w.weight) for w in lora.card.defaults.loras] == [("pixel-art", 0.8)]


def test_lightning_alone_counts_as_configured_weights(tmp_path) -> None:
    settings, _ = generators(tmp_path, '[models.sdxl-lightning]\nbase = "/srv/sdxl"\n')
    assert names_weights(settings)  # so `imagine serve` does not swap in the demo models


def test_without_configuration_lightning_offers_every_published_checkpoint(tmp_path) -> None:
    _, registered = generators(tmp_path, "")
    assert registered["sdxl-lightning"].card.limits.step_choices == (1, 2, 4, 8)
    assert registered["sdxl-lightning"].card.defaults.steps == 4


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[models.sdxl-lightning.checkpoints]\nfour = "x.safetensors"\n', "not a step count"),
        ('[models.sdxl-lightning.checkpoints]\n4 = { file = "x", prediction_type = "v" }\n', "prediction_type"),
        ('[models.sdxl-lightning.checkpoints]\n4 = 3\n', "must be a file name"),
        ('[models.sdxl-lightning]\ndefault_steps = 3\n[models.sdxl-lightning.checkpoints]\n4 = "x"\n', "default_steps"),
        ('[models.sd15-lora]\ndefault_loras = { "../x" = 1.0 }\n', "without a path"),
        ('[models.sd15-lora]\ndefault_loras = { x = 3.0 }\n', "between -2 and 2"),
        ('[models.sd15-lora]\nmax_cached_loras = 0\n', "max_cached_loras"),
        ("[models]\nmemory_budget_gb = -1\n", "memory_budget_gb"),
    ],
)
def test_mistakes_stop_the_start_with_the_setting_named(tmp_path, text, fragment) -> None:
    with pytest.raises(SettingsError, match=fragment):
        generators(tmp_path, text)


def test_building_the_app_with_every_builtin_plugin_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from imagine.http.app import create_app\n"
        "from imagine.security.tokens import JwtKeys\n"
        "from imagine.settings import Settings\n"
        "create_app(Settings(), keys=JwtKeys('HS256', b'k' * 32, b'k' * 32, 'environment'))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
