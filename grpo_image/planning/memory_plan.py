"""A memory plan per GPU, computed from the recipe and its models' configs before anything is downloaded or run.

It answers "does this recipe fit the GPUs it names, and if not, which keys to change" from what the code holds at
each moment of a step, term by term (grpo_image.planning.model_sizes and decoder_sizes read the counts; no weight is loaded):

- resident all run long (grpo_image.planning.resident_memory): the weights (LoRA: the base in the policy's dtype,
  frozen; full: fp32, the master weights), fp32 master copies of what trains (LoRA's adapters), fp32 gradients (kept
  from one update to the next), AdamW's two fp32 moments, and for full fine-tuning with a KL term a frozen reference
  copy (trained Linear weights in the compute dtype, the other trained weights in fp32, frozen weights shared with
  the policy: see grpo_image.training.weights). FSDP splits what lies in the decoder layers over the W processes (the
  reference's layers in the compute dtype); embeddings, norms and heads stay whole. `Plan.held` gives these terms by
  name: what a process holds between phases, checked against the resident bytes of two gloo ranks after every phase;
- start-up, before the first step (no gradients nor AdamW moments yet): the weights and the reference, and under
  FSDP the last layer in flight: whole in fp32 on the device, with its reference copy, while both are sharded (the
  whole model never reaches the device); checked against the allocations of building them on the CPU;
- rollouts, `sampling.batch_size` rows per sampler call: a static KV cache of rows x (P + L - 1) tokens, every
  layer, K and V (under autocast K is fp32, RoPE's output, and V bf16), the prefill's intermediates over the prompt
  (its attention sees the prompt alone; LoRA's adapters run in fp32), a compiled decode step's K and V repeated over
  the cache, and a few [rows, V] fp32 temporaries of the image head; FSDP holds every layer gathered in the compute
  dtype for the rollout; full fine-tuning holds bf16 casts of the layers' weights during any forward (autocast
  caches them);
- reference log-probs (beta > 0), a micro-batch per no-grad teacher-forced pass: one layer's intermediates at a
  time, the final hidden states, and the image head over `train.logprob_chunk` positions;
- the update, `train.micro_batch_size` rows per forward/backward: what each decoder layer keeps for backward (below),
  or with gradient checkpointing only each layer's input plus one layer recomputed, and the image head's chunk
  recomputed in backward.
- decoder GRPO (train.target decoder or both): the decoder, its adapters and their optimizer, the decodes' window
  latents, a decoder batch's decode and its forward and backward (grpo_image.planning.decoder_training).

What a Qwen2 / LLaMA decoder layer keeps for backward, per token (H hidden, I intermediate, nh heads of width d,
T tokens, b bytes of the compute dtype); each term was checked against the tensors autograd saves on the CPU:
- each RMSNorm: its fp32 input (4H), and its normalised output when its weight trains (4H);
- SDPA: the query and, padded rows making transformers repeat the KV heads, nh-wide keys and values, its output
  (4 x b x nh x d), the log-sum-exp (4 x nh); the additive mask made from the padding mask (b x T);
- the gated MLP: gate and up projections and SiLU's output (3 x b x I);
- trained Linears keep their input: the normed states for q/k/v and gate/up, the gated product for down (autocast
  casts the input once per Linear); LoRA keeps each adapter's input in fp32 (peft casts it) and the rank-r output.
GLM-4's layer (GLM-Image) differs in two ways, both read from the model: a fused gate_up projection (one Linear of
2I outputs reading the normed states: one cast fewer under autocast, a [T, 2I] gradient and no-grad temporary), and
two more RMSNorms, on the attention's and the MLP's outputs before each residual add: each keeps the fp32 copy of
its low-precision input (4H) and, when its weight trains, its normalised output in the input's dtype (b x H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from grpo_image.base.config import reward_specs
from grpo_image.planning.decoder_sizes import DecoderShape, decoder_shape, reward_parts
from grpo_image.planning.decoder_training import DecoderTraining, add_decoder_training, decode_bytes
from grpo_image.planning.model_sizes import PolicyShape, policy_shape
from grpo_image.planning.resident_memory import held_terms, resident_rows, startup_bytes

GIB = 2**30
USABLE = 0.9  # of a GPU's memory: the rest is the CUDA context, library workspaces and allocator fragmentation
SAMPLER_TEMPORARIES = 8  # [rows, V] fp32 tensors alive in one sampling step (logits, mixture, filters, log-softmax)
# bytes per logit of the image head per chunk, forward only / recomputed in backward: fp32 logits (the head runs in fp32
# whatever the policy's dtype, `fp32_head`), the fp32 log-softmax, and in backward their gradients
HEAD_NOGRAD, HEAD_GRAD = 8, 12


@dataclass(frozen=True)
class Setup:
    """The recipe's numbers the plan depends on, for W training processes."""

    processes: int
    stated: bool  # whether the number of processes was given (hardware.gpus or --gpus) rather than assumed
    gpu_gib: float
    mode: str  # lora / full
    fsdp: bool
    beta: float
    tis: bool  # truncated importance sampling: a no-grad pass of the policy itself, the reference pass's size
    cfg_rows: int  # rows per sample: 2 under classifier-free guidance
    mix_rows: int  # rows per sample in the teacher-forced passes: 2 when they use the guided mixture
    rollouts: int  # per process and step
    minibatch: int  # rows per optimizer step per process
    sampler_rows: int  # rows per sampler call
    micro: int  # rows per forward/backward
    checkpointing: bool
    chunk: int  # image positions per chunk of the image head
    stage_adapters: int | None = 0  # LoRA: the earlier stages' frozen adapter parameters (None: not saved yet)
    compiled: bool = False  # sampling.compile: the decode step compiled


