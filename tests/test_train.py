import csv
import io
import json
import re
import sys
import time

import pytest
import torch

from core.errors import run_cli
from tests.conftest import CLASSES, make_folder, train_argv
from training import evaluate, predict, train


def run_train(*argv: str, **options) -> int:
    return run_cli(train.main, train_argv(None, *argv, **options))


def run_scratch(folder, **options) -> int:
    """The cheapest real training run: cnn_small from scratch on a generated folder."""
    return run_cli(train.main, train_argv(folder, **options))


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
    # an EfficientNet-Lite transfer run pools the covariance of stage 6's end too (--cov-taps auto); others do not
    assert meta["spec"]["arch_kwargs"].get("cov_taps") == ([14] if mode == "transfer" else None)
    assert meta["class_to_idx"] == {c: i for i, c in enumerate(sorted(CLASSES))}
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval_split"] == "val" and m["params"] > 0
    cm = m["confusion_matrix"]  # the figures are the confusion matrix's, row = true class
    assert abs(m["accuracy"] - sum(cm[i][i] for i in range(len(cm))) / sum(map(sum, cm))) < 1e-9
    per_class = [cm[i][i] / sum(cm[i]) for i in range(len(cm)) if sum(cm[i])]
    assert abs(m["balanced_accuracy"] - sum(per_class) / len(per_class)) < 1e-9
    assert set(m["per_class_accuracy"]) == set(CLASSES)
    assert (workdir / "artifacts/runs/latest/best.pt").is_file()
    assert m["unreadable_files"] == 1  # notes.jpg is text: dropped at scan time
    if mode != "transfer":  # image path: the truncated JPEG fails mid-epoch, is counted, the epoch survives
        assert int(read_history(run)[0]["skipped"]) + m["skipped"] >= 1


def test_scratch_learns_the_synthetic_task(workdir, tiny_folder):
    assert run_scratch(tiny_folder, epochs=12, lr=0.01, name="learn") == 0
    assert float(read_history(workdir / "artifacts/runs/learn")[-1]["train_acc"]) > 0.8


def test_resume_continues_at_the_right_epoch_and_lr(workdir, tiny_folder):
    common = {"deterministic": True, "augment": "basic"}
    assert run_scratch(tiny_folder, **common, epochs=4, name="full") == 0
    assert run_scratch(tiny_folder, **common, epochs=2, name="part") == 0
    # same schedule length: resume the 2-epoch run up to 4 epochs with the original --epochs recorded
    state_args = json.loads((workdir / "artifacts/runs/part/meta.json").read_text())["args"]
    assert state_args["epochs"] == 2
    assert run_scratch(tiny_folder, **common, epochs=4, resume="part") == 0
    full, part = read_history(workdir / "artifacts/runs/full"), read_history(workdir / "artifacts/runs/part")
    assert [int(r["epoch"]) for r in part] == [1, 2, 3, 4]
    assert float(part[3]["lr"]) == pytest.approx(float(full[3]["lr"]))


def test_resume_refuses_changed_options(workdir, tiny_folder, capsys):
    assert run_scratch(tiny_folder, name="a") == 0
    code = run_scratch(tiny_folder, model="cnn_medium", epochs=2, resume="a")
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
    assert run_scratch(tiny_folder, epochs=3, lr=0.01, name="t") == 0
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


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _slow_batches(n: int, seconds: float):
    for _ in range(n):
        time.sleep(seconds)
        yield torch.randn(4, 3), torch.randint(0, 2, (4,)), 0


def test_progress_bar_counts_batches_on_a_terminal(monkeypatch):
    """The transfer bar stood at 0/53 while loss and accuracy moved: a postfix redraw showed tqdm's stale count."""
    from training.engine import train_one_epoch

    term = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = list(_slow_batches(12, 0.0))

    class Slow:  # 12 batches over ~0.6 s: several redraws at tqdm's 0.1 s interval
        def __len__(self):
            return len(loader)

        def __iter__(self):
            for b in loader:
                time.sleep(0.05)
                yield b

    train_one_epoch(model, Slow(), opt, sched, torch.nn.CrossEntropyLoss(), torch.device("cpu"), "epoch 1/1")
    frames = [f for f in re.split(r"[\r\n]", term.getvalue()) if "/12" in f]
    with_loss = [f for f in frames if "loss=" in f]
    assert with_loss, frames
    counts = [int(re.search(r"(\d+)/12", f).group(1)) for f in with_loss]
    assert min(counts) >= 1 and max(counts) > 1, frames  # every drawn loss comes with the batches it covers


def test_no_progress_bar_when_output_is_not_a_terminal(monkeypatch):
    from training.engine import progress_bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(range(3), "x", True).disable
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    assert not progress_bar(range(3), "x", True).disable
    assert progress_bar(range(3), "x", False).disable


def test_benchmark_summarises_seeds_as_mean_and_sample_std():
    from training.benchmark import summary_rows

    rows = [
        {
            "config": "--mode transfer",
            "seed": s,
            "wall_s": w,
            "accuracy": a,
            "balanced": b,
            "val": v,
            "val_balanced": vb,
        }
        for s, w, a, b, v, vb in [
            (0, 180, 76.0, 50.0, 81.0, 55.0),
            (1, 60, 78.0, 52.0, 82.0, 58.0),
            (2, 60, 80.0, 54.0, 83.0, 61.0),
        ]
    ]
    rows.append({"config": "--mode transfer", "seed": 3, "wall_s": 5, "error": "boom"})  # failed runs are left out
    (line,) = summary_rows(rows)
    assert "| 3 |" in line and "3.0 min (cold), 1.0 min (warm)" in line
    assert "78.00 ± 2.00 %" in line and "52.00 ± 2.00 %" in line  # ddof=1
    assert line.index("82.00 ± 1.00 %") < line.index("58.00 ± 3.00 %") < line.index("78.00 ± 2.00 %")  # val first


def test_symmetric_views_are_the_eight_symmetries_of_a_square():
    import numpy as np

    from training.features import VIEW_ORDER, symmetric_view

    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    symmetries, with_jitter = VIEW_ORDER[8]
    assert not with_jitter and VIEW_ORDER[16] == (symmetries, True)  # 16 = the same 8 of the image and of its copy
    views = [symmetric_view(x, k) for k in symmetries]
    assert len({v.tobytes() for v in views}) == 8  # all distinct
    assert np.array_equal(views[0], x) and np.array_equal(views[4], x[..., ::-1])
    assert np.array_equal(views[1], np.rot90(x, 1, axes=(2, 3)))
    for v in views:  # a permutation of each channel's pixels, nothing else: same values, batch and channel kept
        assert v.flags["C_CONTIGUOUS"] and v.shape == x.shape
        assert np.array_equal(np.sort(v.reshape(2, 3, -1)), np.sort(x.reshape(2, 3, -1)))


def test_jittered_views_are_the_symmetries_of_one_borderless_reproducible_copy():
    import numpy as np

    from training.features import cached_views, jittered, symmetric_view

    rng = np.random.default_rng(0)
    x = rng.uniform(-0.9, 0.9, (3, 3, 40, 40)).astype(np.float32)
    j = jittered(x)
    assert j.shape == x.shape and j.dtype == x.dtype and np.all(np.abs(j) <= 1.0)
    assert np.array_equal(j, jittered(x.copy()))  # seeded by the image's numbers: the INT8 cache sees the same copy
    assert np.array_equal(jittered(x[1:2]), j[1:2])  # ... whatever batch the image comes in
    assert all(not np.allclose(a, b, atol=0.05) for a, b in zip(j, x, strict=True))  # each image is changed
    assert len({float(np.std(a) / np.std(b)) for a, b in zip(j, x, strict=True)}) == 3  # by its own draw
    flat = np.full((2, 3, 40, 40), 0.2, np.float32)  # zoom-in only: a uniform image stays uniform (no black edge)
    assert all(np.ptp(a) < 1e-6 for a in jittered(flat))
    views = list(cached_views(x, 16))
    assert len({v.tobytes() for v in views}) == 16
    for k in range(8):
        assert np.array_equal(views[k], symmetric_view(x, k)) and np.array_equal(views[8 + k], symmetric_view(j, k))


