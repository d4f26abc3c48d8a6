"""Draw docs/benchmarks.png from the JSON files the benchmarks wrote.

    pip install -e '.[bench]'
    python bench/plot.py [--results bench/results] [--out docs/benchmarks.png]

Left: pipeline throughput (bench/pipeline.py --json) per model preset. Right: end-to-end
latency per offered rate (bench/latency.py --json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def contenders(run: dict) -> dict[str, dict]:
    """Per contender: images/s and its ratio against the published inference in the same layout."""
    return {name: {"images_per_s": s["images_per_s"], "ratio": s.get("vs_published_fp32", float("nan"))}
            for name, s in run["summary"].items()}


def pipeline_panel(ax, runs: list[dict]) -> None:
    names = list(dict.fromkeys(name for run in runs for name in contenders(run)))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        present = [(x, contenders(run)[name]) for x, run in enumerate(runs) if name in contenders(run)]
        bars = ax.bar([x + i * width for x, _ in present], [c["images_per_s"] for _, c in present], width, label=name)
        for bar, (_, c) in zip(bars, present):
            ax.annotate(f"{c['ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(runs))])
    ax.set_xticklabels([f"{run['preset']}, {run.get('workers', '?')} processes\n{run['images']} CRs "
                        f"{run['size'][0]}x{run['size'][1]}" for run in runs])
    ax.set_ylabel("images/s (2-core CPU), SEG + SR written")
    ax.set_title("Pipeline: published covid_scoring vs cxrtriage (ratio: vs published, same layout)")
    ax.legend(fontsize=7)


def latency_panel(ax, report: dict) -> None:
    variants = list(dict.fromkeys(run["variant"] for run in report["runs"]))
    for run in report["runs"]:
        values = sorted(run["latencies"])
        style = "-" if run.get("steady", run["rate"] <= 1) else "--"
        ax.plot(values, [(k + 1) / len(values) for k in range(len(values))], style,
                color=f"C{variants.index(run['variant'])}",
                label=f"{run['variant']}, {run['rate']:g}/s offered: p50 {run['p50']:.1f} s, p95 {run['p95']:.1f} s"
                + ("" if run.get("steady", run["rate"] <= 1) else " (not steady: above capacity)"))
    ax.set_xscale("log")
    ax.set_xlabel("C-STORE success -> SR at destination (s)")
    ax.set_ylabel("fraction of images")
    ax.set_title("Node end to end: C-STORE to SR at PACS")
    ax.legend(fontsize=7, loc="lower right")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.png"))
    args = parser.parse_args()
    pipelines = [json.loads(p.read_text()) for p in sorted(args.results.glob("pipeline-*.json"))]
    pipelines = [run for run in pipelines if "summary" in run]  # older files compared unequal layouts
    latency = args.results / "latency.json"
    panels = bool(pipelines) + latency.exists()
    if not panels:
        raise SystemExit(f"no pipeline-*.json or latency.json in {args.results}: run the benchmarks with --json")
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    column = 0
    if pipelines:
        pipeline_panel(axes[0][column], pipelines)
        column += 1
    if latency.exists():
        latency_panel(axes[0][column], json.loads(latency.read_text()))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
