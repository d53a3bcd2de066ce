"""The resume policy: whose checkpoints a workdir holds, and the state a run starts from.

Re-running a command in its workdir resumes from the newest readable checkpoint. Checkpoints
written for another model, tokenizer or optimizer state are refused, set aside
(`checkpoint.on_mismatch=fresh`), or their parameters reused with a new optimizer state
(`params`)."""

import json
import os

import jax
from jax.experimental import multihost_utils

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization
from transformer_jax.training import checkpoint as ckpt_lib

TOKENIZER_SHA = "tokenizer.sha256"  # the SHA-256 of the tokenizer the checkpoints were trained with
CORPUS = "corpus_identity.txt"  # the prepared corpus (or mixture sources) they were trained on
TEACHER = "distill_teacher.json"  # {"teacher": PATH, "step": N}: the teacher checkpoint a
# distillation's checkpoints were distilled from (distill.pinned)

# How a step computes or what it adds to the loss, not what the parameters are: a run may resume
# with other values of these (quantized training on or off, another MoE capacity or router-loss
# weight).
EXECUTION_KEYS = ("model.attention_impl", "model.attention_chunks", "model.remat",
                  "model.quantization", "model.expert_capacity_factor", "model.router_aux_loss",
                  "model.router_z_loss", "model.router_jitter")


def prepare_workdir(workdir: str):
  """Creates the workdir (locally) and checks that it can be written: a read-only folder, a
  missing bucket or an unreachable storage server is one line here, before anything compiles."""
  if refusal := paths.orbax_refusal(workdir):
    raise ConfigError(f"workdir {refusal}")
  try:
    paths.check_writable(workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not (isinstance(e, OSError) or paths.is_remote(workdir)):
      raise
    if isinstance(e, FileExistsError) and paths.isfile(workdir):
      raise ConfigError(f"workdir {workdir} is a file, not a folder") from None
    raise ConfigError(f"workdir {workdir} is not writable: {paths.why(e, workdir)}") from None
  if paths.is_remote(workdir):  # (a bucket has objects and prefixes: nothing to swap)
    return
  for names, is_wrong, what in ((WRITTEN + ("metrics.jsonl", "lock"), os.path.isdir, "a folder"),
                                (FOLDERS, os.path.isfile, "a file")):
    for name in names:  # (each was a traceback once the run wrote it)
      if is_wrong(os.path.join(workdir, name)):
        raise ConfigError(f"{os.path.join(workdir, name)} is {what}, where a run writes its "
                          f"{name}: move it out of the workdir")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _state_layout(flat: dict) -> dict:
  """What decides the train state's structure besides model.*: a restore onto another one
  fails, and is no sign of a damaged checkpoint."""
  def num(key):
    return float(flat.get(key) or 0)
  return {"optimizer.grad_clip > 0": num("optimizer.grad_clip") > 0,  # a clipping state
          "train.distill.hidden_weight > 0 with a teacher":  # the projection's parameters
              bool(flat.get("train.distill.teacher")) and num("train.distill.hidden_weight") > 0}


def _saved_and_now(config, workdir: str):
  """(the workdir's saved config, `config`), flat and with defaults; None without a saved one."""
  saved_path = paths.join(workdir, "config.json")
  if not paths.isfile(saved_path):
    return None
  return (_flat(config_lib.with_defaults(config_lib.read_json(saved_path))),
          _flat(json.loads(config_lib.to_json(config))))


def _changed(saved: dict, now: dict) -> set:
  return {k for k in set(saved) | set(now) if saved.get(k) != now.get(k)}


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a step folder."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  return paths.isdir(ckpt_dir) and any(d.isdigit() for d in paths.listdir(ckpt_dir))


def workdir_mismatch(config, workdir: str) -> list[str]:
  """`KEY: saved -> now` for each model.* (but EXECUTION_KEYS) or data.tokenizer value, and each
  _state_layout entry, that differs from the config the workdir's checkpoints were written with
  (none when there are no checkpoints), and the tokenizer file's content when it changed at the
  same path (its SHA-256, saved beside config.json). A key newer than the saved config counts
  as its default there."""
  flat = _saved_and_now(config, workdir)
  if flat is None or not has_checkpoints(workdir):
    return []
  saved, now = flat
  sha_path = paths.join(workdir, TOKENIZER_SHA)
  by_content = bool(config.data.tokenizer) and paths.isfile(sha_path)
  keys = sorted(k for k in _changed(saved, now)
                if k.startswith("model.") and k not in EXECUTION_KEYS)
  path = lambda flat: paths.abspath(flat.get("data.tokenizer") or "")
  if not by_content and path(saved) != path(now):  # (with a digest, content decides below)
    keys.insert(0, "data.tokenizer")
  diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys]
  was, is_ = _state_layout(saved), _state_layout(now)
  diffs += [f"{k}: {was[k]} -> {is_[k]}" for k in was if was[k] != is_[k]]
  if by_content:  # the same tokenizer under another path is no change
    old = paths.read_text(sha_path).strip()
    if not tfds_text.matches_identity(old, config.data.tokenizer):
      new = tfds_text.tokenizer_identity(config.data.tokenizer)
      diffs.append(f"the tokenizer data.tokenizer={config.data.tokenizer!r} (sha256 "
                   f"{old[:12]}... -> {new[:12]}...: its file, or for a Hugging Face one the "
                   f"tokenizer_config.json beside it)")
  return diffs


