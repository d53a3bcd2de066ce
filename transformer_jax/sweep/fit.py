"""Scaling-law fits of a sweep's runs: pure numpy/scipy (no JAX), so fitting is cheap anywhere.

Each run is (params N, tokens D, final eval loss L, training FLOPs C; C = 6·N·D when not given).
Three fits, as in the literature (constants to compare with: ../shared/ANCHORS.md §5):

- Chinchilla approach 2 (Hoffmann et al. 2022): group runs into isoFLOP budgets, fit a parabola
  of L in log N per budget, its minimum is N_opt(C); then N_opt ∝ C^a and D_opt ∝ C^b by least
  squares in log space, D_opt = C / (the budget's FLOPs per token at N_opt: a power law in N
  through its runs' C/D; 6·N_opt when C = 6·N·D, and more when C counts attention too).
- Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta, fitted as
  LSE(a - alpha·log N, b - beta·log D, e) ≈ log L (a = log A, b = log B, e = log E) under a Huber
  loss (delta 1e-3) with L-BFGS-B from a grid of initializations; bootstrap resamples of the runs
  give percentile intervals (Besiroglu et al. 2024 showed why the intervals matter).
- Kaplan et al. 2020: L = (X_c / X)^exponent on the frontier (best loss at each N, D or C).

`fit_runs` returns one JSON-ready dict (saved as fit.json); `predict` reads that dict back.
"""

import dataclasses
import json
import math
import os
import tempfile

import numpy as np
from scipy import optimize
from scipy import special

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus

HUBER_DELTA = 1e-3  # on log-loss residuals, as Hoffmann et al. 2022
BUDGET_RTOL = 0.05  # runs whose FLOPs agree within 5% share an isoFLOP budget
MIN_RUNS = 6  # approach 3 has five free constants: one run more than that, at the very least
# Chinchilla's initialization grid (Hoffmann et al. 2022, appendix D.2): 5·5·5·6·6 = 4500 points.
INIT_GRID = {"a": np.arange(0, 26, 5.0), "b": np.arange(0, 26, 5.0), "e": np.arange(-1, 1.01, 0.5),
             "alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5)}
# Published fits of L(N, D) to compare with (../shared/ANCHORS.md §5).
REFERENCE_LAWS = {
    "Chinchilla": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
    "Epoch AI": {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658},
}
FIT_FILE = "fit.json"
THETA = ("a", "b", "e", "alpha", "beta")  # the optimizer's parameter vector, in this order
# alpha and beta >= 0 keep the law decreasing in N and D; the log-scale constants are free.
BOUNDS = [(None, None), (None, None), (None, None), (0.0, 4.0), (0.0, 4.0)]
# An exponent whose term moves the loss by less than this share of it across the runs' N (or
# D) is not pinned by them: a loss flat in N fits alpha ~ 5e-4 with A ~ 1, a constant.
PINNED_SHARE = 0.01
# An isoFLOP parabola whose minimum lies further than this outside the sampled ln N is skipped.
VERTEX_REACH = 3.0


@dataclasses.dataclass(frozen=True)
class Runs:
  """A sweep's results as parallel float arrays (one entry per run)."""
  params: np.ndarray
  tokens: np.ndarray
  loss: np.ndarray
  flops: np.ndarray
  nonembed: np.ndarray  # non-embedding params (Kaplan's N); NaN where the runs file lacks it

  def __len__(self):
    return len(self.loss)

  def take(self, index):
    return Runs(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def make_runs(params, tokens, loss, flops=None, nonembed=None) -> Runs:
  """Runs from sequences; a missing (None) flops entry becomes 6·N·D, the usual estimate; a
  missing non-embedding count stays NaN."""
  params, tokens, loss = (np.asarray(x, dtype=np.float64) for x in (params, tokens, loss))
  def optional(xs):
    xs = [None] * len(params) if xs is None else xs
    return np.array([np.nan if x is None else x for x in xs], np.float64)
  given, nonembed = optional(flops), optional(nonembed)
  return Runs(params, tokens, loss, np.where(np.isnan(given), 6.0 * params * tokens, given),
              nonembed)


def _positive_number(row, key, where):
  value = row[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
  if not math.isfinite(value) or value <= 0:
    raise ConfigError(f"{where}: {key} must be positive and finite, got {value!r}")
  return float(value)


def load_runs(path) -> Runs:
  """Reads RUNS.jsonl: one JSON object per line with params, tokens, loss and optionally flops.
  Every malformed line is a ConfigError naming the file and line."""
  if not paths.isfile(path):
    raise ConfigError(f"runs file not found: {path}")
  rows = []
  for _, where, row in _json_lines(path):
    for key in ("params", "tokens", "loss"):
      if key not in row:
        raise ConfigError(f"{where}: missing {key!r} (each line needs params, tokens, loss and "
                          "optionally flops)")
    optional = [_positive_number(row, k, where) if row.get(k) is not None else None
                for k in ("flops", "params_nonembed")]
    rows.append([_positive_number(row, k, where) for k in ("params", "tokens", "loss")] + optional)
  if not rows:
    raise ConfigError(f"runs file is empty: {path} (expected one JSON object per line with params, "
                      "tokens, loss)")
  return make_runs(*zip(*rows))


def group_close(values, rtol=BUDGET_RTOL):
  """Index arrays of values that agree within rtol of their group's smallest, ascending. The
  comparison is against the group's first member, so a slow drift never chains groups together."""
  order = np.argsort(values, kind="stable")
  groups = []
  for i in order:
    if groups and values[i] <= values[groups[-1][0]] * (1 + rtol):
      groups[-1].append(i)
    else:
      groups.append([i])
  return [np.array(g) for g in groups]


def geomean(x):
  """The geometric mean: the representative value of a group of close FLOP counts or sizes."""
  return float(np.exp(np.mean(np.log(x))))


def _loglog_line(x, y):
  """Least squares log y = slope·log x + intercept; returns (slope, exp(intercept))."""
  slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
  return float(slope), float(np.exp(intercept))


# --- Chinchilla approach 2 ------------------------------------------------------------------------

def fit_isoflop(runs: Runs, rtol=BUDGET_RTOL) -> dict:
  """A parabola L(log N) per isoFLOP budget (>= 3 sizes, opening upward), its vertex N_opt(C),
  then the exponents a, b of N_opt ∝ C^a, D_opt ∝ C^b over the budgets. a and b are None (with a
  reason) when fewer than two budgets give a minimum, e.g. for an N × D grid."""
  budgets, skipped = [], []
  for index in group_close(runs.flops, rtol):
    flops = geomean(runs.flops[index])
    log_n = np.log(runs.params[index])
    if len(np.unique(log_n)) < 3:
      skipped.append({"flops": flops, "reason": "fewer than 3 model sizes"})
      continue
    coeffs = np.polyfit(log_n, runs.loss[index], 2)
    if coeffs[0] <= 0:
      skipped.append({"flops": flops, "reason": "no minimum (the parabola opens downward)"})
      continue
    log_n_opt = -coeffs[1] / (2 * coeffs[0])
    if not log_n.min() - VERTEX_REACH <= log_n_opt <= log_n.max() + VERTEX_REACH:
      skipped.append({"flops": flops, "reason": "its minimum lies far outside the sampled sizes "
                                                f"(ln N = {log_n_opt:.4g})"})
      continue
    params_opt = float(np.exp(log_n_opt))
    slope, coef = _loglog_line(runs.params[index], runs.flops[index] / runs.tokens[index])
    budgets.append({
        "flops": flops, "runs": int(len(index)), "params_opt": params_opt,
        "tokens_opt": flops / (coef * params_opt ** slope),
        "loss_opt": float(np.polyval(coeffs, log_n_opt)),
        "parabola": [float(c) for c in coeffs],  # L = p0·x² + p1·x + p2, x = ln N
        "inside_sampled_range": bool(log_n.min() <= log_n_opt <= log_n.max())})
  result = {"budgets": budgets, "skipped": skipped, "a": None, "b": None}
  if len(budgets) < 2:
    result["reason"] = (f"{len(budgets)} isoFLOP budget(s) with a parabola minimum; need at "
                        "least 2 (3+ model sizes per budget)")
    return result
  flops = [b["flops"] for b in budgets]
  result["a"], result["params_coef"] = _loglog_line(flops, [b["params_opt"] for b in budgets])
  result["b"], result["tokens_coef"] = _loglog_line(flops, [b["tokens_opt"] for b in budgets])
  return result


# --- Chinchilla approach 3 ------------------------------------------------------------------------

def law(constants, params, tokens):
  """L(N, D) = E + A/N^alpha + B/D^beta for a dict of constants (scalars or bootstrap arrays)."""
  c = constants
  return c["E"] + c["A"] / params ** c["alpha"] + c["B"] / tokens ** c["beta"]


def _terms(theta, log_n, log_d):
  """The three log-terms (..., 3, runs) whose log-sum-exp is the predicted log-loss, for one theta
  or a stack of them (the initialization grid)."""
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  return np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n), -2)


def _huber(r, delta):
  """Huber loss of residuals r and its derivative, both scaled by 1/delta² (same minimizer) so
  that the objective is O(runs) and L-BFGS-B's relative tolerance, taken against max(|f|, 1),
  does not stop it early."""
  psi = np.clip(r, -delta, delta)
  return psi * (r - 0.5 * psi) / delta**2, psi / delta**2


def _objective(theta, log_n, log_d, log_l, delta):
  """Sum of Huber losses of the log-loss residuals, and its gradient in theta. Written out term
  by term (not with _terms and scipy's logsumexp): it is called ~10⁵ times per bootstrap."""
  a, b, e, alpha, beta = theta
  t_n, t_d = a - alpha * log_n, b - beta * log_d
  top = np.maximum(np.maximum(t_n, t_d), e)
  x_n, x_d, x_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
  total = x_n + x_d + x_e
  loss, psi = _huber(top + np.log(total) - log_l, delta)
  w_n, w_d, w_e = (x * psi / total for x in (x_n, x_d, x_e))  # d loss / d term
  return loss.sum(), np.array([w_n.sum(), w_d.sum(), w_e.sum(), -(w_n @ log_n), -(w_d @ log_d)])


def _init_grid():
  mesh = np.meshgrid(*(INIT_GRID[k] for k in THETA), indexing="ij")
  return np.stack([m.ravel() for m in mesh], -1)


def _minimize(runs, delta, starts, extra=()):
  """L-BFGS-B from the `starts` best grid points (screened by objective value, all at once) and
  from `extra` points; returns the best theta and its objective."""
  log_n, log_d, log_l = np.log(runs.params), np.log(runs.tokens), np.log(runs.loss)
  grid = _init_grid()
  residuals = special.logsumexp(_terms(grid, log_n, log_d), axis=-2) - log_l
  screen = _huber(residuals, delta)[0].sum(-1)
  candidates = list(grid[np.argsort(screen)[:starts]]) + list(extra)
  best = None
  for x0 in candidates:
    res = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True,
                            method="L-BFGS-B", bounds=BOUNDS,
                            options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-8})
    if best is None or res.fun < best.fun:
      best = res
  return best.x, float(best.fun)


