"""The one ONNX Runtime static-quantization call, shared by the export's INT8 search and by training that
must see the export's INT8 numbers (--int8-aware): same scheme, same calibration, same ranges."""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from core.int8_correction import (
    _graph_maps,
    _session,
    align_input,
    correct_bias,
    equalize,
    float_output,
    linear_output_convs,
    u8_pointwise,
    widen_depthwise,
)


@dataclass(frozen=True)
class QConfig:
    fmt: str = "QDQ"
    activations: str = "U8"
    per_channel: bool = True
    calibration: str = "MinMax"
    reduce_range: bool = False
    corrected: bool = False  # equalize, full-range depthwise weights, bias correction (core/int8_correction.py)
    u8_pointwise: bool = False  # corrected only: 8-bit uint8 weights for dense convolutions (no int16 saturation)
    u8_linear: bool = False  # corrected only: the same for core.int8_correction.linear_output_convs alone
    float_lead: float = 0.0  # share of the convolutions (the first ones, and every node before) kept in fp32
    float_tail: bool = False  # pooling, concatenation and the classifier after the last convolution stay in float

    def __post_init__(self) -> None:
        u8 = self.u8_pointwise or self.u8_linear
        if u8 and not (self.corrected and self.fmt == "QDQ" and self.activations == "U8"):
            raise ValueError("u8_pointwise/u8_linear are steps of the corrected QDQ pipeline with U8 activations")
        if self.u8_pointwise and self.u8_linear:
            raise ValueError("u8_linear is a subset of u8_pointwise: choose one")
        if not 0.0 <= self.float_lead < 1.0:
            raise ValueError("float_lead is a share of the convolutions in [0, 1)")

    @property
    def name(self) -> str:
        return (
            f"{self.fmt}-{self.activations}S8-{'pc' if self.per_channel else 'pt'}-{self.calibration}"
            + ("-rr" if self.reduce_range else "")
            + ("+corrected" if self.corrected else "")
            + ("+u8pw" if self.u8_pointwise else "")
            + ("+u8lin" if self.u8_linear else "")
            + (f"+fp32-first{self.float_lead:.0%}" if self.float_lead else "")
            + ("+float-tail" if self.float_tail else "")
        )


# The mixed candidate (measured on the ELPV Lite0 transfer model, README "INT8: 8-bit weights where the CPU allows
# them"): corrected U8S8 with 8-bit weights everywhere, the first 12 % of the convolutions (the high-resolution input
# layers, where activation rounding hurts most) and the pooling + classifier tail in float. The export's fast search
# tries it first and --int8-aware training trains against exactly these numbers: with the tail in float the INT8
# backbone does not depend on the head, so the head can be trained on the features it will see. 8-bit signed
# weights are only safe where ORT's U8S8 kernels do not saturate their int16 pair sums; s8_saturates() probes that
# on the CPU at hand, and the search measures every candidate on validation images anyway.
MIXED = QConfig(corrected=True, float_lead=0.12, float_tail=True)
# The earlier mixed candidate, for CPUs whose U8S8 kernel saturates: 7-bit weights, except 8-bit uint8 ones (ORT's
# u8 x u8 kernel, which cannot saturate, ~30 % slower) for the layers that write the residual stream, and the first
# 12 % of the convolutions (the high-resolution input layers) in fp32. 1.2-1.4x fp32 at batch 32 on this CPU.
MIXED_7BIT = QConfig(reduce_range=True, corrected=True, u8_linear=True, float_lead=0.12, float_tail=True)


