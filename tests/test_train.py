import csv
import json

import pytest

from core.errors import run_cli
from tests.conftest import CLASSES, make_folder
from training import evaluate, predict, train

FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--no-progress"]


def run_train(*argv: str) -> int:
    return run_cli(train.main, [*argv, *FAST])


def run_scratch(folder, *argv: str) -> int:
    """The cheapest real training run: cnn_small from scratch on a generated folder."""
    return run_train("--data", str(folder), "--mode", "scratch", "--model", "cnn_small", *argv)


def read_history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("mode", "model"),
    [("scratch", "cnn_small"), ("finetune", "efficientnet_lite0"), ("transfer", "efficientnet_lite0")],
)
def test_each_mode_trains_and_writes_a_self_describing_run(workdir, tiny_folder, mode, model):
    assert run_train("--data", str(tiny_folder), "--mode", mode, "--model", model, "--epochs", "1", "--name", "r") == 0
    run = workdir / "artifacts/runs/r"
    for f in (
        "best.pt",
        "last.pt",
        "resume.pt",
        "meta.json",
        "metrics.json",
        "history.csv",
        "curves.png",
        "confusion_matrix.png",
    ):
        assert (run / f).is_file(), f
    meta = json.loads((run / "meta.json").read_text())
    assert meta["spec"]["class_names"] == sorted(CLASSES) and meta["spec"]["arch"] == model
    assert meta["class_to_idx"] == {c: i for i, c in enumerate(sorted(CLASSES))}
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval_split"] == "val" and 0.0 <= m["accuracy"] <= 1.0 and m["params"] > 0
    assert set(m["per_class_accuracy"]) == set(CLASSES)
    assert (workdir / "artifacts/runs/latest/best.pt").is_file()
    assert m["unreadable_files"] == 1  # notes.jpg is text: dropped at scan time
    if mode != "transfer":  # image path: the truncated JPEG fails mid-epoch, is counted, the epoch survives
        assert int(read_history(run)[0]["skipped"]) + m["skipped"] >= 1


def test_scratch_learns_the_synthetic_task(workdir, tiny_folder):
    assert (
        run_scratch(
            tiny_folder,
            "--epochs",
            "12",
            "--lr",
            "0.01",
            "--name",
            "learn",
        )
        == 0
    )
    assert float(read_history(workdir / "artifacts/runs/learn")[-1]["train_acc"]) > 0.8


def test_resume_continues_at_the_right_epoch_and_lr(workdir, tiny_folder):
    common = [
        "--data",
        str(tiny_folder),
        "--mode",
        "scratch",
        "--model",
        "cnn_small",
        "--deterministic",
        "--augment",
        "basic",
    ]
    assert run_train(*common, "--epochs", "4", "--name", "full") == 0
    assert run_train(*common, "--epochs", "2", "--name", "part") == 0
    # same schedule length: resume the 2-epoch run up to 4 epochs with the original --epochs recorded
    state_args = json.loads((workdir / "artifacts/runs/part/meta.json").read_text())["args"]
    assert state_args["epochs"] == 2
    assert run_train(*common, "--epochs", "4", "--resume", "part") == 0
    full, part = read_history(workdir / "artifacts/runs/full"), read_history(workdir / "artifacts/runs/part")
    assert [int(r["epoch"]) for r in part] == [1, 2, 3, 4]
    assert float(part[3]["lr"]) == pytest.approx(float(full[3]["lr"]))


def test_resume_refuses_changed_options(workdir, tiny_folder, capsys):
    assert (
        run_scratch(
            tiny_folder,
            "--epochs",
            "1",
            "--name",
            "a",
        )
        == 0
    )
    code = run_train(
        "--data",
        str(tiny_folder),
        "--mode",
        "scratch",
        "--model",
        "cnn_medium",
        "--epochs",
        "2",
        "--resume",
        "a",
    )
    assert code == 2 and "changed options ['model']" in capsys.readouterr().err


