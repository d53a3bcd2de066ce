"""transformer_jax: pretraining Transformer language models with JAX, from a CPU smoke run to
TPU pods and GPU hosts.

  tjax COMMAND [FLAGS...]          (or: python -m transformer_jax COMMAND [FLAGS...])
  tjax COMMAND --help              a command's own usage, flags and defaults

Start with `bash launch/local.sh` (a smoke model on this machine, ~2 minutes on a laptop CPU),
then e.g. `tjax train --config=configs/gpt2.py:small --workdir=runs/gpt2`. The README has the rest.
"""

import runpy
import sys

# name -> (module, what it does); the modules are the `python -m transformer_jax.NAME` commands
COMMANDS = {
    "train": ("transformer_jax.train", "pretrain (or resume) a model in a workdir"),
    "sample": ("transformer_jax.sample", "generate text from a workdir's latest checkpoint"),
    "quantize": ("transformer_jax.quantize", "int8/int4 post-training quantization of a workdir"),
    "evaluate": ("transformer_jax.evaluate", "score a checkpoint on downstream tasks (JSONL)"),
    "inspect": ("transformer_jax.inspect", "attention maps, logit lens, probes of a checkpoint"),
    "tokenizer": ("transformer_jax.tokenizer", "train a SentencePiece tokenizer for a corpus"),
    "clean": ("transformer_jax.clean", "dedup, language- and quality-filter a corpus into JSONL"),
    "convert": ("transformer_jax.convert", "Hugging Face checkpoints into and out of workdirs"),
    "aot": ("transformer_jax.aot", "compile a config for a TPU pod or GPU host: does it fit?"),
    "benchmark": ("transformer_jax.benchmark", "time training steps (and compare with peers)"),
    "sweep": ("transformer_jax.sweep", "scaling-law sweeps: plan, run, fit, predict"),
    "config": ("transformer_jax.config", "check a config without devices or data (as train does)"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  rows = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
  return __doc__.strip() + "\n\ncommands:\n" + "\n".join(rows)


def main(argv=None) -> int:
  """Runs `tjax COMMAND ARGS...` as `python -m transformer_jax.COMMAND ARGS...`."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  if argv[0] not in COMMANDS:
    print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  module = COMMANDS[argv[0]][0]
  sys.argv = [f"tjax {argv[0]}"] + argv[1:]
  sys.orig_argv = [sys.executable, "-m", module] + argv[1:]  # what a re-exec runs again
  runpy.run_module(module, run_name="__main__", alter_sys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
