"""Settings: one attrs record built from the environment and the original's env files.

Precedence (highest first), as the original server had it: the process environment, `.env`,
`config/payment.env`, `config/llamacpp.env`, then the built-in default. Relative paths in files and
values are resolved against the directory the server runs in (`root`).

Every problem is reported at once, each naming the variable, the bad value, where it came from and
what to do about it, so a misconfigured server never starts half-way.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from dotenv import dotenv_values

from .engine.model_specs import ModelSpec, default_name, parse_models
from .engine.worker_specs import WorkerSpec, WorkerSpecError, parse_workers, resolve_keys, show_workers

__all__ = [
    "DEFAULT_TEMPLATE_FILE",
    "ENV_FILES",
    "JWT_SECRET_FILE",
    "Settings",
    "SettingsError",
    "default_model_path",
    "ensure_jwt_secret",
    "load_settings",
]

#: Env files in precedence order (earlier wins), relative to the server's root directory.
ENV_FILES = (".env", "config/payment.env", "config/llamacpp.env")
#: Where a development run keeps its generated JWT secret (git-ignored).
JWT_SECRET_FILE = ".ktulhu/jwt_secret"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIN_JWT_SECRET_BYTES = 32


#: The ChatML template used for a model whose GGUF embeds none (CHAT_TEMPLATE_PATH=auto).
DEFAULT_TEMPLATE_FILE = "chat_template.jinja"


def default_model_path() -> str:
    return f"models/{DEFAULT_MODEL_FILE}"


class SettingsError(Exception):
    """The configuration cannot be used; `problems` holds one human-readable line per variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class _Invalid(ValueError):
    """Raised by a parser: `reason` says what is wrong, `fix` what to write instead."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


# --- parsers: str -> value, raising _Invalid ---------------------------------------------------


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    bounds = _bounds_text(lo, hi)

    def parse(raw: str) -> int:
        try:
            value = int(raw.strip(), 10)
        except ValueError:
            raise _Invalid("not a whole number", f"set a whole number{bounds}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _Invalid(f"out of range{bounds}", f"set a whole number{bounds}")
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    bounds = _bounds_text(lo, hi)

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise _Invalid("not a number", f"set a decimal number{bounds}, e.g. 0.7") from None
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _Invalid(f"out of range{bounds}", f"set a decimal number{bounds}")
        return value

    return parse


def _bounds_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    if hi is not None:
        return f" of at most {hi}"
    return ""


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise _Invalid("not one of the accepted values", "set one of: " + ", ".join(allowed))
        return value

    return parse


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _Invalid("not a yes/no value", "set 1 or 0")


def _text(raw: str) -> str:
    if "\x00" in raw:
        raise _Invalid("contains a NUL byte", "remove control characters")
    return raw.strip()


def _url(raw: str) -> str:
    value = _text(raw)
    if not re.match(r"^https?://[^\s/]+", value):
        raise _Invalid("not an http(s) URL", "set a full URL such as https://example.com/payment/success")
    return value


def _host(raw: str) -> str:
    value = _text(raw)
    if not value or not re.fullmatch(r"[A-Za-z0-9_.:\-\[\]]+", value):
        raise _Invalid("not a host name or IP address", "set e.g. 0.0.0.0, 127.0.0.1 or ::")
    return value


def _router_device(raw: str) -> str:
    value = raw.strip().lower()
    if not re.fullmatch(r"auto|cpu|(cuda|gpu)(:\d+)?", value):
        raise _Invalid("not a device name", "set auto, cpu, cuda or cuda:N")
    return value


def _networks(raw: str) -> str:
    """Comma-separated addresses or CIDR networks, normalised (`10.0.0.0/8,::1/128`); empty = none."""
    networks = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        if "%" in entry or not entry.isascii():
            raise _Invalid(f"{entry[:60]!r} is not an IP address or CIDR network",
                           "list addresses or networks without zone ids, e.g. 127.0.0.1,10.0.0.0/8,fd00::/8")
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise _Invalid(f"{entry[:60]!r} is not an IP address or CIDR network",
                               "set comma-separated addresses or networks of your reverse proxies, "
                               "e.g. 127.0.0.1,10.0.0.0/8,fd00::/8") from None
            raise _Invalid(f"{entry[:60]!r} has bits set after the /{loose.prefixlen} prefix",
                           f"write the network as {loose} (or the proxy's single address)") from None
    return ",".join(str(n) for n in networks)


_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


def _workers(raw: str) -> tuple[WorkerSpec, ...]:
    try:
        return parse_workers(raw)
    except WorkerSpecError as bad:
        raise _Invalid(bad.reason, bad.fix) from None


def _store(raw: str) -> str:
    """A RocksDB directory, or a postgresql:// (postgres://) URL whose shape is checked here (the
    server is reached when the store opens). Messages never show the password."""
    value = _text(raw)
    fix = "set a directory (e.g. chatdb) or postgresql://USER:PASSWORD@HOST:5432/DATABASE"
    from .store.location import InvalidStoreUrl, PgUrl, is_postgres_url, looks_like_url

    if is_postgres_url(value):
        try:
            PgUrl.parse(value)
        except InvalidStoreUrl as error:
            raise _Invalid(f"not a usable PostgreSQL URL: {error}",
                           fix + " (percent-encode special characters of the password, e.g. %40 for @)") from None
    elif looks_like_url(value):
        raise _Invalid("a URL of an unknown kind: the store is a directory or a postgresql:// URL", fix)
    return value


def _show_store(value: object) -> str:
    from .store.location import mask_url_password

    return mask_url_password(str(value))


def _log_spec(raw: str) -> str:
    """`level[,logger=level...]`, e.g. `info,ktulhu.engine=debug` (RUST_LOG-like)."""
    value = raw.strip().lower()
    for part in filter(None, (p.strip() for p in value.split(","))):
        level = part.split("=", 1)[-1]
        if level not in _LOG_LEVELS:
            raise _Invalid(
                f"unknown log level {level!r}",
                "use level[,logger=level], levels: " + "/".join(_LOG_LEVELS),
            )
    return value or "info"


# --- the record --------------------------------------------------------------------------------


def setting(
    env: str,
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    secret: bool = False,
    group: str = "server",
    show: Callable[[Any], str] | None = None,
) -> Any:
    """Declare a field read from environment variable `env` (metadata drives loading and docs).
    `show` renders a value (raw or parsed) for printing when only parts of it are secret."""
    return attrs.field(
        default=default,
        metadata={"env": env, "parse": parse, "help": help, "secret": secret, "group": group, "show": show},
    )


@attrs.frozen(kw_only=True)
class Settings:
    """The effective configuration of one server process.

    Build it with `load_settings()`; `sources` says where every value came from.
    """

    # server
    host: str = setting("KTULHU_HOST", "0.0.0.0", _host, "Address to listen on.")
    port: int = setting("KTULHU_PORT", 3000, _int(0, 65535), "TCP port to listen on (0 = any free port).")
    store: str = setting(
        "KTULHU_STORE", "chatdb", _store,
        "The chat store: a RocksDB directory (one server), or postgresql://user:password@host:port/db "
        "(shared by several servers). Unset: KTULHU_DB_PATH.",
        show=_show_store,
    )
    db_path: str = setting("KTULHU_DB_PATH", "chatdb", _text,
                           "Older name of KTULHU_STORE for a RocksDB directory (KTULHU_STORE wins).")
    store_pool: int = setting(
        "KTULHU_STORE_POOL", 20, _int(4, 1000),
        "PostgreSQL store: connections this server keeps to the database (its store worker threads: 4 fewer, "
        "at most 16).",
    )
    db_sync: bool = setting("KTULHU_DB_SYNC", False, _flag, "1 = fsync the store on every write.")
    env: str = setting(
        "KTULHU_ENV", "development", _choice("development", "production"),
        "development generates a local JWT secret; production requires JWT_SECRET.",
    )
    log: str = setting(
        "KTULHU_LOG", "info", _log_spec,
        "Log levels: level[,logger=level], e.g. info,ktulhu.engine=debug. Falls back to RUST_LOG.",
    )
    log_format: str = setting("KTULHU_LOG_FORMAT", "text", _choice("text", "json"), "text, or json lines.")
    graceful_timeout: float = setting(
        "KTULHU_GRACEFUL_TIMEOUT", 3.0, _float(0.0, 4.0),
        "Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled.",
    )
    body_timeout: float = setting(
        "KTULHU_BODY_TIMEOUT", 30.0, _float(1.0, 3600.0),
        "Seconds a client may take to send a request body (then 408): slow-body connections end.",
    )
    metrics_token: str = setting(
        "KTULHU_METRICS_TOKEN", "", _text,
        "Bearer token a remote Prometheus presents for /metrics (loopback clients and the admin need none).",
        secret=True,
    )
    trusted_proxies: str = setting(
        "KTULHU_TRUSTED_PROXIES", "", _networks,
        "Reverse proxies (comma-separated addresses or CIDRs) whose X-Forwarded-For/-Proto are believed; "
        "empty = none.",
    )
    # auth
    jwt_secret: str = setting(
        "JWT_SECRET", "", _text, "HS256 key of app JWTs (>= 32 bytes; required in production).",
        secret=True, group="auth",
    )
    jwt_ttl: int = setting(
        "KTULHU_JWT_TTL", 7 * 24 * 3600, _int(60, 366 * 24 * 3600), "Lifetime of app JWTs in seconds.",
        group="auth",
    )
    google_client_id: str = setting(
        "GOOGLE_CLIENT_ID", "", _text, "Expected audience of Google ID tokens; empty = Google sign-in off.",
        group="auth",
    )
    apple_client_id: str = setting(
        "APPLE_CLIENT_ID", "", _text, "Expected audience of Apple ID tokens; empty = Apple sign-in off.",
        group="auth",
    )
    jwt_issuer: str = setting("KTULHU_JWT_ISSUER", "ktulhu", _text, "`iss` claim of app JWTs.", group="auth")
    jwt_audience: str = setting(
        "KTULHU_JWT_AUDIENCE", "ktulhu", _text, "`aud` claim of app JWTs.", group="auth",
    )
    free_generations: int = setting(
        "KTULHU_FREE_GENERATIONS", 10, _int(0, 1_000_000_000), "Generations a free account may run.",
        group="auth",
    )
    free_accounts_per_address: int = setting(
        "KTULHU_FREE_ACCOUNTS_PER_ADDRESS", 1, _int(0, 1_000_000),
        "Free quotas of unverified email accounts registered from one client address are pooled: "
        "together they get this many accounts' worth of KTULHU_FREE_GENERATIONS (0 = no pooling).",
        group="auth",
    )
    min_password: int = setting(
        "KTULHU_MIN_PASSWORD", 8, _int(1, 1024), "Minimum password length at registration.", group="auth",
    )
    login_rate: int = setting(
        "KTULHU_LOGIN_RATE", 10, _int(0, 1_000_000),
        "Failed sign-ins per minute per client address and per (email, address) (0 = unlimited).", group="auth",
    )
    google_jwks_url: str = setting(
        "KTULHU_GOOGLE_JWKS_URL", "https://www.googleapis.com/oauth2/v3/certs", _url,
        "Where Google's signing keys are fetched.", group="auth",
    )
    apple_jwks_url: str = setting(
        "KTULHU_APPLE_JWKS_URL", "https://appleid.apple.com/auth/keys", _url,
        "Where Apple's signing keys are fetched.", group="auth",
    )
    jwks_ttl: float = setting(
        "KTULHU_JWKS_TTL", 3600.0, _float(1.0, 7 * 24 * 3600.0),
        "Seconds Google/Apple signing keys are cached (an unknown key id refetches).", group="auth",
    )
    admin_auth_file: str = setting(
        "KTULHU_ADMIN_AUTH_FILE", "config/internal_admin_auth.json", _text,
        "Admin credentials (an argon2 hash written by `ktulhu admin set-password`).", group="auth",
    )
    api_keys_file: str = setting(
        "KTULHU_API_KEYS_FILE", "", _text,
        "Static API keys, one `NAME ROLE SECRET` per line (mode 600, secrets of 32+ characters); empty = none.",
        group="auth",
    )
    admin_rate: int = setting(
        "KTULHU_ADMIN_RATE", 10, _int(0, 1_000_000),
        "Failed admin sign-ins per minute per IP before 429 (0 = unlimited).", group="auth",
    )
    # chat surfaces (/ws and the chat REST routes)
    anon_rate: int = setting(
        "KTULHU_ANON_RATE", 20, _int(0, 1_000_000),
        "Prompts per minute per client address for anonymous sessions (0 = unlimited).", group="chat",
    )
    ws_max_frame: int = setting(
        "KTULHU_WS_MAX_FRAME", 1 << 20, _int(1024, 64 << 20), "Largest /ws frame in bytes.", group="chat",
    )
    max_prompt_chars: int = setting(
        "KTULHU_MAX_PROMPT_CHARS", 32_000, _int(1, 10_000_000), "Longest prompt text in characters.",
        group="chat",
    )
    max_attachments: int = setting(
        "KTULHU_MAX_ATTACHMENTS", 8, _int(0, 1000), "Attachments per prompt.", group="chat",
    )
    max_preview_bytes: int = setting(
        "KTULHU_MAX_PREVIEW_BYTES", 256 * 1024, _int(0, 64 << 20),
        "Largest `previewBase64` of one attachment (characters).", group="chat",
    )
    ws_queue: int = setting(
        "KTULHU_WS_QUEUE", 64, _int(4, 100_000),
        "Frames waiting for a slow /ws reader before tokens are coalesced.", group="chat",
    )
    ws_send_timeout: float = setting(
        "KTULHU_WS_SEND_TIMEOUT", 30.0, _float(0.1, 3600.0),
        "Seconds a /ws reader may accept nothing before it is disconnected.", group="chat",
    )
    history_messages: int = setting(
        "KTULHU_HISTORY_MESSAGES", 24, _int(0, 10_000),
        "Stored messages considered for a prompt (then trimmed to the context by tokens).", group="chat",
    )
    register_history: int = setting(
        "KTULHU_REGISTER_HISTORY", 50, _int(0, 10_000), "Recent messages sent with `registered`.",
        group="chat",
    )
    open_listings: bool = setting(
        "KTULHU_OPEN_LISTINGS", False, _flag,
        "1 = single-user deployment: device and summary listings need no credential.", group="chat",
    )
    # model and engine
    model_path: str = setting(
        "LLAMA_CLI_MODEL", default_model_path(), _text, "Path of the GGUF model.", group="engine",
    )
    embedding_model: str = setting(
        "KTULHU_EMBEDDING_MODEL", "", _text,
        "Path of a separate embedding GGUF for /v1/embeddings (loaded on first use); empty = the chat model.",
        group="engine",
    )
    models: str = setting(
        "KTULHU_MODELS", "", _text,
        "More GGUFs served besides LLAMA_CLI_MODEL, picked by a request's `model`: comma-separated "
        "NAME=PATH[|ctx=N][|slots=N]; loaded on first use.", group="engine",
    )
    model_keep_alive: float = setting(
        "KTULHU_MODEL_KEEP_ALIVE", 300.0, _float(0, 1e9),
        "Seconds a KTULHU_MODELS model stays loaded after its last request (0 = unload once idle).",
        group="engine",
    )
    models_memory_mb: int = setting(
        "KTULHU_MODELS_MEMORY_MB", 0, _int(0),
        "Budget in MiB for the GGUFs loaded at once (file sizes, the default model's included); idle "
        "models are unloaded to make room; 0 = no budget.", group="engine",
    )
    llama_cli_bin: str = setting(
        "LLAMA_CLI_BIN", "", _text, "Accepted for compatibility and unused: the model runs in-process.",
        group="engine",
    )
    ctx: int = setting(
        "LLAMA_CLI_CTX", 2048, _int(128, 1 << 20), "Tokens of context per slot (prompt + reply).",
        group="engine",
    )
    ctx_pool: int = setting(
        "LLAMA_CLI_CTX_POOL", 4, _int(1, 256), "Concurrent generations (default for KTULHU_SLOTS).",
        group="engine",
    )
    slots: int | None = setting(
        "KTULHU_SLOTS", None, _int(1, 256), "Sequences per context; unset = LLAMA_CLI_CTX_POOL.",
        group="engine",
    )
    engine_workers: int = setting(
        "KTULHU_ENGINE_WORKERS", 1, _int(1, 16), "llama contexts, each with its own decode thread.",
        group="engine",
    )
    queue: int = setting(
        "KTULHU_QUEUE", 64, _int(1, 100_000), "Requests waiting for a slot before callers get Busy.",
        group="engine",
    )
    step_target_ms: int = setting(
        "KTULHU_STEP_TARGET_MS", 100, _int(5, 10_000),
        "Target length of a decode step that prefills new prompts while other replies stream.",
        group="engine",
    )
    max_tokens: int = setting(
        "LLAMA_CLI_MAX_TOKENS", 512, _int(1, 1 << 20), "Default cap on generated tokens per reply.",
        group="engine",
    )
    temperature: float = setting("LLAMA_CLI_TEMP", 0.7, _float(0.0, 5.0), "Default temperature.", group="engine")
    top_p: float = setting("LLAMA_CLI_TOP_P", 0.9, _float(0.0, 1.0), "Default nucleus (top-p).", group="engine")
    top_k: int = setting("LLAMA_CLI_TOP_K", 40, _int(0, 1_000_000), "Default top-k (0 = off).", group="engine")
    n_gpu_layers: int = setting(
        "LLAMA_CLI_NGL", -1, _int(-1, 100_000), "Layers on the GPU: -1 = all, 0 = none.", group="engine",
    )
    threads: int | None = setting(
        "LLAMA_CLI_THREADS", None, _int(1, 1024), "Decode threads; unset = physical cores.", group="engine",
    )
    preflight_timeout: float = setting(
        "KTULHU_PREFLIGHT_TIMEOUT", 300.0, _float(1.0, 3600.0),
        "Seconds the start-up check of the model and router (a child process) may take.", group="engine",
    )
    chat_template_path: str = setting(
        "CHAT_TEMPLATE_PATH", "auto", _text,
        "Chat template: `auto` = the model's own (embedded in the GGUF), chat_template.jinja (ChatML) when it "
        "has none; `gguf` = the embedded one, required and unchanged; else a Jinja file.", group="engine",
    )
    engine_mode: str = setting(
        "KTULHU_ENGINE", "local", _choice("local", "remote"),
        "local = the GGUF runs in this process; remote = prompts go to KTULHU_WORKERS (implied when that is set).",
        group="engine",
    )
    workers: tuple[WorkerSpec, ...] = setting(
        "KTULHU_WORKERS", (), _workers,
        "OpenAI-compatible inference servers for KTULHU_ENGINE=remote: URL[|slots=N][|key=env:VAR][|model=NAME],...",
        group="engine", show=show_workers,
    )
    worker_health_interval: float = setting(
        "KTULHU_WORKER_HEALTH_INTERVAL", 5.0, _float(0.05, 3600.0),
        "Seconds between health checks of each worker (an ejected one is re-admitted when it answers).",
        group="engine",
    )
    worker_health_timeout: float = setting(
        "KTULHU_WORKER_HEALTH_TIMEOUT", 2.0, _float(0.05, 600.0),
        "Seconds a worker's health check may take before the worker is ejected.", group="engine",
    )
    worker_affinity: bool = setting(
        "KTULHU_WORKER_AFFINITY", True, _flag,
        "1 = a chat's turns go to the worker holding its prefix; 0 = workers in turn (for measuring).",
        group="engine",
    )
    worker_timeout: float = setting(
        "KTULHU_WORKER_TIMEOUT", 60.0, _float(0.1, 3600.0),
        "Seconds a worker may stay silent during a request (connecting, prefilling, between streamed pieces).",
        group="engine",
    )
    # intent router
    intent_router_dir: str = setting(
        "INTENT_ROUTER_DIR", "", _text, "Intent router directory; empty = models/intent_router.",
        group="router",
    )
    phatic_model_dir: str = setting(
        "PHATIC_MODEL_DIR", "", _text, "Legacy name for INTENT_ROUTER_DIR (used when that is unset).",
        group="router",
    )
    router_phatic: bool = setting(
        "INTENT_ROUTER_PHATIC", True, lambda raw: raw.strip() != "0",
        "0 disables the optional phatic head.", group="router",
    )
    router_seq_len: int | None = setting(
        "INTENT_ROUTER_SEQ_LEN", None, _int(8, 8192), "Max router tokens; unset = the model's limit.",
        group="router",
    )
    router_device: str = setting(
        "INTENT_ROUTER_DEVICE", "auto", _router_device, "auto, cpu or cuda[:N].", group="router",
    )
    router_timeout: float = setting(
        "KTULHU_ROUTER_TIMEOUT", 15.0, _float(0.01, 600.0),
        "Seconds before a classification falls back to the default route.", group="router",
    )
    # payments
    stripe_secret_key: str = setting(
        "STRIPE_SECRET_KEY", "", _text, "Stripe API key (enables payments with the next two).",
        secret=True, group="payments",
    )
    stripe_publishable_key: str = setting(
        "STRIPE_PUBLISHABLE_KEY", "", _text, "Returned to clients by /payment/config.", group="payments",
    )
    stripe_price_id: str = setting("STRIPE_PRICE_ID", "", _text, "Price of the upgrade.", group="payments")
    stripe_webhook_secret: str = setting(
        "STRIPE_WEBHOOK_SECRET", "", _text, "Signing secret of the Stripe webhook endpoint.",
        secret=True, group="payments",
    )
    stripe_checkout_mode: str = setting(
        "STRIPE_CHECKOUT_MODE", "subscription", _choice("subscription", "payment"), "Checkout mode.",
        group="payments",
    )
    stripe_success_url: str = setting(
        "STRIPE_SUCCESS_URL", "http://localhost:3000/payment/success", _url, "Redirect after payment.",
        group="payments",
    )
    stripe_cancel_url: str = setting(
        "STRIPE_CANCEL_URL", "http://localhost:3000/payment/cancel", _url, "Redirect on cancel.",
        group="payments",
    )
    stripe_api_base: str = setting(
        "KTULHU_STRIPE_API_BASE", "https://api.stripe.com", _url, "Stripe API address (tests point it at loopback).",
        group="payments",
    )

    # not read from the environment
    root: Path = attrs.field(factory=Path.cwd, metadata={})
    sources: Mapping[str, str] = attrs.field(factory=dict, metadata={}, repr=False)
    #: The keys of KTULHU_API_KEYS_FILE (`auth.key_file.StaticKey`: names, roles, secrets' hashes),
    #: read by `load_settings` so that a bad file stops the server before it serves.
    static_keys: tuple[Any, ...] = attrs.field(default=(), metadata={}, repr=False)

    # --- derived values ------------------------------------------------------------------------

    @property
    def n_slots(self) -> int:
        return self.slots if self.slots is not None else self.ctx_pool

    @property
    def remote(self) -> bool:
        """Prompts go to `workers` (no model is loaded here)."""
        return self.engine_mode == "remote"

    @property
    def payments_enabled(self) -> bool:
        return bool(self.stripe_secret_key and self.stripe_publishable_key and self.stripe_price_id)

    @property
    def google_enabled(self) -> bool:
        return bool(self.google_client_id)

    @property
    def apple_enabled(self) -> bool:
        return bool(self.apple_client_id)

    def path(self, value: str) -> Path:
        """Resolve a configured path against the server's root directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def model_file(self) -> Path:
        return self.path(self.model_path)

    @property
    def model_name(self) -> str:
        """The default model's name (its file's stem)."""
        return self.model_file.stem

    @property
    def model_specs(self) -> tuple[ModelSpec, ...]:
        """KTULHU_MODELS parsed (`load_settings` has refused it when it has faults)."""
        return parse_models(self.models, default_name=self.model_name)[0]

    @property
    def store_url(self) -> str | None:
        """The PostgreSQL URL of a shared store (with its password: never log it), else None."""
        from .store.location import is_postgres_url

        return self.store if is_postgres_url(self.store) else None

    @property
    def db_dir(self) -> Path:
        """The RocksDB directory of the store (KTULHU_STORE, or KTULHU_DB_PATH when the store is a URL)."""
        return self.path(self.db_path if self.store_url else self.store)

    @property
    def store_location(self) -> Path | str:
        """What `Store.open` takes: the PostgreSQL URL, or the RocksDB directory."""
        return self.store_url or self.db_dir

    @property
    def router_dir(self) -> Path:
        return self.path(self.intent_router_dir or self.phatic_model_dir or "models/intent_router")

    @property
    def allowed_origins_file(self) -> Path:
        return self.root / "config" / "allowed_origins.txt"

    def check_runtime(self) -> None:
        """Checks that need the file system; `serve` runs them, `config` only reports."""
        problems = []
        if not self.remote and not self.model_file.is_file():
            problems.append(
                f"LLAMA_CLI_MODEL={self.model_path!r} ({self.sources.get('LLAMA_CLI_MODEL', 'default')}): "
                f"no file at {self.model_file}; run `ktulhu models pull` or set LLAMA_CLI_MODEL "
                "to the path of a GGUF model"
            )
        for spec in () if self.remote else self.model_specs:
            if not self.path(spec.path).is_file():
                problems.append(f"KTULHU_MODELS: the model {spec.name!r} has no file at {self.path(spec.path)}; "
                                "fix its path or remove it")
        if (not self.remote and self.chat_template_path not in ("gguf", "auto")
                and not self.path(self.chat_template_path).is_file()):
            problems.append(
                f"CHAT_TEMPLATE_PATH={self.chat_template_path!r}: no file at "
                f"{self.path(self.chat_template_path)}; point it at a Jinja template, or set it to `gguf` "
                "to use the template embedded in the model"
            )
        router_explicit = self.intent_router_dir or self.phatic_model_dir
        if router_explicit and not self.router_dir.is_dir():
            name = "INTENT_ROUTER_DIR" if self.intent_router_dir else "PHATIC_MODEL_DIR"
            problems.append(
                f"{name}={router_explicit!r}: no directory at {self.router_dir}; "
                "unset it to use the built-in router or point it at an exported router directory"
            )
        if problems:
            raise SettingsError(problems)

    def public_items(self) -> list[tuple[str, str, str]]:
        """(variable, shown value, source) for every setting, secrets masked."""
        rows = []
        for f in attrs.fields(Settings):
            if "env" not in f.metadata:
                continue
            env = f.metadata["env"]
            value = getattr(self, f.name)
            if f.metadata["show"] is not None:
                shown = f.metadata["show"](value)
            elif f.metadata["secret"]:
                shown = _mask(value)
            else:
                shown = "" if value is None else str(value)
            rows.append((env, shown, self.sources.get(env, "default")))
        return rows


