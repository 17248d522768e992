"""grpo-image: GRPO fine-tuning of autoregressive discrete-token text-to-image models with image rewards."""

from grpo_image._torchvision_compat import ensure_torchvision_importable

TORCHVISION = ensure_torchvision_importable()  # before anything imports transformers; see the module's docstring
