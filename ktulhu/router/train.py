"""`ktulhu router train`: build the default intent router from `data/intents/` (CPU, deterministic).

Pipeline (`train`, one function a step): train a BPE tokenizer on the training split
(`_tokenizer`) -> encode the split and weigh its classes (`_training_set`) -> train each ensemble
member, a small convolutional encoder with the five heads, on noised batches (`_fit`) -> write
`tokenizer.json`, `labels.json`, `model.onnx` and check onnxruntime against torch
(`_write_router`) -> evaluate the export on both splits and write `metrics.json` (`_evaluate_export`).

Needs the `train` extra (torch, onnx). Determinism: fixed seeds, one torch thread, deterministic
algorithms and a fixed sample order, so two runs on the same data produce identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .dataset import DATA_DIR, Sample, load_split
from .labels import HEADS

__all__ = ["TrainConfig", "train"]

OUTPUT_DIR = Path("models/intent_router")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Hyper-parameters; the defaults build the committed model."""

    seed: int = 1234
    vocab_size: int = 3000
    max_length: int = 128
    embedding: int = 128
    channels: int = 128
    hidden: int = 96
    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    token_dropout: float = 0.25
    dropout: float = 0.2
    word_dropout: float = 0.0
    ngram_buckets: int = 0
    ngram_min: int = 3
    ngram_max: int = 5
    ensemble: int = 2


def _tokenizer(texts: list[str], config: TrainConfig):
    """A BPE tokenizer trained on `texts`: NFKC + lower-case (accents kept), punctuation and digits split.

    BPE rather than Unigram because the BPE trainer is reproducible to the byte (the Unigram
    trainer breaks score ties differently from run to run).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<pad>", "<unk>"], min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _piece_ngrams(tokenizer, config: TrainConfig):
    """For each vocabulary piece, the hashed character n-gram buckets of its text (fastText-style).

    Returns `(index, count)`: `index[v]` lists piece v's buckets, padded with `ngram_buckets` (a
    zero row); `count[v]` how many are real. Special tokens have none. CRC32 keeps it reproducible.
    """
    import zlib

    import torch

    vocab = tokenizer.get_vocab()
    rows: list[list[int]] = [[] for _ in range(len(vocab))]
    for piece, v in vocab.items():
        if piece in ("<pad>", "<unk>"):
            continue
        text = piece.replace("\u2581", "<") + ">"
        grams = {text[i:i + n] for n in range(config.ngram_min, config.ngram_max + 1)
                 for i in range(len(text) - n + 1)}
        rows[v] = sorted({zlib.crc32(g.encode("utf-8")) % config.ngram_buckets for g in grams})
    width = max(1, max(len(r) for r in rows))
    index = torch.full((len(rows), width), config.ngram_buckets, dtype=torch.int64)
    count = torch.zeros((len(rows), 1), dtype=torch.float32)
    for v, row in enumerate(rows):
        index[v, : len(row)] = torch.tensor(row, dtype=torch.int64)
        count[v, 0] = len(row)
    return index, count


def _network(vocab: int, config: TrainConfig, ngrams=None):
    import torch
    from torch import nn

    class IntentNet(nn.Module):
        """Embedding -> 2 conv layers (k=3, residual) -> masked mean+max pooling -> one MLP per head."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(vocab, config.embedding, padding_idx=0)
            self.ngrams = None
            if ngrams is not None:
                # subword buckets shared by pieces with common character n-grams; folded into
                # `embedding` by `freeze()` before export, so the ONNX graph is a plain lookup
                self.ngrams = nn.Embedding(config.ngram_buckets + 1, config.embedding, padding_idx=config.ngram_buckets)
                self.register_buffer("ngram_index", ngrams[0], persistent=False)
                self.register_buffer("ngram_count", ngrams[1], persistent=False)
            self.conv1 = nn.Conv1d(config.embedding, config.channels, 3, padding=1)
            self.conv2 = nn.Conv1d(config.channels, config.channels, 3, padding=1)
            self.dropout = nn.Dropout(config.dropout)
            self.heads = nn.ModuleDict({
                name: nn.Sequential(nn.Linear(2 * config.channels, config.hidden), nn.Tanh(),
                                    nn.Dropout(config.dropout), nn.Linear(config.hidden, len(labels)))
                for name, labels in HEADS.items()
            })

        def table(self):
            weight = self.embedding.weight
            if self.ngrams is not None:
                weight = weight + self.ngrams(self.ngram_index).sum(dim=1) / self.ngram_count.clamp(min=1.0)
            return weight

        def freeze(self) -> None:
            if self.ngrams is not None:
                with torch.no_grad():
                    self.embedding.weight.copy_(self.table())
                self.ngrams = None

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).to(torch.float32)            # [B, L, 1]
            if self.ngrams is None:
                x = self.embedding(input_ids) * mask                         # [B, L, E]
            else:
                x = nn.functional.embedding(input_ids, self.table()) * mask
            channel_mask = mask.transpose(1, 2)                              # [B, 1, L]
            # re-mask after every convolution so padding never leaks into real positions
            x = torch.relu(self.conv1(x.transpose(1, 2))) * channel_mask     # [B, C, L]
            x = (x + torch.relu(self.conv2(self.dropout(x)))) * channel_mask
            x = x.transpose(1, 2)                                            # [B, L, C]
            mean = x.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            top = (x - (1.0 - mask) * 1e4).max(dim=1).values
            features = self.dropout(torch.cat([mean, top], dim=-1))
            return tuple(self.heads[name](features) for name in HEADS)

    return IntentNet()


