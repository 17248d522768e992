"""Test fixtures that live in the repository, so that a plain clone runs every test (see tests/data/README.md)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent
