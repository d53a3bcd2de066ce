"""Scaling-law fits (transformer_jax.sweep): known constants recovered from noisy synthetic sweeps,
the `fit` / `predict` CLI end to end, and one-line errors for bad input.

The synthetic sweep is an isoFLOP grid: 5 budgets C = 1e18 … 1e22 FLOPs × 7 sizes
N = sqrt(C/120)·2^k, k = -3 … 3 (the 20-tokens-per-parameter rule of thumb ± 8x, so the grid is
centred on a guess, not on the true optimum), D = C/(6N), loss = L(N, D)·exp(eps) with eps ~
Normal(0, 0.01): 1% multiplicative log-normal noise. The true L is Chinchilla's (E 1.69, A 406.4,
B 410.7, alpha 0.34, beta 0.28) or Epoch AI's replication (E 1.8172, A 482.01, B 2085.43,
alpha 0.3478, beta 0.3658), from ../shared/ANCHORS.md §5.

Tolerances, from the spread measured with this design (40 seeds per law for approach 3, 200 for
approach 2), so each holds on every seed measured and is not tuned to the seeds used here:
- approach 3, each seed: |d alpha| <= 0.06, |d beta| <= 0.05, |d E| <= 0.15, |d a| <= 0.04
  (worst seen: 0.049, 0.033, 0.111, 0.031); mean over 8 seeds (a bias check, ~2.5 standard
  errors): |d alpha|, |d beta| <= 0.015, |d E| <= 0.05, |d a| <= 0.01;
- approach 2's a vs beta/(alpha+beta): median |d a| <= 0.02 over 50 seeds (0.013 and 0.010 seen
  over 200), |mean d a| <= 0.01; without noise |d a| <= 0.005 (the parabola's bias: 0.0012);
- bootstrap (50 resamples) 95% intervals of E, alpha, beta, a, b contain the truth (15 of 16
  seeds did, for both laws, for all of E, alpha, beta, a at once).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from transformer_jax.config import ConfigError
from transformer_jax.sweep import __main__ as sweep_cli
from transformer_jax.sweep import fit as fit_lib
from tests.conftest import REPO

LAWS = fit_lib.REFERENCE_LAWS  # {"Chinchilla": {...}, "Epoch AI": {...}}


def _truth(name):
  law = LAWS[name]
  total = law["alpha"] + law["beta"]
  return dict(law, a=law["beta"] / total, b=law["alpha"] / total)


def isoflop_sweep(law, seed, noise=0.01):
  """The synthetic sweep described in the module docstring, as Runs (flops given exactly)."""
  budgets = 10.0 ** np.arange(18, 23)
  params = np.sqrt(budgets[:, None] / 120) * 2.0 ** np.arange(-3, 4)
  flops = np.broadcast_to(budgets[:, None], params.shape).ravel()
  params = params.ravel()
  tokens = flops / (6 * params)
  noise = np.random.default_rng(seed).normal(0, noise, params.size)
  return fit_lib.make_runs(params, tokens, fit_lib.law(law, params, tokens) * np.exp(noise), flops)


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return str(path)


# --- Recovery of known constants ------------------------------------------------------------------

@pytest.mark.parametrize("name", LAWS)
def test_noise_free_sweep_recovers_law_exactly(name):
  runs = isoflop_sweep(LAWS[name], seed=0, noise=0.0)
  fitted, truth = fit_lib.fit_law(runs), _truth(name)
  for key in ("E", "A", "B", "alpha", "beta"):
    assert fitted[key] == pytest.approx(truth[key], rel=1e-6), key
  assert abs(fit_lib.fit_isoflop(runs)["a"] - truth["a"]) <= 0.005


@pytest.mark.parametrize("name", LAWS)
def test_approach3_recovers_constants_from_noisy_runs(name):
  truth = _truth(name)
  fits = [fit_lib.fit_law(isoflop_sweep(LAWS[name], seed)) for seed in range(8)]
  for key, each, mean in (("alpha", 0.06, 0.015), ("beta", 0.05, 0.015), ("E", 0.15, 0.05),
                          ("a", 0.04, 0.01)):
    errors = np.array([f[key] for f in fits]) - truth[key]
    assert np.abs(errors).max() <= each, (key, errors)
    assert abs(errors.mean()) <= mean, (key, errors)


@pytest.mark.parametrize("name", LAWS)
def test_approach2_recovers_compute_optimal_exponent(name):
  truth = _truth(name)
  errors = np.array([fit_lib.fit_isoflop(isoflop_sweep(LAWS[name], seed))["a"]
                     for seed in range(50)]) - truth["a"]
  assert np.median(np.abs(errors)) <= 0.02
  assert abs(errors.mean()) <= 0.01
  fit2 = fit_lib.fit_isoflop(isoflop_sweep(LAWS[name], 0))
  assert len(fit2["budgets"]) == 5 and fit2["a"] + fit2["b"] == pytest.approx(1)


def test_approach2_tokens_use_the_runs_flops_per_token():
  """Runs whose C counts 20 % more than 6·N·D (attention): D_opt = C / (7.2·N_opt), the tokens a
  run of that size trains on (C / (6·N_opt) overstated them 20 %)."""
  runs = isoflop_sweep(LAWS["Chinchilla"], 0, noise=0.0)
  runs = fit_lib.make_runs(runs.params, runs.tokens / 1.2, runs.loss, runs.flops)
  for budget in fit_lib.fit_isoflop(runs)["budgets"]:
    assert budget["tokens_opt"] == pytest.approx(budget["flops"] / (7.2 * budget["params_opt"]))


def test_predict_spends_the_budget_at_the_runs_flops_per_token():
  """Runs whose C counts 20 % more than 6·N·D: predict's (N, D) costs C at that rate (the closed
  form's cost 1.2 C), is the constrained optimum of the exact law, and with C = 6·N·D the
  closed form is what comes back."""
  truth = LAWS["Chinchilla"]
  runs = isoflop_sweep(truth, 0, noise=0.0)
  costly = fit_lib.make_runs(runs.params, runs.tokens / 1.2, runs.loss, runs.flops)
  fit = fit_lib.fit_runs(costly, bootstrap=2)
  assert fit["approach3"]["cost"]["slope"] == pytest.approx(1.0)
  assert fit["approach3"]["cost"]["coef"] == pytest.approx(7.2)
  fit["approach3"]["constants"] = dict(truth)  # the exact law: the optimum is known
  c = 1e21
  got = fit_lib.predict(fit, c)
  assert 7.2 * got["params"] * got["tokens"] == pytest.approx(c, rel=1e-9)
  grid = np.exp(np.linspace(np.log(1e8), np.log(1e11), 200001))
  want = grid[np.argmin(fit_lib.law(truth, grid, c / (7.2 * grid)))]
  assert got["params"] == pytest.approx(want, rel=2e-3)
  plain = fit_lib.compute_optimal(truth, c)
  assert fit_lib.compute_optimal(truth, c, {"slope": 1.0, "coef": 6.0})[0] == pytest.approx(
      plain[0], rel=2e-3)


@pytest.mark.parametrize("name", LAWS)
def test_bootstrap_intervals_contain_true_constants(name):
  truth = _truth(name)
  fit3 = fit_lib.fit_parametric(isoflop_sweep(LAWS[name], seed=0), bootstrap=50, seed=0)
  for key in ("E", "alpha", "beta", "a", "b"):
    lo, hi = fit3["intervals"][key]
    assert lo <= truth[key] <= hi, (key, lo, hi)
    assert lo <= fit3["constants"][key] <= hi, key
  assert len(fit3["bootstrap"]["samples"]["alpha"]) == 50


def test_repeated_runs_count_once_and_are_averaged(tmp_path):
  """Two sweeps' runs.jsonl joined (each run twice): 3 points passed the 6-run minimum and gave
  a confident fit, and the bootstrap drew a repeated point twice as if it were two runs. Now
  MIN_RUNS counts distinct (params, tokens) points, a point's loss is its runs' mean, and the
  fit and its bootstrap are those of the distinct points."""
  three = _rows(3)
  with pytest.raises(ConfigError, match="too few runs for a fit: 6 runs at 3 distinct"):
    fit_lib.fit_law(fit_lib.load_runs(_write_jsonl(tmp_path / "dup.jsonl", three + three)))
  runs = isoflop_sweep(LAWS["Chinchilla"], seed=0)
  twice = fit_lib.make_runs(*(np.r_[x, x] for x in (runs.params, runs.tokens)),
                            np.r_[runs.loss * 1.01, runs.loss * 0.99],
                            np.r_[runs.flops, runs.flops])
  once = fit_lib.make_runs(runs.params, runs.tokens, runs.loss, runs.flops)
  got, want = (fit_lib.fit_parametric(r, bootstrap=3) for r in (twice, once))
  assert (got["runs"], got["points"]) == (70, 35)
  for key, value in want["constants"].items():
    assert got["constants"][key] == pytest.approx(value, rel=1e-6), key
  assert got["bootstrap"]["samples"]["alpha"] == pytest.approx(
      want["bootstrap"]["samples"]["alpha"], rel=1e-6)


# --- Prediction, grouping, frontier laws ----------------------------------------------------------

def _exact_fit(law):
  """A fit whose constants and every bootstrap sample are `law`: intervals collapse to points."""
  return {"approach3": {"constants": dict(law), "level": 0.95,
                        "bootstrap": {"samples": {k: [v] * 3 for k, v in law.items()}}},
          "approach2": {"a": None}}


@pytest.mark.parametrize("name", LAWS)
def test_predict_is_the_isoflop_minimum(name):
  """The closed form's N_opt is where L(N, C/6N) is flat, and lower than its neighbours."""
  flops = 1e21
  p = fit_lib.predict(_exact_fit(LAWS[name]), flops)
  assert 6 * p["params"] * p["tokens"] == pytest.approx(flops)
  along = lambda n: fit_lib.law(LAWS[name], n, flops / (6 * n))
  assert p["loss"] == pytest.approx(along(p["params"]), rel=1e-12)
  h = 1e-3  # a step in ln N
  up, down = along(p["params"] * np.exp(h)), along(p["params"] * np.exp(-h))
  assert up > p["loss"] and down > p["loss"]
  # The slope in ln N: ~6e-10 here; N_opt 1% off would give ~6e-4 (the curvature is ~0.06).
  assert abs(up - down) / (2 * h) < 1e-7
  assert p["intervals"]["params"] == pytest.approx([p["params"]] * 2)