def test_feature_cache_key_changes_with_every_option_that_changes_the_arrays(tiny_folder):
    from dataclasses import replace

    from core.spec import ModelSpec
    from training.data import load_source
    from training.features import cache_key

    split = load_source(str(tiny_folder)).train
    kw = {"head": "linear", "dropout": None, "hidden": 256, "taps": [], "pool": "mean"}
    spec = ModelSpec(
        "efficientnet_lite0", CLASSES, image_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, crop="squash"
    ).replace(arch_kwargs=kw)
    base = cache_key(spec, "imagenet", split)
    assert len({base, *(cache_key(spec, "imagenet", split, views=v) for v in (2, 8, 16))}) == 4
    assert cache_key(spec, "imagenet", split, stop=12) != base != cache_key(spec, "imagenet", split, stop=13)
    assert cache_key(spec, None, split) != base
    head_only = replace(spec, arch_kwargs={**kw, "head": "mlp", "hidden": 64})
    assert cache_key(head_only, "imagenet", split) == base  # the head is not in the cached part
    pooled = replace(spec, arch_kwargs={**kw, "pool": "meanmax"})
    assert cache_key(pooled, "imagenet", split) != base  # transfer caches pooled features
    assert cache_key(pooled, "imagenet", split, stop=12) == cache_key(spec, "imagenet", split, stop=12)
    cov = replace(spec, arch_kwargs={**kw, "cov_taps": [14]})
    assert cache_key(cov, "imagenet", split) != base  # ... and their covariances
    assert cache_key(replace(spec, arch_kwargs={**kw, "cov_taps": [10]}), "imagenet", split) != cache_key(
        cov, "imagenet", split
    )
    assert cache_key(cov, "imagenet", split, stop=12) == cache_key(spec, "imagenet", split, stop=12)  # after the cut


@pytest.mark.parametrize("views", ["8", "16"])
def test_partial_finetune_trains_only_the_blocks_after_the_cut(workdir, tiny_folder, views):
    import numpy as np

    from core.checkpoint import load_checkpoint
    from core.models import create_model

    argv = ["--data", str(tiny_folder), "--mode", "finetune", "--model", "efficientnet_lite0", "--epochs", "2"]
    assert run_train(*argv, "--trainable-from", "12", "--views", views, "--lr", "0.01", "--name", "p") == 0
    run = workdir / "artifacts/runs/p"
    ck = load_checkpoint(run / "best.pt")
    ref = create_model("efficientnet_lite0", 3, 3, 32, "imagenet", keep_pretrained_head=False, **ck.spec.arch_kwargs)
    ref_sd = ref.state_dict()
    frozen = [k for k in ck.state_dict if k.startswith(("backbone._conv_stem", "backbone._bn0"))]
    frozen += [k for k in ck.state_dict for b in range(12) if k.startswith(f"backbone._blocks.{b}.")]
    trained = [k for k in ck.state_dict if k.startswith("backbone._blocks.13.") and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(ck.state_dict[k], ref_sd[k]) for k in frozen)  # weights and BN statistics untouched
    assert any(not torch.equal(ck.state_dict[k], ref_sd[k]) for k in trained)
    cache = workdir / "artifacts/cache/features"
    (train_cache,) = cache.glob(f"*train-upto12-{views}views-*.npz")
    assert list(cache.glob("*val-upto12-*.npz"))
    with np.load(train_cache) as z:  # [images, views, channels, h, w]: every view of every image
        assert z["x"].shape[:2] == (len(z["y"]), int(views)) and len({z["x"][0, k].tobytes() for k in range(8)}) == 8
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] > 0 and "balanced_accuracy" in m
    # the checkpoint is an ordinary whole model: it predicts from images like any other run
    assert run_cli(predict.main, [str(next(tiny_folder.glob("circle/*.png"))), "--checkpoint", str(run)]) == 0


