"""Hugging Face checkpoints in and out of training workdirs:

  python -m transformer_jax.convert import --hf_dir=DIR --workdir=OUT [--family=gpt2|llama|
      mistral|mixtral|qwen2_moe|bert|t5] [--config=FILE.py] [--config.KEY=VALUE ...]
  python -m transformer_jax.convert export --workdir=W --hf_dir=OUT [--step=N]

`import` writes OUT/config.json (the --config recipe, transformer_jax/config/base.py by default,
with the checkpoint's model.* values; --config.KEY=VALUE overrides the rest, e.g. data.*, train.*,
model.scan_layers, a padded model.vocab_size), OUT/hf_config.json (the source config.json, kept
for export) and checkpoint 0: the HF weights, a fresh optimizer state and the data position at
the start, so that `python -m transformer_jax.train --workdir=OUT` continues training and
`python -m transformer_jax.sample --workdir=OUT` samples. The data config must therefore be
valid (corpus, and data.tokenizer with at most model.vocab_size pieces; BERT's objective mlm
needs its [MASK] piece, T5's span its sentinels). A checkpoint directory with a tokenizer.json
has it copied to OUT/tokenizer/ and data.tokenizer pointed there (unless --config.data.tokenizer
says otherwise), so continued pretraining feeds the model the ids it knows, and an
encoder-decoder's decoder_start_token_id kept beside that copy starts its decoder; `export`
copies such a tokenizer along, and writes a SentencePiece model as the tokenizer.json and
tokenizer_config.json that AutoTokenizer reads with the same ids (with special tokens: the bos
and eos training framed a text with). `--family` defaults to config.json's model_type; an
import that fails removes the --workdir it made. `export` writes the latest (or --step)
checkpoint's parameters as model.safetensors + config.json + generation_config.json (with that
tokenizer's special ids) into a new or empty --hf_dir. Flags also take `--flag value`.

Any of the directories may be gs:// URLs (config/paths.py): an HF directory in a bucket is read
through a local temporary copy of its safetensors files and written locally, then uploaded (its
config.json last); a checkpoint's tokenizer.json is copied into a gs:// workdir like a local one.
"""

import contextlib
import json
import os

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.config import base
from transformer_jax.config import paths

USAGE = ("usage: python -m transformer_jax.convert import --hf_dir=DIR --workdir=OUT "
         "[--family=gpt2|llama|mistral|mixtral|qwen2_moe|bert|t5] [--config=FILE.py] "
         "[--config.KEY=VALUE ...] | export --workdir=W --hf_dir=OUT [--step=N]")
HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "tokenizer"  # an import's copy of the checkpoint's Hugging Face tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _recipe(spec):
  if spec:
    return cli.load_config(spec, [])
  config = base.get_config()
  config.lock()
  return config


def import_hf(spec, overrides, hf_dir, workdir, family=""):
  """The `import` command; returns the workdir's config."""
  if not hf_dir or not workdir:
    raise ConfigError("import needs --hf_dir=DIR and --workdir=OUT")
  cli.output_folder("workdir", workdir)  # (a file there: a FileExistsError traceback)
  made = not paths.exists(workdir)
  paths.makedirs(workdir)
  try:
    return _import_held(spec, overrides, hf_dir, workdir, family, made)
  except BaseException:
    if made:  # what the failed import left, its lock file now: the folder is gone again
      paths.remove(paths.join(workdir, "lock"))
      if not paths.is_remote(workdir):
        with contextlib.suppress(OSError):  # (only while empty)
          os.rmdir(workdir)
    raise


def _import_held(spec, overrides, hf_dir, workdir, family, made):
  from transformer_jax.training import checkpoint, lock  # pylint: disable=g-import-not-at-top
  with lock.hold(workdir), _removed_on_failure(workdir if made else ""):
    has_config = paths.isfile(paths.join(workdir, "config.json"))
    if paths.isdir(paths.join(workdir, "checkpoints")):
      if has_config:
        raise ConfigError(f"{workdir} already has checkpoints; import into a new --workdir")
      # an import killed before its config.json (written last): set aside, imported again
      print(f"{workdir} holds an unfinished import: its checkpoints set aside in "
            f"{checkpoint.set_aside(workdir)}")
    elif has_config:  # a planned run's (a sweep's) or another's: never replaced
      raise ConfigError(f"{workdir} already holds a config.json (a planned or earlier run's); "
                        f"import into a new --workdir")
    return _import_into(spec, overrides, hf_dir, workdir, family)


