from __future__ import annotations

import base64
import io
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import pytest
from PIL import Image

from imagine.http.app import create_app
from imagine.security.tokens import JwtKeys
from imagine.devtools.demo_models import demo_settings, prepare_demo_models
from imagine.settings import Settings, load_settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run torch on pytest's own thread go last (the order is otherwise kept).

    Once the main thread has run torch, every later device thread of this
    process runs at about half speed on a CPU (see prepare_demo_models).
    """
    items.sort(key=lambda item: item.get_closest_marker("torch_in_test_thread") is not None)


SECRET = secrets.token_urlsafe(48).encode()
KEYS = JwtKeys("HS256", SECRET, SECRET, "environment", "test")


def make_token(sub: str = "alice", scope: str | list[str] = "generate", *, secret: bytes = SECRET, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "scope": scope, "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(sub: str = "alice", scope: str | list[str] = "generate", **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub, scope, **claims)}"}


def pixels(png: bytes) -> np.ndarray:
    """A PNG's pixels, as an RGB array."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def data_url_png(url: str) -> bytes:
    """The PNG inside a `data:image/png;base64,` URL, as the JSON results carry images."""
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix):])


def assert_same_image(first: np.ndarray, second: np.ndarray) -> None:
    """The same image, allowing what batching may change on the CPU.

    CPU convolution kernels pick their blocking by batch size, so a float may
    round the other way: a level here and there. Another seed, prompt or LoRA
    moves pixels by tens of levels on average.
    """
    difference = np.abs(first.astype(int) - second.astype(int))
    assert difference.max() <= 2, f"pixels differ by up to {difference.max()} levels"
    assert difference.mean() < 0.1, f"pixels differ by {difference.mean():.3f} levels on average"


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "demo-models"
    # In a child process: the device threads of the apps under test should be
    # the only threads of this process that ever ran torch (see prepare_demo_models).
    prepare_demo_models(folder)
    return folder


@pytest.fixture
def base_settings(tmp_path: Path, demo_folder: Path) -> Settings:
    """The demo models, small sizes allowed so tests run fast, state in a temporary folder."""
    settings = load_settings(None, {"IMAGINE_SERVER_STATE_DIR": str(tmp_path / "state")})
    settings = demo_settings(settings, demo_folder)
    small = {"min_size": 64, "default_size": 64}
    options = {name: {**table, **small} for name, table in settings.models.options.items()}
    # Generous limits: the rate-limit tests set their own.
    return settings.replace(
        models={"options": options},
        ratelimit={"global_burst": 10_000, "ip_burst": 10_000, "subject_burst": 10_000},
    )


@pytest.fixture
def make_client(aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    async def make(settings: Settings, *, plugins: tuple[Any, ...] = (), **client_kwargs: Any) -> Any:
        return await aiohttp_client(create_app(settings, keys=KEYS, extra_plugins=plugins), **client_kwargs)

    return make


@pytest.fixture
async def client(make_client: Callable[..., Any], base_settings: Settings) -> Any:
    return await make_client(base_settings)
