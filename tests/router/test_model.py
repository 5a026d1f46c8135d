"""Loading router directories: the committed model, and every way a directory can be malformed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ktulhu.router.labels import HEADS
from ktulhu.router.model import REQUIRED_FILES, IntentModel, RouterLoadError
from tests.paths import REPO

DEFAULT_DIR = REPO / "models" / "intent_router"

needs_model = pytest.mark.skipif(not (DEFAULT_DIR / "model.onnx").is_file(),
                                 reason="models/intent_router not built (ktulhu router train)")


@pytest.fixture(scope="module")
def model() -> IntentModel:
    if not (DEFAULT_DIR / "model.onnx").is_file():
        pytest.skip("models/intent_router not built")
    return IntentModel.load(DEFAULT_DIR, device="cpu")


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    if not (DEFAULT_DIR / "model.onnx").is_file():
        pytest.skip("models/intent_router not built")
    target = tmp_path / "router"
    shutil.copytree(DEFAULT_DIR, target)
    return target


# --- the committed model -------------------------------------------------------------------------

@needs_model
def test_committed_model_has_all_heads(model):
    assert {k: list(v) for k, v in model.heads.items()} == {k: list(v) for k, v in HEADS.items()}
    assert (DEFAULT_DIR / "metrics.json").is_file()
    total = sum(p.stat().st_size for p in DEFAULT_DIR.iterdir())
    assert total <= 25 * 1024 * 1024


@needs_model
@pytest.mark.parametrize(("text", "speech"), [
    ("how does a hash table work?", "ASKING"),
    ("¿cómo funciona una tabla hash?", "ASKING"),
    ("como funciona uma tabela hash?", "ASKING"),
    ("как работает хеш-таблица?", "ASKING"),
])
def test_predicts_in_four_languages(model, text, speech):
    [heads] = model.predict([text])
    assert heads.speech_act.label == speech
    assert heads.domain.label == "technical"
    assert sum(heads.domain.distribution) == pytest.approx(1.0, abs=1e-5)


@needs_model
def test_batch_padding_does_not_change_results(model):
    texts = ["hi", "write a python function that parses a CSV file and returns a list of dictionaries", "",
             "я так устал от работы"]
    batch = model.logits(texts)
    for i, text in enumerate(texts):
        single = model.logits([text])
        for name in model.heads:
            np.testing.assert_allclose(batch[name][i], single[name][0], atol=1e-4)


@needs_model
def test_empty_text_encodes_to_one_token(model):
    feeds = model.encode([""])
    assert feeds["input_ids"].tolist() == [[model.pad_id]]
    assert feeds["attention_mask"].tolist() == [[1]]
    assert feeds["input_ids"].dtype == np.int64


@needs_model
def test_long_input_is_truncated(model):
    text = "please explain how the garbage collector works " * 2000
    feeds = model.encode([text, "short"])
    assert feeds["input_ids"].shape == (2, model.max_length)
    assert feeds["attention_mask"][1].sum() < model.max_length
    started = time.perf_counter()
    [heads] = model.predict(["word " * 200_000])
    assert time.perf_counter() - started < 2.0
    assert heads.speech_act.label in HEADS["speech_act"]


@needs_model
def test_seq_len_caps_max_length():
    model = IntentModel.load(DEFAULT_DIR, seq_len=16, device="cpu")
    assert model.max_length == 16
    assert model.encode(["word " * 100])["input_ids"].shape == (1, 16)


@needs_model
def test_phatic_can_be_disabled():
    model = IntentModel.load(DEFAULT_DIR, phatic=False, device="cpu")
    assert "phatic" not in model.heads
    assert model.predict(["hello"])[0].phatic is None


# --- malformed directories -----------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(RouterLoadError, match="is not a directory"):
        IntentModel.load(tmp_path / "nope")


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_file_is_named(copy, name):
    (copy / name).unlink()
    with pytest.raises(RouterLoadError, match=f"{name} is missing"):
        IntentModel.load(copy)


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "not valid JSON"),
    ("[]", 'no "heads" object'),
    ('{"heads": {"speech_act": [], "domain": []}}', "required head 'expectation' is missing"),
    ('{"heads": {"speech_act": ["SOCIAL"], "domain": [], "expectation": []}}', "head 'speech_act' lists"),
    (json.dumps({"heads": {**{k: list(v) for k, v in HEADS.items()},
                           "speech_act": ["ASKING", "SOCIAL", "DIRECTING", "EXPRESSING", "SHARING"]}}),
     "head 'speech_act' lists"),
])
def test_bad_labels_json(copy, content, match):
    (copy / "labels.json").write_text(content)
    with pytest.raises(RouterLoadError, match=match):
        IntentModel.load(copy)


def test_unknown_head(copy):
    spec = json.loads((copy / "labels.json").read_text())
    spec["heads"]["sentiment"] = ["POS", "NEG"]
    (copy / "labels.json").write_text(json.dumps(spec))
    with pytest.raises(RouterLoadError, match="unknown head 'sentiment'"):
        IntentModel.load(copy)


def test_bad_tokenizer(copy):
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(RouterLoadError, match="tokenizer.json cannot be read"):
        IntentModel.load(copy)


def test_bad_onnx(copy):
    (copy / "model.onnx").write_bytes(b"definitely not protobuf")
    with pytest.raises(RouterLoadError, match="model.onnx is not a usable ONNX model"):
        IntentModel.load(copy)


def test_cuda_without_provider(copy):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(RouterLoadError, match="INTENT_ROUTER_DEVICE='cuda:1'"):
        IntentModel.load(copy, device="cuda:1")


# --- hand-built graphs (need the `onnx` package) -------------------------------------------------

def _tiny_graph(path: Path, widths: dict[str, int], *, token_type_ids: bool = False, float_ids: bool = False) -> None:
    """A graph whose every head output is `sum(input_ids) * w` with declared shape [batch, width]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    id_type = TensorProto.FLOAT if float_ids else TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", id_type, ["batch", "length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "length"])]
    if token_type_ids:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "length"]))
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["ids_f", "axes"], ["total"], keepdims=1)]
    inits, outputs = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])], []
    for name, width in widths.items():
        inits.append(helper.make_tensor(f"w_{name}", TensorProto.FLOAT, [1, width], [0.01 * (i + 1) for i in range(width)]))
        nodes.append(helper.make_node("MatMul", ["total", f"w_{name}"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _widths(**changes):
    widths = {name: len(labels) for name, labels in HEADS.items()}
    widths.update(changes)
    return {k: v for k, v in widths.items() if v}


def test_tiny_graph_loads_and_feeds_token_type_ids(copy):
    _tiny_graph(copy / "model.onnx", _widths(), token_type_ids=True)
    model = IntentModel.load(copy)
    assert model.feeds_token_type_ids
    assert "token_type_ids" in model.encode(["hi"])
    assert model.predict(["hi", "hello there"])[1].speech_act.label == "SHARING"


def test_head_width_mismatch_is_named(copy):
    _tiny_graph(copy / "model.onnx", _widths(domain=6))
    with pytest.raises(RouterLoadError, match="head 'domain' has 6 logits but labels.json lists 7"):
        IntentModel.load(copy)


def test_labels_name_a_head_the_model_lacks(copy):
    _tiny_graph(copy / "model.onnx", _widths(support=0))
    with pytest.raises(RouterLoadError, match="names head 'support' but the model has no output 'support'"):
        IntentModel.load(copy)
    spec = json.loads((copy / "labels.json").read_text())
    del spec["heads"]["support"]
    (copy / "labels.json").write_text(json.dumps(spec))
    assert IntentModel.load(copy).predict(["x"])[0].support is None


def test_required_output_missing(copy):
    _tiny_graph(copy / "model.onnx", _widths(expectation=0))
    with pytest.raises(RouterLoadError, match="required head output 'expectation' is missing"):
        IntentModel.load(copy)


def test_input_type_is_checked(copy):
    _tiny_graph(copy / "model.onnx", _widths(), float_ids=True)
    with pytest.raises(RouterLoadError, match="input 'input_ids' is tensor\\(float\\)"):
        IntentModel.load(copy)
