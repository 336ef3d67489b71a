"""Dataset health check: what would silently hurt training, found before the first epoch.

python training/check_data.py --data path/to/folder            # table on stdout
python training/check_data.py --data elpv --json health.json   # + machine-readable report
python training/check_data.py --data path --strict             # exit 1 on any error or warning

Finds: unreadable files (empty, not an image, truncated/corrupt, over the size caps), class folders
with no usable images, exact duplicates (by content hash) within a split and across splits (leakage,
and the same image under two labels), tiny images, class imbalance, and counts the images the loader
converts for you (EXIF-rotated, grayscale, RGBA, CMYK, 16-bit, palette, 1-bit, animated/multi-page).
train.py runs it before training (results cached by file size+mtime) and prints the summary block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write
from core.errors import UserError, run_cli
from core.images import ImageError, inspect_image, is_image_file
from training.data import BUILTIN, DataSource, folder_source, load_source

LEVELS = ("error", "warning", "info")
# Stored modes the loader converts; reported as info so users know what happens to their pixels.
MODE_NOTES = {
    "L": "grayscale",
    "LA": "grayscale+alpha (composited on white)",
    "RGBA": "RGBA (composited on white)",
    "P": "palette",
    "PA": "palette+alpha (composited on white)",
    "CMYK": "CMYK (converted to RGB)",
    "1": "1-bit",
    "I;16": "16-bit (scaled to 8-bit)",
    "I;16B": "16-bit (scaled to 8-bit)",
    "I": "32-bit integer (scaled)",
    "F": "float",
    "YCbCr": "YCbCr (converted to RGB)",
}


@dataclass
class Finding:
    level: str
    check: str
    count: int
    detail: str
    examples: list[str] = field(default_factory=list)


@dataclass
class HealthReport:
    dataset: str
    splits: dict[str, dict[str, int]]  # split -> class -> usable images
    files_checked: int
    findings: list[Finding]

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level in ("error", "warning")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "files_checked": self.files_checked,
            "splits": self.splits,
            "errors": sum(f.count for f in self.findings if f.level == "error"),
            "warnings": sum(f.count for f in self.findings if f.level == "warning"),
            "findings": [asdict(f) for f in self.findings],
        }

    def table(self) -> str:
        counts = "  ".join(f"{s}: {sum(c.values())}" for s, c in self.splits.items())
        lines = [f"data check: {self.dataset}, {self.files_checked} files ({counts})"]
        if not self.findings:
            return lines[0] + "  -- no problems found"
        w = max(len(f.check) for f in self.findings)
        lines.append(f"  {'level':7s} {'check':{w}s} {'count':>6s}  detail")
        for f in sorted(self.findings, key=lambda f: LEVELS.index(f.level)):
            ex = f"  e.g. {', '.join(f.examples[:3])}" if f.examples else ""
            lines.append(f"  {f.level:7s} {f.check:{w}s} {f.count:6d}  {f.detail}{ex}")
        return "\n".join(lines)


@dataclass
class Item:
    split: str
    label: str
    name: str  # path or a synthetic id for in-memory images
    sha: str | None = None
    error: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    frames: int = 1
    exif_rotated: bool = False


def _inspect_file(it: Item) -> Item:
    p = Path(it.name)
    if not is_image_file(p):
        it.error = "not an image file extension"
        return it
    try:
        data = p.read_bytes()
    except OSError as e:
        it.error = f"cannot read ({e.strerror})"
        return it
    it.sha = hashlib.sha1(data).hexdigest()
    try:
        f = inspect_image(data)
    except ImageError as e:
        it.error = str(e).split(": ", 1)[-1]
        return it
    it.mode, it.width, it.height, it.frames, it.exif_rotated = f.mode, f.width, f.height, f.frames, f.exif_rotated
    return it


def _inspect_array(it: Item, a: np.ndarray) -> Item:
    it.sha = hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()
    it.height, it.width = a.shape[:2]
    it.mode = "L" if a.ndim == 2 else "RGB"
    return it


def _folder_items(root: Path) -> tuple[list[Item], list[Finding]]:
    """Every file under the ImageFolder layout, by split folder ('all' for a single folder of classes)."""
    findings: list[Finding] = []
    layout = (
        [(s, root / s) for s in ("train", "val", "test") if (root / s).is_dir()]
        if (root / "train").is_dir()
        else [("all", root)]
    )
    items: list[Item] = []
    empty: list[str] = []
    for split, folder in layout:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise UserError(f"{folder} has no class subfolders; expected {folder}/<class>/<image files>")
        for c in classes:
            files = sorted(p for p in (folder / c).rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                empty.append(f"{split}/{c}")
            items += [Item(split, c, str(p)) for p in files]
    if empty:
        findings.append(Finding("error", "empty class folder", len(empty), "class folders with no files", empty))
    return items, findings


def _source_items(source: DataSource) -> list[tuple[Item, Any]]:
    out = []
    splits = [("train", source.train), ("val", source.val)] + ([("test", source.test)] if source.test else [])
    for name, split in splits:
        for k, (x, y) in enumerate(zip(split.items, split.labels, strict=True)):
            label = source.class_names[y]
            if isinstance(x, (str, Path)):
                out.append((Item(name, label, str(x)), None))
            elif isinstance(x, np.ndarray):
                out.append((Item(name, label, f"{name}[{k}]"), x))
            else:  # (torchvision dataset, index): decoded from the dataset's own arrays
                ds, i = x
                out.append((Item(name, label, f"{name}[{i}]"), np.asarray(ds[i][0])))
    return out


def _inspect_all(pairs: Iterable[tuple[Item, Any]], workers: int) -> list[Item]:
    pairs = list(pairs)
    files = [it for it, a in pairs if a is None]
    with ThreadPoolExecutor(max(1, workers)) as ex:  # Pillow releases the GIL while decoding
        list(ex.map(_inspect_file, files))
    for it, a in pairs:
        if a is not None:
            _inspect_array(it, a)
    return [it for it, _ in pairs]


def _split_single_folder(items: list[Item], root: Path, val_split: float) -> None:
    """Assign 'all' items to the train/val part training will put them in, by running training's own split."""
    if not any(it.split == "all" for it in items):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable files are findings here, not warnings
            src = folder_source(root, val_split)
    except UserError:
        return  # training refuses this layout (empty class, < 2 images) with its own message
    where = {str(p): "train" for p in src.train.items} | {str(p): "val" for p in src.val.items}
    for it in items:
        if it.split == "all" and it.name in where:
            it.split = where[it.name]


