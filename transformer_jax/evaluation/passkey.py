"""Passkey retrieval (Mohtashami & Jaggi 2023): can a decoder find a number hidden in long text?

A prompt is filler text ("The grass is green. The sky is blue. ...") about `length` tokens long,
with "The pass key is 71432. Remember it. 71432 is the pass key." put at a chosen depth (0 = the
start, 1 = just before the question), ending in "What is the pass key? The pass key is". The key
counts as retrieved when the model, fed the prompt and the key (teacher forcing), predicts every
token of the key: exactly what greedy decoding would write (tasks.py's passkey task scores it;
`evaluate` reports `acc` over all rows and `acc_lenN_depthD` at each (length, depth), e.g.
`acc_len80_depth0.5`; keys are seeded).
"""

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def example(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
  """(prompt ids, key ids) of one passkey prompt of about `length` tokens (at least the needle
  and the question), the needle `depth` (in [0, 1]) of the way through the filler."""
  if not 0 <= depth <= 1:  # 3.0 acted as 1.0, and -0.5 sliced from the end
    raise ValueError(f"passkey depth {depth!r} is not in [0, 1]")
  filler = tokenizer.encode(FILLER)
  needle = tokenizer.encode(NEEDLE.format(key=key))
  question = tokenizer.encode(QUESTION)
  # bos first, as training framed documents (eos where the tokenizer has no bos, as scoring)
  start = next(([i] for i in (tokenizer.bos_id, tokenizer.eos_id) if i >= 0), [])
  room = max(length - len(needle) - len(question) - len(start), 0)
  text = (filler * (room // len(filler) + 1))[:room]
  cut = int(round(depth * room))
  prompt = start + text[:cut] + needle + text[cut:] + question
  return prompt, _after(tokenizer, QUESTION, f" {key}")


def _after(tokenizer, text: str, more: str) -> list[int]:
  """The ids `more` takes after `text`, as greedy decoding would write them: a tokenizer that
  puts a space before every text it encodes (SentencePiece, Llama-2's tokenizer.json) writes
  " 71432" alone as a lone space and the number, never read after a word."""
  head, whole = tokenizer.encode(text), tokenizer.encode(text + more)
  return whole[len(head):] if whole[:len(head)] == head else tokenizer.encode(more)
