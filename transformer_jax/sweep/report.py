"""What `sweep fit` writes next to fit.json: three PNG plots (matplotlib's Agg backend, so no
display is needed), report.md, which links them and lists every fitted constant with its
interval beside the published ones, and runs.jsonl, the runs fitted; plus the short text
summary the CLI prints."""

import collections
import io
import json
import math

import matplotlib

matplotlib.use("Agg")

from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
from transformer_jax.sweep import fit as fit_lib  # pylint: disable=g-import-not-at-top

PLOTS = {"isoflop.png": "isoFLOP curves with fitted parabolas (approach 2)",
         "frontier.png": "loss frontier vs params, tokens and compute (Kaplan-style laws)",
         "optimal.png": "compute-optimal N_opt(C) and D_opt(C)"}
KAPLAN_EXPONENTS = {"params": 0.076, "tokens": 0.095, "flops": 0.050}  # Kaplan et al. 2020
LABELS = {"params": "params N", "tokens": "tokens D", "flops": "compute C (FLOPs)"}


def _g(x):
  return "n/a" if x is None else f"{x:.4g}"


def _interval(pair):
  return f"[{_g(pair[0])}, {_g(pair[1])}]"


def _budget_index(runs, fit):
  """Run indices per isoFLOP budget, the same grouping fit_isoflop used."""
  return fit_lib.group_close(runs.flops, fit["budget_rtol"])


def _compute_range(runs):
  """FLOPs from a third of the smallest budget to 10x the largest: the fits and a decade past."""
  return np.logspace(np.log10(runs.flops.min() / 3), np.log10(runs.flops.max() * 10), 60)


def _bootstrap_band(fit, flops, level):
  """Percentile bands of approach 3's compute-optimal (N, D, loss) at each C, over resamples."""
  draws = {k: np.asarray(v)[:, None] for k, v in fit["approach3"]["bootstrap"]["samples"].items()}
  tail = 100 * (1 - level) / 2
  with np.errstate(all="ignore"):  # (degenerate resamples: nan; an unpinned fit's: inf too)
    samples = fit_lib.compute_optimal(draws, flops[None, :], fit["approach3"].get("cost"))
    return [np.nanpercentile(s, [tail, 100 - tail], axis=0) for s in samples]


