"""Intermediate outputs taken with forward hooks at module paths, so no model is edited for a method.

A path names a submodule as `model.named_modules()` does ("layer3", "features.4"); the suffix ":in"
takes the module's input instead of its output ("fc:in" is the embedding a classifier head sees).
"""

from torch import nn

from kd_cli.errors import KdError


def layer_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def check_paths(model: nn.Module, paths: list[str], role: str) -> dict[str, nn.Module]:
    """The model's modules by path, once every one of `paths` names one ("NAME" or "NAME:in")."""
    modules = dict(model.named_modules())
    for path in paths:
        name, _, side = path.partition(":")
        if name not in modules or side not in ("", "in"):
            valid = ", ".join(layer_paths(model))
            raise KdError(f"the {role} has no layer '{path}'; valid paths (add ':in' for a layer's input): {valid}")
    return modules


class FeatureTaps:
    """Records the tensors at `paths` during each forward pass of `model`; `pop()` hands them over."""

    def __init__(self, model: nn.Module, paths: list[str], role: str):
        modules = check_paths(model, paths, role)
        self.role, self.paths = role, list(dict.fromkeys(paths))  # a path paired twice is taken once
        self.features: dict = {}
        self.versions: dict = {}  # each tensor's in-place version counter when it was taken
        self.calls: dict = {}  # how often each path ran in the latest forward pass
        # Each forward pass of the model starts afresh (evaluation passes run with the taps in place too).
        self.handles = [model.register_forward_pre_hook(lambda module, inputs: self.calls.clear())] if paths else []
        for path in self.paths:
            name, _, side = path.partition(":")
            module = modules[name]
            # An input is taken before the module runs: the module itself may overwrite it (an in-place ReLU).
            register = module.register_forward_pre_hook if side == "in" else module.register_forward_hook
            self.handles.append(register(self._hook(path, want_input=side == "in")))

    def _hook(self, path: str, want_input: bool):
        def keep(tensor):
            # Inference tensors (the teacher's pass) keep no version counter; the check in
            # DistillationLoss.attach, run under no_grad, has covered the teacher's paths already.
            self.features[path], self.versions[path] = tensor, None if tensor.is_inference() else tensor._version
            self.calls[path] = self.calls.get(path, 0) + 1

        if want_input:
            return lambda module, inputs: keep(inputs[0])
        return lambda module, inputs, output: keep(output)

    def pop(self) -> dict:
        """The tensors of the last forward pass, as they were when taken.

        A layer after a tapped one may overwrite it in place (a conv followed by ReLU(inplace=True)):
        the tensor then holds that layer's result. Copying every tap would cost memory on every
        step, so such a path is refused instead. So is a path that did not run in the pass, and one
        that ran more than once (a module called twice, such as the one ReLU of a ResNet block): only
        its last call would be kept.
        """
        for path in self.paths:
            calls = self.calls.get(path, 0)
            if calls != 1:
                what = "did not run in" if calls == 0 else f"ran {calls} times in"
                raise KdError(f"the {self.role}'s layer '{path}' {what} one forward pass, so it gives no single output; "
                              f"choose a layer that runs once per pass")
        for path, tensor in self.features.items():
            if self.versions[path] is not None and tensor._version != self.versions[path]:
                raise KdError(f"the {self.role}'s layer '{path}' is overwritten in place by a layer after it (such as "
                              f"ReLU(inplace=True)), so the loss would see that layer's result; take that layer's "
                              f"output instead")
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