def _ensemble_class():
    import torch
    from torch import nn

    class Ensemble(nn.Module):
        """Mean of the members' logits, head by head (one ONNX graph)."""

        def __init__(self, members) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)

        def forward(self, input_ids, attention_mask):
            outs = [m(input_ids, attention_mask) for m in self.members]
            return tuple(torch.stack(head).mean(dim=0) for head in zip(*outs))

    return Ensemble


def _Ensemble(members):
    return _ensemble_class()(members).eval()


def _encode(tokenizer, texts: list[str], max_length: int):
    import torch

    rows = [(e.ids[:max_length] or [0]) for e in tokenizer.encode_batch(texts)]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return ids, mask


def train(*, data_dir: Path = DATA_DIR, output: Path = OUTPUT_DIR, config: TrainConfig = TrainConfig(),
          log: Callable[[str], object] = print) -> dict[str, Any]:
    """Train, export and evaluate; write the router directory `output`; return the metrics."""
    _require_train_extra()
    started = time.monotonic()
    _make_deterministic(config.seed)
    train_set = load_split("train", data_dir)
    heldout = load_split("heldout", data_dir)
    tokenizer = _tokenizer([s.utterance for s in train_set], config)
    log(f"tokenizer: {tokenizer.get_vocab_size()} pieces; {len(train_set)} train / {len(heldout)} held-out samples")
    data = _training_set(tokenizer, train_set, config)
    members = [_fit(data, member, config, log) for member in range(config.ensemble)]
    parameters = sum(p.numel() for m in members for p in m.parameters())
    net = members[0] if len(members) == 1 else _Ensemble(members)
    max_diff = _write_router(net, tokenizer, heldout, output, config)
    log(f"onnxruntime vs torch: max |logit difference| {max_diff:.2e}")
    metrics = _evaluate_export(output, train_set, heldout, data_dir=data_dir, config=config, max_diff=max_diff,
                               parameters=parameters)
    log(f"done in {time.monotonic() - started:.0f} s -> {output}")
    return metrics


def _require_train_extra() -> None:
    """End with the install command, rather than an ImportError half-way, when torch is missing."""
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise SystemExit(f"training needs the train extra: pip install -e '.[train]' ({error})") from None


def _make_deterministic(seed: int) -> None:
    """Fixed seeds, one torch thread and deterministic kernels: two runs write identical files."""
    import numpy as np
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


@attrs.frozen
class _TrainingSet:
    """The training split as tensors, and what every ensemble member learns it with."""

    #: [samples, length] piece ids (0-padded) and their mask (1 where a piece is).
    ids: Any
    mask: Any
    #: head name -> [samples] label index.
    targets: dict[str, Any]
    #: head name -> its class-weighted cross-entropy.
    loss_fns: dict[str, Any]
    #: [vocab] True for pieces that start a word (whole-word dropout).
    word_starts: Any
    #: `_piece_ngrams` of the vocabulary; None without subword buckets.
    ngrams: Any
    vocab: int


def _training_set(tokenizer: Any, samples: list[Sample], config: TrainConfig) -> _TrainingSet:
    """Encode `samples`, and weigh each head's classes by inverse square root of their frequency:
    rare labels (SOCIAL, SUPPORT, OTHER...) are not drowned out."""
    import torch
    from torch import nn

    vocab = tokenizer.get_vocab_size()
    targets = {name: torch.tensor([labels.index(s.labels[name]) for s in samples]) for name, labels in HEADS.items()}
    ids, mask = _encode(tokenizer, [s.utterance for s in samples], config.max_length)
    ngrams = _piece_ngrams(tokenizer, config) if config.ngram_buckets else None
    # pieces that start a word (Metaspace marks them with U+2581)
    starts = torch.zeros(vocab, dtype=torch.bool)
    for piece, v in tokenizer.get_vocab().items():
        starts[v] = piece.startswith("\u2581")
    loss_fns = {}
    for name, labels in HEADS.items():
        counts = torch.bincount(targets[name], minlength=len(labels)).to(torch.float32).clamp(min=1.0)
        weights = (counts.sum() / counts).sqrt()
        loss_fns[name] = nn.CrossEntropyLoss(weight=weights / weights.mean())
    return _TrainingSet(ids, mask, targets, loss_fns, starts, ngrams, vocab)


