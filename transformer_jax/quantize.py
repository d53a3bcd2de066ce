"""Post-training quantization of a workdir: `python -m transformer_jax.quantize --workdir=W
--out=W8 --mode=int8|int4 [--group_size=G]`.

Writes W8, a workdir that `sample` reads (dequantizing on load): W's config.json, and its latest
parameters with every matmul weight quantized (quant/ptq.py): int8 with an absmax scale per
output channel, or int4 with one per output channel and group of G input rows
(--group_size=0, the default, means 32 for int4 and whole channels for int8). The last line printed is one JSON object: param_bytes
and quantized_param_bytes (the arrays), quantized_disk_bytes (W8/quantized on disk), eval_loss
and quantized_eval_loss (the held-out loss of the same evaluation batches, eval.batches of them,
before and after), the mode, group size and source step. `--config.KEY=VALUE` overrides the
workdir's config for this command (e.g. --config.eval.batches=16), but not the model or its
tokenizer (model.* keys, but how a step runs, and data.tokenizer are refused); W8 keeps W's
config.json."""

import json

from transformer_jax import cli
from transformer_jax.config import ConfigError


def main(argv):
  spec, overrides, f = cli.parse(argv, {"workdir": "", "out": "", "mode": "int8",
                                         "group_size": 0})
  if spec:
    raise ConfigError("quantize reads the workdir's config.json: no --config (--config.KEY=VALUE "
                      "overrides it for this command, e.g. --config.eval.batches=16)")
  from transformer_jax.quant import run  # pylint: disable=g-import-not-at-top
  print(json.dumps(run.quantize_workdir(f["workdir"], f["out"], f["mode"], f["group_size"],
                                        overrides)))


if __name__ == "__main__":
  cli.entry(main)
