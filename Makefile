# The quick-start commands: `make demo`, `make demo-text`, `make demo-decoder`, `make test`; each creates .venv and installs what it needs.
# Every install goes through constraints.txt, which pins torch so that a CPU machine never downloads CUDA packages.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.install-stamp
TEST_STAMP := $(VENV)/.install-test-stamp
TEXT_STAMP := $(VENV)/.install-text-stamp
# Fonts the OCR tests render text with (Latin and Chinese); installed once, as root, through apt.
# (When both the fonts and Chromium are missing, apt-get update runs twice; each install is skipped once present.)
FONTS := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf /usr/share/fonts/truetype/wqy/wqy-microhei.ttc

.PHONY: install install-test fonts chromium demo demo-text demo-decoder test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) -e ".[dev,vision,ocr,ray,datasets]"
	touch $(TEST_STAMP)

# The text demo reads its images with rapidocr on two Ray workers.
$(TEXT_STAMP): $(STAMP)
	$(PIP) -e ".[ocr,ray]"
	touch $(TEXT_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP) fonts chromium

fonts:
	@for f in $(FONTS); do test -f $$f || { apt-get update -qq && apt-get install -y -qq fonts-dejavu-core fonts-wqy-microhei >/dev/null; break; }; done

# Debian's Chromium renders the HTML evaluation report in a test (headless, offline).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(VENV)/bin/grpo-image train recipes/tiny_cpu.yaml

# English text rendering graded by a real OCR engine; the Chinese stage then runs with
# `grpo-image train recipes/tiny_text_zh.yaml` (it starts from this run's step-100 checkpoint).
demo-text: $(TEXT_STAMP) fonts
	$(VENV)/bin/grpo-image train recipes/tiny_text_en.yaml

# Decoder GRPO: a tiny GLM-Image DiT learns a colour through LoRA while the AR model only samples (docs/decoder_demo.md).
demo-decoder: install
	$(VENV)/bin/grpo-image train recipes/tiny_decoder_cpu.yaml

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
