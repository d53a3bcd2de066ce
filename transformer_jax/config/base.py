"""Every default of transformer_jax, documented once.

Recipes (`configs/smoke.py`, `configs/gpt2.py`, ...) start from `get_config()` here
(`from transformer_jax.config import base`) and change only what differs. It ships inside the
package, so a workdir's saved config.json gets the defaults of keys added since it was written
(config.from_json_file) in an installed package too. Configs are Python and run as code: load
only configs you trust.

Override any key on the command line: `--config.model.num_layers=4`.
"""

import ml_collections


# Logical axis -> mesh axes. Model code only names logical axes; this table places them.
# Parameters: embed (model width), mlp, heads, kv_heads, head_dim, vocab, layers (the stacked
# axis of model.scan_layers), expert (the stacked experts of an MoE FFN).
# Activations: act_batch, act_length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab.
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp", "expert")),  # outside the experts, expert is data-parallel
    ("act_length", "sequence"),  # context parallelism: ring attention (models/ring.py)
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),  # parameters and optimizer state: ZeRO-3 over both
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("expert", "expert"),  # the MoE layers' stacked experts (expert parallelism)
)


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, dropout and the data order; in [0, 2**32)
  c.model, c.data, c.train, c.optimizer = _model(), _data(), _train(), _optimizer()
  c.checkpoint, c.eval, c.mesh = _checkpoint(), _eval(), _mesh()
  # Where metrics go besides WORKDIR/metrics.jsonl and TensorBoard: Weights & Biases (the wandb
  # extra; a run per workdir, resumed with it; WANDB_MODE=offline keeps it in WORKDIR/wandb).
  c.metrics = ml_collections.ConfigDict({"wandb": False, "wandb_project": "transformer_jax",
                                         "wandb_entity": ""})
  c.sharding_rules = SHARDING_RULES
  return c


def _model():
  # ----------------------------------------------------------------------------------- model
  m = ml_collections.ConfigDict()
  m.family = "decoder"  # decoder (causal LM) | encoder (BERT, masked LM) | encdec (seq2seq)
  m.num_layers = 12
  m.d_model = 768
  m.num_heads = 12
  m.num_kv_heads = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
  m.head_dim = 0  # 0 = d_model // num_heads
  m.d_ff = 0  # 0 = 4 * d_model
  m.vocab_size = 8192  # must be >= the tokenizer's vocabulary; padded sizes are fine
  # The ids that can be predicted: the logits of ids from this one on are masked (-1e9), so an
  # imported checkpoint's padded (zero) rows take no probability. 0 = every id; `convert
  # import` sets it when model.vocab_size pads the vocabulary.
  m.output_vocab = 0
  m.max_len = 1024  # longest position a learned position table covers
  m.position = "learned"  # learned | sinusoidal | rotary | relative (T5's bucketed bias)
  m.rope_theta = 10000.0
  # position=sinusoidal: "paper" is Vaswani et al.'s formula (sin and cos interleaved),
  # "t2t" tensor2tensor's (frequencies spread over d/2 - 1 steps, sines then cosines). t2t is the
  # default so that workdirs saved before the choice existed keep their positions.
  m.sinusoidal_variant = "t2t"
  m.relative_buckets = 32  # relative: distance buckets (half per direction when bidirectional)
  m.relative_max_distance = 128  # relative: distances beyond this share the last bucket
  m.type_vocab_size = 0  # token-type (segment A/B) embeddings, BERT; 0 = none
  m.embed_norm = False  # a norm right after the embedding sum (BERT)
  m.scale_embeddings = False  # token embeddings x sqrt(d_model) (the original Transformer)
  m.query_scale = 0.0  # attention logit scale; 0 = 1/sqrt(head_dim); T5 uses 1.0
  m.num_decoder_layers = 0  # encdec: the decoder's depth (0 = num_layers, the encoder's)
  m.norm = "layernorm"  # layernorm | rmsnorm
  m.norm_position = "pre"  # pre | post
  m.norm_eps = 1e-5
  m.activation = "gelu"  # gelu (tanh) | gelu_exact (erf, BERT) | relu | swiglu | geglu (T5 v1.1)
  m.use_bias = True  # biases in dense layers and norms
  m.qkv_bias = False  # biases on the attention's query/key/value projections alone (Qwen)
  m.tie_embeddings = True  # output projection = token embedding transposed
  m.dropout_rate = 0.0
  m.init_std = 0.02  # normal init; residual projections get init_std / sqrt(2 * num_layers)
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  m.param_dtype = "float32"
  # Rematerialization: what each block keeps from the forward pass for the backward pass (less
  # memory, more compute). none: everything | full: only its input, the whole block is recomputed
  # | dots: matmul outputs without batch dims (the q/k/v/out and MLP projections; attention
  # scores, softmax and norms are recomputed) | outputs: only the tagged activations (q/k/v
  # projections, attention and MLP sublayer outputs; attention scores and the MLP hidden are
  # recomputed).
  m.remat = "none"
  # One nn.scan over the blocks: compile time independent of depth; parameters stacked on a
  # leading "layers" axis under params["layers"] instead of layer_0, layer_1, ... (see
  # models/stack.py stack_layers / unstack_layers).
  m.scan_layers = False
  m.attention_chunks = 4  # causal training splits queries into blocks, skipping masked keys; exact
  m.sentence_head = False  # encoder: BERT's pooler + sentence-pair classifier (data.sentence_pair)
  # Attention kernel (models/attention.py): xla (the reference: einsums, fp32 scores) |
  # dot_product (jax.nn.dot_product_attention, XLA) | cudnn (its cuDNN flash attention: CUDA GPU,
  # bfloat16) | splash (Pallas TPU splash attention: no relative bias, encdec or prefix LM; lengths
  # a multiple of 128) | auto (TPU: splash, GPU: cudnn, where the layer allows; else xla, as on
  # CPUs). KV-cache decoding always uses xla (dot_product: itself).
  m.attention_impl = "auto"
  # Quantized training (quant/qt.py, through qwix): none | int8 | fp8 runs the attention and MLP
  # projections' matmuls quantized, forward and backward (absmax scales per row and column); the
  # fp32 master weights and checkpoints are unchanged (a run may resume with it on or off). In an
  # MoE layer the shared experts' MLP is quantized, the routed experts' grouped matmuls are not.
  m.quantization = "none"
  _long_context(m)
  _moe(m)

  return m


