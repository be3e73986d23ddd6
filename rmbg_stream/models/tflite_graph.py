"""Reads a TFLite file into what `selfie.load_selfie` needs: its weighted layers and what it takes and gives.

Parsing goes through the `tflite` package (the generated flatbuffer classes of TFLite's schema); the model
metadata (a second flatbuffer, TFLite's ``metadata_schema.fbs``, "M001") has no such package without
TensorFlow, so `input_normalisation` reads its few fields with `flatbuffers.table.Table`. Nothing here runs the
graph: it is checked op by op against what `SelfieNet` computes, and anything else is a one-line `WeightsError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np
import tflite

from .contract import INPUT_RANGES, NORMALISATION, InputRange, OutputKind
from .weights import WeightsError

OPS = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
TRANSPOSED = "Convolution2DTransposeBias"  # MediaPipe's custom op: transposed conv + bias, TfLiteTransposeConvParams
# Ops SelfieNet reproduces; LOGISTIC and the pools are checked where they matter, the rest are element-wise.
SUPPORTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "HARD_SWISH", "RELU", "LOGISTIC", "ADD", "MUL",
             "AVERAGE_POOL_2D", "MEAN", "RESIZE_BILINEAR", TRANSPOSED}
DTYPES = {tflite.TensorType.FLOAT32: np.float32, tflite.TensorType.FLOAT16: np.float16,
          tflite.TensorType.INT32: np.int32}
METADATA = "TFLITE_METADATA"


@dataclass(frozen=True)
class Layer:
    name: str  # the weight tensor's name in the file
    kind: str  # "conv", "depthwise" or "transposed"
    weight: np.ndarray  # TFLite layout: conv OHWI, depthwise 1HWC, transposed OHWI
    bias: np.ndarray
    stride: int
    padding_same: bool


@dataclass(frozen=True)
class Graph:
    resolution: tuple[int, int]  # (h, w) of the input tensor
    input_range: InputRange
    output: OutputKind
    layers: list[Layer]


def read_graph(path: Path) -> Graph:
    data = path.read_bytes()
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        graph = model.Subgraphs(0)
        ops = [op_name(model, graph.Operators(i)) for i in range(graph.OperatorsLength())]
    except Exception as exc:  # the flatbuffer accessors raise whatever a bad offset gives
        raise WeightsError(f"{path} is not a TFLite model ({type(exc).__name__}: {exc})") from None
    if model.SubgraphsLength() != 1 or not ops:
        raise WeightsError(f"{path} has {model.SubgraphsLength()} subgraphs: expected one TFLite graph")
    unknown = sorted(set(ops) - SUPPORTED)
    if unknown:
        raise WeightsError(f"{path} uses ops the selfie network does not have ({', '.join(unknown)}): "
                           "not MediaPipe's selfie segmenter")
    resolution = check_io(path, graph)
    reader = _Reader(model, graph)
    layers = [reader.layer(graph.Operators(i), name) for i, name in enumerate(ops)
              if name in ("CONV_2D", "DEPTHWISE_CONV_2D", TRANSPOSED)]
    for i, name in enumerate(ops):
        reader.check(path, graph.Operators(i), name)
    output = "probability" if ops[-1] == "LOGISTIC" else "logits"
    return Graph(resolution, input_normalisation(path, model, data), output, layers)


def op_name(model, op) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # the schema's two fields, by version
    if builtin == tflite.BuiltinOperator.CUSTOM:
        return code.CustomCode().decode()
    return OPS.get(builtin, str(builtin))


def check_io(path: Path, graph) -> tuple[int, int]:
    """The graph's one input must be float32 (1,H,W,3) and its one output float32 (1,H,W,1): (H, W)."""
    if graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        raise WeightsError(f"{path} has {graph.InputsLength()} inputs and {graph.OutputsLength()} outputs: "
                           "expected one image in and one mask out")
    inp, out = graph.Tensors(graph.Inputs(0)), graph.Tensors(graph.Outputs(0))
    shape, out_shape = list(inp.ShapeAsNumpy()), list(out.ShapeAsNumpy())
    if inp.Type() != tflite.TensorType.FLOAT32 or len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise WeightsError(f"{path} takes a {shape} tensor of type {inp.Type()}: expected float32 (1,H,W,3) RGB")
    h, w = int(shape[1]), int(shape[2])
    if out_shape != [1, h, w, 1] or h % 16 or w % 16:
        raise WeightsError(f"{path} maps {shape} to {out_shape}: expected a (1,H,W,1) mask, H and W multiples of 16")
    return h, w


