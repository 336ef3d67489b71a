"""Parameters, multiply-adds and size of a model (seed 001's torchsummary table), or of the whole zoo.

python training/summary.py --model efficientnet_lite0
python training/summary.py --all --image-size 224
python training/summary.py --checkpoint artifacts/runs/latest/best.pt
"""

from __future__ import annotations

import argparse

import torch
from torchinfo import summary

from core.checkpoint import load_model
from core.errors import UserError, run_cli
from core.models import create_model, get_entry, list_models
from training.runs import resolve_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help=f"one of: {', '.join(list_models())}")
    g.add_argument("--all", action="store_true", help="one table row per registered model")
    g.add_argument("--checkpoint", help="a trained checkpoint or run folder")
    p.add_argument("--image-size", type=int, help="input side (default: the model's)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--depth", type=int, default=3, help="layer-table depth for a single model")
    return p


def stats(model: torch.nn.Module, in_channels: int, size: int, depth: int = 0):
    info = summary(
        model,
        (1, in_channels, size, size),
        verbose=0,
        depth=depth,
        device="cpu",
        col_names=("output_size", "num_params", "mult_adds"),
    )
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    return info, info.total_params, info.total_mult_adds, size_mb


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.all:
        print("| model | input | params (M) | MACs (G) | size fp32 (MB) |\n|---|---|---|---|---|")
        for name in list_models():
            size = args.image_size or get_entry(name).default_size
            try:
                m = create_model(name, args.num_classes, args.in_channels, size).eval()
                _, p, macs, mb = stats(m, args.in_channels, size)
                print(f"| {name} | {size} | {p / 1e6:.2f} | {macs / 1e9:.3f} | {mb:.1f} |", flush=True)
            except (UserError, RuntimeError) as e:
                print(f"| {name} | {size} | - | - | {str(e).splitlines()[0][:60]} |")
        return 0
    if args.checkpoint:
        m, ck = load_model(resolve_checkpoint(args.checkpoint))
        size, ch = ck.spec.image_size, ck.spec.in_channels
    else:
        name = args.model or "efficientnet_lite0"
        size, ch = args.image_size or get_entry(name).default_size, args.in_channels
        m = create_model(name, args.num_classes, ch, size).eval()
    info, p, macs, mb = stats(m, ch, size, args.depth)
    print(info)
    print(f"params {p / 1e6:.3f} M | MACs {macs / 1e9:.3f} G at {ch}x{size}x{size} | fp32 size {mb:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
