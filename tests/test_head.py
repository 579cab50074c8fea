"""The SPRM head file: round trips against numpy and torch, spec round trip, bad files, atomic writes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edge_ms.errors import EdgeMSError
from edge_ms.head import HeadSpec, check_backbone, load_head, write_head

C = 64


def _spec(c: int = C, **kw) -> HeadSpec:
    base = dict(
        layer=26,
        hidden_size=c,
        step_delimiter_ids=(382,),
        think_start_id=151648,
        think_end_id=151649,
        backbone_fingerprint="sha256:0123abcd",
    )
    base.update(kw)
    return HeadSpec(**base)


def _weights(c: int = C, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "0.weight": (rng.standard_normal((2 * c, c)) / np.sqrt(c)).astype(np.float32),
        "0.bias": (0.1 * rng.standard_normal(2 * c)).astype(np.float32),
        "3.weight": (rng.standard_normal((1, 2 * c)) / np.sqrt(2 * c)).astype(np.float32),
        "3.bias": np.array([0.3], dtype=np.float32),
    }


def _numpy_head(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x.astype(np.float64) @ w["0.weight"].T.astype(np.float64) + w["0.bias"], 0.0)
    logit = h @ w["3.weight"].T.astype(np.float64) + w["3.bias"]
    return 1.0 / (1.0 + np.exp(-logit[:, 0]))


def test_scores_match_numpy_reference(tmp_path: Path) -> None:
    w = _weights()
    path = tmp_path / "m.sprm.onnx"
    write_head(path, w, _spec())
    head = load_head(path)
    x = np.random.default_rng(1).standard_normal((17, C)).astype(np.float32)
    got = head.score(x)
    assert got.dtype == np.float32 and got.shape == (17,)
    np.testing.assert_allclose(got, _numpy_head(w, x), atol=1e-6, rtol=0)
    # Scores spread over (0, 1): a head that returned a constant would not pass the comparison above,
    # but make the spread explicit.
    assert got.min() > 0.0 and got.max() < 1.0 and got.std() > 0.01


def test_scores_match_torch_sequential_head(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    c = 96
    module = torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * c, 1)
    ).eval()
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    path = tmp_path / "t.sprm.onnx"
    write_head(path, state, _spec(c))
    x = torch.randn(32, c) * 3
    with torch.no_grad():
        want = torch.sigmoid(module(x)).squeeze(-1).numpy()
    got = load_head(path).score(x.numpy())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_weights_and_spec_round_trip(tmp_path: Path) -> None:
    w = _weights(seed=3)
    spec = _spec(step_delimiter_ids=(382, 4192, 6762), think_start_id=None, think_end_id=None, layer=0)
    path = tmp_path / "r.sprm.onnx"
    write_head(path, w, spec, provenance={"source": "org/model@abc"})
    head = load_head(path)
    assert head.spec == spec
    assert head.path == path
    back = head.weights()
    assert sorted(back) == sorted(w)
    for key in w:
        assert back[key].dtype == np.float32
        np.testing.assert_array_equal(back[key], w[key])
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["edge_ms.source"] == "org/model@abc"
    assert props["edge_ms.step_delimiter_ids"] == "[382, 4192, 6762]"
    assert props["edge_ms.think_start_id"] == "null"


def test_graph_is_plain_onnx(tmp_path: Path) -> None:
    path = tmp_path / "g.sprm.onnx"
    write_head(path, _weights(), _spec())
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Sigmoid", "Reshape"]
    (inp,) = model.graph.input
    assert inp.name == "hidden_states"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["n", C]
    (out,) = model.graph.output
    assert out.name == "step_score"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["n"]


def test_bf16_like_float16_weights_are_accepted_as_float32(tmp_path: Path) -> None:
    w = {k: v.astype(np.float16) for k, v in _weights().items()}
    path = tmp_path / "h.sprm.onnx"
    write_head(path, w, _spec())
    back = load_head(path).weights()
    np.testing.assert_array_equal(back["0.weight"], w["0.weight"].astype(np.float32))


def test_score_edge_cases(tmp_path: Path) -> None:
    path = tmp_path / "e.sprm.onnx"
    w = _weights()
    write_head(path, w, _spec())
    head = load_head(path)
    empty = head.score(np.zeros((0, C), dtype=np.float32))
    assert empty.shape == (0,) and empty.dtype == np.float32
    # float64 and non-contiguous inputs are converted, not rejected.
    x = np.random.default_rng(2).standard_normal((C, 5)).T
    np.testing.assert_allclose(head.score(x), _numpy_head(w, x), atol=1e-6)
    # One row scores the same alone as inside a batch.
    batch = np.random.default_rng(4).standard_normal((8, C)).astype(np.float32)
    np.testing.assert_allclose(head.score(batch[3:4])[0], head.score(batch)[3], atol=1e-7)
    with pytest.raises(ValueError, match=r"\[n, 64\]"):
        head.score(np.zeros((2, C + 1), dtype=np.float32))
    with pytest.raises(ValueError):
        head.score(np.zeros(C, dtype=np.float32))


def _assert_one_line(err: pytest.ExceptionInfo, path: Path, needle: str) -> None:
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert needle in text


def _rewrite(path: Path, mutate) -> None:
    model = onnx.load(str(path))
    mutate(model)
    path.write_bytes(model.SerializeToString())


def _set_meta(key: str, value: str | None):
    def mutate(model: onnx.ModelProto) -> None:
        props = {p.key: p.value for p in model.metadata_props}
        if value is None:
            props.pop(key)
        else:
            props[key] = value
        del model.metadata_props[:]
        helper.set_model_props(model, props)

    return mutate


def _good(tmp_path: Path, name: str = "bad.sprm.onnx") -> Path:
    path = tmp_path / name
    write_head(path, _weights(), _spec())
    return path


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: None, "head file not found"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: p.write_bytes(b"\x00\xff garbage, not protobuf \x13\x37" * 10), "not an ONNX file"),
        (lambda p: p.write_bytes(b""), "no graph"),
    ],
    ids=["missing", "directory", "garbage", "empty"],
)
def test_unreadable_files_give_one_line(tmp_path: Path, make, needle: str) -> None:
    path = tmp_path / "bad.sprm.onnx"
    make(path)
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, needle)


def test_truncated_file_gives_one_line(tmp_path: Path) -> None:
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, "not an ONNX file")


def test_onnx_model_that_is_not_a_head(tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, "not an edge_ms head: metadata edge_ms.format_version")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("edge_ms.format_version", "2", "format_version 2 is not supported"),
        ("edge_ms.format_version", "one", "edge_ms.format_version is 'one'"),
        ("edge_ms.backbone_fingerprint", None, "metadata edge_ms.backbone_fingerprint missing"),
        ("edge_ms.step_delimiter_ids", "[382,", "edge_ms.step_delimiter_ids"),
        ("edge_ms.step_delimiter_ids", "[]", "edge_ms.step_delimiter_ids"),
        ("edge_ms.think_end_id", "-1", "edge_ms.think_end_id"),
        ("edge_ms.layer", "null", "edge_ms.layer"),
        ("edge_ms.hidden_size", str(C * 2), f"but edge_ms.hidden_size is {C * 2}"),
    ],
)
def test_bad_metadata_gives_one_line(tmp_path: Path, key: str, value: str | None, needle: str) -> None:
    path = _good(tmp_path)
    _rewrite(path, _set_meta(key, value))
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, needle)


def test_missing_initializer_gives_one_line(tmp_path: Path) -> None:
    path = _good(tmp_path)

    def drop_bias(model: onnx.ModelProto) -> None:
        keep = [t for t in model.graph.initializer if t.name != "3.bias"]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)

    _rewrite(path, drop_bias)
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, "['3.bias'] missing")


def _set_node(index: int, **fields):
    def mutate(model: onnx.ModelProto) -> None:
        node = model.graph.node[index]
        for key, value in fields.items():
            if key == "attrs":
                del node.attribute[:]
                node.attribute.extend(helper.make_attribute(k, v) for k, v in value.items())
            elif key in ("input", "output"):
                del getattr(node, key)[:]
                getattr(node, key).extend(value)
            else:
                setattr(node, key, value)

    return mutate


def _drop_sigmoid(model: onnx.ModelProto) -> None:
    # The logit goes straight to the reshape: scores are no longer probabilities.
    nodes = [n for n in model.graph.node if n.op_type != "Sigmoid"]
    nodes[-1].input[0] = "logit"
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _set_initializer(name: str, array: np.ndarray):
    def mutate(model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(array, name=name))

    return mutate


def _external(location: str):
    def mutate(model: onnx.ModelProto) -> None:
        t = next(t for t in model.graph.initializer if t.name == "0.weight")
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
        t.external_data.add(key="offset", value="0")
        t.external_data.add(key="length", value=str(4 * 2 * C * C))

    return mutate


def _claim_width(c: int):
    # Metadata, input and weight headers claim a width the file's data cannot hold.
    def mutate(model: onnx.ModelProto) -> None:
        _set_meta("edge_ms.hidden_size", str(c))(model)
        model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = c
        for t in model.graph.initializer:
            if t.name in ("0.weight", "0.bias", "3.weight"):
                shape = {"0.weight": (2 * c, c), "0.bias": (2 * c,), "3.weight": (1, 2 * c)}[t.name]
                del t.dims[:]
                t.dims.extend(shape)

    return mutate


def _extra_initializer(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.ones((C, 1), np.float32), name="big"))
    model.graph.node[2].input[1] = "big"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (_set_node(1, op_type="NoSuchOp"), "node 1 (NoSuchOp): an SPRM head graph uses only Gemm"),
        (_set_node(1, op_type="Expand"), "node 1 (Expand): an SPRM head graph uses only"),
        (_set_node(1, input=["hidden_states"]), "node 1 (Relu) does not continue the chain"),
        (_extra_initializer, "node 2 (Gemm) reads 'big', which is not one of the head's own tensors"),
        (_set_node(0, attrs={"transB": 0}), "onnxruntime cannot load the head"),
        (_drop_sigmoid, "scores outside [0, 1]"),
        (_set_initializer("flat_shape", np.array([1, -1], np.int64)), "gives float32 of shape [1, 3] for 3 rows"),
        (_set_initializer("flat_shape", np.array([1], np.int64)), "fails on a probe batch of 3 rows"),
        (_set_initializer("0.bias", np.full(2 * C, np.nan, np.float32)), "weight 0.bias holds NaN or infinite"),
        (_set_initializer("3.bias", np.array([np.inf], np.float32)), "weight 3.bias holds NaN or infinite"),
        (_set_initializer("3.bias", np.array([1], np.int32)), "weight 3.bias has ONNX type INT32"),
        (_external("/etc/passwd"), "tensor '0.weight' refers to data outside the file ('/etc/passwd')"),
        (_external("../../secret.bin"), "refers to data outside the file ('../../secret.bin')"),
        (_claim_width(4096), "weight 0.weight is malformed: its data does not fill shape [8192, 4096]"),
        (_set_meta("edge_ms.hidden_size", str(10**9)), "edge_ms.hidden_size is 1000000000, not a width in 1..16384"),
    ],
    ids=["unknown-op", "expand", "not-a-chain", "foreign-tensor", "ort-rejects", "no-sigmoid", "row-shape",
         "fixed-length", "nan", "inf", "int-weight", "external-abs", "external-rel", "huge-dims", "huge-width"],
)
def test_hostile_graphs_give_one_line(tmp_path: Path, mutate, needle: str) -> None:
    path = _good(tmp_path)
    _rewrite(path, mutate)
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, needle)


def test_torch_style_n_by_1_output_is_accepted(tmp_path: Path) -> None:
    # A graph without the final reshape gives [n, 1], as torch's export of the Sequential does.
    path = _good(tmp_path)

    def keep_column(model: onnx.ModelProto) -> None:
        del model.graph.node[-1]
        model.graph.node[-1].output[0] = "step_score"

    _rewrite(path, keep_column)
    x = np.random.default_rng(5).standard_normal((4, C)).astype(np.float32)
    got = load_head(path).score(x)
    assert got.shape == (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, _numpy_head(_weights(), x), atol=1e-6)


def test_file_far_larger_than_its_head_is_refused(tmp_path: Path) -> None:
    path = _good(tmp_path)

    def pad(model: onnx.ModelProto) -> None:
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(1 << 19, np.float32), name="ballast"))

    _rewrite(path, pad)
    with pytest.raises(EdgeMSError) as err:
        load_head(path)
    _assert_one_line(err, path, f"far more than a head of hidden_size {C} needs")


def test_fifo_and_device_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.sprm.onnx"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.sprm.onnx"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        with pytest.raises(EdgeMSError) as err:
            load_head(path)
        _assert_one_line(err, path, "not a regular file")


@pytest.mark.parametrize(
    ("weights", "spec", "needle"),
    [
        ({**_weights(), "0.weight": np.zeros((2 * C, C + 1), np.float32)}, _spec(), "0.weight has shape"),
        ({k: v for k, v in _weights().items() if k != "3.bias"}, _spec(), "missing ['3.bias']"),
        ({**_weights(), "extra": np.zeros(1)}, _spec(), "unexpected ['extra']"),
        ({**_weights(), "3.bias": np.array([np.nan], np.float32)}, _spec(), "NaN"),
        ({**_weights(), "3.bias": np.array([1], np.int64)}, _spec(), "dtype int64"),
        (_weights(), _spec(step_delimiter_ids=()), "step_delimiter_ids"),
        (_weights(), _spec(format_version=2), "format_version 2"),
    ],
    ids=["shape", "missing", "extra", "nan", "int", "no-delims", "version"],
)
def test_write_rejects_bad_input_and_writes_nothing(tmp_path: Path, weights, spec, needle: str) -> None:
    path = tmp_path / "w.sprm.onnx"
    with pytest.raises(EdgeMSError) as err:
        write_head(path, weights, spec)
    _assert_one_line(err, path, needle)
    assert list(tmp_path.iterdir()) == []


def test_write_leaves_only_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.sprm.onnx"
    write_head(path, _weights(), _spec())
    write_head(path, _weights(seed=5), _spec())  # overwrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.sprm.onnx"]
    np.testing.assert_array_equal(load_head(path).weights()["0.bias"], _weights(seed=5)["0.bias"])


def test_written_file_gets_the_umask_not_private_temp_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.sprm.onnx"
    old = os.umask(0o022)
    try:
        write_head(path, _weights(), _spec())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch, exc: BaseException) -> None:
    path = tmp_path / "m.sprm.onnx"
    old = _weights(seed=1)
    write_head(path, old, _spec())
    before = path.read_bytes()

    def explode(fd: int) -> None:
        raise exc

    # Fail after the temp file holds (part of) the new bytes, before the rename.
    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(type(exc)):
        write_head(path, _weights(seed=2), _spec())
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m.sprm.onnx"]
    assert path.read_bytes() == before
    np.testing.assert_array_equal(load_head(path).weights()["0.weight"], old["0.weight"])


def test_failed_first_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.sprm.onnx"

    def no_rename(src, dst) -> None:
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        write_head(path, _weights(), _spec())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [("think_end_id", 600), ("think_start_id", 512), ("step_delimiter_ids", (257, 10**6))],
)
def test_token_ids_outside_the_vocabulary_are_refused(converted, tmp_path: Path, key: str, value) -> None:
    from edge_ms.model import Model

    model_dir = converted("tiny-qwen2", "f32")
    good = load_head(model_dir / "tiny-qwen2.sprm.onnx")
    path = tmp_path / "ids.sprm.onnx"
    write_head(path, good.weights(), dataclasses.replace(good.spec, **{key: value}))
    model = Model(model_dir / "tiny-qwen2-f32.gguf")
    try:
        check_backbone(good, model)  # the converted head itself belongs
        with pytest.raises(EdgeMSError) as err:
            check_backbone(load_head(path), model)
    finally:
        model.close()
    bad = value if isinstance(value, int) else value[1]
    _assert_one_line(err, path, f"{key} {bad} is not a token of tiny-qwen2-f32.gguf (vocabulary of 512)")
