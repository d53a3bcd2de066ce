"""Tests of the pretraining objectives (data/objectives/) and their packing and pipeline.

Rates are checked against their expectation within 4 standard deviations (binomial sigma of the
sample), so a correct implementation fails about once in 16,000 runs; every sample is seeded, so
a run either always passes or always fails.
"""

import collections

import grain
import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from transformer_jax import config as config_lib
from transformer_jax import tokenizer as tokenizer_cli
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import objectives
from transformer_jax.data.objectives import denoise, mlm, ul2
from transformer_jax.data.objectives import spans as spans_lib
from transformer_jax.data.objectives import vocab as vocab_lib
from transformer_jax.data import pipeline
from transformer_jax.data import tokenization as tokenizer_lib

SIGMAS = 4
SPECIAL = "mask,sentinels:40,ul2"


def _within(count, total, p, what):
  """count/total is within SIGMAS binomial standard deviations of p."""
  rate, sigma = count / total, np.sqrt(p * (1 - p) / total)
  assert abs(rate - p) <= SIGMAS * sigma, f"{what}: {rate:.4f} vs {p} (sigma {sigma:.4f})"
  return rate


@pytest.fixture(scope="module")
def tok_path(tiny_data, tmp_path_factory):
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  return tokenizer_lib.train(texts, 400, str(tmp_path_factory.mktemp("tok") / "special.model"),
                             special=SPECIAL)


@pytest.fixture(scope="module")
def tok(tok_path):
  return tokenizer_lib.load(tok_path)


@pytest.fixture(scope="module")
def vocab(tok):
  return objectives.Vocab.from_tokenizer(tok)


@pytest.fixture(scope="module")
def docs(tiny_data, tok):
  """[bos] + ids + [eos] of every document of the tiny corpus (int32 arrays)."""
  return [np.asarray([tok.bos_id] + tok.encode(t) + [tok.eos_id], np.int32)
          for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]


