"""Training benchmark: run train.py configurations, print wall time and held-out accuracy as a table.

    python training/benchmark.py                                   # the default transfer run on ELPV
    python training/benchmark.py --runs "--mode transfer" "--mode finetune --epochs 2 --image-size 224"

Each configuration runs as its own process (cold start included, as a user would see it); the feature
cache is cleared first unless --warm-cache is given, so transfer timings include feature extraction.
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

from training.runs import ARTIFACTS, RUNS


def run_one(extra: str, name: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("train.py")),
        *shlex.split(extra),
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
        "wall_s": wall,
        "accuracy": 100 * m["accuracy"],
        "balanced": 100 * m["balanced_accuracy"],
        "split": f"{m['eval_split']} ({m['n']})",
        "epochs": m["best_epoch"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["--mode transfer"], help="train.py arguments per configuration")
    p.add_argument("--warm-cache", action="store_true", help="keep cached transfer features")
    args = p.parse_args(argv)
    rows = []
    for i, extra in enumerate(args.runs):
        if not args.warm_cache:
            shutil.rmtree(ARTIFACTS / "cache" / "features", ignore_errors=True)
        rows.append(run_one(extra, f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{i}"))
        print(f"done: {extra} ({rows[-1]['wall_s']:.0f} s)", flush=True)
    print("\n| configuration | wall time | held-out top-1 | balanced | split | best epoch |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['config']}` | {r['wall_s']:.0f} s | error: {r['error']} | | | |")
        else:
            print(
                f"| `{r['config']}` | {r['wall_s'] / 60:.1f} min | {r['accuracy']:.2f} % | {r['balanced']:.2f} % | "
                f"{r['split']} | {r['epochs']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
