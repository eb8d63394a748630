"""The `imagine` command: serve, worker, token, demo-models, plugins, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imagine import __version__
from imagine.security.tokens import JwtKeys, JwtKeyError, load_jwt_keys, parse_duration, sign_token
from imagine.settings import Settings, SettingsError, load_settings

DEFAULT_CONFIG = Path("imagine.toml")
DEMO_TOKEN_TTL = "30d"


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


def _banner(settings: Settings, keys: JwtKeys, host: str, port: int, demo_folder: Path | None, model: str) -> str:
    """What `imagine serve` prints once ready; `model` is the one its curl line asks for."""
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


def _with_models(settings: Settings) -> tuple[Settings, Path | None, str]:
    """The demo models stand in when no weights are configured (built on first use).

    Also the model a first request should try: the configured default, or the
    demo model a plugin offers as answering at once (loaded at start-up then).
    """
    from imagine.devtools.demo_models import demo_settings, names_weights, offered_demo_models, prepare_demo_models

    if names_weights(settings):
        return settings, None, settings.models.default
    demo_folder = Path(settings.server.cache_dir) / "demo-models"
    print(f"No model weights configured: using the demo models in {demo_folder}", flush=True)
    if not demo_folder.exists():
        print("Building them (first run only, about ten seconds)...", flush=True)
    if prepare_demo_models(demo_folder):
        print("Built the demo models.", flush=True)
    settings = demo_settings(settings, demo_folder)
    try_it = next((demo.try_it for demo in offered_demo_models() if demo.try_it), None)
    if try_it is None:
        return settings, demo_folder, settings.models.default
    # Loaded while the banner is read, so the printed curl line does not wait for it.
    preload = settings.models.preload
    if try_it not in preload:
        settings = settings.replace(models={"preload": (*preload, try_it)})
    return settings, demo_folder, try_it


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
    settings, demo_folder, try_it = _with_models(settings)
    if arguments.no_device:
        # The API tier loads nothing: the workers' devices run its work.
        settings = settings.replace(models={"preload": ()})
    app = create_app(settings, keys=keys, handle_signals=True, role="api" if arguments.no_device else "serve")
    banner = _banner(settings, keys, host, port, demo_folder, try_it)
    _bare_access_lines()
    run_app(app, host=host, port=port, shutdown_timeout=HANDLER_WAIT_S, on_ready=lambda: print(banner, flush=True))
    return 0


def worker(arguments: argparse.Namespace) -> int:
    """A device pulling from the shared queue, answering only /livez and /metrics."""
    from imagine.http.app import create_app
    from imagine.http.server import run_app
    from imagine.http.shutdown import HANDLER_WAIT_S

    settings, keys = _settings_and_keys(arguments.config)
    host = arguments.host or settings.server.host
    port = arguments.port or settings.server.port
    settings, _, _ = _with_models(settings)
    app = create_app(settings, keys=keys, handle_signals=True, role="worker")
    ready = f"imagine worker: pulling from the shared queue; /livez and /metrics on http://{host}:{port}{settings.server.base_path}"
    run_app(app, host=host, port=port, shutdown_timeout=HANDLER_WAIT_S, on_ready=lambda: print(ready, flush=True))
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
        from imagine.devtools.demo_models import offered_demo_models

        offers = [demo for demo in offered_demo_models() if demo.full_size is not None]
        if not offers:
            print("imagine: no plugin offers full-size demo models", file=sys.stderr)
            return 2
        for demo in offers:
            assert demo.full_size is not None
            served = demo.full_size(target)
            print(f"Full-size {demo.name} with random weights written under {target}; to serve or bench it:\n")
            print(_toml_tables(served))
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


def _toml_tables(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """Settings shaped like the TOML file (section -> table -> key -> text), as TOML to paste."""
    return "\n\n".join(
        f"[{section}.{name}]\n" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in table.items())
        for section, tables in settings.items()
        for name, table in tables.items()
    )


def bench(arguments: argparse.Namespace) -> int:
    from imagine.devtools import bench as benchmark

    settings, _, _ = _with_models(load_settings(_config_path(arguments.config)))
    return benchmark.run(settings, arguments)


def gallery_migrate(arguments: argparse.Namespace) -> int:
    """Copy the embedded gallery (of --config's state folder) into a shared one; safe to run again."""
    import asyncio

    from imagine.errors import ApiError
    from imagine.storage.migrate import migrate_to_shared

    settings = load_settings(_config_path(arguments.config))
    try:
        report = asyncio.run(migrate_to_shared(settings, database=arguments.to, objects=arguments.objects))
    except ApiError as error:
        print(f"imagine: {error.message}", file=sys.stderr)
        return 1
    print(
        f"Copied {report.copied} image(s) into the shared gallery; {report.already_there} were there already"
        + (f", {report.missing_png} had no PNG left to copy" if report.missing_png else "")
    )
    return 0


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
    serve_parser.add_argument(
        "--no-device", action="store_true", help="HTTP only: an API tier whose work the workers' devices run (needs queue.storage)"
    )
    serve_parser.set_defaults(run=serve)

    worker_parser = commands.add_parser(
        "worker", parents=[common], help="run a device that pulls work from the shared queue (queue.storage)"
    )
    worker_parser.add_argument("--config", help="TOML settings file (default: ./imagine.toml if present)")
    worker_parser.add_argument("--host", help="address of /livez and /metrics (default: server.host)")
    worker_parser.add_argument("--port", type=int, help="port of /livez and /metrics (default: server.port)")
    worker_parser.set_defaults(run=worker)

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
        "--full-size", action="store_true", help="the real architectures instead (random weights, gigabytes), for benchmarks"
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

    gallery_parser = commands.add_parser("gallery", help="manage the gallery")
    gallery_commands = gallery_parser.add_subparsers(dest="gallery_command", required=True)
    migrate_parser = gallery_commands.add_parser(
        "migrate", parents=[common], help="copy the embedded gallery into a shared one (PostgreSQL + S3); running it again copies nothing twice"
    )
    migrate_parser.add_argument("--config", help="TOML settings file: the embedded gallery's folder, gallery.s3_* (default: ./imagine.toml if present)")
    migrate_parser.add_argument("--to", required=True, metavar="POSTGRESQL_URL", help="the shared gallery's database")
    migrate_parser.add_argument("--objects", required=True, metavar="S3_URL", help="the shared gallery's bucket, s3://bucket/prefix")
    migrate_parser.set_defaults(run=gallery_migrate)
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