def test_epoch_constants_reproduce_chinchillas_own_choice():
  """ANCHORS §5: Epoch AI's constants put Chinchilla's budget (70B params × 1.4T tokens) at
  about that very model."""
  p = fit_lib.predict(_exact_fit(LAWS["Epoch AI"]), 6 * 70e9 * 1.4e12)
  assert p["params"] == pytest.approx(70e9, rel=0.1)
  assert p["tokens"] == pytest.approx(1.4e12, rel=0.1)


def test_budgets_group_within_tolerance_without_chaining():
  values = np.array([1.0, 2.0, 1.03, 1.06, 1.09])
  assert [list(g) for g in fit_lib.group_close(values, 0.05)] == [[0, 2], [3, 4], [1]]


def test_frontier_power_law_recovered():
  params = np.geomspace(1e6, 1e10, 9)
  law = fit_lib.fit_frontier(params, (8.8e13 / params) ** 0.076)
  assert law["exponent"] == pytest.approx(0.076) and law["scale"] == pytest.approx(8.8e13)
  # Runs above the envelope do not move it: only the best loss at each size counts.
  worse = fit_lib.fit_frontier(np.r_[params, params], np.r_[(8.8e13 / params) ** 0.076, [9.0] * 9])
  assert worse["exponent"] == pytest.approx(0.076)