@dataclass
class Plan:
    recipe: str
    setup: Setup
    policy: PolicyShape
    rows: list[tuple[str, float, str]]  # (what, bytes, note) per training GPU
    resident: float  # bytes a training process holds all run long
    held: dict[str, float]  # the resident terms by name: weights, reference, gradients, optimizer
    phases: dict[str, float]  # phase -> peak bytes per training GPU (start-up, rollout, reference, update, decode)
    largest_sampler_rows: int
    largest_micro: dict[bool, int]  # checkpointing off / on -> largest micro-batch that fits
    decoder: DecoderShape
    worker_rows: list[tuple[str, float, str]] = field(default_factory=list)
    worker_budget: float | None = None  # bytes per reward actor (None: actors on CPUs)
    largest_decode: int = 0
    unknown_rewards: list[str] = field(default_factory=list)
    decoder_train: DecoderTraining | None = None  # decoder GRPO's terms (train.target decoder or both)

    @property
    def usable(self) -> float:
        return USABLE * self.setup.gpu_gib * GIB

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def worker_peak(self) -> float:
        return sum(b for _, b, _ in self.worker_rows)

    @property
    def fits(self) -> bool:
        actors = self.worker_budget is None or self.worker_peak <= USABLE * self.worker_budget
        return self.peak <= self.usable and actors


def setup_of(cfg: DictConfig, gpus: int | None = None, gpu_memory_gb: float | None = None) -> Setup:
    stated = gpus is not None or cfg.hardware.gpus > 0
    processes = max(1, gpus if gpus is not None else cfg.hardware.gpus)
    uses_cfg = cfg.sampling.cfg_scale != 1.0
    cfg_rows = 2 if uses_cfg else 1
    rollouts = math.ceil(cfg.data.batch_size * cfg.data.group_size / processes)
    minibatch = math.ceil(rollouts / cfg.train.minibatches)
    sampler_rows = cfg.sampling.batch_size or rollouts * cfg_rows
    memory = gpu_memory_gb if gpu_memory_gb is not None else cfg.hardware.gpu_memory_gb
    return Setup(
        processes=processes, stated=stated, gpu_gib=float(memory), mode=cfg.train.mode,
        fsdp=bool(cfg.train.fsdp) and processes > 1, beta=float(cfg.train.beta), tis=cfg.train.tis_cap > 0,
        cfg_rows=cfg_rows,
        mix_rows=2 if uses_cfg and cfg.sampling.cfg_logprobs == "mixture" else 1, rollouts=rollouts,
        minibatch=minibatch, sampler_rows=min(sampler_rows, rollouts * cfg_rows),
        micro=min(cfg.train.micro_batch_size or minibatch, minibatch),
        checkpointing=bool(cfg.train.gradient_checkpointing), chunk=int(cfg.train.logprob_chunk),
        stage_adapters=stage_adapter_params(cfg.train.init_from) if cfg.train.mode == "lora" else 0,
        compiled=bool(cfg.sampling.compile),
    )  # fmt: skip


