"""Settings: frozen dataclasses loaded from one TOML file plus IMAGINE_* overrides.

Every setting has a safe default, so `imagine serve` starts with no file at all.
Secrets (the JWT secret, cloud keys) are never read from here: they come from
the environment or from files named here (see `imagine.security.tokens`).

The core knows its own sections only. Plugins own the rest: a top-level
section a plugin claims (`register_settings`) is read into the plugin's
dataclass here, with the same checks as the core's; a `[models.<name>]` table
is kept as it is until the model's plugin parses it (`ModelsSettings.table`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "IMAGINE_"
# server.max_input_pixels at most: the largest canvas a request may ask for
# (8192 x 8192), below Pillow's own decompression-bomb limit (about 89
# megapixels), so Pillow's guard never refuses what this setting allows.
MAX_INPUT_PIXELS = 8192 * 8192
T = TypeVar("T")


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
    # A request body that has not fully arrived by then is refused (408): a
    # stalled upload would otherwise hold its connection and handler forever.
    body_timeout_s: float = 30.0
    # The most pixels an input image (init_image, mask_image) may declare in its
    # header; larger ones are refused before any pixel is decoded.
    max_input_pixels: int = 4096 * 4096
    # Peers whose X-Forwarded-For is believed (addresses or CIDR networks).
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ("*",)
    # Where the development JWT secret and other service state live.
    state_dir: str = field(default_factory=lambda: _default_dir("XDG_STATE_HOME", ".local/state"))
    # Where the demo models are built on first run.
    cache_dir: str = field(default_factory=lambda: _default_dir("XDG_CACHE_HOME", ".cache"))
    # How clients reach this service, e.g. "https://images.example.com" (origin
    # only: base_path is appended). Used for absolute links such as signed
    # image URLs; empty = the request's own scheme and Host.
    public_url: str = ""
    # One structured line per request on the `imagine.access` logger (replaces aiohttp's).
    access_log: bool = True
    # On SIGTERM, accepted work (queued and running generations, jobs) may finish
    # for this long while new work is refused (503); then the rest fails. Keep
    # deploy/imagine@.service's TimeoutStopSec about 30 s above it.
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.base_path.startswith("/") or self.base_path.endswith("/"):
            raise SettingsError("server.base_path must start with '/' and not end with one, e.g. '/imagine'")
        if not 0 < self.port < 65536:
            raise SettingsError("server.port must be between 1 and 65535")
        if self.max_body_bytes < 1024:
            raise SettingsError("server.max_body_bytes must be at least 1024")
        if not 0 < self.body_timeout_s <= 3600:
            raise SettingsError("server.body_timeout_s must be more than 0 and at most 3600 seconds")
        if not 64 * 64 <= self.max_input_pixels <= MAX_INPUT_PIXELS:
            raise SettingsError(f"server.max_input_pixels must be between 4096 and {MAX_INPUT_PIXELS}")
        if self.public_url:
            parts = urllib.parse.urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
                raise SettingsError("server.public_url must be an origin such as 'https://images.example.com'")
        if not 0 <= self.shutdown_grace_s <= 3600:
            raise SettingsError("server.shutdown_grace_s must be between 0 and 3600 seconds")


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


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class RateLimitSettings:
    enabled: bool = True
    # "memory" keeps the buckets in this process; "redis://host:port/db" (or
    # rediss://, unix://) shares them between every replica that names the same Redis.
    storage: str = "memory"
    # While Redis cannot be reached: "closed" refuses with 503, "local" falls back
    # to this process's own buckets (so N replicas admit up to N times a bucket).
    redis_failure: str = "closed"
    # Per Redis call: a limiter that waits longer than this is worse than none.
    redis_timeout_s: float = 0.5
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
        if self.storage != "memory" and not self.storage.startswith(REDIS_SCHEMES):
            raise SettingsError("ratelimit.storage must be 'memory' or a Redis URL (redis://, rediss://, unix://)")
        if self.redis_failure not in ("closed", "local"):
            raise SettingsError("ratelimit.redis_failure must be 'closed' or 'local'")
        if not 0 < self.redis_timeout_s <= 10:
            raise SettingsError("ratelimit.redis_timeout_s must be between 0 and 10")

    @property
    def shared(self) -> bool:
        """True when the buckets live in Redis, shared by every replica."""
        return self.storage != "memory"


@dataclass(frozen=True)
class QueueSettings:
    max_size: int = 32
    timeout_s: float = 300.0
    # "memory": this process's queue and jobs; "redis://...": one queue and job
    # store shared by every replica that names the same Redis (see imagine.cluster).
    storage: str = "memory"
    # Shared queue only: a worker that has not reported on its work for this long
    # is taken for dead, and another worker claims the work.
    visibility_timeout_s: float = 30.0
    # Shared queue only: how many times a job may start before it fails instead of running again.
    max_attempts: int = 3
    # Work the device is ready for goes before work that needs a model loaded again (or a Lightning
    # checkpoint swapped in), for at most as long as that takes; false: strict turns between callers.
    defer_switches: bool = True

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise SettingsError("queue.max_size must be at least 1")
        if self.timeout_s <= 0:
            raise SettingsError("queue.timeout_s must be positive")
        if self.storage != "memory" and not self.storage.startswith(REDIS_SCHEMES):
            raise SettingsError("queue.storage must be 'memory' or a Redis URL (redis://, rediss://, unix://)")
        if self.visibility_timeout_s < 1:
            raise SettingsError("queue.visibility_timeout_s must be at least 1")
        if self.max_attempts < 1:
            raise SettingsError("queue.max_attempts must be at least 1")

    @property
    def shared(self) -> bool:
        """True when the queue and jobs live in Redis, shared by every replica."""
        return self.storage != "memory"


@dataclass(frozen=True)
class BatchSettings:
    # Images per pipeline call; compatible queued requests share one call up to this.
    max_size: int = 4
    # How long the device may wait for more compatible requests; 0 batches only
    # what is already queued, so a lone request never waits.
    max_wait_ms: float = 0.0
    # Cap each batch at the size its shape (model, size, steps) has measured fastest, up to max_size
    # (imagine.engine.batch_sizing); false: always fill up to max_size.
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise SettingsError("batch.max_size must be at least 1")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise SettingsError("batch.max_wait_ms must be between 0 and 10000")


@dataclass(frozen=True)
class JobsSettings:
    # Finished jobs are kept this long for GET /jobs/{id}; the images stay in the gallery.
    ttl_s: float = 3600.0
    max_per_subject: int = 100
    # A progress event carries a latent preview every this many steps (when asked for).
    preview_every: int = 5
    # Seconds between keep-alive comments on an idle event stream.
    keepalive_s: float = 15.0
    # Event streams (job progress, streamed chat answers) one caller may hold open at once, per replica.
    max_streams_per_subject: int = 16

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.keepalive_s <= 0:
            raise SettingsError("jobs.ttl_s and jobs.keepalive_s must be positive")
        if self.max_per_subject < 1 or self.preview_every < 1 or self.max_streams_per_subject < 1:
            raise SettingsError("jobs.max_per_subject, jobs.preview_every and jobs.max_streams_per_subject must be at least 1")


# The highest compression level of each deflate implementation.
_DEFLATE_TOP_LEVELS = {"isal": 3, "zlib": 9}


@dataclass(frozen=True)
class OutputSettings:
    # Deflate for PNGs: "isal" (ISA-L, levels 0-3, about twice as fast) or "zlib" (levels 0-9).
    png_deflate: str = "isal"
    # 0 stores the pixels uncompressed; 1 is the fastest real compression.
    png_compress_level: int = 1
    # zlib strategy (png_deflate = "zlib" only): huffman_only (fastest), rle, filtered, default.
    png_strategy: str = "huffman_only"
    # Threads that deflate one large PNG side by side, each a piece of its rows
    # (1: the encoding thread alone). Two cut a 512px PNG from about 7 to 4 ms.
    png_threads: int = 2
    # Threads that encode PNGs, so the device thread never waits for deflate. One
    # keeps up with a GPU (a 512px PNG takes milliseconds) and, on a CPU-only
    # box, leaves the cores to torch: two measured up to 15% slower batching there.
    encode_workers: int = 1

    def __post_init__(self) -> None:
        top_level = _DEFLATE_TOP_LEVELS.get(self.png_deflate)
        if top_level is None:
            raise SettingsError('output.png_deflate must be "isal" or "zlib"')
        if not 0 <= self.png_compress_level <= top_level:
            raise SettingsError(f"output.png_compress_level must be between 0 and {top_level} with {self.png_deflate}")
        if self.png_strategy not in ("huffman_only", "rle", "filtered", "default"):
            raise SettingsError("output.png_strategy must be huffman_only, rle, filtered or default")
        if self.encode_workers < 1 or self.png_threads < 1:
            raise SettingsError("output.encode_workers and output.png_threads must be at least 1")


COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead", "trace")


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
    # "a1111": prompts take AUTOMATIC1111's (word:1.3) weights and <lora:name:weight> tags; "plain": read literally.
    prompt_syntax: str = "a1111"
    # Speed-ups the pipelines apply when they load (see the README's GPU switches).
    # "sdpa": torch's fused scaled-dot-product attention; "eager": diffusers' plain attention.
    attention: str = "sdpa"
    # UNet and VAE in channels-last memory format (faster convolutions on most GPUs).
    channels_last: bool = False
    # TensorFloat-32 matrix products and convolutions (CUDA, Ampere or newer).
    tf32: bool = False
    # torch.compile of the UNet and the VAE decoder, at load time: "off", "default", "max-autotune",
    # "reduce-overhead" (CUDA graphs, CUDA only), or "trace" (graph capture without code generation).
    compile: str = "off"
    # One table per model, [models.<name>], as written: the plugin that owns
    # the model parses it (`table`).
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "mps", "cpu") and not self.device.startswith("cuda:"):
            raise SettingsError("models.device must be auto, cuda, cuda:N, mps or cpu")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise SettingsError("models.dtype must be auto, float16, bfloat16 or float32")
        if self.memory_budget_gb < 0:
            raise SettingsError("models.memory_budget_gb must be 0 (no limit) or positive")
        if self.prompt_syntax not in ("a1111", "plain"):
            raise SettingsError('models.prompt_syntax must be "a1111" or "plain"')
        if self.attention not in ("sdpa", "eager"):
            raise SettingsError('models.attention must be "sdpa" or "eager"')
        if self.compile not in COMPILE_MODES:
            raise SettingsError(f"models.compile must be one of {', '.join(COMPILE_MODES)}")
        if self.device == "cpu" and (self.tf32 or self.compile == "reduce-overhead"):
            raise SettingsError("models.tf32 and models.compile = \"reduce-overhead\" (CUDA graphs) need a CUDA device")

    def model_options(self, name: str) -> Mapping[str, Any]:
        """The `[models.<name>]` table as written (empty when there is none)."""
        return self.options.get(name, {})

    def table(self, name: str, cls: type[T]) -> T:
        """The `[models.<name>]` table as the plugin's frozen dataclass `cls`; a mistake names its setting."""
        return build_table(cls, self.model_options(name), f"models.{name}")


