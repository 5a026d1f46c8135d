"""Stripe's API through the official `stripe` client, without ever blocking the trio loop.

The client's calls are blocking, so each runs in a worker thread under `trio.fail_after` (and the
HTTP client's own timeout, so an abandoned thread ends soon too). At most `MAX_CALLS` calls run at
once. Errors come back as `StripeFailure` with a message safe to show to the caller.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import stripe
import trio

from ..settings import Settings
from .plans import success_url

__all__ = ["MAX_CALLS", "TIMEOUT_S", "StripeFailure", "StripeGateway"]

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_S = 20.0
MAX_CALLS = 4
_LIMITER: trio.CapacityLimiter | None = None


class StripeFailure(Exception):
    """A Stripe call failed (error answer, network, timeout). `code` is the JSON error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _limiter() -> trio.CapacityLimiter:
    global _LIMITER
    if _LIMITER is None:
        _LIMITER = trio.CapacityLimiter(MAX_CALLS)
    return _LIMITER


class StripeGateway:
    """One configured client per settings object (cheap to build; holds no connection state we own)."""

    def __init__(self, settings: Settings, *, timeout: float = TIMEOUT_S) -> None:
        self.settings = settings
        self.timeout = timeout
        self.client = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses={"api": settings.stripe_api_base.rstrip("/")},
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            with trio.fail_after(self.timeout + 1):
                return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                                     limiter=_limiter(), abandon_on_cancel=True)
        except trio.TooSlowError:
            raise StripeFailure("stripe_timeout", f"Stripe did not answer within {self.timeout:g} s") from None
        except stripe.APIConnectionError as exc:
            log.warning("Stripe unreachable: %s", exc.user_message or exc)
            raise StripeFailure("stripe_unreachable", "Stripe could not be reached; try again later") from None
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise StripeFailure("not_found", "Stripe has no such object") from None
            log.warning("Stripe rejected a request: %s", exc.user_message or exc)
            raise StripeFailure("stripe_error", f"Stripe answered {exc.http_status}: "
                                                f"{exc.user_message or type(exc).__name__}") from None
        except stripe.StripeError as exc:
            log.warning("Stripe error %s: %s", exc.http_status, exc.user_message or exc)
            raise StripeFailure("stripe_error", f"Stripe answered {exc.http_status}: "
                                                f"{exc.user_message or type(exc).__name__}") from None

    async def create_checkout_session(self, user_id: str) -> dict[str, Any]:
        """Create the upgrade checkout for `user_id` (the original's fields, in its order, plus
        `client_reference_id` and, for subscriptions, the user id on the subscription's metadata so
        that its later events find the user)."""
        s = self.settings
        params: dict[str, Any] = {
            "mode": s.stripe_checkout_mode,
            "success_url": success_url(s.stripe_success_url),
            "cancel_url": s.stripe_cancel_url,
        }
        if s.stripe_checkout_mode == "payment":
            params["customer_creation"] = "always"
        params["automatic_tax"] = {"enabled": True}
        params["line_items"] = [{"price": s.stripe_price_id, "quantity": 1}]
        params["metadata"] = {"user_id": user_id}
        params["client_reference_id"] = user_id
        if s.stripe_checkout_mode == "subscription":
            params["subscription_data"] = {"metadata": {"user_id": user_id}}
        session = await self._call(self.client.v1.checkout.sessions.create, params=params)
        return session.to_dict()

    async def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        session = await self._call(self.client.v1.checkout.sessions.retrieve, session_id)
        return session.to_dict()

    async def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        """The subscription as Stripe sees it now (its `status` says whether it is paid for)."""
        subscription = await self._call(self.client.v1.subscriptions.retrieve, subscription_id)
        return subscription.to_dict()