class _Reader:
    """Constant tensors of one graph, seen through its DEQUANTIZE ops (fp16 weights -> float32 tensors)."""

    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.source: dict[int, int] = {}
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            if op_name(model, op) == "DEQUANTIZE":
                self.source[int(op.Outputs(0))] = int(op.Inputs(0))

    def constant(self, index: int) -> np.ndarray:
        tensor = self.graph.Tensors(self.source.get(index, index))
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer.DataLength() == 0 or tensor.Type() not in DTYPES:
            raise WeightsError(f"tensor {tensor.Name().decode()} is not a constant this reader handles")
        values = np.frombuffer(buffer.DataAsNumpy().tobytes(), DTYPES[tensor.Type()])
        return values.reshape(tensor.ShapeAsNumpy()).astype(np.float32 if values.dtype.kind == "f" else np.int64)

    def layer(self, op, name: str) -> Layer:
        weight, bias = self.constant(int(op.Inputs(1))), self.constant(int(op.Inputs(2)))
        tensor_name = self.graph.Tensors(int(op.Inputs(1))).Name().decode()
        if name == TRANSPOSED:
            # TfLiteTransposeConvParams: int32 padding (1 = SAME), stride_width, stride_height.
            padding, sw, sh = np.frombuffer(op.CustomOptionsAsNumpy().tobytes()[:12], np.int32)
            return Layer(tensor_name, "transposed", weight, bias, *_stride(sw, sh, tensor_name), padding == 1)
        options = (tflite.Conv2DOptions if name == "CONV_2D" else tflite.DepthwiseConv2DOptions)()
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        if options.FusedActivationFunction() != tflite.ActivationFunctionType.NONE or \
                options.DilationWFactor() != 1 or options.DilationHFactor() != 1:
            raise WeightsError(f"layer {tensor_name} fuses an activation or dilates: not the selfie network")
        if name == "DEPTHWISE_CONV_2D" and options.DepthMultiplier() not in (0, 1):
            raise WeightsError(f"layer {tensor_name} has depth multiplier {options.DepthMultiplier()}")
        kind = "conv" if name == "CONV_2D" else "depthwise"
        stride = _stride(options.StrideW(), options.StrideH(), tensor_name)
        return Layer(tensor_name, kind, weight, bias, stride[0], options.Padding() == tflite.Padding.SAME)

    def check(self, path: Path, op, name: str) -> None:
        """The options of the ops SelfieNet hard-codes: bilinear resizes with half-pixel centres (PyTorch's
        align_corners=False) and pools over the whole picture."""
        if name == "RESIZE_BILINEAR":
            options = tflite.ResizeBilinearOptions()
            table = op.BuiltinOptions()
            options.Init(table.Bytes, table.Pos)
            if options.AlignCorners() or not options.HalfPixelCenters():
                raise WeightsError(f"{path}: a bilinear resize without half-pixel centres: not the selfie network")
        elif name in ("AVERAGE_POOL_2D", "MEAN"):
            src, dst = (list(self.graph.Tensors(int(t)).ShapeAsNumpy()) for t in (op.Inputs(0), op.Outputs(0)))
            if dst[1:3] != [1, 1] or dst[3] != src[3]:
                raise WeightsError(f"{path}: a pool from {src} to {dst} is not a global mean: not the selfie network")


def _stride(sw: int, sh: int, name: str) -> tuple[int]:
    if sw != sh:
        raise WeightsError(f"layer {name} has strides {sw}x{sh}: the selfie network's are square")
    return (int(sw),)


# --- metadata ---------------------------------------------------------------------------------------------------
# Field slots of metadata_schema.fbs: ModelMetadata.subgraph_metadata (3), SubGraphMetadata.input_tensor_metadata
# (2), TensorMetadata.process_units (4), ProcessUnit.options_type / options (0 / 1), NormalizationOptions.mean /
# std (0 / 1). A vtable slot's offset is 4 + 2 * field.
NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union tag


def _field(table: flatbuffers.table.Table, field: int) -> int:
    return table.Offset(4 + 2 * field)


def _child(table: flatbuffers.table.Table, field: int, i: int | None = None) -> flatbuffers.table.Table | None:
    """The table in slot `field`, or element `i` of the vector of tables there; None where absent."""
    o = _field(table, field)
    if not o:
        return None
    if i is None:
        return flatbuffers.table.Table(table.Bytes, table.Indirect(table.Pos + o))
    if i >= table.VectorLen(o):
        return None
    return flatbuffers.table.Table(table.Bytes, table.Indirect(table.Vector(o) + 4 * i))


def _union_type(table: flatbuffers.table.Table, field: int) -> int:
    o = _field(table, field)
    return table.Get(flatbuffers.number_types.Uint8Flags, table.Pos + o) if o else 0


def _floats(table: flatbuffers.table.Table, field: int) -> list[float]:
    o = _field(table, field)
    if not o:
        return []
    start, n = table.Vector(o), table.VectorLen(o)
    return np.frombuffer(bytes(table.Bytes[start:start + 4 * n]), "<f4").tolist()


def input_normalisation(path: Path, model, data: bytes) -> InputRange:
    """The input range the file's metadata gives for its image input (NormalizationOptions over 0..255 pixels);
    `WeightsError` where the file says none: a network's input range is never guessed."""
    buffer = next((model.Metadata(i).Buffer() for i in range(model.MetadataLength())
                   if model.Metadata(i).Name().decode() == METADATA), None)
    raw = model.Buffers(buffer).DataAsNumpy().tobytes() if buffer is not None else b""
    options = None
    if raw[4:8] == b"M001":
        root = flatbuffers.table.Table(bytearray(raw), flatbuffers.encode.Get(flatbuffers.packer.uoffset, raw, 0))
        subgraph = _child(root, 3, 0)
        tensor = _child(subgraph, 2, 0) if subgraph else None
        unit = _child(tensor, 4, 0) if tensor else None
        if unit is not None and _union_type(unit, 0) == NORMALIZATION_OPTIONS:
            options = _child(unit, 1)
    if options is None:
        raise WeightsError(f"{path} gives no input normalisation in its metadata: its input range is unknown")
    mean, std = _floats(options, 0), _floats(options, 1)
    for name in INPUT_RANGES:  # the file's mean/std apply to 0..255 pixels; NORMALISATION's to 0..1
        m, s = NORMALISATION[name]
        if len(mean) == len(m) and len(std) == len(s) and np.allclose(mean, np.multiply(m, 255), atol=1e-3) \
                and np.allclose(std, np.multiply(s, 255), atol=1e-3):
            return name
    raise WeightsError(f"{path} normalises its input with mean {mean}, std {std}: not an input range we feed")
