"""Hugging Face tokenizers in the pipeline (data/hf_tokenization.py): the ids transformers' fast
tokenizer gives, byte-level BPE (GPT-2) and byte-fallback BPE with a template (Llama), special
tokens, and training on them."""

import json
import shutil

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization
from transformer_jax.training import loop
from tests.conftest import REPO, tiny_overrides

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


def _gpt2_style(texts, out):
  """A byte-level BPE like GPT-2's: <|endoftext|> is bos, eos (tokenizer_config.json) and no
  pad."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  out.mkdir()
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
  return out


def _llama_style(texts, out):
  """A byte-fallback BPE with a "▁" metaspace and a "<s> $A" template, like Llama 2's; no
  tokenizer_config.json: bos comes from the template, eos from the usual name."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="\u2581",
                                                          prepend_scheme="first")
  tok.decoder = tokenizers.decoders.Sequence([
      tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
      tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
  tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=[f"<0x{i:02X}>" for i in range(256)]))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  out.mkdir()
  tok.save(str(out / "tokenizer.json"))
  return out


@pytest.fixture(scope="module")
def made(tiny_data, tmp_path_factory):
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  root = tmp_path_factory.mktemp("hf_tokenizers")
  return texts, {"gpt2": _gpt2_style(texts, root / "gpt2"),
                 "llama": _llama_style(texts, root / "llama")}


def _other_style(texts, out, kind):
  """T5's Metaspace decoder or BERT's WordPiece one: neither gives a word's space to an id
  decoded alone."""
  if kind == "t5":
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = (tokenizers.pre_tokenizers.Metaspace(),
                                      tokenizers.decoders.Metaspace())
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>",
                                                                             "<unk>"])
  else:
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = (tokenizers.pre_tokenizers.BertPreTokenizer(),
                                      tokenizers.decoders.WordPiece())
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=400, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tok.train_from_iterator(texts, trainer)
  out.mkdir()
  tok.save(str(out / "tokenizer.json"))
  return out


