"""The SPRM head as a small ONNX file that carries its own spec.

The head is ``Sequential(Linear(c, 2c), ReLU, Dropout(0.5), Linear(2c, 1))`` with a sigmoid at
inference. On disk it is an ONNX graph ``hidden_states [n, c] -> Gemm -> Relu -> Gemm -> Sigmoid
-> step_score [n]`` whose initializers keep the torch state-dict names (``0.weight``, ``0.bias``,
``3.weight``, ``3.bias``), so training can read them back unchanged. Everything the runtime must
know to use the head (which layer to tap, which tokens delimit steps, which backbone it belongs to)
travels in ``metadata_props`` under the ``edge_ms.`` prefix. A head may also carry a calibration
of its trajectory scores (``edge_ms.calibration``, optional: heads without one load as before, and
edge_ms versions that predate it ignore it). docs/method.md (section 5) describes the format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_ms.atomic import write_bytes
from edge_ms.calibrate import Calibration
from edge_ms.errors import fail
from edge_ms.readfile import read_capped

if TYPE_CHECKING:  # only for the annotation: a head file is read without llama.cpp
    from edge_ms.model import Model

__all__ = ["FORMAT_VERSION", "WEIGHT_KEYS", "Head", "HeadSpec", "check_backbone", "load_head", "weight_shapes",
           "write_head"]

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

INPUT_NAME = "hidden_states"
OUTPUT_NAME = "step_score"
# The torch state-dict names of Sequential(Linear(c, 2c), ReLU, Dropout, Linear(2c, 1)), in order.
WEIGHT_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")

# Opset 17 / IR 8: every op used here has been stable since opset 13, and IR 8 loads in
# onnxruntime releases back to 1.10, so heads written today stay readable on older runtimes.
OPSET = 17
IR_VERSION = 8

# The widest hidden state of today's LLMs is 16384 (405B models): a wider head is a garbled or
# hostile file, whose weights and even its probe batch would take gigabytes.
MAX_HIDDEN_SIZE = 16384
# protobuf cannot parse a message of 2 GiB or more, so no head file is bigger.
MAX_FILE_BYTES = 2**31 - 1
# What a head file holds besides its weights (graph, metadata, provenance): a few kB in practice.
_SLACK_BYTES = 1 << 20
# The ops a head graph may chain: the two layers and the reshapes between torch's [n, 1] and [n].
# Anything else (Expand, Tile, Loop, ...) could allocate without bound on a crafted input.
_CHAIN_OPS = ("Gemm", "Relu", "Sigmoid", "Reshape", "Flatten", "Squeeze", "Identity")
_SHAPE_OPS = ("Reshape", "Squeeze")  # their second input: a small int64 initializer
_PLAIN_ATTRS = (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.INTS)
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)

_META = "edge_ms."
_REQUIRED_META = (
    "format_version",
    "layer",
    "hidden_size",
    "step_delimiter_ids",
    "think_start_id",
    "think_end_id",
    "backbone_fingerprint",
)
_OPTIONAL_META = ("calibration",)


@dataclass(frozen=True)
class HeadSpec:
    """What the runtime needs to know to use a head, stored inside the head file."""

    layer: int  # tapped decoder layer, 0-based: llama.cpp tensor "l_out-<layer>" (n_layer - 2 for MetaStone)
    hidden_size: int  # c
    step_delimiter_ids: tuple[int, ...]
    think_start_id: int | None
    think_end_id: int | None
    backbone_fingerprint: str
    format_version: int = FORMAT_VERSION
    # Trajectory score -> probability that the answer is right (edge_ms.calibrate); None: uncalibrated.
    calibration: Calibration | None = None


@dataclass
class Head:
    """A loaded head: ``score`` runs it, ``weights`` reads its parameters back."""

    spec: HeadSpec
    path: Path
    _session: ort.InferenceSession = field(repr=False, compare=False)

    def score(self, hidden: np.ndarray) -> np.ndarray:
        """Step scores in (0, 1) for ``hidden`` [n, c] (any float dtype); returns float32 [n]."""
        if hidden.ndim != 2 or hidden.shape[1] != self.spec.hidden_size:
            raise ValueError(
                f"head {self.path} expects hidden states of shape [n, {self.spec.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        if hidden.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        x = np.ascontiguousarray(hidden, dtype=np.float32)
        # load_head checked the output is [n] or [n, 1]: torch exports keep the trailing 1.
        return self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].reshape(-1).astype(np.float32, copy=False)

    def weights(self) -> dict[str, np.ndarray]:
        """The four parameters under their torch state-dict names, float32 (read from the file)."""
        model = _load_proto(self.path)
        return _initializers(model, self.path, self.spec.hidden_size)

    def provenance(self) -> dict[str, str]:
        """The free-form ``edge_ms.*`` metadata (what ``write_head``'s ``provenance`` wrote), read from the file."""
        model = _load_proto(self.path)
        spec_keys = {_META + k for k in (*_REQUIRED_META, *_OPTIONAL_META)}
        return {p.key[len(_META):]: p.value for p in model.metadata_props
                if p.key.startswith(_META) and p.key not in spec_keys}

    def confidence(self, score: float) -> float | None:
        """The calibrated confidence of a trajectory score, or None when the head has no calibration."""
        cal = self.spec.calibration
        return None if cal is None else cal(score)


def write_head(
    path: str | Path,
    weights: Mapping[str, np.ndarray],
    spec: HeadSpec,
    provenance: Mapping[str, str] | None = None,
) -> None:
    """Write ``weights`` (torch state-dict names) and ``spec`` to ``path`` as one ONNX file.

    ``provenance`` adds free-form ``edge_ms.<key>`` metadata (e.g. ``source``). The file appears
    whole or not at all: it is written to a temp file beside ``path`` and renamed over it.
    """
    path = Path(path)
    _check_spec(path, spec)
    arrays = _check_weights(path, weights, spec.hidden_size)
    model = _build_model(arrays, spec, provenance or {})
    data = model.SerializeToString()

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)


