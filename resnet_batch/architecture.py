"""architecture module: the ResNet-50 network built for each layout (layouts.py)."""
from __future__ import annotations

import torch
from torch import nn

from resnet_batch.layouts import Layout


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck block (v1.5: the stride on the 3x3 conv), module for module."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with bottleneck blocks, module for module (the same state dict keys, shapes and
    initialisation), defined here so that a model actor builds its replica without importing torchvision
    (about 1.6 s of CPU at every actor's start); tests/test_model.py checks it against torchvision's."""

    def __init__(self, blocks: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._layer(64, blocks[0])
        self.layer2 = self._layer(128, blocks[1], stride=2)
        self.layer3 = self._layer(256, blocks[2], stride=2)
        self.layer4 = self._layer(512, blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        if self.fc.weight.is_meta:  # shapes only: nothing to initialise (and normal_ on meta imports torch._dynamo,
            return                  # about 1.2 s of CPU at every actor's and driver's start)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def fold_batchnorm(model: ResNet) -> None:
    """For inference: each BatchNorm folded into the convolution before it (its running statistics, scale and
    shift become the convolution's weight scale and bias), so a forward pass runs the 53 convolutions and no
    separate normalisation. The same function within float rounding (tests/test_model.py holds it to 1e-4 of
    the unfolded network in fp32), one memory pass fewer per convolution: about a fifth faster with bf16 on
    the CPU (28.8 to 34.9 img/s, benchmarks/start_costs.py). The model must be in eval mode; the BatchNorms become identities."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(owner: nn.Module, conv: str, bn: str) -> None:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())

    fold(model, "conv1", "bn1")
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            for i in (1, 2, 3):
                fold(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                fold(block.downsample, "0", "1")


def build_resnet(layout: Layout, *, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000,
                 device: str | torch.device | None = None) -> torch.nn.Module:
    """A ResNet (ResNet-50 by default) in `layout`; its state dict keys and shapes are torchvision's in either
    layout. `device="meta"` builds it without initialising any weights."""
    with torch.device(device or "cpu"):
        model = ResNet(list(blocks), num_classes=num_classes)
    if layout.name == "v1":
        for stage in (model.layer2, model.layer3, model.layer4):  # layer1 does not downsample
            first = stage[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    elif layout.name != "v1.5":
        raise ValueError(f"unknown layout {layout.name!r}")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = layout.bn_eps
    return model
