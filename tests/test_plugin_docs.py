"""The plugin author's page (docs/plugins.md) is true: its plugin, copied as printed, installs and serves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from imagine.settings import load_settings
from tests.conftest import auth, pixels
from tests.test_entry_points import install_plugin

PAGE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
URL = "/imagine/generate"


@pytest.fixture
def flat_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The page's plugin as the module `imagine_flat`, installed through the entry point the page shows."""
    code = re.search(r"```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
    (tmp_path / "imagine_flat.py").write_text(code)
    install_plugin(tmp_path, monkeypatch, {"flat": "imagine_flat"})
    return tmp_path


async def test_the_documented_plugin_serves_its_model_and_checks_its_option(flat_plugin, make_client, base_settings, tmp_path) -> None:
    config = tmp_path / "imagine.toml"
    config.write_text("[models.flat]\nred = 200\n")
    settings = base_settings.replace(models={"options": {**base_settings.models.options, **load_settings(config).models.options}})
    client = await make_client(settings)

    response = await client.post(URL, json={"prompt": "green", "model": "flat", "green": 128, "seed": 7}, headers=auth())
    assert response.status == 200, await response.text()
    assert pixels(await response.read())[0, 0].tolist() == [200, 128, 7]

    refused = await client.post(URL, json={"prompt": "green", "model": "flat", "green": 300}, headers=auth())
    assert refused.status == 400
    assert (await refused.json())["error"]["details"]["errors"][0]["loc"] == ["body", "green"]

    job = await (await client.post("/imagine/jobs", json={"prompt": "x", "model": "flat", "steps": 3}, headers=auth())).json()
    done = await (await client.get(f"/imagine/jobs/{job['id']}/events", headers=auth())).text()
    assert "event: progress" in done and "event: succeeded" in done


def test_a_bad_table_stops_the_start_with_the_plugins_message(flat_plugin, tmp_path) -> None:
    from imagine.plugin.manager import collect_generators, plugin_manager
    from imagine.settings import SettingsError

    config = tmp_path / "imagine.toml"
    config.write_text("[models.flat]\nred = 300\n")
    with pytest.raises(SettingsError, match="models.flat.red must be between 0 and 255"):
        collect_generators(plugin_manager(), load_settings(config))


def test_imagine_plugins_lists_it_with_its_distribution(flat_plugin, tmp_path) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "imagine.cli", "plugins"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
        env={"PYTHONPATH": str(flat_plugin), "PATH": "/usr/bin:/bin", "XDG_STATE_HOME": str(tmp_path / "state")},
    ).stdout
    assert "flat  [imagine-test-plugins 1.0 (entry point)]\n    models: flat\n" in listed
    assert "imagine_plugins.sdxl  [built in]\n    models: sdxl (stable-diffusion-xl)\n" in listed
    assert "settings: [leonardo]" in listed