def load_head(path: str | Path) -> Head:
    """Load and validate a head file; every problem is one ``EdgeMSError`` line naming the file.

    Nothing else escapes, so a caller listing many heads (``edge-ms list``) can note a broken one
    and go on. The graph is run on probe batches: a head whose output is not one score in [0, 1]
    per row (a wrong shape, a missing sigmoid) is refused here, not in the middle of a run.
    """
    path = Path(path)
    model = _load_proto(path)
    spec = _read_spec(model, path)
    size, c = model.ByteSize(), spec.hidden_size
    if size > 8 * (2 * c * c + 4 * c + 1) + _SLACK_BYTES:  # its weights in float64, and then some
        raise fail(path, f"holds {size} bytes, far more than a head of hidden_size {c} needs")
    _check_io(model, path, spec.hidden_size)
    _initializers(model, path, spec.hidden_size)
    _check_graph(model, path)
    session = _open_session(model, path)
    _probe(session, path, spec.hidden_size)
    return Head(spec=spec, path=path, _session=session)


def check_backbone(head: Head, model: Model) -> None:
    """Refuse a head that does not belong to ``model``: width, tapped layer, fingerprint, token ids.

    Call it before anything asks llama.cpp about the head's token ids, even when the fingerprint
    matches: an id past the vocabulary aborts the process inside llama.cpp (std::out_of_range),
    with no Python error to catch.
    """
    spec, name = head.spec, model.path.name
    if spec.hidden_size != model.n_embd:
        raise fail(head.path, f"head width {spec.hidden_size} does not match the backbone's hidden size {model.n_embd} ({name})")
    if not 0 <= spec.layer < model.n_layer:
        raise fail(head.path, f"head taps layer {spec.layer} but {name} has {model.n_layer} layers")
    if spec.backbone_fingerprint != model.fingerprint:
        raise fail(
            head.path,
            f"head belongs to backbone {spec.backbone_fingerprint}, not to {name} ({model.fingerprint})",
        )
    ids = {"step_delimiter_ids": spec.step_delimiter_ids, "think_start_id": (spec.think_start_id,),
           "think_end_id": (spec.think_end_id,)}
    for key, values in ids.items():
        bad = [i for i in values if i is not None and not 0 <= i < model.n_vocab]
        if bad:
            raise fail(head.path, f"{key} {bad[0]} is not a token of {name} (vocabulary of {model.n_vocab})")