def analyse(dataset: str, items: list[Item], findings: list[Finding], min_size: int, imbalance: float) -> HealthReport:
    bad = [it for it in items if it.error]
    if bad:
        reasons = Counter(it.error.split(" (")[0] for it in bad)
        detail = "; ".join(f"{n} {r}" for r, n in reasons.most_common(4)) + " -- skipped by training"
        findings.append(Finding("error", "unreadable file", len(bad), detail, [_short(it.name) for it in bad]))
    good = [it for it in items if not it.error]
    by_sha: dict[str, list[Item]] = defaultdict(list)
    for it in good:
        by_sha[it.sha].append(it)
    groups = [g for g in by_sha.values() if len(g) > 1]
    cross = [g for g in groups if len({it.split for it in g}) > 1]
    conflict = [g for g in groups if len({it.label for it in g}) > 1]
    within = [g for g in groups if g not in cross]
    if cross:
        ex = [" = ".join(f"{it.split}:{_short(it.name)}" for it in g[:2]) for g in cross]
        findings.append(
            Finding(
                "error",
                "duplicate across splits",
                len(cross),
                "identical images in more than one split: evaluation leaks training data",
                ex,
            )
        )
    if conflict:
        ex = [" = ".join(f"{_short(it.name)} ({it.label})" for it in g[:2]) for g in conflict]
        findings.append(Finding("error", "conflicting labels", len(conflict), "the same image under two labels", ex))
    if within:
        n = sum(len(g) - 1 for g in within)
        ex = [" = ".join(_short(it.name) for it in g[:2]) for g in within]
        findings.append(Finding("warning", "duplicate within split", n, "extra copies of identical images", ex))
    tiny = [it for it in good if min(it.width, it.height) < min_size]
    if tiny:
        findings.append(
            Finding(
                "warning",
                "tiny image",
                len(tiny),
                f"shorter side under {min_size} px",
                [f"{_short(it.name)} {it.width}x{it.height}" for it in tiny],
            )
        )
    splits: dict[str, dict[str, int]] = {}
    for it in good:
        splits.setdefault(it.split, Counter())[it.label] += 1
    counts = splits.get("train") or splits.get("all") or Counter()
    if counts:
        lo, hi = min(counts.values()), max(counts.values())
        if hi / lo > imbalance:
            findings.append(
                Finding(
                    "warning",
                    "class imbalance",
                    len(counts),
                    f"train classes {hi}:{lo} (> {imbalance:g}x); watch balanced and per-class accuracy",
                    [f"{c}: {n}" for c, n in counts.most_common()],
                )
            )
    rotated = [it for it in good if it.exif_rotated]
    if rotated:
        findings.append(
            Finding(
                "info",
                "EXIF-rotated",
                len(rotated),
                "stored sideways; the loader applies the EXIF orientation",
                [_short(it.name) for it in rotated],
            )
        )
    modes = Counter(it.mode for it in good if it.mode in MODE_NOTES and it.mode != "L")
    for mode, n in modes.most_common():
        ex = [_short(it.name) for it in good if it.mode == mode]
        findings.append(Finding("info", f"mode {mode}", n, MODE_NOTES[mode], ex))
    multi = [it for it in good if it.frames > 1]
    if multi:
        ex = [_short(it.name) for it in multi]
        findings.append(Finding("info", "multi-frame", len(multi), "animated/multi-page: first frame is used", ex))
    for f in findings:
        f.examples = f.examples[:5]
    return HealthReport(dataset, {s: dict(sorted(c.items())) for s, c in splits.items()}, len(items), findings)


