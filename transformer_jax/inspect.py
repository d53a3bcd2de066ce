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
train.log_activations' act_rms/layer_I). --init inspects the config's initial parameters. A note
names each side of the input (its framing counted: a bos, a source's bos and eos, the decoder's
start token) that model.max_len cuts. --file and probe's --data may be gs:// objects.

`python -m transformer_jax.inspect probe --workdir=DIR --data=LABELLED.jsonl [--field=text]
[--label_field=label] [--holdout=0.25] [--seed=0] [--steps=300] [--limit=N] [--out=OUT]` trains a
linear probe (logistic regression) on the frozen, mean-pooled residual stream of every layer and
reports held-out accuracy per layer (OUT/probe.json and probe.png; OUT defaults to
DIR/inspect, and is no training workdir). Texts the model reads as the same ids (copies, or texts
alike up to model.max_len) stay on one side of the split; a note counts the texts cut.

The last line printed is one JSON object: what was written and the token counts (inspect: an
encoder-decoder's "source_tokens" too), or the per-layer held-out accuracy (probe). Mistakes are
one `error: ...` line and exit code 2.
"""

import io
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


def _workdir(f):
  """(config, tokenizer) of the flags' workdir, its devices set up (before its checkpoint)."""
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  if f["step"] < -1:
    raise ConfigError(f"--step={f['step']}: a checkpoint's step >= 0, or -1 (the latest)")
  config = harness.read_config(f["workdir"])
  distributed.use_cpu_devices(config.mesh.get("cpu_devices", 0))
  return config, tokenization.load(config.data.tokenizer)


def _load(f, config, tokenizer):
  """(trainer, step, params, tokenizer) of the flags' workdir, on the devices it trained on."""
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
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
    if not paths.isfile(f["file"]):  # (a local file or a gs:// object)
      raise ConfigError(f"--file={f['file']!r} {paths.not_a_file(f['file'])}")
    with paths.path(f["file"]).open("rb") as raw:  # (invalid UTF-8: U+FFFD; newlines as open's)
      text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace").read()
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
  config, tokenizer = _workdir(f)
  from transformer_jax.evaluation import interpret  # pylint: disable=g-import-not-at-top
  notes = cut_notes(config, tokenizer, text, f["target"])
  trainer, step, params, tokenizer = _load(f, config, tokenizer)
  result = interpret.run(trainer, params, tokenizer, text, target=f["target"],
                         top_k=f["top_k"])
  for note in notes:
    print(note)
  with paths.local_folder(f["out"]) as local:  # (a gs:// --out: uploaded after)
    files = {kind: [paths.join(f["out"], os.path.relpath(p, local)) for p in written]
             for kind, written in interpret.write(result, local).items()}
  for row in result["stats"]["layers"]:
    print(f"[step {step}] layer {row['layer']}: rms {row['rms']:.4g}, max |x| "
          f"{row['max_abs']:.4g}")
  sizes = {"tokens": len(result["tokens"])}
  if "source_tokens" in result:  # an encoder-decoder's: "tokens" are its decoder's
    sizes["source_tokens"] = len(result["source_tokens"])
  print(json.dumps({"step": step, "family": result["family"], **sizes, "out": f["out"],
                    "files": files}))


def cut_notes(config, tokenizer, text: str, target: str = "") -> list:
  """A note per side of the model's inputs that model.max_len cuts (its framing counted: a bos,
  an encoder-decoder source's bos and eos, the decoder's start token)."""
  from transformer_jax.evaluation import interpret  # pylint: disable=g-import-not-at-top
  max_len = int(config.model.max_len)
  names = {"source": "source (the text, framed)", "target": "decoder's input (its start "
           "token and --target)", "text": "text and --target" if target else "text"}
  return [f"note: the {names[side]} is {n} tokens long; model.max_len={max_len} cuts its end "
          f"(the model reads {max_len} of them)"
          for side, n in interpret.framed_lengths(config, tokenizer, text, target).items()
          if n > max_len]


def probe_out(f) -> str:
  """Where `inspect probe` writes: --out (not a training workdir), or WORKDIR/inspect (a gs://
  one's too: it went to ./inspect)."""
  if not f["out"]:
    return paths.join(f["workdir"], "inspect")
  cli.output_folder("out", f["out"])
  cli.not_a_workdir("out", f["out"])  # (as plain inspect: probe.json went into it)
  return f["out"]


def probe_main(argv):
  f = _parse(argv, PROBE_FLAGS)
  out = probe_out(f)
  from transformer_jax.evaluation import interpret  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import probe  # pylint: disable=g-import-not-at-top
  if f["limit"] < 0:
    raise ConfigError(f"--limit={f['limit']} must be >= 0 (0: every example)")
  texts, labels = probe.read_labelled(f["data"], f["field"], f["label_field"], f["limit"])
  probe.split(labels, f["holdout"], f["seed"], texts)  # checked before anything loads
  if f["steps"] < 1 or f["batch_size"] < 0:
    raise ConfigError("--steps must be >= 1 and --batch_size >= 0 (0: the model's)")
  config, tokenizer = _workdir(f)
  max_len = int(config.model.max_len)
  cut = sum(len(interpret.encode(config, tokenizer, t, cut=False)) > max_len for t in texts)
  ids = [tuple(interpret.encode(config, tokenizer, t)) for t in texts]  # what the model reads
  probe.split(labels, f["holdout"], f["seed"], ids)  # texts alike up to max_len: one side
  if cut:
    print(f"note: {cut} of {len(texts)} texts are longer than model.max_len={max_len} tokens "
          f"(framing included); the model reads {max_len} of each, its end cut")
  trainer, step, params, tokenizer = _load(f, config, tokenizer)
  x = probe.features(trainer, params, tokenizer, texts, batch_size=f["batch_size"], ids=ids)
  result = probe.fit(x, labels, holdout=f["holdout"], seed=f["seed"], steps=f["steps"],
                     texts=ids)
  result.update(step=step, data=f["data"], label_field=f["label_field"], cut_texts=cut)
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
