"""`python -m transformer_jax.benchmark --config=MOE_CONFIG --moe [--moe_capacity=1.25]`: an MoE
model's training step side by side, in one process and interleaved round by round (so machine
noise hits all alike), in three forms:

- dropless: the config with model.expert_capacity_factor=0 (sorted assignments, ragged_dot);
- capacity: with model.expert_capacity_factor=--moe_capacity (one-hot dispatch and combine);
- dense: the same model without experts, its FFNs experts_per_token x expert_d_ff wide, so that a
  token meets the same matmul parameters (the active parameters; the MoE has its router beside).

Reported (the last line one JSON object): each form's step_time_s, tokens_per_s and active matmul
parameters, dense_vs_dropless and capacity_vs_dropless (tokens/s ratios), and the routing overhead
of each MoE form as a share of its step, 1 - dense step / MoE step: what routing a token to its
experts costs beyond the same FLOPs in dense FFNs (the router, top-k, the sort and gathers or the
one-hot einsums, the grouped matmuls' inefficiency; also the capacity form's padded slots).
"""

import json
import statistics

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError

FORMS = ("dropless", "capacity", "dense")


def form_overrides(config, capacity: float) -> dict:
  """Each form's config overrides (see the module doc); a one-line error for a config that has no
  experts or whose dense layers could not keep their width."""
  m = config.model
  if not m.num_experts:
    raise ConfigError("--moe compares an MoE model's forms: the config has model.num_experts=0")
  if capacity <= 0:
    raise ConfigError(f"--moe_capacity must be > 0, got {capacity}")
  width = m.experts_per_token * (m.expert_d_ff or m.d_ff)
  if m.moe_every != 1 and width != m.d_ff:
    raise ConfigError(f"--moe: with model.moe_every={m.moe_every} the dense layers stay "
                      f"{m.d_ff} wide, so no dense model has the MoE layers' active width {width}")
  if m.num_shared_experts:
    raise ConfigError("--moe: shared experts are not compared (model.num_shared_experts > 0)")
  defaults = config_lib.base.get_config().model  # the expert keys a dense model leaves unread
  return {"dropless": ["model.expert_capacity_factor=0"],
          "capacity": [f"model.expert_capacity_factor={capacity}"],
          "dense": ["model.num_experts=0", f"model.d_ff={width}"]
                   + [f"model.{k}={defaults[k]}" for k in config_lib.EXPERT_KEYS]}


def compare(runner, spec: str, overrides: list, steps: int, rounds: int, capacity: float) -> dict:
  """The three forms timed in interleaved rounds; the report's dict (see the module doc).
  `runner(config)`: a built train step with time_steps(n), compile_s, params, state and jax
  (benchmark.JaxRunner)."""
  from transformer_jax.perf import counting  # pylint: disable=g-import-not-at-top
  base = config_lib.load(spec, overrides)
  configs = {name: config_lib.load(spec, overrides + extra)
             for name, extra in form_overrides(base, capacity).items()}
  runners = {name: runner(c) for name, c in configs.items()}
  times = {name: [] for name in FORMS}
  for r in range(rounds):
    for name in FORMS:
      times[name] += runners[name].time_steps(steps)
    print(f"round {r}: " + ", ".join(f"{n} {statistics.median(times[n]):.4f}s/step"
                                     for n in FORMS), flush=True)
  tokens = base.train.batch_size * base.data.seq_len
  step = {n: statistics.median(times[n]) for n in FORMS}
  out = {"batch_size": base.train.batch_size, "seq_len": base.data.seq_len,
         "num_experts": base.model.num_experts, "experts_per_token": base.model.experts_per_token,
         "capacity_factor": capacity, "devices": runners["dense"].jax.device_count()}
  for name in FORMS:
    built = runners[name]
    out[name] = {"step_time_s": round(step[name], 5),
                 "tokens_per_s": round(tokens / step[name], 1),
                 "compile_s": round(built.compile_s, 2), "params": built.params,
                 "active_matmul_params": counting.matmul_params(built.state.params,
                                                                configs[name].model)}
  out.update(dense_vs_dropless=round(step["dropless"] / step["dense"], 3),
             capacity_vs_dropless=round(step["dropless"] / step["capacity"], 3),
             routing_share_dropless=round(1 - step["dense"] / step["dropless"], 3),
             routing_share_capacity=round(1 - step["dense"] / step["capacity"], 3))
  return out


def main(runner, spec: str, overrides: list, steps: int, rounds: int, capacity: float) -> dict:
  """compare(), then a table and the JSON line."""
  out = compare(runner, spec, overrides, steps, rounds, capacity)
  print(f"{'form':>9} {'step s':>8} {'tokens/s':>10} {'active params':>14}")
  for name in FORMS:
    r = out[name]
    print(f"{name:>9} {r['step_time_s']:8.4f} {r['tokens_per_s']:10,.0f} "
          f"{r['active_matmul_params']:14,d}")
  print(f"routing overhead: dropless {100 * out['routing_share_dropless']:.0f}% of its step, "
        f"capacity {100 * out['routing_share_capacity']:.0f}%")
  print(json.dumps(out))
  return out
