"""What `evaluate` reports, with stand-in models (no training): every task given comes out under
a name of its own."""

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