@pytest.mark.parametrize("cut", [None, "12"])
def test_channels_last_is_the_default_training_layout_and_trains_the_same_model(workdir, tiny_folder, cut):
    from core.checkpoint import load_checkpoint

    argv = ["--data", str(tiny_folder), "--mode", "finetune", "--model", "efficientnet_lite0", "--epochs", "1"]
    argv += ["--deterministic", "--augment", "none", *(["--trainable-from", cut] if cut else [])]
    assert run_train(*argv, "--name", "cl") == 0
    assert run_train(*argv, "--no-channels-last", "--name", "plain") == 0
    runs = {n: workdir / "artifacts/runs" / n for n in ("cl", "plain")}
    cl, plain = (load_checkpoint(runs[n] / "last.pt").state_dict for n in ("cl", "plain"))
    conv = "backbone._conv_stem.weight"  # 3 x 3 over 3 channels: the two layouts differ (a 1 x 1 would be both)
    assert cl[conv].is_contiguous(memory_format=torch.channels_last) and not cl[conv].is_contiguous()
    assert plain[conv].is_contiguous()
    # the same training up to float summation order (Adam turns tiny gradient differences into lr-sized steps)
    assert all(torch.allclose(cl[k].float(), plain[k].float(), rtol=1e-2, atol=1e-2) for k in plain)
    losses = [[float(r["train_loss"]) for r in read_history(runs[n])] for n in ("cl", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert json.loads((runs["plain"] / "meta.json").read_text())["args"]["channels_last"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "transfer", "--trainable-from", "12"], "use it with --mode finetune"),
        (["--mode", "finetune", "--model", "resnet18", "--trainable-from", "2"], "resnet18 is not one"),
        (["--mode", "finetune", "--trainable-from", "16"], "block index from 1 to 15"),
        (["--mode", "finetune", "--trainable-from", "12", "--augment", "basic"], "image augmentation cannot"),
        (["--mode", "finetune", "--trainable-from", "12", "--taps", "4,14"], "--taps [4] lie in the frozen"),
        (["--mode", "finetune", "--trainable-from", "12", "--cov-taps", "10,14"], "--cov-taps [10] lie in the frozen"),
        (["--mode", "transfer", "--cov-taps", "last"], "--cov-taps 'last': give block indices"),
        (["--mode", "transfer", "--cov-taps", "16"], "block indices < 16"),
        (["--mode", "scratch", "--model", "cnn_small", "--cov-taps", "1"], "an EfficientNet-Lite option"),
        (["--mode", "scratch", "--model", "cnn_small", "--views", "8"], "--views applies to cached features"),
        (["--mode", "transfer", "--bn-momentum", "0.1"], "--mode transfer trains only the head"),
        (["--mode", "scratch", "--model", "cnn_small", "--bn-momentum", "1.5"], "--bn-momentum 1.5 is outside (0, 1]"),
    ],
)
def test_partial_finetune_options_are_refused_where_they_do_not_apply(workdir, tiny_folder, capsys, argv, message):
    assert run_train("--data", str(tiny_folder), "--epochs", "1", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_int8_aware_partial_finetune_draws_half_its_samples_from_the_int8_prefix(workdir, tiny_folder):
    import numpy as np

    from training.features import FeatureLoader

    argv = ["--data", str(tiny_folder), "--mode", "finetune", "--model", "efficientnet_lite0", "--epochs", "1"]
    assert run_train(*argv, "--trainable-from", "12", "--views", "2", "--int8-aware", "--name", "q") == 0
    cache = workdir / "artifacts/cache/features"
    (int8,) = cache.glob("*train-upto12-2views-int8-*.npz")
    (fp32,) = [p for p in cache.glob("*train-upto12-2views-*.npz") if "int8" not in p.name]
    a, b = np.load(fp32)["x"].astype(np.float32), np.load(int8)["x"].astype(np.float32)
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 0.5 * np.abs(a).mean()  # INT8 numbers, same features
    n = 400
    x = np.stack([np.full((n, 3), 1, np.float16), np.full((n, 3), 2, np.float16)], 1)  # view k holds k + 1
    loader = FeatureLoader(x, np.zeros(n, np.int64), 64, list(range(n)), 2, 7, alt=-x)  # the "INT8" copy is negative
    seen = torch.cat([xb for xb, _, _ in loader])[:, 0]
    assert set(seen.tolist()) == {1.0, 2.0, -1.0, -2.0}  # both views, from both sources
    assert 0.4 < (seen < 0).float().mean() < 0.6
    again = torch.cat([xb for xb, _, _ in FeatureLoader(x, np.zeros(n, np.int64), 64, list(range(n)), 2, 7, alt=-x)])
    assert torch.equal(again[:, 0], seen)  # seeded: a resumed epoch draws the same samples


def test_tied_drop_gives_stacked_copies_the_same_stochastic_depth_draws():
    """tied_drop(module, 2): a training batch of two stacked copies of B inputs drops the same residual branches in
    both copies (the copies' outputs are equal); untied, they are drawn apart; outside the context the tie is gone."""
    from core.models import create_model
    from core.models.efficientnet_lite import tied_drop

    torch.manual_seed(0)
    backbone = create_model("efficientnet_lite0", 3, 3, 32, None, keep_pretrained_head=False).backbone.train()
    for b in backbone._blocks:
        b.drop = 0.5  # many dropped branches, so untied copies surely differ
    h = backbone.prefix(torch.randn(6, 3, 64, 64), 11).detach()
    pair = torch.cat([h, h])
    with tied_drop(backbone, 2):
        a, b = backbone(pair, 11).split(6)
    assert torch.allclose(a, b, atol=1e-5)
    a, b = backbone(pair, 11).split(6)
    assert not torch.allclose(a, b, atol=1e-3)
    assert all(m.tie == 1 for m in backbone._blocks)
    backbone.eval()
    with tied_drop(backbone, 2):  # evaluation drops nothing: the tie changes no number
        assert torch.equal(backbone(h, 11), backbone.eval()(h, 11))


def test_int8_consistency_in_a_partial_finetune_runs_the_suffix_on_both_copies():
    """Int8Consistency with a backbone and a cut: [B, 2, C, H, W] batches go through blocks[start:] and the head
    together; the fp32 copy gives the logits, the penalty is the centred squared logit difference between the
    copies (zero for identical copies even with dropout and stochastic depth on); [B, C, H, W] passes through."""
    from core.models import create_model
    from core.models.efficientnet_lite import Suffix
    from training.engine import Int8Consistency

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, 3, 32, None, keep_pretrained_head=False, dropout=0.5)
    h = model.backbone.prefix(torch.randn(4, 3, 64, 64), 11).detach()
    m = Int8Consistency(model.head, 3.0, model.backbone, 11).train()
    assert m(torch.stack([h, h], 1)).shape == (4, 3) and m.penalty.item() == 0.0
    noise = 0.3 * torch.randn_like(h)
    m.eval()
    m(torch.stack([h, h + noise], 1))
    d = model.head(model.backbone(h, 11)) - model.head(model.backbone(h + noise, 11))
    expected = 3.0 * (d - d.mean(1, keepdim=True)).pow(2).mean()
    assert m.penalty.item() == pytest.approx(expected.item(), rel=1e-4) and expected.item() > 0
    m.penalty = None
    assert torch.equal(m(h), Suffix(model.backbone, model.head, 11)(h)) and m.penalty is None
    names = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert names == {"backbone", "head"}  # the optimizer's backbone learning-rate scale still applies


def test_int8_consistency_pairs_a_partial_finetune_when_asked(workdir, tiny_folder, monkeypatch):
    """--int8-aware --int8-consistency W in a partial finetune: every training batch holds each image's fp32 and
    INT8 prefix output side by side and the loss carries the penalty; without it the samples alternate."""
    from training import engine

    shapes = []
    forward = engine.Int8Consistency.forward
    monkeypatch.setattr(engine.Int8Consistency, "forward", lambda m, x: shapes.append(x.ndim) or forward(m, x))
    argv = ["--data", str(tiny_folder), "--mode", "finetune", "--model", "efficientnet_lite0", "--epochs", "1"]
    argv += ["--trainable-from", "12", "--views", "2", "--int8-aware"]
    assert run_train(*argv, "--int8-consistency", "50", "--name", "paired") == 0
    assert 5 in shapes and 4 in shapes  # paired training batches, plain evaluation batches
    args = json.loads((workdir / "artifacts/runs/paired/meta.json").read_text())["args"]
    assert args["int8_consistency"] == 50.0 and args["int8_aware"] is True
    shapes.clear()
    assert run_train(*argv, "--name", "alternating") == 0
    assert shapes == []  # the default (0): no pairing module at all


def test_a_partial_finetune_recorded_before_pairing_existed_resumes_unpaired(workdir, tiny_folder, capsys):
    """Its resume.pt says --int8-consistency 50 (then ignored by a partial finetune): it resumes as it trained,
    and asking for pairing on resume is refused as a changed option."""
    argv = ["--data", str(tiny_folder), "--mode", "finetune", "--model", "efficientnet_lite0", "--epochs", "2"]
    argv += ["--trainable-from", "12", "--views", "2", "--int8-aware"]
    assert run_train(*argv, "--name", "old") == 0
    resume = workdir / "artifacts/runs/old/resume.pt"
    state = torch.load(resume, weights_only=True)
    state["epoch"], state["history"], state["args"]["int8_consistency"] = 1, state["history"][:1], 50.0
    state["format"] = 1  # as resume.pt files written before pairing
    torch.save(state, resume)
    assert run_train(*argv, "--resume", "old", "--int8-consistency", "50") == 2
    assert "int8_consistency=0.0" in capsys.readouterr().err
    assert run_train(*argv, "--resume", "old") == 0
    assert [r["epoch"] for r in read_history(workdir / "artifacts/runs/old")] == ["1", "2"]


def test_int8_aware_prefix_trains_against_the_exports_lead_and_boundary(tmp_path):
    """A partial finetune's frozen prefix is quantized with the export's fp32 lead counted over the whole network
    and keeps the Q/DQ pair on its output (exactness: tests/test_int8_correction.py); the whole backbone (transfer)
    keeps the export's configuration as is; a prefix inside the lead has no INT8 part and is refused."""
    import onnx

    from core.errors import UserError
    from core.models import create_model
    from core.models.efficientnet_lite import Prefix
    from core.onnx_export import torch_to_onnx
    from core.quantization import int8_aware_config, leading_nodes
    from training.features import conv_count, int8_part_config

    backbone = create_model("efficientnet_lite0", 4, 3, 64).backbone.eval()

    def graph(m, name):
        torch_to_onnx(m, torch.zeros(1, 3, 64, 64), tmp_path / name, {0: "batch"}, 17, dynamo=False)
        return onnx.load(str(tmp_path / name))

    def convs(g, lead):
        return [n for n in leading_nodes(g, lead) if n.endswith("Conv")]

    whole, part = graph(backbone, "whole.onnx"), graph(Prefix(backbone, 11), "part.onnx")
    n_whole, n_part = (sum(n.op_type == "Conv" for n in g.graph.node) for g in (whole, part))
    assert (conv_count(backbone), conv_count(Prefix(backbone, 11))) == (n_whole, n_whole) == (49, 49)
    assert int8_part_config(49, 49) == (int8_aware_config(), False)  # transfer: the whole backbone
    cfg, boundary = int8_part_config(49, n_part)
    assert boundary and n_part == 33 and cfg.float_lead != int8_aware_config().float_lead
    assert convs(part, cfg.float_lead) == convs(whole, int8_aware_config().float_lead)
    assert len(convs(part, cfg.float_lead)) == 6  # stem, block 0, block 1
    with pytest.raises(UserError, match=r"--int8-aware: the fp32 lead .* freeze more blocks"):
        int8_part_config(49, 6)  # --trainable-from 2: stem, block 0, block 1 are all of the frozen part


