"""A real llama-server worker for the `/v1` tests of remote mode, started once per run."""

from __future__ import annotations


import pytest

from ktulhu import native_build
from ktulhu.local_cluster import llama_server
from ktulhu.settings import default_model_path
from tests.paths import REPO


@pytest.fixture(scope="session")
def llama_worker(tmp_path_factory: pytest.TempPathFactory):
    """One slot of the default model (its cache carries over between tests: assert nothing about it)."""
    binary = native_build.llama_server((native_build.read_marker() or {}).get("gpu", "cpu"))
    worker = llama_server(binary, REPO / default_model_path(), "api-worker",
                          tmp_path_factory.mktemp("llama-server") / "worker.log", slots=1, ctx=1024, threads=1)
    worker.start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