def _mask(value: str) -> str:
    if not value:
        return ""
    return f"***({len(value)} chars)"


def setting_fields() -> list[attrs.Attribute]:
    """Fields read from the environment, in declaration order (docs and `ktulhu config` use this)."""
    return [f for f in attrs.fields(Settings) if "env" in f.metadata]


def _layers(root: Path, environ: Mapping[str, str]) -> list[tuple[str, Mapping[str, str | None]]]:
    layers: list[tuple[str, Mapping[str, str | None]]] = [("environment", environ)]
    for name in ENV_FILES:
        file = root / name
        if file.is_file():
            layers.append((name, dotenv_values(file, interpolate=False)))
    return layers


def load_settings(
    *, environ: Mapping[str, str] | None = None, root: Path | None = None, **overrides: Any
) -> Settings:
    """Build `Settings` from the environment and env files; raise `SettingsError` listing every problem.

    `overrides` (attribute name -> value) come from command-line options and win over everything.
    """
    environ = os.environ if environ is None else environ
    root = Path.cwd() if root is None else Path(root)
    layers = _layers(root, environ)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[str] = []
    fallbacks = {"KTULHU_LOG": "RUST_LOG", "KTULHU_STORE": "KTULHU_DB_PATH"}
    for f in setting_fields():
        env = f.metadata["env"]
        raw, source = _lookup(layers, env)
        if raw is None and env in fallbacks:
            raw, source = _lookup(layers, fallbacks[env])
            source = f"{source} ({fallbacks[env]})" if raw is not None else source
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except _Invalid as bad:
            show = f.metadata["show"]
            shown = repr(show(raw)) if show is not None else _mask(raw) if f.metadata["secret"] else repr(raw)
            problems.append(f"{env}={shown} (from {source}): {bad.reason}; {bad.fix}")
            continue
        sources[env] = source
    for name, value in overrides.items():
        if value is None:
            continue
        field = attrs.fields_dict(Settings)[name]
        values[name] = value
        sources[field.metadata["env"]] = "command line"
    values.setdefault("env", "development")
    problems += _check_secret(values, sources, root)
    problems += _check_workers(values, sources, layers, root)
    problems += _read_api_keys(values, sources, root)
    problems += _check_models(values, sources)
    if problems:
        raise SettingsError(problems)
    return Settings(root=root, sources=sources, **values)