def _chunks(docs, length, count):
  """`count` chunks of `length` tokens of the documents, concatenated (and repeated)."""
  stream = np.concatenate(docs)
  stream = np.tile(stream, -(-length * count // len(stream)))
  return [stream[i * length:(i + 1) * length] for i in range(count)]


def _spec(objective, seq_len=64, target_len=0, **params):
  d = config_lib.base.get_config().data
  d.unlock()
  d.update(objective=objective, seq_len=seq_len, target_len=target_len, **params)
  return objectives.spec(d)


def _unsentinel(inputs, targets, vocab):
  """The original chunk from span-corrupted inputs and targets (sentinel i -> span i); both end
  with eos, as T5's."""
  sentinels = set(vocab.sentinel_ids.tolist())
  assert targets[-1] == vocab.eos_id and inputs[-1] == vocab.eos_id
  inputs = inputs[:-1]
  spans, current = {}, None
  for t in targets[:-1].tolist():
    if t in sentinels:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  out = []
  for t in inputs.tolist():
    out += spans.pop(t) if t in sentinels else [t]
  assert not spans  # Every target span was used.
  return out


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_pieces_are_control_symbols(tok, vocab):
  assert tok.mask_id == 4 and tok.sentinel_ids == list(range(5, 45))
  assert tok.mode_ids == [45, 46, 47]
  for text in ("a[MASK]b <extra_id_0> [X] [R]", "x = y[S]\n"):
    ids = tok.encode(text)
    assert not set(ids) & set(range(4, 48)) and tok.decode(ids) == text  # Never produced.
  assert not vocab.normal[:48].any() and vocab.normal[48:].all()
  assert tokenizer_lib.special_pieces("ul2,mask") == ["[R]", "[S]", "[X]", "[MASK]"]
  assert len(tokenizer_lib.special_pieces("sentinels")) == 100
  with pytest.raises(ConfigError, match="unknown group 'masks'"):
    tokenizer_lib.special_pieces("masks")


def test_tokenizer_cli_special(tiny_data, tmp_path, capsys):
  out = tmp_path / "t.model"
  assert tokenizer_cli.main([f"--corpus={tiny_data['corpus']}", "--vocab_size=400",
                             "--special=mask,sentinels:3", f"--out={out}"]) == 0
  assert tokenizer_lib.load(str(out)).sentinel_ids == [5, 6, 7]
  assert tokenizer_cli.main([f"--corpus={tiny_data['corpus']}", "--vocab_size=400",
                             "--special=mask,sentinels:x", f"--out={tmp_path}/u.model"]) == 2
  assert "error: --special: unknown group 'sentinels:x'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- mlm


def test_mlm_selection_rate_and_80_10_10(docs, vocab):
  rng = np.random.default_rng(0)
  chunks = _chunks(docs, 128, 1500)
  outs = [mlm.mlm(c, rng, vocab, 0.15) for c in chunks]
  tokens, inputs, targets, weights = (np.concatenate(x) for x in zip(
      *[(c, o["inputs"], o["targets"], o["weights"]) for c, o in zip(chunks, outs)]))
  np.testing.assert_array_equal(targets, tokens)
  selected = weights == 1
  assert not selected[~vocab.normal[tokens]].any()  # bos/eos never selected
  assert (inputs[~selected] == tokens[~selected]).all()
  normal = int(vocab.normal[tokens].sum())
  _within(selected.sum(), normal, 0.15, "selection rate")
  sel_in, sel_tok = inputs[selected], tokens[selected]
  n, v = len(sel_in), len(vocab.normal_ids)
  _within((sel_in == vocab.mask_id).sum(), n, 0.8, "[MASK] share")
  _within((sel_in == sel_tok).sum(), n, 0.1 + 0.1 / v, "kept share")  # random may draw itself
  replaced = (sel_in != vocab.mask_id) & (sel_in != sel_tok)
  _within(replaced.sum(), n, 0.1 * (1 - 1 / v), "random share")
  assert vocab.normal[sel_in[replaced]].all()  # Random tokens are never special.
  assert len(np.unique(sel_in[replaced])) > v // 2  # ... and spread over the vocabulary.


# --------------------------------------------------------------------------------- span


@pytest.mark.parametrize("length,density,mean", [(128, 0.15, 3.0), (64, 0.5, 8.0), (37, 0.15, 3.0)])
def test_span_corruption_counts_and_exact_reconstruction(docs, vocab, length, density, mean):
  """Exact reconstruction; T5's counts per chunk; the density and mean span
  length within their rounding (noise = round(len * density), spans = round(noise / mean))."""
  rng = np.random.default_rng(1)
  noise = spans = total = 0
  span_lengths = collections.Counter()
  ends = 0
  for chunk in _chunks(docs, length, 400):
    out = spans_lib.span_corruption(chunk, rng, vocab, density, mean)
    enc, dec = out["encoder_inputs"], out["decoder_targets"]
    ends += chunk[-1] == vocab.eos_id  # a document's last chunk: its eos is no text to corrupt
    chunk = chunk[:-1] if chunk[-1] == vocab.eos_id else chunk
    assert _unsentinel(enc, dec, vocab) == chunk.tolist()
    assert dec[-2:].tolist() != [vocab.eos_id] * 2  # (the chunk's eos was noise: `</s> </s>`)
    is_sentinel = np.isin(dec, vocab.sentinel_ids)
    n, k = len(dec) - 1 - is_sentinel.sum(), is_sentinel.sum()
    assert (n, k) == spans_lib.span_counts(len(chunk), density, mean)
    np.testing.assert_array_equal(dec[is_sentinel], vocab.sentinel_ids[:k])  # In order.
    np.testing.assert_array_equal(out["decoder_inputs"], np.append(vocab.start_id, dec[:-1]))
    assert enc[0] == chunk[0]  # T5: a chunk starts with kept tokens.
    span_lengths.update(np.diff(np.append(np.flatnonzero(is_sentinel), len(dec) - 1)) - 1)
    noise, spans, total = noise + n, spans + k, total + len(chunk)
  assert abs(noise / total - density) <= 0.5 / length
  assert abs(noise / spans - mean) <= 0.5 * mean / (spans / 400)
  assert len(span_lengths) > 3  # Random segmentation, not fixed-length spans.
  assert ends > 0


def test_span_lengths_match_t5():
  s = _spec("span", seq_len=512)  # T5's random_spans_helper: 512 inputs -> 114 targets.
  assert s.target_len == 114 and s.chunk_len == 568  # (568 tokens, as T5's.)
  s = _spec("span", seq_len=64, target_len=12)
  rng = np.random.default_rng(0)
  tokens = np.arange(100, 100 + s.chunk_len, dtype=np.int32)
  vocab = objectives.Vocab(1, 1, 2, -1, np.arange(5, 50, dtype=np.int32), (), np.ones(200, bool),
                           np.arange(200), *[np.zeros(200, bool)] * 3)
  for n in range(1, s.chunk_len + 1):
    out = spans_lib.span_corruption(tokens[:n], rng, vocab, s.noise_density, s.mean_span_length)
    assert len(out["encoder_inputs"]) <= 64 and len(out["decoder_targets"]) <= 12
  enc, dec = objectives.worst_lengths(s, s.chunk_len + 1)
  assert enc > 64 or dec > 12  # chunk_len is the longest that fits.


# ------------------------------------------------------------------------------ denoise


def test_denoise_mask_fraction_spans_and_determinism(docs, vocab):
  rate, lam = 0.3, 3.0
  masked = total = masks = 0
  for seed, chunk in enumerate(_chunks(docs, 200, 300)):
    out = denoise.denoise(chunk, np.random.default_rng(seed), vocab, rate, lam)
    again = denoise.denoise(chunk, np.random.default_rng(seed), vocab, rate, lam)
    other = denoise.denoise(chunk, np.random.default_rng(seed + 1000), vocab, rate, lam)
    for k in out:
      np.testing.assert_array_equal(out[k], again[k])
    assert (out["encoder_inputs"].shape != other["encoder_inputs"].shape
            or (out["encoder_inputs"] != other["encoder_inputs"]).any())
    np.testing.assert_array_equal(out["decoder_targets"], chunk)
    enc = out["encoder_inputs"]
    k = int((enc == vocab.mask_id).sum())
    assert not (np.diff(np.flatnonzero(enc == vocab.mask_id)) == 1).any()  # Never adjacent.
    n = len(chunk) - (len(enc) - k)  # Original tokens hidden behind the masks.
    head, tail = vocab_lib.body(chunk, vocab)  # a document's bos / eos: never noised
    assert n == round((tail - head) * rate)
    np.testing.assert_array_equal(enc[:head], chunk[:head])
    np.testing.assert_array_equal(enc[len(enc) - (len(chunk) - tail):], chunk[tail:])
    masked, total, masks = masked + n, total + tail - head, masks + k
  assert abs(masked / total - rate) < 0.01
  assert abs(masked / masks - lam) < 0.1 * lam  # Poisson(3) spans, the last of each cut short


def test_bart_token_masking_deletion_and_rotation(docs, vocab):
  """Token masking hides exactly round(n * rate) uniformly chosen tokens behind [MASK]; token
  deletion removes as many and keeps the rest in order; document rotation starts the chunk at
  a uniformly chosen token. Deterministic per seed; the targets stay the original chunk."""
  rate, n = 0.2, 50
  chunk = np.arange(100, 100 + n, dtype=np.int32)  # distinct ids: where each went is visible
  hits, starts = np.zeros(n), np.zeros(n)
  for seed in range(400):
    rng = lambda: np.random.default_rng(seed)
    masked = denoise.denoise(chunk, rng(), vocab, rate, 3.0, permute=False, noise="mask")
    enc = masked["encoder_inputs"]
    np.testing.assert_array_equal(
        enc, denoise.denoise(chunk, rng(), vocab, rate, 3.0, permute=False,
                             noise="mask")["encoder_inputs"])
    np.testing.assert_array_equal(masked["decoder_targets"], chunk)
    assert len(enc) == n and int((enc == vocab.mask_id).sum()) == round(n * rate)
    assert ((enc == chunk) | (enc == vocab.mask_id)).all()
    hits += enc == vocab.mask_id
    kept = denoise.denoise(chunk, rng(), vocab, rate, 3.0, permute=False,
                           noise="delete")["encoder_inputs"]
    assert len(kept) == n - round(n * rate) and (np.diff(kept) > 0).all()  # a subsequence
    rotated = denoise.document_rotation(chunk, rng())
    k = int(np.flatnonzero(chunk == rotated[0])[0])
    np.testing.assert_array_equal(rotated, np.roll(chunk, -k))
    starts[k] += 1
  _within(hits.sum(), 400 * n, rate, "masked share")
  for counts, p in ((hits, rate), (starts, 1 / n)):  # uniform over positions (4-sigma bounds)
    sigma = np.sqrt(400 * p * (1 - p))
    assert (np.abs(counts - 400 * p) < 4 * sigma + 1).all(), counts
  both = denoise.denoise(chunk, np.random.default_rng(0), vocab, rate, 3.0, permute=False,
                         noise="infill", rotate=True)
  np.testing.assert_array_equal(both["decoder_targets"], chunk)
  framed = np.concatenate([[vocab.bos_id], chunk, [vocab.eos_id]]).astype(np.int32)
  for noise in ("infill", "mask", "delete"):  # fairseq keeps them: the body alone is noised
    for seed in range(50):
      enc = denoise.denoise(framed, np.random.default_rng(seed), vocab, 0.5, 3.0, noise=noise,
                            rotate=True)["encoder_inputs"]
      assert enc[0] == vocab.bos_id and enc[-1] == vocab.eos_id, (noise, seed, enc)
      assert (enc[1:-1] != vocab.bos_id).all() and (enc[1:-1] != vocab.eos_id).all()


def test_poisson_span_lengths_include_insertions():
  rng = np.random.default_rng(0)
  lengths = np.concatenate([denoise.poisson_span_lengths(60, 3.0, rng) for _ in range(400)])
  assert lengths.sum() == 400 * 60
  _within((lengths == 0).sum(), len(lengths), np.exp(-3.0), "0-length spans")
  lengths = denoise.poisson_span_lengths(2, 0.05, rng)  # Mostly zeros: only 2 spans kept.
  assert lengths.sum() == 2 and len(lengths) <= 2


def _permutations(tok, vocab, text, seeds=20):
  ids = np.asarray([tok.bos_id] + tok.encode(text) + [tok.eos_id], np.int32)
  outs = [vocab_lib.permute_sentences(ids, np.random.default_rng(s), vocab) for s in range(seeds)]
  assert all(o[0] == tok.bos_id and o[-1] == tok.eos_id for o in outs)  # Kept in place.
  return [tok.decode(o) for o in outs]


def test_sentence_permutation_rule(tok, vocab):
  lines = [f"value = {i}\n" for i in range(12)]  # Code: permuted line by line.
  texts = _permutations(tok, vocab, "".join(lines))
  assert all(sorted(t.splitlines(keepends=True)) == sorted(lines) for t in texts)
  assert len(set(texts)) == len(texts)
  # Prose: a stop ends a sentence only before whitespace ("e.g.x" is one sentence).
  sentences = ["The end.", " Next one!", " Last?", " e.g.x\n"]
  texts = _permutations(tok, vocab, "".join(sentences))
  orders = set()
  for t in texts:
    order = sorted(sentences, key=lambda s: t.find(s) if t.find(s) >= 0 else len(t))
    assert "".join(order) == t  # A permutation of the sentences ...
    orders.add(tuple(order))
  assert len(orders) > 6  # ... and different ones (of 24).


# ---------------------------------------------------------------------------------- ul2


def test_ul2_modes_and_reconstruction(docs, vocab):
  s = _spec("ul2", seq_len=64, target_len=48)
  counts = collections.Counter()
  chunks = _chunks(docs, s.chunk_len, 2000)
  for i, chunk in enumerate(chunks):
    out = ul2.ul2(chunk, np.random.default_rng(i), vocab, s)
    enc, dec = out["encoder_inputs"], out["decoder_targets"]
    assert len(enc) <= 64 and len(dec) <= 48
    mode = vocab.mode_ids.index(enc[0])
    counts[mode] += 1
    text = spans_lib.without_final_eos(chunk, vocab)  # each denoiser appends the one eos
    assert dec[-2:].tolist() != [vocab.eos_id] * 2
    if ul2.UL2_MODES[mode] == "S":
      assert enc[1:-1].tolist() + dec[:-1].tolist() == text.tolist()
      assert dec[-1] == vocab.eos_id and enc[-1] == vocab.eos_id
      assert len(text) < 2 or len(enc) > 2  # A non-empty prefix.
    else:
      assert _unsentinel(enc[1:], dec, vocab) == text.tolist()
    if i < 50:
      again = ul2.ul2(chunk, np.random.default_rng(i), vocab, s)
      assert all((again[k] == out[k]).all() for k in out)
  for mode, p in enumerate(s.ul2_mix):
    _within(counts[mode], len(chunks), p, f"mode {ul2.UL2_MODES[mode]}")
  others = [ul2.ul2(c, np.random.default_rng(10_000 + i), vocab, s)
            for i, c in enumerate(chunks[:50])]
  firsts = [ul2.ul2(c, np.random.default_rng(i), vocab, s)
            for i, c in enumerate(chunks[:50])]
  assert any(a["encoder_inputs"].tolist() != b["encoder_inputs"].tolist()
             for a, b in zip(firsts, others))


@pytest.mark.parametrize("mode", ["sop", "nsp"])
def test_sentence_pairs_reconstruct_and_label_half(docs, vocab, mode):
  s = _spec("mlm", sentence_pair=mode)
  assert s.chunk_len == 61
  chunks = _chunks(docs, s.chunk_len, 600)
  labels, short = [], {0: [], 1: []}
  for i, chunk in enumerate(chunks):
    nxt = chunks[(i + 1) % len(chunks)]
    ex = mlm.sentence_pair(chunk, nxt, np.random.default_rng(i), vocab, s)
    t, types, w = ex["targets"], ex["types"], ex["weights"]
    assert len(t) <= 64 and t[0] == vocab.bos_id and t[-1] == vocab.eos_id
    first_b = int(np.argmax(types))
    assert (types[:first_b] == 0).all() and (types[first_b:] == 1).all()
    assert t[first_b - 1] == vocab.eos_id and not w[[0, first_b - 1, -1]].any()
    assert (ex["inputs"][w == 0] == t[w == 0]).all()  # Only selected tokens change.
    np.testing.assert_array_equal(ex["sentence_weights"], np.arange(len(t)) == 0)
    label = int(ex["sentence_labels"][0])
    assert not ex["sentence_labels"][1:].any()
    labels.append(label)
    a, b = t[1:first_b - 1].tolist(), t[first_b:-1].tolist()
    head = int(chunk[0] == vocab.bos_id)
    body = chunk[head:len(chunk) - int(chunk[-1] == vocab.eos_id)].tolist()
    short[label].append(len(t) < len(body) + 3)  # [CLS] A [SEP] B [SEP] shorter than it could be
    if not label:
      assert a + b == body
    elif mode == "sop":
      assert b + a == body
    else:  # nsp: A is this chunk's start, B a piece of the next chunk
      assert a == body[:len(a)] and b and " ".join(map(str, b)) in " ".join(map(str, nxt))
  _within(sum(labels), len(labels), 0.5, f"{mode} label 1")
  # a pair is as long as its chunk allows, whatever its label (an nsp negative's B was the
  # partner's tail, cut to fit: shorter half the time, and its length gave the label away)
  assert np.mean(short[0]) == 0 and np.mean(short[1]) < 0.05, short


@pytest.mark.parametrize("shuffled", [False, True])
def test_nsp_partners_at_eval_are_far_in_the_stream(docs, vocab, shuffled):
  """At eval the stream is in order, so the next chunk is mostly the same document's: an nsp
  negative takes its B from the chunk EVAL_PARTNER_DISTANCE on instead (within windows of twice
  that; the last, partial one halves its own length). Training pairs neighbours of the
  shuffled stream, as before."""
  import grain  # pylint: disable=g-import-not-at-top
  s = _spec("mlm", sentence_pair="nsp")
  count = 2 * mlm.EVAL_PARTNER_DISTANCE + 30
  chunks = _chunks(docs, s.chunk_len, count)
  ds = grain.MapDataset.source([{"inputs": c} for c in chunks]).to_iter_dataset()
  shuffle = (lambda d: grain.experimental.WindowShuffleIterDataset(d, window_size=16, seed=1)
             ) if shuffled else None
  out = list(objectives.examples(ds, s, vocab, 0, shuffle))
  assert len(out) == count
  if shuffled:
    return
  window, negatives, in_neighbour = 2 * mlm.EVAL_PARTNER_DISTANCE, 0, 0
  text = lambda ids: " " + " ".join(map(str, ids)) + " "
  for i, ex in enumerate(out):
    first_b = int(np.argmax(ex["types"]))
    a, b = ex["targets"][1:first_b - 1], ex["targets"][first_b:-1]
    assert text(a) in text(chunks[i])  # in stream order
    if ex["sentence_labels"][0]:
      start, n = i // window * window, min(window, count - i // window * window)
      partner = start + (i - start + n // 2) % n
      assert text(b) in text(chunks[partner]), i
      negatives += 1
      in_neighbour += text(b) in text(chunks[i + 1 - 2 * (i % 2)])  # (the old partner)
  assert negatives > 40 and in_neighbour < 0.5 * negatives  # (short Bs recur by chance)


def test_nsp_training_negatives_come_from_another_document(docs, vocab):
  """Chunks carry their document (pipeline.ChunkTokens): a training negative's B is another
  document's whenever one is among the TRAIN_WINDOW shuffled chunks (a long document's chunks
  sit together in the shuffle window, and 21 % of negatives paired a document with itself)."""
  import grain  # pylint: disable=g-import-not-at-top
  s = _spec("mlm", sentence_pair="nsp")
  assert objectives.document_ids(s) and not objectives.document_ids(_spec("mlm"))
  long_docs = [np.concatenate([d] * 6) for d in docs[:12]]  # 6+ chunks each: neighbours alike
  chunk = pipeline.ChunkTokens(s.chunk_len, documents=True)
  chunks = [c for d in long_docs for c in chunk.flat_map({"tokens": d})]
  assert len({c[objectives.DOCUMENT] for c in chunks}) == 12
  ds = grain.MapDataset.source(chunks).to_iter_dataset()
  shuffle = lambda d: grain.experimental.WindowShuffleIterDataset(d, window_size=64, seed=1)
  text = lambda ids: " " + " ".join(map(str, ids)) + " "
  owner = {k: text(d) for k, d in enumerate(long_docs)}
  negatives = same = 0
  for ex in objectives.examples(ds, s, vocab, 0, shuffle):
    first_b = int(np.argmax(ex["types"]))
    a, b = ex["targets"][1:first_b - 1], ex["targets"][first_b:-1]
    if ex["sentence_labels"][0] and len(a) >= 8 and len(b) >= 8:
      (doc_a,) = [k for k, t in owner.items() if text(a) in t]
      negatives += 1
      same += text(b) in owner[doc_a]
  assert negatives > 20 and same == 0, (negatives, same)


# ------------------------------------------------------------------------------ packing


@pytest.fixture(scope="module")
def base_config(tiny_data, tok_path):
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{"data.tokenizer": tok_path, "model.vocab_size": 400}))


def _with(config, **overrides):
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    config_lib.set_value(c, key, str(value))
  return c


def _rows(config, docs, seed):
  ds = grain.MapDataset.source([{"tokens": d} for d in docs]).to_iter_dataset()
  return list(pipeline.chunk_and_pack(ds, config, 8, seed=seed, objective_seed=3))


@pytest.mark.parametrize("seed", [None, 5])
def test_encoder_decoder_packing_isolates_segments_and_loses_nothing(base_config, docs, vocab,
                                                                     seed):
  c = _with(base_config, **{"data.objective": "span"})
  s = objectives.spec(c.data)
  rows = _rows(c, docs, seed)
  examples = []
  for r in rows:
    assert {k: v.shape for k, v in r.items()} == {
        **{f"encoder_{k}": (32,) for k in ("inputs", "segment_ids", "positions")},
        **{f"decoder_{k}": (s.target_len,) for k in ("inputs", "targets", "weights",
                                                     "segment_ids", "positions")}}
    es, ds = r["encoder_segment_ids"], r["decoder_segment_ids"]
    np.testing.assert_array_equal(r["decoder_weights"], ds != 0)
    for side, seg in (("encoder", es), ("decoder", ds)):
      used = int((seg > 0).sum())  # Segments 1, 2, ... first, then padding.
      assert (seg[:used] > 0).all() and (np.diff(seg[:used]) >= 0).all()
      for key in [k for k in r if k.startswith(side) and k != f"{side}_segment_ids"]:
        assert not r[key][seg == 0].any()  # Padding is 0 (and weight 0).
    assert set(np.unique(es[es > 0])) == set(np.unique(ds[ds > 0]))
    for k in np.unique(es[es > 0]):
      np.testing.assert_array_equal(r["encoder_positions"][es == k], np.arange((es == k).sum()))
      np.testing.assert_array_equal(r["decoder_positions"][ds == k], np.arange((ds == k).sum()))
      dec_in, dec_t = r["decoder_inputs"][ds == k], r["decoder_targets"][ds == k]
      assert dec_in[0] == vocab.start_id and (dec_in[1:] == dec_t[:-1]).all()  # Restarts.
      examples.append(tuple(_unsentinel(r["encoder_inputs"][es == k], dec_t, vocab)))
  expected = [tuple(spans_lib.without_final_eos(d[i:i + s.chunk_len], vocab))
              for d in docs for i in range(0, len(d), s.chunk_len)]
  assert collections.Counter(examples) == collections.Counter(expected)


def test_mlm_packing(base_config, docs, vocab):
  rows = _rows(_with(base_config, **{"data.objective": "mlm"}), docs, None)
  segments = []
  for r in rows:
    assert set(r) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    seg = r["segment_ids"]
    assert not r["weights"][seg == 0].any() and not r["targets"][seg == 0].any()
    for k in np.unique(seg[seg > 0]):
      np.testing.assert_array_equal(r["positions"][seg == k], np.arange((seg == k).sum()))
      segments.append(tuple(r["targets"][seg == k]))
    masked = r["weights"] == 1
    assert (r["inputs"][~masked] == r["targets"][~masked]).all()
  expected = [tuple(d[i:i + 32]) for d in docs for i in range(0, len(d), 32)]
  assert collections.Counter(segments) == collections.Counter(expected)


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("objective", ["span", "denoise", "ul2"])
def test_pipeline_encoder_decoder_batches(base_config, objective):
  c = _with(base_config, **{"data.objective": objective, "data.target_len": 24})
  it = pipeline.make_train_iterator(c)
  batches = [next(it) for _ in range(2)]
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        **{f"encoder_{k}": ((4, 32), np.int32) for k in ("inputs", "segment_ids", "positions")},
        **{f"decoder_{k}": ((4, 24), np.float32 if k == "weights" else np.int32)
           for k in ("inputs", "targets", "weights", "segment_ids", "positions")}}
    assert b["decoder_weights"].sum() > 0 and (b["encoder_segment_ids"][:, 0] == 1).all()
  again = pipeline.make_train_iterator(c)
  assert all((v == w).all() for v, w in zip(batches[0].values(), next(again).values()))
  resumed = pipeline.make_train_iterator(c)
  resumed.set_state(again.get_state())  # The objective's random map resumes too.
  assert all((v == w).all() for v, w in zip(batches[1].values(), next(resumed).values()))
  other = next(pipeline.make_train_iterator(_with(c, seed=1)))
  assert (other["encoder_inputs"] != batches[0]["encoder_inputs"]).any()
  (first, *_), big = pipeline.eval_batches(c, 1), pipeline.eval_batches(_with(c, **{
      "train.batch_size": 64}), 1)[0]
  assert first["decoder_targets"].shape == (4, 24) and big["encoder_inputs"].shape == (64, 32)
  assert not big["decoder_weights"][-1].any()  # Padding rows in the format of the objective.


