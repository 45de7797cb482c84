"""Intermediate outputs taken with forward hooks at module paths, so no model is edited for a method.

A path names a submodule as `model.named_modules()` does ("layer3", "features.4"); the suffix ":in"
takes the module's input instead of its output ("fc:in" is the embedding a classifier head sees).
"""

from torch import nn

from kd_cli.errors import KdError


def layer_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


class FeatureTaps:
    """Records the tensors at `paths` during each forward pass of `model`; `pop()` hands them over."""

    def __init__(self, model: nn.Module, paths: list[str], role: str):
        modules = dict(model.named_modules())
        self.features: dict = {}
        self.handles = []
        for path in paths:
            name, _, side = path.partition(":")
            if name not in modules or side not in ("", "in"):
                valid = ", ".join(layer_paths(model))
                raise KdError(f"the {role} has no layer '{path}'; valid paths (add ':in' for a layer's input): {valid}")
            self.handles.append(modules[name].register_forward_hook(self._recorder(path, side == "in")))

    def _recorder(self, path: str, want_input: bool):
        def record(module, inputs, output):
            self.features[path] = inputs[0] if want_input else output

        return record

    def pop(self) -> dict:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def default_layers(model: nn.Module, kind: str) -> list[str]:
    """The model's own choice of layers for a method: "stages" (feature maps) or "embedding"."""
    layers = getattr(model, "kd_layers", {}).get(kind)
    if not layers:
        raise KdError(
            f"{type(model).__name__} has no default '{kind}' layers; set loss.student_layers / loss.teacher_layers "
            f"to module paths such as: {', '.join(layer_paths(model)[:40])}"
        )
    return list(layers)
