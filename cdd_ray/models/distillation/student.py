"""Reverse-distillation student: One-Class Bottleneck Embedding (OCBE) plus a mirrored decoder.

Layout (RD4AD, Deng & Li, CVPR 2022; numbers below for ``wide_resnet50_2``):

- multi-scale fusion: teacher level 1 goes through two stride-2 3x3 conv+BN+ReLU (256 -> 512 -> 1024),
  level 2 through one (512 -> 1024); both are concatenated with level 3: 3072 channels at 1/16;
- one-class embedding: three bottleneck blocks, the first with stride 2 and a 1x1 stride-2
  downsample, to 2048 channels at 1/32;
- decoder: de-bottleneck stages of [3, 4, 6] blocks, each stage opening with a 2x2 stride-2
  transposed convolution, giving 1024 / 512 / 256 channels at 1/16, 1/8, 1/4.

For other backbones the same structure is derived from the teacher's ``feature_info`` (channels and
reductions): each fusion conv doubles channels until the level-3 width, the embedding has twice the
level-3 width, and each decoder stage returns the matching teacher level. The resnet family keeps
RD4AD's block widths (``width_factor`` 2 for the wide ResNets).

Example::

    student = build_student(teacher.channels, teacher.reductions, backbone="wide_resnet50_2")
    reconstructed = student(teacher(images))  # same shapes as the teacher features
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

EXPANSION = 4


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1) with an optional strided 1x1 projection shortcut."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_ch, width, 1, 1),
            _conv_bn_relu(width, width, 3, stride),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class DeBottleneck(nn.Module):
    """Decoder bottleneck: the 3x3 conv becomes a transposed conv when it upsamples."""

    def __init__(self, in_ch: int, width: int, out_ch: int, upsample: int = 1):
        super().__init__()
        if upsample == 1:
            middle = nn.Conv2d(width, width, 3, padding=1, bias=False)
        else:
            middle = nn.ConvTranspose2d(width, width, upsample, stride=upsample, bias=False)
        self.body = nn.Sequential(
            _conv_bn_relu(in_ch, width, 1, 1),
            middle,
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Identity()
        if upsample != 1:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_ch, out_ch, upsample, stride=upsample, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        elif in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


@dataclass(frozen=True)
class StudentSpec:
    """Everything that fixes a student's architecture; derived from the teacher."""

    channels: tuple[int, int, int]
    reductions: tuple[int, int, int]
    width_factor: int = 1
    # the OCBE's own width factor when it differs from the decoder's (None: width_factor). RD4AD
    # widens both for wide_resnet50_2; anomalib 2.7's OCBE keeps factor 1 (bench/anomalib_compare.py)
    embedding_width_factor: int | None = None
    embedding_blocks: int = 3
    decoder_blocks: tuple[int, int, int] = (3, 4, 6)
    # stride of the OCBE's first block, undone by the decoder's first stage: 2 is RD4AD's (the
    # embedding at 1/32 of the image), 1 keeps it on the level-3 grid (1/16)
    embedding_stride: int = 2
    # the memory layout the student computes in (not its architecture: a checkpoint loads into
    # either); channels-last (NHWC): a training step 1.18x faster on a CPU thread (bench/layout_speed.py)
    channels_last: bool = True


@dataclass
class StudentConfig:
    """The student's settings a user may change (``student.*`` keys); the rest follows the teacher.

    ``embedding_stride``: 2 (RD4AD) puts the one-class embedding at 1/32 of the image side, 4 x 4
    cells at 128 px; 1 keeps it at 1/16 (8 x 8 at 128 px, the grid RD4AD's embedding has at 256 px).
    ``width_factor``: multiplies every block's inner width (a bottleneck's width is its output
    channels / 4 times this); None takes the backbone's (RD4AD's 2 for the wide ResNets, else 1).
    ``channels_last``: compute in the channels-last (NHWC) memory layout (the same function; values
    equal up to float rounding; measured faster on CPU, not measured on a GPU).
    """

    embedding_stride: int = 2
    width_factor: int | None = None
    channels_last: bool = True


def _ratio(coarse: int, fine: int) -> int:
    ratio = coarse // fine
    if coarse % fine or ratio < 1 or ratio & (ratio - 1):
        raise ValueError(f"teacher reductions must grow by powers of two, got {fine} -> {coarse}")
    return ratio


