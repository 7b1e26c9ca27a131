"""OpenVLA's processor: the Llama tokenizer plus an image processor that normalises the image once per vision tower
and stacks the results channel-wise (6 channels for DINOv2 + SigLIP), like the checkpoint's
``processing_prismatic.py``.

The class names are the source's (``PrismaticImageProcessor``, ``PrismaticProcessor``) so that the published
``preprocessor_config.json`` (``"image_processor_type": "PrismaticImageProcessor"``) resolves to these classes once
they are registered. The source builds its transforms with timm + torchvision (``Resize -> CenterCrop -> ToTensor ->
Normalize`` on PIL images); torchvision resizes a PIL image with PIL itself, so this uses PIL directly and gives the
same pixels. The ``tvf_*`` fields of the published file are values derived from the others: they are recomputed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
_DERIVED_FIELDS = ("tvf_resize_params", "tvf_crop_params", "tvf_normalize_params", "tvf_do_letterbox")

# timm's data configs of the two OpenVLA towers (DINOv2: ImageNet statistics; SigLIP: 0.5 / 0.5), both bicubic
DINOSIGLIP_MEANS = [(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)]
DINOSIGLIP_STDS = [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)]


def _resize_to_short_side(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision ``Resize(int)``: the shorter side becomes ``size``, the longer keeps the aspect ratio (floored)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new, resample)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision ``center_crop`` (offsets rounded the same way)."""
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _letterbox(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad to a square with a symmetric constant border (the source's ``letterbox_pad_transform``)."""
    (width, height), side = image.size, max(image.size)
    pad_w, pad_h = int((side - width) / 2), int((side - height) / 2)
    canvas = Image.new("RGB", (width + 2 * pad_w, height + 2 * pad_h), fill)
    canvas.paste(image, (pad_w, pad_h))
    return canvas


class PrismaticImageProcessor(BaseImageProcessor):
    """PIL images -> ``pixel_values`` [B, 3 * towers, H, W] float32, one normalised copy of the image per tower.

    Args:
        use_fused_vision_backbone (`bool`): two towers (DINOv2 + SigLIP) or one.
        image_resize_strategy (`str`): ``resize-naive`` (stretch to the input size; OpenVLA), ``resize-crop``
            (shorter side to the input size, then center crop) or ``letterbox`` (pad to square, then resize).
        input_sizes (`list`): ``(3, H, W)`` of each tower.
        interpolations (`list[str]`): resize filter of each tower (``bicubic`` for both OpenVLA towers).
        means, stds (`list`): normalisation of each tower.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        use_fused_vision_backbone: bool = False,
        image_resize_strategy: str = "letterbox",
        input_sizes: list | None = None,
        interpolations: list[str] | None = None,
        means: list | None = None,
        stds: list | None = None,
        **kwargs: Any,
    ) -> None:
        for key in _DERIVED_FIELDS + ("tvf_letterbox_fill",):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        if image_resize_strategy not in ("resize-naive", "resize-crop", "letterbox"):
            raise ValueError(f"image_resize_strategy {image_resize_strategy!r} is not supported")
        self.use_fused_vision_backbone = use_fused_vision_backbone
        self.image_resize_strategy = image_resize_strategy
        self.input_sizes = [list(s) for s in input_sizes] if input_sizes is not None else [[3, 224, 224]]
        self.interpolations = (
            list(interpolations) if interpolations is not None else ["bicubic"] * len(self.input_sizes)
        )
        self.means = [list(m) for m in means] if means is not None else [[0.5, 0.5, 0.5]]
        self.stds = [list(s) for s in stds] if stds is not None else [[0.5, 0.5, 0.5]]
        if not len(self.input_sizes) == len(self.interpolations) == len(self.means) == len(self.stds):
            raise ValueError("input_sizes, interpolations, means and stds need one entry per vision tower")

    # Read by code that preprocesses on its own (rvla_peft's policy normalises on the device): the output geometry
    # and the channel-stacked statistics. Properties, so they are not written to preprocessor_config.json.
    @property
    def size(self) -> dict[str, int]:
        _, height, width = self.input_sizes[0]
        return {"height": height, "width": width}

    @property
    def image_mean(self) -> list[float]:
        return [v for mean in self.means for v in mean]

    @property
    def image_std(self) -> list[float]:
        return [v for std in self.stds for v in std]

    def _transform(self, image: Image.Image) -> np.ndarray:
        if self.image_resize_strategy == "letterbox":
            # as in the source: one padding for all towers, filled with the last tower's mean colour
            image = _letterbox(image, tuple(int(v * 255) for v in self.means[-1]))
        stacked = []
        for (_, height, width), interpolation, mean, std in zip(
            self.input_sizes, self.interpolations, self.means, self.stds, strict=True
        ):
            resample = _PIL_INTERPOLATION[interpolation]
            if self.image_resize_strategy == "resize-naive":
                resized = image.resize((width, height), resample)
            else:  # timm's Resize(short side) + CenterCrop (a no-op after letterboxing to a square)
                resized = _center_crop(_resize_to_short_side(image, height, resample), height, width)
            x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
            mean_, std_ = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (mean, std))
            stacked.append((x - mean_) / std_)
        return np.concatenate(stacked, axis=0)

    def preprocess(self, images, return_tensors=None, **kwargs: Any) -> BatchFeature:
        """One image or a list: PIL images, or uint8 arrays [H, W, 3]."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        images = [Image.fromarray(np.asarray(i)) if not isinstance(i, Image.Image) else i for i in images]
        pixel_values = np.stack([self._transform(image.convert("RGB")) for image in images])
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)


class PrismaticProcessor(ProcessorMixin):
    """Tokenizer + :class:`PrismaticImageProcessor`. No image placeholder token: the model inserts the patches after
    the BOS token itself, so ``input_ids`` are the plain tokenized prompt."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text=None,
        images=None,
        padding=False,
        truncation=None,
        max_length: int | None = None,
        return_tensors="pt",
        **kwargs: Any,
    ) -> BatchFeature:
        data = {}
        if text is not None:
            data.update(
                self.tokenizer(
                    text, return_tensors=return_tensors, padding=padding, truncation=truncation, max_length=max_length
                )
            )
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        if text is not None and images is not None and len(data["input_ids"]) != len(data["pixel_values"]):
            raise ValueError("expected one image per text")
        return BatchFeature(data=data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))


__all__ = ["PrismaticImageProcessor", "PrismaticProcessor", "DINOSIGLIP_MEANS", "DINOSIGLIP_STDS"]
