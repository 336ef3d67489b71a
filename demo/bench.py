"""The demo's Benchmark tab: held-out images through each backend, one request at a time, warm."""

from __future__ import annotations

import time

import numpy as np

from demo.backends import Runners, ServedModel
from demo.examples import held_out


def benchmark_rows(runners: Runners, m: ServedModel, n: int, progress=None) -> list[list]:
    held = held_out(m, n)
    results = {}
    for bi, b in enumerate(m.backends()):
        run = runners.get(m, b)
        for x in held.x[:3]:
            run(x[None])  # warm-up: first calls allocate and pick kernels
        logits, lat = [], []
        for i, x in enumerate(held.x):
            t = time.perf_counter()
            logits.append(run(x[None])[0])
            lat.append(1e3 * (time.perf_counter() - t))
            if progress is not None and i % 8 == 0:
                progress((bi + i / len(held.x)) / len(m.backends()), desc=f"{b}: {i}/{len(held.x)}")
        results[b] = (np.stack(logits), np.asarray(lat))
    ref_name = "pytorch" if "pytorch" in results else next(iter(results))
    ref = results[ref_name][0].argmax(1)
    truth = np.where(held.y >= 0, held.y, ref)
    rows = []
    for b, (logits, lat) in results.items():
        pred = logits.argmax(1)
        rows.append(
            [
                b,
                round(100 * float((pred == truth).mean()), 2),
                round(100 * float((pred == ref).mean()), 2),
                round(float(np.median(lat)), 2),
                round(float(np.percentile(lat, 95)), 2),
                round(1e3 / float(np.mean(lat)), 1),
                round(m.path(b).stat().st_size / 2**20, 2),
            ]
        )
    return rows


def benchmark_plot(rows: list[list]):
    from training.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        ax.scatter(r[3], r[1], s=40 + 6 * r[6])
        ax.annotate(r[0], (r[3], r[1]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="latency p50 (ms, batch 1)", ylabel="held-out accuracy (%)", title="accuracy vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
