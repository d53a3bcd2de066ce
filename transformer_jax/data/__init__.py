"""The data layer: corpora, the TFDS text dataset, the tokenizer and the grain pipeline."""
