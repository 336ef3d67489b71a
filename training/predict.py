"""Top-k predictions for image files, folders or globs, with an optional annotated grid or JSON.

python training/predict.py photo.jpg folder/ "more/*.png" --topk 5
python training/predict.py samples/ --grid predictions.png --json predictions.json
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch

from core.checkpoint import load_model
from core.errors import UserError, run_cli
from core.images import ImageError, is_image_file, load_image
from core.transforms import eval_transform
from training.plots import image_grid
from training.runs import resolve_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--checkpoint", help="checkpoint or run folder (default artifacts/runs/latest/best.pt)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--grid", type=Path, help="write an annotated grid PNG here")
    p.add_argument("--json", type=Path, help="write predictions as JSON here ('-' for stdout)")
    return p


def expand_inputs(patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.exists():
            out.append(p)
        else:
            hits = sorted(Path(h) for h in glob.glob(pat, recursive=True) if Path(h).is_file())
            if not hits:
                raise UserError(f"{pat}: no such file, folder or matching glob")
            out += hits
    if not out:
        raise UserError("no image files found in the given inputs")
    return out


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    model, ck = load_model(resolve_checkpoint(args.checkpoint))
    names, tf = ck.spec.class_names, eval_transform(ck.spec)
    k = max(1, min(args.topk, len(names)))
    results, shown, captions, failed = [], [], [], 0
    for path in expand_inputs(args.images):
        try:
            im = load_image(path)
        except ImageError as e:
            failed += 1
            print(f"{path}: error: {e}")
            results.append({"file": str(path), "error": str(e)})
            continue
        probs = model(tf(im)[None]).softmax(1)[0]
        top = probs.topk(k)
        preds = [{"label": names[i], "prob": round(float(p), 6)} for p, i in zip(top.values, top.indices, strict=True)]
        results.append({"file": str(path), "top": preds})
        print(f"{path}: " + ", ".join(f"{p['label']} {p['prob']:.1%}" for p in preds))
        if args.grid and len(shown) < 48:
            shown.append(im)
            captions.append(f"{path.name[:22]}\n{preds[0]['label']} {preds[0]['prob']:.0%}")
    if args.grid and shown:
        image_grid(shown, captions, args.grid)
        print(f"wrote {args.grid}")
    if args.json:
        text = json.dumps(results, indent=2)
        print(text) if str(args.json) == "-" else args.json.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