def _check_spec(path: Path, spec: HeadSpec) -> None:
    if spec.format_version not in SUPPORTED_FORMAT_VERSIONS:
        raise fail(path, f"cannot write format_version {spec.format_version} (supported: 1)")
    if not (_is_int(spec.hidden_size) and spec.hidden_size > 0):
        raise fail(path, f"hidden_size must be a positive integer, got {spec.hidden_size!r}")
    if not (_is_int(spec.layer) and spec.layer >= 0):
        raise fail(path, f"layer must be a non-negative integer, got {spec.layer!r}")
    ids = spec.step_delimiter_ids
    if not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise fail(path, f"step_delimiter_ids must be a non-empty list of token ids, got {ids!r}")
    for key in ("think_start_id", "think_end_id"):
        value = getattr(spec, key)
        if value is not None and not (_is_int(value) and value >= 0):
            raise fail(path, f"{key} must be a token id or None, got {value!r}")
    if not isinstance(spec.backbone_fingerprint, str):
        raise fail(path, f"backbone_fingerprint must be a string, got {spec.backbone_fingerprint!r}")
    if spec.calibration is not None and not isinstance(spec.calibration, Calibration):
        raise fail(path, f"calibration must be an edge_ms.calibrate.Calibration or None, got {spec.calibration!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def weight_shapes(c: int) -> dict[str, tuple[int, ...]]:
    """The shape of each head weight for hidden size ``c``, keyed as ``WEIGHT_KEYS`` (docs/method.md, section 5)."""
    return {"0.weight": (2 * c, c), "0.bias": (2 * c,), "3.weight": (1, 2 * c), "3.bias": (1,)}


def _check_weights(path: Path, weights: Mapping[str, np.ndarray], c: int) -> dict[str, np.ndarray]:
    missing = [k for k in WEIGHT_KEYS if k not in weights]
    extra = sorted(set(weights) - set(WEIGHT_KEYS))
    if missing or extra:
        raise fail(
            path, f"head weights need exactly {list(WEIGHT_KEYS)}; missing {missing}, unexpected {extra}"
        )
    out = {}
    for key, shape in weight_shapes(c).items():
        arr = np.asarray(weights[key])
        if arr.shape != shape:
            raise fail(
                path, f"weight {key} has shape {list(arr.shape)}, expected {list(shape)} for hidden_size {c}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise fail(path, f"weight {key} has dtype {arr.dtype}, expected a float type")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise fail(path, f"weight {key} holds NaN or infinite values")
        out[key] = arr
    return out


def _build_model(
    arrays: dict[str, np.ndarray], spec: HeadSpec, provenance: Mapping[str, str]
) -> onnx.ModelProto:
    c = spec.hidden_size
    inits = [numpy_helper.from_array(arrays[k], name=k) for k in WEIGHT_KEYS]
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), name="flat_shape"))
    nodes = [
        # transB=1 keeps torch's [out, in] layout on disk: the state dict round-trips unchanged.
        helper.make_node("Gemm", [INPUT_NAME, "0.weight", "0.bias"], ["h1"], transB=1, name="linear_0"),
        helper.make_node("Relu", ["h1"], ["h1_relu"], name="relu_1"),
        # Dropout(0.5) is the identity at inference: left out of the graph.
        helper.make_node("Gemm", ["h1_relu", "3.weight", "3.bias"], ["logit"], transB=1, name="linear_3"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
        helper.make_node("Reshape", ["prob", "flat_shape"], [OUTPUT_NAME], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "sprm_head",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", c])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n"])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge_ms", ir_version=IR_VERSION
    )
    meta = {
        "format_version": str(spec.format_version),
        "layer": str(int(spec.layer)),
        "hidden_size": str(int(c)),
        "step_delimiter_ids": json.dumps([int(i) for i in spec.step_delimiter_ids]),
        "think_start_id": json.dumps(None if spec.think_start_id is None else int(spec.think_start_id)),
        "think_end_id": json.dumps(None if spec.think_end_id is None else int(spec.think_end_id)),
        "backbone_fingerprint": spec.backbone_fingerprint,
    }
    if spec.calibration is not None:
        meta["calibration"] = spec.calibration.to_json()
    for key, value in provenance.items():
        if key in meta or key in _OPTIONAL_META:
            raise ValueError(f"provenance key {key!r} would overwrite the head spec")
        meta[key] = str(value)
    helper.set_model_props(model, {_META + k: v for k, v in meta.items()})
    return model


