"""Object detection and instance segmentation: FAN and iBOT-ViT backbones in torchvision's Mask R-CNN.

Papers:
- [0] He et al., "Mask R-CNN", ICCV 2017. https://arxiv.org/abs/1703.06870 (the detector; torchvision's
  ``MaskRCNN`` is used as it is)
- [1] Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017. https://arxiv.org/abs/1612.03144
  (torchvision's ``FeaturePyramidNetwork`` + ``LastLevelMaxPool``: five levels ``0``-``3`` and ``pool``)
- [2] Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet), ECCV 2022.
  https://arxiv.org/abs/2203.16527 ("we build a simple feature pyramid from only the last feature map of the
  plain backbone", §3: deconvolutions up by 4 and 2, identity, max-pooling down by 2)
- [3] Zhao et al., "Fully Attentional Networks with Self-emerging Token Labeling", ICCV 2023 and Zhou et al.,
  "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022 (both transfer to COCO detection).

Where the pyramid comes from (``taps``):

- ``"hybrid"`` (FAN with a hybrid ConvNeXt stem): the stem's stage outputs at strides 4 and 8, the output of the
  tapped FAN block (default the last) at stride 16 and, at stride 32, a learned 3x3 stride-2 convolution of it to
  768 channels (the published FAN detection backbone's ``learnable_downsample``, e.g. FPN inputs
  ``[128, 256, 384, 768]`` for FAN-S-Hybrid); the FPN unifies the widths.
- ``"simple"`` (any FAN or the iBOT ViT; the default for plain-stem models): the last block's map at the token stride
  ``s``. For ``s`` = 16 it goes through ``models.segmentation.SimplePyramidNeck`` (ViTDet: strides 4, 8, 16, 32);
  for the small-patch CPU models (``s`` < 16) the same strides 4-32 come from max-pooling (and, for ``s`` = 8, a
  nearest up-sampling), without parameters, since those tokens are already fine enough. Then the FPN.

Every backbone goes through the backbone contract's ``forward_intermediates``. ``mask_rcnn`` is registered with
timm, so a training config builds it by name: ``model.name: mask_rcnn`` with ``model.kwargs.backbone`` any
registered FAN or iBOT ViT. ``num_classes`` is the number of object classes K; torchvision's background class is
added inside (its predictors have K + 1 outputs). Images go in as a list of float ``(3, H, W)`` tensors in
[0, 1]; the detector resizes (``min_size`` / ``max_size``; a tuple of ``min_size`` values is the published
multi-scale training, one drawn per batch) and normalises them itself.

Weights: ``load_backbone_weights`` initialises the backbone from a tokenlab classification run or export (or a
published checkpoint converted by ``tokenlab models convert``), through the same reader as segmentation
(``models.segmentation.load_backbone_weights``: strict on the kept keys).

A cascade head (Cascade Mask R-CNN, the STL paper's detector) is not built: torchvision's ``RoIHeads`` holds one box
stage, and a cascade needs per-stage IoU thresholds, box coders and re-sampled proposals inside its training step.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from tokenlab.models._registry import list_tokenlab_models
from tokenlab.models.fan import FAN
from tokenlab.models.segmentation import SimplePyramidNeck
from tokenlab.models.segmentation import load_backbone_weights as _load_backbone_weights

__all__ = ["DetectionBackbone", "TokenlabMaskRCNN", "load_backbone_weights"]

logger = logging.getLogger(__name__)

TAPS = ("auto", "hybrid", "simple")
HYBRID_DOWN_WIDTH = 768  # the published hybrid backbone's stride-32 level (a constant there for every size)
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# Parameters a classification FAN has that the detection backbone never uses (dropped after construction).
_FAN_UNUSED = ("cls_token", "cls_attn_blocks", "norm", "head", "aux_head")
_VIT_UNUSED = ("head", "fc_norm", "head_drop")


def _backbone_names() -> list[str]:
    return [n for n in list_tokenlab_models() if n.startswith(("fan_", "ibot_vit_"))]


class DetectionBackbone(nn.Module):
    """A FAN or iBOT ViT with an FPN on top; returns torchvision's ``OrderedDict`` of maps (keys 0-3 and pool).

    Args:
        backbone: A registered FAN or iBOT ViT name.
        backbone_kwargs: Its constructor kwargs (``patch_size``, ``img_size``, ``drop_path_rate``, ...); they must
            match a classification checkpoint loaded later.
        taps: ``"hybrid"``, ``"simple"`` or ``"auto"`` (hybrid for a hybrid-stem FAN, else simple).
        index: The tapped block (default the last).
        fpn_dim: FPN width (torchvision's and mmdet's 256).
    """

    def __init__(
        self,
        backbone: str,
        backbone_kwargs: dict[str, Any] | None = None,
        taps: str = "auto",
        index: int | None = None,
        fpn_dim: int = 256,
    ) -> None:
        super().__init__()
        names = _backbone_names()
        if backbone not in names:
            raise ValueError(f"unknown detection backbone {backbone!r}; valid: {', '.join(names)}")
        if taps not in TAPS:
            raise ValueError(f"unknown taps {taps!r}; valid: {', '.join(TAPS)}")
        model = timm.create_model(backbone, num_classes=0, **dict(backbone_kwargs or {}))
        self.backbone_name = backbone
        is_hybrid = isinstance(model, FAN) and model.stem == "hybrid"
        if taps == "auto":
            taps = "hybrid" if is_hybrid else "simple"
        if taps == "hybrid" and not is_hybrid:
            raise ValueError(f"taps='hybrid' needs a hybrid-stem FAN (e.g. fan_small_12_p4_hybrid), got {backbone!r}")
        self.taps = taps
        self.dropped = _FAN_UNUSED if isinstance(model, FAN) else _VIT_UNUSED
        for name in self.dropped:
            if hasattr(model, name):
                delattr(model, name)
        if isinstance(model, FAN):
            model.has_aux_head = False
        self.backbone: nn.Module = model
        depth = len(cast(Any, model).blocks)
        idx = depth - 1 if index is None else index
        if not -depth <= idx < depth:
            raise ValueError(f"block index {idx} out of range for {backbone} with depth {depth}")
        self.index = idx % depth
        dim = int(cast(Any, model).num_features)
        if taps == "hybrid":
            stem: Any = cast(Any, model).patch_embed
            tapped: Any = cast(Any, model).blocks[self.index]
            in_channels = [int(stage.blocks[-1].conv_dw.out_channels) for stage in stem.backbone.stages]
            width = int(tapped.norm1.normalized_shape[0])
            in_channels += [width, HYBRID_DOWN_WIDTH]
            self.neck: nn.Module = nn.Conv2d(width, HYBRID_DOWN_WIDTH, 3, stride=2, padding=1)
        else:
            in_channels = [dim] * 4
            if int(cast(Any, model).patch_size) not in (4, 8, 16):
                raise ValueError(f"the simple pyramid needs a token stride of 4, 8 or 16, got {model.patch_size}")
            self.neck = SimplePyramidNeck(dim) if int(cast(Any, model).patch_size) == 16 else nn.Identity()
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_dim, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_dim  # what torchvision's detectors read
        self.patch_size = int(cast(Any, model).patch_size)

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        model: Any = self.backbone
        if self.taps == "hybrid":
            maps = model.forward_intermediates(x, [self.index], stem_stages=True)
            return [*maps, self.neck(maps[-1])]
        if isinstance(model, FAN):
            last = model.forward_intermediates(x, [self.index])[0]
        else:  # timm's VisionTransformer.forward_intermediates: NCHW maps without prefix tokens
            last = model.forward_intermediates(x, [self.index], intermediates_only=True)[0]
        if isinstance(self.neck, SimplePyramidNeck):
            return cast(list[torch.Tensor], self.neck([last] * 4))
        stride = self.patch_size  # 4 or 8: strides 4, 8, 16, 32 by resampling
        return [F.interpolate(last, scale_factor=stride // t, mode="nearest") if t < stride else
                last if t == stride else F.max_pool2d(last, t // stride, ceil_mode=True)
                for t in (4, 8, 16, 32)]  # fmt: skip

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """FPN maps ``{"0": stride s0, ..., "3", "pool"}`` of a padded image batch ``(B, 3, H, W)``."""
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size, (-x.shape[-1]) % self.patch_size
        if pad_h or pad_w:  # torchvision pads batches to 32; other patch sizes need their own multiple
            x = F.pad(x, (0, pad_w, 0, pad_h))
        maps = self._maps(x)
        return cast(OrderedDict[str, torch.Tensor], self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps))))


class TokenlabMaskRCNN(nn.Module):
    """torchvision's ``MaskRCNN`` on a ``DetectionBackbone`` (see the module docstring).

    ``forward(images, targets)`` in training returns torchvision's loss dict; in eval mode, one prediction dict
    (``boxes`` xyxy, ``labels`` 1..K, ``scores``, ``masks`` (n, 1, H, W) probabilities) per image.

    Args:
        backbone: A registered FAN or iBOT ViT name.
        num_classes: Object classes K (torchvision's background is added inside).
        backbone_kwargs / taps / index / fpn_dim: see ``DetectionBackbone``.
        min_size: Shorter side the images are resized to; a sequence = one drawn per training batch (multi-scale).
        max_size: Longest side after resizing.
        anchor_sizes: One anchor size per pyramid level (5), in pixels of the resized image.
        box_detections_per_img: Most detections kept per image.
        img_size: Nominal size, recorded for exporting (images of any size work).
        image_mean / image_std: Normalisation inside the detector (default ImageNet's).
        box_head_dim: Width of the two-layer box head (torchvision's and mmdet's 1024).
        mask_head_dim: Width of the four mask-head convolutions and the mask up-sampling (published 256).
        detector_kwargs: Further ``torchvision.models.detection.MaskRCNN`` options (RPN / RoI sampling sizes,
            NMS thresholds, ...), e.g. ``{"box_batch_size_per_image": 128}`` for small CPU runs.
    """

    def __init__(
        self,
        backbone: str = "fan_tiny_12_p16_224",
        num_classes: int = 80,
        backbone_kwargs: dict[str, Any] | None = None,
        taps: str = "auto",
        index: int | None = None,
        fpn_dim: int = 256,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        box_detections_per_img: int = 100,
        img_size: int | None = None,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        box_head_dim: int = 1024,
        mask_head_dim: int = 256,
        detector_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes (object classes, without background) must be >= 1, got {num_classes}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per pyramid level (5), got {list(anchor_sizes)}")
        body = DetectionBackbone(backbone, backbone_kwargs, taps, index, fpn_dim)
        anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        sizes = tuple(int(s) for s in min_size) if isinstance(min_size, Sequence) else int(min_size)
        box_head = TwoMLPHead(fpn_dim * 7 * 7, box_head_dim)  # 7x7 RoIAlign output, as torchvision's default
        mask_head = MaskRCNNHeads(fpn_dim, [mask_head_dim] * 4, 1)
        allowed = (set(inspect.signature(FasterRCNN.__init__).parameters) | {"size_divisible", "fixed_size"}) - {
            "self", "backbone", "num_classes", "kwargs"}  # fmt: skip
        unknown = sorted(set(detector_kwargs or {}) - allowed)
        if unknown:  # torchvision passes unknown keys on to its transform, which ignores them
            raise ValueError(f"unknown detector_kwargs {unknown}; valid: {', '.join(sorted(allowed))}")
        try:
            self.detector = MaskRCNN(
                body, min_size=sizes, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
                rpn_anchor_generator=anchors, box_detections_per_img=box_detections_per_img, box_head=box_head,
                box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1), mask_head=mask_head,
                mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes + 1),
                **dict(detector_kwargs or {}),
            )  # fmt: skip
        except TypeError as err:
            raise ValueError(f"bad detector_kwargs {sorted(detector_kwargs or {})}: {err}") from None
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.img_size = img_size

    @property
    def body(self) -> DetectionBackbone:
        """The ``DetectionBackbone`` (FAN / ViT + neck + FPN)."""
        return cast(DetectionBackbone, self.detector.backbone)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Backbone parameters excluded from weight decay (timm API)."""
        return {f"detector.backbone.backbone.{n}" for n in ("pos_embed", "cls_token", "mask_token")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone blocks in the backward pass to save memory (timm API)."""
        cast(Any, self.body.backbone).set_grad_checkpointing(enable)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        """Loss dict (training, with ``targets``) or a list of prediction dicts (eval)."""
        anchors: Any = self.detector.rpn.anchor_generator
        if any(a.is_meta for a in anchors.cell_anchors):  # built on the meta device (load_exported): not state
            anchors.cell_anchors = [anchors.generate_anchors(s, r) for s, r in zip(anchors.sizes,
                                    anchors.aspect_ratios, strict=True)]  # fmt: skip
        return self.detector(images, targets)


def load_backbone_weights(model: TokenlabMaskRCNN, path: str | Path) -> dict[str, Any] | None:
    """Initialise the detector's backbone from a tokenlab classification run / export / weights file.

    The classification-only parts (heads, class attention, final norm of FAN) are dropped; every other key must
    match, or a ValueError lists the differences (e.g. another ``patch_size``). Returns the export's meta, if any.
    """
    return _load_backbone_weights(cast(Any, model.body), path)


@register_model
def mask_rcnn(pretrained: bool = False, **kwargs: Any) -> TokenlabMaskRCNN:
    """The torchvision Mask R-CNN on a FAN / iBOT-ViT backbone (``backbone=`` any registered one)."""
    if pretrained:
        raise ValueError("mask_rcnn has no pretrained weights; initialise the backbone with load_backbone_weights")
    for key in _TIMM_FACTORY_KWARGS:  # timm's factory passes these to every model function
        kwargs.pop(key, None)
    return TokenlabMaskRCNN(**kwargs)