def test_a_special_token_after_the_text_is_no_bos_and_t5_starts_from_pad(made, tmp_path):
  """T5's template "$A </s>" puts eos after the text: no bos (as transformers says), so the
  decoder starts from pad, T5's decoder_start_token_id (</s> was taken for bos: documents began
  with it and the decoder started from it)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  where = _other_style(made[0], tmp_path / "t5", "t5")
  spec = json.loads((where / "tokenizer.json").read_text())
  eos = spec["model"]["vocab"]["</s>"]
  spec["post_processor"] = {"type": "TemplateProcessing", "single": [
      {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
      "pair": [], "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}}
  (where / "tokenizer.json").write_text(json.dumps(spec))
  ours = tokenization.load(str(where))
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(where / "tokenizer.json"))
  assert theirs.bos_token_id is None and ours.bos_id == -1 and ours.eos_id == eos
  assert objectives.decoder_start(ours) == objectives.Vocab.from_tokenizer(ours).start_id == 0
  assert ours.pad_id == 0


def test_berts_template_gives_cls_and_sep_and_sentence_pairs_need_both(made, tmp_path):
  """A BERT tokenizer as transformers saves it names no bos or eos: its template "[CLS] $A
  [SEP]" gives both (eos was -1, and nsp pairs held -1 where [SEP] goes); without them, a
  sentence-pair objective is refused. Its text is transformers' ("x , y" was left spaced)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  prose = ["Don't stop, it's fine. Really? Yes! We're sure you've seen what I'm saying."] * 3
  words = _other_style(made[0] + prose, tmp_path / "words", "bert")
  vocab = json.loads((words / "tokenizer.json").read_text())["model"]["vocab"]
  theirs = transformers.BertTokenizer(vocab=vocab)
  theirs.save_pretrained(str(tmp_path / "bert"))
  ours = tokenization.load(str(tmp_path / "bert"))
  assert (ours.bos_id, ours.eos_id, ours.mask_id) == (
      theirs.cls_token_id, theirs.sep_token_id, theirs.mask_token_id) == (2, 3, 4)
  # decoded as transformers decodes: clean_up_tokenization_spaces (bert-base-uncased's config
  # says true) joins "don ' t stop ," into "don't stop,"
  for clean in (False, True):
    where = tmp_path / f"bert_{clean}"
    shutil.copytree(tmp_path / "bert", where)
    settings = json.loads((where / "tokenizer_config.json").read_text())
    (where / "tokenizer_config.json").write_text(json.dumps(
        {**settings, "clean_up_tokenization_spaces": clean}))
    mine, auto = tokenization.load(str(where)), transformers.AutoTokenizer.from_pretrained(where)
    for text in prose[:1] + ["print(x, y), if x: return self", "a , b ,c"]:
      ids = mine.encode(text)
      assert ids == auto.encode(text, add_special_tokens=False)
      assert mine.decode(ids) == auto.decode(ids, skip_special_tokens=True)
    assert (mine.decode(mine.encode(prose[0])) == prose[0].lower()) == clean
  config = config_lib.load(f"{REPO}/configs/bert.py:tiny", ["data.sentence_pair=nsp"])
  spec = objectives.spec(config.data)
  assert objectives.missing_tokens(spec, ours) == []
  assert objectives.missing_tokens(spec, tokenization.load(str(words))) == [
      "a bos and an eos ([CLS] A [SEP] B [SEP])"]
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/t5.py:tiny", [f"data.tokenizer={words}"])
  check = pipeline._check_objective_tokens  # pylint: disable=protected-access
  with pytest.raises(config_lib.ConfigError, match=r"lacks; add them to its tokenizer.json .*"
                     r"--special=mask,sentinels:100,ul2 --out=runs/tokenizers/tokenizer.model$"):
    check(config, tokenization.load(str(words)))


def test_a_missing_tokenizer_json_gets_no_sentencepiece_advice_for_its_path(tmp_path):
  """A folder without a tokenizer.json gets no SentencePiece --out=that advice (that command
  writes a model file, which loads as no tokenizer.json); a missing DIR/tokenizer.json gets the
  command that trains a byte-level BPE there."""
  (tmp_path / "cli").mkdir()
  with pytest.raises(config_lib.ConfigError, match=r"holds no Hugging Face tokenizer.json .* "
                     r"set data.tokenizer=runs/tokenizers/tokenizer.model and make that with: "
                     r".*--out=runs/tokenizers/tokenizer.model$"):
    tokenization.load(str(tmp_path / "cli"))
  missing = tmp_path / "hf" / "tokenizer.json"
  with pytest.raises(config_lib.ConfigError, match=r"does not exist; train a byte-level BPE there "
                     rf"with: python -m transformer_jax.tokenizer .*--out={missing} \(or"):
    tokenization.load(str(missing))