def test_int8_aware_prefix_inside_the_exports_fp32_lead_is_refused_before_a_run_exists(workdir, tiny_folder, capsys):
    argv = ["--data", str(tiny_folder), "--mode", "finetune", "--model", "efficientnet_lite0", "--epochs", "1"]
    assert run_train(*argv, "--trainable-from", "2", "--int8-aware", "--name", "short") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "freeze more blocks (--trainable-from) or drop --int8-aware" in err[0]
    assert not (workdir / "artifacts/runs/short").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "transfer", "--no-feature-cache"],
        ["--mode", "transfer", "--augment", "basic"],
        ["--mode", "finetune"],
    ],
)
def test_int8_aware_needs_cached_frozen_features(workdir, tiny_folder, capsys, argv):
    base = ["--data", str(tiny_folder), "--model", "efficientnet_lite0", "--int8-aware", "--epochs", "1"]
    assert run_train(*base, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8-aware trains on the cached INT8 output of the frozen part" in err[0]


def test_int8_aware_transfer_trains_the_head_on_the_int8_backbone_too(workdir, tiny_folder):
    import numpy as np

    argv = ["--data", str(tiny_folder), "--mode", "transfer", "--model", "efficientnet_lite0", "--epochs", "1"]
    assert run_train(*argv, "--int8-aware", "--name", "t") == 0
    cache = workdir / "artifacts/cache/features"
    (int8,) = cache.glob("*-train-int8-*.npz")
    (fp32,) = [p for p in cache.glob("*-train-*.npz") if "int8" not in p.name]
    a, b = np.load(fp32)["x"], np.load(int8)["x"]
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 0.5 * np.abs(a).mean()  # INT8 numbers, same features
    assert json.loads((workdir / "artifacts/runs/t/meta.json").read_text())["args"]["int8_aware"] is True


@pytest.mark.parametrize(
    ("argv", "on"),
    [
        ([], True),  # the default: EfficientNet-Lite0 transfer on cached features
        (["--model", "efficientnet_lite1"], True),
        (["--no-int8-aware"], False),
        (["--model", "resnet18"], False),  # measured on Lite only: pass --int8-aware
        (["--augment", "basic"], False),  # no cached features to pair
        (["--no-feature-cache"], False),
        (["--mode", "finetune"], False),
        (["--mode", "finetune", "--trainable-from", "11", "--int8-aware"], True),
    ],
)
def test_int8_aware_default_is_on_where_the_export_trains_against_it(argv, on):
    from training.cli import parse_args

    args = parse_args(["--mode", "transfer", *argv])
    pairs = 0.0 if "--trainable-from" in argv else 50.0  # a partial finetune pairs only when asked (twice the cost)
    assert args.int8_aware is on and args.int8_consistency == pairs
    assert parse_args(["--mode", "transfer", *argv, "--int8-consistency", "20"]).int8_consistency == 20.0


def test_int8_consistency_must_not_be_negative(workdir, tiny_folder, capsys):
    assert run_train("--data", str(tiny_folder), "--mode", "transfer", "--int8-consistency", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8-consistency -1.0 is negative" in err[0]


def test_int8_consistency_penalises_decision_changes_only():
    """Paired [B, 2, F] batches: fp32 logits out, penalty on the centred difference of the dropout-free logits;
    a shift of every logit (no decision changes) costs nothing; plain [B, F] batches pass through."""
    from torch import nn

    from training.engine import Int8Consistency, with_penalty

    torch.manual_seed(0)
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))
    m = Int8Consistency(head, 2.0).train()
    x = torch.randn(5, 6)
    crit = with_penalty(nn.CrossEntropyLoss(), m)
    y = torch.zeros(5, dtype=torch.long)
    same = m(torch.stack([x, x], 1))
    assert same.shape == (5, 3) and m.penalty.item() == 0.0  # dropout does not count as INT8 error
    assert crit(same, y).item() == pytest.approx(nn.CrossEntropyLoss()(same, y).item())
    assert m.penalty is None  # consumed once
    with torch.no_grad():
        head[1].weight[:] = 1.0  # every logit moves alike with the input: no decision can change
    m(torch.stack([x, x + 3.0], 1))
    assert m.penalty.item() == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        head[1].weight.normal_()
    noise = 0.5 * torch.randn_like(x)
    m(torch.stack([x, x + noise], 1))
    d = head[1](x) - head[1](x + noise)
    expected = 2.0 * (d - d.mean(1, keepdim=True)).pow(2).mean()
    assert m.penalty.item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    m.eval()
    m.penalty = None
    assert torch.equal(m(x), head[1](x)) and m.penalty is None  # evaluation: plain features, no penalty


def test_feature_loader_pairs_fp32_and_int8_features():
    import numpy as np

    from training.features import FeatureLoader

    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    batches = list(FeatureLoader(x, np.zeros(10, np.int64), 4, list(range(10)), alt=-x, paired=True))
    xs = torch.cat([b[0] for b in batches])
    assert xs.shape == (10, 2, 2)
    assert torch.equal(xs[:, 0], torch.from_numpy(x)) and torch.equal(xs[:, 1], -torch.from_numpy(x))


def test_int8_aware_transfer_pulls_the_int8_decisions_towards_fp32(workdir, tiny_folder):
    """On by default for a Lite transfer run: the head trained with the consistency penalty changes its logits
    between the cached fp32 and INT8 features (centred: what decides) far less than one trained without."""
    import numpy as np

    from core.checkpoint import load_checkpoint

    argv = ["--data", str(tiny_folder), "--mode", "transfer", "--model", "efficientnet_lite0", "--epochs", "30"]
    assert run_train(*argv, "--lr", "0.01", "--name", "on") == 0
    assert run_train(*argv, "--lr", "0.01", "--no-int8-aware", "--name", "off") == 0
    runs = workdir / "artifacts/runs"
    assert json.loads((runs / "on/meta.json").read_text())["args"]["int8_aware"] is True
    assert json.loads((runs / "off/meta.json").read_text())["args"]["int8_aware"] is False
    cache = workdir / "artifacts/cache/features"
    (int8,) = cache.glob("*-train-int8-*.npz")
    (fp32,) = [p for p in cache.glob("*-train-*.npz") if "int8" not in p.name]
    f, q = np.load(fp32)["x"], np.load(int8)["x"]

    def centred_change(run: str) -> float:
        sd = load_checkpoint(runs / run / "last.pt").state_dict  # best.pt: an early epoch on 40 easy images
        w, b = sd["head.fc.weight"].numpy(), sd["head.fc.bias"].numpy()
        d = (f @ w.T + b) - (q @ w.T + b)
        return float(np.sqrt(((d - d.mean(1, keepdims=True)) ** 2).mean()))

    assert centred_change("on") < 0.5 * centred_change("off")


@pytest.mark.parametrize(("kind", "ratio"), [("inverse", 3.0), ("sqrt", 3**0.5)])
def test_class_weights_favour_rare_classes_and_keep_the_loss_scale(kind, ratio):
    from training.engine import class_weights

    labels = [0] * 6 + [1] * 2  # class 2 has no training images
    w = class_weights(labels, 3, kind)
    assert float(w[1] / w[0]) == pytest.approx(ratio) and float(w[2]) == 0.0
    assert float(6 * w[0] + 2 * w[1]) / 8 == pytest.approx(1.0)  # average weight per sample: the loss keeps its scale
    assert class_weights(labels, 3, "none") is None


