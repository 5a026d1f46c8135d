"""Shared by the `/v1` tests: the official client pointed at a live server."""

from __future__ import annotations

import openai
from hypothesis import strategies as st

#: Any JSON value (small): what a hostile body may hold in any field.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


def openai_client(server, credential: str) -> openai.AsyncOpenAI:
    """The official async client for `server`'s `/v1` with `credential` (a key or app token); no retries."""
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=credential, max_retries=0, timeout=120)