def _long_context(m):
  """model.* keys of sliding-window, sparse and long-context attention."""
  # Sliding-window attention: each query sees the keys within attention_window positions (with
  # a causal mask: the W most recent, itself included, as Mistral); 0 = full attention.
  # window_pattern: L (local, windowed) or G (global) per layer, cycled: "" = every layer local,
  # "LG" alternates (Gemma 2), "LLLLLG" is Gemma 3's 5:1.
  m.attention_window = 0
  m.window_pattern = ""
  # Sparse attention on the local layers: Longformer's global tokens (the first global_tokens
  # positions of every segment attend to and are attended by the whole segment) and BigBird's
  # random blocks (each query block of block_size positions also sees random_blocks key blocks,
  # seeded and fixed per layer). Both are masks: the kernels that cannot take them (splash,
  # ring) are not used.
  m.global_tokens = 0
  m.random_blocks = 0
  m.block_size = 64
  # RoPE scaling for longer contexts, exactly as Hugging Face's rope_parameters: none | linear
  # (positions / factor) | dynamic (NTK: theta grows with each document's length beyond max_len) |
  # yarn (ramp between interpolated and original frequencies, cos/sin scaled) | llama3.
  m.rope_scaling = "none"
  m.rope_factor = 1.0
  m.rope_original_max_len = 0  # yarn, llama3: the pretraining context; 0 = max_len
  m.rope_low_freq_factor = 1.0  # llama3
  m.rope_high_freq_factor = 4.0  # llama3
  m.rope_beta_fast = 32.0  # yarn
  m.rope_beta_slow = 1.0  # yarn
  m.rope_attention_factor = 0.0  # yarn: 0 = 0.1 * ln(factor) + 1


def _moe(m):
  """model.* keys of Mixture-of-Experts FFNs (models/moe.py)."""
  # num_experts > 0 replaces the FFN of every moe_every-th layer (counted from 1: moe_every=2 is
  # layers 1, 3, 5, ...) with experts_per_token of num_experts expert FFNs, chosen per token by
  # a softmax router (fp32), each expert_d_ff wide (0 = d_ff).
  m.num_experts = 0
  m.experts_per_token = 2
  m.expert_d_ff = 0
  m.moe_every = 1
  # 0 = dropless: every assignment is computed (sorted by expert, grouped matmuls). > 0 = each
  # expert takes at most ceil(row length x experts_per_token x factor / num_experts) tokens of a
  # row; the rest are dropped (the residual carries them). Switch: 1.0-1.25 train, 2.0 eval.
  m.expert_capacity_factor = 0.0
  m.router_renormalize = True  # top-k weights sum to 1 (Mixtral); False: raw probs (Switch)
  m.num_shared_experts = 0  # always-on experts of expert_d_ff each (DeepSeek-MoE, Qwen-MoE)
  m.shared_expert_gate = False  # Qwen-MoE: the shared experts' output x sigmoid(x . w)
  # Loss weights, averaged over the MoE layers: Switch's load-balancing loss (1.0 at uniform
  # routing) and ST-MoE's router z-loss (mean squared log-partition of the router logits).
  m.router_aux_loss = 0.01
  m.router_z_loss = 0.001
  m.router_jitter = 0.0  # train: router inputs x uniform(1 - j, 1 + j) noise (Switch: 0.01)


