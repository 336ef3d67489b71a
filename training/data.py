"""Data sources: an ImageFolder path, the built-in ELPV solar cells (default), digits, torchvision sets.

Each source becomes a DataSource of Splits whose items are file paths, numpy arrays or (dataset, index)
references; `ImageDataset` decodes them with core.images and skips unreadable files without crashing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.errors import UserError
from core.images import ImageError, is_image_file, load_image

BUILTIN = ("elpv", "digits", "mnist", "fashionmnist", "cifar10", "flowers102")
SPLIT_SEED = 0  # fixed: the split must not move when --seed changes


@dataclass
class Split:
    items: list[Any]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class DataSource:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split | None
    gray: bool = False  # images are single-channel
    native_size: int | None = None
    skipped: int = 0  # files dropped at scan time (not images)
    symmetric: bool = False  # every flip and 90-degree rotation of an image keeps its label (square cells)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    @property
    def eval_split(self) -> tuple[str, Split]:
        return ("test", self.test) if self.test is not None else ("val", self.val)


def stratified_split(
    items: Sequence,
    labels: Sequence[int],
    fraction: float,
    seed: int = SPLIT_SEED,
    strata: Sequence | None = None,
) -> tuple[Split, Split]:
    from sklearn.model_selection import train_test_split  # ~2 s to import: only runs that split pay it

    idx = np.arange(len(items))
    a, b = train_test_split(
        idx, test_size=fraction, random_state=seed, stratify=strata if strata is not None else labels
    )
    pick = lambda ix: Split([items[i] for i in sorted(ix)], [int(labels[i]) for i in sorted(ix)])  # noqa: E731
    return pick(a), pick(b)


def load_item(item: Any) -> Image.Image:
    """A split item as an upright RGB/L image, decoded at full size (the contract every consumer follows)."""
    if isinstance(item, tuple):  # (torchvision dataset, index)
        ds, i = item
        return load_image(ds[i][0])
    return load_image(item)


class ImageDataset(Dataset):
    """Decodes lazily; an unreadable file yields None (dropped by `collate_skip`) and one warning."""

    def __init__(
        self,
        split: Split,
        transform: Callable[[Image.Image], torch.Tensor],
    ) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            im = load_item(self.split.items[i])
        except ImageError as e:
            warnings.warn(f"skipping unreadable image: {e}", stacklevel=1)
            return None
        return self.transform(im), self.split.labels[i]


def collate_skip(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), len(batch) - len(good)


def _header_ok(path: Path) -> bool:
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as im:
            im.size  # noqa: B018 - header only
        return True
    except Exception:
        return False


def scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int], int]:
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"{root} has no class subfolders; expected {root}/<class>/<image files>")
    if classes is not None and not set(found) <= set(classes):
        raise UserError(f"{root} has classes not in train/: {sorted(set(found) - set(classes))}")
    classes = classes or found
    paths, labels, skipped = [], [], 0
    for name in found:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        good = [p for p in files if is_image_file(p) and _header_ok(p)]
        if not good:
            raise UserError(f"class folder {root / name} has no readable images; add images or remove the folder")
        for p in sorted(set(files) - set(good)):
            warnings.warn(f"skipping {p}: not a readable image", stacklevel=1)
        skipped += len(files) - len(good)
        paths += good
        labels += [classes.index(name)] * len(good)
    return classes, paths, labels, skipped


def folder_source(root: Path, val_split: float) -> DataSource:
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; give an ImageFolder path or one of {BUILTIN}")
    if not any(root.iterdir()):
        raise UserError(f"data folder {root} is empty; expected class subfolders or train/ and val/")
    if (root / "train").is_dir():
        classes, tp, tl, sk = scan_folder(root / "train")
        if (root / "val").is_dir():
            _, vp, vl, sk2 = scan_folder(root / "val", classes)
            train, val = Split(tp, tl), Split(vp, vl)
        else:
            sk2 = 0
            train, val = stratified_split(tp, tl, val_split)
        test, sk3 = None, 0
        if (root / "test").is_dir():
            _, sp, sl, sk3 = scan_folder(root / "test", classes)
            test = Split(sp, sl)
        return DataSource(root.name, classes, train, val, test, skipped=sk + sk2 + sk3)
    classes, paths, labels, sk = scan_folder(root)
    if min(np.bincount(labels)) < 2:
        raise UserError(f"{root}: every class needs at least 2 images to split off validation")
    train, val = stratified_split(paths, labels, val_split)
    return DataSource(root.name, classes, train, val, None, skipped=sk)


def balanced_subset(labels: list[int], n: int, seed: int = 0) -> list[int]:
    """Up to n indices, round-robin over classes so every class is covered (INT8 calibration sets)."""
    rng = np.random.default_rng(seed)
    by_class = [list(rng.permutation(np.flatnonzero(np.asarray(labels) == c))) for c in sorted(set(labels))]
    out: list[int] = []
    while len(out) < min(n, len(labels)):
        for lst in by_class:
            if lst and len(out) < n:
                out.append(int(lst.pop()))
    return sorted(out)


ELPV_LEVELS = {0.0: "p0.00", 1 / 3: "p0.33", 2 / 3: "p0.67", 1.0: "p1.00"}


def elpv_source(task: str = "4class", val_split: float = 0.15) -> DataSource:
    """ELPV: fixed stratified 75 % train+val / 25 % test split (1,968 / 656), as in Deitsch et al. 2019."""
    try:
        import elpv_dataset
    except ImportError:
        raise UserError("package elpv-dataset is missing: pip install -r requirements.txt") from None
    root = Path(elpv_dataset.__file__).parent / "data"
    with open(root / "labels.csv") as f:
        rows = [r.split() for r in f if r.strip()]
    paths = [root / r[0] for r in rows]
    probs = np.array([float(r[1]) for r in rows])
    types = [r[2] for r in rows]
    if task == "binary":
        names, labels = ["functional", "defective"], (probs >= 0.5).astype(int)
    else:
        levels = sorted(ELPV_LEVELS)
        names = [ELPV_LEVELS[v] for v in levels]
        labels = np.array([int(np.argmin([abs(p - v) for v in levels])) for p in probs])
    strata = [f"{lab}-{t}" for lab, t in zip(labels, types, strict=True)]  # balance mono/poly too
    from sklearn.model_selection import train_test_split

    idx = list(range(len(paths)))
    trval_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=SPLIT_SEED, stratify=strata)
    test = Split([paths[i] for i in sorted(test_idx)], [int(labels[i]) for i in sorted(test_idx)])
    trval = sorted(trval_idx)
    train, val = stratified_split(
        [paths[i] for i in trval],
        [int(labels[i]) for i in trval],
        val_split,
        strata=[strata[i] for i in trval],
    )
    return DataSource(f"elpv-{task}", names, train, val, test, gray=True, native_size=300, symmetric=True)


def digits_source(val_split: float = 0.15) -> DataSource:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [np.rint(im * 255.0 / 16.0).astype(np.uint8) for im in d.images]
    trval, test = stratified_split(images, d.target.tolist(), 0.25)
    train, val = stratified_split(trval.items, trval.labels, val_split)
    return DataSource("digits", [str(i) for i in range(10)], train, val, test, gray=True, native_size=8)


def torchvision_source(name: str, data_dir: Path, val_split: float) -> DataSource:
    import torchvision.datasets as tvd

    cls = {
        "mnist": tvd.MNIST,
        "fashionmnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "flowers102": tvd.Flowers102,
    }[name]
    folder = data_dir / name

    def get(**kw: Any):
        try:
            return cls(str(folder), download=False, **kw)
        except (RuntimeError, FileNotFoundError):
            try:
                return cls(str(folder), download=True, **kw)
            except Exception as e:
                raise UserError(
                    f"{name} is not in {folder} and could not be downloaded ({type(e).__name__}); "
                    f"offline? copy the dataset files into {folder}"
                ) from None

    if name == "flowers102":
        tr, va, te = get(split="train"), get(split="val"), get(split="test")
        ref = lambda ds: Split([(ds, i) for i in range(len(ds))], [int(t) for t in ds._labels])  # noqa: E731
        return DataSource(name, [str(i) for i in range(102)], ref(tr), ref(va), ref(te))
    tr, te = get(train=True), get(train=False)
    targets = [int(t) for t in tr.targets]
    train, val = stratified_split([(tr, i) for i in range(len(tr))], targets, val_split)
    test = Split([(te, i) for i in range(len(te))], [int(t) for t in te.targets])
    return DataSource(
        name,
        list(tr.classes),
        train,
        val,
        test,
        gray=name != "cifar10",
        native_size=32 if name == "cifar10" else 28,
    )


def load_source(
    data: str, val_split: float = 0.15, elpv_task: str = "4class", data_dir: Path = Path("artifacts/data")
) -> DataSource:
    if not 0.0 < val_split < 1.0:
        raise UserError(f"--val-split must be between 0 and 1, got {val_split}")
    if data == "elpv":
        return elpv_source(elpv_task, val_split)
    if data == "digits":
        return digits_source(val_split)
    if data in BUILTIN:
        return torchvision_source(data, data_dir, val_split)
    return folder_source(Path(data), val_split)
