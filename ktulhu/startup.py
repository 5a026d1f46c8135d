"""Steps shared by `ktulhu serve` and `ktulhu.asgi`: final checks and the start-up log lines."""

from __future__ import annotations

import logging

from .settings import JWT_SECRET_FILE, Settings, ensure_jwt_secret

__all__ = ["log_listening", "prepare"]

log = logging.getLogger("ktulhu")


def prepare(settings: Settings) -> Settings:
    """Run the file-system checks and make sure a JWT secret exists (raises `SettingsError`)."""
    settings.check_runtime()
    settings, created = ensure_jwt_secret(settings)
    if created:
        log.warning(
            "JWT_SECRET is not set: generated one into %s for this development server; "
            "set JWT_SECRET (and KTULHU_ENV=production) before exposing it", JWT_SECRET_FILE,
        )
    return settings


def route_groups(settings: Settings) -> dict[str, str]:
    """Which optional surfaces this configuration enables, for the start-up log."""
    return {
        "health": "on (/healthz, /readyz)",
        "payments": "on" if settings.payments_enabled else
                    "off (set STRIPE_SECRET_KEY, STRIPE_PUBLISHABLE_KEY, STRIPE_PRICE_ID)",
        "sign-in google": "on" if settings.google_enabled else "off (GOOGLE_CLIENT_ID unset)",
        "sign-in apple": "on" if settings.apple_enabled else "off (APPLE_CLIENT_ID unset)",
        # names only: the secrets are never logged
        "api keys file": (f"on ({len(settings.static_keys)} keys: "
                          f"{', '.join(k.name for k in settings.static_keys) or 'none'})"
                          if settings.api_keys_file else "off (KTULHU_API_KEYS_FILE unset)"),
    }


def log_listening(settings: Settings, binds: list[str]) -> None:
    log.info("listening on %s (env=%s)", ", ".join(binds), settings.env)
    for group, state in route_groups(settings).items():
        log.info("route group %s: %s", group, state)
