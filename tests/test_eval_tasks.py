"""What `evaluate` reports, with stand-in models (no training): every task given comes out under a
name of its own; a passkey task reports its accuracy at each (length, depth)."""

import json
import types

from transformer_jax.evaluation import harness


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_a_repeated_task_name_never_takes_another_tasks_name(tmp_path):
  """a/mc, a/mc_2 and b/mc: the second mc was renamed mc_2 (NAME_{tasks so far}), replacing the
  real mc_2's results; 3 tasks in, 2 out."""
  mc = [{"context": "a b", "choices": ["c", "d"], "label": 0}]
  specs = [_write(tmp_path / "a" / "mc.jsonl", mc * 7),
           _write(tmp_path / "a" / "mc_2.jsonl", [{"text": "some text"}]),
           _write(tmp_path / "b" / "mc.jsonl", mc * 3)]
  lm = types.SimpleNamespace(
      is_seq2seq=False, loglikelihood=lambda pairs: [(-1.0, False) for _ in pairs],
      loglikelihood_rolling=lambda texts, with_counts: [(-2.0, 2) for _ in texts])
  out = harness.evaluate(lm, specs)
  assert list(out) == ["mc", "mc_2", "mc_3"]
  assert [out["mc"]["examples"], out["mc_3"]["examples"]] == [7, 3]
  assert "perplexity" in out["mc_2"]
  assert harness.unique_names(["a", "a", "a_2", "a"]) == ["a", "a_3", "a_2", "a_4"]


def test_a_passkey_task_reports_its_accuracy_at_each_length_and_depth(tmp_path):
  """It reported one acc over all rows, though passkey.py and the README promised each
  (length, depth)'s."""
  rows = [{"length": 40, "depth": 0.0}, {"length": 40, "depth": 0.0, "key": 7},
          {"length": 40, "depth": 0.5}, {"length": 60, "depth": 1}]
  tokenizer = types.SimpleNamespace(encode=lambda text: [len(w) for w in text.split()],
                                    bos_id=1, eos_id=2)
  def ids_loglikelihood(pairs):  # finds the key in prompts under 50 tokens, but key 7's
    return [(0.0, len(prompt) < 50 and answer != [1]) for prompt, answer in pairs]
  lm = types.SimpleNamespace(is_seq2seq=False, tokenizer=tokenizer, max_len=128,
                             config=types.SimpleNamespace(model=types.SimpleNamespace(family="")),
                             ids_loglikelihood=ids_loglikelihood)
  out = harness.evaluate(lm, [_write(tmp_path / "keys.jsonl", rows)], timing=False)
  assert out == {"keys": {"acc": 0.5, "acc_len40_depth0": 0.5, "acc_len40_depth0.5": 1.0,
                          "acc_len60_depth1": 0.0}}
