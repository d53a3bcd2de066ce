"""The Mixture-of-Experts FFN's rows (models/moe.py), shared by Mixtral and Qwen2-MoE, and the
two layouts of Hugging Face's experts.

transformers (>= 5) holds a layer's experts fused: `experts.gate_up_proj` [E, 2F, D] (each
expert's gate projection, then its up projection, on the output axis: `.chunk(2, dim=-1)` of
its output) and `experts.down_proj` [E, D, F]; the router is `gate.weight` [E, D] (softmax over
the experts in fp32, top-k). Its checkpoints (save_pretrained, the Hub) keep one nn.Linear per
expert instead: `experts.{j}.<gate>.weight` [F, D], `<up>` [F, D], `<down>` [D, F], which
transformers fuses as it loads. The rows below name the fused tensors; `fuse` turns a
checkpoint's per-expert tensors into them (a fused checkpoint passes through) and `split`
writes the per-expert ones back, so an export is what save_pretrained writes.
"""

import collections
import re

import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.convert.tables import P

ROLES = ("gate", "up", "down")


def rows(ffn: str) -> tuple:
  """The rows of the MoE FFN at HF module path `ffn` (e.g. "model.layers.{i}.mlp")."""
  return (
      P("mlp/router", f"{ffn}.gate.weight", 1, linear=True, when="moe"),
      P("mlp/gate mlp/up", f"{ffn}.experts.gate_up_proj", 2, linear=True, when="moe", lead=1),
      P("mlp/down", f"{ffn}.experts.down_proj", 2, linear=True, when="moe", lead=1),
  )


def shared_rows(ffn: str) -> tuple:
  """Qwen2-MoE's shared expert (our mlp/shared, one FFN num_shared_experts x expert_d_ff wide)
  and its sigmoid gate [1, D] (our mlp/shared_gate [D, 1])."""
  return tuple(P(f"mlp/shared/{r}", f"{ffn}.shared_expert.{r}_proj.weight", 1, linear=True,
                 when="moe") for r in ROLES) + (
      P("mlp/shared_gate", f"{ffn}.shared_expert_gate.weight", 1, linear=True, when="moe"),)


def fuse(tensors: dict, names: dict) -> dict:
  """The fused tensors from per-expert ones, `{ffn}.experts.{j}.{names[role]}.weight`."""
  pattern = re.compile(rf"^(.+)\.experts\.(\d+)\.({'|'.join(names.values())})\.weight$")
  role = {v: k for k, v in names.items()}
  out, found = {}, collections.defaultdict(lambda: collections.defaultdict(dict))
  for name, x in tensors.items():
    m = pattern.match(name)
    if m:
      found[m[1]][role[m[3]]][int(m[2])] = x
    else:
      out[name] = x
  for ffn, by_role in found.items():
    count = max(len(by_role[r]) for r in ROLES)
    bad = [names[r] for r in ROLES if sorted(by_role[r]) != list(range(count))]
    if bad:
      raise ConfigError(f"the checkpoint's {ffn}.experts lack some of experts 0..{count - 1}'s "
                        f"{', '.join(bad)}")
    stacked = {r: np.stack([by_role[r][j] for j in range(count)]) for r in ROLES}
    out[f"{ffn}.experts.gate_up_proj"] = np.concatenate([stacked["gate"], stacked["up"]], axis=1)
    out[f"{ffn}.experts.down_proj"] = stacked["down"]
  return out


def split(tensors: dict, names: dict) -> dict:
  """The per-expert tensors (as `fuse` reads them) from the fused ones."""
  out = {}
  for name, x in tensors.items():
    ffn, _, fused = name.rpartition(".experts.")
    if fused == "gate_up_proj":
      parts = dict(zip(("gate", "up"), np.split(x, 2, axis=1)))
    elif fused == "down_proj":
      parts = {"down": x}
    else:
      out[name] = x
      continue
    for r, stacked in parts.items():
      for j, w in enumerate(stacked):
        out[f"{ffn}.experts.{j}.{names[r]}.weight"] = np.ascontiguousarray(w)
  return out


def read_aux_loss(hf: dict, top_k: int) -> dict:
  """model.router_aux_loss for config.json's router_aux_loss_coef: HF's load-balancing loss
  counts each token's top_k choices over the tokens (top_k x ours, over the assignments)."""
  return {"router_aux_loss": float(hf.get("router_aux_loss_coef", 0.001)) * top_k}


def write_aux_loss(cfg) -> dict:
  return {"router_aux_loss_coef": cfg.router_aux_loss / cfg.experts_per_token}
