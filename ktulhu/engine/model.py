"""The GGUF model, loaded once per process; contexts for decoding are created from it."""

from __future__ import annotations

import ctypes
import logging
import threading

import attrs
import llama_cpp

from ..settings import Settings
from . import llama_log

__all__ = ["Model", "ModelInfo", "ModelLoadError"]

log = logging.getLogger("ktulhu.engine")
_backend_lock = threading.Lock()
_backend_ready = False


class ModelLoadError(Exception):
    """The GGUF could not be loaded; the message names the file and what to check."""


@attrs.frozen
class ModelInfo:
    path: str
    description: str
    n_params: int
    size_bytes: int
    n_ctx_train: int
    n_vocab: int
    n_gpu_layers: int
    has_chat_template: bool


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_log.install()
            llama_cpp.llama_backend_init()
            _backend_ready = True


@attrs.define
class Model:
    """A loaded `llama_model` and its vocabulary. Thread-safe for reads (tokenising, metadata)."""

    handle: llama_cpp.llama_model_p | None
    vocab: llama_cpp.llama_vocab_p
    info: ModelInfo

    @classmethod
    def load(cls, settings: Settings) -> "Model":
        """Load `LLAMA_CLI_MODEL` (blocking: call it from a worker thread)."""
        path = settings.model_file
        if not path.is_file():
            raise ModelLoadError(f"no GGUF at {path}; run `ktulhu models pull` or set LLAMA_CLI_MODEL")
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = settings.n_gpu_layers
        params.use_mmap = True
        handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise ModelLoadError(
                f"llama.cpp could not load {path}: not a GGUF this build understands, or a truncated file "
                "(set KTULHU_LOG=info,ktulhu.llama=debug for llama.cpp's own messages)"
            )
        vocab = llama_cpp.llama_model_get_vocab(handle)
        info = ModelInfo(
            path=str(path),
            description=_model_desc(handle),
            n_params=int(llama_cpp.llama_model_n_params(handle)),
            size_bytes=int(llama_cpp.llama_model_size(handle)),
            n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(handle)),
            n_vocab=int(llama_cpp.llama_vocab_n_tokens(vocab)),
            n_gpu_layers=settings.n_gpu_layers if llama_cpp.llama_supports_gpu_offload() else 0,
            has_chat_template=bool(llama_cpp.llama_model_chat_template(handle, None)),
        )
        model = cls(handle=handle, vocab=vocab, info=info)
        if not model.tokenize("hello", special=False):
            model.close()
            raise ModelLoadError(f"{path} loaded but its tokenizer produced no tokens")
        return model

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. `special=False` keeps user text from becoming control tokens."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
        if n < 0:  # buffer too small: llama.cpp returns -needed
            capacity = -n
            buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes one token spells (a control token's own text, e.g. `<|im_end|>`)."""
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, True)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[:max(n, 0)]

    def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens` (ids checked by the caller), control tokens spelled out, as
        llama-server's `/detokenize`; bytes that are not UTF-8 become U+FFFD."""
        if not tokens:
            return ""
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        capacity = len(tokens) * 8 + 16
        buffer = ctypes.create_string_buffer(capacity)
        n = llama_cpp.llama_detokenize(self.vocab, ids, len(tokens), buffer, capacity, False, True)
        if n < 0:  # buffer too small: llama.cpp returns -needed
            capacity = -n
            buffer = ctypes.create_string_buffer(capacity)
            n = llama_cpp.llama_detokenize(self.vocab, ids, len(tokens), buffer, capacity, False, True)
        return buffer.raw[:max(n, 0)].decode("utf-8", "replace")

    def close(self) -> None:
        if self.handle is not None:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None


def _model_desc(handle: llama_cpp.llama_model_p) -> str:
    buffer = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_desc(handle, buffer, len(buffer))
    return buffer.value[: max(n, 0)].decode("utf-8", "replace")