def test_kaplan_laws_use_non_embedding_params_when_the_runs_have_them(tmp_path):
  """Losses that follow Kaplan's law in non-embedding N exactly, with a tied embedding that
  dominates the matmul count at small sizes: fit on params_nonembed the exponent is recovered; on
  the matmul count it is not. The report says which N it used; Chinchilla's fits keep params."""
  nonembed = np.geomspace(1e5, 1e8, 7)
  params = nonembed + 8192 * 256  # + a tied 8192 x 256 embedding
  rows = [{"params": p, "params_nonembed": n, "tokens": 1e9, "loss": (8.8e13 / n) ** 0.076}
          for p, n in zip(params, nonembed)]
  runs = fit_lib.load_runs(_write_jsonl(tmp_path / "runs.jsonl", rows))
  law = fit_lib.fit_kaplan(runs)["params"]
  assert law["exponent"] == pytest.approx(0.076) and law["n"].startswith("non-embedding")
  for row in rows:
    del row["params_nonembed"]
  runs = fit_lib.load_runs(_write_jsonl(tmp_path / "old.jsonl", rows))
  law = fit_lib.fit_kaplan(runs)["params"]
  assert abs(law["exponent"] - 0.076) > 0.01 and law["n"].startswith("params (")
  from transformer_jax.sweep import report  # pylint: disable=g-import-not-at-top
  assert "N here is params (the runs file has no" in "\n".join(
      report._kaplan_section({"kaplan": fit_lib.fit_kaplan(runs)}))  # pylint: disable=protected-access


