"""Small rewards used by the worker tests: named by dotted path in configs, like a user's own reward file."""

import numpy as np

from grpo_image.core.types import RewardOutput


class MeanRed:
    """Mean red channel in [0, 1]: an easy number to derive by hand from palette images."""

    def __call__(self, images, prompts, metadata):
        return RewardOutput(images[..., 0].mean(axis=(1, 2)) / 255.0)


class Broken:
    def __init__(self, message: str = "model server unreachable"):
        self.message = message

    def __call__(self, images, prompts, metadata):
        raise RuntimeError(self.message)


class WrongShape:
    def __call__(self, images, prompts, metadata):
        return RewardOutput(np.zeros(len(prompts) + 1))


class FailsOnPrompt:
    """Fails whenever the batch contains one given prompt, as a reward choking on one bad input would."""

    def __init__(self, prompt: str):
        self.prompt = prompt

    def __call__(self, images, prompts, metadata):
        if self.prompt in prompts:
            raise ValueError(f"cannot score {self.prompt!r}")
        return RewardOutput(np.ones(len(prompts)))


class CountsUnparsed:
    """Reports a diagnostic count through RewardOutput.info, like a judge whose replies did not parse."""

    def __call__(self, images, prompts, metadata):
        return RewardOutput(np.full(len(prompts), np.nan), info={"unparsed": float(len(prompts))})


class Sleepy:
    """Takes a fixed time, like a slow reward model, then scores the mean red channel."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, images, prompts, metadata):
        import time

        time.sleep(self.seconds)
        return MeanRed()(images, prompts, metadata)


class HangsOnce:
    """Hangs on its first call ever (a marker file records it across worker restarts), then scores normally."""

    def __init__(self, marker: str, hang_seconds: float = 20.0):
        self.marker, self.hang_seconds = marker, hang_seconds

    def __call__(self, images, prompts, metadata):
        import os
        import time

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(self.hang_seconds)
        return MeanRed()(images, prompts, metadata)


class FaultOnCall:
    """Scores the mean red channel, but on calls number `calls` (1-based) returns +inf or raises, as a flaky
    reward model or a lost server would. The in-process pool keeps one instance, so calls count steps."""

    def __init__(self, calls: list[int], fault: str = "inf"):
        self.calls, self.fault, self.count = set(calls), fault, 0

    def __call__(self, images, prompts, metadata):
        self.count += 1
        scores = MeanRed()(images, prompts, metadata).scores
        if self.count in self.calls:
            if self.fault == "raise":
                raise ConnectionError("reward server unreachable after 3 retries")
            scores = scores.copy()
            scores[1] = np.inf
        return RewardOutput(scores)


TINY_OPEN_CLIP = {  # an open_clip CLIP of HPSv2's layout (ViT + text tower) at toy size
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_hps(root, seed: int = 0):
    """A tiny open_clip config folder and an HPS-format checkpoint of a seeded model built from it, under `root`:
    (model_name for the HPSv2 reward, checkpoint path, the model)."""
    import json

    import open_clip
    import torch

    (root / "clip").mkdir(parents=True, exist_ok=True)
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    model_name = f"local-dir:{root / 'clip'}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name).eval()
    checkpoint = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return model_name, checkpoint, model


def first_to_build(marker: str) -> bool:
    """True in the first constructor ever to get here (it creates the marker file; every later one finds it)."""
    try:
        open(marker, "x").close()
    except FileExistsError:
        return False
    return True


class HangsWhileBuilding:
    """Scores the mean red channel; the first worker to build it hangs in its constructor for `seconds`, as a reward
    whose weights never finish loading; the others build at once."""

    def __init__(self, marker: str, seconds: float = 600.0):
        import time

        if first_to_build(marker):
            time.sleep(seconds)

    def __call__(self, images, prompts, metadata):
        return MeanRed()(images, prompts, metadata)


def palette_decoder_hanging_once(marker: str, patch_size: int, seconds: float = 600.0):
    """The palette decoder; the first worker to build it hangs for `seconds`, as a diffusion decoder stuck loading."""
    import time

    from grpo_image.decoders.palette import PaletteDecoder

    if first_to_build(marker):
        time.sleep(seconds)
    return PaletteDecoder(patch_size=patch_size)


class Unbuildable:
    """A reward whose constructor raises, as one pointed at a checkpoint that is not there would."""

    def __init__(self, checkpoint: str):
        raise FileNotFoundError(f"no reward checkpoint at {checkpoint}")

    def __call__(self, images, prompts, metadata):
        raise AssertionError("never built, never called")


class WaitsForTheTrainer:
    """Scores the mean red channel, slowly: its n-th call (the n-th step's chunk, with one worker and one chunk a
    step) says that it started (file `started_<n>` in `folder`), waits until the trainer has finished step n's
    reference pass (file `ref_done_<n>`; at most `patience` seconds, so that a trainer that does not overlap makes
    the test fail, not hang) and appends its span to `chunks.jsonl`, in time.monotonic (one clock for every
    process of a Linux machine)."""

    def __init__(self, folder: str, patience: float = 60.0):
        from pathlib import Path

        self.folder, self.patience, self.calls = Path(folder), patience, 0

    def __call__(self, images, prompts, metadata):
        import json
        import time

        self.calls += 1
        start = time.monotonic()
        (self.folder / f"started_{self.calls}").touch()
        while not (self.folder / f"ref_done_{self.calls}").exists() and time.monotonic() < start + self.patience:
            time.sleep(0.01)
        with open(self.folder / "chunks.jsonl", "a") as log:
            log.write(json.dumps({"call": self.calls, "start": start, "end": time.monotonic()}) + "\n")
        return MeanRed()(images, prompts, metadata)
