"""Training benchmark: run train.py configurations, print wall time and held-out accuracy as a table.

    python training/benchmark.py                                   # the default transfer run on ELPV
    python training/benchmark.py --runs "--mode transfer" "--mode finetune --epochs 2 --image-size 224"
    python training/benchmark.py --seeds 0 1 2                     # mean +- std over seeds

Each configuration runs as its own process (cold start included, as a user would see it); the feature
cache is cleared before a configuration's first seed unless --warm-cache is given, so its first wall time
includes feature extraction (later seeds reuse the cache: their wall time is the warm one).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from training.runs import ARTIFACTS, RUNS


def run_one(extra: str, name: str, seed: int = 0) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("train.py")),
        *shlex.split(extra),
        "--seed",
        str(seed),
        "--name",
        name,
        "--no-progress",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"config": extra, "wall_s": wall, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    m = json.loads((RUNS / name / "metrics.json").read_text())
    return {
        "config": extra,
        "seed": seed,
        "wall_s": wall,
        "accuracy": 100 * m["accuracy"],
        "balanced": 100 * m["balanced_accuracy"],
        "split": f"{m['eval_split']} ({m['n']})",
        "epochs": m["best_epoch"],
        # what chose the epoch (validation); absent in a run whose held-out split is the validation split itself
        "val": 100 * m["val_accuracy"] if m["eval_split"] != "val" else None,
        "val_balanced": 100 * m["val_balanced_accuracy"] if m["eval_split"] != "val" else None,
    }


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} %"


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def seeds_mean(rows: list[dict], key: str) -> str:
    """Mean ± sample std of one figure over the seeds that have it ("—" where none has: no separate validation)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{mean_std(values)} %" if values else "—"


def summary_rows(rows: list[dict]) -> list[str]:
    """One line per configuration: mean ± sample std over its seeds (the headline figures)."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        ok = [r for r in rows if r["config"] == config and "error" not in r]
        if not ok:
            continue
        walls = [r["wall_s"] / 60 for r in ok]
        figures = " | ".join(seeds_mean(ok, key) for key in ("val", "val_balanced", "accuracy", "balanced"))
        out.append(
            f"| `{config}` | {len(ok)} | {walls[0]:.1f} min (cold), {np.mean(walls[1:] or walls):.1f} min (warm) | "
            f"{figures} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["--mode transfer"], help="train.py arguments per configuration")
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="--seed values; each configuration runs once per seed"
    )
    p.add_argument("--warm-cache", action="store_true", help="keep cached transfer features")
    args = p.parse_args(argv)
    rows = []
    for i, extra in enumerate(args.runs):
        for seed in args.seeds:
            if not args.warm_cache and seed == args.seeds[0]:
                shutil.rmtree(ARTIFACTS / "cache" / "features", ignore_errors=True)
            rows.append(run_one(extra, f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{i}-s{seed}", seed))
            print(f"done: {extra} seed {seed} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    head = "configuration | seed | wall time | val top-1 | val balanced | held-out top-1 | balanced | split | epoch"
    print(f"\n| {head} |\n" + "|---" * 9 + "|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['config']}` | {r['seed']} | {r['wall_s']:.0f} s | error: {r['error']} | | | | | |")
        else:
            print(
                f"| `{r['config']}` | {r['seed']} | {r['wall_s'] / 60:.1f} min | {pct(r['val'])} | "
                f"{pct(r['val_balanced'])} | {r['accuracy']:.2f} % | {r['balanced']:.2f} % | {r['split']} | "
                f"{r['epochs']} |"
            )
    print(
        "\n| configuration | seeds | wall time | val top-1 (mean ± std) | val balanced | top-1 (mean ± std) "
        "| balanced (mean ± std) |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(summary_rows(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
