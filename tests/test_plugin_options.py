"""An installed plugin owns its request options, settings and demo configuration; the core names none of it.

The plugin (tests/options_plugin.py) comes in through the `imagine` entry-point
group, as `pip install` would bring it, and implements register_generators,
register_settings and register_demo_models.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from imagine.devtools.demo_models import demo_settings, names_weights, prepare_demo_models
from imagine.http.app import create_app
from imagine.http.app_keys import registry_key
from imagine.plugin.generators import Options
from imagine.plugin.hookspecs import hookimpl
from imagine.plugin.manager import PluginError, collect_demo_models, collect_generators, plugin_manager, settings_sections
from imagine.settings import Settings, SettingsError, load_settings
from tests.conftest import KEYS, auth, pixels
from tests.options_plugin import MODEL, OPTION, PALETTE_FILE, SECTION, QuiltingSettings
from tests.slow_plugin import SlowGenerator, SlowPlugin
from tests.test_entry_points import install_plugin

URL = "/imagine/generate"
CORE = Path(__file__).resolve().parent.parent / "imagine"


@pytest.fixture
def installed(base_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # After base_settings: they lay card overrides over every demo table, which this model's table does not take.
    install_plugin(tmp_path, monkeypatch, {"quilt": "tests.options_plugin"})


def errors_of(body: dict) -> list[dict]:
    assert body["error"]["code"] == "VALIDATION_ERROR"
    return body["error"]["details"]["errors"]


async def test_its_option_is_validated_for_its_model_and_reaches_the_generator(installed, make_client, base_settings) -> None:
    client = await make_client(base_settings, plugins=(SlowPlugin(step_seconds=0.0),))
    generator = client.app[registry_key].resolve(MODEL)

    good = await client.post(URL, json={"prompt": "a quilt", "model": MODEL, OPTION: 8}, headers=auth())
    assert good.status == 200, await good.text()
    assert generator.received == [8]
    image = pixels(await good.read())  # 64 px wide: patches of 8 px, alternating
    assert image[0, 0].tolist() == [255, 255, 255] and image[0, 8].tolist() == [0, 0, 0]

    for bad, message in ((3, "must be a power of two"), ("8", "valid integer"), (512, "less than or equal to 256")):
        response = await client.post(URL, json={"prompt": "a quilt", "model": MODEL, OPTION: bad}, headers=auth())
        assert response.status == 400
        [error] = errors_of(await response.json())
        assert error["loc"] == ["body", OPTION] and message in error["msg"]
    assert generator.received == [8]  # nothing refused reached it

    # Another model ignores the option, whatever its own plugin's validator says of it.
    other = await client.post(URL, json={"prompt": "a quilt", "model": "slow", "steps": 1, OPTION: 3}, headers=auth())
    assert other.status == 200
    # A field no registered generator declares is refused, for every model.
    unknown = await client.post(URL, json={"prompt": "a quilt", "model": MODEL, "patch_size": 8}, headers=auth())
    assert unknown.status == 400
    assert [error["loc"] for error in errors_of(await unknown.json())] == [["body", "patch_size"]]


async def test_its_settings_section_reaches_its_generator(installed, make_client, base_settings) -> None:
    # base_settings were loaded before the plugin was installed: give them its section as loading would.
    settings = dataclasses.replace(base_settings, plugins={**base_settings.plugins, SECTION: QuiltingSettings(max_patches=4)})
    client = await make_client(settings)
    response = await client.post(URL, json={"prompt": "a quilt", "model": MODEL, OPTION: 8}, headers=auth())
    assert response.status == 400
    [error] = errors_of(await response.json())
    assert error["loc"] == ["body", OPTION] and "quilting.max_patches" in error["msg"]


async def test_its_option_is_documented_from_the_plugin(installed, make_client, base_settings) -> None:
    client = await make_client(base_settings)
    document = await (await client.get("/imagine/openapi.json")).json()
    field = document["components"]["schemas"]["GenerateBody"]["properties"][OPTION]
    assert field["type"] == "integer" and (field["minimum"], field["maximum"]) == (1, 256)
    assert MODEL in field["description"] and "Patches along each side" in field["description"]
    reference = {"$ref": "#/components/schemas/GenerateBody"}
    for path in ("/generate", "/jobs"):
        assert document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] == reference


async def test_without_the_plugin_the_document_has_no_such_option(make_client, base_settings) -> None:
    client = await make_client(base_settings)
    document = await (await client.get("/imagine/openapi.json")).json()
    properties = document["components"]["schemas"]["GenerateBody"]["properties"]
    assert OPTION not in properties
    assert {"leonardo_model", "aspect_ratio", "preset_style", "quality"} <= set(properties)  # from the built-in plugin


def load_and_register(tmp_path: Path, text: str, environ: dict[str, str] | None = None):
    config = tmp_path / "imagine.toml"
    config.write_text(text)
    settings = load_settings(config, environ or {})
    return settings, collect_generators(plugin_manager(), settings)


def test_its_section_and_model_table_are_read_from_the_file_and_the_environment(installed, tmp_path) -> None:
    text = '[quilting]\nmax_patches = 8\n\n[models.quilt]\npalette = "/srv/palette.txt"\n'
    settings, registered = load_and_register(tmp_path, text, {"IMAGINE_QUILTING_MAX_PATCHES": "16"})
    assert settings.section(SECTION, QuiltingSettings).max_patches == 16  # the environment wins over the file
    assert registered[MODEL].max_patches == 16
    assert registered[MODEL].palette == "/srv/palette.txt"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[quilting]\nmax_patches = 0\n", "quilting.max_patches must be at least 1"),
        ("[quilting]\nmax_patches = 'many'\n", "quilting.max_patches: 'many' is not a valid int"),
        ("[quilting]\nmaximum = 3\n", "unknown setting quilting.maximum"),
        ("[models.quilt]\npalette = 3\n", "models.quilt.palette: 3 is not a valid str"),
        ("[models.quilt]\ncolours = 'red'\n", "unknown setting models.quilt.colours"),
        ("[models.quilts]\npalette = 'x'\n", "unknown setting models.quilts: no plugin registers a model named 'quilts'"),
    ],
)
def test_mistakes_in_its_settings_stop_the_start_with_the_setting_named(installed, tmp_path, text, message) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_and_register(tmp_path, text)


def test_its_demo_configuration_is_laid_over_the_settings(installed, tmp_path) -> None:
    assert [demo.name for demo in collect_demo_models(plugin_manager())][-1] == MODEL
    settings = demo_settings(load_settings(None, {}), tmp_path)
    assert settings.models.model_options(MODEL) == {"palette": str(tmp_path / PALETTE_FILE)}
    # The demo stands in until the configuration names a palette (a key its demo sets) of its own.
    assert names_weights(load_settings(None, {})) is False
    config = tmp_path / "imagine.toml"
    config.write_text('[models.quilt]\npalette = "/srv/palette.txt"\n')
    assert names_weights(load_settings(config, {})) is True


def test_a_demo_folder_built_before_the_plugin_came_is_built_again_with_its_demo(demo_folder, installed, tmp_path) -> None:
    import shutil

    folder = tmp_path / "demo-models"
    shutil.copytree(demo_folder, folder)
    assert prepare_demo_models(folder) is True
    assert (folder / PALETTE_FILE).read_text() == "255,0,0\n0,0,255\n"
    assert prepare_demo_models(folder) is False


def core_files_naming(pattern: str) -> set[str]:
    return {
        path.relative_to(CORE).as_posix()
        for path in CORE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and re.search(pattern, path.read_text(errors="ignore"), re.IGNORECASE)
    }


def test_the_core_names_neither_this_plugin_nor_the_built_in_models() -> None:
    assert core_files_naming(rf"{MODEL}|{OPTION}|{SECTION}") == set()
    # Where the core names a built-in model on purpose, and why.
    allowed = {
        "settings.py": "models.default: the model a request that names none gets",
        "devtools/bench.py": "the model benchmarked by default",
        "http/views/generate_image.py": "seed 004's route, which serves SDXL",
    }
    assert core_files_naming(r"leonardo|lightning|sdxl|turbo|sd15") <= set(allowed)


class CoreSectionClaim:
    @hookimpl
    def register_settings(self, register) -> None:
        register("queue", QuiltingSettings)


def test_a_plugin_claiming_a_core_settings_section_stops_the_start() -> None:
    with pytest.raises(PluginError, match="settings section 'queue' is registered by both the core and"):
        settings_sections(plugin_manager([CoreSectionClaim()]))


class WidthOption(Options):
    width: int = 64


class CoreFieldClaim:
    def __init__(self) -> None:
        self.generator = SlowGenerator(0.0)
        self.generator.name = "wide"
        self.generator.Options = WidthOption  # type: ignore[misc]

    @hookimpl
    def register_generators(self, register) -> None:
        register(self.generator)


def test_an_option_named_like_a_core_request_field_stops_the_start(base_settings) -> None:
    with pytest.raises(PluginError, match="option 'width' of model wide is a core request field"):
        create_app(base_settings, keys=KEYS, extra_plugins=(CoreFieldClaim(),))