def test_the_tokenizer_command_trains_a_byte_level_bpe(tiny_data, tmp_path, capsys):
  """--out=DIR/tokenizer.json: a byte-level BPE of the `tokenizers` library, with its
  tokenizer_config.json; transformers' AutoTokenizer reads the folder with our ids (a control
  piece's name in the text is text), every string round-trips, the special ids come first
  (decoded as no text),
  an export puts bos first where training did and names the special ids in config.json (a
  folder's were left out), training again writes the same bytes, and a vocabulary too small for
  the bytes is one line before the corpus is read."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  from transformer_jax import tokenizer as tokenizer_cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / "bpe" / "tokenizer.json"
  flags = [f"--corpus={tiny_data['corpus']}", "--vocab_size=300", "--special=mask,sentinels:3"]
  assert tokenizer_cli.main([*flags, f"--out={out}"]) == 0
  assert "vocab_size 300" in capsys.readouterr().out
  tok, hf = tokenization.load(str(out.parent)), AutoTokenizer.from_pretrained(str(out.parent))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, -1, 3)
  assert tok.sentinel_ids == [4, 5, 6] and tok.vocab_size == 300
  for text in ("def value(self, x):\n\treturn  self.data", "  [MASK] <extra_id_0> x",
               "caf\u00e9 \u4e2d\u6587 \u2581 \U0001f600\x00\r\n\n", ""):
    ids = tok.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(ids) == text and hf.decode(ids) == text
    assert not set(ids) & {0, 1, 2, 3, 4, 5, 6}
  # generated special tokens are not text (SentencePiece drops its control pieces alike), and
  # one an lm-eval task names as a stop string ("<|im_end|>") still stops generation
  assert tok.decode(tok.encode("a b") + [3, 4, 1] + tok.encode(" c")) == "a b c"
  from transformer_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  lm = scoring.TextModel(config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      f"data.tokenizer={out.parent}"]), None, tok)
  lm.generate_ids = lambda requests, n: [tok.encode("a b") + [4] + tok.encode(" c")]
  assert lm.generate(["x"], until=["<extra_id_0>"]) == ["a b"]
  assert lm.generate(["x"], until=["<extra_id_1>"]) == ["a b c"]
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  export_tokenizer = convert_cli._export_tokenizer  # pylint: disable=protected-access
  export_config = convert_cli._export_hf_config  # pylint: disable=protected-access
  for add_bos in (True, False):  # export: bos first with special tokens, as training fed it
    config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
        f"data.tokenizer={out.parent}", f"data.add_bos={add_bos}"])
    export_tokenizer(config, str(tmp_path / f"hf{add_bos}"))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / f"hf{add_bos}"))
    assert exported("x = 1")["input_ids"] == [1] * add_bos + tok.encode("x = 1")
    # [MASK] and <extra_id_N> in a prompt are those tokens, as `sample` reads them (and as
    # transformers' fill-mask pipeline needs)
    prompt = "x = [MASK] + <extra_id_2>(y)"
    assert exported(prompt, add_special_tokens=False)["input_ids"] == (
        tokenization.with_control_pieces(tok, prompt))
  assert export_config(str(tmp_path), config) == {
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
  again = tmp_path / "again" / "tokenizer.json"
  tokenization.train([t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])], 300,
                     str(again), special="mask,sentinels:3")
  assert again.read_bytes() == out.read_bytes()
  small = f"--out={tmp_path}/s/tokenizer.json"
  missing = f"--corpus={tmp_path}/none/*.txt"  # (refused before the corpus is read)
  assert tokenizer_cli.main([missing, "--vocab_size=200", small]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: --vocab_size=200 is too small for a byte-level BPE: its 256 bytes and 3 special "
      "tokens need at least 259")


def test_a_resume_reads_tokenizer_config_json_too(made, tmp_path):
  """tokenizer_config.json names bos/eos/pad: a workdir trained with one eos refuses a resume
  whose tokenizer_config.json names another (only tokenizer.json was compared)."""
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  where = shutil.copytree(made[1]["gpt2"], tmp_path / "tok")
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [f"data.tokenizer={where}"])
  workdir = tmp_path / "w"
  (workdir / "checkpoints" / "1").mkdir(parents=True)
  config_lib.write_json(config, str(workdir / "config.json"))
  (workdir / resume.TOKENIZER_SHA).write_text(tfds_text.tokenizer_identity(str(where)) + "\n")
  assert resume.workdir_mismatch(config, str(workdir)) == []
  (where / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|endoftext|>", "eos_token": "a"}))
  assert tokenization.load(str(where)).eos_id != tokenization.load(str(made[1]["gpt2"])).eos_id
  assert [d[:40] for d in resume.workdir_mismatch(config, str(workdir))] == [
      f"the tokenizer data.tokenizer='{where}"[:40]]
  # A bare tokenizer.json, then a special_tokens_map.json beside it naming another eos: its
  # identity was the file's plain SHA-256, which resume takes as an old workdir's (no change).
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    (where / name).unlink(missing_ok=True)
  (workdir / resume.TOKENIZER_SHA).write_text(tfds_text.tokenizer_identity(str(where)) + "\n")
  assert resume.workdir_mismatch(config, str(workdir)) == []
  (where / "special_tokens_map.json").write_text(json.dumps({"eos_token": "a"}))
  assert [d[:40] for d in resume.workdir_mismatch(config, str(workdir))] == [
      f"the tokenizer data.tokenizer='{where}"[:40]]
  # What does not decide the ids is no change (a chat template, add_bos_token: the whole config
  # was hashed), and a workdir that recorded that whole-config identity still resumes.
  (where / "special_tokens_map.json").unlink()
  (where / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))
  (workdir / resume.TOKENIZER_SHA).write_text(tfds_text.tokenizer_identity(str(where)) + "\n")
  (where / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "a", "add_bos_token": True, "chat_template": "{{ messages }}"}))
  assert resume.workdir_mismatch(config, str(workdir)) == []
  old = tfds_text.tokenizer_identity(str(where), whole_config=True)
  assert old != tfds_text.tokenizer_identity(str(where))
  (workdir / resume.TOKENIZER_SHA).write_text(old + "\n")
  assert resume.workdir_mismatch(config, str(workdir)) == []


def test_sample_keeps_the_space_before_a_metaspace_continuation(made, monkeypatch):
  """A Metaspace tokenizer decodes "▁in" alone as "in": `sample` printed "defin x" for "def"
  and the new tokens of " in x"; it decodes them with the prompt now."""
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  where = str(made[1]["llama"])
  tok = tokenization.load(where)
  whole, prompt = tok.encode("def in x"), tok.encode("def")
  assert whole[:len(prompt)] == prompt and tok.decode(whole[len(prompt):]) == "in x"
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [f"data.tokenizer={where}",
                                                           "data.add_bos=false"])
  monkeypatch.setattr(sampling, "generate", lambda *a, **kw: [whole[len(prompt):]])
  assert sample.sample_text(config, None, "def", max_new_tokens=4) == " in x"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "bert"])
def test_the_sentence_rule_finds_sentences_with_every_decoder(made, tmp_path, kind):
  """The objectives' sentence rule (a stop, then a piece that starts with a space) needs each
  piece's text as it reads inside text: Llama's and T5's decoders strip the space of an id
  decoded alone, BERT's adds it only between words, and the rule found no sentence at all."""
  from transformer_jax.data.objectives import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  prose = ["The cat sat on the mat. The dog ran to it! Is it here? Yes it is."] * 50
  texts, out = made[0] + prose, tmp_path / kind
  where = (_gpt2_style(texts, out) if kind == "gpt2" else _llama_style(texts, out)
           if kind == "llama" else _other_style(texts, out, kind))
  tok = tokenization.load(str(where))
  vocab = vocab_lib.Vocab.from_tokenizer(tok)
  ids = np.asarray(tok.encode(prose[0]), np.int32)
  starts = vocab_lib.sentence_starts(ids, vocab)
  assert [tok.decode(ids[a:b]).strip() for a, b in zip([0, *starts], [*starts, len(ids)])] == [
      "The cat sat on the mat.", "The dog ran to it!", "Is it here?", "Yes it is."]


