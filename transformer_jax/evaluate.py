"""Evaluate a checkpoint on downstream tasks: `python -m transformer_jax.evaluate --workdir=DIR
--tasks=SPEC[,SPEC...] [--step=N] [--num_fewshot=K] [--limit=N] [--fewshot_file=F]
[--batch_size=B] [--seed=0] [--init]`.

A SPEC is a JSONL file, its kind recognized from its fields (context/choices/label: multiple
choice; source/target: generation; document/summary: summarization (ROUGE); length/depth:
passkey; text: perplexity), or KIND:PATH (kinds multiple_choice, cloze, perplexity, generation,
summarization, passkey), or a TFDS dataset [KIND:]tfds:NAME[@SPLIT]; any SPEC may end with
?OURS=THEIRS&... to read fields under other names; see evaluation/tasks.py.
The last line printed is one JSON object: {"step": N, "tasks": {TASK: {METRIC: value}}}.
--init evaluates the config's initial parameters instead (the before-training baseline)."""

import json

from transformer_jax import cli
from transformer_jax.config import ConfigError

FLAGS = {"workdir": "", "tasks": "", "step": -1, "num_fewshot": 0, "limit": 0,
         "fewshot_file": "", "batch_size": 0, "seed": 0, "init": False}


def main(argv):
  spec, overrides, f = cli.parse(argv, FLAGS)
  if spec or overrides:
    raise ConfigError("evaluate reads the workdir's config.json; it takes no --config or "
                      "--config.KEY")
  specs = [s for s in f["tasks"].split(",") if s]
  if not specs:
    raise ConfigError("--tasks=SPEC[,SPEC...] is required (PATH.jsonl or KIND:PATH)")
  cli.check_flags(f, [(name, f[name] >= 0, ">= 0") for name in ("num_fewshot", "limit",
                                                                  "batch_size")]
                  + [("step", f["step"] >= -1, ">= 0 (or -1, the latest)")])
  if f["fewshot_file"] and not f["num_fewshot"]:  # it was read by nothing
    raise ConfigError("--fewshot_file gives the examples of --num_fewshot=K; set K > 0")
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  config = harness.read_config(f["workdir"])
  loaded = harness.load_tasks(specs, num_fewshot=f["num_fewshot"], limit=f["limit"],
                              fewshot_file=f["fewshot_file"],
                              data_dir=config.data.data_dir,
                              family=config.model.family)  # checked before the model loads
  from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  # The CPU devices the run trained on (mesh.cpu_devices), before JAX starts its backends.
  distributed.use_cpu_devices(config.mesh.get("cpu_devices", 0))
  trainer, step, params = harness.load_workdir(
      f["workdir"], None if f["step"] < 0 else f["step"], init=f["init"], config=config)
  lm = harness.text_model(trainer, params, batch_size=f["batch_size"])
  results = harness.evaluate(lm, loaded, num_fewshot=f["num_fewshot"], seed=f["seed"])
  for name, metrics in results.items():
    print(f"[step {step}] {name}: " + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
  print(json.dumps({"step": step, "tasks": results}))


if __name__ == "__main__":
  cli.entry(main)
