"""`POST /v1/embeddings`: OpenAI's embeddings, driven by the official `openai` client over loopback.

Local mode embeds with a separate llama.cpp context (mean pooling) over the default SmolLM2 model:
vectors of one size, unit length, the same for the same input, token ids equal to their text, base64
equal to the floats, similar sentences closer than unrelated ones (the model is tiny, but with these
sentences the ordering holds by a wide margin, and the computation is deterministic), usage counting
the tokens `/tokenize` gives. Bad bodies are 400/422s naming the field; a model that cannot embed is
400 `model_cannot_embed`; the context is freed when the server stops. Remote mode forwards to a
llama-server worker started with `--embeddings`, and names a worker without them. The body checker
is tried on random bodies (a `Problem` naming a field, never anything else).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import attrs
import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu import native_build
from ktulhu.api.problems import Problem
from ktulhu.engine.embeddings import LocalEmbedder
from ktulhu.engine.remote import RemoteEngine
from ktulhu.http.embeddings import MAX_INPUTS, EmbeddingRequest, parse_embeddings
from ktulhu.local_cluster import llama_server
from ktulhu.settings import default_model_path
from tests.paths import REPO

from api.helpers import JSON_VALUES
from auth.helpers import bearer, client, make_user

pytestmark = pytest.mark.model

CTX = 256
ENV = {"KTULHU_LOGIN_RATE": "0", "LLAMA_CLI_CTX": str(CTX)}
CAT = "The cat sat on the mat."
CAT_TOO = "A cat is sitting on a mat."
REVENUE = "Quarterly revenue rose by 4 percent."
#: SmolLM2-135M's hidden size: the length of its mean-pooled embeddings.
N_EMBD = 576


def _sdk(server, credential: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=credential, max_retries=0, timeout=120)


async def _vectors(sdk: openai.AsyncOpenAI, inputs: Any, **fields: Any) -> tuple[list[np.ndarray], Any]:
    answer = await sdk.embeddings.create(model="any", input=inputs, encoding_format="float", **fields)
    assert answer.object == "list" and [d.index for d in answer.data] == list(range(len(answer.data)))
    assert all(d.object == "embedding" for d in answer.data)
    return [np.asarray(d.embedding, dtype=np.float64) for d in answer.data], answer


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def _tokens(http: httpx.AsyncClient, token: str, text: str) -> list[int]:
    """The ids the embedding of `text` reads: the model's BOS and control tokens, as llama-server."""
    r = await http.post("/tokenize", json={"content": text, "add_special": True}, headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


async def _refused(http: httpx.AsyncClient, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await http.post("/v1/embeddings", json=body, headers=bearer(token))
    return r.status_code, r.json()["error"]


# --- local mode -----------------------------------------------------------------------------------


async def test_local_embeddings(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        _, token = make_user(runtime)  # a free user: embeddings spend no generation quota
        sdk = _sdk(server, token)
        embedder = runtime.embedder.get()
        assert isinstance(embedder, LocalEmbedder)

        (cat,), answer = await _vectors(sdk, CAT)
        many, answer_many = await _vectors(sdk, [CAT, CAT_TOO, REVENUE])
        assert answer.model == answer_many.model == runtime.settings.model_file.stem
        assert {len(v) for v in [cat, *many]} == {N_EMBD}
        for vector in [cat, *many]:
            assert abs(np.linalg.norm(vector) - 1) < 1e-3
        (again,), _ = await _vectors(sdk, CAT)
        assert np.abs(again - cat).max() < 1e-5  # deterministic
        assert np.abs(many[0] - cat).max() < 1e-4  # batched with others, the same vector (within float noise)
        same, other, unrelated = _cosine(many[0], many[1]), _cosine(many[0], many[2]), _cosine(many[1], many[2])
        assert same > other + 0.1 and same > unrelated + 0.1, (same, other, unrelated)

        async with client(server) as http:
            ids = {text: await _tokens(http, token, text) for text in (CAT, CAT_TOO, REVENUE)}
            assert answer.usage.prompt_tokens == answer.usage.total_tokens == len(ids[CAT])
            assert answer_many.usage.prompt_tokens == sum(map(len, ids.values()))
            (from_ids,), by_ids = await _vectors(sdk, ids[CAT])
            assert np.abs(from_ids - cat).max() < 1e-5 and by_ids.usage.prompt_tokens == len(ids[CAT])
            nested, _ = await _vectors(sdk, [ids[CAT], ids[REVENUE]])
            assert np.abs(nested[0] - cat).max() < 1e-4 and np.abs(nested[1] - many[2]).max() < 1e-4

            # base64: little-endian float32 bytes; the SDK asks for them by default and decodes them
            r = await http.post("/v1/embeddings", json={"input": [CAT], "encoding_format": "base64"},
                                headers=bearer(token))
            packed = r.json()["data"][0]["embedding"]
            assert r.status_code == 200 and isinstance(packed, str)
            decoded = np.frombuffer(base64.b64decode(packed), dtype="<f4")
            assert decoded.shape == (N_EMBD,) and np.abs(decoded - cat).max() < 1e-6
            by_default = await sdk.embeddings.create(model="any", input=CAT)
            assert np.abs(np.asarray(by_default.data[0].embedding) - cat).max() < 1e-6
            (native,), _ = await _vectors(sdk, CAT, dimensions=N_EMBD)
            assert np.abs(native - cat).max() < 1e-6

            too_long = " ".join(["word"] * (CTX + 10))
            cases: list[tuple[dict[str, Any], int, str]] = [
                ({"input": []}, 400, "input"), ({"input": ""}, 400, "input"), ({"input": [CAT, ""]}, 400, "input[1]"),
                ({"input": ["x"] * 3000}, 400, "input"), ({"input": [-1]}, 400, "input[0]"),
                ({"input": [5, 10**9]}, 400, "input[1]"), ({"input": [[1, 2], [3, -1]]}, 400, "input[1][1]"),
                ({"input": [[]]}, 400, "input[0]"), ({"input": [CAT, too_long]}, 400, "input[1]"),
                ({"input": CAT, "dimensions": 7}, 400, "dimensions"), ({"input": CAT, "dimensions": 0}, 400, "dimensions"),
                ({"input": 5}, 422, "input"), ({"input": {"text": CAT}}, 422, "input"),
                ({"input": [CAT, 5]}, 400, "input[1]"), ({"input": [1.5]}, 400, "input[0]"),
                ({"input": [["a"]]}, 400, "input[0][0]"), ({"input": [True]}, 400, "input[0]"),
                ({"input": CAT, "encoding_format": "hex"}, 400, "encoding_format"),
                ({"input": CAT, "dimensions": "7"}, 422, "dimensions"), ({"input": CAT, "model": 3}, 422, "model"),
                ({"input": CAT, "wizard": 1}, 400, "wizard"), ({"model": "any"}, 422, "input"),
            ]
            for body, status, param in cases:
                got, error = await _refused(http, token, body)
                assert (got, error["param"]) == (status, param), (body, error)
                assert error["type"] == "invalid_request_error" and error["message"]
            got, error = await _refused(http, token, {"input": [CAT, too_long]})
            assert error["code"] == "context_too_long" and f"{CTX}" in error["message"]
            r = await http.post("/v1/embeddings", json={"input": CAT})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.embeddings.create(model="any", input=[CAT, ""])
        assert bad.value.param == "input[1]"
        (after,), _ = await _vectors(sdk, CAT)  # refusals leave the context as it was
        assert np.abs(after - cat).max() < 1e-5
        await sdk.close()
    assert embedder._closed and embedder._context is None  # freed when the server stopped


async def test_a_separate_embedding_model(live_server, tmp_path: Path) -> None:
    """KTULHU_EMBEDDING_MODEL is loaded on first use; one llama.cpp cannot load is `model_cannot_embed`."""
    model = REPO / default_model_path()
    async with live_server(**ENV, KTULHU_EMBEDDING_MODEL=str(model)) as server:
        _, token = make_user(server.runtime)
        sdk = _sdk(server, token)
        embedder = server.runtime.embedder.get()
        assert embedder._context is None  # nothing loaded before the first request
        vectors, answer = await _vectors(sdk, [CAT, REVENUE])
        assert answer.model == model.stem and {len(v) for v in vectors} == {N_EMBD}
        assert embedder._context is not None and embedder._context.owns_model
        assert embedder._context.model is not server.runtime.engine.get().model
        await sdk.close()
    assert embedder._context is None

    garbage = tmp_path / "not-a-model.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    for path in (str(garbage), str(tmp_path / "missing.gguf")):
        async with live_server(**ENV, KTULHU_EMBEDDING_MODEL=path) as server:
            _, token = make_user(server.runtime)
            sdk = _sdk(server, token)
            for _ in range(2):  # the failure is answered every time, never a 500
                with pytest.raises(openai.BadRequestError) as bad:
                    await sdk.embeddings.create(model="any", input=CAT)
                assert bad.value.code == "model_cannot_embed" and "KTULHU_EMBEDDING_MODEL" in bad.value.message
            # the chat model is unaffected
            reply = await sdk.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=2, temperature=0)
            assert reply.choices[0].message.content is not None
            await sdk.close()


# --- remote mode ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_worker(tmp_path_factory: pytest.TempPathFactory):
    """A llama-server that serves `/v1/embeddings` (mean pooling, as the local context)."""
    binary = native_build.llama_server((native_build.read_marker() or {}).get("gpu", "cpu"))
    worker = llama_server(binary, REPO / default_model_path(), "embedding-worker",
                          tmp_path_factory.mktemp("llama-server") / "worker.log", slots=1, ctx=CTX, threads=1)
    worker = attrs.evolve(worker, command=[*worker.command, "--embeddings", "--pooling", "mean"])
    worker.start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


async def test_remote_mode_forwards_to_the_worker(live_server, embedding_worker) -> None:
    env = {**ENV, "KTULHU_WORKERS": f"{embedding_worker.url}|slots=1", "LLAMA_CLI_MODEL": "models/not-here.gguf"}
    async with live_server(**env) as server:
        assert server.runtime.engine.get().__class__ is RemoteEngine
        _, token = make_user(server.runtime)
        sdk = _sdk(server, token)
        (cat, cat_too, revenue), answer = await _vectors(sdk, [CAT, CAT_TOO, REVENUE])
        assert {len(v) for v in (cat, cat_too, revenue)} == {N_EMBD}
        assert all(abs(np.linalg.norm(v) - 1) < 1e-3 for v in (cat, cat_too, revenue))
        assert _cosine(cat, cat_too) > _cosine(cat, revenue) + 0.1
        async with client(server) as http:
            ids = await _tokens(http, token, CAT)
            assert answer.usage.prompt_tokens >= len(ids)
            (from_ids,), _ = await _vectors(sdk, ids)
            assert np.abs(from_ids - cat).max() < 1e-4
            got, error = await _refused(http, token, {"input": CAT, "dimensions": 7})
            assert (got, error["param"]) == (400, "dimensions")
            got, error = await _refused(http, token, {"input": []})
            assert (got, error["param"]) == (400, "input")
        await sdk.close()


async def test_remote_worker_without_embeddings(live_server, llama_worker) -> None:
    env = {**ENV, "KTULHU_WORKERS": f"{llama_worker.url}|slots=1", "LLAMA_CLI_MODEL": "models/not-here.gguf"}
    async with live_server(**env) as server:
        _, token = make_user(server.runtime)
        sdk = _sdk(server, token)
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.embeddings.create(model="any", input=CAT)
        assert bad.value.code == "model_cannot_embed"
        assert llama_worker.url in bad.value.message and "--embeddings" in bad.value.message
        await sdk.close()


# --- the body checker, property-based -------------------------------------------------------------

_json = JSON_VALUES
_token = st.integers(-5, 60_000) | st.integers() | _json
_FIELD_VALUES = {
    "input": st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=4) | st.lists(_token, max_size=4)
    | st.lists(st.lists(_token, max_size=3), max_size=3) | st.lists(st.text(max_size=2) | _token, max_size=3)
    | st.just(["a"] * (MAX_INPUTS + 1)) | _json,
    "encoding_format": st.sampled_from(["float", "base64", "hex", ""]) | _json,
    "dimensions": st.integers(-3, 2000) | _json, "model": st.text(max_size=8) | _json, "user": _json,
    "unknown_field": _json,
}
_fields = st.lists(st.sampled_from(sorted(_FIELD_VALUES)).flatmap(
    lambda name: st.tuples(st.just(name), _FIELD_VALUES[name])), max_size=4)


@hsettings(max_examples=1000, deadline=None)
@given(_fields, st.sampled_from([None, 49152]))
def test_any_embeddings_body_is_parsed_or_refused_naming_a_field(fields: list, n_vocab: int | None) -> None:
    body = dict(fields)
    try:
        request = parse_embeddings(body, n_vocab=n_vocab)
    except Problem as problem:
        assert problem.status in (400, 422) and problem.message, problem
        name = problem.param and problem.param.split("[")[0]
        assert name in body or name == "input" not in body, (problem.param, body)
        return
    assert isinstance(request, EmbeddingRequest)
    assert 1 <= len(request.inputs) <= MAX_INPUTS
    for item in request.inputs:
        if isinstance(item, str):
            assert item
        else:
            assert item and all(type(t) is int and 0 <= t < (n_vocab or 2**31) for t in item)
    assert request.base64 == (body.get("encoding_format") == "base64")
    assert request.dimensions is None or request.dimensions >= 1
