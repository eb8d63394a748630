"""The `imagine` command: serve, token, demo-models."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from imagine import __version__
from imagine.security.tokens import JwtKeys, JwtKeyError, load_jwt_keys, parse_duration, sign_token
from imagine.settings import Settings, SettingsError, load_settings

DEFAULT_CONFIG = Path("imagine.toml")
DEMO_TOKEN_TTL = "30d"
# The demo model a first request is fastest on (one step at 512²).
DEMO_TRY_IT_MODEL = "sdxl-turbo"


def _config_path(given: str | None) -> Path | None:
    """--config, else $IMAGINE_CONFIG, else ./imagine.toml when it exists."""
    if given:
        return Path(given)
    if os.environ.get("IMAGINE_CONFIG"):
        return Path(os.environ["IMAGINE_CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _settings_and_keys(config: str | None) -> tuple[Settings, JwtKeys]:
    settings = load_settings(_config_path(config))
    return settings, load_jwt_keys(settings.auth, Path(settings.server.state_dir))


def _banner(settings: Settings, keys: JwtKeys, host: str, port: int, demo_folder: Path | None) -> str:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown_host}:{port}{settings.server.base_path}"
    lines = [f"imagine {__version__} is serving on {url}"]
    if demo_folder is not None:
        lines.append(
            f"Serving the tiny DEMO models from {demo_folder}: their weights are random, so every image is noise. "
            "Point a config file at real weights for real images (see README)."
        )
    if keys.source == "development":
        token = sign_token(keys, settings.auth, sub="demo", scopes=("generate", "admin", "metrics"), ttl_s=parse_duration(DEMO_TOKEN_TTL))
        model = _try_it_model(settings, demo_folder)
        lines += [
            f"Tokens are signed with a development secret kept in {keys.location}; "
            "set IMAGINE_JWT_SECRET (32+ bytes) or auth.secret_file in production.",
            "",
            f"Token (sub=demo, scopes generate admin metrics, valid {DEMO_TOKEN_TTL}):",
            token,
            "",
            "Try it:",
            f"curl -H \"Authorization: Bearer {token}\" -H 'Content-Type: application/json' "
            f"-d '{{\"prompt\":\"a lighthouse at dusk\",\"model\":\"{model}\"}}' {url}/generate --output image.png",
        ]
    return "\n".join(lines)


def _try_it_model(settings: Settings, demo_folder: Path | None) -> str:
    """The model of the printed curl line: the demo's fastest, else the configured default."""
    return DEMO_TRY_IT_MODEL if demo_folder is not None else settings.models.default


def _with_models(settings: Settings) -> tuple[Settings, Path | None]:
    """The demo models stand in when no weights are configured (built on first use)."""
    from imagine.devtools.demo_models import demo_settings, names_weights, prepare_demo_models

    if names_weights(settings):
        return settings, None
    demo_folder = Path(settings.server.cache_dir) / "demo-models"
    print(f"No model weights configured: using the demo models in {demo_folder}", flush=True)
    if not demo_folder.exists():
        print("Building them (first run only, about ten seconds)...", flush=True)
    if prepare_demo_models(demo_folder):
        print("Built the demo models.", flush=True)
    settings = demo_settings(settings, demo_folder)
    # Loaded while the banner is read, so the printed curl line does not wait for it.
    preload = settings.models.preload
    if DEMO_TRY_IT_MODEL not in preload:
        settings = settings.replace(models={"preload": (*preload, DEMO_TRY_IT_MODEL)})
    return settings, demo_folder


# What the libraries print while loading, unless --verbose: progress bars for
# every component read or written, and advice (such as "torchvision is not
# installed") that a user of the service cannot act on. Set before they are
# imported, and only where the caller's environment has not chosen already.
QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DIFFUSERS_VERBOSITY": "error",
}


def _quiet_libraries() -> None:
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)


