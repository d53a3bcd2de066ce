"""The anomaly policy (train.on_anomaly): what the loop does after a step whose update the jitted
step refused to apply (a non-finite loss or gradient, or a loss spike; see step.py)."""

import jax
import numpy as np


class AnomalyError(RuntimeError):
  """A non-finite or spiking step under train.on_anomaly=abort."""


class Guard:
  """Collects each step's on-device anomaly flags without a host sync, and reads them only when
  the loop is about to log or save (`check`), so nothing is saved past an unchecked step.
  `limit` > 0: that many refused updates in a row stop the run under any policy (a diverged
  run refuses every update, and skip or rollback would go on to the last step)."""

  def __init__(self, policy: str, writer, say=print, limit: int = 0):
    self.policy, self.writer, self.say, self.limit = policy, writer, say, limit
    self._flags, self.in_a_row, self.streak_from = [], 0, 0  # (its first refused step)

  @property
  def refusing(self) -> bool:
    """Whether the latest checked update was refused and not rolled back: the state holds the
    parameters of the last applied update, which a diverged run refuses every update on. The
    loop saves no periodic checkpoint then: one would be the newest, which the advised resume
    loads, and keep-last-N would delete one from before the streak for it."""
    return self.in_a_row > 0 and self.policy != "rollback"

  def track(self, step: int, metrics: dict):
    self._flags.append((step, metrics["nonfinite"], metrics["spike"]))

  def reset(self):
    self._flags = []

  def check(self, ckpts) -> list[dict]:
    """The anomalies since the last check, each logged as an event and said in one line;
    raises AnomalyError under the abort policy, or past `limit` in a row (naming the checkpoint
    a resume starts from, of `ckpts`). Returns the events (for `rollback`)."""
    events, directory = [], ckpts.directory
    for s, nf, sp in jax.device_get(self._flags):
      if (nf or sp) and not self.in_a_row:
        self.streak_from = int(s) + 1
      self.in_a_row = self.in_a_row + 1 if nf or sp else 0
      if nf or sp:
        events.append({"batch": int(s), "reason": "non-finite loss or gradient" if nf
                       else "loss spike"})
    self._flags = []
    for ev in events:
      self.writer.write(ev["batch"] + 1, dict(ev, event="anomaly", policy=self.policy))
    if events and self.policy == "abort":
      raise AnomalyError(
          f"{events[0]['reason']} at step {events[0]['batch'] + 1} (batch "
          f"{events[0]['batch']} of the data order); update not applied. Resume from "
          f"{directory} with a lower learning rate, or set train.on_anomaly=skip")
    if events:
      steps = ", ".join(str(e["batch"] + 1) for e in events[:8]) + ", ..." * (len(events) > 8)
      self.say(f"{len(events)} update(s) not applied ({events[-1]['reason']}) at step(s) "
               f"{steps}; train.on_anomaly={self.policy}")
    if self.limit and self.in_a_row >= self.limit:
      raise AnomalyError(
          f"{self.in_a_row} updates in a row were not applied ({events[-1]['reason']}, last at "
          f"step {events[-1]['batch'] + 1}): the run has diverged. {self._advice(ckpts)} "
          f"(train.max_anomalies_in_a_row={self.limit}; 0 = no limit)")
    return events if self.policy == "rollback" else []

  def _advice(self, ckpts) -> str:
    """How to resume a diverged run: the checkpoint that a re-run starts from."""
    ckpts.wait()
    steps = ckpts.all_steps()
    if not steps:
      return ("No checkpoint was saved before it diverged: re-run with a lower learning rate "
              "(it starts over)")
    before = (f", saved before these refused updates began at step {self.streak_from}"
              if steps[-1] < self.streak_from else "")
    return (f"Resume from {ckpts.directory} with a lower learning rate: it starts from its "
            f"newest checkpoint, step {steps[-1]}{before}")


def rollback(trainer, ckpts, data, new_data, events, writer, say):
  """Restores the newest checkpoint from before the first bad batch and skips the data window
  up to and including the last bad one. Returns (next step, state)."""
  first, last_bad = events[0]["batch"], events[-1]["batch"]
  good = [s for s in ckpts.all_steps() if s <= first]
  if good:
    step, state = ckpts.restore(trainer.abstract_state, data, step=max(good), report=say)
  else:  # nothing saved yet: the initial state and the start of the data
    step, state = 0, trainer.init_state(trainer.config.seed)
    fresh = new_data()
    try:
      data.set_state(fresh.get_state())
    finally:  # (its prefetch threads went on reading)
      fresh.close()
  for _ in range(last_bad + 1 - step):
    next(data)
  # (from the host: a jnp array is one device's, which a sharding over several processes'
  # devices cannot take: every multi-process rollback was a traceback)
  state = state.replace(step=jax.device_put(np.asarray(last_bad + 1, np.int32),
                                            trainer.state_shardings.step))
  writer.write(last_bad + 1, {"event": "rollback", "restored_step": step,
                              "skipped_batches": [step, last_bad]})
  say(f"rollback: restored step {step}, skipped batches {step}..{last_bad}")
  return last_bad + 1, state
