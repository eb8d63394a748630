"""Settings from TOML and IMAGINE_* variables, with defaults that start the service."""

from __future__ import annotations

import pytest

from imagine.devtools.demo_models import names_weights
from imagine.settings import Settings, SettingsError, load_settings


def write(tmp_path, text: str):
    path = tmp_path / "imagine.toml"
    path.write_text(text)
    return path


def test_no_file_gives_safe_defaults() -> None:
    settings = load_settings(None, {})
    assert settings.server.host == "127.0.0.1"  # not exposed until asked
    assert settings.server.port == 9000
    assert settings.server.base_path == "/imagine"
    assert settings.server.trusted_proxies == ()
    assert settings.auth.algorithm == "HS256"
    assert names_weights(settings) is False


def test_toml_with_model_tables_and_environment_overrides(tmp_path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 9100
trusted_proxies = ["127.0.0.1"]

[queue]
max_size = 8

[models]
default = "sdxl-turbo"
preload = ["sdxl-turbo"]

[models.sdxl-turbo]
source = "/srv/models/sdxl-turbo"
default_steps = 2
""",
    )
    settings = load_settings(path, {"IMAGINE_QUEUE_MAX_SIZE": "4", "IMAGINE_SERVER_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2"})
    assert settings.server.port == 9100
    assert settings.queue.max_size == 4  # the environment wins over the file
    assert settings.server.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert settings.models.default == "sdxl-turbo"
    assert settings.models.preload == ("sdxl-turbo",)
    assert settings.models.model_options("sdxl-turbo") == {"source": "/srv/models/sdxl-turbo", "default_steps": 2}
    assert names_weights(settings) is True


@pytest.mark.parametrize(
    ("text", "environment", "message"),
    [
        ("[queue]\nmax_size = 'many'\n", {}, "queue.max_size"),
        ("[queue]\nsize = 3\n", {}, "unknown setting queue.size"),
        ("[qeueu]\nmax_size = 3\n", {}, "unknown configuration section"),
        ("", {"IMAGINE_SERVER_PORT": "ninety"}, "server.port"),
        ("[server]\nbase_path = 'imagine/'\n", {}, "base_path"),
        ("[auth]\nalgorithm = 'none'\n", {}, "HS256, RS256 or ES256"),
        ("[auth]\nalgorithm = 'RS256'\n", {}, "public_key_file"),
        ("[models]\ndevice = 'tpu'\n", {}, "models.device"),
        ("[server\n", {}, "not valid TOML"),
        ("[output]\npng_compress_level = 6\n", {}, "between 0 and 3 with isal"),
        ("[output]\npng_deflate = 'zlib'\npng_compress_level = 10\n", {}, "between 0 and 9 with zlib"),
        ("[output]\npng_deflate = 'brotli'\n", {}, "png_deflate"),
        ("[output]\npng_threads = 0\n", {}, "png_threads must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(tmp_path, text, environment, message) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(write(tmp_path, text), environment)


def test_missing_file_is_an_error(tmp_path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", {})


def test_replace_keeps_settings_frozen() -> None:
    settings = Settings()
    changed = settings.replace(queue={"max_size": 2})
    assert changed.queue.max_size == 2 and settings.queue.max_size == 32
    with pytest.raises(AttributeError):
        settings.queue.max_size = 3  # type: ignore[misc]