def test_control_pieces_in_a_prompt_are_read_as_transformers_reads_the_prompt(made, tmp_path):
  """A Metaspace that prepends its "▁" to the input's first section only (Llama-2's): the text
  after a control piece got one as well (encoded alone); RoBERTa's <mask> (and [MASK], our
  notation for the mask) in a prompt is the mask's id (it was read as text: fill_mask refused)."""
  tok = tokenizers.Tokenizer.from_file(str(made[1]["llama"] / "tokenizer.json"))
  tok.add_special_tokens(["<extra_id_0>", "<mask>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  ours = tokenization.load(str(tmp_path))
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  for text in ("x<extra_id_0>y", "<extra_id_0> def f(x):", "a<mask>b", "import os<mask>"):
    assert tokenization.with_control_pieces(ours, text) == theirs.encode(
        text, add_special_tokens=False), text
  assert tokenization.with_control_pieces(ours, "a[MASK]b") == theirs.encode(
      "a<mask>b", add_special_tokens=False)
  assert ours.mask_id == theirs.convert_tokens_to_ids("<mask>")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ids_and_specials_are_transformers(made, kind):
  texts, dirs = made
  ours = tokenization.load(str(dirs[kind]))
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(dirs[kind] / "tokenizer.json"))
  for text in texts + ["  x = [1, 2]\n\tüñí €\n", ""]:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
  assert ours.encode_batch(texts[:5]) == [ours.encode(t) for t in texts[:5]]
  named = "a document that says <|endoftext|>, <s> and </s> <extra_id_0>"
  ids = ours.encode(named)  # the names are text, never control ids
  assert ids == theirs.encode(named, add_special_tokens=False, split_special_tokens=True)
  assert ours.bos_id not in ids and ours.eos_id not in ids
  assert kind != "gpt2" or ours.decode(ids) == named  # (byte-level: lossless)
  want = {"gpt2": ("<|endoftext|>", "<|endoftext|>"), "llama": ("<s>", "</s>")}[kind]
  assert (ours.bos_id, ours.eos_id) == tuple(theirs.convert_tokens_to_ids(t) for t in want)
  assert ours.pad_id == -1  # none: padding is marked by segment ids, not an id
  assert ours.vocab_size == len(theirs)
  # bos first with special tokens: Llama's template, not GPT-2's post-processor (import's
  # data.add_bos)
  assert ours.adds_bos() == (theirs.encode("x")[0] == ours.bos_id) == (kind == "llama")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_pipeline_pretokenizes_with_transformers_ids_and_trains(made, tiny_data, tmp_path, kind):
  texts, dirs = made
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(dirs[kind] / "tokenizer.json"))
  ours = tokenization.load(str(dirs[kind]))
  overrides = tiny_overrides(tiny_data, **{
      "data.tokenizer": str(dirs[kind]), "model.vocab_size": 512, "train.steps": 3,
      "eval.every_steps": 0, "data.data_dir": str(tmp_path / "tfds")})
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", overrides)
  text_source = tfds_text.data_source(config.data, "train")
  token_source = tfds_text.data_source(config.data, "train", tokenized=True)
  assert len(token_source) == len(text_source) > 10
  by_id = {tfds_text._text(r["id"]): tfds_text._text(r["text"])  # pylint: disable=protected-access
           for r in (text_source[i] for i in range(len(text_source)))}
  for i in range(len(token_source)):
    record = token_source[i]
    text = by_id[tfds_text._text(record["id"])]  # pylint: disable=protected-access
    want = [ours.bos_id] + theirs.encode(text, add_special_tokens=False) + [ours.eos_id]
    np.testing.assert_array_equal(record["tokens"], want)
  out = loop.train(config, str(tmp_path / "run"), quiet=True, devices=jax.devices()[:1])
  assert out["step"] == 3 and np.isfinite(out["loss"])
  if kind == "gpt2":  # another eos in tokenizer_config.json: other records, another dataset
    copy = tmp_path / "tok"
    shutil.copytree(dirs[kind], copy)
    with_copy = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", overrides + [
        f"data.tokenizer={copy}"])
    name = tfds_text.tokenized_builder(with_copy.data).info.full_name
    (copy / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "Ġthe"}))
    assert tfds_text.tokenized_builder(with_copy.data).info.full_name != name