def test_config_file_sets_options_and_flags_override(workdir, tiny_folder):
    cfg = workdir / "cfg.yaml"
    cfg.write_text(f"data: {tiny_folder}\nmodel: cnn_small\nmode: scratch\nepochs: 1\nlr: 0.5\n")
    assert run_train("--config", str(cfg), "--lr", "0.003", "--name", "c") == 0
    args = json.loads((workdir / "artifacts/runs/c/meta.json").read_text())["args"]
    assert args["model"] == "cnn_small" and args["epochs"] == 1 and args["lr"] == 0.003


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ("none", ["--data", "missing_dir"], "does not exist"),
        ("empty", ["--data", "empty"], "is empty"),
        ("emptyclass", ["--data", "data"], "has no readable images"),
        ("folder", ["--data", "data", "--model", "resnet19"], "did you mean resnet18"),
        ("folder", ["--data", "data", "--mode", "scratch", "--weights", "DEFAULT"], "makes no sense"),
        ("folder", ["--data", "data", "--mode", "transfer", "--model", "cnn_small"], "no pretrained weights"),
        ("badcfg", ["--config", "cfg.yaml"], "unknown options"),
        ("folder", ["--data", "data", "--resume", "nothing"], "nothing to resume"),
    ],
)
def test_bad_input_is_one_clear_line(workdir, capsys, setup, argv, message):
    if setup == "empty":
        (workdir / "empty").mkdir()
    if setup in ("folder", "emptyclass"):
        make_folder(workdir / "data", per_class=3, odd_files=False)
    if setup == "emptyclass":
        (workdir / "data" / "ghost").mkdir()
    if setup == "badcfg":
        (workdir / "cfg.yaml").write_text("epoch: 3\n")
    assert run_train(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and len(err.splitlines()) == 1
    assert not (workdir / "artifacts/runs/latest").exists()


@pytest.fixture
def trained(workdir, tiny_folder):
    assert (
        run_scratch(
            tiny_folder,
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--name",
            "t",
        )
        == 0
    )
    return workdir / "artifacts/runs/t"


def test_evaluate_prints_report_and_writes_outputs(trained, capsys):
    assert run_cli(evaluate.main, ["--split", "val", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "Per-class accuracy:" in out and "Confusion matrix" in out and "precision" in out
    m = json.loads((trained / "eval/metrics.json").read_text())
    assert m["n"] > 0 and len(m["confusion_matrix"]) == 3 and (trained / "eval/confusion_matrix.png").is_file()


def test_evaluate_refuses_mismatched_classes(trained, workdir, capsys):
    for c in ("x", "y"):
        (workdir / "other" / c).mkdir(parents=True)
        for i in range(2):
            (workdir / "other" / c / f"{i}.png").write_bytes(_png())
    assert run_cli(evaluate.main, ["--data", str(workdir / "other"), "--workers", "0"]) == 2
    assert "do not match" in capsys.readouterr().err


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_evaluate_refuses_non_checkpoint(workdir, capsys):
    (workdir / "x.pt").write_text("nope")
    assert run_cli(evaluate.main, ["--checkpoint", str(workdir / "x.pt")]) == 2
    assert "not a PyTorch" in capsys.readouterr().err


def test_predict_topk_json_grid_and_bad_file(trained, tiny_folder, workdir, capsys):
    good = tiny_folder / "circle" / "000.png"
    argv = [
        str(good),
        str(tiny_folder / "blank" / "truncated.jpg"),
        "--topk",
        "2",
        "--json",
        str(workdir / "p.json"),
        "--grid",
        str(workdir / "g.png"),
    ]
    assert run_cli(predict.main, argv) == 1  # one file failed: non-zero, but the others were answered
    res = json.loads((workdir / "p.json").read_text())
    assert len(res[0]["top"]) == 2 and res[0]["top"][0]["prob"] >= res[0]["top"][1]["prob"]
    assert "corrupt or truncated" in res[1]["error"]
    assert (workdir / "g.png").is_file()
    assert run_cli(predict.main, [str(tiny_folder / "circle"), "--topk", "1"]) == 0
    assert capsys.readouterr().out.count("circle/") >= 10


def test_torchvision_weights_offline_give_clear_error(workdir, tiny_folder, monkeypatch, capsys):
    import urllib.error

    import torch

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(workdir / "torch-home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert run_train("--data", str(tiny_folder), "--model", "resnet18", "--mode", "finetune") == 2
    err = capsys.readouterr().err
    assert "cannot download resnet18 weights" in err and "resnet18-f37072fd.pth" in err and "--weights" in err
    assert not (workdir / "artifacts/runs").exists()  # nothing half-written


def test_torchvision_weights_from_file(workdir, tiny_folder):
    import torch
    import torchvision

    torch.save(torchvision.models.mobilenet_v2().state_dict(), workdir / "mnv2.pth")
    assert (
        run_train(
            "--data",
            str(tiny_folder),
            "--model",
            "mobilenet_v2",
            "--mode",
            "transfer",
            "--weights",
            str(workdir / "mnv2.pth"),
            "--epochs",
            "1",
            "--name",
            "w",
        )
        == 0
    )
    assert json.loads((workdir / "artifacts/runs/w/meta.json").read_text())["args"]["weights"].endswith("mnv2.pth")