def constants_of(theta):
  """E, A, B, alpha, beta and the compute-optimal exponents a, b from a theta (or rows of them)."""
  theta = np.asarray(theta)
  alpha, beta = theta[..., 3], theta[..., 4]
  with np.errstate(divide="ignore", invalid="ignore"):  # alpha = beta = 0: no optimum
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
  return {"E": np.exp(theta[..., 2]), "A": np.exp(theta[..., 0]), "B": np.exp(theta[..., 1]),
          "alpha": alpha, "beta": beta, "a": a, "b": b}


def distinct(runs: Runs) -> Runs:
  """One run per distinct (params, tokens) point, its loss the mean of that point's runs (a
  rerun, or two sweeps' runs.jsonl joined): repeats are no new information, so counted as runs
  they passed the MIN_RUNS check and a bootstrap drew the same point twice as if independent,
  giving a confident fit of as few as 3 points."""
  keys = np.stack([runs.params, runs.tokens], -1)
  _, first, index = np.unique(keys, axis=0, return_index=True, return_inverse=True)
  if len(first) == len(runs):
    return runs
  index = np.argsort(np.argsort(first))[index.reshape(-1)]  # the points in their runs' order
  mean = lambda x: np.bincount(index, weights=x) / np.bincount(index)
  return dataclasses.replace(runs.take(np.sort(first)), loss=mean(runs.loss),
                             flops=mean(runs.flops))


