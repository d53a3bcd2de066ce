"""The PyTorch peers that `benchmark --compare=PEER[,PEER]` times on our step's shapes, each in a
worker process of its own (torch loaded next to JAX in one process measurably slows JAX's steps).

  hf          Hugging Face transformers' model of the config's family, built from the config.json
              our exporter writes (convert/: GPT-2, Llama, Mistral, Mixtral, Qwen2-MoE), so its
              parameters are ours one for one; torch AdamW with the config's hyperparameters,
              global-norm clipping at 1.0; eager.
  hf_compile  the same with the model under torch.compile (the first steps compile).

What each side computes in follows the config: model.dtype=bfloat16 runs the peer as PyTorch's
fast path is written (fp32 master weights under bf16 autocast), float32 in fp32. On a CUDA
device the peer uses SDPA attention (flash or memory-efficient kernels) and the fused AdamW; on
CPU the math attention and the foreach AdamW. Batches are random token ids of the same shape.
"""

import contextlib
import time

from transformer_jax.config import ConfigError

PEERS = ("hf", "hf_compile")
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
             "summary_first_dropout")


def check(names) -> list:
  """The peers of --compare=NAME[,NAME], checked."""
  names = [n.strip() for n in names.split(",") if n.strip()]
  bad = [n for n in names if n not in PEERS]
  if bad:
    raise ConfigError(f"--compare={bad[0]!r}: peers are {', '.join(PEERS)}")
  return names


def hf_config(config):
  """transformers' config of the config's model (the one `convert export` writes), no dropout."""
  import transformers  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import tables  # pylint: disable=g-import-not-at-top
  cfg = hf_lib.model_config(config)
  fam = hf_lib.table_for(cfg)
  if fam.MODEL_FAMILY != "decoder":
    raise ConfigError(f"--compare times causal LMs (GPT-2, Llama, Mistral, Mixtral, Qwen2-MoE); "
                      f"this config is a {fam.MODEL_TYPE} model")
  values = tables.config_to_hf(fam, cfg)
  for key in ("architectures", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
    values.pop(key, None)  # no generation here
  out = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
  for name in _DROPOUTS:
    if hasattr(out, name):
      setattr(out, name, 0.0)
  out.bos_token_id = out.eos_token_id = out.pad_token_id = None  # GPT-2's default 50256 is
  return out  # past a small test vocabulary


class HFRunner:
  """A Hugging Face model and torch AdamW on the config's shapes (see the module doc)."""

  def __init__(self, config, compiled: bool = False):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("--compare needs torch and transformers: pip install -e '.[hf]'") from None
    self.torch, self.config = torch, config
    cuda = torch.cuda.is_available()
    self.device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    self.model = transformers.AutoModelForCausalLM.from_config(
        hf_config(config), attn_implementation="sdpa").to(self.device)
    self.model.train()
    self.params = sum(p.numel() for p in self.model.parameters())
    o = config.optimizer
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                 eps=o.eps, weight_decay=o.weight_decay,
                                 **({"fused": True} if cuda else {}))
    bf16 = config.model.dtype == "bfloat16"
    self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    self.forward = torch.compile(self.model) if compiled else self.model
    self.gen = torch.Generator(device=self.device).manual_seed(0)
    t = time.perf_counter()
    self.time_steps(3 if compiled else 2)  # warm-up (torch.compile: its compilations)
    self.warmup_s = time.perf_counter() - t
    self.release()

  def _sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def release(self):
    """Hands the caching allocator's free blocks back, so that JAX (and the other peer) sharing
    the GPU between rounds can use them."""
    if self.device.type == "cuda":
      self.torch.cuda.empty_cache()

  def time_steps(self, n):
    torch, c = self.torch, self.config
    out = []
    for _ in range(n):
      x = torch.randint(0, c.model.vocab_size, (c.train.batch_size, c.data.seq_len),
                        generator=self.gen, device=self.device)
      self._sync()
      t = time.perf_counter()
      with self.autocast():
        loss = self.forward(input_ids=x, labels=x).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      self._sync()
      out.append(time.perf_counter() - t)
    return out


def runner(kind: str, config):
  return HFRunner(config, compiled=kind == "hf_compile")
