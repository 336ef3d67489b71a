"""LiteRT .tflite (litert-torch): parity with PyTorch across the registry's quick families, the spec inside the
flatbuffer, strided inputs, the INT8 budget, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.checkpoint import Checkpoint
from core.errors import UserError
from core.models import create_model, default_spec
from export.to_litert import SPEC_METADATA, export_litert, read_tflite_spec, tflite_runner, with_spec

# the custom CNN, EfficientNet-Lite (the default) and a torchvision mobile net; cnn_small runs in the developer loop,
# the others (20 s each to convert on 2 cores) in CI's full run; test_executorch covers the wider registry
FAMILIES = [
    "cnn_small",
    pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", marks=pytest.mark.slow),
]


def exported(name: str, tmp_path, size: int = 32):
    torch.manual_seed(0)
    spec = default_spec(name, ("a", "b", "c"), image_size=size, crop="squash")
    model = create_model(name, 3, 3, size, **spec.arch_kwargs).eval()
    info = export_litert(model, Checkpoint(spec, model.state_dict()), tmp_path / "model.tflite")
    return model, spec, tmp_path / "model.tflite", info


@pytest.mark.parametrize("name", FAMILIES)
def test_tflite_matches_pytorch_and_carries_its_spec(name, tmp_path):
    model, spec, path, info = exported(name, tmp_path)
    assert info["batch"] == 1 and info["size_mb"] > 0
    assert read_tflite_spec(path) == spec
    run = tflite_runner(path, threads=1)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for b in (1, 5):  # a batch-1 model: larger batches run image by image
        out = run(x[:b])
        assert out.shape == (b, 3)
        assert np.all(np.abs(out - ref[:b]) <= 1e-4 + 1e-4 * np.abs(ref[:b])), name


def test_strided_input_and_wrong_size(tmp_path):
    model, _, path, _ = exported("cnn_small", tmp_path)
    hwc = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    chw = hwc.transpose(0, 3, 1, 2)  # channels-last strides, what np.stack of HWC images gives
    assert not chw.flags["C_CONTIGUOUS"]
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(chw))).numpy()
    run = tflite_runner(path)
    assert np.abs(run(chw) - ref).max() <= 1e-4
    with pytest.raises(UserError, match=r"expects input \[1, 3, 32, 32\]"):
        run(np.zeros((1, 3, 40, 40), np.float32))


def test_spec_metadata_is_replaced_not_duplicated(tmp_path):
    _, spec, path, _ = exported("cnn_small", tmp_path)
    other = spec.replace(class_names=("x", "y", "z"))
    twice = with_spec(path.read_bytes(), other)
    (tmp_path / "again.tflite").write_bytes(twice)
    assert read_tflite_spec(tmp_path / "again.tflite") == other
    assert twice.count(SPEC_METADATA.encode()) == 1


def test_model_without_our_spec_or_not_a_model_is_refused_in_one_line(tmp_path):
    import litert_torch

    bare = tmp_path / "bare.tflite"
    litert_torch.convert(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),)).export(str(bare))
    with pytest.raises(UserError, match=f"without our '{SPEC_METADATA}'"):
        read_tflite_spec(bare)
    from demo.backends import served_from_path

    with pytest.raises(UserError, match=f"without our '{SPEC_METADATA}'"):
        served_from_path(bare)
    (tmp_path / "garbage.tflite").write_bytes(b"not a model at all")
    for call in (read_tflite_spec, tflite_runner):
        with pytest.raises(UserError, match="not a LiteRT/TFLite model"):
            call(tmp_path / "garbage.tflite")


def test_a_model_that_cannot_be_converted_is_one_clear_line(tmp_path):
    from tests.test_executorch import DataDependent

    spec = default_spec("cnn_small", ("a", "b", "c"), image_size=8)
    with pytest.raises(UserError, match="LiteRT conversion of cnn_small failed"):
        export_litert(DataDependent(), Checkpoint(spec, {}), tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_litert(name, *a, **k):
        if name == "litert_torch":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    spec = default_spec("cnn_small", ("a", "b", "c"), image_size=8)
    with pytest.raises(UserError, match=r"litert-torch package: pip install -r requirements\.txt"):
        export_litert(torch.nn.Identity(), Checkpoint(spec, {}), tmp_path / "m.tflite")


def test_cli_writes_the_model(exported_run, tmp_path, capsys):
    from core.errors import run_cli
    from export import to_litert

    assert run_cli(to_litert.main, ["--checkpoint", str(exported_run), "--out", str(tmp_path)]) == 0
    assert "spec inside" in capsys.readouterr().out
    x = np.random.default_rng(2).normal(size=(4, 3, 32, 32)).astype(np.float32)
    fresh, shipped = tflite_runner(tmp_path / "model.tflite"), tflite_runner(exported_run / "export/model.tflite")
    assert np.abs(fresh(x) - shipped(x)).max() <= 1e-5
    assert read_tflite_spec(tmp_path / "model.tflite") == read_tflite_spec(exported_run / "export/model.tflite")


def test_int8_tflite_only_inside_the_budget(exported_run, tmp_path, monkeypatch):
    """Judged by the export's gates on the images it is given (the validation split in to_onnx.py); refused ->
    nothing written, no candidate left behind; fits -> written, smaller, spec inside, figures reproducible."""
    from core.checkpoint import load_model
    from export import common, gates
    from export.to_litert import quantize_litert

    model, ck = load_model(exported_run / "best.pt")
    calib, held, _ = common.data_for(ck, 8, 12)
    monkeypatch.setattr(gates, "fits", lambda stats, budget: False)  # a model no INT8 file can keep
    refused = quantize_litert(model, ck, tmp_path / "model.int8.tflite", calib.x, held.x, held.y, gates.Budget())
    assert not refused["fits"] and 0 <= refused["agreement"] <= 100
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    kept = quantize_litert(
        model, ck, tmp_path / "model.int8.tflite", calib.x, held.x, held.y, gates.Budget(100, 0, 100)
    )
    path = tmp_path / "model.int8.tflite"
    assert kept["fits"] and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert read_tflite_spec(path) == ck.spec
    assert path.stat().st_size < 0.5 * (exported_run / "export/model.tflite").stat().st_size
    with torch.no_grad():
        ref = model(torch.from_numpy(held.x)).numpy()
    agreement = 100 * (tflite_runner(path)(held.x).argmax(1) == ref.argmax(1)).mean()
    assert agreement == pytest.approx(kept["agreement"])