def _check_parametric(runs: Runs) -> Runs:
  """The runs' distinct points (`distinct`), once they are enough to fit L(N, D)."""
  points = distinct(runs)
  if len(points) < MIN_RUNS:
    raise ConfigError(f"too few runs for a fit: {len(runs)} runs at {len(points)} distinct "
                      f"(params, tokens) points; L(N, D) = E + A/N^alpha + B/D^beta has five "
                      f"constants, so at least {MIN_RUNS} distinct points are needed (a "
                      f"repeated point's losses are averaged)")
  if len(np.unique(runs.params)) < 2 or len(np.unique(runs.tokens)) < 2:
    raise ConfigError("the runs need at least 2 distinct params and 2 distinct tokens values to "
                      "fit L(N, D)")
  return points


def fit_law(runs: Runs, delta=HUBER_DELTA, starts=8) -> dict:
  """Approach 3's point estimate: the best of L-BFGS-B runs from the `starts` best points of
  Chinchilla's initialization grid. Returns E, A, B, alpha, beta, a, b as floats."""
  points = _check_parametric(runs)
  return {k: float(v) for k, v in constants_of(_minimize(points, delta, starts)[0]).items()}


def fit_parametric(runs: Runs, delta=HUBER_DELTA, starts=8, bootstrap=200, seed=0, level=0.95):
  """Approach 3 with `bootstrap` refits on the distinct points resampled with replacement (each
  from its own 2 best grid points and the full fit's optimum), giving percentile intervals at
  `level`."""
  points = _check_parametric(runs)
  if bootstrap < 1:
    raise ConfigError(f"bootstrap intervals need at least 1 resample, got {bootstrap}")
  theta, objective = _minimize(points, delta, starts)
  rng = np.random.default_rng(seed)
  samples = np.array([_minimize(points.take(rng.integers(0, len(points), len(points))), delta,
                                2, extra=[theta])[0] for _ in range(bootstrap)])
  draws = constants_of(samples)
  return {
      "constants": {k: float(v) for k, v in constants_of(theta).items()},
      "unpinned": unpinned(theta, points),
      "intervals": {k: _interval(v, level) for k, v in draws.items()},
      "level": level, "huber_delta": delta, "objective": objective, "runs": len(runs),
      "points": len(points),
      "bootstrap": {"resamples": bootstrap, "seed": seed,
                    "samples": {k: draws[k].tolist() for k in ("E", "A", "B", "alpha", "beta")}}}


def unpinned(theta, runs: Runs) -> list[str]:
  """The exponents (alpha, beta) the runs do not pin: left on a bound of BOUNDS, or whose term
  (A/N^alpha over the runs' N; B/D^beta over their D) moves the loss by less than PINNED_SHARE
  of it (e.g. a loss flat in N). N_opt and D_opt would follow from the bound or the noise."""
  c = constants_of(np.asarray(theta))
  names = []
  for i, (name, scale, x) in enumerate((("alpha", "A", runs.params), ("beta", "B", runs.tokens)),
                                       start=3):
    on_bound = any(b is not None and abs(theta[i] - b) < 1e-6 for b in BOUNDS[i])
    term = c[scale] * np.asarray([x.min(), x.max()], float) ** -c[name]
    if on_bound or term[0] - term[1] < PINNED_SHARE * float(np.mean(runs.loss)):
      names.append(name)
  return names


def bound_warning(fit3: dict) -> str:
  """One line on a fit whose exponents the runs do not pin ("" when they pin both)."""
  names = fit3.get("unpinned", fit3.get("at_bound")) or []  # (at_bound: an older fit.json's)
  if not names:
    return ""
  return (f"warning: the runs do not pin {' and '.join(names)} (on the fit's bound "
          f"{BOUNDS[3][0]:g} or {BOUNDS[3][1]:g}, or a term that moves the loss by under "
          f"{PINNED_SHARE:.0%} across them): no compute-optimal N and D follow (vary what the "
          "loss does not yet depend on)")


def _interval(samples, level):
  """The central `level` percentile interval; a degenerate resample's nan is left out."""
  tail = 100 * (1 - level) / 2
  with np.errstate(invalid="ignore"):  # (inf - inf between infinite samples: an unpinned fit's)
    return [float(np.nanpercentile(samples, tail)), float(np.nanpercentile(samples, 100 - tail))]


