"""Scaling-law sweeps: `python -m transformer_jax.sweep COMMAND --flag=value ...`

  plan     --sweep=configs/sweeps/NAME.py --dir=DIR
           Prints the table of runs (shape, params with and without embeddings, tokens, FLOPs,
           steps, batch, lr) and writes DIR/NAME/config.json per run and DIR/plan.jsonl.

  run      --dir=DIR [--jobs=1] [--print-commands [--launcher=local|tpu_vm|slurm]
           [--launcher_args="FLAGS"]]
           Runs every unfinished run of DIR/plan.jsonl (finished ones are skipped, interrupted
           ones resume from their checkpoints), or only prints one train command per run for a
           cluster scheduler: plain (local), or `bash launch/tpu_vm.sh FLAGS -- --workdir=...` /
           `bash launch/gpu_slurm.sh FLAGS -- --workdir=...` with the launcher's own flags;
           collects the finished runs' final eval losses into DIR/runs.jsonl. A run another live
           train holds (a second driver's) is skipped; Ctrl-C, SIGTERM or a closed terminal
           (SIGHUP) saves and stops every running train (one SIGTERM each), exit 130, 143 or
           129; a second Ctrl-C kills them.
  fit      --runs=RUNS.jsonl --out=DIR [--bootstrap=200] [--seed=0] [--level=0.95]
           Chinchilla approaches 2 (isoFLOP parabolas) and 3 (L(N, D) = E + A/N^alpha + B/D^beta
           with bootstrap intervals) and Kaplan-style frontier laws. Writes DIR/fit.json,
           DIR/report.md, DIR/{isoflop,frontier,optimal}.png and DIR/runs.jsonl (the runs
           fitted, so that the folder refits itself). Prints a short table, then as its
           last line one JSON object: E, A, B, alpha, beta, a, b and "intervals" (key -> [lo, hi]).
  predict  --fit=DIR --flops=C
           Compute-optimal params and tokens for C FLOPs and the predicted loss, with intervals;
           the last line is one JSON object with params, tokens, loss and "intervals".

DIR, RUNS.jsonl and --out may be gs:// URLs (config/paths.py): the plan, the runs' workdirs,
runs.jsonl, fit.json, the plots and report.md are then objects in the bucket (a run's train.log is
kept locally while it runs and uploaded when it ends).

Each line of RUNS.jsonl is {"params": N, "tokens": D, "loss": final eval loss, "flops": C}
(flops optional: 6·N·D when absent). Mistakes are one `error: ...` line and exit code 2.

A new subcommand is a function of its argv, registered in COMMANDS with its usage.
"""

import json
import os

from transformer_jax import cli
from transformer_jax.config import ConfigError


def _flags(command, argv, defaults, required=()):
  """Parses `--name=value` flags for one subcommand (no --config here) and checks required ones."""
  spec, overrides, flags = cli.parse(argv, defaults)
  if spec or overrides:
    raise ConfigError(f"sweep {command} takes no --config flags (usage: {_usage(command)})")
  for name in required:
    if flags[name] is None:
      raise ConfigError(f"sweep {command} needs --{name} (usage: {_usage(command)})")
  return flags


def fit_command(argv):
  """Fits the runs, writes fit.json, the plots and report.md, prints the headline JSON."""
  flags = _flags("fit", argv, {"runs": None, "out": None, "bootstrap": 200, "seed": 0,
                               "level": 0.95}, required=("runs", "out"))
  if flags["bootstrap"] < 10:
    raise ConfigError(f"--bootstrap must be at least 10 resamples (percentile intervals; 200 or "
                      f"more is better), got {flags['bootstrap']}")
  if not 0 < flags["level"] < 1:
    raise ConfigError(f"--level is an interval's coverage in (0, 1), got {flags['level']}")
  from transformer_jax.sweep import fit as fit_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.sweep import report  # pylint: disable=g-import-not-at-top
  runs = fit_lib.load_runs(flags["runs"])
  fit = fit_lib.fit_runs(runs, bootstrap=flags["bootstrap"], seed=flags["seed"],
                         level=flags["level"])
  paths = report.write(flags["out"], runs, fit, flags["runs"])
  print(report.text_summary(fit))
  print("wrote " + ", ".join(paths))
  print(json.dumps(fit_lib.headline(fit)))