@functools.cache
def s8_saturates() -> bool:
    """Whether ONNX Runtime's U8S8 convolution on this CPU saturates 8-bit signed weights: one 64-channel 1 x 1 QDQ
    convolution whose every input is 255 and every weight +-127 (a pair of products sums to 64,770, past int16),
    compared with the exact sum. False on the AMD EPYC Zen 3 (AVX2, no VNNI) of the README with onnxruntime 1.32."""
    from onnx import TensorProto, helper, numpy_helper

    c, o = 64, 2
    w = np.full((o, c, 1, 1), 127, np.int8)
    w[1] = -127
    consts = {"xs": np.float32(6 / 255), "xz": np.uint8(0), "w": w, "ws": np.full(o, 0.01, np.float32)}
    consts |= {"wz": np.zeros(o, np.int8), "ys": np.float32(4.0), "yz": np.uint8(128)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y0"]),
        helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "s8_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    sess = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads=1)
    y = sess.run(None, {"x": np.full((1, c, 4, 4), 6.0, np.float32)})[0][:, :, 0, 0]
    exact = 6.0 * 0.01 * w.reshape(o, -1).astype(np.float64).sum(1)  # +-487.7; saturated pairs give about half
    return bool(np.abs(y[0] - exact).max() > 4.0)  # one output step


def int8_aware_config() -> QConfig:
    """What --int8-aware trains against: the export's first candidate that can fit on this CPU (MIXED, or
    MIXED_7BIT where 8-bit signed weights saturate)."""
    return MIXED_7BIT if s8_saturates() else MIXED


def prefix_config(cfg: QConfig, whole_convs: int, part_convs: int) -> QConfig:
    """`cfg` for the leading part of a network (its first `part_convs` of `whole_convs` convolutions: a partial
    finetune's frozen prefix) that keeps the same first convolutions in fp32 as `cfg` keeps in the whole network;
    quantize the part with `boundary=True` (quantize_one). Measured on the README's partial finetune (blocks 0-10,
    33 of Lite0's 49 convolutions): MIXED applied to the prefix as a network of its own kept 4 convolutions in fp32
    instead of the export's 6 and left its output unrounded, and its block-10 features differed from what the
    exported INT8 model's block 11 reads by 7.7 % of their spread, more than fp32 (6.7 %); scaled and with the
    boundary's rounding, by 0. Raises ValueError when the lead covers the whole part (no INT8 convolution in it)."""
    if not cfg.float_lead or whole_convs <= part_convs:
        return cfg
    keep = int(np.ceil(cfg.float_lead * whole_convs))  # what _cut keeps in the whole network
    if keep >= part_convs:
        raise ValueError(f"the fp32 lead ({keep} of {whole_convs} convolutions) covers the whole part ({part_convs})")
    return replace(cfg, float_lead=(keep - 0.5) / part_convs)  # ceil(lead * part_convs) == keep


_POOLS = frozenset(("ReduceMean", "ReduceMax", "GlobalAveragePool", "GlobalMaxPool"))
_POOL_AND_HEAD = _POOLS | {"Concat", "Flatten", "Gemm", "MatMul"}


def leading_nodes(model: onnx.ModelProto, fraction: float) -> list[str]:
    """Every node up to the first `fraction` of the convolutions (at least one), in graph (topological) order.

    Measured on the ELPV Lite0 model: the error that breaks agreement enters at the high-resolution input
    layers (stem and first stages: pooled block-2 features off by 0.85 of their spread across images with
    everything quantized, 0.08 with stem..block 2 in fp32), not at a few scattered "sensitive" nodes; ORT's
    per-node SQNR ranking picked nodes whose exclusion did not help. Keeping the leading layers in fp32 costs
    the least speed per point of agreement."""
    nodes = model.graph.node
    convs = _conv_indices(model)
    if not convs or fraction <= 0:
        return []
    return [n.name for n in nodes[: _cut(convs, fraction) + 1]]


def _conv_indices(model: onnx.ModelProto) -> list[int]:
    return [i for i, n in enumerate(model.graph.node) if n.op_type == "Conv"]


def _cut(convs: list[int], fraction: float) -> int:
    """Graph index of the last convolution within the first `fraction` of them (at least the first)."""
    return convs[max(0, int(np.ceil(fraction * len(convs))) - 1)]


def block_ends(model: onnx.ModelProto) -> list[int]:
    """Graph indices where a block ends: each convolution that writes the residual stream
    (core.int8_correction.linear_output_convs: an inverted residual's projection, a ResNet block's last convolution),
    or the residual Add that is its only reader (a projection the next block reads directly ends its block itself). A
    float lead that stops there hands one narrow tensor to the INT8 part; one that stops inside a block quantizes its
    widest tensors at the boundary. Measured on the README's partial finetune (40 interleaved rounds): the leads ending
    at blocks 2 and 3 ran at 1.62x and 1.60x fp32 at batch 32, the first 20 % of the convolutions (ending at block
    3's expansion) at 1.51-1.56x."""
    _, _, consumers = _graph_maps(model)
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    linear = linear_output_convs(model)
    ends = set()
    for n in model.graph.node:
        if n.op_type != "Conv" or n.name not in linear:
            continue
        users = consumers.get(n.output[0], [])
        residual = len(users) == 1 and users[0].op_type == "Add"
        ends.add(index[users[0].name] if residual else index[n.name])
    return sorted(ends)


def lead_steps(model: onnx.ModelProto, after: float, steps: int, fallback: float) -> list[tuple[float, list[str]]]:
    """Growing float leads for a retry: the next `steps` block ends past the first `after` share of the
    convolutions, each as (share of the convolutions it keeps in fp32, every node up to it). A graph without block
    ends there gets the single lead of leading_nodes(model, fallback)."""
    nodes = model.graph.node
    convs = _conv_indices(model)
    if not convs:
        return []
    start = _cut(convs, after)
    ends = [e for e in block_ends(model) if e < convs[-1] and any(start < c <= e for c in convs)][:steps]
    if not ends:
        return [(fallback, leading_nodes(model, fallback))]
    return [(sum(c <= e for c in convs) / len(convs), [n.name for n in nodes[: e + 1]]) for e in ends]


def tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Pooling, concatenation, flattening and classifier nodes upstream of no convolution: what turns the feature
    maps into logits. (A squeeze-excitation pool feeds a convolution and is not part of it.) Everything computed from
    a pooling node's output belongs to it too: a covariance pooling's centring, product and upper-triangle gather
    (core.models.efficientnet_lite.covariance_pool) would otherwise multiply two rounded maps."""
    producer = {o: n for n in model.graph.node for o in n.output}
    upstream: set[str] = set()
    stack = [n for n in model.graph.node if n.op_type == "Conv"]
    while stack:
        for i in stack.pop().input:
            p = producer.get(i)
            if p is not None and p.name not in upstream:
                upstream.add(p.name)
                stack.append(p)
    after_pool: set[str] = set()  # graph order is topological: a node's inputs are produced before it
    for n in model.graph.node:
        if n.name in upstream:
            continue
        if n.op_type in _POOLS or any(producer[i].name in after_pool for i in n.input if i in producer):
            after_pool.add(n.name)
    return [
        n.name
        for n in model.graph.node
        if n.name not in upstream and (n.op_type in _POOL_AND_HEAD or n.name in after_pool)
    ]


def float_nodes(model: onnx.ModelProto, cfg: QConfig) -> list[str]:
    """The nodes `cfg` keeps in fp32 by itself (float_lead, float_tail)."""
    return (leading_nodes(model, cfg.float_lead) if cfg.float_lead else []) + (
        tail_nodes(model) if cfg.float_tail else []
    )


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str, batch: int = 16) -> None:
        self.batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


# Recent onnxruntime releases can reuse calibration ranges from a JSON cache. The ranges depend on the model, the
# data and the calibration method only, so every candidate of one method shares a single calibration pass.
_CACHE_OK = "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_one(
    src: Path,
    out: Path,
    calib: np.ndarray,
    cfg: QConfig,
    exclude: list[str] | None = None,
    cache_dir: Path | None = None,
    threads: int = 2,
    boundary: bool = False,
) -> Path:
    """Quantize `src` to `out` with one configuration; `corrected` wraps ORT's call in core/int8_correction.py's
    steps (equalize the fp32 graph first, widen depthwise weights and correct biases after). `boundary`: `src` is
    the leading part of a bigger network whose next layer reads its output quantized, so the output keeps ORT's
    Q/DQ pair (a whole model's logits lose it: float_output)."""
    fp = onnx.load(str(src)) if cfg.corrected or cfg.float_lead or cfg.float_tail else None
    if fp is not None:
        exclude = list(dict.fromkeys([*(exclude or []), *float_nodes(fp, cfg)]))
    if not cfg.corrected:
        return _quantize_static(src, out, calib, cfg, exclude, cache_dir)
    eq, eq_path = _equalized(src, fp, calib, threads, cache_dir, out)
    try:
        _quantize_static(eq_path, out, calib, cfg, exclude, cache_dir, cache_tag="-equalized")
    finally:
        if cache_dir is None:
            eq_path.unlink(missing_ok=True)
    q = onnx.load(str(out))
    if not boundary:
        float_output(q)
    widen_depthwise(q, eq)
    if cfg.u8_pointwise or cfg.u8_linear:
        u8_pointwise(q, eq, linear_output_convs(eq) if cfg.u8_linear else None)
    align_input(q, eq, calib)
    correct_bias(q, eq, calib, threads, reference=fp)
    onnx.save(q, str(out))
    return out


def _equalized(
    src: Path, fp: onnx.ModelProto, calib: np.ndarray, threads: int, cache_dir: Path | None, out: Path
) -> tuple[onnx.ModelProto, Path]:
    """The equalized fp32 graph and a file holding it. It depends on the model and the calibration images only, so
    with a cache_dir (one search: one model, one calibration set) every corrected candidate shares one pass."""
    path = cache_dir / f"{src.stem}.equalized.onnx" if cache_dir else out.with_name(out.stem + ".equalized.onnx")
    if cache_dir and path.is_file():
        return onnx.load(str(path)), path
    eq = equalize(fp, calib, threads)
    onnx.save(eq, str(path))
    return eq, path


# ORT's histogram calibrators (Percentile, Entropy) hold every calibrated tensor of every calibration image in memory
# before building histograms (measured: a 300 px Lite0 with 256 images needs ~23 GB and was killed on a 24 GB
# machine). They calibrate on as many of the images as fit in this share of the available memory.
HISTOGRAM_CALIBRATIONS = ("Percentile", "Entropy")
HISTOGRAM_MEMORY_SHARE = 0.5
_HISTOGRAM_OVERHEAD = 1.25  # one tensor's copy while its histogram is built, buffers of the inference session


def activation_bytes(path: Path) -> int:
    """Bytes of the float32 tensors one image produces in the graph (batch 1), from ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    total = 0
    for vi in [*model.graph.value_info, *model.graph.output]:
        t = vi.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and len(t.shape.dim):
            total += int(np.prod([d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]))
    return 4 * total


def available_memory() -> int:
    """Bytes the kernel says a new allocation can take (MemAvailable), else the free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def histogram_images(per_image: int, n: int, available: int) -> int:
    """How many of `n` calibration images a histogram calibrator can hold within HISTOGRAM_MEMORY_SHARE of
    `available` bytes (at least 1)."""
    fit = int(HISTOGRAM_MEMORY_SHARE * available // max(1, int(_HISTOGRAM_OVERHEAD * per_image)))
    return max(1, min(n, fit))


def spread_subset(x: np.ndarray, k: int) -> np.ndarray:
    """k rows of x spread evenly over it (the calibration set is ordered; its first k could miss classes)."""
    return x if k >= len(x) else x[np.linspace(0, len(x) - 1, k).round().astype(int)]


def _quantize_static(
    src: Path,
    out: Path,
    calib: np.ndarray,
    cfg: QConfig,
    exclude: list[str] | None,
    cache_dir: Path | None,
    cache_tag: str = "",
) -> Path:
    name = _input_name(src)
    if cfg.calibration in HISTOGRAM_CALIBRATIONS:
        per_image = activation_bytes(src)
        k = histogram_images(per_image, len(calib), available_memory())
        if k < len(calib):
            print(
                f"note: {cfg.calibration} calibration on {k} of the {len(calib)} calibration images: it holds "
                f"{per_image / 2**20:.0f} MB of activations per image in memory (onnxruntime)",
                flush=True,
            )
            calib = spread_subset(calib, k)
    cache = (
        {"calibration_cache_path": cache_dir / f"ranges-{cfg.calibration}{cache_tag}.json"}
        if cache_dir and _CACHE_OK
        else {}
    )
    quantize_static(
        str(src),
        str(out),
        # histogram calibrators stack each tensor's batches: uneven batches (n not a multiple of 16) fail in ORT
        Reader(calib, name, batch=1 if cfg.calibration in HISTOGRAM_CALIBRATIONS else 16),
        quant_format=getattr(QuantFormat, cfg.fmt),
        activation_type=QuantType.QUInt8 if cfg.activations == "U8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=cfg.per_channel,
        reduce_range=cfg.reduce_range,
        calibrate_method=getattr(CalibrationMethod, cfg.calibration),
        nodes_to_exclude=exclude or [],
        extra_options={"ActivationSymmetric": cfg.activations == "S8"},
        **cache,
    )
    return out


def _input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name