def test_import_copies_the_checkpoints_tokenizer_and_training_uses_it(made, tiny_data, tmp_path):
  """A GPT-2 checkpoint saved with its byte-level tokenizer: import points data.tokenizer at a
  copy in the workdir, training continues on the checkpoint's ids, export writes it back."""
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  texts, dirs = made
  ckpt = tmp_path / "hf_gpt2"
  cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=400)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(str(ckpt))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (ckpt / name).write_bytes((dirs["gpt2"] / name).read_bytes())
  workdir = tmp_path / "w"
  overrides = [o for o in tiny_overrides(tiny_data, **{"train.steps": 2, "eval.every_steps": 0,
                                                       "data.data_dir": str(tmp_path / "tfds")})
               if not o.startswith(("data.tokenizer=", "model.vocab_size=", "model.max_len="))]
  convert_cli.main(["import", "--hf_dir", str(ckpt), "--workdir", str(workdir)]
                   + [f"--config.{o}" for o in overrides])
  config = config_lib.from_json_file(str(workdir / "config.json"))
  assert config.data.tokenizer == str(workdir / "tokenizer")
  assert config.data.add_bos is False  # GPT-2's documents never began with <|endoftext|> added
  # its digest is recorded as training records it (import wrote none: a tokenizer replaced
  # after the import was read, and trained on, without a word)
  assert ((workdir / "tokenizer.sha256").read_text().strip()
          == tfds_text.tokenizer_identity(config.data.tokenizer))
  ours = tokenization.load(config.data.tokenizer)
  theirs = transformers.AutoTokenizer.from_pretrained(str(ckpt))
  for text in texts[:20]:
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
  result = loop.train(config, str(workdir), quiet=True, devices=jax.devices()[:1])
  assert result["step"] == 2 and np.isfinite(result["loss"])
  out = tmp_path / "exported"
  convert_cli.main(["export", "--workdir", str(workdir), "--hf_dir", str(out)])
  again = transformers.AutoTokenizer.from_pretrained(str(out))
  assert again.encode(texts[0]) == theirs.encode(texts[0])
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  beside = workdir / "tokenizer" / "tokenizer_config.json"
  kept = beside.read_text()
  beside.write_text(kept.replace('"', "'", 2))  # no JSON: one line (it was a traceback)
  with pytest.raises(config_lib.ConfigError, match=r"^data.tokenizer='.*' cannot be read \("):
    harness.read_config(str(workdir))
  beside.write_text(kept.replace('"<|endoftext|>"', '"Ġthe"', 1))  # another bos
  with pytest.raises(config_lib.ConfigError, match=r"is not the tokenizer .* was trained with"):
    harness.read_config(str(workdir))
  beside.write_text(kept)
  # data.tokenizer=DIR/mine.json beside another tokenizer.json: that file is exported, with the
  # config beside it (the other tokenizer.json was copied)
  mixed = tmp_path / "mixed"
  shutil.copytree(dirs["llama"], mixed)
  (mixed / "mine.json").write_bytes((dirs["gpt2"] / "tokenizer.json").read_bytes())
  (mixed / "tokenizer_config.json").write_bytes(
      (dirs["gpt2"] / "tokenizer_config.json").read_bytes())
  config.data.tokenizer = str(mixed / "mine.json")
  convert_cli._export_tokenizer(config, str(tmp_path / "mine"))  # pylint: disable=protected-access
  for name, source in (("tokenizer.json", "mine.json"),
                       ("tokenizer_config.json", "tokenizer_config.json")):
    assert (tmp_path / "mine" / name).read_bytes() == (mixed / source).read_bytes(), name