def _load_proto(path: Path) -> onnx.ModelProto:
    data = read_capped(path, MAX_FILE_BYTES, "head file")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf's DecodeError and friends: the bytes are not an ONNX model
        raise fail(path, f"not an ONNX file ({_first_line(err) or type(err).__name__})") from None
    if not model.HasField("graph"):
        raise fail(path, "not an ONNX model (no graph)")
    return model


def _read_spec(model: onnx.ModelProto, path: Path) -> HeadSpec:
    meta = {p.key[len(_META) :]: p.value for p in model.metadata_props if p.key.startswith(_META)}
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise fail(path, f"not an edge_ms head: metadata {', '.join(_META + k for k in missing)} missing")

    def parse(key: str, kind: str) -> object:
        raw = meta[key]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # reported below as the wrong type
        ok = {
            "int": _is_int(value) and value >= 0,
            "id_or_null": value is None or (_is_int(value) and value >= 0),
            "ids": isinstance(value, list) and bool(value) and all(_is_int(i) and i >= 0 for i in value),
        }[kind]
        if not ok:
            raise fail(path, f"metadata {_META}{key} is {raw!r}, not a valid value")
        return value

    version = parse("format_version", "int")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise fail(path, f"head format_version {version} is not supported by this edge_ms (supported: 1)")
    hidden_size = parse("hidden_size", "int")
    if not 0 < hidden_size <= MAX_HIDDEN_SIZE:
        raise fail(path, f"metadata edge_ms.hidden_size is {hidden_size}, not a width in 1..{MAX_HIDDEN_SIZE}")
    calibration = None
    if "calibration" in meta:
        try:
            calibration = Calibration.from_json(meta["calibration"])
        except ValueError as err:
            raise fail(path, f"metadata {_META}calibration: {err}") from None
    return HeadSpec(
        layer=parse("layer", "int"),
        hidden_size=hidden_size,
        step_delimiter_ids=tuple(parse("step_delimiter_ids", "ids")),
        think_start_id=parse("think_start_id", "id_or_null"),
        think_end_id=parse("think_end_id", "id_or_null"),
        backbone_fingerprint=meta["backbone_fingerprint"],
        format_version=version,
        calibration=calibration,
    )


def _initializers(model: onnx.ModelProto, path: Path, c: int) -> dict[str, np.ndarray]:
    _refuse_external(model, path)
    found = {t.name: t for t in model.graph.initializer if t.name in WEIGHT_KEYS}
    missing = [k for k in WEIGHT_KEYS if k not in found]
    if missing:
        raise fail(path, f"head weights {missing} missing from the ONNX graph")
    out = {}
    for key, shape in weight_shapes(c).items():
        t = found[key]
        # Shape and type first, from the header alone: the data is converted only once it must fit.
        if tuple(t.dims) != shape:
            raise fail(path, f"weight {key} has shape {list(t.dims)}, expected {list(shape)} for hidden_size {c}")
        if t.data_type not in _FLOAT_TYPES:
            kind = TensorProto.DataType.Name(t.data_type)
            raise fail(path, f"weight {key} has ONNX type {kind}, expected a float type")
        try:
            arr = numpy_helper.to_array(t).astype(np.float32, copy=False)
        except Exception:  # numpy's reshape errors on data that does not fill the declared shape
            raise fail(path, f"weight {key} is malformed: its data does not fill shape {list(shape)}") from None
        if not np.isfinite(arr).all():
            raise fail(path, f"weight {key} holds NaN or infinite values")
        out[key] = arr
    return out