def test_load_runs_estimates_missing_flops(tmp_path):
  path = _write_jsonl(tmp_path / "runs.jsonl", [
      {"params": 1e6, "tokens": 2e7, "loss": 3.0}, {"params": 2e6, "tokens": 1e7, "loss": 3.1,
                                                    "flops": 1.3e14}])
  runs = fit_lib.load_runs(path)
  assert list(runs.flops) == [6 * 1e6 * 2e7, 1.3e14]


def test_report_for_an_n_by_d_grid(tmp_path):
  """A grid with no three runs on one isoFLOP budget: approach 2 is skipped, not an error, and the
  report and plots are still written."""
  from transformer_jax.sweep import report  # pylint: disable=g-import-not-at-top
  params, tokens = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e9, 4),
                                                   np.geomspace(1e9, 3e11, 5)))
  runs = fit_lib.make_runs(params, tokens, fit_lib.law(LAWS["Chinchilla"], params, tokens))
  fit = fit_lib.fit_runs(runs, bootstrap=10)
  assert fit["approach2"]["a"] is None and fit["approach3"]["constants"]["alpha"] == pytest.approx(
      0.34, rel=1e-4)
  paths = report.write(str(tmp_path), runs, fit, "grid.jsonl")
  assert all(os.path.getsize(p) > 0 for p in paths) and len(paths) == 6
  assert "No exponents" in (tmp_path / "report.md").read_text()
  assert fit["approach3"]["unpinned"] == [] and "warning" not in fit_lib.predict(fit, 1e22)