class OCBE(nn.Module):
    """Fuses the three teacher levels and squeezes them into a one-class embedding."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        c1, c2, c3 = spec.channels
        r1, r2, r3 = spec.reductions
        self.fuse = nn.ModuleList(
            [self._downsampler(c1, c3, _ratio(r3, r1)), self._downsampler(c2, c3, _ratio(r3, r2))]
        )
        embedding = 2 * c3
        factor = spec.width_factor if spec.embedding_width_factor is None else spec.embedding_width_factor
        width = embedding // EXPANSION * factor
        blocks = [Bottleneck(3 * c3, width, embedding, stride=spec.embedding_stride)]
        blocks += [Bottleneck(embedding, width, embedding) for _ in range(spec.embedding_blocks - 1)]
        self.embed = nn.Sequential(*blocks)
        self.out_channels = embedding

    @staticmethod
    def _downsampler(in_ch: int, out_ch: int, ratio: int) -> nn.Sequential:
        steps = int(math.log2(ratio))
        layers, ch = [], in_ch
        for step in range(steps):
            nxt = out_ch if step == steps - 1 else min(out_ch, ch * 2)
            layers.append(_conv_bn_relu(ch, nxt, 3, 2))
            ch = nxt
        if ch != out_ch:
            layers.append(_conv_bn_relu(ch, out_ch, 1, 1))
        return nn.Sequential(*layers)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        fused = [self.fuse[0](features[0]), self.fuse[1](features[1]), features[2]]
        return self.embed(torch.cat(fused, dim=1))


class Decoder(nn.Module):
    """Three de-bottleneck stages that climb back to the teacher's levels 3, 2, 1."""

    def __init__(self, spec: StudentSpec, in_channels: int):
        super().__init__()
        c1, c2, c3 = spec.channels
        r1, r2, r3 = spec.reductions
        targets = [(c3, spec.embedding_stride), (c2, _ratio(r3, r2)), (c1, _ratio(r2, r1))]
        stages, ch = [], in_channels
        for (out_ch, upsample), count in zip(targets, spec.decoder_blocks, strict=True):
            width = out_ch // EXPANSION * spec.width_factor
            blocks = [DeBottleneck(ch, width, out_ch, upsample=upsample)]
            blocks += [DeBottleneck(out_ch, width, out_ch) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            ch = out_ch
        self.stages = nn.ModuleList(stages)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]  # finest level first, like the teacher


class Student(nn.Module):
    """OCBE + decoder: reconstructs the teacher's features from a compact embedding."""

    def __init__(self, spec: StudentSpec):
        super().__init__()
        self.spec = spec
        self.bottleneck = OCBE(spec)
        self.decoder = Decoder(spec, self.bottleneck.out_channels)
        if spec.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, teacher_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """(B, C_l, H_l, W_l) per teacher level in, the same shapes out (finest level first)."""
        if self.spec.channels_last:
            teacher_features = [f.contiguous(memory_format=torch.channels_last) for f in teacher_features]
        return self.decoder(self.bottleneck(teacher_features))


RESNET_WIDTH_FACTORS = {"wide_resnet50_2": 2, "wide_resnet101_2": 2}
EMBEDDING_STRIDES = (1, 2)


def check_student(student: StudentConfig) -> None:
    """Raises ValueError, naming the key, when ``student.embedding_stride`` is not 1 or 2 or
    ``student.width_factor`` is below 1 (the config and the API both check through here)."""
    if student.embedding_stride not in EMBEDDING_STRIDES:
        raise ValueError(
            f"student.embedding_stride: must be one of {EMBEDDING_STRIDES}, got {student.embedding_stride}"
        )
    if student.width_factor is not None and student.width_factor < 1:
        raise ValueError(
            f"student.width_factor: must be >= 1 (or null: the backbone's), got {student.width_factor}"
        )


def resolved_width_factor(backbone: str, width_factor: int | None) -> int:
    """The width factor a student is built with: ``width_factor``, or when None the backbone's
    (RD4AD's 2 for the wide ResNets, 1 for any other)."""
    return width_factor or RESNET_WIDTH_FACTORS.get(backbone, 1)


def student_spec(
    channels: list[int], reductions: list[int], backbone: str = "", student: StudentConfig | None = None
) -> StudentSpec:
    """RD4AD's widths for the resnet family, a mirrored derivation for any other timm CNN.

    Raises ValueError as ``check_student``."""
    student = student or StudentConfig()
    check_student(student)
    return StudentSpec(
        channels=tuple(channels),
        reductions=tuple(reductions),
        width_factor=resolved_width_factor(backbone, student.width_factor),
        embedding_stride=student.embedding_stride,
        channels_last=student.channels_last,
    )


def build_student(channels: list[int], reductions: list[int], backbone: str = "") -> Student:
    return Student(student_spec(channels, reductions, backbone))
