import os
import pickle

import pytest
import torch

from core.atomic import remove_stale_temps
from core.checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint
from core.errors import UserError
from core.models import create_model, default_spec


def make_ckpt(path):
    spec = default_spec("cnn_small", ("a", "b", "c"), image_size=16, crop="squash", dropout=0.1, hidden=8)
    model = create_model("cnn_small", 3, 3, 16, **spec.arch_kwargs).eval()
    save_checkpoint(Checkpoint(spec, model.state_dict(), {"accuracy": 0.5}, {"data": "x"}), path)
    return model, spec


def test_round_trip_same_spec_and_logits(tmp_path):
    model, spec = make_ckpt(tmp_path / "best.pt")
    loaded, ck = load_model(tmp_path / "best.pt")
    x = torch.randn(2, 3, 16, 16)
    assert ck.spec == spec and ck.metrics == {"accuracy": 0.5}
    assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/cls-test-pwned-marker"


def test_unsafe_pickle_is_refused_and_does_not_run(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    p = tmp_path / "evil.pt"
    torch.save({"spec": {}, "state_dict": {}, "x": Evil()}, p)
    with pytest.raises(UserError, match="unsafe"):
        load_checkpoint(p)
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", pickle.dumps([1, 2, 3])[:5]])
def test_garbage_files_get_clear_errors(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(UserError):
        load_checkpoint(p)


def test_truncated_checkpoint(tmp_path):
    make_ckpt(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"unreadable|not a PyTorch"):
        load_checkpoint(tmp_path / "cut.pt")


def test_plain_state_dict_is_not_a_checkpoint(tmp_path):
    torch.save(create_model("cnn_small", 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="no model spec"):
        load_checkpoint(tmp_path / "sd.pt")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    make_ckpt(tmp_path / "best.pt")
    before = (tmp_path / "best.pt").read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("core.atomic.os.fsync", boom)  # the disk fills up while the new file is written
    with pytest.raises(UserError, match="No space left"):
        make_ckpt(tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_unwritable_destination_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        make_ckpt(tmp_path / "file" / "best.pt")  # parent is a file: mkdir fails even as root


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is free, so its temp file is stale
    stale = tmp_path / f".last.pt.tmp-{dead.pid}"
    mine = tmp_path / f".best.pt.tmp-{os.getpid()}"
    stale.write_bytes(b"half a checkpoint")
    mine.write_bytes(b"being written right now")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


def test_no_unsafe_torch_load_in_source():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = [
        str(p)
        for p in root.glob("[a-z]*/**/*.py")
        if ".venv" not in p.parts and "weights_only=" + "False" in p.read_text()
    ]
    assert offenders == []