@pytest.mark.parametrize("noise_seed", [None, 0, 1, 2])
def test_an_exponent_the_runs_do_not_pin_is_said_not_predicted_silently(tmp_path, noise_seed):
  """Losses flat in N (L = 2 + 400/D^0.3): alpha goes to its bound (4), or with 0.2% noise to
  ~5e-4 with A ~ 1 (a constant) or exactly 0. The fit, its summary, report.md and predict say
  the runs do not pin it and give no N_opt (N_opt 135 was printed, then N_opt 20 params without
  a word, an OverflowError in the Kaplan frontier or a ZeroDivisionError)."""
  from transformer_jax.sweep import report  # pylint: disable=g-import-not-at-top
  grid = 3 if noise_seed is None else 4
  params, tokens = (x.ravel() for x in np.meshgrid(np.geomspace(1e6, 1e8, grid),
                                                   np.geomspace(1e8, 1e10, grid)))
  noise = (1.0 if noise_seed is None else
           np.exp(0.002 * np.random.default_rng(noise_seed).standard_normal(len(params))))
  runs = fit_lib.make_runs(params, tokens, (2.0 + 400.0 / tokens ** 0.3) * noise)
  fit = fit_lib.fit_runs(runs, bootstrap=4)
  assert fit["approach3"]["unpinned"] == ["alpha"]
  predicted = fit_lib.predict(fit, 1e20)
  assert "the runs do not pin alpha" in predicted["warning"] and predicted["params"] is None
  assert "the runs do not pin alpha" in report.text_summary(fit)
  report.write(str(tmp_path), runs, fit, "flat.jsonl")
  assert "the runs do not pin alpha" in (tmp_path / "report.md").read_text()


def test_a_flat_frontier_and_a_far_isoflop_vertex_are_no_tracebacks():
  """An exponent near 0 on Kaplan's frontier put X_c past any float (OverflowError); an
  isoFLOP budget whose parabola's minimum lies far outside its sizes (a diverged run's loss
  gave ln N -8540 and a ZeroDivisionError) is skipped with its reason."""
  frontier = fit_lib.fit_frontier(np.array([1e6, 1e7]), np.array([3.00, 2.99]))
  assert frontier["exponent"] == pytest.approx(0.00145, rel=0.01) and frontier["scale"] is None
  params, k = np.geomspace(1e6, 1e8, 4), np.arange(4)
  loss = 3.0 - 0.1 * k + 1e-4 * k ** 2  # (a minimum ~500 sizes past the largest)
  runs = fit_lib.make_runs(params, 1e18 / (6 * params), loss)
  approach2 = fit_lib.fit_isoflop(runs)
  assert approach2["budgets"] == [] and "far outside the sampled sizes" in (
      approach2["skipped"][0]["reason"])