def _refuse_external(model: onnx.ModelProto, path: Path) -> None:
    # ONNX external data names another file to read the tensor from: any path (/etc/passwd, ../..).
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            where = {e.key: e.value for e in t.external_data}.get("location", "")
            raise fail(
                path, f"tensor {t.name!r} refers to data outside the file ({where!r}); a head must hold its weights"
            )
    if len(model.graph.sparse_initializer) or len(model.functions):
        raise fail(path, "head graph has sparse initializers or local functions, which an SPRM head never has")


def _check_graph(model: onnx.ModelProto, path: Path) -> None:
    """The graph must chain head ops from the input to the output over the head's own tensors.

    Every tensor is then at most [n, 2c]: a crafted graph cannot allocate without bound
    (an outer product of two initializers, an Expand) when onnxruntime loads or runs it.
    """
    inits = {t.name: t for t in model.graph.initializer}
    current = INPUT_NAME
    for i, node in enumerate(model.graph.node):
        where = f"head graph node {i} ({node.op_type})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in _CHAIN_OPS:
            raise fail(path, f"{where}: an SPRM head graph uses only {', '.join(_CHAIN_OPS)}")
        if any(a.type not in _PLAIN_ATTRS for a in node.attribute):
            raise fail(path, f"{where} has a tensor or graph attribute, which an SPRM head never has")
        if len(node.input) == 0 or node.input[0] != current or len(node.output) != 1:
            raise fail(path, f"{where} does not continue the chain from {INPUT_NAME} to {OUTPUT_NAME}")
        for name in node.input[1:]:
            t = inits.get(name)
            ok = name == "" or (
                name in WEIGHT_KEYS if node.op_type == "Gemm"
                else node.op_type in _SHAPE_OPS and t is not None and t.data_type == TensorProto.INT64
                and len(t.dims) == 1 and t.dims[0] <= 2
            )
            if not ok:
                raise fail(path, f"{where} reads {name!r}, which is not one of the head's own tensors")
        current = node.output[0]
    if current != OUTPUT_NAME:
        raise fail(path, f"head graph does not end in its output {OUTPUT_NAME!r}")


def _open_session(model: onnx.ModelProto, path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # The head is a few million multiply-adds per row: thread hand-offs cost more than they save.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: warnings would go to stderr from library code
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime raises its own exception types for bad graphs
        raise fail(path, f"onnxruntime cannot load the head: {_first_line(err)}") from None


def _probe(session: ort.InferenceSession, path: Path, c: int) -> None:
    """Run the graph on 1 and 3 rows: one finite score in [0, 1] per row, whatever the batch size.

    Two batch sizes, because a reshape to a fixed length fits one of them; rows of large
    magnitude, because a missing sigmoid shows only where the logit leaves [0, 1].
    """
    for rows in (np.zeros((1, c)), np.stack([np.zeros(c), np.full(c, 100.0), np.full(c, -100.0)])):
        n = len(rows)
        try:
            out = session.run([OUTPUT_NAME], {INPUT_NAME: rows.astype(np.float32)})[0]
        except Exception as err:  # onnxruntime's own exception types
            raise fail(path, f"head graph fails on a probe batch of {n} rows: {_first_line(err)}") from None
        out = np.asarray(out)
        if out.shape not in ((n,), (n, 1)) or not np.issubdtype(out.dtype, np.floating):
            raise fail(path, f"head graph gives {out.dtype} of shape {list(out.shape)} for {n} rows; "
                             f"an SPRM head gives one score per row ([n] or [n, 1] floats)")
        if not np.isfinite(out).all():
            raise fail(path, "head gives NaN or infinite scores")
        if out.min() < 0.0 or out.max() > 1.0:
            bad = out.min() if out.min() < 0.0 else out.max()
            raise fail(path, f"head gives scores outside [0, 1] (e.g. {float(bad):.3g}): is its sigmoid missing?")


def _check_io(model: onnx.ModelProto, path: Path, c: int) -> None:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise fail(path, f"head graph must have one input {INPUT_NAME!r}, has {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    width = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None
    if width != c:
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise fail(path, f"head input {INPUT_NAME} has shape {shape}, but edge_ms.hidden_size is {c}")
    if [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise fail(path, f"head graph must have one output {OUTPUT_NAME!r}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