def record(c, workdir: str, corpus: str = "", teacher=None) -> None:
  """Writes what the workdir's checkpoints are trained with beside them: the corpus's identity,
  the tokenizer's digest (resume and every command that reads the workdir compare them), the
  teacher checkpoint a distillation reads (TEACHER: a resume reads it again), and
  config.json last (an import without it is unfinished). A write that fails (a full disk) is
  a one-line WriteError and changes none of them."""
  texts = {paths.join(workdir, CORPUS): (corpus or _corpus_identity(c)) + "\n"}
  if teacher is not None and teacher.step is not None:
    texts[paths.join(workdir, TEACHER)] = json.dumps(
        {"teacher": paths.abspath(c.train.distill.teacher), "step": teacher.step})
  if c.data.tokenizer:
    texts[paths.join(workdir, TOKENIZER_SHA)] = (tfds_text.tokenizer_identity(c.data.tokenizer)
                                                 + "\n")
  texts[paths.join(workdir, "config.json")] = config_lib.to_json(c)
  _write(workdir, texts)


def _write(workdir: str, texts: dict):
  """paths.write_texts(texts), a storage's failure raised as a one-line WriteError."""
  try:
    paths.write_texts(texts)
  except Exception as e:  # pylint: disable=broad-except
    if (reason := ckpt_lib.write_failure(e, workdir)) is None:
      raise
    fix = ("fix the bucket or the connection to it" if paths.is_remote(workdir)
           else "free space or fix the workdir")
    raise ckpt_lib.WriteError(
        f"writing {', '.join(os.path.basename(p) for p in texts)} in {workdir} failed: "
        f"{reason}; {fix}, then re-run the same command") from None


def check_tokenizer(workdir: str, tokenizer: str) -> None:
  """ConfigError unless `tokenizer` (the workdir's data.tokenizer) is the one its checkpoints
  were trained with, by WORKDIR/tokenizer.sha256 (a workdir without it passes): one trained
  again at the same path gives other ids, through which sample, evaluate, inspect, quantize and
  export read the model without a word (before the tokenizer is loaded: a missing one's advice
  makes a new one)."""
  recorded = paths.join(workdir, TOKENIZER_SHA)
  if not tokenizer or not paths.isfile(recorded):
    return
  old = paths.read_text(recorded).strip()
  try:
    if (paths.isfile(tokenization.tokenizer_file(tokenizer))
        and tfds_text.matches_identity(old, tokenizer)):
      return
  except (ValueError, OSError) as e:  # e.g. a tokenizer_config.json that is no JSON
    raise ConfigError(f"data.tokenizer={tokenizer!r} cannot be read ({paths.why(e)})") from None
  raise ConfigError(f"data.tokenizer={tokenizer!r} is not the tokenizer {workdir} was trained "
                    f"with (its {TOKENIZER_SHA}: {old[:12]}...; the file was changed, trained "
                    f"again or removed): put that tokenizer back at that path, or, where it "
                    f"moved, set data.tokenizer in {paths.join(workdir, 'config.json')} to its "
                    f"new path")


# What decides the order a saved data position indexes (a mixture's weights and sources may
# change: its sources' positions are kept by name).
DATA_ORDER_KEYS = ("seed", "data.corpus", "data.format", "data.text_field", "data.packing",
                   "data.validation_fraction", "data.objective", "data.seq_len", "data.add_bos",
                   "data.add_eos")


def config_changes(config, workdir: str) -> tuple[list[str], list[str]]:
  """`KEY: saved -> now` for each value that differs from the workdir's saved config (none
  without one): (those of DATA_ORDER_KEYS, the others but the model's and the tokenizer's,
  which workdir_mismatch judges; a model.* key of EXECUTION_KEYS, which it lets change, is
  among the others)."""
  flat = _saved_and_now(config, workdir)
  if flat is None:
    return [], []
  saved, now = flat
  keys = sorted(k for k in _changed(saved, now) if k in EXECUTION_KEYS
                or (not k.startswith("model.") and k != "data.tokenizer"))
  said = {k: f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys}
  return ([said[k] for k in keys if k in DATA_ORDER_KEYS],
          [said[k] for k in keys if k not in DATA_ORDER_KEYS])


