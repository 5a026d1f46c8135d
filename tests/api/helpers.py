"""Shared by the `/v1` tests: the official client pointed at a live server."""

from __future__ import annotations

import openai


def openai_client(server, credential: str) -> openai.AsyncOpenAI:
    """The official async client for `server`'s `/v1` with `credential` (a key or app token); no retries."""
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=credential, max_retries=0, timeout=120)
