"""`python -m grpo_image ...` is the `grpo-image` command (launchers such as torchrun take a module: `-m grpo_image`)."""

import sys

from grpo_image.app.cli import main

sys.exit(main())