def test_validate_names_the_tokenizer_command(base_config, tiny_data):
  for objective in ("mlm", "span", "denoise", "ul2"):
    with pytest.raises(ConfigError, match=r"lacks; set data.tokenizer=.*tiny_special.model \(the "
                       r"file at .* stays as other runs read it\) and make that with: python -m "
                       r"transformer_jax\.tokenizer .*--special=mask,sentinels:100,ul2 "
                       r"--out=.*tiny_special.model$"):
      pipeline.validate(_with(base_config, **{"data.objective": objective,
                                              "data.tokenizer": tiny_data["tokenizer"]}))
  pipeline.validate(_with(base_config, **{"data.tokenizer": tiny_data["tokenizer"]}))  # clm
  with pytest.raises(ConfigError, match=r"needs 4\d sentinels .*it has 40.*sentinels:100"):
    pipeline.validate(_with(base_config, **{"data.objective": "span", "data.seq_len": 800}))
  with pytest.raises(ConfigError, match=r"data.mlm_rate=1.5 must be in \(0, 1\)"):
    pipeline.validate(_with(base_config, **{"data.objective": "mlm", "data.mlm_rate": 1.5}))
  with pytest.raises(ConfigError, match="data.ul2_mix"):
    pipeline.validate(_with(base_config, **{"data.objective": "ul2", "data.ul2_mix": (0.5, 0.5)}))
  with pytest.raises(ConfigError, match="data.ul2_mix"):  # (a TypeError)
    pipeline.validate(_with(base_config, **{"data.objective": "ul2", "data.ul2_mix": "abc"}))
  with pytest.raises(ConfigError, match="data.objective='bert' is not one of"):
    objectives.check(_with(base_config, **{"data.objective": "bert"}))


