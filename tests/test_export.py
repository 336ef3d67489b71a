import json
import re

import numpy as np
import onnx
import pytest
import torch

from core.errors import UserError, run_cli
from core.images import load_image
from core.preprocess import preprocess
from core.quantization import MIXED, MIXED_7BIT
from export import to_onnx, to_torchscript
from export.onnx_io import export_onnx, run_onnx, simplify
from export.runtime import OnnxClassifier, check_external_data
from export.validate import cycled_logits, throughput_from


@pytest.fixture(scope="module")
def run_dir(exported_run):
    """The trained run with its export/ written (several tests read those files), whatever order tests run in."""
    return exported_run


def one_shot(run_dir, *extra):
    return run_cli(
        to_onnx.main,
        ["--checkpoint", str(run_dir / "best.pt"), "--calib-images", "24", "--threads", "1", *extra],
    )


def test_one_shot_export_validates_every_artifact(exported_run):
    run_dir = exported_run
    out = run_dir / "export"
    rep = json.loads((out / "report.json").read_text())
    names = {r["artifact"] for r in rep["artifacts"]}
    fp32 = {"onnx_fp32", "torchscript", "torchscript_mobile", "executorch", "litert"}
    assert fp32 | {"onnx_int8", "ort_int8"} <= names
    assert {"executorch_int8", "litert_int8"} <= names  # pt2e INT8 fits this toy model's relaxed budget
    for r in rep["artifacts"]:
        if r["artifact"] in fp32:
            assert r["agreement"] == 100.0 and r["max_abs_diff"] <= 1e-4 and r["passed"]
    assert rep["passed"] and (out / "report.md").is_file() and (out / "benchmark.md").is_file()
    q = json.loads((out / "quantization.json").read_text())
    assert q["chosen"] and len(q["candidates"]) >= 4
    first, second = q["candidates"][:2]  # the mixed candidate, then its 7-bit twin, measured like the rest
    assert first["config"] == MIXED.name and second["config"] == MIXED_7BIT.name
    assert q["s8_saturates"] in (True, False)  # the CPU probe is part of the record
    assert all("error" not in r and r["img_per_s"] > 0 for r in (first, second))
    # judged as .onnx and as the .ort twin the export ships (the default): each figure the worse of the two
    assert all(r["agreement"] == min(r["onnx_agreement"], r["ort_agreement"]) for r in (first, second))
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    summary = json.loads((out / "export.json").read_text())
    stages = summary["stage_seconds"]
    assert set(stages) == {
        "load",
        "onnx",
        "int8 search",
        "ort+torchscript",
        "executorch",
        "litert",
        "validate",
        "benchmark",
    }
    assert summary["executorch"] == {"dynamic_batch": False, "max_batch": 1, "portable_ops": []}
    assert summary["executorch_int8"]["fits"] and summary["executorch_int8"]["config"] == "pt2e-XNNPACK-S8-pc"
    assert (out / "model.int8.pte").stat().st_size < (out / "model.pte").stat().st_size
    assert summary["litert"]["batch"] == 1
    assert summary["litert_int8"]["fits"] and summary["litert_int8"]["config"] == "pt2e-LiteRT-S8-pc"
    assert (out / "model.int8.tflite").stat().st_size < (out / "model.tflite").stat().st_size
    assert 0 < sum(stages.values()) <= summary["seconds"] + 1  # each rounded to 0.1 s
    bench = json.loads((out / "benchmark.json").read_text())["rows"]
    acc = {r["artifact"]: r["accuracy"] for r in rep["artifacts"]} | {"pytorch": rep["pytorch_accuracy"]}
    for row in bench:
        assert row["accuracy"] == acc[row["format"]]  # the benchmark reports what validation measured
        assert row["img_per_s"] > 0 and row["img_per_s_from"] in ("validation", "benchmark")
        assert row["p50_ms"] > 0 and row["peak_mem_growth_mb"] >= 0
        # batch-1 phone programs: their batch-32 figure is 32 calls, and the table says so; the others take any batch
        assert row["call_batch"] == (1 if row["file"].endswith((".pte", ".tflite")) else None), row["file"]
    phone_rows = [line for line in (out / "benchmark.md").read_text().splitlines() if ".tflite |" in line]
    assert len(phone_rows) == 2 and all("(32 calls of batch 1)" in line for line in phone_rows)
    for md in ("report.md", "benchmark.md"):
        table = [line for line in (out / md).read_text().splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in table}) == 1, table  # no cell text breaks the table
        assert "torchscript_mobile (legacy: PyTorch Mobile, unmaintained upstream" in (out / md).read_text()