@dataclass(frozen=True)
class StorageSettings:
    # Gallery PNGs and their SQLite index; empty = "<server.state_dir>/gallery".
    # One process (or several on one host) per folder: SQLite needs a local disk.
    dir: str = ""


# The longest a signed image link may stay valid.
MAX_URL_TTL_S = 7 * 86400


@dataclass(frozen=True)
class GallerySettings:
    # Retention: the oldest images go first once there are more than this; 0 = no limit.
    # A bound on the whole gallery's disk: whoever generates most pushes out anyone's oldest.
    max_images: int = 0
    # Retention per caller: a subject's oldest images go once it has more than this, so one
    # caller's volume never removes another's images; 0 = no limit.
    max_images_per_subject: int = 0
    # Retention: images older than this are removed; 0 = kept forever.
    max_age_days: float = 0.0
    # How long a signed image URL (OpenAI `response_format: "url"`) stays valid.
    url_ttl_s: int = 3600
    # The URL-signing secret every replica shares (else IMAGINE_URL_SECRET, else one generated in the state folder).
    url_secret_file: str = ""
    # One gallery for every replica: the index in PostgreSQL ("postgresql://host/db"; the password
    # from PGPASSWORD or a passfile) and the PNGs in S3-compatible storage ("s3://bucket/prefix";
    # credentials from the standard AWS variables or files). Both or neither; neither = embedded.
    database: str = ""
    objects: str = ""
    # S3-compatible stores (MinIO, Ceph, R2, GCS): their endpoint, region and path-style addressing.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_path_style: bool = False
    # Shared gallery: answer GET /gallery/{id}.png with 307 to a short-lived presigned object URL
    # instead of streaming the PNG through the replica. Only where clients can reach the bucket.
    redirect: bool = False
    # Shared gallery: the sweep removes objects without a row only once they are this old, so an image
    # between its upload and its commit is never taken. Keep it above any clock skew to the bucket.
    orphan_grace_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_images < 0 or self.max_images_per_subject < 0:
            raise SettingsError("gallery.max_images and gallery.max_images_per_subject must be 0 (no limit) or more")
        if self.max_age_days < 0:
            raise SettingsError("gallery.max_age_days must be 0 (forever) or more")
        if not 1 <= self.url_ttl_s <= MAX_URL_TTL_S:
            raise SettingsError(f"gallery.url_ttl_s must be between 1 and {MAX_URL_TTL_S} (a week)")
        if bool(self.database) != bool(self.objects):
            raise SettingsError("gallery.database and gallery.objects go together (a shared gallery needs both)")
        if self.database and urllib.parse.urlsplit(self.database).scheme not in ("postgresql", "postgres"):
            raise SettingsError("gallery.database must be a PostgreSQL URL, e.g. 'postgresql://db.internal/imagine'")
        if self.objects:
            parts = urllib.parse.urlsplit(self.objects)
            if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
                raise SettingsError("gallery.objects must be an S3 URL, e.g. 's3://bucket/prefix'")
        if self.s3_endpoint_url and urllib.parse.urlsplit(self.s3_endpoint_url).scheme not in ("http", "https"):
            raise SettingsError("gallery.s3_endpoint_url must be an http:// or https:// URL")
        if not 1 <= self.orphan_grace_s <= 86400:
            raise SettingsError("gallery.orphan_grace_s must be between 1 and 86400 seconds")
        if self.redirect and not self.shared:
            raise SettingsError("gallery.redirect needs a shared gallery (gallery.database and gallery.objects)")

    @property
    def shared(self) -> bool:
        """True when every replica that names the same database and bucket shares one gallery."""
        return bool(self.database)