def stage_adapter_params(init_from: str | None) -> int | None:
    """The parameters of the adapters a LoRA run attaches frozen for its earlier stages (training/saved_weights.py),
    from their files' headers; None when `init_from` names a checkpoint not written yet."""
    if not init_from:
        return 0
    from grpo_image.training.checkpoint import SIZES_ONLY, CheckpointError
    from grpo_image.training.checkpoint_fit import saved_kind, saved_shapes
    from grpo_image.training.saved_weights import stage_folders

    try:
        folders = stage_folders(init_from, hashed=SIZES_ONLY)  # a plan reads headers, never hashes weights
    except CheckpointError:
        return None
    return sum(math.prod(shape) for folder in folders if saved_kind(folder) == "lora"
               for shape in saved_shapes(folder).values())


def kv_bytes_per_token(p: PolicyShape, mode: str) -> int:
    """K and V of every layer for one token: [kv_heads, head_dim] each; fp32 keys under autocast (full, bf16)."""
    b = p.dtype_bytes
    key = 4 if mode == "full" else b
    return p.layers * p.kv_heads * p.head_dim * (key + b)


def _autocast(p: PolicyShape, mode: str) -> bool:
    """Full fine-tuning of a low-precision policy keeps fp32 weights and computes under bf16 autocast."""
    return mode == "full" and p.dtype_bytes < 4


def layer_bytes_per_token(p: PolicyShape, mode: str, tokens_per_row: int) -> int:
    """What one decoder layer keeps for backward per token (see the module docstring for each term)."""
    b, h, i, width = p.dtype_bytes, p.hidden, p.intermediate, p.heads * p.head_dim
    full, autocast = mode == "full", _autocast(p, mode)
    norms = 2 * (4 * h + (4 * h if full else 0)) + p.post_norms * (4 * h + (b * h if full else 0))
    attention = 4 * b * width + 4 * p.heads + b * tokens_per_row
    mlp = 3 * b * i
    if full:
        inputs = b * ((p.norm_readers * h if autocast else 2 * h) + i)
    else:
        cast = b < 4  # adapters in fp32 over a low-precision base: each adapter casts its own input
        groups = {} if cast else {g: w for g, w in p.lora_inputs if g != "attn_out"}  # attn_out: SDPA's output
        inputs = 4 * (sum(w for _, w in p.lora_inputs) if cast else sum(groups.values()))
        inputs += 4 * p.lora_rank * len(p.lora_inputs)
    return norms + attention + mlp + inputs + 4 * (2 + p.post_norms)  # + each norm's fp32 rsqrt


def activation_bytes(
    p: PolicyShape, mode: str, rows: int, tokens_per_row: int, checkpointing: bool
) -> tuple[float, float]:
    """A micro-batch's forward/backward of `rows` LM rows (CFG rows counted): (kept across layers, working set).

    Without checkpointing every layer keeps what its backward needs; with it each layer keeps only its input (in
    the residual dtype: fp32 under autocast) and one layer at a time is recomputed in the backward pass. The working
    set of the backward: that recomputed layer, the final norm(s) and hidden states, the boolean [rows, T, T] mask,
    the gradients flowing between layers and inside the layer being differentiated, Janus's code aligner.
    """
    tokens = rows * tokens_per_row
    b, full = p.dtype_bytes, mode == "full"
    residual = 4 if _autocast(p, mode) else b
    layer = layer_bytes_per_token(p, mode, tokens_per_row) * tokens
    kept = p.layers * (residual * p.hidden * tokens if checkpointing else layer)
    in_backward = p.mlp_up_width * (b + (4 if not full and b < 4 else 0))  # + fp32 adapter gradients
    outside = p.final_norms * (8 if full else 4) * p.hidden + 3 * residual * p.hidden + in_backward
    if p.embeds_codes:
        outside += 4 * b * p.hidden
    return kept, (layer if checkpointing else 0) + outside * tokens + rows * tokens_per_row**2