@contextlib.contextmanager
def _removed_on_failure(workdir: str):
  """An import into a folder it made that fails (a bad key, a missing file, Ctrl-C) removes
  what it wrote there, under the lock (a copy of the tokenizer, hf_config.json, a checkpoint)."""
  try:
    yield
  except BaseException:
    for name in paths.listdir(workdir) if workdir else ():
      if name != "lock":
        at = paths.join(workdir, name)
        if paths.isdir(at):
          paths.rmtree(at)
        else:
          paths.remove(at)
    raise


def _import_into(spec, overrides, hf_dir, workdir, family):
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  hf = hf_lib.read_config(hf_dir)
  hf_lib.weight_names(hf_dir)  # a pickle-only directory is refused before anything else
  if family:
    hf = {**hf, "model_type": family}
  values = hf_lib.hf_model_config(hf)
  config = _recipe(spec)
  config.model.update(values)
  if not spec:  # config/base.py trains a decoder: BERT / T5 checkpoints get their objective
    from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
    config.data.objective = objectives.default_for(values["family"])
  if values.get("sentence_head"):  # BertForPreTraining: keep training its NSP head
    config.data.sentence_pair = config.data.sentence_pair or "nsp"
  if not any(item.startswith("data.tokenizer=") for item in overrides):
    copied = _copy_tokenizer(hf_dir, paths.join(workdir, TOKENIZER_DIR))
    if copied:  # the model keeps reading the ids it was trained on
      config.data.tokenizer = copied
      from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
      # bos first as the tokenizer itself puts it (Llama's), or not (GPT-2's, T5's): scores
      # and continued training read the ids transformers (and lm-eval's hf model) feed it
      config.data.add_bos = tokenization.load(copied).adds_bos()
      if values["family"] == "encdec":
        _keep_decoder_start(hf_dir, hf, copied)
  for item in overrides:
    key, _, value = item.partition("=")
    config_lib.set_value(config, key, value)
  hf_lib.check_overrides(values, config.model.to_dict())
  with config.unlocked():
    if config.data.tokenizer:
      config.data.tokenizer = paths.abspath(config.data.tokenizer)
  _mask_padding(config, values["vocab_size"])
  config_lib.validate(config)
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.validate(config)
  params = hf_lib.load_params(hf_dir, hf_lib.model_config(config), hf)
  paths.write_text(paths.join(workdir, HF_CONFIG), json.dumps(hf, indent=2, sort_keys=True))
  _save_step0(config, params, workdir)  # config.json last: an import without it is unfinished
  return config


def _keep_decoder_start(hf_dir: str, hf: dict, tokenizer_dir: str) -> None:
  """Writes the checkpoint's decoder_start_token_id (generation_config.json's, else
  config.json's: what transformers' generate starts from) beside the import's copy of its
  tokenizer, where training, sampling, scoring and export read it (objectives.decoder_start):
  a tokenizer with a bos would have started the decoder from that."""
  from transformer_jax.data import hf_tokenization  # pylint: disable=g-import-not-at-top
  start = hf_tokenization.decoder_start_beside(paths.join(hf_dir, hf_tokenization.FILE))
  start = start if start >= 0 else hf.get("decoder_start_token_id")
  if isinstance(start, int) and start >= 0:
    paths.write_text(paths.join(tokenizer_dir, hf_tokenization.GENERATION),
                     json.dumps({"decoder_start_token_id": start}))


def _mask_padding(config, checkpoint_vocab: int):
  """model.output_vocab where model.vocab_size pads past what can be predicted: the checkpoint's
  vocabulary, or the tokenizer's when larger (its new rows train). The padded rows are zero,
  and their logits of 0 would take most of the probability of a trained model's."""
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  real = checkpoint_vocab
  if config.data.tokenizer:  # (a missing one is refused here, in one line)
    real = max(real, tokenization.load(config.data.tokenizer).vocab_size)
  if config.model.vocab_size > real and not config.model.output_vocab:
    config.model.output_vocab = real


def _copy_tokenizer(source_dir: str, out_dir: str, tokenizer_file: str = "") -> str:
  """Copies a Hugging Face tokenizer (tokenizer.json, or `tokenizer_file` of another name as
  tokenizer.json, and the files beside it that name its special tokens) from `source_dir` to
  `out_dir` (either may be gs://...); returns out_dir's absolute path, or "" if there is none to
  copy."""
  sources = {name: paths.join(source_dir, name) for name in TOKENIZER_FILES}
  sources["tokenizer.json"] = tokenizer_file or sources["tokenizer.json"]
  if not paths.isfile(sources["tokenizer.json"]):
    return ""
  paths.makedirs(out_dir)
  for name, source in sources.items():
    if paths.isfile(source):
      paths.path(paths.join(out_dir, name)).write_bytes(paths.path(source).read_bytes())
  return paths.abspath(out_dir)