@dataclass(frozen=True)
class WebhookSettings:
    # Host patterns a webhook_url may name: "hooks.example.com", "*.example.com" (any subdomain), "*"
    # (any public host). Empty: webhooks are off. Only a pattern without "*" (an exact host name or
    # address) lets its host resolve to a loopback, link-local or private address.
    allowed_hosts: tuple[str, ...] = ()
    # The signing secret, Standard Webhooks style ("whsec_" + base64): prefer IMAGINE_WEBHOOKS_SECRET
    # or secret_file to writing it here.
    secret: str = ""
    secret_file: str = ""
    # Attempts per delivery; the n-th retry waits backoff_s * 2^(n-1), at most max_backoff_s.
    max_attempts: int = 8
    backoff_s: float = 5.0
    max_backoff_s: float = 3600.0
    # One attempt (connect, send, read the answer) may take this long.
    timeout_s: float = 10.0
    # At most this much of a receiver's answer is read.
    max_response_bytes: int = 65536

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 100:
            raise SettingsError("webhooks.max_attempts must be between 1 and 100")
        if not 0 < self.backoff_s <= self.max_backoff_s <= 86400:
            raise SettingsError("webhooks.backoff_s must be more than 0 and at most webhooks.max_backoff_s (at most 86400)")
        if not 0 < self.timeout_s <= 300:
            raise SettingsError("webhooks.timeout_s must be more than 0 and at most 300")
        if not 0 <= self.max_response_bytes <= 16 * 1024 * 1024:
            raise SettingsError("webhooks.max_response_bytes must be between 0 and 16777216")

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_hosts)


@dataclass(frozen=True)
class QuotaSettings:
    # Images each subject may generate per UTC day and per UTC month; 0 = no limit. A token's
    # `quota` claim overrides these for that token.
    images_per_day: int = 0
    images_per_month: int = 0
    # Per-model limits on top: { sdxl = { images_per_day = 50, images_per_month = 1000 } }.
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images_per_day < 0 or self.images_per_month < 0:
            raise SettingsError("quotas.images_per_day and quotas.images_per_month must be 0 (no limit) or more")
        for model, limits in self.models.items():
            unknown = set(limits) - {"images_per_day", "images_per_month"}
            if unknown:
                raise SettingsError(f"unknown setting quotas.models.{model}.{sorted(unknown)[0]}")
            for name, value in limits.items():
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise SettingsError(f"quotas.models.{model}.{name} must be a whole number, 0 (no limit) or more")

DEFAULT_CHAT_SYSTEM_PROMPT = (
    "You are the assistant of an image-generation service. Answer briefly and helpfully; when asked for an "
    "image prompt, write one vivid, concrete prompt. A user can type '#generate <prompt>' to create an image."
)


@dataclass(frozen=True)
class AssistantSettings:
    # The Ollama server the assistant talks to, e.g. "http://127.0.0.1:11434"; empty = no assistant
    # (its routes answer 503 saying so). A bearer token for an Ollama behind a proxy comes from
    # OLLAMA_API_KEY, else the file named by api_key_file.
    ollama_url: str = ""
    api_key_file: str = ""
    chat_model: str = "llama3.2"
    vision_model: str = "llava"
    connect_timeout_s: float = 5.0
    # The longest one answer (or one pause between streamed tokens) may take.
    timeout_s: float = 120.0
    # Messages of a session kept and sent back to the model (the oldest go first).
    max_history_messages: int = 20
    # Sessions each subject keeps; the least recently used go first.
    max_sessions: int = 100
    system_prompt: str = DEFAULT_CHAT_SYSTEM_PROMPT
    # The model '#generate' uses; empty = models.default.
    generate_model: str = ""
    # How long /status and /health trust the last look at the server's models.
    status_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if self.ollama_url and urllib.parse.urlsplit(self.ollama_url).scheme not in ("http", "https"):
            raise SettingsError("assistant.ollama_url must be an http:// or https:// URL, e.g. 'http://127.0.0.1:11434'")
        if not self.chat_model or not self.vision_model:
            raise SettingsError("assistant.chat_model and assistant.vision_model must name Ollama models")
        if not 0 < self.connect_timeout_s <= 300 or not 0 < self.timeout_s <= 3600:
            raise SettingsError("assistant.connect_timeout_s (up to 300) and assistant.timeout_s (up to 3600) must be more than 0")
        if not 1 <= self.max_history_messages <= 1000:
            raise SettingsError("assistant.max_history_messages must be between 1 and 1000")
        if not 1 <= self.max_sessions <= 100_000:
            raise SettingsError("assistant.max_sessions must be between 1 and 100000")
        if not 0 < self.status_ttl_s <= 3600:
            raise SettingsError("assistant.status_ttl_s must be more than 0 and at most 3600")

    @property
    def configured(self) -> bool:
        return bool(self.ollama_url)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    models: ModelsSettings = field(default_factory=ModelsSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    gallery: GallerySettings = field(default_factory=GallerySettings)
    assistant: AssistantSettings = field(default_factory=AssistantSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    # The sections plugins claim (`register_settings`), by name, each its plugin's dataclass.
    plugins: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str, cls: type[T]) -> T:
        """A plugin's own section as loaded; its defaults when these settings were not loaded (`Settings()`)."""
        loaded = self.plugins.get(name)
        if loaded is None:
            return cls()
        if not isinstance(loaded, cls):
            raise SettingsError(f"section [{name}] was loaded as {type(loaded).__name__}, not {cls.__name__}")
        return loaded

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections changed: replace(queue={"max_size": 2}), plugins' sections too."""
        changed: dict[str, Any] = {}
        plugins = dict(self.plugins)
        for name, values in sections.items():
            if name in _SECTION_TYPES:
                changed[name] = dataclasses.replace(getattr(self, name), **values)
            elif name in plugins:
                plugins[name] = dataclasses.replace(plugins[name], **values)
            else:
                raise SettingsError(f"unknown configuration section(s): {name}")
        return dataclasses.replace(self, **changed, plugins=plugins)


# The core's own sections: every field of Settings but the plugins' mapping.
_SECTION_TYPES = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings) if f.name != "plugins"
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value (or convert an environment string) to a field's type."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and len(arguments) == 2 and type(None) in arguments:
        # TOML has no null: an optional setting is either absent or of its type.
        (annotation,) = [argument for argument in arguments if argument is not type(None)]
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
            return dict(value)
    raise SettingsError(f"{where}: {value!r} is not a valid {getattr(annotation, '__name__', annotation)}")


