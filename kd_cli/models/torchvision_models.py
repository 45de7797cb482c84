"""Any torchvision classification model, adapted to the dataset's channels and classes.

torchvision is imported where a model is built or named: importing it takes about 0.9 s (its
detection ops), which every kd command would pay at start, torchvision model or not.
"""

from torch import nn

from kd_cli.errors import KdError
from kd_cli.models import ImageSpec, register


def _adapt_first_conv(model: nn.Module, channels: int) -> None:
    """Replace the first convolution when the dataset is not RGB (e.g. 1-channel MNIST)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels:
                    setattr(parent, child_name, nn.Conv2d(
                        channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None,
                    ))
                return


def check_name(name: str) -> None:
    """Refuse a name torchvision does not have (config.validate calls this before anything runs)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise KdError(f"unknown torchvision model '{name}'; choose one of: {', '.join(available)}")


@register("torchvision")
def torchvision_model(spec: ImageSpec, name: str = "resnet18", weights: str | None = None) -> nn.Module:
    import torchvision

    check_name(name)
    if weights is not None:
        # Pretrained heads have 1000 classes; load them as they are and replace the head below.
        try:
            model = torchvision.models.get_model(name, weights=weights)
        except (OSError, ValueError, KeyError) as e:  # no network (URLError is an OSError), or no such weights
            raise KdError(f"cannot load torchvision weights {weights!r} for {name} ({type(e).__name__}: {e}); check the "
                          f"internet connection and the weights' name, or leave weights=null to start from scratch") from None
    else:
        model = torchvision.models.get_model(name, num_classes=spec.num_classes)
    _drop_auxiliary_heads(model)
    _adapt_first_conv(model, spec.channels)
    if weights is not None:
        _replace_head(model, spec.num_classes)
    _check_input_size(model, name, spec)
    return model


def _drop_auxiliary_heads(model: nn.Module) -> None:
    """GoogLeNet and Inception v3 built from scratch have auxiliary classifiers, and while training they
    return a tuple with their logits; kd trains and distils the main head alone, as their pretrained
    builders do."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name, _ in list(model.named_children()):
            if name.lower().startswith("aux"):
                setattr(model, name, None)


def _check_input_size(model: nn.Module, name: str, spec: ImageSpec) -> None:
    """Some models take one image size only (a ViT's 224x224): refused here, not by a traceback mid-run."""
    import torch

    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, spec.channels, spec.size, spec.size))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise KdError(f"torchvision.{name} cannot run on {spec.channels}x{spec.size}x{spec.size} images "
                      f"({str(e).strip()}); choose a model that takes any input size") from None
    finally:
        model.train()


def _replace_head(model: nn.Module, num_classes: int) -> None:
    last = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last is None:
        raise KdError("this torchvision model has no linear classifier head to adapt")
    parent, child_name, child = last
    setattr(parent, child_name, nn.Linear(child.in_features, num_classes))
