"""Pretrain a model: `python -m transformer_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR
[--config.KEY=VALUE ...]`. Re-running the same command in the same workdir resumes exactly.

Several processes (hosts) run the same command; they find each other on Cloud TPU VMs and in
SLURM jobs by themselves, or from --coordinator=HOST:PORT --num_processes=N --process_id=I
(or TJAX_COORDINATOR, TJAX_NUM_PROCESSES, TJAX_PROCESS_ID); see parallel/distributed.py."""

import os
import sys

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.config import paths


def main(argv):
  spec, overrides, flags = cli.parse(argv, {"workdir": "", "coordinator": "",
                                            "num_processes": 0, "process_id": -1})
  if not flags["workdir"]:
    raise ConfigError("--workdir=DIR is required")
  from transformer_jax.quant import store  # pylint: disable=g-import-not-at-top
  workdir = flags["workdir"]
  with paths.storage_errors(workdir, f"--workdir={workdir} cannot be read", ConfigError):
    quantized = store.is_quantized(workdir)  # (the first look at a gs:// one's storage)
  if quantized:  # its weights are no checkpoint that training reads
    raise ConfigError(f"--workdir={flags['workdir']} is a quantized workdir (quantize's output); "
                      f"train in its source workdir, or a new one")
  config = cli.load_config(spec, overrides, flags["workdir"])
  from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.use_cpu_devices(config.mesh.get("cpu_devices", 0))
  distributed.initialize(flags["coordinator"], flags["num_processes"], flags["process_id"])
  with config.unlocked():  # a workdir's saved config must work from any current directory
    if config.data.tokenizer:
      config.data.tokenizer = paths.abspath(config.data.tokenizer)  # gs:// as it is
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import anomaly  # pylint: disable=g-import-not-at-top
  try:
    out = loop.train(config, flags["workdir"])
  except anomaly.AnomalyError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except checkpoint.WriteError as e:
    sys.stdout.flush()
    sys.stderr.flush()
    # One write(2), starting a fresh line: Orbax's failing background writers may be printing
    # tracebacks right now, and a print could be split into pieces among theirs.
    os.write(2, f"\nerror: {e}\n".encode())
    os._exit(4)  # now: those writers would only add noise at shutdown
  if out.get("preempted"):
    sys.exit(128 + out["preempted"])  # the conventional status of a signalled process
  import jax  # pylint: disable=g-import-not-at-top
  text = None
  if config.train.sample_prompt:  # on every process: the parameters may span them
    from transformer_jax import sample  # pylint: disable=g-import-not-at-top
    text = sample.sample_text(config, out["state"].params, config.train.sample_prompt,
                              max_new_tokens=config.train.sample_tokens, temperature=0.8, top_k=40)
  if jax.process_index() != 0:
    return
  if text is not None:
    print(f"--- sample (prompt {config.train.sample_prompt!r}) ---\n"
          f"{config.train.sample_prompt}{text}\n---")
  print(f"{'already complete' if out.get('complete') else 'done'}: step {out['step']}, "
        f"loss {out.get('loss', float('nan')):.4f}, "
        + (f"eval_loss {out['eval_loss']:.4f}, " if "eval_loss" in out else "no eval_loss, ")
        + f"workdir {flags['workdir']}")


if __name__ == "__main__":
  cli.entry(main)
