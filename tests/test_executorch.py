"""ExecuTorch .pte (XNNPACK): parity with PyTorch across the registry's quick families, the spec inside the
program, the strided-input pitfall of executorch.runtime, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.checkpoint import Checkpoint
from core.errors import UserError
from core.models import create_model, default_spec
from export.to_executorch import export_executorch, pte_runner, read_pte_spec

# a member of each family the zoo test covers; cnn_small runs in the developer loop, the rest (20-35 s each to
# lower on 2 cores) in CI's full run
FAMILIES = [
    "cnn_small",
    pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", marks=pytest.mark.slow),
    pytest.param("nin", marks=pytest.mark.slow),
    pytest.param("resnet18", marks=pytest.mark.slow),
    pytest.param("mixer_tiny", marks=pytest.mark.slow),
]


def exported(name: str, tmp_path, size: int = 32):
    torch.manual_seed(0)
    spec = default_spec(name, ("a", "b", "c"), image_size=size, crop="squash")
    model = create_model(name, 3, 3, size, **spec.arch_kwargs).eval()
    ck = Checkpoint(spec, model.state_dict())
    info = export_executorch(model, ck, tmp_path / "model.pte", max_batch=8)
    return model, spec, tmp_path / "model.pte", info


@pytest.mark.parametrize("name", FAMILIES)
def test_pte_matches_pytorch_and_carries_its_spec(name, tmp_path):
    model, spec, path, info = exported(name, tmp_path)
    assert info["dynamic_batch"] and info["max_batch"] == 8
    assert read_pte_spec(path) == spec
    run = pte_runner(path)
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for b in (1, 3, 8):
        out = run(x[:b])
        assert out.shape == (b, 3)
        assert np.all(np.abs(out - ref[:b]) <= 1e-4 + 1e-4 * np.abs(ref[:b])), name


def test_strided_input_is_read_as_the_array_says(tmp_path):
    """executorch.runtime reads a strided tensor as if it were contiguous, silently (9 % agreement measured on
    ELPV); the runner hands it contiguous memory, so a transposed HWC batch gives the same answers."""
    model, _, path, _ = exported("cnn_small", tmp_path)
    hwc = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    chw = hwc.transpose(0, 3, 1, 2)  # a view with channels-last strides, what np.stack of HWC images gives
    assert not chw.flags["C_CONTIGUOUS"]
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(chw))).numpy()
    assert np.abs(pte_runner(path)(chw) - ref).max() <= 1e-4


def test_program_without_our_spec_is_refused_in_one_line(tmp_path):
    from executorch.exir import to_edge

    bare = tmp_path / "bare.pte"
    program = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),))
    bare.write_bytes(to_edge(program).to_executorch().buffer)
    with pytest.raises(UserError, match="without our 'model_spec'"):
        read_pte_spec(bare)
    from demo.backends import served_from_path

    with pytest.raises(UserError, match="without our 'model_spec'"):
        served_from_path(bare)
    (tmp_path / "garbage.pte").write_bytes(b"not a program")
    with pytest.raises(UserError, match="not a loadable ExecuTorch program"):
        read_pte_spec(tmp_path / "garbage.pte")


class DataDependent(torch.nn.Module):
    """A model torch.export cannot capture: it branches on the values of its input."""

    def forward(self, x):
        return x.mean((2, 3))[:, :3] if x.sum() > 0 else -x.mean((2, 3))[:, :3]


def test_a_model_torch_export_cannot_capture_is_one_clear_line(tmp_path):
    spec = default_spec("cnn_small", ("a", "b", "c"), image_size=8)
    with pytest.raises(UserError, match=r"torch\.export cannot capture cnn_small"):
        export_executorch(DataDependent(), Checkpoint(spec, {}), tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists() and not list(tmp_path.glob(".*tmp*"))


def test_cli_writes_the_program_and_refuses_bad_options(exported_run, tmp_path, capsys):
    from core.errors import run_cli
    from export import to_executorch

    assert run_cli(to_executorch.main, ["--checkpoint", str(exported_run), "--max-batch", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err
    argv = ["--checkpoint", str(exported_run), "--out", str(tmp_path), "--max-batch", "40"]
    assert run_cli(to_executorch.main, argv) == 0
    assert "dynamic batch 1..40" in capsys.readouterr().out
    x = np.random.default_rng(2).normal(size=(40, 3, 32, 32)).astype(np.float32)
    batch, single = pte_runner(tmp_path / "model.pte"), pte_runner(exported_run / "export/model.pte")
    assert np.abs(batch(x) - single(x)).max() <= 1e-4  # 40 at once == one by one through the batch-1 program
    assert (
        read_pte_spec(tmp_path / "model.pte").class_names
        == read_pte_spec(exported_run / "export/model.pte").class_names
    )


@pytest.mark.slow  # two pt2e lowerings (~15 s)
def test_int8_pte_only_inside_the_budget_and_chosen_on_validation_images(exported_run, tmp_path, monkeypatch):
    """Judged by the export's gates on the images it is given (the validation split in to_onnx.py); refused ->
    nothing written, no candidate left behind; fits -> written, smaller, and its runner agrees with fp32."""
    from core.checkpoint import load_model
    from export import common, gates
    from export.to_executorch import quantize_executorch

    model, ck = load_model(exported_run / "best.pt")
    calib, held, _ = common.data_for(ck, 8, 12)
    strict = gates.Budget(max_drop=0.0, min_agreement=100.0, max_class_drop=0.0)
    monkeypatch.setattr(gates, "fits", lambda stats, budget: False)  # a model no INT8 program can keep
    refused = quantize_executorch(model, ck, tmp_path / "model.int8.pte", calib.x, held.x, held.y, strict)
    assert not refused["fits"] and 0 <= refused["agreement"] <= 100
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    kept = quantize_executorch(
        model, ck, tmp_path / "model.int8.pte", calib.x, held.x, held.y, gates.Budget(100, 0, 100)
    )
    assert kept["fits"] and [p.name for p in tmp_path.iterdir()] == ["model.int8.pte"]
    assert read_pte_spec(tmp_path / "model.int8.pte") == ck.spec
    with torch.no_grad():
        ref = model(torch.from_numpy(held.x)).numpy()
    agreement = 100 * (pte_runner(tmp_path / "model.int8.pte")(held.x).argmax(1) == ref.argmax(1)).mean()
    assert agreement == pytest.approx(kept["agreement"])