# --- The CLI --------------------------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "transformer_jax.sweep", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_fit_then_predict(tmp_path, capsys):
  runs = isoflop_sweep(LAWS["Chinchilla"], seed=0)
  # Half the lines give flops 1% off 6ND, half none: both must land in the same 5 budgets.
  rows = [{"params": n, "tokens": d, "loss": l, **({"flops": 1.01 * c} if i % 2 else {})}
          for i, (n, d, l, c) in enumerate(zip(runs.params, runs.tokens, runs.loss, runs.flops))]
  out = tmp_path / "fit"
  done = _cli("fit", f"--runs={_write_jsonl(tmp_path / 'runs.jsonl', rows)}", f"--out={out}",
              "--bootstrap=20", "--seed=1")
  assert done.returncode == 0, done.stderr
  headline = json.loads(done.stdout.strip().splitlines()[-1])
  assert {"E", "A", "B", "alpha", "beta", "a", "b", "intervals"} <= headline.keys()
  for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
    lo, hi = headline["intervals"][key]
    assert lo <= hi, key
  assert abs(headline["alpha"] - 0.34) <= 0.06 and abs(headline["approach2"]["a"] - 0.4516) < 0.04
  for name in ("fit.json", "report.md", "isoflop.png", "frontier.png", "optimal.png"):
    assert (out / name).stat().st_size > 0, name
  assert (out / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = (out / "report.md").read_text()
  assert "(isoflop.png)" in report and "| alpha |" in report
  assert len(json.loads((out / "fit.json").read_text())["approach2"]["budgets"]) == 5
  # The runs written beside the report refit it exactly (refit in this process: ~1.5 s of CPU
  # less; the CLI's own start is the first fit's).
  capsys.readouterr()
  sweep_cli.main(["fit", f"--runs={out / 'runs.jsonl'}", f"--out={out}", "--bootstrap=20",
                  "--seed=1"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == headline

  done = _cli("predict", f"--fit={out}", "--flops=1e21")
  assert done.returncode == 0, done.stderr
  p = json.loads(done.stdout.strip().splitlines()[-1])
  assert {"params", "tokens", "loss", "intervals"} <= p.keys()
  cost = json.loads((out / "fit.json").read_text())["approach3"]["cost"]  # ~6.03 N: half 1.01x
  assert cost["coef"] * p["params"] ** cost["slope"] * p["tokens"] == pytest.approx(1e21)
  for key in ("params", "tokens", "loss"):
    assert p["intervals"][key][0] <= p[key] <= p["intervals"][key][1], key


@pytest.mark.parametrize("args,message", [
    (("plot",), "unknown subcommand 'plot'"),
    (("fit", "--runs=RUNS", "--out=/tmp/unused"), "RUNS:2 is not valid JSON"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, message):
  runs = _write_jsonl(tmp_path / "runs.jsonl", [{"params": 1, "tokens": 1, "loss": 1}])
  with open(runs, "a", encoding="utf-8") as f:
    f.write("{not json\n")
  done = _cli(*(a.replace("RUNS", runs) for a in args))
  assert done.returncode == 2
  assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
  assert message.replace("RUNS", runs) in done.stderr


def _rows(count):
  return [{"params": 1e6 * (i + 1), "tokens": 1e8 / (i + 1), "loss": 3.0} for i in range(count)]


@pytest.mark.parametrize("setup,args,message", [
    (None, ["fit", "--runs=missing.jsonl", "--out=OUT"], "runs file not found: missing.jsonl"),
    ([], ["fit", "--runs=RUNS", "--out=OUT"], "runs file is empty"),
    ([{"params": 1, "tokens": 2}], ["fit", "--runs=RUNS", "--out=OUT"], "RUNS:1: missing 'loss'"),
    ([{"params": 1, "tokens": 2, "loss": 3, "flops": 0}], ["fit", "--runs=RUNS", "--out=OUT"],
     "RUNS:1: flops must be positive"),
    ([{"params": "big", "tokens": 2, "loss": 3}], ["fit", "--runs=RUNS", "--out=OUT"],
     "RUNS:1: params must be a number"),
    (_rows(3), ["fit", "--runs=RUNS", "--out=OUT"], "too few runs for a fit: 3"),
    (_rows(8), ["fit", "--runs=RUNS", "--out=OUT", "--bootstrap=2"], "--bootstrap must be at"),
    (_rows(8), ["fit", "--runs=RUNS"], "sweep fit needs --out"),
    (None, ["predict", "--fit=OUT", "--flops=1e20"], "fit not found"),
    (None, ["predict", "--fit=OUT", "--flops=lots"], "--flops expects a number"),
    (None, [], "no subcommand given"),
])
def test_user_mistakes_raise_config_errors(tmp_path, setup, args, message):
  runs = _write_jsonl(tmp_path / "runs.jsonl", setup) if setup is not None else "missing.jsonl"
  swap = lambda s: s.replace("RUNS", runs).replace("OUT", str(tmp_path / "out"))
  with pytest.raises(ConfigError) as error:
    sweep_cli.main([swap(a) for a in args])
  assert swap(message) in str(error.value)


def test_predict_rejects_non_positive_flops(tmp_path):
  with pytest.raises(ConfigError, match="positive"):
    fit_lib.predict(_exact_fit(LAWS["Chinchilla"]), -1.0)
  os.makedirs(tmp_path / "fit")
  fit_lib.save_fit(str(tmp_path / "fit"), _exact_fit(LAWS["Chinchilla"]))
  with pytest.raises(ConfigError, match="positive number of FLOPs, got -1"):
    sweep_cli.main(["predict", f"--fit={tmp_path / 'fit'}", "--flops=-1"])


def test_importing_the_fit_library_leaves_the_environment_alone():
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  code = ("import os, json; before = dict(os.environ); import transformer_jax.sweep.fit; "
          "print(json.dumps(dict(os.environ) == before))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=120, check=True)
  assert out.stdout.strip() == "true"
