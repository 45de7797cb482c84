"""ResNet-18 in its CIFAR form: 3x3 stem, no max-pool (11,173,962 parameters at 10 classes)."""

from torch import nn

from kd_cli.models import ImageSpec, register


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, spec: ImageSpec, blocks_per_stage: list[int]):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(spec.channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        stages, c_in = [], 64
        for i, n_blocks in enumerate(blocks_per_stage):
            c_out = 64 * 2**i
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n_blocks)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, spec.num_classes)
        self.kd_layers = {"stages": ["layer1", "layer2", "layer3", "layer4"], "embedding": ["fc:in"]}

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


@register("resnet18")
def resnet18(spec: ImageSpec) -> nn.Module:
    return CifarResNet(spec, [2, 2, 2, 2])