def _data():
  # ------------------------------------------------------------------------------------ data
  d = ml_collections.ConfigDict()
  # "stdlib" (this Python's standard library sources), a glob of files, or "tfds:NAME[/CONFIG]"
  # (a TFDS catalog dataset, downloaded and prepared once, e.g. "tfds:wmt14_translate/de-en")
  d.corpus = "stdlib"
  # Documents: text: one per file | lines: one per line | jsonl: one per line (text_field).
  # Pairs, for data.objective=seq2seq: tsv: source<TAB>target per line | jsonl_pairs: one per line
  # (source_field, target_field) | functions: Python functions' def + docstring -> body.
  d.format = "text"
  d.text_field = "text"  # the JSONL (or TFDS) field holding the document text
  d.source_field = "source"  # jsonl_pairs and TFDS pairs: the source text's field (e.g. "de")
  d.target_field = "target"  # ... and the target text's (e.g. "en")
  d.data_dir = ""  # where TFDS writes the prepared ArrayRecord files; "" = TFDS default
  # A weighted mixture of sources instead of the one above (data/mixture.py): a list of dicts
  # {name, weight, [corpus, format, text_field, source_field, target_field]} (missing keys take
  # the data.* values above), e.g. ({"name": "code", "corpus": "stdlib", "weight": 3},
  # {"name": "wiki", "corpus": "wiki/*.jsonl", "format": "jsonl", "weight": 1}). Packed rows
  # are drawn from the sources in proportion p_i ∝ weight_i^(1/mixture_temperature).
  d.mixture = ()
  d.mixture_temperature = 1.0
  d.validation_fraction = 0.02  # documents held out for eval, chosen by a hash of their id
  # a SentencePiece .model, or a Hugging Face tokenizer.json (or its folder); the tokenizer
  # command makes either (DIR/tokenizer.json: a byte-level BPE)
  d.tokenizer = "runs/tokenizers/stdlib_8192.model"
  d.seq_len = 256  # tokens per packed row
  d.add_bos = True
  d.add_eos = True
  # Tokenize the documents once, when the TFDS dataset is prepared (tokenized_corpus/, keyed by
  # the tokenizer file's SHA-256 and add_bos/add_eos), instead of in the input pipeline: the same
  # batches, several times faster. Pairs (seq2seq) are always tokenized in the pipeline.
  d.pretokenize = True
  # Rows: first_fit (chunks of seq_len, shuffled, first-fit packed; little padding) | concat
  # (clm only: the shuffled documents concatenated and cut into full rows of seq_len, a document
  # continuing as a new segment in the next row; no padding, the fastest; data/packing.py)
  d.packing = "first_fit"
  # grain worker processes (0 = in the training process). With 2 or more, each worker packs its
  # own documents, so the batches depend on the count; a run resumes only with the count its
  # checkpoint was saved with.
  d.num_workers = 0
  # Logical data shards: shard k reads every S-th document and fills rows k*B/S..(k+1)*B/S of
  # every batch. 0 = one per process. A fixed S (a multiple of every process count you will use)
  # makes the data order independent of the process count, so a run can resume on more or fewer
  # hosts; resuming with a different S is refused.
  d.shards = 0
  # Pretraining objective (data/objectives/), applied to each document chunk before packing
  # (clm: to each packed row). clm: causal LM (decoder) | prefix_lm: a decoder's prefix LM
  # (a random prefix of each chunk attended bidirectionally) | mlm: BERT masked LM (encoder-only) |
  # span: T5 span corruption | denoise: BART text infilling + sentence permutation | ul2: UL2's
  # mixture of R/S/X denoisers | seq2seq: (source, target) pairs of a pair format or a TFDS
  # dataset (span, denoise, ul2, seq2seq: encoder-decoder). mlm/denoise need [MASK],
  # span/ul2 sentinels and ul2 the mode tokens: make the tokenizer with
  # `python -m transformer_jax.tokenizer ... --special=mask,sentinels:100,ul2`.
  d.objective = "clm"
  d.target_len = 0  # decoder tokens per packed row (encoder-decoder); 0 = automatic (objectives/)
  d.mlm_rate = 0.15  # mlm: fraction of ordinary tokens predicted (80% [MASK], 10% random, 10% kept)
  # mlm: "" | nsp (BERT's next-sentence prediction: B is another chunk's half) | sop (ALBERT's
  # sentence order: A and B swapped); trains the model's sentence head (model.sentence_head)
  d.sentence_pair = ""
  d.noise_density = 0.15  # span and UL2's R: fraction of tokens in noise spans
  d.mean_span_length = 3.0  # span and UL2's R: mean noise span length
  d.denoise_rate = 0.3  # denoise: fraction of tokens masked by Poisson-length spans
  d.poisson_lambda = 3.0  # denoise: mean span length (0-length spans insert a [MASK])
  d.sentence_permutation = True  # denoise: shuffle sentences/lines first (objectives/vocab.py)
  # denoise: BART's token noising, of data.denoise_rate of the tokens: infill (text infilling,
  # Poisson spans -> one [MASK] each) | mask (token masking) | delete (token deletion); and
  # document rotation (the chunk rotated to start at a random token) before it.
  d.denoise_noise = "infill"
  d.document_rotation = False
  d.ul2_mix = (0.5, 0.25, 0.25)  # ul2: probabilities of the R, S (prefix LM), X denoisers
  d.ul2_x = (32.0, 0.5)  # ul2: X's (mean span length, noise density)

  return d


