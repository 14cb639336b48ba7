"""The study's networks: ResNet-50 and DenseNet-121, with and without SCConv.

The baselines reproduce torchvision's architectures (module names, layout and
initialisation) without depending on torchvision, so a torchvision state_dict
loads into them unchanged:

- ResNet-50 ("v1.5"): conv1 7x7/2, bn1, relu, maxpool, layer1..layer4 of
  Bottleneck blocks [3, 4, 6, 3] (expansion 4, stride on the 3x3 conv2,
  downsample = 1x1 conv + BN), avgpool, fc.
- DenseNet-121: features.{conv0, norm0, relu0, pool0, denseblock1..4 ([6, 12,
  24, 16] layers, growth 32, bn_size 4), transition1..3, norm5}, classifier.

The SCConv variants are the baselines passed through ``convert``: every
ResNet-50 bottleneck 3x3 conv (``layerX.Y.conv2``, stride kept) and every
DenseNet-121 dense-layer 3x3 conv (``...denselayerN.conv2``, 128 -> 32, i.e.
``SCConv(128, out_channels=32)``) becomes an SCConv under the same name. Their
inner convolutions get the network's own conv initialisation (kaiming normal),
GroupNorm weight 1 and bias 0, as if the SCConv had been written into the
network class. ``fused=True`` builds ``scconv_triton.SCConv``, False the
reference; extra keywords (group_num, gate, softmax, backend, recompute, ...)
go to every SCConv.

Parameter counts at num_classes=100: resnet50 23,712,932; scconv_resnet50
14,686,180; densenet121 7,056,356; scconv_densenet121 5,499,172.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from .convert import convert

__all__ = [
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "scconv_resnet50",
    "densenet121",
    "scconv_densenet121",
    "count_parameters",
]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- ResNet


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv2)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: same constructor, module names and initialisation."""

    def __init__(
        self,
        block,
        layers,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation=None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation should be None or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        _init_resnet(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _init_resnet(module: nn.Module) -> None:
    """torchvision's ResNet init for every conv / norm in ``module`` (SCConv internals included)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.weight.numel() == 0:  # SCConv's PWC2 may have no output channel
                continue
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 exactly as torchvision's ``resnet50`` (kwargs: ResNet's, e.g. zero_init_residual)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def _split_kwargs(kwargs: dict, net_keys) -> tuple[dict, dict]:
    net = {k: kwargs.pop(k) for k in list(kwargs) if k in net_keys}
    return net, kwargs


_RESNET_KEYS = ("zero_init_residual", "groups", "width_per_group", "replace_stride_with_dilation", "norm_layer")
_DENSENET_KEYS = ("growth_rate", "block_config", "num_init_features", "bn_size", "drop_rate", "memory_efficient")


def scconv_resnet50(num_classes: int = 1000, *, fused: bool = True, **kwargs) -> ResNet:
    """SCConv-ResNet-50: every bottleneck 3x3 conv (``layerX.Y.conv2``) replaced by SCConv, stride kept.

    ``fused=True``: ``scconv_triton.SCConv``; False: the reference. Keywords of
    ResNet (zero_init_residual, ...) go to the network, the others (group_num,
    gate, softmax, backend, recompute, ...) to every SCConv.
    """
    net_kw, sc_kw = _split_kwargs(dict(kwargs), _RESNET_KEYS)
    if net_kw.get("replace_stride_with_dilation"):
        raise ValueError("scconv_resnet50: SCConv has no dilation; replace_stride_with_dilation is not supported")
    if net_kw.get("groups", 1) != 1:
        raise ValueError("scconv_resnet50: SCConv replaces dense 3x3 convs; groups must be 1")
    model = resnet50(num_classes=num_classes, **net_kw)
    convert(model, kernel_size=3, inplace=True, fused=fused, strict=True, init=_init_resnet, **sc_kw)
    return model


# ----------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate, memory_efficient=False):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs):
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input):
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        if self.memory_efficient and any(t.requires_grad for t in prev_features) and torch.is_grad_enabled():
            bottleneck_output = cp.checkpoint(lambda *xs: self.bn_function(list(xs)), *prev_features, use_reentrant=False)
        else:
            bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate, memory_efficient=False):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC: same constructor, module names and initialisation."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config=(6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0,
        num_classes: int = 1000,
        memory_efficient: bool = False,
    ):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        _init_densenet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def _init_densenet(module: nn.Module) -> None:
    """torchvision's DenseNet init (SCConv internals included: convs kaiming normal, GN 1/0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.weight.numel() > 0:  # SCConv(128, out_channels=32)'s PWC2 has no output channel
                nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


def densenet121(num_classes: int = 1000, **kwargs) -> DenseNet:
    """DenseNet-121 exactly as torchvision's ``densenet121`` (kwargs: memory_efficient, drop_rate)."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, **kwargs)


def scconv_densenet121(num_classes: int = 1000, *, fused: bool = True, **kwargs) -> DenseNet:
    """SCConv-DenseNet-121: every dense-layer 3x3 conv (128 -> 32) replaced by SCConv(128, out_channels=32).

    Keywords of DenseNet (memory_efficient, drop_rate) go to the network, the
    others (group_num, gate, softmax, backend, recompute, ...) to every SCConv.
    """
    net_kw, sc_kw = _split_kwargs(dict(kwargs), ("memory_efficient", "drop_rate"))
    model = densenet121(num_classes=num_classes, **net_kw)
    convert(model, kernel_size=3, inplace=True, fused=fused, strict=True, init=_init_densenet, **sc_kw)
    return model