def _fit(data: _TrainingSet, member: int, config: TrainConfig, log: Callable[[str], object]) -> Any:
    """Train ensemble member `member` (AdamW, one-cycle schedule, noised batches); returns it in
    eval mode with its n-gram table folded into the embedding."""
    import torch

    # member 0 uses the global seed as `_make_deterministic` set it; later members re-seed (init and noise)
    seed = config.seed + member
    if member:
        torch.manual_seed(seed)
    net = _network(data.vocab, config, data.ngrams)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    n_samples = len(data.ids)
    steps_per_epoch = -(-n_samples // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.learning_rate,
                                                   total_steps=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(config.epochs):
        net.train()
        order = torch.randperm(n_samples, generator=generator)
        total = 0.0
        for start in range(0, n_samples, config.batch_size):
            batch = order[start:start + config.batch_size]
            b_ids, b_mask = _noised_batch(data, batch, config, generator)
            outputs = net(b_ids, b_mask)
            loss = sum(data.loss_fns[name](out, data.targets[name][batch]) for name, out in zip(HEADS, outputs))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        log(f"model {member + 1}/{config.ensemble} epoch {epoch + 1}/{config.epochs}: loss {total / n_samples:.4f}")
    net.eval()
    net.freeze()
    return net


def _noised_batch(data: _TrainingSet, batch: Any, config: TrainConfig, generator: Any) -> tuple[Any, Any]:
    """The rows `batch` (ids, mask), cut to their longest, with token and word dropout applied."""
    import torch

    width = int(data.mask[batch].sum(dim=1).max())
    ids, mask = data.ids[batch, :width].clone(), data.mask[batch, :width]
    drop = (torch.rand(ids.shape, generator=generator) < config.token_dropout) & (mask == 1)
    # half of the dropped tokens become <unk>, half a random piece: teaches the model that
    # unfamiliar pieces (words it never saw) carry no domain
    noise = torch.randint(2, data.vocab, ids.shape, generator=generator)
    coin = torch.rand(ids.shape, generator=generator) < 0.5
    ids[drop] = torch.where(coin, noise, torch.ones_like(noise))[drop]
    if config.word_dropout:
        # drop whole words (every piece of the word becomes <unk>): the frame must carry
        # speech act and expectation when the content word is unfamiliar
        word = torch.cumsum(data.word_starts[data.ids[batch, :width]].to(torch.int64), dim=1).clamp(max=width - 1)
        gone = torch.rand(ids.shape, generator=generator) < config.word_dropout
        gone = torch.gather(gone, 1, word) & (mask == 1)
        ids[gone] = 1
    return ids, mask


def _write_router(net: Any, tokenizer: Any, heldout: list[Sample], output: Path, config: TrainConfig) -> float:
    """Write `tokenizer.json`, `labels.json` and `model.onnx` into `output`; returns the largest
    logit difference between onnxruntime and torch (`_check_onnx` raises beyond tolerance)."""
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    labels = {"format": 1, "heads": {name: list(labels) for name, labels in HEADS.items()},
              "max_length": config.max_length, "pad_id": 0}
    (output / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    _export(net, output / "model.onnx")
    return _check_onnx(net, output, tokenizer, heldout, config)


def _evaluate_export(output: Path, train_set: list[Sample], heldout: list[Sample], *, data_dir: Path,
                     config: TrainConfig, max_diff: float, parameters: int) -> dict[str, Any]:
    """Evaluate the router as it will be served (the ONNX files in `output`, through `IntentModel`)
    and write `metrics.json`: scores, how it was built, from what. Returns the metrics."""
    from .evaluate import evaluate
    from .model import IntentModel

    model = IntentModel.load(output, device="cpu")
    metrics = {
        "heldout": evaluate(heldout, model.predict),
        "train": {k: v for k, v in evaluate(train_set, model.predict).items() if k in ("heads", "prompt_key_accuracy")},
        "onnx_max_abs_logit_diff": float(f"{max_diff:.3e}"),
        "config": attrs.asdict(config),
        "data_sha256": _digest(data_dir),
        "parameters": parameters,
        "built_with": _versions(),
        "rebuild": "ktulhu router train  (needs: pip install -e '.[train]')",
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics


def _export(net, path: Path) -> None:
    import torch

    ids = torch.ones((2, 7), dtype=torch.int64)
    mask = torch.ones((2, 7), dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
    axes.update({name: {0: "batch"} for name in HEADS})
    with torch.no_grad():
        torch.onnx.export(net, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=list(HEADS), dynamic_axes=axes, opset_version=17, dynamo=False,
                          do_constant_folding=True)


def _check_onnx(net, output: Path, tokenizer, samples: list[Sample], config: TrainConfig) -> float:
    import numpy as np
    import onnxruntime
    import torch

    texts = [s.utterance for s in samples[:256]] + ["", "x" * 3000]
    ids, mask = _encode(tokenizer, texts, config.max_length)
    session = onnxruntime.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(list(HEADS), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in net(ids, mask)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    if diff > 1e-3:
        raise RuntimeError(f"ONNX export disagrees with torch: max logit difference {diff}")
    return diff


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "onnx", "onnxruntime", "tokenizers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _digest(data_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("train.jsonl", "heldout.jsonl"):
        h.update((Path(data_dir) / name).read_bytes())
    return h.hexdigest()