def _train():
  # ----------------------------------------------------------------------------------- train
  t = ml_collections.ConfigDict()
  t.batch_size = 32  # global rows per optimizer step (all hosts together)
  t.microbatches = 1  # gradient accumulation: batch_size is split into this many microbatches
  # (and evaluation's batches too); 0 = the fewest whose train step fits the device's memory
  # (training/fit.py: an accelerator's allocator limit; 1 on a CPU)
  t.steps = 1000
  t.log_every = 10  # a metrics line every this many steps, and at every checkpoint
  t.process_log = False  # every process also prints a heartbeat line (its tokens/s) at each log
  t.z_loss = 0.0  # coefficient of log(Z)^2, stabilises the softmax normaliser
  t.label_smoothing = 0.0  # e: targets are (1 - e) one-hot + e uniform (the Transformer: 0.1)
  # Chunked cross-entropy: > 0 forms the [tokens, vocab] logits this many tokens (of the
  # microbatch's B*T) at a time, recomputed in the backward pass, so they never exist at full size
  # (large vocabularies); the same loss and gradients. 0 = off (one [B, T, V] logits array).
  t.loss_chunk = 0
  t.sample_prompt = ""  # if set, print a sample from the model at the end of training
  t.sample_tokens = 64
  # Each layer's output RMS and max |x| as metrics (act_rms/layer_I, act_max/layer_I) in
  # metrics.jsonl and TensorBoard, so a loss spike can be traced to a layer (models/stack.py).
  t.log_activations = False
  # Anomalies (non-finite loss or gradients, or a loss spike) are caught inside the jitted step,
  # whose update is then not applied; the policy says what the loop does next.
  t.on_anomaly = "skip"  # skip (go on with the next batch) | rollback | abort
  t.spike_factor = 0.0  # > 0: loss > spike_factor * (running mean of loss) is a spike; 0 = off
  t.spike_warmup_steps = 100  # no spike checks before this step (the running mean settles)
  # This many refused updates in a row stop the run (AnomalyError) under skip and rollback too:
  # a diverged run refuses every update. 0 = no limit.
  t.max_anomalies_in_a_row = 10
  # XLA:CPU on x86-64: the steps' dots run as oneDNN matmuls (perf/compiler.py; a bench_cpu step
  # 1.09x faster), but such a step cannot be kept in the persistent compilation cache: every
  # start compiles it again (a long CPU run's choice). False = XLA's own dots (YNNPACK / Eigen).
  t.cpu_onednn = False
  # Knowledge distillation (training/distill.py): teacher = a training workdir of ours or a
  # Hugging Face directory with the student's family and tokenizer ("" = none). The objective is
  # alpha * the usual cross-entropy + (1 - alpha) * temperature^2 * KL(teacher || student) of
  # the temperature-softened logits (+ train.z_loss's term and a sentence-pair head's loss at
  # their full weight); the teacher is frozen and not checkpointed. hidden_weight > 0
  # adds TinyBERT's hidden-state matching through a learned projection (hidden_layers: pairs
  # (student layer, teacher layer); () = the uniform map).
  t.distill = ml_collections.ConfigDict({"teacher": "", "alpha": 0.5, "temperature": 2.0,
                                         "hidden_weight": 0.0, "hidden_layers": ()})

  return t