def test_sample_lets_an_encoder_decoders_source_and_target_each_fill_learned_positions(
    tok_path, monkeypatch):
  """A source of 25-64 tokens and 40 new tokens under max_len=64: each fits (it was refused as a
  decoder's prompt + continuation)."""
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/transformer.py:tiny", [
      f"data.tokenizer={tok_path}", "model.position=learned", "model.max_len=64"])
  seen = []
  monkeypatch.setattr(sampling, "generate", lambda model, params, ids, n, **kw: (
      seen.append((ids[0], n)) or [[5, 6]]))
  prompt = " ".join(["word"] * 12)
  source = sample.source(config, tokenizer_lib.load(tok_path), prompt)
  assert 24 < len(source) <= 64  # with 40 more, past 64: what a decoder's prompt cannot take
  sample.sample_text(config, None, prompt, max_new_tokens=40)
  assert seen == [(source, 40)]


def test_sample_frames_an_empty_prompt_and_refuses_a_fill_mask_past_learned_positions(tok_path):
  """An empty prompt without data.add_bos starts from bos (its ids were empty: a traceback); a
  --fill_mask text past model.max_len (learned positions) is refused: its rows read no position,
  NaN reached every [MASK], and each was filled with id 0."""
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load(tok_path)
  gpt2 = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", ["data.add_bos=false"])
  assert sample.prompt_ids(gpt2, tok, "", 4) == [tok.bos_id]  # as scoring frames it
  bert = config_lib.load(f"{REPO}/configs/bert.py:tiny", [f"data.tokenizer={tok_path}"])
  assert bert.model.position == "learned"
  long = " ".join(["[MASK]"] + ["word"] * bert.model.max_len)
  with pytest.raises(ConfigError, match=r"^--fill_mask text \(\d+ tokens\) exceeds model.max_len"):
    sample.fill_mask(bert, None, long)


def test_nsp_batches_resume_exactly(base_config):
  """The nsp pipeline (chunks with their documents, pairs within TRAIN_WINDOW shuffled chunks)
  resumes from a saved position with the same batches."""
  import json  # pylint: disable=g-import-not-at-top
  c = _with(base_config, **{"model.family": "encoder", "data.objective": "mlm",
                            "data.sentence_pair": "nsp", "model.sentence_head": True})
  it = pipeline.make_train_iterator(c)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  fresh = pipeline.make_train_iterator(c)
  fresh.set_state(state)
  for a, b in zip(want, [next(fresh) for _ in range(3)]):
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
  assert any(b["sentence_labels"].any() for b in want)