def test_class_weight_changes_training_only_where_classes_are_imbalanced(workdir):
    def losses(folder, kind):
        name = f"{folder.name}-{kind}"
        assert run_scratch(folder, deterministic=True, epochs=2, name=name, class_weight=kind) == 0
        return [float(r["train_loss"]) for r in read_history(workdir / "artifacts/runs" / name)]

    balanced = make_folder(workdir / "balanced", per_class=20, odd_files=False)  # 17 training images per class
    assert losses(balanced, "inverse") == pytest.approx(losses(balanced, "none"), rel=1e-5)  # every weight is 1
    skewed = make_folder(workdir / "skewed", per_class=8, odd_files=False)
    for f in sorted((skewed / CLASSES[0]).glob("*.png"))[3:]:  # 3 images of one class against 8
        f.unlink()
    plain, weighted = losses(skewed, "none"), losses(skewed, "inverse")
    assert abs(weighted[0] - plain[0]) > 1e-3 * plain[0]
    assert (
        json.loads((workdir / "artifacts/runs/skewed-inverse/meta.json").read_text())["args"]["class_weight"]
        == "inverse"
    )


def test_bn_momentum_sets_how_fast_trained_batchnorm_statistics_move(workdir, capsys):
    """--bn-momentum reaches every BatchNorm layer that trains (and only those), and the statistics it writes follow
    the new batches faster; the option is recorded and locked on --resume."""
    from torch import nn

    from core.checkpoint import load_checkpoint
    from training.engine import set_bn_momentum

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    assert set_bn_momentum(model, 0.3) == 2 and all(m.momentum == 0.3 for m in model if isinstance(m, nn.BatchNorm2d))
    assert set_bn_momentum(model, None) == 0 and model[1].momentum == 0.3  # None keeps what is there

    folder = make_folder(workdir / "bn", per_class=8, odd_files=False)

    def running_means(name, **extra):
        assert run_scratch(folder, deterministic=True, epochs=1, name=name, **extra) == 0
        ck = load_checkpoint(workdir / "artifacts/runs" / name / "best.pt")
        return torch.cat([v.flatten() for k, v in ck.state_dict.items() if k.endswith("running_mean")])

    default, fast = running_means("bn-default"), running_means("bn-fast", bn_momentum=0.9)
    assert default.numel() > 0 and not torch.allclose(default, fast)
    assert fast.abs().mean() > default.abs().mean()  # from 0, statistics that move faster get further in one epoch
    assert json.loads((workdir / "artifacts/runs/bn-fast/meta.json").read_text())["args"]["bn_momentum"] == 0.9
    code = run_scratch(folder, epochs=2, name=None, resume="bn-fast", bn_momentum=0.5)
    assert code == 2 and "changed options ['bn_momentum']" in capsys.readouterr().err