def _optimizer():
  # ------------------------------------------------------------------------------- optimizer
  o = ml_collections.ConfigDict()
  o.learning_rate = 3e-4  # peak
  o.schedule = "cosine"  # cosine | linear | rsqrt | wsd | constant (all after linear warmup)
  o.warmup_steps = 100
  o.decay_steps = 0  # 0 = train.steps
  o.min_lr_ratio = 0.1  # final lr = min_lr_ratio * learning_rate (cosine, linear, wsd)
  o.wsd_decay_fraction = 0.2  # wsd: fraction of steps spent in the final decay
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.decay_embeddings = False  # biases and norm scales are never decayed; embeddings optional
  o.grad_clip = 1.0  # global-norm clipping; 0 = off

  return o


def _checkpoint():
  # ------------------------------------------------------------------------------ checkpoint
  k = ml_collections.ConfigDict()
  k.every_steps = 500
  k.keep = 3  # keep the last N checkpoints ...
  k.keep_period = 0  # ... and every checkpoint whose step is a multiple of this (0 = none)
  k.async_save = True
  # When WORKDIR's checkpoints were written for another model or tokenizer (config.json differs in
  # model.* or data.tokenizer): refuse (name the keys) | fresh (set them aside, start over) |
  # params (start over from their parameters; same shapes needed: a saved BERT sentence head
  # the new model has none of is left behind; any other parameter it lacks is refused).
  k.on_mismatch = "refuse"

  return k


def _eval():
  # ------------------------------------------------------------------------------------ eval
  e = ml_collections.ConfigDict()
  e.every_steps = 500  # 0 = only at the end
  e.batches = 8  # held-out batches per evaluation (the same ones every time)
  # Downstream tasks scored at each evaluation (metrics.jsonl gets eval_TASK_METRIC): SPEC strings
  # as `python -m transformer_jax.evaluate --tasks` takes them (PATH.jsonl or KIND:PATH).
  e.tasks = ()

  return e


def _mesh():
  # ------------------------------------------------------------------------------------ mesh
  # Device mesh; -1 fills with the remaining devices. The product must equal the device count.
  # Multi-slice (several TPU slices joined by the data-center network, DCN): data/fsdp/tensor are
  # the sizes within one slice (ICI) and dcn_* the number of slices each axis spans; each mesh
  # axis is then ici * dcn long and slices * devices per slice = the device count. Data
  # parallelism across slices (dcn_data) needs the least DCN traffic: one gradient all-reduce.
  x = ml_collections.ConfigDict()
  x.data = -1
  x.fsdp = 1
  x.tensor = 1
  # Context (sequence) parallelism: every row's tokens split over this many devices; attention
  # runs as ring attention (models/ring.py), everything else is per token. seq_len must be a
  # multiple of 2 * sequence (causal rows are split into 2 * sequence chunks, balanced).
  x.sequence = 1
  # Expert parallelism: an MoE layer's experts split over this many devices (num_experts must be
  # a multiple); everywhere else it is one more data-parallel axis (the rows are split over it).
  x.expert = 1
  x.dcn_data = 1
  x.dcn_fsdp = 1
  x.dcn_expert = 1
  x.dcn_sequence = 1
  x.dcn_tensor = 1
  # CPU only: split the host's cores into this many XLA devices (0 = XLA's default, one). The
  # train step then runs data-parallel across them; see benchmarks/RESULTS.md for when it pays.
  x.cpu_devices = 0
  # A TPU torus: jax.make_mesh gives each mesh axis whole torus dimensions (4x4x4: sizes 4, 16,
  # 64 ...), so data 8 x fsdp 8 does not fit it; true lets an axis span parts of several
  # dimensions (mesh_utils' allow_split_physical_axes): it runs, its collectives on a sub-torus.
  x.allow_split_physical_axes = False
  return x


def cpu_sized(c, steps: int = 300, warmup_steps: int = 20):
  """A recipe's `tiny` run on a CPU: few steps, short warm-up, checkpoint and evaluate thrice."""
  c.optimizer.warmup_steps = warmup_steps
  c.train.steps = steps
  c.checkpoint.every_steps = steps // 3
  c.eval.update(every_steps=steps // 3, batches=4)
  return c
