"""ExecuTorch `.pte` (XNNPACK delegate): the maintained PyTorch runtime for phones.

    python export/to_executorch.py [--checkpoint RUN/best.pt] [--out DIR] [--max-batch 1]

`torch.export` captures the model (batch 1 by default, what a phone runs; with --max-batch N a dynamic batch
1..N, whose memory plan is sized for N images), the XNNPACK partitioner lowers what it supports, and the program
is written atomically. The model spec travels inside the program as the
constant method `model_spec` (the spec's JSON as uint8 bytes), so an app needs nothing else to preprocess and
label: `module.execute("model_spec")` on the device, `read_pte_spec` here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_write
from core.checkpoint import Checkpoint
from core.errors import UserError, first_line, run_cli
from core.spec import ModelSpec
from export.common import pt2e_quantized, standalone_inputs, standalone_parser

SPEC_METHOD = "model_spec"
MAX_BATCH = 1  # ExecuTorch plans memory for the largest batch: batch 1 keeps a phone's arena small


def capture(model: torch.nn.Module, spec: ModelSpec, max_batch: int = MAX_BATCH):
    """(torch.export program, dynamic batch?): with max_batch > 1 a dynamic batch 1..max_batch where the model
    allows it, else batch 1. The example input has max_batch images: ExecuTorch sizes its memory plan from the
    example, and a smaller one (measured: 2) left room for only 15 images whatever the declared maximum."""
    x = torch.zeros(max(1, max_batch), spec.in_channels, spec.image_size, spec.image_size)
    if max_batch > 1:
        try:
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            return torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},)), True
        except Exception:  # some models only export with static shapes: try that before giving up
            pass
    try:
        return torch.export.export(model.eval(), (x[:1],)), False
    except Exception as e:
        raise UserError(f"torch.export cannot capture {spec.arch}: {first_line(e)}") from None


def not_delegated(edge) -> list[str]:
    """Operators left outside the XNNPACK delegate (they run on ExecuTorch's portable CPU kernels)."""
    ops = set()
    for node in edge.exported_program().graph.nodes:
        if node.op == "call_function" and "executorch_call_delegate" not in str(node.target):
            name = getattr(node.target, "__name__", str(node.target))
            if not name.startswith(("<built-in", "getitem")) and "getitem" not in name:
                ops.add(name)
    return sorted(ops)


def export_executorch(model: torch.nn.Module, ck: Checkpoint, path: Path, max_batch: int = MAX_BATCH) -> dict:
    """Write `path` (.pte, fp32, XNNPACK); returns {dynamic_batch, portable_ops}."""
    program, dynamic = capture(model, ck.spec, max_batch)
    buffer, portable = _lower(program, ck.spec)
    atomic_write(path, buffer)
    if portable:
        print(
            f"note: {len(portable)} operator(s) not lowered to XNNPACK, run on portable kernels: {', '.join(portable)}"
        )
    return {"dynamic_batch": dynamic, "max_batch": max_batch if dynamic else 1, "portable_ops": portable}


def _lower(program, spec: ModelSpec) -> tuple[bytes, list[str]]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    spec_bytes = torch.tensor(list(spec.to_json().encode()), dtype=torch.uint8)
    try:
        edge = to_edge_transform_and_lower(
            program, partitioner=[XnnpackPartitioner()], constant_methods={SPEC_METHOD: spec_bytes}
        )
        portable = not_delegated(edge)  # before to_executorch(), which rewrites the graph into out-variants
        return edge.to_executorch().buffer, portable
    except Exception as e:  # lowering errors come from many layers; the user gets one line
        raise UserError(f"ExecuTorch lowering of {spec.arch} failed: {first_line(e)}") from None


def quantize_executorch(
    model: torch.nn.Module,
    ck: Checkpoint,
    path: Path,
    calib: np.ndarray,
    select_x: np.ndarray,
    select_y: np.ndarray,
    budget,
) -> dict:
    """INT8 .pte under the export's accuracy budget: pt2e with ExecuTorch's XNNPACK quantizer (symmetric INT8,
    per-channel weights), calibrated on training images, judged on the validation images that choose ONNX INT8
    (never on the test split). Written to `path` only if it fits; returns the candidate's figures either way."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from export.gates import judge_candidate

    path.unlink(missing_ok=True)  # never leave a stale INT8 program beside a new fp32 one
    program, _ = capture(model, ck.spec, 1)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    try:
        converted = pt2e_quantized(program.module(), quantizer, calib)
        example = (torch.from_numpy(np.ascontiguousarray(calib[:1], np.float32)),)
        buffer, _ = _lower(torch.export.export(converted, example), ck.spec)
    except UserError:
        raise
    except Exception as e:  # the pt2e flow raises many types; the user gets one line
        raise UserError(f"ExecuTorch INT8 quantization of {ck.spec.arch} failed: {first_line(e)}") from None
    return judge_candidate(
        model, path, lambda p: atomic_write(p, buffer), pte_runner, select_x, select_y, budget, "pt2e-XNNPACK-S8-pc"
    )


def _program(path: Path):
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a loadable ExecuTorch program ({first_line(e)})") from None


def read_pte_spec(path: Path) -> ModelSpec:
    """The spec carried inside a .pte written by export_executorch."""
    prog = _program(path)
    if SPEC_METHOD not in prog.method_names:
        raise UserError(f"{path}: ExecuTorch program without our '{SPEC_METHOD}'; export it with export/to_onnx.py")
    raw = prog.load_method(SPEC_METHOD).execute([])[0]
    return ModelSpec.from_json(bytes(raw.numpy().astype(np.uint8).tolist()).decode())


def _batch(method) -> int:
    return max(1, int(method.metadata.input_tensor_meta(0).sizes()[0]))  # the largest batch the memory plan holds


def pte_batch(path: Path) -> int:
    """The largest batch one call of the program takes (1 for the default batch-1 export)."""
    return _batch(_program(path).load_method("forward"))


def pte_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch -> logits through executorch.runtime, in chunks of the program's largest batch (1 for the
    default batch-1 program). The input is made contiguous first: the runtime reads a strided (e.g. channels-last)
    tensor as if it were contiguous, silently (measured: 9 % agreement)."""
    method = _program(path).load_method("forward")
    cap = _batch(method)

    def call(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(x)])[0].numpy()

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        return call(x) if len(x) <= cap else np.concatenate([call(x[i : i + cap]) for i in range(0, len(x), cap)])

    return run


def get_args_parser() -> argparse.ArgumentParser:
    p = standalone_parser("Export a checkpoint to an ExecuTorch .pte program (XNNPACK).")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="> 1: dynamic batch 1..N (memory for N images)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 1 <= args.max_batch <= 256:
        raise UserError(f"--max-batch {args.max_batch}: give 1 (a batch-1 program) to 256 (a dynamic batch up to N)")
    model, ck, folder = standalone_inputs(args)
    out = folder / "model.pte"
    info = export_executorch(model, ck, out, args.max_batch)
    batch = f"dynamic batch 1..{info['max_batch']}" if info["dynamic_batch"] else "batch 1 only"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB, {batch})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