def nograd_bytes(p: PolicyShape, mode: str, rows: int, tokens_per_row: int) -> float:
    """A forward without grad (reference log-probs, a sampler's prefix): one layer's intermediates at a time.

    Alive at once inside a layer: its input, the residual and the normed states (in the residual dtype: fp32 under
    autocast) with RMSNorm's fp32 copy of a low-precision input, then either the attention's (K and V repeated to
    every head, in the residual dtype under autocast since RoPE's output is, the query, the output, SDPA's casts)
    or the MLP's (SiLU's output, up, their product; GLM-4's fused gate_up keeps the gate half alive too); after the
    last layer, the final hidden states.
    """
    tokens = rows * tokens_per_row
    b = p.dtype_bytes
    r = 4 if _autocast(p, mode) else b
    attention = 3 * r * p.hidden + (2 * r + 4 * b) * p.heads * p.head_dim
    mlp = 2 * r * p.hidden + b * (p.mlp_up_width + 2 * p.intermediate)
    norm_copy = 4 * p.hidden if r < 4 else 0
    return (norm_copy + max(attention, mlp) + 2 * r * p.hidden) * tokens + rows * tokens_per_row**2 * (1 + b)


def head_rows_copy(p: PolicyShape, mode: str) -> int:
    """The fp32 copy of the head's code rows that each image-head call makes when they are in low precision (a LoRA
    base in bf16, and its reference; full fine-tuning's rows are fp32 master weights, used as they are): V x H x 4
    bytes, plus Janus's H x H projection before them. Alive during the call, and through a chunk's backward, which
    keeps it for the hidden states' gradient."""
    if mode == "full" or p.dtype_bytes == 4:
        return 0
    return 4 * p.codes * p.hidden + (4 * p.hidden**2 if p.embeds_codes else 0)


def head_bytes(p: PolicyShape, mode: str, rows: int, chunk: int, grad: bool) -> float:
    """The image head over one chunk of positions: [rows, chunk, V] fp32 logits, their fp32 log-softmax (and
    gradients), and the fp32 copy of low-precision head rows."""
    return rows * min(chunk, p.positions) * p.codes * (HEAD_GRAD if grad else HEAD_NOGRAD) + head_rows_copy(p, mode)


def sampler_bytes(p: PolicyShape, mode: str, rows: int, compiled: bool = False) -> tuple[float, float]:
    """(KV cache, everything else) of one sampler call of `rows` rows.

    Besides the image head's temporaries at each step (while the head runs, its fp32 logits and the fp32 copy of
    low-precision head rows; then the sampling step's [rows, V] tensors), the prefill: a no-grad forward over the
    prompt alone (its attention sees the cache's view of the prompt, grpo_image.policies.kv_cache), with LoRA's
    adapters active: peft runs an adapter in fp32, so the widest adapted Linear adds its fp32 input and two fp32
    outputs (the scaled adapter output and its sum with the base output) at once. An eager decode step folds the
    query heads onto the KV heads; a compiled one repeats K and V over its view (at most the whole cache) to every
    query head, one layer at a time, with a [rows, 1, 1, view] mask.
    """
    cache_tokens = p.prompt_tokens + p.positions - 1
    kv = rows * cache_tokens * kv_bytes_per_token(p, mode)
    adapters = 0.0
    if mode == "lora" and p.lora_inputs:
        widest_out = max(p.mlp_up_width, p.hidden, p.heads * p.head_dim)
        adapters = rows * p.prompt_tokens * (4 * max(w for _, w in p.lora_inputs) + 8 * widest_out)
    prefix = nograd_bytes(p, mode, rows, p.prompt_tokens) + adapters
    repeated = 2 * rows * p.heads * cache_tokens * p.head_dim * p.dtype_bytes if p.kv_heads < p.heads else 0
    step = repeated + rows * cache_tokens * (1 + p.dtype_bytes) if compiled else 0
    head = max(SAMPLER_TEMPORARIES * 4 * rows * p.codes, head_rows_copy(p, mode) + 4 * rows * p.codes)
    return kv, head + max(prefix, step)