def test_spec_survives_onnx_and_torchscript(run_dir):
    ck_spec = json.loads((run_dir / "meta.json").read_text())["spec"]
    clf = OnnxClassifier(run_dir / "export/model.onnx")
    assert clf.spec.to_dict() == ck_spec
    meta = {p.key: p.value for p in onnx.load(str(run_dir / "export/model.onnx")).metadata_props}
    assert len(json.loads(meta["source_sha256"])) == 64
    _, spec_json = to_torchscript.load_torchscript(run_dir / "export/model.pt")
    assert json.loads(spec_json) == ck_spec


def test_runtime_classifies_like_pytorch(run_dir):
    from core.checkpoint import load_model

    model, ck = load_model(run_dir / "best.pt")
    clf = OnnxClassifier(run_dir / "export/model.onnx")
    img = sorted((run_dir.parent.parent.parent / "data" / "circle").glob("*.png"))[0]
    top, timing = clf.classify_timed(img, topk=3)
    x = torch.from_numpy(preprocess(load_image(img), ck.spec))[None]
    probs = model(x).softmax(1)[0].detach().numpy()
    assert top[0][0] == ck.spec.class_names[int(probs.argmax())]
    assert top[0][1] == pytest.approx(float(probs.max()), abs=1e-4)
    assert set(timing) == {"preprocess_ms", "inference_ms"}


def test_uint8_embedded_preprocessing_matches(run_dir):
    clf = OnnxClassifier(run_dir / "export/model.onnx")
    img = load_image(sorted((run_dir.parent.parent.parent / "data" / "stripes").glob("*.png"))[0])
    from core.preprocess import model_view

    view = np.asarray(model_view(img, clf.spec))[None]
    u8 = run_onnx(run_dir / "export/model.uint8.onnx", view if view.ndim == 4 else view[..., None])
    assert np.abs(u8 - clf.logits(clf.preprocess(img)[None])).max() < 1e-4


@pytest.mark.parametrize("name", ["cnn_small", "efficientnet_lite0", "resnet18", "mobilenet_v2"])
def test_dynamic_batch_survives_simplification(tmp_path, name):
    from core.models import create_model, default_spec

    spec = default_spec(name, ("a", "b", "c"), image_size=33, crop="squash")  # odd size: exercises asymmetric padding
    model = create_model(name, 3, 3, 33).eval()
    raw = export_onnx(model, spec, tmp_path / "raw.onnx")
    x = np.random.default_rng(0).normal(size=(8, 3, 33, 33)).astype(np.float32)
    rep = simplify(raw, tmp_path / "sim.onnx", x[:1])
    ref = model(torch.from_numpy(x)).detach().numpy()
    for b in (1, 3, 8):
        assert rep["batches"][str(b)]["shape"] == [b, 3]
        got = run_onnx(tmp_path / "sim.onnx", x[:b])
        assert np.abs(got - ref[:b]).max() <= 1e-4


@pytest.mark.parametrize("fixed_batch", [None, 3])
def test_run_onnx_feeds_large_sets_in_chunks(tmp_path, fixed_batch):
    """run_onnx answers like the model on every image however many there are: chunks of `batch` images for a
    dynamic batch axis (memory stays bounded), chunks of exactly N (the last padded) for a model fixed at batch N."""
    from core.models import create_model

    model = create_model("cnn_small", 3, 3, 16).eval()
    path = tmp_path / "m.onnx"
    axes = None if fixed_batch else {"input": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(
        model,
        torch.zeros(fixed_batch or 1, 3, 16, 16),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    x = np.random.default_rng(1).normal(size=(70, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = run_onnx(path, x, batch=32)
    assert got.shape == (70, 3)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert run_onnx(path, x[:0]).shape == (0, 3)


@pytest.mark.parametrize(
    "run",
    [
        {"mode": "transfer"},
        {"mode": "finetune"},
        {"mode": "scratch"},
        None,
        {"mode": "finetune", "trainable_from": 11, "int8_aware": False},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": True},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": True, "class_weight": "sqrt"},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": True, "class_weight": "sqrt", "int8_consistency": 0.0},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": True, "class_weight": "sqrt", "int8_consistency": 10},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": False, "class_weight": "sqrt"},
        {"mode": "transfer", "class_weight": "inverse"},
        {"mode": "scratch", "class_weight": "none"},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": True, "mixup": 0.2},
        {"mode": "finetune", "trainable_from": 11, "int8_aware": True, "class_weight": "sqrt", "mixup": 0.4},
        {"mode": "transfer", "mixup": 0.0},
    ],
)
@pytest.mark.parametrize("searched", ["fast", "full"])
def test_int8_refusal_message_names_the_next_steps(run, searched, tmp_path):
    from export.quantize import refusal_message

    src = tmp_path / "model.onnx"
    mode = (run or {}).get("mode")
    line = refusal_message(tmp_path / "model.int8.onnx", src, searched, run)
    assert (
        "\n" not in line
        and line.startswith("error: no INT8 configuration")
        and "model.int8.onnx was NOT written" in line
    )
    assert f"python export/quantize.py --onnx {src} --force" in line
    assert (f"--onnx {src} --search full" in line) == (searched == "fast")  # the wider search, unless just run
    # a frozen backbone: training it is the step that changes what INT8 has to follow (measured on ELPV); a partial
    # finetune trained on fp32 prefix features only: --int8-aware with its cut (3 of 3 ELPV seeds fit)
    partial = run is not None and run.get("trainable_from") is not None and not run["int8_aware"]
    assert ("python training/train.py --mode finetune (or --mode scratch)" in line) == (mode == "transfer")
    assert ("python training/train.py --mode transfer --int8-aware" in line) == (mode == "transfer")
    assert ("python training/train.py --mode finetune --trainable-from 11 --int8-aware" in line) == partial
    # a class-weighted run (on ELPV 3 of 3 weighted partial-finetune seeds were refused): retrain without the weights
    weighted = (run or {}).get("class_weight") not in (None, "none")
    assert (f"trained with --class-weight {(run or {}).get('class_weight')}" in line) == weighted
    assert ("retrain with --class-weight none" in line) == weighted
    assert ("python training/train.py" in line) == (mode == "transfer" or partial)
    # a weighted partial finetune that trained against the INT8 prefix unpaired: pairing keeps the weights (measured)
    unpaired = weighted and run["mode"] == "finetune" and run["int8_aware"] and not run.get("int8_consistency")
    assert ("retrain with --int8-consistency 10 added" in line) == unpaired
    if unpaired:
        assert line.index("--int8-consistency 10") < line.index("--class-weight none")  # the step that keeps them first
    # a mixup run (on ELPV 2 of 3 partial-finetune seeds were refused): retrain without it, named with its alpha
    alpha = (run or {}).get("mixup") or 0
    assert ("retrain without --mixup" in line) == (alpha > 0)
    assert (f"trained with --mixup {alpha:g}," in line) == (alpha > 0)


def _gate(artifact, passed, agreement=100.0, drop=0.0):
    return {"artifact": artifact, "passed": passed, "agreement": agreement, "drop": drop}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([_gate("onnx_fp32", True), _gate("onnx_int8", False, 96.67, 1.0), _gate("ort_int8", False, 97.67)], "96.7 %"),
        ([_gate("onnx_fp32", False, 99.0), _gate("onnx_int8", False, 96.0)], None),  # a broken fp32 export
        ([_gate("onnx_fp32", True), _gate("onnx_int8", True)], None),
    ],
)
@pytest.mark.parametrize("mode, weight", [("transfer", "none"), ("scratch", "none"), ("finetune", "sqrt")])
def test_int8_failure_hint_only_when_int8_alone_fails(rows, expected, mode, weight):
    run = {"mode": mode, "class_weight": weight}
    hint = to_onnx.int8_failure_hint({"artifacts": rows}, run, "elpv-4class test split (300 of 656 images)")
    if expected is None:
        assert hint is None
        return
    assert "\n" not in hint and "onnx_int8: " + expected in hint and "test split" in hint and "--no-int8" in hint
    assert ("--mode finetune" in hint) == (mode == "transfer")
    assert ("retrain with --class-weight none" in hint) == (weight == "sqrt")
    # the fp32-only way out reads as the only step, or as the last of several
    assert ("next: export with --no-int8" in hint) == (mode == "scratch")
    assert ("or export with --no-int8" in hint) == (mode != "scratch")


def test_int8_refused_when_no_candidate_fits_names_the_next_step(exported_run, monkeypatch, capsys):
    from export import quantize

    run_dir = exported_run  # its export/ holds a fitting INT8 model, the contrast below
    monkeypatch.chdir(run_dir.parent.parent.parent)
    monkeypatch.setattr(quantize, "fits", lambda stats, budget: False)  # a model no configuration can keep
    out = run_dir.parent / "refused"
    code = one_shot(
        run_dir, "--out", str(out), "--no-ort", "--no-torchscript", "--no-benchmark", "--no-executorch", "--no-litert"
    )
    assert code == 3
    assert not (out / "model.int8.onnx").exists() and (out / "model.onnx").is_file()
    printed = capsys.readouterr().out
    assert "NOT written" in printed
    assert f"python export/quantize.py --onnx {out / 'model.onnx'} --search full" in printed  # the command to run
    q = json.loads((out / "quantization.json").read_text())
    assert not any("ort_agreement" in r for r in q["candidates"])  # --no-ort: judged as .onnx only
    retried = [r for r in q["candidates"] if "+fp32-lead" in r["config"]]
    assert retried and all(r["excluded"] for r in retried)  # the retry kept the leading layers in fp32
    assert all(re.search(r"\+fp32-lead\d+%$", r["config"]) for r in retried)  # labelled with the lead's share

    # the demo shows the refusal and its figures instead of a bare "not exported"
    from demo.app import not_served
    from demo.backends import ServedModel

    served = ServedModel("refused", run_dir / "best.pt", out, OnnxClassifier(out / "model.onnx").spec)
    line, table = served.int8_refusal
    best = max(r["agreement"] for r in q["candidates"] if "agreement" in r)
    assert line.startswith("INT8 refused") and f"{best:.1f} % top-1 agreement" in line and "budget >= 98.0 %" in line
    assert table == (out / "quantization.md").read_text() and "+fp32-lead" in table
    assert not_served(served, "onnx_int8").startswith("INT8 refused") and not_served(served, "torchscript") == (
        "not exported"
    )
    assert ServedModel("ok", run_dir / "best.pt", run_dir / "export", served.spec).int8_refusal is None