def _logits(pred: list[int], classes: int = 3):
    import numpy as np

    out = np.zeros((len(pred), classes), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_int8_select_prefers_epochs_whose_int8_model_fits_the_default_budget(tmp_path):
    """An epoch whose INT8 model breaks the export's default budget on validation (agreement < 98 %, or a class
    losing > 5 points) loses to any epoch that fits, however accurate it is; among fitting epochs, accuracy decides;
    without INT8 logits accuracy alone decides, as before."""
    import argparse

    import numpy as np

    from training.recorder import EpochRecorder

    y = np.repeat([0, 1, 2], 20)
    train = {"loss": 1.0, "acc": 0.5, "skipped": 0, "seconds": 0.1}
    good = y.copy()
    good[[0, 20]] = 2  # 2 of 60 wrong: 96.7 %
    fair = y.copy()
    fair[[0, 1, 20, 21, 40]] = 1  # 5 of 60 wrong
    int8_off = good.copy()
    int8_off[[2, 3]] = 1  # the INT8 model changes 2 of 60 decisions (96.7 % agreement): outside the budget
    args = argparse.Namespace(patience=0, epochs=3)
    rec = EpochRecorder(args, None, tmp_path, False, None)
    rec.end_epoch(1, train, _logits(list(fair)), y, 1e-3, None, {}, _logits(list(fair)))
    assert rec.best["epoch"] == 1 and rec.best["int8_fits"] is True
    rec.end_epoch(2, train, _logits(list(good)), y, 1e-3, None, {}, _logits(list(int8_off)))
    assert rec.best["epoch"] == 1  # more accurate, but its INT8 model would be refused
    assert rec.history[1]["val_int8_fits"] == 0 and rec.history[1]["val_int8_agreement"] == pytest.approx(58 / 60)
    rec.end_epoch(3, train, _logits(list(good)), y, 1e-3, None, {}, _logits(list(good)))
    assert rec.best["epoch"] == 3 and rec.best["val_int8_agreement"] == 1.0
    plain = EpochRecorder(args, None, tmp_path, False, None)
    plain.end_epoch(1, train, _logits(list(fair)), y, 1e-3, None, {})
    plain.end_epoch(2, train, _logits(list(good)), y, 1e-3, None, {})
    assert plain.best["epoch"] == 2 and "val_int8_agreement" not in plain.history[0]


@pytest.mark.parametrize("metric, chosen", [("accuracy", 1), ("balanced", 2), (None, 1)])
def test_select_metric_chooses_the_epoch_by_accuracy_or_balanced_accuracy(tmp_path, metric, chosen):
    """Epoch 1 never predicts the rare class (90 % accuracy, balanced 66.7 %); epoch 2 finds most of it at some cost
    in accuracy (85 %, balanced 83.9 %). --select-metric accuracy (the default, also for a namespace without the
    option) keeps epoch 1, balanced takes epoch 2; every row records both figures, and patience counts on the metric."""
    import argparse

    import numpy as np

    from training.recorder import EpochRecorder

    y = np.array([0] * 30 + [1] * 20 + [2] * 10)
    train = {"loss": 1.0, "acc": 0.5, "skipped": 0, "seconds": 0.1}
    blind, fair = y.copy(), y.copy()
    blind[50:56] = 1  # rare class 2: 4 of 10 right
    fair[50:52] = 1  # rare class 2: 8 of 10 right ...
    fair[[0, 1, 2, 3, 30, 31, 32]] = 2  # ... at the cost of 7 others
    args = argparse.Namespace(patience=1, epochs=3, **({} if metric is None else {"select_metric": metric}))
    rec = EpochRecorder(args, None, tmp_path, False, None)
    assert not rec.end_epoch(1, train, _logits(list(blind)), y, 1e-3, None, {})
    stop = rec.end_epoch(2, train, _logits(list(fair)), y, 1e-3, None, {})
    assert [r["val_acc"] for r in rec.history] == pytest.approx([0.9, 51 / 60])
    assert [r["val_bal_acc"] for r in rec.history] == pytest.approx([(1 + 1 + 0.4) / 3, (26 / 30 + 17 / 20 + 0.8) / 3])
    assert rec.best["epoch"] == chosen and rec.best["val_bal_acc"] == rec.history[chosen - 1]["val_bal_acc"]
    assert stop is (chosen == 1)  # patience 1: the metric did not improve in epoch 2


def test_select_metric_balanced_end_to_end_records_and_chooses_on_balanced_accuracy(workdir, capsys):
    """A real scratch run: history.csv and the log line carry validation balanced accuracy per epoch, best.pt is the
    epoch with the highest one (ties: accuracy, then loss), metrics.json says so; the metric is locked on --resume."""
    from core.checkpoint import load_checkpoint

    folder = make_folder(workdir / "sel", per_class=8, odd_files=False)
    assert run_scratch(folder, epochs=4, name="bal", select_metric="balanced") == 0
    run = workdir / "artifacts/runs/bal"
    rows = read_history(run)
    assert len(rows) == 4 and all(0.0 <= float(r["val_bal_acc"]) <= 1.0 for r in rows)
    best = max(rows, key=lambda r: (float(r["val_bal_acc"]), float(r["val_acc"]), -float(r["val_loss"])))
    m = json.loads((run / "metrics.json").read_text())
    assert m["select_metric"] == "balanced" and m["best_epoch"] == int(best["epoch"])
    assert m["val_balanced_accuracy"] == pytest.approx(float(best["val_bal_acc"]))
    assert load_checkpoint(run / "best.pt").metrics["val_balanced_accuracy"] == pytest.approx(
        float(best["val_bal_acc"])
    )
    assert " bal " in capsys.readouterr().out
    assert run_scratch(folder, epochs=5, name=None, resume="bal") == 2  # started on balanced; accuracy is refused
    assert "changed options ['select_metric']" in capsys.readouterr().err


def test_balanced_accuracy_is_the_mean_recall_of_the_classes_present():
    import numpy as np

    from training.engine import balanced_accuracy, classification_metrics

    labels = np.array([0, 0, 0, 1, 3, 3])
    pred = np.array([0, 1, 1, 1, 3, 0])
    assert balanced_accuracy(pred, labels) == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # class 2 absent: not counted
    logits = np.eye(4, dtype=np.float32)[pred]
    assert classification_metrics(logits, labels, list("abcd"))["balanced_accuracy"] == balanced_accuracy(pred, labels)
    assert balanced_accuracy(np.array([], int), np.array([], int)) == 0.0


@pytest.mark.parametrize("margin, chosen", [(None, 1), (1.0, 1), (0.0, 2)])
def test_int8_select_margin_asks_more_agreement_than_the_gate(tmp_path, margin, chosen):
    """With the default margin (1 point) an epoch at 98.3 % agreement (59 of 60) does not count as fitting, so a
    less accurate epoch at 100 % wins; with --int8-select-margin 0 the gate itself decides and the accurate one wins."""
    import argparse

    import numpy as np

    from training.recorder import EpochRecorder, selection_budget

    y = np.repeat([0, 1, 2], 20)
    train = {"loss": 1.0, "acc": 0.5, "skipped": 0, "seconds": 0.1}
    fair, good = y.copy(), y.copy()
    fair[[0, 1, 20, 21, 40]] = 1  # 5 of 60 wrong
    good[[0]] = 2  # 1 of 60 wrong
    close = good.copy()
    close[0] = 1  # its INT8 model changes 1 of 60 decisions (wrong either way): 98.33 % agreement, no drop
    args = argparse.Namespace(patience=0, epochs=2, int8_select_margin=margin)
    assert selection_budget(args).min_agreement == 98.0 + (1.0 if margin is None else margin)
    rec = EpochRecorder(args, None, tmp_path, False, None)
    rec.end_epoch(1, train, _logits(list(fair)), y, 1e-3, None, {}, _logits(list(fair)))
    rec.end_epoch(2, train, _logits(list(good)), y, 1e-3, None, {}, _logits(list(close)))
    assert rec.history[1]["val_int8_agreement"] == pytest.approx(59 / 60)
    assert rec.best["epoch"] == chosen and rec.history[1]["val_int8_fits"] == int(chosen == 2)


def test_int8_aware_transfer_selects_its_epoch_on_validation_int8_logits(workdir, tiny_folder):
    """On by default with --int8-aware transfer: every epoch logs its INT8 model's validation agreement, the best
    epoch is the most accurate one among those that fit the default budget, metrics.json records it; the validation
    INT8 features are cached (a second run reads them); --no-int8-select keeps the accuracy-only choice."""
    import numpy as np

    argv = ["--data", str(tiny_folder), "--mode", "transfer", "--model", "efficientnet_lite0", "--epochs", "6"]
    assert run_train(*argv, "--lr", "0.01", "--name", "sel") == 0
    run = workdir / "artifacts/runs/sel"
    rows = list(csv.DictReader(io.StringIO((run / "history.csv").read_text())))
    assert len(rows) == 6 and all(0.0 <= float(r["val_int8_agreement"]) <= 1.0 for r in rows)
    fitting = [r for r in rows if r["val_int8_fits"] == "1"] or rows
    best = max(fitting, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == int(best["epoch"])
    assert metrics["val_int8_agreement"] == pytest.approx(float(best["val_int8_agreement"]))
    assert metrics["val_int8_fits"] is (best["val_int8_fits"] == "1")
    top = max(rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))  # the metric alone
    top = best if top["val_acc"] == best["val_acc"] else top  # a tie on accuracy is not a move
    gate = metrics["int8_gate"]
    assert gate["fp32_best_epoch"] == int(top["epoch"]) and gate["epochs"] == 6
    assert gate["epochs_fitting"] == sum(r["val_int8_fits"] == "1" for r in rows)
    assert gate["moved"] is (top["epoch"] != best["epoch"])
    cache = workdir / "artifacts/cache/features"
    (val_int8,) = cache.glob("*-val-int8-*.npz")
    (val,) = [p for p in cache.glob("*-val-*.npz") if "int8" not in p.name]
    assert np.load(val_int8)["x"].shape == np.load(val)["x"].shape
    assert run_train(*argv, "--lr", "0.01", "--no-int8-select", "--name", "plain") == 0
    plain = workdir / "artifacts/runs/plain"
    assert "val_int8_agreement" not in (plain / "history.csv").read_text()
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert not {"val_int8_agreement", "val_int8_fits", "int8_gate"} & set(plain_metrics)


def _gate_history(accs: list[float], fits: list[int]) -> list[dict]:
    return [
        {"epoch": e, "val_acc": a, "val_bal_acc": a, "val_loss": 1.0 - a}
        | {"val_int8_agreement": 0.97 + 0.03 * f, "val_int8_fits": f}
        for e, (a, f) in enumerate(zip(accs, fits, strict=True), 1)
    ]


@pytest.mark.parametrize(
    "accs, fits, chosen, expect",
    [
        ([0.70, 0.80, 0.79], [1, 0, 1], 3, "note: INT8 gate (--int8-select) kept epoch 3 (accuracy 79.00 %): 2 of 3"),
        ([0.70, 0.80, 0.75], [1, 0, 0], 1, "warning: INT8 gate (--int8-select) kept epoch 1 (accuracy 70.00 %): 1"),
        ([0.70, 0.80, 0.75], [0, 1, 0], 2, None),  # the gate chose what the metric chose
        ([0.70, 0.80, 0.80], [0, 0, 1], 3, None),  # a tie on accuracy: epoch 2's lower loss is no reason to speak
        ([0.70, 0.80, 0.75], [0, 0, 0], 2, "warning: no epoch's INT8 model fit the export's budget"),
    ],
)
def test_int8_gate_says_when_it_moved_the_epoch(accs, fits, chosen, expect):
    """The selection of a --int8-select run is explained: which epoch the metric alone would have kept, how many
    epochs fit, and a one-line note (a warning past a point of accuracy, or when nothing fit); silent otherwise."""
    from training.recorder import int8_gate_message, int8_gate_summary, selection_key

    rows = _gate_history(accs, fits)
    best = max(rows, key=lambda r: selection_key({**r, "int8_fits": bool(r["val_int8_fits"])}, "accuracy"))
    assert best["epoch"] == chosen
    summary = int8_gate_summary(rows, best, "accuracy")
    top = 2 if accs[1] > accs[chosen - 1] else chosen
    assert summary["fp32_best_epoch"] == top and summary["epochs_fitting"] == sum(fits) and summary["epochs"] == 3
    assert summary["moved"] is (chosen != top)
    msg = int8_gate_message(summary, best, 99.0)
    if expect is None:
        assert msg is None
    else:
        assert msg.startswith(expect) and "\n" not in msg and "99.0 %" in msg
    if summary["moved"]:
        assert f"{100 * (0.80 - accs[chosen - 1]):.2f} points higher" in msg and "agreement 97.00 %" in msg
    assert int8_gate_summary([{k: v for k, v in r.items() if "int8" not in k} for r in rows], best, "accuracy") is None


def test_int8_gate_note_speaks_in_the_select_metric():
    """Under --select-metric balanced the move is measured in balanced accuracy, the figure that chose the epoch."""
    from training.recorder import int8_gate_message, int8_gate_summary

    rows = _gate_history([0.80, 0.78], [1, 0])
    rows[0]["val_bal_acc"], rows[1]["val_bal_acc"] = 0.50, 0.60  # epoch 2: less accurate, more balanced
    summary = int8_gate_summary(rows, rows[0], "balanced")
    assert summary["metric"] == "val_bal_acc" and summary["fp32_best_epoch"] == 2 and summary["moved"]
    msg = int8_gate_message(summary, rows[0], 99.0)
    assert msg.startswith("warning: INT8 gate (--int8-select) kept epoch 1 (balanced accuracy 50.00 %)")
    assert "10.00 points higher" in msg


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "transfer", "--no-int8-aware", "--int8-select"],
        ["--mode", "finetune", "--trainable-from", "11", "--int8-aware", "--int8-select"],
    ],
)
def test_int8_select_outside_an_int8_aware_transfer_run_is_refused(workdir, tiny_folder, capsys, argv):
    assert run_train("--data", str(tiny_folder), "--model", "efficientnet_lite0", "--epochs", "1", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8-select chooses among the epochs of a transfer head" in err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--int8-select-margin", "2.5"], "the margin must be 0 to 2 points"),
        (["--int8-select-margin", "-1"], "the margin must be 0 to 2 points"),
        (
            ["--no-int8-select", "--int8-select-margin", "0.5"],
            "is a rule of --int8-select, which this run does not use",
        ),
        (["--no-int8-aware", "--int8-select-margin", "0.5"], "is a rule of --int8-select, which this run does not use"),
    ],
)
def test_a_bad_int8_select_margin_is_refused(workdir, tiny_folder, capsys, argv, message):
    argv = ["--data", str(tiny_folder), "--model", "efficientnet_lite0", "--mode", "transfer", "--epochs", "1", *argv]
    assert run_train(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (workdir / "artifacts/runs").exists() or not any((workdir / "artifacts/runs").iterdir())


def test_weight_ema_averages_floats_copies_counters_and_swaps_back():
    """training.ema.WeightEma: after each step shadow = d * shadow + (1 - d) * live with the warmed-up decay
    d_n = min(decay, (1 + n) / (10 + n)); integer buffers are copied; swapped() evaluates the average and puts the
    live weights back; state/restore round-trip what resume.pt keeps."""
    from torch import nn

    from training.ema import WeightEma

    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEma(net, 0.5)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 7
    ema.update()  # d_1 = min(0.5, 2 / 11)
    d1 = 2 / 11
    assert torch.allclose(ema.shadow["0.weight"], d1 * w0 + (1 - d1) * (w0 + 1))
    assert int(ema.shadow["1.num_batches_tracked"]) == 7
    for _ in range(40):
        ema.update()
    assert ema.current_decay() == 0.5  # the warm-up has passed the cap
    with torch.no_grad():
        net[0].weight.add_(2.0)
    live = net[0].weight.detach().clone()
    with ema.swapped() as kept:
        assert torch.allclose(net[0].weight, ema.shadow["0.weight"]) and not torch.allclose(net[0].weight, live)
        saved = {"model": {k: v.clone() for k, v in net.state_dict().items()}, "ema": ema.state(kept)}
    assert torch.equal(net[0].weight, live)  # live weights restored after evaluation
    other = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    other.load_state_dict(saved["model"])
    again = WeightEma(other, 0.5)
    again.restore(saved["ema"])
    assert torch.equal(other[0].weight, live) and again.steps == ema.steps
    assert all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError):
        WeightEma(net, 1.0)