def _save_step0(config, params, workdir):
  """config.json + checkpoint 0 = what the first save of a training run would hold."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import checkpoint, optimizer  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import TrainState  # pylint: disable=g-import-not-at-top
  paths.makedirs(workdir)
  params = jax.tree.map(jax.numpy.asarray, params)
  tx, _ = optimizer.make(config.optimizer, config.train.steps)
  state = TrainState.create(params, tx.init(params))
  data = pipeline.make_train_iterator(config)
  ckpts = checkpoint.Checkpoints(workdir, config.checkpoint)
  try:
    ckpts.save(0, state, data, force=True)
  finally:
    ckpts.close()
    data.close()
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  resume.record(config, workdir)  # config.json, and the tokenizer's digest that readers check


def export_hf(workdir, hf_dir, step=-1):
  """The `export` command; returns the config.json dict written."""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import checkpoint, resume  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.families import build_model  # pylint: disable=g-import-not-at-top
  saved = paths.join(workdir or "", "config.json")
  if not workdir or not hf_dir or not paths.isfile(saved):
    raise ConfigError(f"export needs --workdir=W (a training workdir with config.json; got "
                      f"{workdir!r}) and --hf_dir=OUT")
  cli.output_folder("hf_dir", hf_dir)
  from transformer_jax.quant import store  # pylint: disable=g-import-not-at-top
  held = paths.listdir(hf_dir)  # a user's config.json or tokenizer would be overwritten, and
  # files the export does not write left beside the model (an older export's, another's)
  if held:
    named = [n for n in ("checkpoints", store.MANIFEST, hf_lib.SAFETENSORS, hf_lib.INDEX,
                         *hf_lib.PICKLES) if n in held]
    raise ConfigError(f"--hf_dir={hf_dir} already holds {(named or held)[0]}"
                      f"{' (a workdir or a model)' * bool(named)}; export to a new or empty "
                      f"folder")
  config = config_lib.from_json_file(saved)
  resume.check_tokenizer(workdir, config.data.tokenizer)  # (exported with the model)
  model = build_model(config)
  abstract = families.abstract_params(model)
  step = None if step < 0 else step
  if store.is_quantized(workdir):  # quantize's output: exported dequantized
    got, params = store.restore_params(workdir, config.checkpoint, model, abstract)
    checkpoint.require_step(workdir, [got], step, quantized=True)
  else:
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint, read_only=True)
    checkpoint.require_step(workdir, ckpts.all_steps(), step)
    got, params = ckpts.restore_params(abstract, step=step)
  hf = _export_hf_config(workdir, config)
  family = hf.get("model_type", "")
  hf_lib.export_config(model, family=family, hf_config=hf)  # (refused before writing anything)
  _export_tokenizer(config, hf_dir)  # before config.json: a reader waiting for it has both
  written = hf_lib.to_hf(model, params, hf_dir, family=family, hf_config=hf)
  if config.model.quantization != "none":  # (quantized training keeps float master weights)
    print(f"note: model.quantization={config.model.quantization}: exported the float weights; "
          f"transformers computes without the {config.model.quantization} matmuls that "
          f"training, evaluate and sample used, so its logits differ a little")
  print(f"exported step {got} of {workdir} as {written['model_type']} (vocabulary "
        f"{written['vocab_size']}) to {hf_dir}")
  return written


def _export_tokenizer(config, hf_dir: str) -> None:
  """A Hugging Face tokenizer (an import's, or a tokenizer.json) is copied with the files beside
  it; a SentencePiece model is written as the tokenizer.json that encodes as it does. Either
  adds the special tokens around a text that training put there (hf_tokenization.for_export)."""
  from transformer_jax.data import hf_tokenization  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  tokenizer = config.data.tokenizer
  if not tokenizer:
    return
  before, after = _framing(config, tokenization.load(tokenizer))
  if hf_tokenization.is_hf(tokenizer):
    source = hf_tokenization.path_of(tokenizer)  # (a .json of another name: that file)
    if not _copy_tokenizer(paths.dirname(source), hf_dir, tokenizer_file=source):
      return
    exported, beside = (paths.join(hf_dir, name) for name in (hf_tokenization.FILE,
                                                               "tokenizer_config.json"))
    config_was = json.loads(paths.read_text(beside)) if paths.isfile(beside) else {}
    data, tok_config = hf_tokenization.for_export(paths.read_text(exported), config_was,
                                                  before, after)
    paths.write_text(exported, data)
    if tok_config != config_was:
      paths.write_text(beside, json.dumps(tok_config, indent=1))
    return
  paths.makedirs(hf_dir)
  files = hf_tokenization.from_sentencepiece(paths.path(tokenizer).read_bytes(),
                                             config.model.max_len, before, after)
  for name, text in files.items():
    paths.write_text(paths.join(hf_dir, name), text)


def _framing(config, tok) -> tuple[list[int], list[int]]:
  """The special ids training put before and after a text: an encoder-decoder's source framing
  (objectives.source_ids: bos with data.add_bos, the eos T5's span and UL2's sources end with;
  a UL2 prompt's mode token, which the prompt names, goes before the bos there), else bos with
  data.add_bos (a decoder's documents, an encoder's --fill_mask text)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  if config.model.family != "encdec":
    return [tok.bos_id] * bool(config.data.add_bos and tok.bos_id >= 0), []
  marker = tok.vocab_size  # an id that is no piece (nor a mode token)
  ids = objectives.source_ids(config.data, tok, [marker], head=False)
  return ids[:ids.index(marker)], ids[ids.index(marker) + 1:]


def _export_hf_config(workdir, config) -> dict:
  """The imported config.json (its vocabulary: padded rows are cut) with the special ids of the
  tokenizer the export writes: the checkpoint's own where data.tokenizer is the import's copy
  of its tokenizer, else that tokenizer's bos, eos and pad; an encoder-decoder's decoder start
  is the one training used (objectives.decoder_start). With a tokenizer of more pieces than
  that vocabulary, the model keeps the rows it predicts (model.output_vocab, else
  model.vocab_size)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization as tok_lib  # pylint: disable=g-import-not-at-top
  hf = {}
  if paths.isfile(paths.join(workdir, HF_CONFIG)):
    hf = json.loads(paths.read_text(paths.join(workdir, HF_CONFIG)))
  tokenizer = config.data.tokenizer
  if not tokenizer or not paths.isfile(tok_lib.tokenizer_file(tokenizer)):
    return hf  # (a Hugging Face tokenizer's folder: its tokenizer.json)
  tok = tok_lib.load(tokenizer)
  if tok.vocab_size > hf.get("vocab_size", 0):
    hf.pop("vocab_size", None)
  imported = paths.join(workdir, TOKENIZER_DIR)
  if not (paths.isfile(tok_lib.tokenizer_file(imported)) and tfds_text.tokenizer_identity(
      imported) == tfds_text.tokenizer_identity(tokenizer)):
    for key, i in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                   ("pad_token_id", tok.pad_id)):
      hf[key] = i
      if i < 0:
        del hf[key]
  if config.model.family == "encdec":
    hf["decoder_start_token_id"] = objectives.decoder_start(tok)
  return hf


def main(argv):
  if argv and argv[0] in ("-h", "--help", "help"):
    print(__doc__)
    return
  if not argv or argv[0] not in ("import", "export"):
    raise ConfigError(f"unknown subcommand {argv[0]!r}; {USAGE}" if argv else USAGE)
  spec, overrides, f = cli.parse(argv[1:], {"hf_dir": "", "workdir": "",
                                                          "family": "", "step": -1})
  if argv[0] == "export":
    if spec or overrides or f["family"]:
      raise ConfigError("export takes no --config or --family: the workdir's config.json says "
                        "what the model is")
    if f["step"] < -1:  # (-7 exported the latest)
      raise ConfigError(f"--step={f['step']}: give a checkpoint step (default: the latest)")
    export_hf(f["workdir"], f["hf_dir"], f["step"])
    return
  if f["step"] != -1:
    raise ConfigError("import writes checkpoint 0; --step is for export")
  config = import_hf(spec, overrides, f["hf_dir"], f["workdir"], f["family"])
  print(f"imported {f['hf_dir']} ({config.model.num_layers} layers, d_model "
        f"{config.model.d_model}) into {f['workdir']}: checkpoint 0; continue with "
        f"python -m transformer_jax.train --workdir={f['workdir']}")


if __name__ == "__main__":
  cli.entry(main)
