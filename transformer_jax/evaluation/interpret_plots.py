"""The `inspect` command's figures (matplotlib's Agg backend: no display needed): attention maps
as one PNG grid of heads per layer, the logit lens as a layers x positions heat map of the
target's rank, and a probe's accuracy per layer."""

import os
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

MAX_LABELS = 48  # tick labels per axis; longer texts label every n-th token
COLUMNS = 4  # heads per row of an attention grid


def _label(piece: str) -> str:
  """A token piece as a tick label: SentencePiece's word boundary shown as a space, controls
  kept, newlines escaped."""
  return piece.replace("\u2581", " ").replace("\n", "\\n") or " "


def _ticks(ax, axis: str, pieces, size: int):
  step = max(1, -(-len(pieces) // MAX_LABELS))
  at = np.arange(0, len(pieces), step)
  set_ticks, set_labels = ((ax.set_xticks, ax.set_xticklabels) if axis == "x" else
                           (ax.set_yticks, ax.set_yticklabels))
  set_ticks(at)
  set_labels([_label(pieces[i]) for i in at], fontsize=size,
             **({"rotation": 90} if axis == "x" else {}))


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def attention_grid(probs_HTS, queries, keys, title: str, path: str) -> str:
  """One layer's heads as a grid of [queries x keys] heat maps (0..1), token labels on the axes;
  query head h = n * G + g."""
  heads = probs_HTS.shape[0]
  cols = min(heads, COLUMNS)
  rows = -(-heads // cols)
  t, s = probs_HTS.shape[1:]
  width, height = (1.2 + 0.13 * n ** 0.85 for n in (s, t))
  size = max(4, min(8, int(200 / max(t, s, 1))))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * width + 1.5, rows * height + 0.8),
                           squeeze=False, layout="constrained")
  image = None
  for h, ax in enumerate(axes.flat):
    if h >= heads:
      ax.axis("off")
      continue
    image = ax.imshow(probs_HTS[h], vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal",
                      interpolation="nearest")
    ax.set_title(f"head {h}", fontsize=9)
    _ticks(ax, "x", keys, size)
    _ticks(ax, "y", queries, size)
  fig.suptitle(title + "  (rows: queries, columns: keys)", fontsize=10)
  fig.colorbar(image, ax=axes, shrink=0.6)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def attention_grids(result: dict, out: str) -> list:
  """attention_grid for every layer of every attention kind (a cross-attention's keys are the
  source's tokens); the written paths."""
  os.makedirs(out, exist_ok=True)
  tokens = result["tokens"]
  paths = []
  for name, per_layer in result["attention"].items():
    source = name.startswith("encoder") or (name.endswith("cross_attention"))
    keys = result.get("source_tokens", tokens) if source else tokens
    queries = result.get("source_tokens", tokens) if name.startswith("encoder") else tokens
    for i, probs in enumerate(per_layer):
      path = os.path.join(out, f"{_safe(name)}_layer_{i}.png")
      paths.append(attention_grid(np.asarray(probs), queries, keys,
                                  f"{name}, layer {i}", path))
  return paths


def logit_lens(lens: dict, path: str) -> str:
  """Heat map of log2(rank) of each position's target per layer (0 = the lens's top token;
  blank where not scored: rank 0, a prefix LM's prefix), the layers' top-1 tokens written in the
  cells of short texts."""
  rows = lens["layers"]
  scored = len(lens["target_tokens"])
  ranks = np.asarray([r["rank"][:scored] for r in rows], np.float64).reshape(len(rows), scored)
  fig, ax = plt.subplots(figsize=(2 + 0.45 * max(scored, 4), 1.2 + 0.45 * len(rows)))
  image = ax.imshow(np.ma.masked_less(np.log2(np.maximum(ranks, 0.5)), 0), cmap="magma_r",
                    aspect="auto", interpolation="nearest")
  if scored <= 32:
    for i, row in enumerate(rows):
      for t in range(scored):
        ax.text(t, i, _label(row["top"][t][0])[:8], ha="center", va="center", fontsize=6,
                color="tab:cyan")
  _ticks(ax, "x", lens["target_tokens"], 7)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([r["layer"] for r in rows], fontsize=8)
  ax.set_xlabel(f"target ({lens['targets']})")
  ax.set_ylabel("layer")
  ax.set_title("logit lens: log2 rank of the target (cells: top-1 token)", fontsize=10)
  fig.colorbar(image, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def probe_accuracy(result: dict, path: str) -> str:
  """Held-out (and train) accuracy of the linear probe per layer, with chance."""
  layers = [r["layer"] for r in result["layers"]]
  x = np.arange(len(layers))
  fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(layers), 4))
  ax.plot(x, [r["heldout_accuracy"] for r in result["layers"]], "o-", label="held-out")
  ax.plot(x, [r["train_accuracy"] for r in result["layers"]], "s--", alpha=0.6, label="train")
  ax.axhline(result["chance"], color="gray", linestyle=":", label="chance (majority)")
  ax.set_xticks(x)
  ax.set_xticklabels(layers)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("layer")
  ax.set_ylabel("accuracy")
  ax.set_title(f"linear probe: {result['label_field']} ({result['classes']} classes)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
