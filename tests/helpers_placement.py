"""What the launch rehearsal records: the GPU each training rank would train on, and each reward worker's Ray GPUs.

Named by dotted path in the rehearsal's recipe overrides, like a user's own components; each writes one JSON file
into `record_dir`.
"""

import json
import os
from pathlib import Path

from grpo_image.policies.tiny import tiny_policy
from tests.helpers_rewards import MeanRed


def recording_tiny_policy(record_dir: str, **kwargs):
    """The tiny policy, after writing `rank_<RANK>.json`: the GPU this rank would train on. A training process takes
    cuda:LOCAL_RANK (grpo_image.training.distributed), which CUDA maps to the LOCAL_RANK-th entry of the process's
    CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    record = {"rank": int(os.environ.get("RANK", "0")), "gpu": visible[local_rank], "visible": visible}
    (Path(record_dir) / f"rank_{record['rank']}.json").write_text(json.dumps(record))
    return tiny_policy(**kwargs)


class RecordsWorkerGpus:
    """Scores the mean red channel; its constructor writes `worker_<pid>.json`: the GPUs Ray gave this worker
    (`ray.get_gpu_ids()`) and the CUDA_VISIBLE_DEVICES Ray set for it."""

    def __init__(self, record_dir: str):
        import ray

        record = {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
        (Path(record_dir) / f"worker_{os.getpid()}.json").write_text(json.dumps(record))

    def __call__(self, images, prompts, metadata):
        return MeanRed()(images, prompts, metadata)