def _lookup(layers: list[tuple[str, Mapping[str, str | None]]], env: str) -> tuple[str | None, str]:
    """The first non-empty value of `env` in precedence order; empty strings count as unset."""
    for source, layer in layers:
        raw = layer.get(env)
        if raw is not None and raw.strip() != "":
            return raw, source
    return None, "default"


def _check_secret(values: dict[str, Any], sources: dict[str, str], root: Path) -> list[str]:
    secret = values.get("jwt_secret", "")
    if values["env"] == "production":
        if not secret:
            return ["JWT_SECRET is not set: KTULHU_ENV=production requires it; set JWT_SECRET to a random "
                    f"string of at least {MIN_JWT_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"]
    if secret and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        return [f"JWT_SECRET={_mask(secret)} (from {sources['JWT_SECRET']}): shorter than "
                f"{MIN_JWT_SECRET_BYTES} bytes; set a random string of at least {MIN_JWT_SECRET_BYTES} "
                "bytes (e.g. `openssl rand -hex 32`)"]
    if not secret:
        stored = root / JWT_SECRET_FILE
        if stored.is_file():
            values["jwt_secret"] = stored.read_text().strip()
            sources["JWT_SECRET"] = f"generated ({JWT_SECRET_FILE})"
    return []


def _check_workers(values: dict[str, Any], sources: dict[str, str],
                   layers: list[tuple[str, Mapping[str, str | None]]], root: Path) -> list[str]:
    """KTULHU_WORKERS alone implies remote mode; remote mode needs workers; keys are read here."""
    workers = values.get("workers", ())
    if "engine_mode" not in values and workers:
        values["engine_mode"] = "remote"
        sources["KTULHU_ENGINE"] = "implied by KTULHU_WORKERS"
    if values.get("engine_mode") != "remote":
        return []
    if not workers:
        return ["KTULHU_ENGINE=remote but KTULHU_WORKERS is not set; list the inference servers, e.g. "
                "KTULHU_WORKERS=http://10.0.0.5:8080|slots=4,http://10.0.0.6:8080 (or set KTULHU_ENGINE=local)"]
    values["workers"], problems = resolve_keys(workers, lambda name: _lookup(layers, name)[0], root)
    return problems