def predict_command(argv):
  """Compute-optimal N, D and loss for one FLOP budget from a saved fit."""
  flags = _flags("predict", argv, {"fit": None, "flops": None}, required=("fit", "flops"))
  try:
    flops = float(flags["flops"])
  except ValueError:
    raise ConfigError(f"--flops expects a number of FLOPs such as 1e21, got {flags['flops']!r}")
  from transformer_jax.sweep import fit as fit_lib  # pylint: disable=g-import-not-at-top
  result = fit_lib.predict(fit_lib.load_fit(flags["fit"]), flops)
  iv = result["intervals"]
  if iv is not None:
    print(f"C = {flops:.4g} FLOPs, {result['level']:.0%} intervals:")
    for key in ("params", "tokens", "loss"):
      print(f"  {key:<7} {result[key]:.4g}  [{iv[key][0]:.4g}, {iv[key][1]:.4g}]")
  if "warning" in result:
    print(result["warning"])
  print(json.dumps(result))


def plan_command(argv):
  """Resolves the sweep into runs and writes their configs."""
  flags = _flags("plan", argv, {"sweep": None, "dir": None}, required=("sweep", "dir"))
  from transformer_jax.sweep import plan as plan_lib  # pylint: disable=g-import-not-at-top
  cli.output_folder("dir", flags["dir"])  # (a traceback after planning)
  runs, dropped = plan_lib.plan(flags["sweep"])
  if not runs:
    raise ConfigError(f"{flags['sweep']} plans no runs ({len(dropped)} left out: "
                      f"{'; '.join(f'{n}: {why}' for n, why in dropped)})")
  plan_lib.write(runs, flags["dir"])
  print(plan_lib.table(runs))
  for name, why in dropped:
    print(f"left out {name}: {why}")
  total = sum(r.flops for r, _ in runs)
  print(f"{len(runs)} runs, {total:.3g} FLOPs in all, written to {flags['dir']}")


def run_command(argv):
  """Runs (or prints the commands of) the unfinished runs, then collects runs.jsonl."""
  flags = _flags("run", argv, {"dir": None, "jobs": 1, "print_commands": False,
                               "launcher": "local", "launcher_args": ""}, required=("dir",))
  if flags["jobs"] < 1:
    raise ConfigError(f"--jobs must be >= 1, got {flags['jobs']}")
  from transformer_jax.sweep import run as run_lib  # pylint: disable=g-import-not-at-top
  launchers = ["local", *run_lib.LAUNCHERS]
  if flags["launcher"] not in launchers:
    raise ConfigError(f"--launcher must be one of {', '.join(launchers)}, got "
                      f"{flags['launcher']!r}")
  if (flags["launcher"] != "local" or flags["launcher_args"]) and not flags["print_commands"]:
    raise ConfigError("--launcher and --launcher_args only apply with --print-commands")
  plan = run_lib.load_plan(flags["dir"])
  if flags["print_commands"]:
    for run in plan:
      if run_lib.status(flags["dir"], run) != "done":
        print(run_lib.launch_command(flags["dir"], run, flags["launcher"],
                                     flags["launcher_args"]))
    return
  failed = run_lib.run_all(flags["dir"], flags["jobs"])
  path = run_lib.collect(flags["dir"])
  done = sum(run_lib.status(flags["dir"], r) == "done" for r in plan)
  print(f"{done} of {len(plan)} runs finished; results in {path}")
  if failed:
    raise ConfigError(f"{failed} runs failed; re-run the same command to retry them")


COMMANDS = {
    "plan": (plan_command, "--sweep=configs/sweeps/NAME.py --dir=DIR"),
    "run": (run_command, "--dir=DIR [--jobs=K] [--print-commands [--launcher=local|tpu_vm|"
                         "slurm] [--launcher_args=FLAGS]]"),
    "fit": (fit_command, "--runs=RUNS.jsonl --out=DIR [--bootstrap=N --seed=S --level=P]"),
    "predict": (predict_command, "--fit=DIR --flops=C"),
}


def _usage(command):
  return f"python -m transformer_jax.sweep {command} {COMMANDS[command][1]}"


def main(argv):
  if argv and argv[0] in ("-h", "--help", "help"):
    print(__doc__)
    return
  if not argv or argv[0] not in COMMANDS:
    problem = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
    raise ConfigError(f"{problem}; use one of: " + "; ".join(_usage(c) for c in COMMANDS))
  COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
  # L-BFGS-B on five parameters makes ~10^5 tiny LAPACK calls per bootstrap. With OpenBLAS threads
  # each call waits for a hand-off, and when the cores are busy that costs far more than the math
  # (measured: a 50-resample fit took 65 s instead of 2 s on a loaded 2-core machine). OpenBLAS
  # reads this once, when scipy first loads it: this process's, before fit.py imports scipy; a
  # value you set wins. (Importing fit.py as a library leaves the environment alone.)
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  cli.entry(main)
