"""OCR engines for the OCR reward: each turns uint8 RGB images [n, H, W, 3] into n recognised strings.

Three, because they trade cost for coverage differently: rapidocr (PP-OCR det/rec ONNX models shipped inside its
wheel: offline, CPU-friendly, English and Chinese), easyocr (the engine the design card names; weights from a local
folder, never downloaded), and a VLM served behind an OpenAI-compatible endpoint (e.g. Qwen2.5-VL, as LongText-Bench
reads text out), which reads long, curved and stylised text best at the price of a server. The VLM is asked X-Omni's
LongText-Bench instruction (rewards/instructions/xomni_longtext_ocr.yaml, with its source) and its "no text" phrases
are removed from the read-out, so that the reward reads as the benchmark does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewards._chat import ChatClient, image_options, load_instruction, message_text
from rewards._rebuild import RebuildOnUnpickle

VLM_INSTRUCTION = "xomni_longtext_ocr"  # the instruction file the VLM reader's defaults come from


class RapidOCRReader(RebuildOnUnpickle):
    """rapidocr: text boxes above `min_confidence`, in its reading order, joined by spaces.

    Detection resizes the longer side to at most `det_limit_side_len` (PaddleOCR's classic setting: rapidocr's own
    default upscales small images, which is slower and splits words). `use_cls` enables the 180-degree text
    classifier (off, like flow_grpo). `params` passes any other rapidocr setting, e.g. {"Det.box_thresh": 0.6}.
    """

    def __init__(
        self,
        min_confidence: float = 0.5,
        use_cls: bool = False,
        det_limit_side_len: int = 960,
        threads: int = -1,
        params: dict[str, Any] | None = None,
    ) -> None:
        from rapidocr import RapidOCR

        self._init_args = dict(
            min_confidence=min_confidence, use_cls=use_cls, det_limit_side_len=det_limit_side_len,
            threads=threads, params=params,
        )
        settings = {
            "Global.log_level": "error",
            "Global.text_score": float(min_confidence),
            "Global.use_cls": bool(use_cls),
            "Det.limit_type": "max",
            "Det.limit_side_len": int(det_limit_side_len),
            "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
            **(params or {}),
        }
        self.engine = RapidOCR(params=settings)

    def read(self, images: np.ndarray) -> list[str]:
        texts = []
        for image in images:  # uint8 [H, W, 3] each
            out = self.engine(np.ascontiguousarray(image[..., ::-1]))  # rapidocr takes arrays as BGR
            texts.append(" ".join(out.txts or ()))
        return texts


class EasyOCRReader(RebuildOnUnpickle):
    """easyocr with its detector and recogniser weights read from `model_dir` (download disabled).

    langs: easyocr language codes, e.g. ["ch_sim", "en"] (its Chinese model also reads English). gpu: None uses
    CUDA when available.
    """

    def __init__(
        self,
        model_dir: str,
        langs: list[str] | tuple[str, ...] = ("ch_sim", "en"),
        gpu: bool | None = None,
        min_confidence: float = 0.0,
    ) -> None:
        import easyocr
        import torch

        self._init_args = dict(model_dir=model_dir, langs=list(langs), gpu=gpu, min_confidence=min_confidence)
        self.min_confidence = float(min_confidence)
        self.reader = easyocr.Reader(
            list(langs),
            gpu=torch.cuda.is_available() if gpu is None else bool(gpu),
            model_storage_directory=str(model_dir),
            download_enabled=False,
            verbose=False,
        )

    def read(self, images: np.ndarray) -> list[str]:
        texts = []
        for image in images:  # uint8 RGB [H, W, 3] each: easyocr reads arrays as RGB
            found = self.reader.readtext(np.ascontiguousarray(image))
            texts.append(" ".join(text for _, text, conf in found if conf >= self.min_confidence))
        return texts


class VLMReader:
    """A VLM behind an OpenAI-compatible server, asked to transcribe the text in each image (one request each).

    prompt, max_tokens, strip (phrases removed from every read-out, each everywhere) and the image settings
    (image_format, image_size [W, H] or "full", jpeg_quality): None takes X-Omni's LongText-Bench reader's.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str | None = None,
        api_key_env: str | None = None,
        max_tokens: int | None = None,
        strip: list[str] | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        image_format: str | None = None,
        image_size: list[int] | str | None = None,
        jpeg_quality: int | None = None,
    ) -> None:
        base = load_instruction(VLM_INSTRUCTION)
        self.prompt = base["template"] if prompt is None else prompt
        self.strip = list(base["strip"] if strip is None else strip)
        self.request = {"max_tokens": int(base["max_tokens"] if max_tokens is None else max_tokens), "temperature": 0.0}
        self.client = ChatClient(
            base_url, model, api_key_env, timeout, max_retries, backoff, max_concurrency=max_concurrency,
            **image_options(base, image_format, image_size, jpeg_quality),
        )

    def __repr__(self) -> str:
        return f"VLMReader(client={self.client!r})"

    def clean(self, text: str) -> str:
        """A read-out without the phrases in `strip` (longest listed first, so a prefix never splits a phrase)."""
        for phrase in self.strip:
            text = text.replace(phrase, "")
        return text.strip()

    def read(self, images: np.ndarray) -> list[str]:
        replies = self.client.complete(images, [self.prompt] * len(images), **self.request)
        return [self.clean(message_text(reply)) for reply in replies]


ENGINES = {"rapidocr": RapidOCRReader, "easyocr": EasyOCRReader, "vlm": VLMReader}