def plot_isoflop(path, runs, fit):
  """Loss vs N per budget: the runs, approach 2's parabola and its minimum, and approach 3's
  L(N, C/6N) dashed for comparison."""
  fig, ax = plt.subplots(figsize=(7, 5))
  groups = _budget_index(runs, fit)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
  parabolas = {round(np.log(b["flops"]), 9): b for b in fit["approach2"]["budgets"]}
  for index, color in zip(groups, colors):
    flops = fit_lib.geomean(runs.flops[index])
    ax.scatter(runs.params[index], runs.loss[index], color=color, s=18, label=f"C = {flops:.2g}")
    n = np.geomspace(runs.params[index].min() / 1.5, runs.params[index].max() * 1.5, 80)
    ax.plot(n, fit_lib.law(fit["approach3"]["constants"], n, flops / (6 * n)), "--", color=color,
            lw=0.8, alpha=0.7)
    budget = parabolas.get(round(np.log(flops), 9))
    if budget:
      ax.plot(n, np.polyval(budget["parabola"], np.log(n)), color=color, lw=1.2)
      ax.plot(budget["params_opt"], budget["loss_opt"], "*", color=color, ms=11, mec="k", mew=0.5)
  ax.set(xscale="log", xlabel="params N", ylabel="final eval loss",
         title="isoFLOP curves: parabola in log N (solid), approach 3 (dashed), minima (*)")
  ax.title.set_fontsize(9)
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_frontier(path, runs, fit):
  """Loss vs N, D and C: every run, the lower envelope, its power law, and (vs C) approach 3's
  compute-optimal loss with its bootstrap band."""
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
  for ax, key in zip(axes, ("params", "tokens", "flops")):
    law = fit["kaplan"][key]
    x = fit_lib.kaplan_n(runs)[0] if key == "params" else getattr(runs, key)
    ax.scatter(x, runs.loss, s=10, color="0.7", label="runs")
    points = np.array(law["points"])
    ax.plot(points[:, 0], points[:, 1], "o", color="k", ms=4, label="frontier")
    if law["scale"] is not None:  # (a frontier too flat for a finite X_c has none)
      grid = np.geomspace(x.min(), x.max(), 50)
      ax.plot(grid, (law["scale"] / grid) ** law["exponent"], color="C3",
              label=f"(X_c/X)^{law['exponent']:.3f}")
    ax.set(xscale="log", yscale="log",
           xlabel=f"N: {law['n']}" if key == "params" else LABELS[key])
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
  flops = _compute_range(runs)
  fit3 = fit["approach3"]
  _, _, loss_band = _bootstrap_band(fit, flops, fit3["level"])
  axes[2].plot(flops, fit_lib.compute_optimal(fit3["constants"], flops, fit3.get("cost"))[2],
               color="C0",
               label="approach 3 optimum")
  axes[2].fill_between(flops, *loss_band, color="C0", alpha=0.2)
  axes[0].set_ylabel("final eval loss")
  for ax in axes:
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_optimal(path, runs, fit):
  """N_opt(C) and D_opt(C): approach 2's per-budget minima and line, approach 3's optimum
  (compute_optimal) with its bootstrap band, over the sweep's budgets and a decade beyond."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  flops = _compute_range(runs)
  fit2, fit3 = fit["approach2"], fit["approach3"]
  closed_form = fit_lib.compute_optimal(fit3["constants"], flops, fit3.get("cost"))
  bands = _bootstrap_band(fit, flops, fit3["level"])
  for i, (ax, key, exponent) in enumerate(zip(axes, ("params", "tokens"), ("a", "b"))):
    ax.plot(flops, closed_form[i], color="C0",
            label=f"approach 3: ∝ C^{fit3['constants'][exponent]:.3f}")
    ax.fill_between(flops, *bands[i], color="C0", alpha=0.2)
    minima = [(b["flops"], b[f"{key}_opt"]) for b in fit2["budgets"]]
    if minima:
      ax.plot(*zip(*minima), "s", color="C1", ms=5, label="isoFLOP minima")
    if fit2["a"] is not None:
      ax.plot(flops, fit2[f"{key}_coef"] * flops ** fit2[exponent], "--", color="C1",
              label=f"approach 2: ∝ C^{fit2[exponent]:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)",
           ylabel=f"compute-optimal {LABELS[key]}")
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def _approach3_section(fit):
  fit3 = fit["approach3"]
  refs = {name: dict(c, **_exponents(c)) for name, c in fit_lib.REFERENCE_LAWS.items()}
  level = f"{fit3['level']:.0%}"
  lines = [
      "## Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta", "",
      f"Huber loss (delta {fit3['huber_delta']:g}) on log-loss, L-BFGS-B from the best points of "
      f"Chinchilla's initialization grid; {level} percentile intervals from "
      f"{fit3['bootstrap']['resamples']} bootstrap resamples of the runs (seed "
      f"{fit3['bootstrap']['seed']}). a = beta/(alpha+beta), b = alpha/(alpha+beta) give "
      "N_opt ∝ C^a, D_opt ∝ C^b.", "",
      f"| constant | fit | {level} interval | " + " | ".join(refs) + " |",
      "|---|---|---|" + "---|" * len(refs)]
  for key, value in fit3["constants"].items():
    lines.append(f"| {key} | {_g(value)} | {_interval(fit3['intervals'][key])} | "
                 + " | ".join(_g(r[key]) for r in refs.values()) + " |")
  if fit_lib.bound_warning(fit3):
    lines += ["", "**" + fit_lib.bound_warning(fit3) + "**"]
  holdout = fit.get("holdout")
  if holdout:
    lines += ["", "Held-out check: refitted without the largest budget (C = "
              f"{holdout['flops']:.3g}, {holdout['runs']} runs), the law predicts those runs' "
              f"losses within {holdout['mean_abs_rel_error']:.2%} on average "
              f"({holdout['max_abs_rel_error']:.2%} at worst)."]
  return lines


def _exponents(constants):
  return {"a": constants["beta"] / (constants["alpha"] + constants["beta"]),
          "b": constants["alpha"] / (constants["alpha"] + constants["beta"])}


def _approach2_section(fit):
  fit2 = fit["approach2"]
  lines = ["## Chinchilla approach 2: isoFLOP parabolas", ""]
  if fit2["budgets"]:
    lines += ["| budget C | runs | N_opt | D_opt | D/N | loss at N_opt | inside sampled N |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {b['flops']:.3g} | {b['runs']} | {_g(b['params_opt'])} | {_g(b['tokens_opt'])} "
              f"| {b['tokens_opt'] / b['params_opt']:.3g} | {_g(b['loss_opt'])} | "
              f"{'yes' if b['inside_sampled_range'] else 'no (extrapolated)'} |"
              for b in fit2["budgets"]]
  reasons = collections.Counter(s["reason"] for s in fit2["skipped"])
  lines += [f"- {count} budget(s) skipped: {reason}" for reason, count in reasons.items()]
  if fit2["a"] is None:
    lines += ["", f"No exponents: {fit2['reason']}."]
  else:
    implied = fit["approach3"]["constants"]
    lines += ["", f"N_opt ∝ C^{fit2['a']:.4f}, D_opt ∝ C^{fit2['b']:.4f} (approach 3 implies "
              f"a = {implied['a']:.4f}, b = {implied['b']:.4f}; Kaplan et al. 2020 had 0.73)."]
  return lines


def _kaplan_section(fit):
  lines = ["## Kaplan-style laws on the frontier: L = (X_c / X)^exponent", "",
           "| X | exponent | X_c | frontier points | Kaplan et al. 2020 |", "|---|---|---|---|---|"]
  for key, law in fit["kaplan"].items():
    lines.append(f"| {LABELS[key]} | {_g(law['exponent'])} | {_g(law['scale'])} | "
                 f"{len(law['points'])} | {KAPLAN_EXPONENTS[key]} |")
  lines += ["", f"N here is {fit['kaplan']['params'].get('n', 'params')}, as in Kaplan et al.; "
            "Chinchilla's approaches 2 and 3 above use `params` (every matmul parameter, the "
            "tied embedding included), as Hoffmann et al. count N."]
  return lines


def _predictions_section(fit, runs):
  """Compute-optimal choices at the largest budget and one and two decades past it."""
  lines = ["## Compute-optimal predictions (approach 3)", "",
           "| C | N_opt | D_opt | D/N | loss | N interval | D interval | loss interval |",
           "|---|---|---|---|---|---|---|---|"]
  for flops in runs.flops.max() * np.array([1, 10, 100]):
    p = fit_lib.predict(fit, float(flops))
    iv = p["intervals"] or dict.fromkeys(("params", "tokens", "loss"), (None, None))
    lines.append(f"| {flops:.3g} | {_g(p['params'])} | {_g(p['tokens'])} | "
                 f"{_g(p['tokens_per_param'])} | {_g(p['loss'])} | {_interval(iv['params'])} | "
                 f"{_interval(iv['tokens'])} | {_interval(iv['loss'])} |")
  cost = fit["approach3"].get("cost")
  spent = (f"D = C / ({cost['coef']:.3g}·N^{cost['slope']:.3f}), the runs' FLOPs per token, "
           "attention included" if cost else "C = 6·N·D")
  return lines + ["", f"Each (N, D) spends C at {spent}. `python -m transformer_jax.sweep "
                      "predict --fit=DIR --flops=C` gives others."]


def markdown(fit, runs, runs_path) -> str:
  """report.md: the runs, every fit with its intervals next to published values, the plots."""
  budgets = len(_budget_index(runs, fit))
  lines = ["# Scaling-law fit", "",
           f"{len(runs)} runs from `{runs_path}` in {budgets} FLOP budget(s): params "
           f"{runs.params.min():.3g}–{runs.params.max():.3g}, tokens {runs.tokens.min():.3g}–"
           f"{runs.tokens.max():.3g}, FLOPs {runs.flops.min():.3g}–{runs.flops.max():.3g}, final "
           f"loss {runs.loss.min():.4g}–{runs.loss.max():.4g}.", ""]
  for section in (_approach3_section(fit), _approach2_section(fit), _kaplan_section(fit),
                  _predictions_section(fit, runs)):
    lines += section + [""]
  lines += ["## Plots", ""] + [f"![{title}]({name})" + "\n" for name, title in PLOTS.items()]
  return "\n".join(lines)


def write(out_dir, runs, fit, runs_path) -> list:
  """Writes fit.json, the PNGs, report.md and the runs fitted (runs.jsonl, unless that is
  `runs_path`: `sweep fit --runs=OUT/runs.jsonl` refits the report from its own folder) into
  out_dir (local or gs://...); returns their paths."""
  paths.makedirs(out_dir)
  written = [fit_lib.save_fit(out_dir, fit)]
  copy = paths.join(out_dir, "runs.jsonl")
  if paths.abspath(copy) != paths.abspath(runs_path):
    rows = [{"params": float(n), "tokens": float(d), "loss": float(l), "flops": float(c),
             **({} if math.isnan(e) else {"params_nonembed": float(e)})}
            for n, d, l, c, e in zip(runs.params, runs.tokens, runs.loss, runs.flops,
                                     runs.nonembed)]
    paths.write_text(copy, "".join(json.dumps(r) + "\n" for r in rows))
    written.append(copy)
  for name, plot in zip(PLOTS, (plot_isoflop, plot_frontier, plot_optimal)):
    written.append(paths.join(out_dir, name))
    if paths.is_remote(out_dir):  # drawn in memory, written as one object
      png = io.BytesIO()
      plot(png, runs, fit)
      paths.path(written[-1]).write_bytes(png.getvalue())
    else:
      plot(written[-1], runs, fit)
  written.append(paths.join(out_dir, "report.md"))
  paths.write_text(written[-1], markdown(fit, runs, runs_path))
  return written


def text_summary(fit) -> str:
  """The few lines the CLI prints before its JSON line."""
  fit3, fit2 = fit["approach3"], fit["approach2"]
  lines = [f"approach 3 on {fit3['runs']} runs: L(N, D) = E + A/N^alpha + B/D^beta "
           f"({fit3['level']:.0%} intervals, {fit3['bootstrap']['resamples']} resamples)"]
  lines += [f"  {key:<6} {_g(value):>10}  {_interval(fit3['intervals'][key])}"
            for key, value in fit3["constants"].items()]
  lines += [fit_lib.bound_warning(fit3)] * bool(fit_lib.bound_warning(fit3))
  if fit2["a"] is None:
    lines.append(f"approach 2: {fit2['reason']}")
  else:
    lines.append(f"approach 2 on {len(fit2['budgets'])} budgets: N_opt ∝ C^{fit2['a']:.4f}, "
                 f"D_opt ∝ C^{fit2['b']:.4f}")
  kaplan = fit["kaplan"]
  lines.append("frontier exponents: " + ", ".join(
      f"L({x}) {_g(kaplan[k]['exponent'])}" for k, x in zip(kaplan, "NDC")))
  return "\n".join(lines)
