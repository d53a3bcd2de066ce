"""Look inside a checkpoint: `python -m transformer_jax.inspect --workdir=DIR --text="..."
--out=OUT [--file=F] [--step=N] [--target="..."] [--top_k=5] [--init]` writes into OUT:

  attention/*_layer_I.png   every layer's attention maps, one heat map per head (the reference
                            kernel's probabilities; token pieces on the axes)
  logit_lens.{json,md,png}  each layer's residual stream through the final norm and the output
                            head: top tokens and the rank of the next token (an encoder's: the
                            input token) per layer and position
  stats.{json,md}           per layer RMS and max |x| of the residual stream, and each attention
                            head's mean entropy

--file reads the text from a file instead of --text. An encoder-decoder reads the text as its
source and --target (default: nothing) after its start token; a prefix LM reads the text as its
prefix (both ways, as it reads a prompt) and --target after it (causally). Layers are "embed" (the
embedding's output) and block I's output "I" (its parameters `layer_I`, as in
train.log_activations' act_rms/layer_I). --init inspects the config's initial parameters.

`python -m transformer_jax.inspect probe --workdir=DIR --data=LABELLED.jsonl [--field=text]
[--label_field=label] [--holdout=0.25] [--seed=0] [--steps=300] [--limit=N] [--out=OUT]` trains a
linear probe (logistic regression) on the frozen, mean-pooled residual stream of every layer and
reports held-out accuracy per layer (OUT/probe.json and probe.png; OUT defaults to
DIR/inspect).

The last line printed is one JSON object: what was written (inspect), or the per-layer held-out
accuracy (probe). Mistakes are one `error: ...` line and exit code 2.
"""

import json
import os

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.config import paths

FLAGS = {"workdir": "", "step": -1, "text": "", "file": "", "out": "", "target": "",
         "top_k": 5, "init": False}
PROBE_FLAGS = {"workdir": "", "step": -1, "data": "", "field": "text", "label_field": "label",
               "holdout": 0.25, "seed": 0, "steps": 300, "limit": 0, "batch_size": 0,
               "out": "", "init": False}


def _load(f):
  """(trainer, step, params, tokenizer) of the flags' workdir, on the devices it trained on."""
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  if f["step"] < -1:
    raise ConfigError(f"--step={f['step']}: a checkpoint's step >= 0, or -1 (the latest)")
  config = harness.read_config(f["workdir"])
  distributed.use_cpu_devices(config.mesh.get("cpu_devices", 0))
  tokenizer = tokenization.load(config.data.tokenizer)
  trainer, step, params = harness.load_workdir(
      f["workdir"], None if f["step"] < 0 else f["step"], init=f["init"], config=config)
  return trainer, step, params, tokenizer


def _parse(argv, flags):
  spec, overrides, f = cli.parse(argv, flags)
  if spec or overrides:
    raise ConfigError("inspect reads the workdir's config.json; it takes no --config or "
                      "--config.KEY")
  return f


def _text(f) -> str:
  if f["text"] and f["file"]:
    raise ConfigError("give --text or --file, not both")
  if f["file"]:
    if not os.path.isfile(f["file"]):
      raise ConfigError(f"--file={f['file']!r} {paths.not_a_file(f['file'])}")
    with open(f["file"], encoding="utf-8", errors="replace") as fh:  # (invalid UTF-8: U+FFFD)
      text = fh.read()
  else:
    text = f["text"]
  from transformer_jax.data import corpus  # pylint: disable=g-import-not-at-top
  text = corpus.valid_text(text)  # (--text's invalid bytes reach Python as lone surrogates)
  if not text.strip():
    raise ConfigError("the text is empty: give --text=\"...\" or --file=F with some text")
  return text


def inspect_main(argv):
  f = _parse(argv, FLAGS)
  text = _text(f)
  if not f["out"]:
    raise ConfigError("--out=DIR is required (where the maps, lens and statistics go)")
  if f["top_k"] < 1:
    raise ConfigError("--top_k must be >= 1")
  cli.output_folder("out", f["out"])
  cli.not_a_workdir("out", f["out"])
  trainer, step, params, tokenizer = _load(f)
  from transformer_jax.evaluation import interpret  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  tokens = len(tokenization.with_control_pieces(tokenizer, text))
  max_len = trainer.config.model.max_len
  if tokens >= max_len:
    print(f"note: the text has {tokens} tokens; the model reads its first (model.max_len="
          f"{max_len}, a bos or the source's framing included)")
  result = interpret.run(trainer, params, tokenizer, text, target=f["target"],
                         top_k=f["top_k"])
  with paths.local_folder(f["out"]) as local:  # (a gs:// --out: uploaded after)
    files = {kind: [paths.join(f["out"], os.path.relpath(p, local)) for p in written]
             for kind, written in interpret.write(result, local).items()}
  for row in result["stats"]["layers"]:
    print(f"[step {step}] layer {row['layer']}: rms {row['rms']:.4g}, max |x| "
          f"{row['max_abs']:.4g}")
  print(json.dumps({"step": step, "family": result["family"], "tokens": len(result["tokens"]),
                    "out": f["out"], "files": files}))


def probe_main(argv):
  f = _parse(argv, PROBE_FLAGS)
  if f["out"]:
    cli.output_folder("out", f["out"])
  from transformer_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  if f["limit"] < 0:
    raise ConfigError(f"--limit={f['limit']} must be >= 0 (0: every example)")
  texts, labels = probe.read_labelled(f["data"], f["field"], f["label_field"], f["limit"])
  probe.split(labels, f["holdout"], f["seed"], texts)  # checked before the model loads
  if f["steps"] < 1 or f["batch_size"] < 0:
    raise ConfigError("--steps must be >= 1 and --batch_size >= 0 (0: the model's)")
  trainer, step, params, tokenizer = _load(f)
  x = probe.features(trainer, params, tokenizer, texts, batch_size=f["batch_size"])
  result = probe.fit(x, labels, holdout=f["holdout"], seed=f["seed"], steps=f["steps"],
                     texts=texts)
  result.update(step=step, data=f["data"], label_field=f["label_field"])
  out = f["out"] or ("inspect" if paths.is_remote(f["workdir"]) else  # written locally
                     os.path.join(f["workdir"], "inspect"))
  from transformer_jax.evaluation import interpret_plots  # pylint: disable=g-import-not-at-top
  with paths.local_folder(out) as local:  # (a gs:// --out: uploaded after)
    with open(os.path.join(local, "probe.json"), "w") as fh:
      json.dump(result, fh, indent=1)
    interpret_plots.probe_accuracy(result, os.path.join(local, "probe.png"))
  for row in result["layers"]:
    print(f"[step {step}] layer {row['layer']}: held-out accuracy "
          f"{row['heldout_accuracy']:.3f} (train {row['train_accuracy']:.3f})")
  print(json.dumps({"step": step, "chance": result["chance"], "out": out,
                    "heldout_accuracy": {r["layer"]: r["heldout_accuracy"]
                                         for r in result["layers"]}}))


def main(argv):
  if argv and argv[0] == "probe":
    return probe_main(argv[1:])
  if argv and not argv[0].startswith("-"):
    raise ConfigError(f"unknown subcommand {argv[0]!r}: inspect [probe] --workdir=DIR ...")
  return inspect_main(argv)


if __name__ == "__main__":
  cli.entry(main)
