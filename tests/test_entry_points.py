"""Third-party plugins installed through the `imagine` entry-point group, the way pip installs them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from imagine.http.app_keys import registry_key
from imagine.plugin.manager import PluginError, collect_generators, plugin_manager
from tests.conftest import auth
from tests.oom_plugin import TRIGGER

URL = "/imagine/generate"


def install_plugin(root: Path, monkeypatch: pytest.MonkeyPatch, entry_points: dict[str, str]) -> None:
    """What `pip install` leaves behind: a dist-info folder whose entry_points.txt names the plugins."""
    dist_info = root / "imagine_test_plugins-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: imagine-test-plugins\nVersion: 1.0\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[imagine]\n{lines}")
    monkeypatch.syspath_prepend(str(root))


async def test_out_of_memory_fails_only_that_job_and_frees_its_memory(make_client, base_settings, tmp_path, monkeypatch) -> None:
    install_plugin(tmp_path, monkeypatch, {"oom": "tests.oom_plugin"})
    client = await make_client(base_settings)
    generator = client.app[registry_key].resolve("oom")

    async def generate(prompt: str):
        return await client.post(URL, json={"prompt": prompt, "model": "oom"}, headers=auth())

    failing, neighbour = await asyncio.gather(generate(f"please run {TRIGGER}"), generate("a fox"))
    assert failing.status == 503
    body = await failing.json()
    assert body["error"]["code"] == "OUT_OF_MEMORY"
    assert int(failing.headers["Retry-After"]) >= 1
    assert "Traceback" not in json.dumps(body) and "20.00 GiB" not in json.dumps(body)
    assert neighbour.status == 200  # the job beside it is untouched
    # What the failed run held was released before the answer went out.
    assert generator.failed_activations is not None and generator.failed_activations() is None

    assert (await generate("a fox again")).status == 200
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "healthy"


async def test_a_load_that_runs_out_of_memory_makes_room_and_tries_again(make_client, base_settings, tmp_path, monkeypatch) -> None:
    install_plugin(tmp_path, monkeypatch, {"oom": "tests.oom_plugin"})
    client = await make_client(base_settings)
    registry = client.app[registry_key]
    for model in ("oom", "oom-large"):
        response = await client.post(URL, json={"prompt": "a fox", "model": model}, headers=auth())
        assert response.status == 200, await response.text()
    large = registry.resolve("oom-large")
    assert large.failed_loads == 1  # the first try ran out of memory...
    assert registry.resolve("oom").loaded is False  # ...so the least recently used model made room
    assert large.loaded is True
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["status"] == "healthy"


COPYCAT = """
from imagine.plugin.hookspecs import hookimpl
from tests.oom_plugin import OutOfMemoryGenerator


@hookimpl
def register_generators(register):
    generator = OutOfMemoryGenerator()
    generator.name = "sdxl-lightning"
    register(generator)
"""


def test_an_installed_plugin_claiming_a_builtin_name_stops_the_start(tmp_path, monkeypatch, base_settings) -> None:
    (tmp_path / "lightning_copycat.py").write_text(COPYCAT)
    install_plugin(tmp_path, monkeypatch, {"copycat": "lightning_copycat"})
    with pytest.raises(PluginError) as refused:
        collect_generators(plugin_manager(), base_settings)
    message = str(refused.value)
    assert "'sdxl-lightning'" in message and "imagine_plugins.lightning" in message and "copycat" in message