def test_a_t5_checkpoints_tokenizer_without_bos_imports_without_one(made, tiny_data, tmp_path):
  """T5's tokenizer.json has no bos: import turns data.add_bos off (its documents never began
  with one; the default recipe's add_bos refused the import); the checkpoint's
  decoder_start_token_id is kept beside the tokenizer's copy (test_convert_export.py)."""
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  ckpt = _other_style(made[0], tmp_path / "hf_t5", "t5")
  tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
  tok.add_special_tokens([f"<extra_id_{i}>" for i in range(100)])
  tok.save(str(ckpt / "tokenizer.json"))
  cfg = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                              num_decoder_layers=1, vocab_size=tok.get_vocab_size(),
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              decoder_start_token_id=0)  # (Google's checkpoints name it)
  transformers.T5ForConditionalGeneration(cfg).save_pretrained(str(ckpt))
  workdir = tmp_path / "w"
  overrides = [o for o in tiny_overrides(tiny_data, **{"data.data_dir": str(tmp_path / "tfds")})
               if not o.startswith(("data.tokenizer=", "model.vocab_size=", "model.max_len="))]
  convert_cli.main(["import", "--hf_dir", str(ckpt), "--workdir", str(workdir)]
                   + [f"--config.{o}" for o in overrides])
  config = config_lib.from_json_file(str(workdir / "config.json"))
  assert (config.data.objective, config.data.add_bos) == ("span", False)
  assert tokenization.load(config.data.tokenizer).bos_id == -1
  kept = workdir / "tokenizer" / "generation_config.json"
  assert json.loads(kept.read_text()) == {"decoder_start_token_id": 0}