def _corpus_identity(config) -> str:
  """tfds_text.corpus_identity of the corpus, or `NAME=identity` per data.mixture source."""
  from transformer_jax.data import mixture  # pylint: disable=g-import-not-at-top
  sources = mixture.sources(config)
  if not sources:
    return tfds_text.corpus_identity(config.data)
  return " ".join(f"{s.name}={tfds_text.corpus_identity(s.config.data)}" for s in sources)


def _corpus_changes(old: str, new: str) -> list[str]:
  """One line per corpus (or mixture source of both) whose prepared documents changed: files
  added to its glob, removed or changed, which reorders its documents (a source added or
  removed is no change: positions are kept by source)."""
  pairs = lambda line: dict(p.split("=", 1) if "=" in p else ("", p) for p in line.split())
  was, now = pairs(old), pairs(new)
  return [f"the files of {f'source {k!r}' if k else 'data.corpus'}: {was[k]} -> {now[k]}"
          for k in was if k in now and was[k] != now[k]]


WRITTEN = ("config.json", TOKENIZER_SHA, CORPUS, TEACHER)  # what `start` writes beside the
# checkpoints
FOLDERS = ("checkpoints", "checkpoints_unreadable", "tensorboard")  # the folders a run makes


def written_files(workdir: str) -> dict:
  """{name: text or None} of the WRITTEN files as they are now (process 0's to put back)."""
  files = {name: paths.join(workdir, name) for name in WRITTEN}
  return {name: paths.read_text(p) if paths.isfile(p) else None for name, p in files.items()}


def put_back(workdir: str, before: dict):
  """The WRITTEN files as `before` (written_files') had them: a run that `start` accepted but
  its first step refused (a kernel the platform lacks, found when tracing) leaves the workdir's
  config as it was (it saved its own, and the plain resume command failed with it)."""
  for name, text in before.items():
    path = paths.join(workdir, name)
    if text is not None:
      paths.write_text(path, text)
    elif paths.isfile(path):
      paths.remove(path)


def start(trainer, workdir: str, data, say, data_writes=None):
  """(first step, state, Checkpoints) for a run in `workdir`: restored from its newest readable
  checkpoint (and `data` moved to its position), or freshly initialised. Writes config.json
  only once the checkpoints have accepted this config and steps remain, so a refused or
  finished run leaves it as it was. A start from the previous checkpoints' parameters
  (on_mismatch=params) is saved as step 0 (_params_start)."""
  c = trainer.config
  finish_params_start(workdir, say)
  diffs = workdir_mismatch(c, workdir)
  if diffs and c.checkpoint.on_mismatch == "refuse":
    raise ConfigError(f"{workdir} holds checkpoints of another model, tokenizer or optimizer ("
                      f"{'; '.join(diffs)}); use a new --workdir, or "
                      f"--config.checkpoint.on_mismatch=fresh|params")
  if jax.process_count() > 1:  # every process has read config.json before process 0 rewrites it
    multihost_utils.sync_global_devices("workdir checked")
  corpus = _corpus_identity(c)
  if diffs and c.checkpoint.on_mismatch == "params" and (
      started := _params_start(trainer, workdir, data, say, data_writes, corpus)):
    return started
  if diffs:  # (fresh, or params with no parameters listed)
    say(f"checkpoints of the previous config set aside in {ckpt_lib.set_aside(workdir, WRITTEN)}"
        f" (with its config.json)")
  ckpts = ckpt_lib.Checkpoints(workdir, c.checkpoint)
  step, state = ckpts.restore(trainer.abstract_state, data, report=say)
  reordered, changed = config_changes(c, workdir) if state is not None else ([], [])
  corpus_path = paths.join(workdir, CORPUS)
  if state is not None and paths.isfile(corpus_path) and not any(
      r.startswith(("data.corpus", "data.format", "data.validation_fraction")) for r in reordered):
    reordered += _corpus_changes(paths.read_text(corpus_path).strip(), corpus)
  finished = state is not None and step >= c.train.steps  # (trains nothing: records nothing,
  # or a mistaken flag on a finished run's command became the config its next resume reads)
  if jax.process_index() == 0 and not finished:
    record(c, workdir, corpus, trainer.teacher)
  if state is None:
    return 0, trainer.init_state(c.seed), ckpts
  say(f"resumed from {ckpts.directory}/{step}")
  if changed:  # e.g. a raised train.steps, or a new learning rate: said, not silent
    say(f"config changed since checkpoint {step}: {'; '.join(changed)}")
  if reordered:
    say(f"warning: the data changed since checkpoint {step} ({'; '.join(reordered)}): its "
        f"saved position now indexes another document order, so this epoch may repeat or "
        f"skip documents")
  return step, state, ckpts


