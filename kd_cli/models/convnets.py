"""Small convolutional networks from the seed documents and the PyTorch KD tutorial.

Layer sizes follow the sources exactly, so parameter counts can be checked against them:
DeepNN 1,186,986 and LightNN 267,738 on CIFAR-10; the MNIST teacher 1,422,378 and student 693,962.
"""

import torch
from torch import nn

from kd_cli.models import ImageSpec, register


def _flat_size(features: nn.Module, spec: ImageSpec) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, spec.channels, spec.size, spec.size)).numel()


def _mlp(widths: list[int], dropout: float = 0.0, batchnorm: bool = False) -> list[nn.Module]:
    """Linear layers through `widths`, with ReLU (and optional BN / dropout) between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(n_out))
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return layers


class ConvNet(nn.Module):
    """`features` (convolutions) then `classifier` (flatten + fully connected).

    `kd_layers` names the default layers feature-based losses hook: the end of each convolution
    stage, and the input of the last linear layer (the embedding), taken before dropout: the
    teacher's, in eval mode, has none, and the student's would lose a tenth of its values each step.
    """

    def __init__(self, features: nn.Sequential, spec: ImageSpec, hidden: list[int], **head):
        super().__init__()
        self.features = features
        widths = [_flat_size(features, spec), *hidden, spec.num_classes]
        self.classifier = nn.Sequential(nn.Flatten(), *_mlp(widths, **head))
        stage_ends = getattr(features, "stage_ends", [len(features) - 1])
        embedding = len(self.classifier) - 1
        if isinstance(self.classifier[embedding - 1], nn.Dropout):
            embedding -= 1
        self.kd_layers = {
            "stages": [f"features.{i}" for i in stage_ends],
            "embedding": [f"classifier.{embedding}:in"],
        }

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv(c_in: int, c_out: int, batchnorm: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    return layers + [nn.ReLU(inplace=True)]


def _stages(c_in: int, widths: list[list[int]], batchnorm: bool, spec: ImageSpec) -> nn.Sequential:
    """Stages of 3x3 convolutions, each followed by 2x2 max-pooling while the map is >= 6 pixels.

    The limit keeps every depth valid on 28x28 and 32x32 inputs (at most three poolings).
    """
    layers: list[nn.Module] = []
    stage_ends = []
    size = spec.size
    for stage in widths:
        for c_out in stage:
            layers += _conv(c_in, c_out, batchnorm)
            c_in = c_out
        if size >= 6:
            # Pooled before the stage's last ReLU: max-pooling commutes with ReLU, outputs and gradients
            # are equal bit for bit, and the ReLU then runs on a quarter of the values. LightNN's
            # training step took 5.1-5.7 ms instead of 6.1-6.2 ms this way on a 2-core CPU (bf16, batch 128).
            layers.insert(len(layers) - 1, nn.MaxPool2d(2))
            size //= 2
        stage_ends.append(len(layers) - 1)
    features = nn.Sequential(*layers)
    features.stage_ends = stage_ends
    return features


@register("deepnn")
def deepnn(spec: ImageSpec) -> nn.Module:
    """The PyTorch KD tutorial's teacher: 4 convolutions, 2 fully connected layers."""
    features = _stages(spec.channels, [[128, 64], [64, 32]], batchnorm=False, spec=spec)
    return ConvNet(features, spec, hidden=[512], dropout=0.1)


@register("lightnn")
def lightnn(spec: ImageSpec) -> nn.Module:
    """The PyTorch KD tutorial's student: 2 convolutions, 2 fully connected layers."""
    features = _stages(spec.channels, [[16], [16]], batchnorm=False, spec=spec)
    return ConvNet(features, spec, hidden=[256], dropout=0.1)


@register("light6")
def light6(spec: ImageSpec) -> nn.Module:
    """The seed's CIFAR-10 student: 6 convolutions with BatchNorm, then 2 fully connected layers."""
    features = _stages(spec.channels, [[32, 32], [64, 64], [128, 128]], batchnorm=True, spec=spec)
    return ConvNet(features, spec, hidden=[256], batchnorm=True)


def _conv_family(depth: int):
    """conv2 ... conv10: the same network at different depths, for teacher-assistant chains."""
    widths = [[32, 32], [64, 64], [128, 128], [256, 256], [256, 256]][: depth // 2]

    def build(spec: ImageSpec) -> nn.Module:
        features = _stages(spec.channels, widths, batchnorm=True, spec=spec)
        # A fixed 4x4 map before the head keeps the head small and comparable across depths.
        features.append(nn.AdaptiveAvgPool2d(4))
        features.stage_ends[-1] = len(features) - 1
        return ConvNet(features, spec, hidden=[])

    build.__doc__ = f"{depth} convolutions with BatchNorm (pairs, max-pooled), then one linear layer."
    return build


for _depth in (2, 4, 6, 8, 10):
    register(f"conv{_depth}")(_conv_family(_depth))


class _SeedMnistNet(ConvNet):
    """One unpadded 3x3 convolution with 32 filters and a max-pool, then fully connected layers.

    The pool comes before the ReLU, as in `_stages`: the same function, less work.
    """

    def __init__(self, spec: ImageSpec, hidden: list[int]):
        features = nn.Sequential(nn.Conv2d(spec.channels, 32, 3), nn.MaxPool2d(2), nn.ReLU(inplace=True))
        super().__init__(features, spec, hidden=hidden)


@register("mnist_teacher")
def mnist_teacher(spec: ImageSpec) -> nn.Module:
    """The seed's MNIST teacher: 1 convolution + 4 fully connected layers."""
    return _SeedMnistNet(spec, hidden=[256, 128, 32])


@register("mnist_student")
def mnist_student(spec: ImageSpec) -> nn.Module:
    """The seed's MNIST student: 1 convolution + 2 fully connected layers."""
    return _SeedMnistNet(spec, hidden=[128])
