"""Feature maps for distillation, captured with forward hooks (never by editing `forward`).

Rule (generic, documented in the README): the distilled maps are the network's PRE-ACTIVATION maps:
every normalisation layer's output, plus every tensor that enters an activation module and is not
already such an output. In a ResNet block this gives exactly the paper's set (docs/METHOD.md §4):
bn1(conv1), bn2(conv2) and the residual sum before its ReLU; plus the stem BN output -> 28 maps for
ResNet20. Normalisation layers whose path matches `exclude` (default: shortcut/downsample branches, which
the paper does not distil) are skipped. A network without normalisation (conv biases, max-pooling) gets
its conv outputs that feed each ReLU. Activations must be modules (`nn.ReLU`), not `F.relu`, to be seen.

`map_graph` applies the same rule to a torch.fx trace of the module and returns a graph that outputs
(output, maps): a pure function that `torch.compile` can fuse end to end (hooks would break the graph).
"""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Iterator

import torch
from torch import fx, nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus,
)
DEFAULT_EXCLUDE = (r"(^|\.)shortcut(\.|$)", r"(^|\.)downsample(\.|$)")


class FeatureMapRecorder:
    """Registers hooks once; `with recorder.record() as maps:` collects the maps of one forward pass."""

    def __init__(self, model: nn.Module, exclude: tuple[str, ...] = DEFAULT_EXCLUDE):
        self._maps: list[torch.Tensor] | None = None
        self._norm_outputs: list[tuple[torch.Tensor, int]] = []
        self._handles = []
        # An in-place activation would overwrite a recorded norm output; clone only when that can happen.
        self._clone = any(getattr(m, "inplace", False) for m in model.modules() if isinstance(m, ACTIVATION_TYPES))
        for name, module in model.named_modules():
            if isinstance(module, NORM_TYPES) and not any(re.search(p, name) for p in exclude):
                self._handles.append(module.register_forward_hook(self._on_norm))
            elif isinstance(module, ACTIVATION_TYPES):
                self._handles.append(module.register_forward_pre_hook(self._on_activation))

    def _on_norm(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._maps is None:
            return
        self._norm_outputs.append((output, output._version))
        self._maps.append(output.clone() if self._clone else output)

    def _on_activation(self, module: nn.Module, inputs: tuple) -> None:
        if self._maps is None:
            return
        x = inputs[0]
        # Same tensor, same version: the norm output itself. Same tensor, newer version: an in-place
        # residual add (`out += identity` in torchvision) turned it into the sum, which is a map of its own.
        if any(x is seen and x._version == version for seen, version in self._norm_outputs[-4:]):
            return
        self._maps.append(x.clone() if self._clone else x)

    @contextlib.contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        self._maps, self._norm_outputs = [], []
        try:
            yield self._maps
        finally:
            self._maps, self._norm_outputs = None, []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureMapRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in exclude)


def _mutates(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_function":
        return node.target in INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
    return node.op == "call_method" and str(node.target).endswith("_")


def map_graph(model: nn.Module, exclude: tuple[str, ...] = DEFAULT_EXCLUDE) -> fx.GraphModule | None:
    """`model` traced into a graph returning (output, maps), the maps chosen by FeatureMapRecorder's rule.

    The graph shares the model's parameters (same names), so `functional_call` substitutes weights into it.
    Returns None when the module cannot be traced symbolically (data-dependent control flow): callers
    then fall back to hooks.
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception:
        return None
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    maps: list[fx.Node] = []
    norm_nodes: set[fx.Node] = set()
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, NORM_TYPES) and not _excluded(node.target, exclude):
            maps.append(node)
            norm_nodes.add(node)
        elif isinstance(module, ACTIVATION_TYPES):
            source = node.args[0]
            if isinstance(source, fx.Node) and source not in norm_nodes:
                maps.append(source)
    # An in-place op would overwrite a map before it is returned (as in the hook recorder): copy each map
    # as soon as it is computed.
    if any(_mutates(node, modules) for node in graph.nodes):
        copies = []
        for node in maps:
            with graph.inserting_after(node):
                copies.append(graph.call_method("clone", (node,)))
        maps = copies
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = ((output.args[0], tuple(maps)),)
    graph_module.recompile()
    return graph_module


def count_feature_maps(model: nn.Module, example: torch.Tensor) -> int:
    with FeatureMapRecorder(model) as rec, torch.no_grad(), rec.record() as maps:
        model(example)
        return len(maps)