def test_ema_run_trains_the_same_and_evaluates_and_saves_the_average(workdir, tiny_folder):
    """--ema changes nothing in training (same train losses as without it) but validation and best.pt / last.pt
    see the average, not the last step's weights. Resuming an --ema run: tests/test_reliability.py."""
    from core.checkpoint import load_checkpoint

    common = {"deterministic": True, "augment": "basic", "lr": 0.05, "epochs": 4}
    assert run_scratch(tiny_folder, **common, name="plain") == 0
    assert run_scratch(tiny_folder, **common, ema=0.9, name="avg") == 0
    runs = workdir / "artifacts/runs"
    avg, plain = read_history(runs / "avg"), read_history(runs / "plain")
    assert [r["train_loss"] for r in avg] == [r["train_loss"] for r in plain]
    assert [r["val_loss"] for r in avg] != [r["val_loss"] for r in plain]
    a, b = load_checkpoint(runs / "avg/last.pt").state_dict, load_checkpoint(runs / "plain/last.pt").state_dict
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) > 1e-4
    assert json.loads((runs / "avg/meta.json").read_text())["args"]["ema"] == 0.9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ema", "1"], "outside [0, 1)"),
        (["--ema", "-0.5"], "outside [0, 1)"),
    ],
)
def test_a_bad_ema_is_refused(workdir, tiny_folder, capsys, argv, message):
    assert run_cli(train.main, train_argv(tiny_folder, *argv, name="e")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (workdir / "artifacts/runs/e").exists()


@pytest.mark.parametrize(
    ("argv", "ema"), [([], 0.995), (["--mode", "finetune"], 0.0), (["--mode", "transfer", "--ema", "0"], 0.0)]
)
def test_ema_defaults_per_mode_and_zero_turns_it_off(argv, ema):
    from training.cli import parse_args
    from training.ema import resumed_ema

    args = parse_args(argv)
    assert args.ema == ema
    assert (resumed_ema(torch.nn.Linear(2, 2), args.ema, None) is None) == (ema == 0)


def test_a_run_recorded_before_ema_existed_resumes_without_it(workdir, tiny_folder, capsys):
    common = {"deterministic": True, "epochs": 2}
    assert run_scratch(tiny_folder, **common, name="old") == 0
    resume = workdir / "artifacts/runs/old/resume.pt"
    state = torch.load(resume, weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]
    del state["args"]["ema"]  # as resume.pt files written before the option
    torch.save(state, resume)
    assert run_scratch(tiny_folder, **common, ema=0.9, resume="old") == 0
    assert "resumes without it" in capsys.readouterr().out
    assert json.loads((workdir / "artifacts/runs/old/meta.json").read_text())["args"]["ema"] == 0.0


def test_a_transfer_run_recorded_before_cov_taps_existed_resumes_without_the_covariance(workdir, tiny_folder, capsys):
    """Its head was trained on first-order features only: the resumed run must rebuild that model, not today's
    default; asking it for a covariance is a changed option, refused."""
    argv = ["--data", str(tiny_folder), "--mode", "transfer", "--model", "efficientnet_lite0", "--epochs", "2"]
    assert run_train(*argv, "--cov-taps", "none", "--name", "old") == 0
    resume = workdir / "artifacts/runs/old/resume.pt"
    state = torch.load(resume, weights_only=True)
    state["epoch"], state["history"] = 1, state["history"][:1]
    del state["args"]["cov_taps"]  # as resume.pt files written before the option
    torch.save(state, resume)
    assert run_train(*argv, "--cov-taps", "14", "--resume", "old") == 2
    assert "changed options ['cov_taps']" in capsys.readouterr().err
    assert run_train(*argv, "--resume", "old") == 0  # --cov-taps auto, the default
    meta = json.loads((workdir / "artifacts/runs/old/meta.json").read_text())
    assert meta["args"]["cov_taps"] == "none" and "cov_taps" not in meta["spec"]["arch_kwargs"]


def test_a_run_recorded_before_balanced_selection_existed_resumes(workdir, tiny_folder):
    """resume.pt written before val_bal_acc / --select-metric: the run continues, history.csv gains the column
    (empty for the old epoch), and the later epochs are compared with the old best on accuracy as before."""
    common = {"deterministic": True, "epochs": 3}
    assert run_scratch(tiny_folder, **common, name="old") == 0
    resume = workdir / "artifacts/runs/old/resume.pt"
    state = torch.load(resume, weights_only=True)
    state["epoch"], state["history"], state["bad_epochs"] = 1, state["history"][:1], 0
    state["best"] = {k: v for k, v in state["history"][0].items() if k in ("val_acc", "val_loss", "epoch")}
    del state["history"][0]["val_bal_acc"], state["args"]["select_metric"]
    torch.save(state, resume)
    assert run_scratch(tiny_folder, **common, resume="old") == 0
    rows = read_history(workdir / "artifacts/runs/old")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and rows[0]["val_bal_acc"] == ""
    assert all(0.0 <= float(r["val_bal_acc"]) <= 1.0 for r in rows[1:])
    m = json.loads((workdir / "artifacts/runs/old/metrics.json").read_text())
    best = max(rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))
    assert m["best_epoch"] == int(best["epoch"]) and m["select_metric"] == "accuracy"