def holdout_check(runs: Runs, delta=HUBER_DELTA, rtol=BUDGET_RTOL):
  """Refits approach 3 without the largest FLOP budget and predicts that budget's losses: how far
  the law extrapolates in compute. None when there are fewer than 3 budgets or too few runs."""
  groups = group_close(runs.flops, rtol)
  train = np.concatenate(groups[:-1]) if len(groups) >= 3 else np.array([], int)
  try:
    _check_parametric(runs.take(train))
  except ConfigError:
    return None
  constants = fit_law(runs.take(train), delta)
  held = runs.take(groups[-1])
  error = law(constants, held.params, held.tokens) / held.loss - 1
  return {"flops": geomean(held.flops), "runs": len(held), "train_runs": int(len(train)),
          "mean_abs_rel_error": float(np.mean(np.abs(error))),
          "max_abs_rel_error": float(np.max(np.abs(error)))}


# --- Kaplan-style frontier power laws -------------------------------------------------------------

def fit_frontier(x, loss, rtol=BUDGET_RTOL):
  """L = (x_c / x)^exponent on the lower envelope: the best loss per group of close x values,
  keeping only points that beat every smaller x (a power law in x can only decrease)."""
  points = []
  for index in sorted(group_close(x, rtol), key=lambda i: x[i].min()):
    best = float(loss[index].min())
    if not points or best < points[-1][1]:
      points.append([geomean(x[index]), best])
  result = {"points": points, "exponent": None, "scale": None}
  if len(points) >= 2:
    slope, coef = _loglog_line(*zip(*points))
    result["exponent"] = -slope
    log_scale = math.log(coef) / -slope  # L = coef·x^slope = (scale/x)^exponent
    # (an exponent near 0, a flat frontier: X_c past any float, none given)
    result["scale"] = math.exp(log_scale) if abs(log_scale) < 700 else None
  return result


def kaplan_n(runs: Runs) -> tuple[np.ndarray, str]:
  """Kaplan et al.'s N: the non-embedding parameters when every run has them, else `params`."""
  if not np.isnan(runs.nonembed).any():
    return runs.nonembed, "non-embedding params (params_nonembed)"
  return runs.params, "params (the runs file has no params_nonembed for every run)"


def fit_kaplan(runs: Runs, rtol=BUDGET_RTOL):
  """Frontier laws in Kaplan's N (non-embedding), D and C; Chinchilla's fits keep `params`."""
  n, which = kaplan_n(runs)
  return {"params": dict(fit_frontier(n, runs.loss, rtol), n=which),
          "tokens": fit_frontier(runs.tokens, runs.loss, rtol),
          "flops": fit_frontier(runs.flops, runs.loss, rtol)}


# --- All fits, and predictions from them ----------------------------------------------------------

def fit_runs(runs: Runs, bootstrap=200, seed=0, level=0.95, rtol=BUDGET_RTOL) -> dict:
  """Every fit above, as the JSON-ready dict that is saved as fit.json; approach 3's `cost` is
  the runs' FLOPs per token as a power law in N (6·N when C = 6·N·D), what compute_optimal
  spends a budget with."""
  fit3 = fit_parametric(runs, bootstrap=bootstrap, seed=seed, level=level)
  slope, coef = _loglog_line(runs.params, runs.flops / runs.tokens)
  fit3["cost"] = {"slope": slope, "coef": coef}
  return {"runs": len(runs), "approach3": fit3,
          "approach2": fit_isoflop(runs, rtol), "kaplan": fit_kaplan(runs, rtol),
          "holdout": holdout_check(runs, rtol=rtol), "budget_rtol": rtol}


def _json_lines(path):
  """corpus.json_lines of a local file or a gs:// object (read from a local copy; the lines and
  errors name `path`)."""
  if not paths.is_remote(path):
    yield from corpus.json_lines(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "runs.jsonl")
    with open(local, "w", encoding="utf-8") as f:
      f.write(paths.read_text(path))
    try:
      for lineno, where, row in corpus.json_lines(local):
        yield lineno, where.replace(local, path, 1), row
    except ConfigError as e:
      raise ConfigError(str(e).replace(local, path, 1)) from None


def save_fit(out_dir, fit: dict) -> str:
  """Writes DIR/fit.json (what `predict` reads; DIR local or gs://...); returns its path."""
  path = paths.join(out_dir, FIT_FILE)
  paths.write_text(path, json.dumps(fit, indent=1))
  return path