SECTIONS = tuple(_SECTION_TYPES)


def build_table(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """A TOML table (or IMAGINE_* strings) as the frozen dataclass `cls`, every mistake naming `<where>.<key>`.

    Field types may be bool, int, float, str, tuple[str, ...], a Mapping or any
    of them `| None`; `__post_init__` checks the values.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {where}.{key}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise SettingsError(f"{where}: {error}") from None


def _split_models_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """[models] mixes plain settings with one sub-table per model: keep them apart."""
    plain = {key: value for key, value in table.items() if not isinstance(value, Mapping)}
    per_model = {key: value for key, value in table.items() if isinstance(value, Mapping)}
    if per_model:
        plain["options"] = {**plain.get("options", {}), **per_model}
    return plain


def _environment_overrides(environ: Mapping[str, str], sections: Sequence[str]) -> dict[str, dict[str, str]]:
    """IMAGINE_QUEUE_MAX_SIZE=8 becomes {"queue": {"max_size": "8"}}."""
    overrides: dict[str, dict[str, str]] = {}
    # Longest first: a section named like the start of another must not take its variables.
    by_length = sorted(sections, key=len, reverse=True)
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX):].lower()
        for section in by_length:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                if key != "options":
                    overrides.setdefault(section, {})[key] = value
                break
    return overrides


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None, plugin_sections: Mapping[str, type] | None = None
) -> Settings:
    """Read the TOML file (if any), apply IMAGINE_* overrides, validate everything.

    `plugin_sections` are the sections plugins claim; by default those of the
    built-in and installed plugins.
    """
    environ = os.environ if environ is None else environ
    if plugin_sections is None:
        from imagine.plugin.manager import plugin_manager, settings_sections

        plugin_sections = settings_sections(plugin_manager())
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise SettingsError(f"configuration file {path} is not valid TOML: {error}") from None
    every_section = {**plugin_sections, **_SECTION_TYPES}
    unknown = set(raw) - set(every_section)
    if unknown:
        raise SettingsError(f"unknown configuration section(s): {', '.join(sorted(unknown))}")
    merged: dict[str, dict[str, Any]] = {name: dict(raw.get(name, {})) for name in every_section}
    merged["models"] = _split_models_table(merged["models"])
    for section, values in _environment_overrides(environ, tuple(every_section)).items():
        merged[section].update(values)
    built = {name: build_table(cls, merged[name], name) for name, cls in every_section.items()}
    return Settings(
        **{name: built[name] for name in _SECTION_TYPES},
        plugins={name: built[name] for name in plugin_sections},
    )
