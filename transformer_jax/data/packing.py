"""Concatenate-and-split packing of token streams (data.packing = "concat", causal LM).

`ConcatRows` reads documents ({"tokens": int32 ids}) in stream order, concatenates them and cuts
the stream into rows of exactly seq_len tokens: no padding (only the last row of a finite stream
is padded with 0), and a document that does not fit continues, as a new segment, at the start of
the next row. Each row is in grain's packed format (`inputs`, `inputs_segment_ids`,
`inputs_positions`: int32 [seq_len]); segment ids count a row's document pieces from 1 and
positions restart at 0 in every piece (a continued document's positions start again at 0), so a
piece never attends to the tokens of another.

This is GPT-2's and Levanter's packing, and what grain's `ConcatThenSplitIterDataset` does for
one feature; that one saves its position with tuples that a JSON round trip (our checkpoints)
turns into lists, which it then misreads, so this small iterator is used instead. Its state is
the parent's state before the document being cut plus the offset into it: restoring re-reads
that one document.
"""

import grain
import numpy as np

_PACKED = "inputs"


class ConcatRows(grain.IterDataset):
  """{"tokens": int32 [n]} documents -> rows of seq_len tokens in grain's packed format."""

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self) -> grain.DatasetIterator:
    return _ConcatRowsIterator(self._parent.__iter__(), self._seq_len)

  def __str__(self) -> str:
    return f"ConcatRows(seq_len={self._seq_len})"


class _ConcatRowsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._doc = None  # The document being cut (None: the next one starts the next piece) ...
    self._offset = 0  # ... its first token not yet in a row ...
    self._doc_state = None  # ... and the parent's state before it.
    self._arange = np.arange(seq_len, dtype=np.int32)

  def _next_doc(self) -> bool:
    """Reads the next non-empty document; False at the end of the parent."""
    while True:
      state = self._parent.get_state()
      try:
        tokens = next(self._parent)["tokens"]
      except StopIteration:
        return False
      if len(tokens):
        self._doc, self._offset, self._doc_state = tokens, 0, state
        return True

  def __next__(self) -> dict:
    pieces, filled = [], 0
    while filled < self._seq_len:
      if self._doc is None and not self._next_doc():
        break
      piece = self._doc[self._offset:self._offset + self._seq_len - filled]
      pieces.append(piece)
      filled += len(piece)
      self._offset += len(piece)
      if self._offset == len(self._doc):
        self._doc = None
    if not pieces:
      raise StopIteration
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    starts = np.cumsum(lengths) - lengths
    inputs, segments, positions = (np.zeros(self._seq_len, np.int32) for _ in range(3))
    inputs[:filled] = np.concatenate(pieces)
    segments[:filled] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
    positions[:filled] = self._arange[:filled] - np.repeat(starts, lengths)
    return {_PACKED: inputs, f"{_PACKED}_segment_ids": segments,
            f"{_PACKED}_positions": positions}

  def get_state(self) -> dict:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._doc_state, "offset": self._offset}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._doc = None
    if state["offset"]:
      if not self._next_doc():
        raise ValueError(f"the saved data position {state} is past the end of the documents")
      self._offset = int(state["offset"])
