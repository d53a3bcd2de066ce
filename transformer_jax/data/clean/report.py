"""OUT/report.md: what the cleaner kept and removed, with a plot per filter (OUT/plots/*.png)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

_TITLES = {"exact_duplicate": "Exact deduplication", "language": "Language identification",
           "quality": "Quality rules", "near_duplicate": "Near deduplication (MinHash LSH)"}


def _draw(figures, path: str) -> None:
  """One PNG per stage: its figures side by side, three to a row."""
  cols = min(3, len(figures))
  rows = -(-len(figures) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.2 * cols), 3.2 * rows), squeeze=False)
  for ax, figure in zip(axes.flat, figures):
    _draw_axes(ax, figure)
  for ax in axes.flat[len(figures):]:
    ax.axis("off")
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.18 / rows, top=1 - 0.1 / rows,
                      wspace=0.3, hspace=0.6)
  fig.savefig(path, dpi=72)
  plt.close(fig)


def _draw_axes(ax, figure) -> None:
  if figure.kind == "bar":
    x = np.arange(len(figure.x))
    width = 0.8 / max(len(figure.series), 1)
    for i, (name, values) in enumerate(figure.series.items()):
      ax.bar(x + i * width, values, width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, figure.x, rotation=45, ha="right", fontsize=8)
  elif figure.kind == "hist":
    edges = np.asarray(figure.x)
    for name, counts in figure.series.items():
      ax.stairs(counts, edges, label=name, fill=len(figure.series) == 1, alpha=0.7)
    for mark in figure.marks:
      ax.axvline(mark, color="red", linestyle="--", linewidth=1)
    if figure.log:
      ax.set_xscale("log")
  else:  # trace
    for name, values in figure.series.items():
      ax.plot(figure.x, values, label=name)
  ax.set_title(figure.title, fontsize=8)
  ax.set_xlabel(figure.xlabel, fontsize=8)
  ax.set_ylabel(figure.ylabel, fontsize=8)
  ax.tick_params(labelsize=7)
  if len(figure.series) > 1:
    ax.legend(fontsize=7)


def _overview(summary: dict) -> list[str]:
  bad = summary["bad"]
  lines = ["| | documents |", "|---|---|", f"| read | {summary['documents_in']:,} |"]
  lines += [f"| removed: {k} | {v:,} |" for k, v in summary["removed"].items()]
  lines += [f"| kept | {summary['documents_out']:,} |", "",
            f"{summary['mb_in']:.1f} MB read, {summary['mb_out']:.1f} MB written in "
            f"{summary['shards']} shard(s); {summary['documents_per_s']:,.0f} documents/s, "
            f"{summary['mb_per_s']:.2f} MB/s with {summary['workers']} worker(s). Bad input "
            f"(counted, not fatal): {', '.join(f'{k} {v}' for k, v in bad.items())}. Stages run: "
            f"{', '.join(summary['stages']) or 'none'} (in that order; a document is counted by "
            f"the first stage that removes it)."]
  return lines


def write(out: str, summary: dict, stages, plots: bool = True) -> str:
  """Writes OUT/report.md and (unless `plots` is False) a plot per stage in OUT/plots/ (OUT: the
  run's new folder, output.staged's)."""
  plot_dir = os.path.join(out, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  lines = ["# Cleaning report", ""] + _overview(summary)
  for stage in stages:
    count = summary["removed"][stage.name]
    lines += ["", f"## {_TITLES.get(stage.name, stage.name)}", "",
              f"Removed {count:,} documents" + (f"; samples in `removed/{stage.name}.jsonl`."
                                                 if count else "."), ""]
    if stage.name == "quality" and summary.get("quality_rules"):
      lines += ["| rule | removed |", "|---|---|"]
      lines += [f"| {k} | {v:,} |" for k, v in summary["quality_rules"].items()] + [""]
    figures = stage.figures()
    if plots and figures:
      _draw(figures, os.path.join(plot_dir, f"{stage.name}.png"))
      titles = "; ".join(f.title for f in figures)
      lines += [f"![{titles}](plots/{stage.name}.png)", ""]
  path = os.path.join(out, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path