def weight_casts(p: PolicyShape, s: Setup) -> tuple[float, float]:
    """Low-precision copies of fp32 weights that full fine-tuning's forwards hold: (all layers, one layer).

    Under autocast every Linear weight of the decoder layers is cast to bf16 once per forward and cached until the
    forward ends (a rollout is one long forward; a checkpointed layer recomputes only its own). FSDP gathers every
    layer in the compute dtype for a rollout, and in training one layer (and the next, prefetched) with one layer's
    unsharded fp32 gradients in flight.
    """
    if s.mode != "full":
        return 0.0, 0.0
    if s.fsdp:
        b = p.dtype_bytes
        return b * p.sharded_params, (2 * b + 4) * p.largest_layer_params
    if p.dtype_bytes == 4:
        return 0.0, 0.0
    return 2.0 * p.cast_params, 2.0 * p.cast_params / p.layers


def rollout_bytes(p: PolicyShape, s: Setup, rows: int) -> float:
    """A sampler call of `rows` rows, above what the process holds anyway."""
    return weight_casts(p, s)[0] + sum(sampler_bytes(p, s.mode, rows, s.compiled))


def reference_bytes(p: PolicyShape, s: Setup, micro: int) -> float:
    """The reference log-probs of a micro-batch (no grad; the frozen copy's casts are not cached)."""
    r = micro * s.mix_rows
    gathered = weight_casts(p, s)[1] if s.fsdp else 0.0
    tokens = p.prompt_tokens + p.positions - 1
    return gathered + nograd_bytes(p, s.mode, r, tokens) + head_bytes(p, s.mode, r, s.chunk, grad=False)


def update_bytes(p: PolicyShape, s: Setup, micro: int, checkpointing: bool) -> float:
    """A micro-batch's forward and backward, above what the process holds anyway.

    With checkpointing the forward's moment (every layer's casts, the head's chunk without grad) and the backward's
    (one recomputed layer with its casts, the head's chunk recomputed) are not at once.
    """
    r = micro * s.mix_rows
    kept, working = activation_bytes(p, s.mode, r, p.prompt_tokens + p.positions - 1, checkpointing)
    every, one = weight_casts(p, s)
    every = one if s.fsdp else every  # FSDP gathers layer by layer in training
    head = head_bytes(p, s.mode, r, s.chunk, grad=True)
    if not checkpointing:
        return every + kept + working + head
    return kept + max(every + head_bytes(p, s.mode, r, s.chunk, grad=False), working + head + one)


