"""Bad input a user makes, found by trying the commands with it: each is one line that names the
bad key, flag, file or value, before any compile, and changes nothing already written."""

import json

import pytest

from tests.conftest import REPO, tiny_overrides
from transformer_jax.config import ConfigError
from transformer_jax.convert import __main__ as convert_cli


def test_a_broken_hugging_face_directory_is_one_line_naming_its_file(tiny_data, tmp_path):
  """A corrupt or non-object config.json, a value of the wrong type and a truncated
  model.safetensors (a download cut short) were JSON, ml_collections and safetensors
  tracebacks; the new --workdir each failed import made was left behind."""
  transformers = pytest.importorskip("transformers")
  hf_dir = tmp_path / "hf"
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=32)).save_pretrained(hf_dir)
  good = (hf_dir / "config.json").read_text()
  weights = (hf_dir / "model.safetensors").read_bytes()

  flags = [f"--config.{o}" for o in tiny_overrides(tiny_data)]

  def refused(message, n):
    with pytest.raises(ConfigError, match=message):
      convert_cli.main(["import", f"--hf_dir={hf_dir}", f"--workdir={tmp_path}/w{n}", *flags])
    assert not (tmp_path / f"w{n}").exists()  # (it held a lock file, a tokenizer's copy, ...)

  (hf_dir / "config.json").write_text(good[:40])
  refused(rf"^{hf_dir}/config.json is not valid JSON \(.*, line \d+\)$", 1)
  (hf_dir / "config.json").write_text("[1, 2]")
  refused(rf"^{hf_dir}/config.json holds a JSON list, not a model config", 2)
  (hf_dir / "config.json").write_text(json.dumps({**json.loads(good), "n_embd": "abc"}))
  refused(r"^the checkpoint's config.json gives model.d_model='abc', not of the type", 3)
  (hf_dir / "config.json").write_text(good)
  (hf_dir / "model.safetensors").write_bytes(weights[:len(weights) // 2])
  refused(rf"^{hf_dir}/model.safetensors is not a whole safetensors file \(", 4)
  (hf_dir / "model.safetensors").write_bytes(weights)
  convert_cli.main(["import", f"--hf_dir={hf_dir}", f"--workdir={tmp_path}/w5", *flags])
  assert (tmp_path / "w5" / "config.json").is_file()


def test_a_flag_out_of_range_is_named_alone(tmp_path):
  """sample and evaluate said every range of every flag ("need --max_new_tokens >= 1,
  --temperature >= 0, 0 < --top_p <= 1, ...") for one bad value."""
  from transformer_jax import evaluate, sample  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text("{}")  # (read after the flags are checked)
  for main, flag, message in (
      (sample.main, "--temperature=-1.0", "--temperature=-1.0 must be finite and >= 0"),
      (sample.main, "--top_p=0.0", "--top_p=0.0 must be in (0, 1]"),
      (sample.main, "--beam_size=-2", "--beam_size=-2 must be >= 0"),
      (evaluate.main, "--limit=-5", "--limit=-5 must be >= 0"),
      (evaluate.main, "--step=-3", "--step=-3 must be >= 0 (or -1, the latest)")):
    task = ["--tasks=t.jsonl"] if main is evaluate.main else ["--prompt=x"]
    with pytest.raises(ConfigError) as e:
      main([f"--workdir={tmp_path}", *task, flag])
    assert str(e.value) == message


def test_a_beam_for_a_decoder_is_refused_before_its_checkpoint_is_read(tiny_data, tmp_path):
  """`sample --beam_size` on a decoder workdir said its prompt + the default --max_new_tokens
  exceeded model.max_len, after restoring the checkpoint: the beam was never the problem named.
  (No checkpoint here: reading one would fail next.)"""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data))
  (tmp_path / "config.json").write_text(config_lib.to_json(config))
  with pytest.raises(ConfigError, match="^--beam_size is for encoder-decoder workdirs$"):
    sample.main([f"--workdir={tmp_path}", "--prompt=def", "--beam_size=2"])
  with pytest.raises(ConfigError, match="^no checkpoint in "):
    sample.main([f"--workdir={tmp_path}", "--prompt=def"])


def test_a_folder_or_an_unknown_kind_is_named_as_such(tmp_path):
  """A folder given for a file, and a task spec KIND:PATH with an unknown KIND, were "does not
  exist" (for a folder that exists) or "task file 'bogus:...' does not exist"."""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import corpus  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import tasks  # pylint: disable=g-import-not-at-top
  (tmp_path / "t.jsonl").write_text('{"text": "a b c"}\n')
  with pytest.raises(ConfigError, match=r"^task 'bogus:\S+t.jsonl': 'bogus' is no task kind "
                                        r"\(KIND:PATH takes \w+, "):
    tasks.load(f"bogus:{tmp_path}/t.jsonl")
  assert tasks.load(f"perplexity:{tmp_path}/t.jsonl").kind == "perplexity"
  with pytest.raises(ConfigError, match=rf"^task file '{tmp_path}' is a folder, not a file$"):
    tasks.load(str(tmp_path))
  with pytest.raises(ConfigError, match=rf"^config file {tmp_path} is a folder: give FILE.py"):
    config_lib.load(str(tmp_path))
  with pytest.raises(ConfigError, match=rf"matches no files \(a folder: give a glob of its "
                                        rf"files, e.g. '{tmp_path}/\*\*/\*.txt'\)$"):
    corpus.corpus_files(str(tmp_path))


def test_sampling_flags_that_fill_mask_does_not_read_get_a_note(capsys):
  """sample --fill_mask with --beam_size was silent (the beam was never run)."""
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  f = dict(sample.FLAGS, fill_mask="a [MASK] b", beam_size=4, max_new_tokens=9, top_k=3)
  sample._note_unread(f)  # pylint: disable=protected-access
  assert capsys.readouterr().err == ("note: --top_k, --beam_size, --max_new_tokens do(es) "
                                     "nothing with --fill_mask: it takes the most likely "
                                     "tokens\n")


def test_an_unknown_subcommand_or_a_baseline_that_is_no_override_is_named():
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"^unknown subcommand 'exprot'; usage: python -m "):
    convert_cli.main(["exprot", "--workdir=w"])
  with pytest.raises(ConfigError, match=r"^--baseline=x.json: 'x.json' is not KEY=VALUE"):
    benchmark.main([f"--config={REPO}/configs/gpt2.py:tiny", "--baseline=x.json"])


def test_a_corpus_format_mistake_is_said_before_any_preparation(tmp_path, capsys):
  """.txt files read as jsonl, or a missing text_field: the one line came after four lines of
  TFDS's progress ("preparing ...", "Downloading and preparing dataset ...")."""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  (tmp_path / "a.jsonl").write_text('{"body": "some text"}\n')
  (tmp_path / "b.txt").write_text("plain text\n")
  for corpus, field, message in (
      ("a.jsonl", "text", r"^data.text_field='text' is missing at \S+a.jsonl:1"),
      ("b.txt", "text", r"^data.corpus: \S+b.txt:1 is not valid JSON")):
    config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
        f"data.corpus={tmp_path}/{corpus}", "data.format=jsonl", f"data.text_field={field}",
        f"data.data_dir={tmp_path}/tfds"])
    with pytest.raises(ConfigError, match=message):
      tfds_text.prepare(config.data)
    assert "preparing" not in capsys.readouterr().out
  assert not (tmp_path / "tfds").exists()
