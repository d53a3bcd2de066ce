"""Evaluations of trained models beyond held-out loss: downstream tasks from local JSONL
(tasks.py: multiple choice, cloze, perplexity, generation, passkey), the batched scorer
(scoring.py), checkpoint loading and the training hook (harness.py), the lm-eval adapter
(lm_eval_adapter.py), tasks made from the embedded corpus (corpus_tasks.py), passkey
retrieval (passkey.py), and looking inside a model (the `inspect` command): attention maps, the
logit lens and activation statistics (interpret.py, figures in interpret_plots.py) and linear
probes (probe.py)."""
