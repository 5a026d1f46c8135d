"""The intent classifier: an ONNX graph, its tokenizer and `labels.json`, run with onnxruntime.

Directory contract (any export that follows it can be loaded through `INTENT_ROUTER_DIR`):

- `model.onnx`: int64 inputs `input_ids` and `attention_mask` (plus `token_type_ids` if the graph
  declares it; it is fed zeros), shape `[batch, length]` with dynamic axes; one float output per
  head, named after the head, shape `[batch, n_labels]` (logits).
- `tokenizer.json`: a Hugging Face `tokenizers` file; padding and truncation in it are ignored.
- `labels.json`: `{"heads": {head: [label, ...]}, "max_length": int, "pad_id": int}`. `speech_act`,
  `domain` and `expectation` are required, `phatic` and `support` optional; each head's labels must
  be exactly the §5.3 labels in logit order. `max_length` and `pad_id` are optional (512 and the
  tokenizer's padding id, else `<pad>`/`[PAD]`, else 0).

`IntentModel.predict` is synchronous and thread-safe (onnxruntime sessions may run concurrently); the
service calls it from worker threads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .labels import HEADS, OPTIONAL_HEADS, REQUIRED_HEADS, HeadSet, decode_head

__all__ = ["DEFAULT_MAX_LENGTH", "REQUIRED_FILES", "IntentModel", "RouterLoadError"]


REQUIRED_FILES = ("model.onnx", "tokenizer.json", "labels.json")
DEFAULT_MAX_LENGTH = 512
#: Characters kept from one utterance before tokenising: enough for any `max_length` we use, and it
#: keeps a pathological megabyte-long message from costing real tokenizer time.
_CHARS_PER_TOKEN_BOUND = 12
_FIX = "rebuild it with `ktulhu router train` or point INTENT_ROUTER_DIR at a complete export"


class RouterLoadError(Exception):
    """The router directory cannot be used; the message names the file or head and the fix."""


@attrs.define(eq=False)
class IntentModel:
    """A loaded classifier. `heads` maps each active head to its labels (logit order)."""

    directory: Path
    session: Any
    tokenizer: Any
    heads: dict[str, tuple[str, ...]]
    max_length: int
    pad_id: int
    device: str
    feeds_token_type_ids: bool = False

    @classmethod
    def load(cls, directory: Path, *, seq_len: int | None = None, device: str = "auto",
             phatic: bool = True, threads: int | None = None) -> IntentModel:
        """Load and validate `directory`; raise `RouterLoadError` naming what is wrong.

        `seq_len` caps `max_length`; `device` is auto|cpu|cuda[:N]|gpu[:N]; `phatic=False` drops the
        phatic head; `threads` is onnxruntime's intra-op thread count (default 1: the service runs
        several batches in parallel instead).
        """
        import onnxruntime
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise RouterLoadError(f"{directory} is not a directory; {_FIX}")
        for name in REQUIRED_FILES:
            if not (directory / name).is_file():
                raise RouterLoadError(f"{directory / name} is missing; {_FIX}")
        spec = _read_labels(directory / "labels.json")
        heads = {name: tuple(labels) for name, labels in spec["heads"].items()}
        if not phatic:
            heads.pop("phatic", None)
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as error:  # tokenizers raises a bare Exception on bad files
            raise RouterLoadError(f"{directory / 'tokenizer.json'} cannot be read: {error}; {_FIX}") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        providers, device_name = _providers(device, onnxruntime.get_available_providers())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            session = onnxruntime.InferenceSession(str(directory / "model.onnx"), options, providers=providers)
        except Exception as error:
            raise RouterLoadError(f"{directory / 'model.onnx'} is not a usable ONNX model: {error}") from None
        token_types = _check_io(directory / "model.onnx", session, heads)
        max_length = int(spec.get("max_length") or DEFAULT_MAX_LENGTH)
        if seq_len is not None:
            max_length = min(max_length, seq_len)
        pad_id = spec.get("pad_id")
        if pad_id is None:
            padding = tokenizer.padding
            pad_id = padding["pad_id"] if padding else None
        if pad_id is None:
            pad_id = next((tokenizer.token_to_id(t) for t in ("<pad>", "[PAD]")
                           if tokenizer.token_to_id(t) is not None), 0)
        return cls(directory=directory, session=session, tokenizer=tokenizer, heads=heads,
                   max_length=max_length, pad_id=int(pad_id), device=device_name,
                   feeds_token_type_ids=token_types)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Token ids and mask for `texts`, each truncated to `max_length` and padded to the longest.

        An empty encoding becomes `[pad_id]` with mask 1, so every row has at least one real token.
        """
        limit = self.max_length * _CHARS_PER_TOKEN_BOUND
        encodings = self.tokenizer.encode_batch([t[:limit] for t in texts], add_special_tokens=True)
        rows = [(e.ids[: self.max_length] or [self.pad_id]) for e in encodings]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.feeds_token_type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds

    def logits(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Raw logits per head, shape `[len(texts), n_labels]`."""
        names = list(self.heads)
        outputs = self.session.run(names, self.encode(texts))
        return dict(zip(names, outputs))

    def predict(self, texts: Sequence[str]) -> list[HeadSet]:
        """Decoded heads for each text (one batch, one model call)."""
        if not texts:
            return []
        logits = self.logits(texts)
        out = []
        for i in range(len(texts)):
            decoded = {name: decode_head(logits[name][i].tolist(), labels) for name, labels in self.heads.items()}
            out.append(HeadSet(**decoded))
        return out


def _read_labels(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise RouterLoadError(f"{path} is not valid JSON: {error}; {_FIX}") from None
    heads = spec.get("heads") if isinstance(spec, dict) else None
    if not isinstance(heads, dict):
        raise RouterLoadError(f'{path} has no "heads" object; expected {{"heads": {{head: [labels]}}}}')
    for name in REQUIRED_HEADS:
        if name not in heads:
            raise RouterLoadError(f"{path}: required head {name!r} is missing")
    for name, labels in heads.items():
        if name not in HEADS:
            raise RouterLoadError(f"{path}: unknown head {name!r}; heads are " + ", ".join(HEADS))
        if list(labels) != list(HEADS[name]):
            raise RouterLoadError(f"{path}: head {name!r} lists {labels!r}; its labels must be exactly "
                                  f"{list(HEADS[name])!r} in this order")
    return spec


def _providers(device: str, available: Sequence[str]) -> tuple[list[Any], str]:
    device = (device or "auto").strip().lower()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"], "cpu"
    match = re.fullmatch(r"(?:auto|(?:cuda|gpu)(?::(\d+))?)", device)
    if match is None:
        raise RouterLoadError(f"INTENT_ROUTER_DEVICE={device!r}: not a device; set auto, cpu or cuda[:N]")
    if not has_cuda:
        raise RouterLoadError(f"INTENT_ROUTER_DEVICE={device!r}: onnxruntime has no CUDA provider here "
                              "(install onnxruntime-gpu); set INTENT_ROUTER_DEVICE=cpu or auto")
    index = int(match.group(1) or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"


def _check_io(path: Path, session: Any, heads: dict[str, tuple[str, ...]]) -> bool:
    """Validate inputs and head outputs; return whether the graph wants `token_type_ids`."""
    inputs = {i.name: i for i in session.get_inputs()}
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise RouterLoadError(f"{path}: input {name!r} is missing (inputs: {', '.join(inputs)})")
    extra = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
    if extra:
        raise RouterLoadError(f"{path}: unexpected inputs {sorted(extra)}; the router feeds only "
                              "input_ids, attention_mask and token_type_ids")
    for name, node in inputs.items():
        if node.type != "tensor(int64)":
            raise RouterLoadError(f"{path}: input {name!r} is {node.type}; it must be tensor(int64)")
    outputs = {o.name: o for o in session.get_outputs()}
    for name, labels in list(heads.items()):
        if name not in outputs:
            if name in OPTIONAL_HEADS:
                raise RouterLoadError(f"{path}: labels.json names head {name!r} but the model has no "
                                      f"output {name!r}; remove it from labels.json or export it")
            raise RouterLoadError(f"{path}: required head output {name!r} is missing "
                                  f"(outputs: {', '.join(outputs)})")
        shape = outputs[name].shape
        width = shape[-1] if shape else None
        if isinstance(width, int) and width != len(labels):
            raise RouterLoadError(f"{path}: head {name!r} has {width} logits but labels.json lists "
                                  f"{len(labels)} labels")
    return "token_type_ids" in inputs