def plan_recipe(
    cfg: DictConfig, recipe: str = "", gpus: int | None = None, gpu_memory_gb: float | None = None
) -> Plan:
    """The plan of a loaded recipe for `gpus` training processes of `gpu_memory_gb` each (default: `hardware`)."""
    from grpo_image.training.data import load_prompts

    s = setup_of(cfg, gpus, gpu_memory_gb)
    prompts = [r.prompt for r in load_prompts(cfg.data.prompts)] if cfg.data.prompts else []
    p = policy_shape(cfg.policy, cfg.train.lora, prompts)
    rows, resident = resident_rows(p, s)
    held = held_terms(p, s)
    startup = startup_bytes(p, s, held)
    every, _ = weight_casts(p, s)
    if every:
        what = "every layer gathered in bf16 (FSDP)" if s.fsdp else "bf16 casts of the layers' weights (autocast)"
        rows.append((f"{what}, during a rollout", every, "one layer at a time in training"))
    kv, sampler_rest = sampler_bytes(p, s.mode, s.sampler_rows, s.compiled)
    rows += [(f"KV cache per sampler call ({s.sampler_rows} rows x {p.prompt_tokens + p.positions - 1:,} tokens)", kv,
              f"{kv_bytes_per_token(p, s.mode) / 1024:.1f} KiB per token"),
             ("sampler temporaries (image head, prefix)", sampler_rest, "")]  # fmt: skip
    phases = {"start-up": startup, "rollout": resident + rollout_bytes(p, s, s.sampler_rows)}
    if s.beta > 0 or s.tis:  # the policy's own no-grad pass (train.tis_cap) is the reference pass's size
        phases["reference"] = resident + reference_bytes(p, s, s.micro)
        what = " and ".join(name for name, on in (("reference", s.beta > 0), ("old", s.tis)) if on)
        rows.append((f"{what} log-probs ({s.micro * s.mix_rows} rows, no grad)", phases["reference"] - resident,
                     "a micro-batch at a time"))  # fmt: skip
    r, tokens = s.micro * s.mix_rows, p.prompt_tokens + p.positions - 1
    for checkpointing in (False, True):
        act = sum(activation_bytes(p, s.mode, r, tokens, checkpointing))
        label = f"activations per micro-batch of {r} rows, {'with' if checkpointing else 'without'} checkpointing"
        rows.append((label, act, "<- the recipe" if checkpointing == s.checkpointing else ""))
    rows.append((f"image head, chunk of {min(s.chunk, p.positions)} positions (backward)",
                 head_bytes(p, s.mode, r, s.chunk, grad=True), ""))  # fmt: skip
    phases["update"] = resident + update_bytes(p, s, s.micro, s.checkpointing)
    usable = USABLE * s.gpu_gib * GIB
    step = s.cfg_rows
    largest_sampler = step * _largest(lambda k: resident + rollout_bytes(p, s, k * step) <= usable, s.rollouts)
    def micro_fits(micro: int, checkpointing: bool) -> bool:
        reference = reference_bytes(p, s, micro) if s.beta > 0 or s.tis else 0.0
        return resident + max(update_bytes(p, s, micro, checkpointing), reference) <= usable

    largest_micro = {c: _largest(lambda m, c=c: micro_fits(m, c), s.minibatch) for c in (False, True)}
    plan = Plan(recipe, s, p, rows, resident, held, phases, largest_sampler, largest_micro,
                decoder_shape(cfg.decoder, p.grid, prompts,
                              OmegaConf.select(cfg, "decoder_train.lora.target_regex", default=None)))
    if cfg.train.target != "policy":
        add_decoder_training(plan, cfg)
    _workers(plan, cfg)
    return plan


def _largest(fits, limit: int) -> int:
    """The largest k in 1..limit with fits(k) (fits is monotone), or 0 when even 1 does not fit."""
    lo, hi = 0, max(limit, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _workers(plan: Plan, cfg: DictConfig) -> None:
    """Each reward actor's GPU: the decoder (unless the trainer decodes: decoder GRPO), the reward models, one decoder
    call."""
    d, s = plan.decoder, plan.setup
    parts, plan.unknown_rewards = reward_parts(reward_specs(cfg))
    chunks = cfg.workers.chunks or cfg.workers.num_workers if cfg.workers.backend == "ray" else 1
    chunk = max(1, math.ceil(s.rollouts / max(1, chunks)))
    images = min(d.max_batch_size or chunk, chunk)
    decodes = plan.decoder_train is None  # decoder GRPO: the workers get images and build no decoder
    held = [(part.name, float(part.bytes), "") for part in (*(d.parts if decodes else ()), *parts)]
    how = "max_batch_size" if d.max_batch_size else "max_batch_size unset: a whole chunk"
    call = [(f"{d.name}: one call of {images} images", decode_bytes(d, images), how)] if decodes else []
    plan.worker_rows = held + call
    weights = sum(b for _, b, _ in held)
    if cfg.workers.backend == "ray" and cfg.workers.num_gpus > 0:
        plan.worker_budget = s.gpu_gib * GIB * cfg.workers.num_gpus
    elif cfg.workers.backend == "inprocess":  # the trainer's own GPU: the decoder stays, decoding is one more phase
        plan.phases = {k: v + (weights if k != "start-up" else 0) for k, v in plan.phases.items()}
        if decodes:
            plan.phases["decode"] = plan.resident + weights + plan.worker_rows[-1][1]
    budget = plan.worker_budget
    if budget is not None and decodes:
        plan.largest_decode = _largest(lambda m: weights + decode_bytes(d, m) <= USABLE * budget, chunk)