def test_a_phone_format_that_cannot_be_made_skips_only_itself(run_dir, monkeypatch, capsys):
    """A converter that cannot take the model: one line naming the step, no stale file of an earlier export left
    behind, every other format still written and validated, exit 1 naming what is missing."""
    from core.errors import UserError
    from export import to_onnx

    def cannot(model, ck, path):
        raise UserError("LiteRT conversion of cnn_small failed: op aten.weird_op has no lowering")

    monkeypatch.chdir(run_dir.parent.parent.parent)
    monkeypatch.setattr(to_onnx, "export_litert", cannot)
    out = run_dir.parent / "no-litert"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"stale")
    (out / "model.int8.tflite").write_bytes(b"stale")
    code = one_shot(run_dir, "--out", str(out), "--no-int8", "--no-benchmark", "--no-executorch")
    printed = capsys.readouterr().out
    assert code == 1
    assert "aten.weird_op has no lowering -> model.tflite NOT written; the other formats continue" in printed
    assert "export FAILED: model.tflite not written" in printed
    assert not (out / "model.tflite").exists() and not (out / "model.int8.tflite").exists()
    rep = json.loads((out / "report.json").read_text())
    assert {r["artifact"] for r in rep["artifacts"]} == {"onnx_fp32", "ort_fp32", "torchscript", "torchscript_mobile"}
    assert rep["passed"]
    summary = json.loads((out / "export.json").read_text())
    assert summary["litert"] == {"error": "LiteRT conversion of cnn_small failed: op aten.weird_op has no lowering"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-agreement", "100.1"], "--min-agreement 100.1 cannot be met"),
        (["--max-drop", "-1"], "give values >= 0"),
        (["--max-images", "2"], "--max-images 2 is below the 3 classes"),
        (["--calib-images", "2"], "--calib-images 2 is below the 3 classes"),
    ],
)
def test_export_refuses_impossible_budgets_and_counts_before_writing(run_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    argv = ["--checkpoint", str(run_dir / "best.pt"), "--out", str(out), *flags]
    assert run_cli(to_onnx.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]  # one line, no traceback
    assert not out.exists()  # nothing half-written


def test_int8_search_chooses_on_validation_images_never_on_test(run_dir, tmp_path, monkeypatch):
    """The search sees the validation split only; the test split reports the chosen model once, in validation."""
    from dataclasses import replace

    from core.checkpoint import load_checkpoint, save_checkpoint
    from export import quantize
    from tests.conftest import make_folder

    root = tmp_path / "split"
    for k, part in enumerate(("train", "val", "test")):
        make_folder(root / part, per_class=4, odd_files=False, seed=10 + k)
    ck = load_checkpoint(run_dir / "best.pt")
    save_checkpoint(replace(ck, args={**ck.args, "data": str(root)}), tmp_path / "best.pt")
    seen = {}

    def spy(src, out, calib, held_x, held_y, *a, **kw):
        seen["x"], seen["y"] = held_x, held_y
        return {"budget": {}, "fp32_img_per_s": 1.0, "candidates": [], "chosen": None, "forced": False}

    monkeypatch.setattr(quantize, "search", spy)
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", str(tmp_path / "best.pt"), "--calib-images", "6", "--no-torchscript", "--no-benchmark"]
    assert run_cli(to_onnx.main, argv) == 3
    spec = ck.spec

    def arrays(part):
        return [preprocess(load_image(p), spec) for p in sorted((root / part).rglob("*.png"))]

    val, test = arrays("val"), arrays("test")
    assert len(seen["x"]) == len(val) == 12
    assert all(any(np.array_equal(s, v) for v in val) for s in seen["x"])
    assert not any(np.array_equal(s, t) for s in seen["x"] for t in test)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert "test split" in report["images"]  # the test split is what validation reports on


def test_force_writes_int8_outside_the_budget_loudly(run_dir, monkeypatch, capsys):
    from export import quantize

    monkeypatch.chdir(run_dir.parent.parent.parent)
    out = run_dir.parent / "forced"
    from export import validate

    for module in (quantize, validate):  # a model that no INT8 configuration keeps inside its budget
        monkeypatch.setattr(module, "fits", lambda stats, budget: False)
    code = one_shot(run_dir, "--out", str(out), "--force", "--no-torchscript", "--no-executorch", "--no-litert")
    assert code == 0  # the fp32 gates passed; the INT8 one failed on purpose
    printed = capsys.readouterr().out
    assert "OUTSIDE the accuracy budget" in printed and "INT8 artifacts FAIL" in printed
    assert "passed, with INT8 FORCED outside its budget" in printed
    q = json.loads((out / "quantization.json").read_text())
    assert q["forced"] and q["chosen"]
    chosen = next(r for r in q["candidates"] if r["config"] == q["chosen"])
    faster = [r for r in q["candidates"] if r.get("img_per_s", 0) > q["fp32_img_per_s"]]
    # the forced pick is the closest candidate that is still faster than fp32, else the closest of all
    pool = faster or [r for r in q["candidates"] if "error" not in r]
    assert chosen in pool and chosen["agreement"] == max(r["agreement"] for r in pool)
    meta = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
    assert json.loads(meta["forced"]) is True
    rows = {r["artifact"]: r for r in json.loads((out / "report.json").read_text())["artifacts"]}
    assert rows["onnx_int8"]["passed"] is False and rows["onnx_fp32"]["passed"] is True

    from demo.backends import ServedModel

    served = ServedModel("forced", run_dir / "best.pt", out, OnnxClassifier(out / "model.onnx").spec)
    assert "outside its accuracy budget" in served.caveats["onnx_int8"]
    assert ServedModel("ok", run_dir / "best.pt", run_dir / "export", served.spec).caveats == {}


def test_cycled_batches_cover_every_image():
    seen = []
    cycled_logits(lambda x: (seen.append(len(x)), x[:, :1, 0, 0])[1], np.zeros((50, 1, 1, 1), np.float32))
    assert sum(seen) == 50 and {1, 7, 32} <= set(seen)


def test_throughput_from_validation_calls_drops_the_warm_up_call():
    assert throughput_from({32: [5.0, 1.0, 2.0, 4.0], 7: [0.1]}) == 16.0  # median of 1, 2, 4 s per 32 images
    assert throughput_from({32: [5.0, 1.0]}) is None  # one timed call is not a measurement
    assert throughput_from({7: [0.1, 0.1, 0.1]}) is None


def test_benchmark_reuses_validation_figures_and_times_the_rest(exported_run, monkeypatch):
    from export import benchmark as bm

    calls: dict[str, list[int]] = {}

    def fake_runner(path, threads):
        seen = calls.setdefault(str(path), [])

        def run(x):
            seen.append(len(x))
            return np.eye(3, dtype=np.float32)[np.arange(len(x)) % 3]

        return run

    monkeypatch.setattr(bm, "runner", fake_runner)
    monkeypatch.setattr(bm, "torch_runner", lambda module: fake_runner("pytorch", 1))
    x, y = np.zeros((40, 3, 4, 4), np.float32), np.arange(40) % 3
    known = {"pytorch": {"accuracy": 50.0, "img_per_s": 123.0}, "onnx_fp32": {"accuracy": 60.0, "img_per_s": None}}
    onnx_path = exported_run / "export" / "model.onnx"
    rows = bm.benchmark(torch.nn.Identity(), exported_run / "best.pt", {"onnx_fp32": onnx_path}, x, y, 1, 4, known)
    torch_row, onnx_row = rows
    assert (torch_row["accuracy"], torch_row["img_per_s"], torch_row["img_per_s_from"]) == (50.0, 123.0, "validation")
    assert set(calls["pytorch"]) == {1}  # batch-1 latency only: nothing re-run at batch 32
    assert onnx_row["accuracy"] == 60.0 and onnx_row["img_per_s_from"] == "benchmark" and onnx_row["img_per_s"] > 0
    assert calls[str(onnx_path)].count(32) == 4  # one warm-up + three timed batch-32 calls


def test_benchmark_scores_unlabelled_images_against_pytorch(exported_run, monkeypatch):
    from export import benchmark as bm

    def fake(favourite):  # always answers one class
        return lambda x: np.eye(3, dtype=np.float32)[np.full(len(x), favourite)]

    monkeypatch.setattr(bm, "runner", lambda path, threads: fake(1 if path.suffix == ".onnx" else 0))
    monkeypatch.setattr(bm, "torch_runner", lambda module: fake(0))
    paths = {"onnx_fp32": exported_run / "export" / "model.onnx", "torchscript": exported_run / "export" / "model.pt"}
    x, y = np.zeros((10, 3, 4, 4), np.float32), np.full(10, -1)  # no labels (the ImageNet sample crops)
    for known in (None, {"pytorch": {"accuracy": 100.0, "img_per_s": 1.0}}):
        rows = bm.benchmark(torch.nn.Identity(), exported_run / "best.pt", paths, x, y, 1, 2, known)
        acc = {r["format"]: r["accuracy"] for r in rows}
        assert acc == {"pytorch": 100.0, "onnx_fp32": 0.0, "torchscript": 100.0}  # not 100 % against itself


def test_interleaved_timing_keeps_a_neighbours_spinning_threads_out_of_the_figures(monkeypatch):
    """A format's first call after another format is slow (that one's threads still spin); time_interleaved must
    time every format the same number of times, in interleaved turns, without those first calls."""
    from export import benchmark as bm

    clock, log = [0.0], []

    def fake(name: str, ms: float):
        def run(x):
            clock[0] += (20.0 if log and log[-1] != name else ms) / 1e3
            log.append(name)

        return run

    monkeypatch.setattr(bm.time, "perf_counter", lambda: clock[0])
    lat = bm.time_interleaved({"a": fake("a", 1.0), "b": fake("b", 3.0)}, np.zeros((2, 1)), n=20, rounds=5)
    assert lat["a"]["p50_ms"] == pytest.approx(1.0) and lat["b"]["p50_ms"] == pytest.approx(3.0)
    assert lat["a"]["p95_ms"] == pytest.approx(1.0)  # no 20 ms first call was timed
    assert log.count("a") == log.count("b") == 5 * (4 + 1)  # 4 timed + 1 untimed per turn, 5 rounds
    turns = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert turns == ["a", "b"] * 5


def test_benchmark_counts_multiply_adds_and_has_a_gemm_yardstick():
    from export.benchmark import fp32_gemm_gflops, macs_per_image

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert macs_per_image(conv, np.zeros((2, 3, 8, 8), np.float32)) == 8 * 3 * 3 * 3 * 8 * 8
    assert macs_per_image(torch.nn.Identity(), np.zeros((2, 3, 8, 8), np.float32)) is None
    assert fp32_gemm_gflops(threads=1, n=128, calls=2) > 0.1


def test_onnx_without_spec_and_escaping_external_data(tmp_path):
    from core.models import create_model, default_spec

    p = export_onnx(
        create_model("cnn_small", 2, 3, 16).eval(),
        default_spec("cnn_small", ("a", "b"), image_size=16),
        tmp_path / "plain.onnx",
    )
    with pytest.raises(UserError, match="no 'model_spec' metadata"):
        OnnxClassifier(p)
    m = onnx.load(str(p))
    init = m.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.ClearField("raw_data")
    init.external_data.add(key="location", value="../../etc/passwd")
    onnx.save(m, str(tmp_path / "evil.onnx"))
    with pytest.raises(UserError, match="outside"):
        check_external_data(tmp_path / "evil.onnx")
    with pytest.raises(UserError, match="outside"):
        OnnxClassifier(tmp_path / "evil.onnx")


def test_export_bad_inputs(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    assert run_cli(to_onnx.main, ["--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert run_cli(to_onnx.main, ["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "does not exist" in err


def test_imagenet_fallback_checkpoint_and_its_images(tmp_path, monkeypatch):
    """A fresh machine has no run: export/demo fall back to the offline ImageNet Lite0 and real sample photos."""
    from core.checkpoint import load_checkpoint
    from export import common

    monkeypatch.setattr(common, "IMAGENET_DIR", tmp_path / "imagenet")
    ck = load_checkpoint(common.imagenet_lite0_checkpoint())
    assert ck.spec.num_classes == 1000 and ck.spec.class_names[0] == "tench"
    calib, held, desc = common.data_for(ck, 8, 6)
    assert calib.x.shape == (8, 3, 224, 224) and held.x.shape == (6, 3, 224, 224)
    assert (held.y == -1).all() and "no labels" in desc
    assert not any(np.allclose(c, h) for c in calib.x for h in held.x)  # disjoint crops


def test_budget_gates():
    from export.gates import Budget, compare, fits

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 2)).astype(np.float32)
    labels = ref.argmax(1)  # fp32 is 100 % accurate here
    flipped = ref.copy()
    flipped[:3] = flipped[:3, ::-1]  # INT8 changes three predictions
    s = compare(ref, flipped, labels)
    assert s["agreement"] == 97.0 and s["drop"] == pytest.approx(3.0)
    assert not fits(s, Budget()) and fits(s, Budget(max_drop=3.0, min_agreement=97.0, max_class_drop=10.0))
    assert compare(ref, ref, labels)["worst_class_drop"] == 0.0 and fits(compare(ref, ref, labels), Budget())


@pytest.mark.parametrize("onnx_flips, ort_flips", [(0, 0), (0, 3), (3, 0), (2, 3), (1, 1)])
def test_a_model_run_by_two_runtimes_fits_only_where_both_do(onnx_flips, ort_flips):
    """core.gates.worst_of: the INT8 .onnx file and its .ort twin round differently; the search judges a candidate by
    the worse of the two on every criterion, never by the better."""
    from export.gates import Budget, compare, fits, worst_of

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(100, 3)).astype(np.float32)
    labels = ref.argmax(1)

    def flipped(n: int, start: int) -> np.ndarray:
        out = ref.copy()
        out[start : start + n] = np.roll(out[start : start + n], 1, axis=1)  # n predictions move to another class
        return out

    a, b = compare(ref, flipped(onnx_flips, 0), labels), compare(ref, flipped(ort_flips, 50), labels)
    both = worst_of(a, b)
    assert set(both) == set(a) and both["accuracy"] == min(a["accuracy"], b["accuracy"])
    assert both["agreement"] == 100 - max(onnx_flips, ort_flips)
    assert both["drop"] == max(a["drop"], b["drop"]) and both["worst_class_drop"] == max(
        a["worst_class_drop"], b["worst_class_drop"]
    )
    for budget in (Budget(), Budget(max_drop=2.0, min_agreement=97.0, max_class_drop=10.0)):
        assert fits(both, budget) == (fits(a, budget) and fits(b, budget))


@pytest.mark.parametrize("module", ["to_onnx", "quantize", "validate"])
def test_every_stage_reads_the_one_budget_default(module):
    import importlib

    from export.gates import Budget, budget_from

    mod = importlib.import_module(f"export.{module}")
    argv = ["--onnx", "m.onnx"] if module == "quantize" else []
    assert budget_from(mod.get_args_parser().parse_args(argv)) == Budget()
    args = mod.get_args_parser().parse_args([*argv, "--min-agreement", "101"])
    with pytest.raises(UserError, match="between 0 and 100"):
        budget_from(args)


@pytest.mark.parametrize("module", ["to_onnx", "quantize", "validate", "benchmark"])
def test_every_stage_reads_the_whole_held_out_split_by_default(module):
    """A 5-point class gate needs the rarest class's images: ELPV's 2/3 class has 27 of its 656 test images, 12 in a
    300-image sample (one flip 8.3 points). Every export CLI defaults to the whole split up to HELDOUT_IMAGES."""
    import importlib

    from export.common import HELDOUT_IMAGES, _stratified
    from training.data import Split

    mod = importlib.import_module(f"export.{module}")
    argv = ["--onnx", "m.onnx"] if module == "quantize" else []
    assert mod.get_args_parser().parse_args(argv).max_images == HELDOUT_IMAGES
    labels = [0] * 570 + [1] * 59 + [2] * 27  # ELPV's 656 test images, three classes for short
    split = Split(list(range(len(labels))), labels)
    assert _stratified(split, HELDOUT_IMAGES, "--max-images") == list(range(656))  # all of them, in order
    sample = _stratified(split, 300, "--max-images")
    assert len(sample) == 300 and sum(labels[i] == 2 for i in sample) in (12, 13)  # what 300 used to read
    big = Split(list(range(1500)), [0, 1, 2] * 500)
    assert len(_stratified(big, HELDOUT_IMAGES, "--max-images")) == 1000  # a larger split: a stratified sample


@pytest.mark.parametrize("asked, crops", [(0, 256), (6, 6), (1000, 256)])
def test_sample_photo_crops_stay_bounded_whatever_the_held_out_default(asked, crops):
    """The ImageNet fallback has no split to exhaust: its stand-in crops stop at SAMPLE_CROPS (a default of 1000
    would otherwise cut 1000 crops of two photos, ~600 MB at 224 px)."""
    from export.common import _crops

    assert _crops(asked) == crops


def test_runtime_needs_no_torch(exported_run):
    """The deployment runtime must work where torch is not installed: block its import and classify."""
    import subprocess
    import sys

    img = sorted((exported_run.parent.parent.parent / "data" / "circle").glob("*.png"))[0]
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "from export.runtime import OnnxClassifier\n"
        f"print(OnnxClassifier({str(exported_run / 'export/model.int8.onnx')!r}).classify({str(img)!r}, 1)[0][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() in {"blank", "circle", "stripes"}


def test_one_checkpoint_resolver_for_every_stage(workdir, monkeypatch):
    """runs/latest as a symlink or, where symlinks fail, the run named in runs/LATEST: training's tools and the
    export resolve the same file; only the export falls back to the pretrained model when there is no run."""
    from core.errors import UserError
    from export import common
    from training.runs import RUNS, resolve_checkpoint

    monkeypatch.setattr(common, "imagenet_lite0_checkpoint", lambda: workdir / "pretrained.pt")
    with pytest.raises(UserError, match="no trained model"):
        resolve_checkpoint(None)
    assert common.default_checkpoint(None) == workdir / "pretrained.pt"
    (RUNS / "r1").mkdir(parents=True)
    (RUNS / "r1" / "best.pt").write_bytes(b"weights")
    (RUNS / "LATEST").write_text("r1")
    assert resolve_checkpoint(None) == common.default_checkpoint(None) == RUNS / "r1" / "best.pt"
    assert (
        resolve_checkpoint(str(RUNS / "r1")) == common.default_checkpoint(str(RUNS / "r1")) == RUNS / "r1" / "best.pt"
    )


def test_the_retry_tries_the_two_closest_configurations_and_twins_only_uncorrected_ones():
    """With no candidate inside the budget the search retries with the leading layers in fp32: the two closest
    configurations by validation agreement (errors skipped), each uncorrected one with its QDQ/QOperator twin."""
    from core.quantization import MIXED, MIXED_7BIT, QConfig
    from export.quantize import FAST_SEARCH, retry_configs

    def rows(*agreements):
        return [
            {"config": c.name, "agreement": a} if a is not None else {"config": c.name, "error": "boom"}
            for c, a in zip(FAST_SEARCH, agreements, strict=True)
        ]

    assert FAST_SEARCH[:2] == (MIXED, MIXED_7BIT)
    # the partial finetune of the README: MIXED_7BIT closest, MIXED next; both corrected, no twins
    assert retry_configs(rows(96.96, 97.97, 94.93, 88.18, 88.18), FAST_SEARCH) == (MIXED_7BIT, MIXED)
    # plain QDQ closest: it and its QOperator twin, then MIXED; the QOperator row itself is not added twice
    qdq, qop = QConfig(), QConfig(fmt="QOperator")
    assert retry_configs(rows(95.0, 90.0, 91.0, 96.0, 96.0), FAST_SEARCH) == (qdq, qop)
    assert retry_configs(rows(95.0, 90.0, 91.0, 96.0, 80.0), FAST_SEARCH) == (qdq, qop, MIXED)
    # a candidate that failed to quantize is never retried
    assert retry_configs(rows(None, 90.0, 91.0, 80.0, 70.0), FAST_SEARCH) == (
        QConfig(reduce_range=True, corrected=True),
        MIXED_7BIT,
    )


@pytest.mark.slow
def test_covariance_pooled_transfer_model_exports_to_every_format_with_the_covariance_in_the_float_tail(
    workdir, tiny_folder
):
    """`--cov-taps`: the covariance pooling is part of the model, so every fp32 format answers like PyTorch; in the
    exported graph the centring, product and gather belong to the float tail that MIXED keeps in fp32, so its INT8
    model multiplies the unrounded, centred block output, as --int8-aware trained against."""
    from core.quantization import tail_nodes
    from training import train

    argv = ["--data", str(tiny_folder), "--mode", "transfer", "--model", "efficientnet_lite0", "--epochs", "1"]
    assert run_cli(train.main, [*argv, "--cov-taps", "14", "--name", "cov"]) == 0
    run = workdir / "artifacts/runs/cov"
    assert json.loads((run / "meta.json").read_text())["spec"]["arch_kwargs"]["cov_taps"] == [14]
    budget = ["--min-agreement", "90", "--max-drop", "10", "--max-class-drop", "30"]  # a toy model's INT8 accuracy
    assert one_shot(run, "--no-benchmark", *budget) == 0
    rep = json.loads((run / "export/report.json").read_text())
    rows = {r["artifact"]: r for r in rep["artifacts"]}
    for name in ("onnx_fp32", "torchscript", "torchscript_mobile", "executorch", "litert"):
        assert rows[name]["agreement"] == 100.0 and rows[name]["max_abs_diff"] <= 1e-4, name
    assert rows["onnx_int8"]["passed"]
    fp = onnx.load(str(run / "export/model.onnx"))
    kind = {n.name: n.op_type for n in fp.graph.node}
    (matmul,) = [n for n in fp.graph.node if n.op_type == "MatMul"]  # the covariance's product
    tail = set(tail_nodes(fp))
    assert matmul.name in tail and {"Sub", "Transpose", "Gather", "Div"} <= {kind[t] for t in tail}
    assert not any(kind[t] in ("Conv", "Add", "Clip") for t in tail)