def _short(name: str) -> str:
    p = Path(name)
    return f"{p.parent.name}/{p.name}" if p.parent.name else name


def check_data(
    data: str,
    val_split: float = 0.15,
    elpv_task: str = "4class",
    data_dir: Path = Path("artifacts/data"),
    min_size: int = 16,
    imbalance: float = 10.0,
    workers: int = 2,
) -> HealthReport:
    if data in BUILTIN:
        source = load_source(data, val_split, elpv_task, data_dir)
        items = _inspect_all(_source_items(source), workers)
        return analyse(source.name, items, [], min_size, imbalance)
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; give an ImageFolder path or one of {BUILTIN}")
    items, findings = _folder_items(root)
    items = _inspect_all(((it, None) for it in items), workers)
    _split_single_folder(items, root, val_split)
    return analyse(root.name, items, findings, min_size, imbalance)


def cached_check(data: str, val_split: float, elpv_task: str, data_dir: Path, cache: Path) -> HealthReport:
    """check_data, memoised on the file list with sizes and mtimes (built-in sets: on the package)."""
    h = hashlib.sha256(json.dumps([data, val_split, elpv_task]).encode())
    root = Path(data)
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = cache / f"health-{h.hexdigest()[:24]}.json"
    if path.is_file():
        d = json.loads(path.read_text())
        return HealthReport(d["dataset"], d["splits"], d["files_checked"], [Finding(**f) for f in d["findings"]])
    report = check_data(data, val_split, elpv_task, data_dir)
    atomic_write(path, json.dumps(report.to_dict(), indent=1).encode())
    return report


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check an image dataset for problems before training.")
    p.add_argument("--data", default="elpv", help="ImageFolder path or a built-in dataset name")
    p.add_argument("--val-split", type=float, default=0.15, help="as in train.py (single-folder layouts)")
    p.add_argument("--elpv-task", choices=("4class", "binary"), default="4class")
    p.add_argument("--data-dir", type=Path, default=Path("artifacts/data"))
    p.add_argument("--min-size", type=int, default=16, help="shorter side below this is 'tiny'")
    p.add_argument("--imbalance", type=float, default=10.0, help="warn when largest/smallest class exceeds this")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--strict", action="store_true", help="exit 1 when any error or warning is found")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    report = check_data(
        args.data, args.val_split, args.elpv_task, args.data_dir, args.min_size, args.imbalance, args.workers
    )
    print(report.table())
    if args.json:
        atomic_write(args.json, json.dumps(report.to_dict(), indent=2).encode())
        print(f"wrote {args.json}")
    if args.strict and report.problems:
        print(f"--strict: {len(report.problems)} problem(s) found; fix them or drop --strict", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