def test_benchmark_prints_validation_beside_held_out_figures_and_the_seed_mean(workdir, capsys):
    """training/benchmark.py, two seeds of a tiny scratch run with a test split: each row shows the validation
    figures that chose the epoch beside the held-out ones (both read from the run's metrics.json), and the summary
    gives mean +- sample std over the seeds."""
    import numpy as np

    from training import benchmark

    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        make_folder(workdir / "d" / split, per_class=6, odd_files=False, seed=seed)
    config = f"--data {workdir / 'd'} --mode scratch --model cnn_small --epochs 2 --image-size 32 --batch-size 8"
    assert benchmark.main(["--runs", config + " --workers 0", "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    runs = sorted((workdir / "artifacts/runs").glob("bench-*-s*"))
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert len(metrics) == 2 and all(m["eval_split"] == "test" for m in metrics)
    rows = [line for line in out.splitlines() if line.startswith(f"| `{config}")]
    assert len(rows) == 3  # two seeds, then their summary
    for m, seed in zip(metrics, (0, 1), strict=True):
        cells = [c.strip() for c in rows[seed].split("|")]
        assert cells[2] == str(seed) and cells[-2] == str(m["best_epoch"])
        assert cells[4:8] == [
            f"{100 * m['val_accuracy']:.2f} %",
            f"{100 * m['val_balanced_accuracy']:.2f} %",
            f"{100 * m['accuracy']:.2f} %",
            f"{100 * m['balanced_accuracy']:.2f} %",
        ]
    acc = [100 * m["accuracy"] for m in metrics]
    assert f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f} %" in rows[2]
    val_bal = [100 * m["val_balanced_accuracy"] for m in metrics]
    assert [c.strip() for c in rows[2].split("|")][5] == f"{np.mean(val_bal):.2f} ± {np.std(val_bal, ddof=1):.2f} %"


@pytest.mark.parametrize("first", [True, False, None])  # None: resume.pt written before --channels-last existed
def test_a_resumed_run_keeps_the_memory_layout_it_started_with(workdir, tiny_folder, first):
    assert run_scratch(tiny_folder, epochs=1, name="r", no_channels_last=first is False) == 0
    if first is None:  # such runs trained without channels_last, whatever today's default
        resume = workdir / "artifacts/runs/r/resume.pt"
        state = torch.load(resume, weights_only=True)
        del state["args"]["channels_last"]
        torch.save(state, resume)
    # asks for the other layout (None: today's default, on)
    assert run_scratch(tiny_folder, epochs=2, resume="r", no_channels_last=bool(first)) == 0
    assert json.loads((workdir / "artifacts/runs/r/meta.json").read_text())["args"]["channels_last"] is bool(first)
    assert [int(r["epoch"]) for r in read_history(workdir / "artifacts/runs/r")] == [1, 2]


@pytest.mark.parametrize("shape", [(6, 5), (6, 2, 5), (6, 2, 3, 4, 4)])  # features, paired features, paired maps
def test_mixup_blends_rows_with_one_permutation_and_the_targets_alike(shape):
    from training.engine import mixed_targets, mixup_batch

    torch.manual_seed(0)
    x, y = torch.randn(shape), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed, (perm, lam) = mixup_batch(x, y, 0.4)
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(6)) and perm.tolist() != list(range(6))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])  # a paired row blends with one other pair, whole
    t = mixed_targets(y, (perm, lam), 4)
    assert t.shape == (6, 4) and torch.allclose(t.sum(1), torch.ones(6))
    for i in range(6):
        expect = torch.zeros(4)
        expect[y[i]] += lam
        expect[y[perm[i]]] += 1 - lam
        assert torch.allclose(t[i], expect)
    for xs, ys, alpha in ((x, y, 0.0), (x[:1], y[:1], 0.4)):  # off, or nothing to blend with
        out, mix = mixup_batch(xs, ys, alpha)
        assert out is xs and mix is None
    assert mixed_targets(y, None, 4) is y
    # the soft targets mean what the class indices mean to the loss: an unblended batch gives the same loss
    crit, logits = torch.nn.CrossEntropyLoss(label_smoothing=0.1), torch.randn(6, 4)
    same = mixed_targets(y, (torch.arange(6), 1.0), 4)
    assert torch.allclose(crit(logits, same), crit(logits, y))


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "finetune", "--model", "efficientnet_lite0", "--trainable-from", "12"],
        ["--mode", "transfer", "--model", "efficientnet_lite0"],
        ["--mode", "scratch"],
    ],
)
def test_mixup_trains_images_cached_features_and_block_maps(workdir, tiny_folder, argv):
    common = ["--data", str(tiny_folder), *argv, "--epochs", "2", "--deterministic"]
    assert run_train(*common, "--name", "plain") == 0
    assert run_train(*common, "--mixup", "0.4", "--name", "mixed") == 0
    runs = workdir / "artifacts/runs"
    plain, mixed = read_history(runs / "plain"), read_history(runs / "mixed")
    assert len(mixed) == 2 and all(float(r["train_loss"]) > 0 for r in mixed)
    assert [r["train_loss"] for r in mixed] != [r["train_loss"] for r in plain]
    assert json.loads((runs / "mixed/meta.json").read_text())["args"]["mixup"] == 0.4


def test_a_negative_mixup_is_refused_and_a_resume_keeps_it(workdir, tiny_folder, capsys):
    assert run_cli(train.main, train_argv(tiny_folder, "--mixup", "-1", name="m")) == 2
    err = capsys.readouterr().err.strip()
    assert "--mixup -1.0 is negative" in err and "\n" not in err
    assert run_scratch(tiny_folder, mixup=0.2, epochs=1, name="m") == 0
    assert run_scratch(tiny_folder, epochs=2, resume="m") == 2
    assert "mixup=0.2" in capsys.readouterr().err


def test_the_training_cli_starts_without_the_libraries_only_some_runs_need():
    """onnx / ONNX Runtime's quantizer (INT8-aware runs), matplotlib (the plots at a run's end) and scikit-learn (the
    split) load when first used: `train.py --help`, a refused option or a killed run do not pay ~4-5 s for them."""
    import subprocess

    probe = "import sys, training.train; print(*(m for m in ('onnx', 'matplotlib', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == []  # each name printed here was imported at start-up