# on_mismatch=params saves step 0 in STAGING (with the files `record` writes for its config, in
# STAGING/RECORD, the last thing written there, and the folder the old checkpoints go to, in
# STAGING/ASIDE), before the old checkpoints are set aside and STAGING takes their place.
STAGING, RECORD, ASIDE = "checkpoints_staging", "record", "set_aside_to.txt"


def _params_start(trainer, workdir: str, data, say, data_writes, corpus: str):
  """(0, state, Checkpoints): the previous checkpoints' parameters with a new optimizer state,
  saved as step 0, so that a crash or a rollback before the first save returns to them (None
  when no step is listed). The old checkpoints stay in place while step 0 is made and saved (in
  STAGING); then they are set aside, STAGING takes their place and the workdir's files are
  written. A run cut short at any point leaves what its re-run takes on from
  (finish_params_start): the same start."""
  c, lead = trainer.config, jax.process_index() == 0
  old = ckpt_lib.Checkpoints(workdir, c.checkpoint)
  _, params = old.restore_params(trainer.abstract_state.params)
  old.close()
  if params is None:
    return None
  staging = paths.join(paths.abspath(workdir), STAGING)
  state = trainer.init_state(c.seed).replace(params=params)
  new = ckpt_lib.Checkpoints(workdir, c.checkpoint, folder=STAGING)
  new.save(0, state, data, force=True, data_writes=data_writes)
  new.close()
  aside = ckpt_lib.aside_path(workdir)
  if lead:
    paths.makedirs(paths.join(staging, RECORD))
    _write(workdir, {paths.join(staging, ASIDE): aside})
    record(c, paths.join(staging, RECORD), corpus, trainer.teacher)  # (config.json last:
    # STAGING is complete)
    ckpt_lib.set_aside(workdir, WRITTEN, aside, every_process=False)
  finish_params_start(workdir, say, cut_short=False)
  say(f"checkpoints of the previous config set aside in {aside} (with its config.json)")
  say("started from the previous checkpoint's parameters (new optimizer state, step 0)")
  return 0, state, ckpt_lib.Checkpoints(workdir, c.checkpoint)


def finish_params_start(workdir: str, say=print, cut_short: bool = True):
  """Takes a params start (_params_start) on from where it was cut short: a STAGING without its
  config.json is deleted (its step 0 is made again), and so is a complete one while the old
  checkpoints were not yet being set aside (whatever this run is, it starts from them); once
  they were, the swap and the workdir's files are finished. Process 0 moves; every process
  waits for it."""
  staging = paths.join(paths.abspath(workdir), STAGING)
  ckpt_dir = paths.join(paths.abspath(workdir), "checkpoints")
  if jax.process_index() == 0 and paths.listdir(staging):  # (folders that hold anything)
    staged = paths.isfile(paths.join(staging, RECORD, "config.json"))
    aside = paths.read_text(paths.join(staging, ASIDE)) if staged else ""
    if staged and paths.listdir(aside):
      if cut_short:
        say(f"finishing the start from the previous checkpoint's parameters that an earlier "
            f"run began (the previous config's checkpoints: {aside})")
      if paths.listdir(ckpt_dir):  # (a bucket's move cut short: its copy, or what is left)
        ckpt_lib.set_aside(workdir, WRITTEN, every_process=False)
      elif paths.isdir(ckpt_dir) and not paths.is_remote(ckpt_dir):
        os.rmdir(ckpt_dir)  # (empty: the move would go into it)
      for name in WRITTEN:  # (the move's copies, where it was cut short before them)
        if not paths.isfile(paths.join(aside, name)) and paths.isfile(paths.join(workdir, name)):
          paths.write_text(paths.join(aside, name), paths.read_text(paths.join(workdir, name)))
      paths.move(staging, ckpt_dir)
    else:
      paths.rmtree(staging)
  recorded = paths.join(ckpt_dir, RECORD)
  if jax.process_index() == 0 and paths.isfile(paths.join(recorded, "config.json")):
    _write(workdir, {paths.join(workdir, n): paths.read_text(paths.join(recorded, n))
                     for n in reversed(WRITTEN) if paths.isfile(paths.join(recorded, n))})
    paths.remove(paths.join(ckpt_dir, ASIDE))
    paths.rmtree(recorded)  # (its config.json, the mark of an unfinished start, last)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("params start finished")
