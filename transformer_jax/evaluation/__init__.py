"""Evaluations of trained models beyond held-out loss: downstream tasks from local JSONL
(tasks.py: multiple choice, cloze, perplexity, generation, passkey), the batched scorer
(scoring.py), checkpoint loading and the training hook (harness.py), the lm-eval adapter
(lm_eval_adapter.py), tasks made from the embedded corpus (corpus_tasks.py), and passkey
retrieval (passkey.py)."""
