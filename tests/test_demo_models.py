"""The demo models load with the real diffusers loading code and behave like models."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from imagine.devtools.demo_models import DEMO_MODELS_VERSION, ensure_demo_models
from imagine_plugins.lightning import DEMO_STEPS as LIGHTNING_STEPS
from imagine_plugins.sd15_lora import DEMO_LORAS as LORA_NAMES

# These tests run torch on pytest's own thread: conftest runs them last.
pytestmark = pytest.mark.torch_in_test_thread

PIPELINE_CLASSES = {
    "sdxl": StableDiffusionXLPipeline,
    "sdxl-turbo": StableDiffusionXLPipeline,
    "sd15": StableDiffusionPipeline,
}
MARKER = ".demo-models-version"


@pytest.fixture(scope="session")
def demo_models(demo_folder: pathlib.Path) -> pathlib.Path:
    """The session's demo models (built once by ensure_demo_models in conftest)."""
    return demo_folder


def load(demo_models: pathlib.Path, name: str) -> DiffusionPipeline:
    pipe = PIPELINE_CLASSES[name].from_pretrained(demo_models / name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=sorted(PIPELINE_CLASSES))
def pipeline(request: pytest.FixtureRequest, demo_models: pathlib.Path) -> DiffusionPipeline:
    return load(demo_models, request.param)


def generate(pipe: DiffusionPipeline, seed: int = 0, prompt: str = "a lighthouse at dusk") -> np.ndarray:
    image = pipe(
        prompt=prompt,
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.float64)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pipeline_generates_a_non_blank_image_of_the_requested_size(pipeline: DiffusionPipeline) -> None:
    # Width and height differ so that swapping them would be caught.
    image = pipeline(prompt="a red fox", width=96, height=64, num_inference_steps=2).images[0]

    assert image.size == (96, 64)
    assert image.mode == "RGB"
    assert np.asarray(image).std() > 10


def test_same_seed_gives_same_pixels_and_another_seed_other_pixels(pipeline: DiffusionPipeline) -> None:
    first = generate(pipeline, seed=1)

    assert np.array_equal(generate(pipeline, seed=1), first)
    assert mean_abs_diff(generate(pipeline, seed=2), first) > 5


def test_prompt_changes_the_image(pipeline: DiffusionPipeline) -> None:
    fox = generate(pipeline, prompt="a red fox")

    assert mean_abs_diff(generate(pipeline, prompt="a blue whale in the deep sea"), fox) > 2


def test_lightning_checkpoints_load_into_the_sdxl_unet_and_change_the_image(demo_models: pathlib.Path) -> None:
    pipe = load(demo_models, "sdxl")
    base = generate(pipe)
    images = {}
    for steps in LIGHTNING_STEPS:
        checkpoint = demo_models / "sdxl-lightning" / f"sdxl_lightning_{steps}step_unet.safetensors"
        # Strict loading: the checkpoint must hold exactly the UNet's weights.
        pipe.unet.load_state_dict(load_file(checkpoint))
        images[steps] = generate(pipe)

    for steps, image in images.items():
        assert mean_abs_diff(image, base) > 5, steps
    assert mean_abs_diff(images[1], images[8]) > 5


def test_lora_changes_the_image_and_zero_weight_gives_back_the_base(demo_models: pathlib.Path) -> None:
    pipe = load(demo_models, "sd15")
    base = generate(pipe)
    for name in LORA_NAMES:
        pipe.load_lora_weights(demo_models / "loras", weight_name=f"{name}.safetensors", adapter_name=name)

    with_lora = {}
    for name in LORA_NAMES:
        pipe.set_adapters([name], [1.0])
        with_lora[name] = generate(pipe)
    pipe.set_adapters([LORA_NAMES[0]], [0.0])
    switched_off = generate(pipe)

    for name, image in with_lora.items():
        assert mean_abs_diff(image, base) > 5, name
    assert mean_abs_diff(*with_lora.values()) > 5
    assert np.abs(switched_off - base).max() <= 1


def test_ensure_builds_once_and_deterministically(demo_models: pathlib.Path, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "models"

    assert ensure_demo_models(target) is True
    assert ensure_demo_models(target) is False
    assert (target / MARKER).read_text().strip() == str(DEMO_MODELS_VERSION)
    assert tree_bytes(target) == tree_bytes(demo_models)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]
    # Readable by a service running as another user than the one who built them.
    assert all(p.stat().st_mode & 0o004 for p in [target, *target.rglob("*")])


def test_ensure_rebuilds_a_folder_of_another_version(demo_models: pathlib.Path, tmp_path: pathlib.Path) -> None:
    target = tmp_path / "models"
    target.mkdir()
    (target / MARKER).write_text(f"{DEMO_MODELS_VERSION - 1}\n")
    (target / "stale-file").write_text("left over from an older build")

    assert ensure_demo_models(target) is True
    assert tree_bytes(target) == tree_bytes(demo_models)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, imagine.devtools.demo_models; assert 'torch' not in sys.modules, 'torch was imported'"
    repo_root = pathlib.Path(__file__).resolve().parent.parent

    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
