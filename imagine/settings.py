"""Settings: frozen dataclasses loaded from one TOML file plus IMAGINE_* overrides.

Every setting has a safe default, so `imagine serve` starts with no file at all.
Secrets (the JWT secret, cloud keys) are never read from here: they come from
the environment or from files named here (see `imagine.auth`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "IMAGINE_"


class SettingsError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _default_dir(xdg_variable: str, fallback: str) -> str:
    base = os.environ.get(xdg_variable) or str(Path.home() / fallback)
    return str(Path(base) / "imagine")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9000
    base_path: str = "/imagine"
    max_body_bytes: int = 16 * 1024 * 1024
    # Peers whose X-Forwarded-For is believed (addresses or CIDR networks).
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ("*",)
    # Where the development JWT secret and other service state live.
    state_dir: str = field(default_factory=lambda: _default_dir("XDG_STATE_HOME", ".local/state"))
    # Where the demo models are built on first run.
    cache_dir: str = field(default_factory=lambda: _default_dir("XDG_CACHE_HOME", ".cache"))

    def __post_init__(self) -> None:
        if not self.base_path.startswith("/") or self.base_path.endswith("/"):
            raise SettingsError("server.base_path must start with '/' and not end with one, e.g. '/imagine'")
        if not 0 < self.port < 65536:
            raise SettingsError("server.port must be between 1 and 65535")
        if self.max_body_bytes < 1024:
            raise SettingsError("server.max_body_bytes must be at least 1024")


@dataclass(frozen=True)
class AuthSettings:
    algorithm: str = "HS256"
    # HS256: the secret comes from IMAGINE_JWT_SECRET, else this file.
    secret_file: str = ""
    # RS256/ES256: the public key that verifies tokens.
    public_key_file: str = ""
    # RS256/ES256: only `imagine token` needs the private key.
    private_key_file: str = ""
    audience: str = ""
    issuer: str = ""
    leeway_s: float = 30.0

    def __post_init__(self) -> None:
        if self.algorithm not in ("HS256", "RS256", "ES256"):
            raise SettingsError("auth.algorithm must be HS256, RS256 or ES256")
        if self.algorithm != "HS256" and not self.public_key_file:
            raise SettingsError(f"auth.algorithm {self.algorithm} needs auth.public_key_file")
        if not 0 <= self.leeway_s <= 300:
            raise SettingsError("auth.leeway_s must be between 0 and 300")


@dataclass(frozen=True)
class RateLimitSettings:
    enabled: bool = True
    # "memory" keeps the buckets in this process.
    storage: str = "memory"
    global_rate: float = 10.0
    global_burst: int = 25
    ip_rate: float = 10.0
    ip_burst: int = 25
    subject_rate: float = 10.0
    subject_burst: int = 25

    def __post_init__(self) -> None:
        for name in ("global", "ip", "subject"):
            if getattr(self, f"{name}_rate") <= 0 or getattr(self, f"{name}_burst") < 1:
                raise SettingsError(f"ratelimit.{name}_rate must be > 0 and ratelimit.{name}_burst >= 1")
        if self.storage != "memory":
            raise SettingsError("ratelimit.storage must be 'memory'")


@dataclass(frozen=True)
class QueueSettings:
    max_size: int = 32
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise SettingsError("queue.max_size must be at least 1")
        if self.timeout_s <= 0:
            raise SettingsError("queue.timeout_s must be positive")


@dataclass(frozen=True)
class OutputSettings:
    # zlib level for PNG responses: 1 is about five times faster than 6 at 1024px.
    png_compress_level: int = 1
    # Threads that encode PNGs, so the device thread never waits for zlib.
    encode_workers: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.png_compress_level <= 9:
            raise SettingsError("output.png_compress_level must be between 0 and 9")
        if self.encode_workers < 1:
            raise SettingsError("output.encode_workers must be at least 1")


# Keys of a [models.<name>] table that name weights (Lightning names a base and checkpoints).
WEIGHT_KEYS = ("source", "base", "checkpoints")


@dataclass(frozen=True)
class ModelsSettings:
    default: str = "sdxl"
    # Models loaded at startup instead of on first use.
    preload: tuple[str, ...] = ()
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = float16 on a GPU, float32 on the CPU
    # Folder of LoRA .safetensors files that models taking LoRAs may apply.
    lora_dir: str = ""
    # Memory the loaded models may hold together, in GB; 0 means no limit.
    # Past it, the least recently used models are unloaded.
    memory_budget_gb: float = 0.0
    # One table per model, [models.<name>], read by the plugin that owns it:
    # source (local folder or hub id) and optional default/limit overrides.
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "mps", "cpu") and not self.device.startswith("cuda:"):
            raise SettingsError("models.device must be auto, cuda, cuda:N, mps or cpu")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise SettingsError("models.dtype must be auto, float16, bfloat16 or float32")
        if self.memory_budget_gb < 0:
            raise SettingsError("models.memory_budget_gb must be 0 (no limit) or positive")

    def model_options(self, name: str) -> Mapping[str, Any]:
        return self.options.get(name, {})

    @property
    def has_sources(self) -> bool:
        """True when the configuration names weights for at least one model."""
        return any(key in table for table in self.options.values() for key in WEIGHT_KEYS)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections changed: replace(queue={"max_size": 2})."""
        changed = {
            name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()
        }
        return dataclasses.replace(self, **changed)


_SECTION_TYPES = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value (or convert an environment string) to a field's type."""
    origin = typing.get_origin(annotation)
    from_env = isinstance(value, str) and annotation is not str
    if annotation is bool:
        if from_env:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if from_env:
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        items = [part.strip() for part in value.split(",") if part.strip()] if from_env else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            return tuple(items)
    elif origin is Mapping:
        if isinstance(value, Mapping):
            return {key: dict(table) for key, table in value.items()}
    raise SettingsError(f"{where}: {value!r} is not a valid {getattr(annotation, '__name__', annotation)}")


SECTIONS = tuple(_SECTION_TYPES)


def _build_section(name: str, values: Mapping[str, Any]) -> Any:
    cls = _SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {name}.{key}")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def _split_models_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """[models] mixes plain settings with one sub-table per model: keep them apart."""
    plain = {key: value for key, value in table.items() if not isinstance(value, Mapping)}
    per_model = {key: value for key, value in table.items() if isinstance(value, Mapping)}
    if per_model:
        plain["options"] = {**plain.get("options", {}), **per_model}
    return plain


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """IMAGINE_QUEUE_MAX_SIZE=8 becomes {"queue": {"max_size": "8"}}."""
    overrides: dict[str, dict[str, str]] = {}
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX):].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                if key != "options":
                    overrides.setdefault(section, {})[key] = value
                break
    return overrides


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply IMAGINE_* overrides, validate everything."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise SettingsError(f"configuration file {path} is not valid TOML: {error}") from None
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise SettingsError(f"unknown configuration section(s): {', '.join(sorted(unknown))}")
    merged: dict[str, dict[str, Any]] = {name: dict(raw.get(name, {})) for name in SECTIONS}
    merged["models"] = _split_models_table(merged["models"])
    for section, values in _environment_overrides(environ).items():
        merged[section].update(values)
    try:
        return Settings(**{name: _build_section(name, values) for name, values in merged.items()})
    except TypeError as error:
        raise SettingsError(str(error)) from None
