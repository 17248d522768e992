"""A checkpoint's size and what resuming from it takes on the host, for `grpo-image plan`.

Every process writes and reads its own shard through torch.distributed.checkpoint
(grpo_image/training/checkpoint.py), so a resume never gathers the whole checkpoint on one host: a process reads its
FSDP share and the tensors it holds whole, one saved tensor at a time.
"""

from __future__ import annotations

from grpo_image.planning.memory_plan import Setup
from grpo_image.planning.model_sizes import PolicyShape


def resume_rows(p: PolicyShape, s: Setup, decoder_adapters: int = 0) -> list[tuple[str, float, str]]:
    """A checkpoint on disk and what resuming from it takes on the host (not the GPU), per process and per node.

    Each process writes and reads its own shard (torch.distributed.checkpoint, see grpo_image/training/checkpoint.py):
    full fine-tuning saves the weights (fp32 what trains, the policy's dtype what is frozen) and AdamW's two fp32
    moments, and a process reads its FSDP share of the decoder layers and every tensor it holds whole; a LoRA
    checkpoint is the fp32 adapter and its moments, which every process reads. A process holds one saved tensor at a
    time in host memory on its way to the GPU: the largest weight, in fp32, at most.

    Decoder GRPO (train.target decoder or both) adds the decoder's `decoder/` folder, written once by rank 0 and read
    whole by every process (grpo_image/training/decoder_grpo.py): the adapters (adapter_model.safetensors) and
    AdamW's state (optimizer.pt), fp32 x 3 of the adapters' parameters. On the host at once: the adapter file read
    whole beside the host copy of the adapters it is checked against (fp32 x 2); the optimizer's tensors go to the
    device one saved storage at a time.
    """
    w = s.processes if s.fsdp else 1
    if s.mode == "lora":
        on_disk = 12 * p.lora_params  # the fp32 adapter and its two fp32 moments
        per_process = on_disk  # every process holds them all
        largest = 4 * p.lora_params  # the adapter file is read whole
    else:
        frozen, frozen_sharded = p.params - p.trainable_params, p.sharded_params - p.trainable_sharded
        on_disk = 12 * p.trainable_params + p.dtype_bytes * frozen
        per_process = 12 * (p.trainable_sharded / w + p.trainable_params - p.trainable_sharded)
        per_process += p.dtype_bytes * (frozen_sharded / w + frozen - frozen_sharded)
        largest = 4 * p.largest_tensor_params
    share = "its FSDP share of the layers and every whole tensor" if s.fsdp else "all of it"
    decoder = 12 * decoder_adapters  # the decoder's fp32 adapters and their two fp32 moments
    largest = max(largest, 8 * decoder_adapters)
    rows = [("checkpoint on disk: weights and AdamW state, all processes", on_disk + decoder,
             "each process writes its own shard" if s.mode == "full" else "the adapter, written once")]
    if decoder:
        rows.append(("  of which the decoder's adapters and AdamW state (fp32 x 3)", decoder,
                     "decoder/: adapter_model.safetensors, optimizer.pt; written once"))
    return rows + [("read by each process on resume", per_process + decoder,
                    share + (", and the decoder's adapters and AdamW state" if decoder else "")),
                   ("host memory per process on resume", largest, "one saved tensor at a time, the largest"
                    + (" (the decoder's adapter file: read whole, beside their host copy)" if 8 * decoder_adapters
                       == largest and decoder else "")),
                   (f"host memory per node on resume ({s.processes} process{'es' if s.processes > 1 else ''})",
                    s.processes * largest, "")]  # fmt: skip