def test_a_files_saved_truncation_padding_null_bos_and_id_gaps_are_read_as_transformers_does(
    tmp_path):
  """A tokenizer.json saved with truncation and padding on encodes whole documents, alike one
  by one and in batches; "bos_token": null in tokenizer_config.json means no bos (not a name
  match on <s>); vocab_size is the highest id + 1 when the ids have gaps, and a gap is no
  ordinary piece (MLM never draws it as a random replacement)."""
  vocab = {"[PAD]": 0, "[UNK]": 1, "<s>": 2, "</s>": 3,
           **{w: i + 4 for i, w in enumerate("the cat sat on a mat".split())}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["[PAD]", "[UNK]", "<s>", "</s>"])
  tok.enable_truncation(max_length=4)
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  tok.save(str(tmp_path / "tokenizer.json"))
  ours = tokenization.load(str(tmp_path))
  assert ours.encode("the cat sat on a mat") == [4, 5, 6, 7, 8, 9]
  assert ours.encode_batch(["the cat sat on a mat", "a cat"]) == [[4, 5, 6, 7, 8, 9], [8, 5]]
  assert ours.bos_id == 2
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None,
                                                              "eos_token": "</s>"}))
  ours = tokenization.load(str(tmp_path))
  assert (ours.bos_id, ours.eos_id) == (-1, 3)
  gaps = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 7},
                                                          unk_token="[UNK]"))
  gaps.save(str(tmp_path / "gaps.json"))
  gaps = tokenization.load(str(tmp_path / "gaps.json"))
  assert gaps.vocab_size == 8
  assert [i for i in range(8) if gaps.is_normal(i)] == [0, 1, 7]


def test_an_older_layouts_special_tokens_map_json_names_the_specials_as_transformers_reads_it(
    made, tmp_path):
  """Without added_tokens_decoder in tokenizer_config.json, transformers reads
  special_tokens_map.json and its tokens win; with it, the map is not read."""
  copy = tmp_path / "tok"
  shutil.copytree(made[1]["llama"], copy)
  (copy / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": {"content": "</s>", "special": True}, "eos_token": "<unk>"}))
  (copy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
  theirs, ours = transformers.AutoTokenizer.from_pretrained(str(copy)), tokenization.load(str(copy))
  assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (2, 0)
  (copy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>",
                                                          "added_tokens_decoder": {}}))
  theirs, ours = transformers.AutoTokenizer.from_pretrained(str(copy)), tokenization.load(str(copy))
  assert ours.eos_id == theirs.eos_token_id == 1  # the config's own "<s>"