def _bare_access_lines() -> None:
    """Access lines are JSON already: one per line on stdout, without the diagnostics' prefix."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("imagine.access")
    access.addHandler(handler)
    access.propagate = False


def serve(arguments: argparse.Namespace) -> int:
    from imagine.http.app import create_app
    from imagine.http.server import run_app
    from imagine.http.shutdown import HANDLER_WAIT_S

    settings, keys = _settings_and_keys(arguments.config)
    host = arguments.host or settings.server.host
    port = arguments.port or settings.server.port
    settings, demo_folder = _with_models(settings)
    app = create_app(settings, keys=keys, handle_signals=True)
    banner = _banner(settings, keys, host, port, demo_folder)
    _bare_access_lines()
    run_app(app, host=host, port=port, shutdown_timeout=HANDLER_WAIT_S, on_ready=lambda: print(banner, flush=True))
    return 0


def token(arguments: argparse.Namespace) -> int:
    settings, keys = _settings_and_keys(arguments.config)
    models = [name.strip() for name in arguments.models.split(",") if name.strip()] if arguments.models else None
    print(
        sign_token(
            keys,
            settings.auth,
            sub=arguments.sub,
            scopes=arguments.scope.split(),
            ttl_s=parse_duration(arguments.ttl),
            models=models,
        )
    )
    return 0


def demo_models(arguments: argparse.Namespace) -> int:
    target = Path(arguments.directory)
    if arguments.full_size:
        from imagine.devtools.full_size_models import build_full_size_sdxl

        build_full_size_sdxl(target / "sdxl")
        print(
            f"Full-size SDXL with random weights written to {target / 'sdxl'}; to serve or bench it as both SDXL models:\n\n"
            f'[models.sdxl]\nsource = "{target / "sdxl"}"\n\n[models.sdxl-turbo]\nsource = "{target / "sdxl"}"'
        )
        return 0
    from imagine.devtools.demo_models import build_demo_models

    build_demo_models(target)
    print(f"Tiny random-weight demo models written to {target}")
    return 0


def plugins(arguments: argparse.Namespace) -> int:
    """Each loaded plugin, where it comes from, and the models and settings sections it registers."""
    from imagine.plugin.manager import describe_plugins, plugin_manager

    settings = load_settings(_config_path(arguments.config))
    for plugin in describe_plugins(plugin_manager(), settings):
        print(f"{plugin.name}  [{plugin.source}]")
        print(f"    models: {', '.join(plugin.models) or '-'}")
        if plugin.sections:
            print(f"    settings: {', '.join(f'[{section}]' for section in plugin.sections)}")
    return 0


def bench(arguments: argparse.Namespace) -> int:
    from imagine.devtools import bench as benchmark

    settings, _ = _with_models(load_settings(_config_path(arguments.config)))
    return benchmark.run(settings, arguments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagine", description="Self-hosted text-to-image service")
    parser.add_argument("--version", action="version", version=f"imagine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="also show the model libraries' progress bars and advice")

    serve_parser = commands.add_parser("serve", parents=[common], help="run the HTTP service")
    serve_parser.add_argument("--config", help="TOML settings file (default: ./imagine.toml if present)")
    serve_parser.add_argument("--host", help="address to listen on (default: server.host)")
    serve_parser.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve_parser.set_defaults(run=serve)

    token_parser = commands.add_parser("token", parents=[common], help="print a bearer token signed with the service's key")
    token_parser.add_argument("--config", help="TOML settings file (default: ./imagine.toml if present)")
    token_parser.add_argument("--sub", required=True, help="the caller's identity")
    token_parser.add_argument("--scope", default="generate", help='space-separated scopes, e.g. "generate admin"')
    token_parser.add_argument("--models", help="comma-separated models the token may use (default: all)")
    token_parser.add_argument("--ttl", default="30d", help="lifetime, e.g. 3600, 12h, 30d (default 30d)")
    token_parser.set_defaults(run=token)

    demo_parser = commands.add_parser("demo-models", parents=[common], help="write tiny random-weight models in the real layouts")
    demo_parser.add_argument("directory", help="folder to write them to")
    demo_parser.add_argument(
        "--full-size", action="store_true", help="SDXL's real architecture instead (random weights, about 7 GB), for benchmarks"
    )
    demo_parser.set_defaults(run=demo_models)

    plugins_parser = commands.add_parser(
        "plugins", parents=[common], help="list the loaded plugins, where they come from and their models"
    )
    plugins_parser.add_argument("--config", help="TOML settings file (default: ./imagine.toml if present)")
    plugins_parser.set_defaults(run=plugins)

    from imagine.devtools.bench import add_arguments

    bench_parser = commands.add_parser("bench", parents=[common], help="measure the service against the bare pipeline; prints a table")
    add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    if not arguments.verbose:
        _quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(arguments.run(arguments))
    except (SettingsError, JwtKeyError, ValueError) as error:
        print(f"imagine: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