def load_fit(path) -> dict:
  """Reads a fit from DIR (its fit.json) or from a fit.json path."""
  if paths.isdir(path):
    path = paths.join(path, FIT_FILE)
  if not paths.isfile(path):
    raise ConfigError(f"fit not found: {path} (write one with `python -m transformer_jax.sweep fit "
                      "--runs=RUNS.jsonl --out=DIR`)")
  try:
    fit = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e.msg})") from None
  fit3 = fit.get("approach3") if isinstance(fit, dict) else None
  if not isinstance(fit3, dict) or not {"constants", "bootstrap", "level"} <= fit3.keys():
    raise ConfigError(f"{path} is not a fit written by `sweep fit` (no approach 3 constants)")
  return fit


def headline(fit: dict) -> dict:
  """The CLI's last line: approach 3's constants with their intervals, and approach 2's a, b."""
  fit3 = fit["approach3"]
  return dict(fit3["constants"], intervals=fit3["intervals"], level=fit3["level"],
              approach2={"a": fit["approach2"]["a"], "b": fit["approach2"]["b"]})


def compute_optimal(constants, flops, cost=None):
  """Approach 3's compute-optimal (N, D, L) at C. Subject to 6·N·D = C the closed form is
  N_opt = G·(C/6)^a, D_opt = (C/6)^b / G with G = (alpha·A / (beta·B))^(1/(alpha+beta)).
  With `cost` (fit_runs': the runs' FLOPs per token, coef·N^slope, which counts attention too)
  D = C / cost(N), and L(N, D(N)) is minimized over N on a grid around the closed form's,
  refined once (to 0.1 %), so that the (N, D) it returns spends C, not C·cost(N)/(6·N)."""
  c = {k: np.asarray(v, float) for k, v in constants.items()}  # (0 exponents: inf/nan, no error)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    g = (c["alpha"] * c["A"] / (c["beta"] * c["B"])) ** (1 / (c["alpha"] + c["beta"]))
    a, b = c["beta"] / (c["alpha"] + c["beta"]), c["alpha"] / (c["alpha"] + c["beta"])
    params, tokens = g * (flops / 6) ** a, (flops / 6) ** b / g
    if cost is not None:
      spend = lambda n: np.asarray(flops)[..., None] / (cost["coef"] * n ** cost["slope"])
      expanded = {k: np.asarray(v)[..., None] for k, v in c.items()}
      for width, points in ((4.0, 161), (0.05, 101)):  # ln N steps of 0.05, then 0.001
        grid = np.asarray(params)[..., None] * np.exp(np.linspace(-width, width, points))
        losses = law(expanded, grid, spend(grid))
        best = np.argmin(np.where(np.isnan(losses), np.inf, losses), axis=-1)[..., None]
        params = np.take_along_axis(grid, best, axis=-1)[..., 0]
      tokens = flops / (cost["coef"] * params ** cost["slope"])
    return params, tokens, law(c, params, tokens)


def predict(fit: dict, flops: float) -> dict:
  """Compute-optimal params, tokens and loss for a FLOP budget, with bootstrap intervals (and
  approach 2's N_opt, D_opt when it was fitted, for comparison)."""
  if not (math.isfinite(flops) and flops > 0):
    raise ConfigError(f"flops must be a positive number of FLOPs, got {flops!r}")
  fit3 = fit["approach3"]
  if bound_warning(fit3):  # (an exponent the runs do not pin: no optimum follows from them)
    result = {"flops": flops, "params": None, "tokens": None, "loss": None,
              "tokens_per_param": None, "level": fit3["level"], "intervals": None,
              "warning": bound_warning(fit3)}
  else:
    cost = fit3.get("cost")  # (a fit.json written before it had one: C = 6·N·D)
    params, tokens, loss = compute_optimal(fit3["constants"], flops, cost)
    draws = {k: np.asarray(v) for k, v in fit3["bootstrap"]["samples"].items()}
    with np.errstate(all="ignore"):  # a degenerate resample (alpha = beta = 0): nan, skipped
      samples = compute_optimal(draws, flops, cost)
    result = {"flops": flops, "params": float(params), "tokens": float(tokens),
              "loss": float(loss), "tokens_per_param": float(tokens / params),
              "level": fit3["level"],
              "intervals": {k: _interval(s, fit3["level"])
                            for k, s in zip(("params", "tokens", "loss"), samples)}}
  fit2 = fit.get("approach2") or {}
  if fit2.get("a") is not None:
    result["approach2"] = {"params": fit2["params_coef"] * flops ** fit2["a"],
                           "tokens": fit2["tokens_coef"] * flops ** fit2["b"]}
  return result
