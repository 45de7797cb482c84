"""The catalogue matches its sources' parameter counts and adapts to every dataset's shape."""

import pytest
import torch
from omegaconf import OmegaConf

from kd_cli.errors import KdError
from kd_cli.measure import count_flops, count_params, size_mb
from kd_cli.models import CATALOGUE, ImageSpec, build_model

CIFAR10, CIFAR100, MNIST = ImageSpec(3, 32, 10), ImageSpec(3, 32, 100), ImageSpec(1, 28, 10)


def make(arch, spec, **options):
    return build_model(OmegaConf.create({"arch": arch, "checkpoint": None, **options}), spec)


@pytest.mark.parametrize("arch, spec, params", [
    ("resnet18", CIFAR10, 11_173_962),  # CIFAR ResNet-18
    ("deepnn", CIFAR10, 1_186_986),  # the PyTorch KD tutorial's teacher
    ("lightnn", CIFAR10, 267_738),  # and its student
    ("mnist_teacher", MNIST, 1_422_378),  # the seed's 1 conv + 4 FC teacher
    ("mnist_student", MNIST, 693_962),  # the seed's 1 conv + 2 FC student
])
def test_published_parameter_counts(arch, spec, params):
    assert count_params(make(arch, spec)) == params


def test_light6_is_about_0_82M_on_cifar10():
    assert 0.80e6 < count_params(make("light6", CIFAR10)) < 0.83e6


def test_conv_family_grows_with_depth():
    sizes = [count_params(make(f"conv{d}", CIFAR10)) for d in (2, 4, 6, 8, 10)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 5



def _relu_before_pool(features: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same layers in the sources' order: each max-pool after the ReLU the catalogue puts behind it."""
    layers = list(features)
    pools = [i for i, layer in enumerate(layers[:-1]) if isinstance(layer, torch.nn.MaxPool2d) and isinstance(layers[i + 1], torch.nn.ReLU)]
    for i in pools:
        layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch, spec", [("lightnn", CIFAR10), ("deepnn", CIFAR10), ("light6", CIFAR10), ("mnist_student", MNIST)])
def test_pooling_before_relu_equals_the_sources_order_bit_for_bit(arch, spec, dtype):
    torch.manual_seed(0)
    model = make(arch, spec).to(dtype).train()
    x = torch.randn(8, spec.channels, spec.size, spec.size, dtype=dtype)
    sources_order = _relu_before_pool(model.features)
    assert [type(m) for m in sources_order] != [type(m) for m in model.features]
    results = []
    for features in (model.features, sources_order):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        out = model.classifier(features(x))
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))

@pytest.mark.parametrize("spec", [CIFAR10, CIFAR100, MNIST], ids=["cifar10", "cifar100", "mnist"])
@pytest.mark.parametrize("arch", sorted(CATALOGUE))
def test_every_model_runs_on_every_shape(arch, spec):
    model = make(arch, spec).eval()
    with torch.no_grad():
        out = model(torch.randn(2, spec.channels, spec.size, spec.size))
    assert out.shape == (2, spec.num_classes)


def test_resnet18_flops_match_published_count():
    # 0.556 G multiply-adds per 32x32 image; torch's counter reports 2 FLOPs per multiply-add.
    assert count_flops(make("resnet18", CIFAR10), (3, 32, 32)) == pytest.approx(1.11e9, rel=0.01)


def test_size_is_fp32_bytes_of_the_state_dict():
    model = make("lightnn", CIFAR10)
    assert size_mb(model) == pytest.approx(267_738 * 4 / 2**20)


def test_torchvision_model_by_name_adapts_channels_and_classes():
    model = make("torchvision", MNIST, name="mobilenet_v3_small", weights=None)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet:FutureWarning")
def test_a_torchvision_model_with_auxiliary_heads_trains_on_its_main_head():
    """GoogLeNet from scratch returns (logits, aux2, aux1) while training; kd's engine needs the logits alone."""
    model = make("torchvision", CIFAR10, name="googlenet", weights=None).train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(name.startswith("aux") for name, _ in model.named_modules())


def test_unknown_models_are_refused_with_the_choices():
    with pytest.raises(KdError, match="unknown model 'resnet99'; choose one of: conv10"):
        make("resnet99", CIFAR10)
    with pytest.raises(KdError, match="unknown torchvision model 'nonet'"):
        make("torchvision", CIFAR10, name="nonet", weights=None)