def _check_models(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """One line per fault of KTULHU_MODELS (syntax, names); missing files are `check_runtime`'s."""
    raw = values.get("models", "")
    if not raw:
        return []
    name = default_name(values.get("model_path", default_model_path()))
    source = sources.get("KTULHU_MODELS", "command line")
    return [f"KTULHU_MODELS (from {source}): {problem}" for problem in parse_models(raw, default_name=name)[1]]


def _read_api_keys(values: dict[str, Any], sources: dict[str, str], root: Path) -> list[str]:
    """Read KTULHU_API_KEYS_FILE into `static_keys`; one problem line per fault of the file."""
    name = values.get("api_keys_file", "")
    if not name:
        return []
    from .auth.key_file import KeyFileError, load_key_file

    path = Path(name).expanduser()
    try:
        values["static_keys"] = load_key_file(path if path.is_absolute() else root / path)
    except KeyFileError as error:
        source = sources.get("KTULHU_API_KEYS_FILE", "command line")
        return [f"KTULHU_API_KEYS_FILE={name!r} (from {source}): {problem}" for problem in error.problems]
    return []


def ensure_jwt_secret(settings: Settings) -> tuple[Settings, bool]:
    """In development, generate the JWT secret once into a git-ignored file.

    Returns the settings to use and whether a new secret was written (the caller warns).
    """
    if settings.jwt_secret:
        return settings, False
    file = settings.root / JWT_SECRET_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process wrote it first: use theirs
        secret, created = file.read_text().strip(), False
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secret + "\n")
        created = True
    sources = {**settings.sources, "JWT_SECRET": f"generated ({JWT_SECRET_FILE})"}
    return attrs.evolve(settings, jwt_secret=secret, sources=sources), created
