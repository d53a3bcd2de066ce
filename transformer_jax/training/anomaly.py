"""The anomaly policy (train.on_anomaly): what the loop does after a step whose update the jitted
step refused to apply (a non-finite loss or gradient, or a loss spike; see step.py)."""

import jax
import jax.numpy as jnp


class AnomalyError(RuntimeError):
  """A non-finite or spiking step under train.on_anomaly=abort."""


class Guard:
  """Collects each step's on-device anomaly flags without a host sync, and reads them only when
  the loop is about to log or save (`check`), so nothing is saved past an unchecked step."""

  def __init__(self, policy: str, writer):
    self.policy, self.writer, self._flags = policy, writer, []

  def track(self, step: int, metrics: dict):
    self._flags.append((step, metrics["nonfinite"], metrics["spike"]))

  def reset(self):
    self._flags = []

  def check(self, directory: str) -> list[dict]:
    """The anomalies since the last check, each logged as an event; raises AnomalyError under
    the abort policy. Returns the events (for `rollback`)."""
    events = [{"batch": int(s), "reason": "non-finite loss or gradient" if nf else "loss spike"}
              for s, nf, sp in jax.device_get(self._flags) if nf or sp]
    self._flags = []
    for ev in events:
      self.writer.write(ev["batch"] + 1, dict(ev, event="anomaly", policy=self.policy))
    if events and self.policy == "abort":
      raise AnomalyError(
          f"{events[0]['reason']} at step {events[0]['batch'] + 1} (batch "
          f"{events[0]['batch']} of the data order); update not applied. Resume from "
          f"{directory} with a lower learning rate, or set train.on_anomaly=skip")
    return events if self.policy == "rollback" else []


def rollback(trainer, ckpts, data, new_data, events, writer, say):
  """Restores the newest checkpoint from before the first bad batch and skips the data window
  up to and including the last bad one. Returns (next step, state)."""
  first, last_bad = events[0]["batch"], events[-1]["batch"]
  good = [s for s in ckpts.all_steps() if s <= first]
  if good:
    step, state = ckpts.restore(trainer.abstract_state, data, step=max(good), report=say)
  else:  # nothing saved yet: the initial state and the start of the data
    step, state = 0, trainer.init_state(trainer.config.seed)
    data.set_state(new_data().get_state())
  for _ in range(last_bad + 1 - step):
    next(data)
  state = state.replace(step=jax.device_put(jnp.asarray(last_bad + 1, jnp.int32),
                                            trainer.state_shardings.step))
  writer.write(last_bad + 1, {"event": "rollback", "restored_step": step,
                              "skipped_batches": [step, last_bad]})
  say(f"rollback: restored step {step}, skipped batches {step}..{last_bad}")
  return last_bad + 1, state
