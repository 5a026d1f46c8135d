"""The `Settings` record: every variable as an attrs field whose metadata (variable name, parser,
help, secret, group) drives loading and `ktulhu config` (a test holds docs/configuration.md to it),
plus the values derived from them and the file checks `serve` runs before it starts.

The record stays flat on purpose: the rest of the server reads `settings.<name>`, and one class keeps
`attrs.fields` in declaration order, which `ktulhu config` prints group by group (`group=`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..engine.model_specs import ModelSpec, parse_models
from ..engine.worker_specs import WorkerSpec, show_workers
from .parse import (
    SettingsError,
    chat_store,
    decimal,
    device_name,
    flag,
    host_name,
    http_url,
    integer,
    ip_networks,
    log_spec,
    one_of,
    text,
    worker_list,
)
from .show import show_store, shown

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_TEMPLATE_FILE", "Settings", "default_model_path", "setting",
           "setting_fields"]

#: The GGUF that LLAMA_CLI_MODEL names by default (under models/).
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The ChatML template used for a model whose GGUF embeds none (CHAT_TEMPLATE_PATH=auto).
DEFAULT_TEMPLATE_FILE = "chat_template.jinja"


def default_model_path() -> str:
    return f"models/{DEFAULT_MODEL_FILE}"


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
    host: str = setting("KTULHU_HOST", "0.0.0.0", host_name, "Address to listen on.")
    port: int = setting("KTULHU_PORT", 3000, integer(0, 65535), "TCP port to listen on (0 = any free port).")
    store: str = setting(
        "KTULHU_STORE", "chatdb", chat_store,
        "The chat store: a RocksDB directory (one server), or postgresql://user:password@host:port/db "
        "(shared by several servers). Unset: KTULHU_DB_PATH.",
        show=show_store,
    )
    db_path: str = setting("KTULHU_DB_PATH", "chatdb", text,
                           "Older name of KTULHU_STORE for a RocksDB directory (KTULHU_STORE wins).")
    store_pool: int = setting(
        "KTULHU_STORE_POOL", 20, integer(4, 1000),
        "PostgreSQL store: connections this server keeps to the database (its store worker threads: 4 fewer, "
        "at most 16).",
    )
    db_sync: bool = setting("KTULHU_DB_SYNC", False, flag, "1 = fsync the store on every write.")
    env: str = setting(
        "KTULHU_ENV", "development", one_of("development", "production"),
        "development generates a local JWT secret; production requires JWT_SECRET.",
    )
    log: str = setting(
        "KTULHU_LOG", "info", log_spec,
        "Log levels: level[,logger=level], e.g. info,ktulhu.engine=debug. Falls back to RUST_LOG.",
    )
    log_format: str = setting("KTULHU_LOG_FORMAT", "text", one_of("text", "json"), "text, or json lines.")
    graceful_timeout: float = setting(
        "KTULHU_GRACEFUL_TIMEOUT", 3.0, decimal(0.0, 4.0),
        "Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled.",
    )
    body_timeout: float = setting(
        "KTULHU_BODY_TIMEOUT", 30.0, decimal(1.0, 3600.0),
        "Seconds a client may take to send a request body (then 408): slow-body connections end.",
    )
    metrics_token: str = setting(
        "KTULHU_METRICS_TOKEN", "", text,
        "Bearer token a remote Prometheus presents for /metrics (loopback clients and the admin need none).",
        secret=True,
    )
    trusted_proxies: str = setting(
        "KTULHU_TRUSTED_PROXIES", "", ip_networks,
        "Reverse proxies (comma-separated addresses or CIDRs) whose X-Forwarded-For/-Proto are believed; "
        "empty = none.",
    )
    # auth
    jwt_secret: str = setting(
        "JWT_SECRET", "", text, "HS256 key of app JWTs (>= 32 bytes; required in production).",
        secret=True, group="auth",
    )
    jwt_ttl: int = setting(
        "KTULHU_JWT_TTL", 7 * 24 * 3600, integer(60, 366 * 24 * 3600), "Lifetime of app JWTs in seconds.",
        group="auth",
    )
    google_client_id: str = setting(
        "GOOGLE_CLIENT_ID", "", text, "Expected audience of Google ID tokens; empty = Google sign-in off.",
        group="auth",
    )
    apple_client_id: str = setting(
        "APPLE_CLIENT_ID", "", text, "Expected audience of Apple ID tokens; empty = Apple sign-in off.",
        group="auth",
    )
    jwt_issuer: str = setting("KTULHU_JWT_ISSUER", "ktulhu", text, "`iss` claim of app JWTs.", group="auth")
    jwt_audience: str = setting(
        "KTULHU_JWT_AUDIENCE", "ktulhu", text, "`aud` claim of app JWTs.", group="auth",
    )
    free_generations: int = setting(
        "KTULHU_FREE_GENERATIONS", 10, integer(0, 1_000_000_000), "Generations a free account may run.",
        group="auth",
    )
    free_accounts_per_address: int = setting(
        "KTULHU_FREE_ACCOUNTS_PER_ADDRESS", 1, integer(0, 1_000_000),
        "Free quotas of unverified email accounts registered from one client address are pooled: "
        "together they get this many accounts' worth of KTULHU_FREE_GENERATIONS (0 = no pooling).",
        group="auth",
    )
    min_password: int = setting(
        "KTULHU_MIN_PASSWORD", 8, integer(1, 1024), "Minimum password length at registration.", group="auth",
    )
    login_rate: int = setting(
        "KTULHU_LOGIN_RATE", 10, integer(0, 1_000_000),
        "Failed sign-ins per minute per client address and per (email, address) (0 = unlimited).", group="auth",
    )
    google_jwks_url: str = setting(
        "KTULHU_GOOGLE_JWKS_URL", "https://www.googleapis.com/oauth2/v3/certs", http_url,
        "Where Google's signing keys are fetched.", group="auth",
    )
    apple_jwks_url: str = setting(
        "KTULHU_APPLE_JWKS_URL", "https://appleid.apple.com/auth/keys", http_url,
        "Where Apple's signing keys are fetched.", group="auth",
    )
    jwks_ttl: float = setting(
        "KTULHU_JWKS_TTL", 3600.0, decimal(1.0, 7 * 24 * 3600.0),
        "Seconds Google/Apple signing keys are cached (an unknown key id refetches).", group="auth",
    )
    admin_auth_file: str = setting(
        "KTULHU_ADMIN_AUTH_FILE", "config/internal_admin_auth.json", text,
        "Admin credentials (an argon2 hash written by `ktulhu admin set-password`).", group="auth",
    )
    api_keys_file: str = setting(
        "KTULHU_API_KEYS_FILE", "", text,
        "Static API keys, one `NAME ROLE SECRET` per line (mode 600, secrets of 32+ characters); empty = none.",
        group="auth",
    )
    admin_rate: int = setting(
        "KTULHU_ADMIN_RATE", 10, integer(0, 1_000_000),
        "Failed admin sign-ins per minute per IP before 429 (0 = unlimited).", group="auth",
    )
    # chat surfaces (/ws and the chat REST routes)
    anon_rate: int = setting(
        "KTULHU_ANON_RATE", 20, integer(0, 1_000_000),
        "Prompts per minute per client address for anonymous sessions (0 = unlimited).", group="chat",
    )
    ws_max_frame: int = setting(
        "KTULHU_WS_MAX_FRAME", 1 << 20, integer(1024, 64 << 20), "Largest /ws frame in bytes.", group="chat",
    )
    max_prompt_chars: int = setting(
        "KTULHU_MAX_PROMPT_CHARS", 32_000, integer(1, 10_000_000), "Longest prompt text in characters.",
        group="chat",
    )
    max_attachments: int = setting(
        "KTULHU_MAX_ATTACHMENTS", 8, integer(0, 1000), "Attachments per prompt.", group="chat",
    )
    max_preview_bytes: int = setting(
        "KTULHU_MAX_PREVIEW_BYTES", 256 * 1024, integer(0, 64 << 20),
        "Largest `previewBase64` of one attachment (characters).", group="chat",
    )
    ws_queue: int = setting(
        "KTULHU_WS_QUEUE", 64, integer(4, 100_000),
        "Frames waiting for a slow /ws reader before tokens are coalesced.", group="chat",
    )
    ws_send_timeout: float = setting(
        "KTULHU_WS_SEND_TIMEOUT", 30.0, decimal(0.1, 3600.0),
        "Seconds a /ws reader may accept nothing before it is disconnected.", group="chat",
    )
    history_messages: int = setting(
        "KTULHU_HISTORY_MESSAGES", 24, integer(0, 10_000),
        "Stored messages considered for a prompt (then trimmed to the context by tokens).", group="chat",
    )
    register_history: int = setting(
        "KTULHU_REGISTER_HISTORY", 50, integer(0, 10_000), "Recent messages sent with `registered`.",
        group="chat",
    )
    open_listings: bool = setting(
        "KTULHU_OPEN_LISTINGS", False, flag,
        "1 = single-user deployment: device and summary listings need no credential.", group="chat",
    )
    # model and engine
    model_path: str = setting(
        "LLAMA_CLI_MODEL", default_model_path(), text, "Path of the GGUF model.", group="engine",
    )
    embedding_model: str = setting(
        "KTULHU_EMBEDDING_MODEL", "", text,
        "Path of a separate embedding GGUF for /v1/embeddings (loaded on first use); empty = the chat model.",
        group="engine",
    )
    models: str = setting(
        "KTULHU_MODELS", "", text,
        "More GGUFs served besides LLAMA_CLI_MODEL, picked by a request's `model`: comma-separated "
        "NAME=PATH[|ctx=N][|slots=N]; loaded on first use.", group="engine",
    )
    model_keep_alive: float = setting(
        "KTULHU_MODEL_KEEP_ALIVE", 300.0, decimal(0, 1e9),
        "Seconds a KTULHU_MODELS model stays loaded after its last request (0 = unload once idle).",
        group="engine",
    )
    models_memory_mb: int = setting(
        "KTULHU_MODELS_MEMORY_MB", 0, integer(0),
        "Budget in MiB for the GGUFs loaded at once (file sizes, the default model's included); idle "
        "models are unloaded to make room; 0 = no budget.", group="engine",
    )
    llama_cli_bin: str = setting(
        "LLAMA_CLI_BIN", "", text, "Accepted for compatibility and unused: the model runs in-process.",
        group="engine",
    )
    ctx: int = setting(
        "LLAMA_CLI_CTX", 2048, integer(128, 1 << 20), "Tokens of context per slot (prompt + reply).",
        group="engine",
    )
    ctx_pool: int = setting(
        "LLAMA_CLI_CTX_POOL", 4, integer(1, 256), "Concurrent generations (default for KTULHU_SLOTS).",
        group="engine",
    )
    slots: int | None = setting(
        "KTULHU_SLOTS", None, integer(1, 256), "Sequences per context; unset = LLAMA_CLI_CTX_POOL.",
        group="engine",
    )
    engine_workers: int = setting(
        "KTULHU_ENGINE_WORKERS", 1, integer(1, 16), "llama contexts, each with its own decode thread.",
        group="engine",
    )
    queue: int = setting(
        "KTULHU_QUEUE", 64, integer(1, 100_000), "Requests waiting for a slot before callers get Busy.",
        group="engine",
    )
    step_target_ms: int = setting(
        "KTULHU_STEP_TARGET_MS", 100, integer(5, 10_000),
        "Target length of a decode step that prefills new prompts while other replies stream.",
        group="engine",
    )
    prefix_store_mb: int = setting(
        "KTULHU_PREFIX_STORE_MB", 256, integer(0, 1 << 20),
        "Host memory in MiB, per decode worker, for the KV caches slots give up to other conversations "
        "(restored when a chat comes back or a prompt starts the same way); 0 = none kept.", group="engine",
    )
    speculative: str = setting(
        "KTULHU_SPECULATIVE", "off", one_of("off", "ngram"),
        "Speculative decoding of greedy replies: ngram = drafts looked up in the conversation's own tokens "
        "(prompt lookup), verified in the batched step; off = none.", group="engine",
    )
    draft_tokens: int = setting(
        "KTULHU_DRAFT_TOKENS", 4, integer(1, 16), "Longest draft a sequence verifies per step (KTULHU_SPECULATIVE).",
        group="engine",
    )
    draft_ngram: int = setting(
        "KTULHU_DRAFT_NGRAM", 3, integer(2, 8),
        "Tokens of the n-gram a draft is looked up by; shorter ones, down to 2, are tried next.", group="engine",
    )
    max_tokens: int = setting(
        "LLAMA_CLI_MAX_TOKENS", 512, integer(1, 1 << 20), "Default cap on generated tokens per reply.",
        group="engine",
    )
    temperature: float = setting("LLAMA_CLI_TEMP", 0.7, decimal(0.0, 5.0), "Default temperature.", group="engine")
    top_p: float = setting("LLAMA_CLI_TOP_P", 0.9, decimal(0.0, 1.0), "Default nucleus (top-p).", group="engine")
    top_k: int = setting("LLAMA_CLI_TOP_K", 40, integer(0, 1_000_000), "Default top-k (0 = off).", group="engine")
    n_gpu_layers: int = setting(
        "LLAMA_CLI_NGL", -1, integer(-1, 100_000), "Layers on the GPU: -1 = all, 0 = none.", group="engine",
    )
    threads: int | None = setting(
        "LLAMA_CLI_THREADS", None, integer(1, 1024), "Decode threads; unset = physical cores.", group="engine",
    )
    preflight_timeout: float = setting(
        "KTULHU_PREFLIGHT_TIMEOUT", 300.0, decimal(1.0, 3600.0),
        "Seconds the start-up check of the model and router (a child process) may take.", group="engine",
    )
    chat_template_path: str = setting(
        "CHAT_TEMPLATE_PATH", "auto", text,
        "Chat template: `auto` = the model's own (embedded in the GGUF), chat_template.jinja (ChatML) when it "
        "has none; `gguf` = the embedded one, required and unchanged; else a Jinja file.", group="engine",
    )
    engine_mode: str = setting(
        "KTULHU_ENGINE", "local", one_of("local", "remote"),
        "local = the GGUF runs in this process; remote = prompts go to KTULHU_WORKERS (implied when that is set).",
        group="engine",
    )
    workers: tuple[WorkerSpec, ...] = setting(
        "KTULHU_WORKERS", (), worker_list,
        "OpenAI-compatible inference servers for KTULHU_ENGINE=remote: URL[|slots=N][|key=env:VAR][|model=NAME],...",
        group="engine", show=show_workers,
    )
    worker_health_interval: float = setting(
        "KTULHU_WORKER_HEALTH_INTERVAL", 5.0, decimal(0.05, 3600.0),
        "Seconds between health checks of each worker (an ejected one is re-admitted when it answers).",
        group="engine",
    )
    worker_health_timeout: float = setting(
        "KTULHU_WORKER_HEALTH_TIMEOUT", 2.0, decimal(0.05, 600.0),
        "Seconds a worker's health check may take before the worker is ejected.", group="engine",
    )
    worker_affinity: bool = setting(
        "KTULHU_WORKER_AFFINITY", True, flag,
        "1 = a chat's turns go to the worker holding its prefix; 0 = workers in turn (for measuring).",
        group="engine",
    )
    worker_timeout: float = setting(
        "KTULHU_WORKER_TIMEOUT", 60.0, decimal(0.1, 3600.0),
        "Seconds a worker may stay silent during a request (connecting, prefilling, between streamed pieces).",
        group="engine",
    )
    # intent router
    intent_router_dir: str = setting(
        "INTENT_ROUTER_DIR", "", text, "Intent router directory; empty = models/intent_router.",
        group="router",
    )
    phatic_model_dir: str = setting(
        "PHATIC_MODEL_DIR", "", text, "Legacy name for INTENT_ROUTER_DIR (used when that is unset).",
        group="router",
    )
    router_phatic: bool = setting(
        "INTENT_ROUTER_PHATIC", True, lambda raw: raw.strip() != "0",
        "0 disables the optional phatic head.", group="router",
    )
    router_seq_len: int | None = setting(
        "INTENT_ROUTER_SEQ_LEN", None, integer(8, 8192), "Max router tokens; unset = the model's limit.",
        group="router",
    )
    router_device: str = setting(
        "INTENT_ROUTER_DEVICE", "auto", device_name, "auto, cpu or cuda[:N].", group="router",
    )
    router_timeout: float = setting(
        "KTULHU_ROUTER_TIMEOUT", 15.0, decimal(0.01, 600.0),
        "Seconds before a classification falls back to the default route.", group="router",
    )
    # payments
    stripe_secret_key: str = setting(
        "STRIPE_SECRET_KEY", "", text, "Stripe API key (enables payments with the next two).",
        secret=True, group="payments",
    )
    stripe_publishable_key: str = setting(
        "STRIPE_PUBLISHABLE_KEY", "", text, "Returned to clients by /payment/config.", group="payments",
    )
    stripe_price_id: str = setting("STRIPE_PRICE_ID", "", text, "Price of the upgrade.", group="payments")
    stripe_webhook_secret: str = setting(
        "STRIPE_WEBHOOK_SECRET", "", text, "Signing secret of the Stripe webhook endpoint.",
        secret=True, group="payments",
    )
    stripe_checkout_mode: str = setting(
        "STRIPE_CHECKOUT_MODE", "subscription", one_of("subscription", "payment"), "Checkout mode.",
        group="payments",
    )
    stripe_success_url: str = setting(
        "STRIPE_SUCCESS_URL", "http://localhost:3000/payment/success", http_url, "Redirect after payment.",
        group="payments",
    )
    stripe_cancel_url: str = setting(
        "STRIPE_CANCEL_URL", "http://localhost:3000/payment/cancel", http_url, "Redirect on cancel.",
        group="payments",
    )
    stripe_api_base: str = setting(
        "KTULHU_STRIPE_API_BASE", "https://api.stripe.com", http_url, "Stripe API address (tests point it at loopback).",
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
        from ..store.location import is_postgres_url

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
        return [(f.metadata["env"], shown(f, getattr(self, f.name)), self.sources.get(f.metadata["env"], "default"))
                for f in setting_fields()]


def setting_fields() -> list[attrs.Attribute]:
    """Fields read from the environment, in declaration order (docs and `ktulhu config` use this)."""
    return [f for f in attrs.fields(Settings) if "env" in f.metadata]

