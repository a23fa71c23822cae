"""Weight-space symmetries: permute the ORIGINAL network's channels so its kernel grids are smoother, for free
(docs/METHOD.md §12).

Permuting a conv's output channels, the per-channel tensors that follow it (BatchNorm's four vectors) and the
input channels of every layer that reads them leaves the network's function unchanged. A NeRN fitted to the
permuted network reconstructs an equivalent network, so, unlike coordinate permutations, nothing is stored.

The channel groups are found from the module itself by a torch.fx trace, with no per-architecture code:
every tensor's channel axis (dim 1) is a *space*; ops either keep a space (BatchNorm, elementwise
activations, pooling, dropout, reshapes that keep dims 0 and 1), tie spaces together (`add`, `mul`: a
residual stream is one group), start a new one (a conv's or Linear's output channels) or embed a narrow space
into a wider one (option-A shortcuts: `F.pad` on the channel axis maps channel c to c + pad). A module
parameter is *bound* to the spaces of its axes (conv weight axis 0 to its output, axis 1 to its input);
a group is the union of tied spaces and is permuted with all its bindings at once.

Correctness first: anything the analysis does not understand (a concat, a channel-mixing reshape, grouped
convs other than depthwise, an unknown function or module) fixes the spaces it touches, as do the network's
input and its outputs. A fixed group is never permuted; a group embedded into a fixed group is fixed too.
An embedded group's permutation is copied onto its slots in the wider group; the wider group's other slots
(the zero padding) are free among themselves.

The permutation of a free group orders its channels by a chain (the project's greedy / fast chains, the
better of the two) over one feature vector per channel: the channel's unit-normalised kernels in every
represented conv bound to the group, as input column (and, with features="both", as output row). The dot
product of two such vectors is the sum of kernel cosines the chain-quality measure counts between
neighbouring columns. features="input" optimises exactly that; "both" (the default) trades a little of it
for smoothness along the filter axis, which the row-major measure ignores but the predictor also sees.

Measured by bench/symmetry.py (public option-A checkpoints, every 3x3 conv, identity coordinates; chain
quality, then the same measure along the filter axis): ResNet20 none 0.0145 / 0.0169, symmetry-both
0.1214 / 0.0983, symmetry-input 0.1402 / 0.0527, against infilter 0.6538 / 0.2330 and crossfilter
0.8929 / 0.0506 (59,488 bytes of int16 positions each); ResNet56 none 0.0142, symmetry-both 0.1236,
symmetry-input 0.1336, infilter 0.6641, crossfilter 0.8971. Rows and columns of every grid move together,
so the gain is real but far from the coordinate permutations'; it costs about a second and no bytes.
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from nern.config import RepresentConfig
from nern.errors import NernError
from nern.layers import conv_weights, find_conv_layers
from nern.chain import chain_quality, fast_chain, greedy_chain
from nern.permutation import chain_quality_of_positions, identity_permutation

Features = Literal["both", "input"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
# each output channel depends on the same input channel only
_CHANNELWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
_CHANNELWISE_FUNCTIONS: set[Callable[..., Any]] = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, torch.sigmoid, torch.tanh, torch.abs, torch.neg, operator.neg, torch.clone, F.dropout,
    F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.interpolate,
}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "clone",
                        "contiguous", "detach"}
_ELEMENTWISE_BINARY: set[Any] = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                                 operator.imul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
                                 "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_RESHAPES: set[Any] = {torch.flatten, torch.reshape, torch.squeeze, "flatten", "view", "reshape", "squeeze"}
_REDUCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
_PADS: set[Any] = {F.pad, torch._C._nn.pad}
_SHAPE_QUERIES: set[Any] = {"size", "dim", getattr}


@dataclass
class ChannelGroup:
    """Channel axes that must be permuted together, and the tensor axes (`state_dict` names) they index."""

    size: int
    bindings: list[tuple[str, int]] = field(default_factory=list)
    fixed: str | None = None  # why the group must stay as it is; None: free
    # (narrower group, offset, its size): the slots offset..offset+size-1 copy that group's permutation
    inherits: list[tuple[int, int, int]] = field(default_factory=list)

    def own_slots(self) -> Tensor:
        """Slots not decided by an embedded narrower group (the zero padding): free among themselves."""
        taken = torch.zeros(self.size, dtype=torch.bool)
        for _, offset, size in self.inherits:
            taken[offset:offset + size] = True
        return (~taken).nonzero().squeeze(1)


# ------------------------------------------------------------------------------------------ the analysis


class _Spaces:
    """Union-find over channel spaces, with bindings, embeddings and the reasons a space must stay fixed."""

    def __init__(self, canonical: dict[str, str]) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.of: dict[fx.Node, int] = {}
        self.bound: dict[tuple[str, int], int] = {}
        self.fixed: dict[int, str] = {}
        self.embeds: list[tuple[int, int, int]] = []  # (narrow space, wide space, offset)
        self.frozen: set[str] = set()  # tensors used in a way the analysis does not understand
        self.canonical = canonical

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.size[a] != self.size[b]:
                raise AssertionError(f"tied channel spaces of different sizes {self.size[a]} and {self.size[b]}")
            self.parent[b] = a
        return a

    def new(self, node: fx.Node | None, size: int, fixed: str | None = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(size)
        if node is not None:
            self.of[node] = s
        if fixed:
            self.fixed.setdefault(s, fixed)
        return s

    def new_for(self, node: fx.Node, fixed: str | None = None) -> int | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return self.new(node, shape[1], fixed)

    def tie(self, node: fx.Node, space: int) -> None:
        self.of[node] = space

    def fix(self, node: Any, reason: str) -> None:
        if isinstance(node, fx.Node) and node in self.of:
            self.fixed.setdefault(self.of[node], reason)

    def bind(self, space: int, module_name: str, attr: str, axis: int) -> None:
        full = f"{module_name}.{attr}" if module_name else attr
        key = (self.canonical.get(full, full), axis)
        self.bound[key] = self.union(self.bound[key], space) if key in self.bound else space


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _other_tensor_inputs(node: fx.Node, first: Any) -> bool:
    """Whether the node reads a tensor besides `first` (its reading is then not understood)."""
    return any(_shape(n) is not None for n in node.all_input_nodes if n is not first)


def _visit_module(node: fx.Node, module: nn.Module, sp: _Spaces) -> bool:
    """Rules for leaf modules; False when the call is not understood."""
    x = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if x not in sp.of or _shape(node) is None:
        return False
    name, xs = str(node.target), sp.of[x]
    if isinstance(module, _CONVS):
        if module.groups == 1:
            sp.bind(xs, name, "weight", 1)
            out = sp.new(node, module.out_channels)
        elif module.groups == module.in_channels == module.out_channels:
            out = xs  # depthwise: output channel c reads input channel c only
            sp.tie(node, out)
        else:
            return False
        sp.bind(out, name, "weight", 0)
        if module.bias is not None:
            sp.bind(out, name, "bias", 0)
        return True
    if isinstance(module, nn.Linear):
        if len(_shape(x)) != 2:
            return False
        sp.bind(xs, name, "weight", 1)
        out = sp.new(node, module.out_features)
        sp.bind(out, name, "weight", 0)
        if module.bias is not None:
            sp.bind(out, name, "bias", 0)
        return True
    if isinstance(module, _NORMS):
        sp.tie(node, xs)
        for attr in _NORM_TENSORS:
            if getattr(module, attr, None) is not None:
                sp.bind(xs, name, attr, 0)
        return True
    if isinstance(module, _CHANNELWISE_MODULES):
        return _tie_channelwise(node, x, sp)
    if isinstance(module, nn.Flatten):
        return _tie_if_channels_kept(node, x, sp)
    return False


def _tie_channelwise(node: fx.Node, x: Any, sp: _Spaces) -> bool:
    """Keep the space when each output channel reads its own input channel (shape sanity-checked)."""
    out, inp = _shape(node), _shape(x)
    if x not in sp.of or out is None or inp is None or len(out) != len(inp) or out[1] != inp[1]:
        return False
    sp.tie(node, sp.of[x])
    return True


def _tie_if_channels_kept(node: fx.Node, x: Any, sp: _Spaces) -> bool:
    """A reshape keeping dims 0 and 1 keeps every channel's block of elements in place (row-major)."""
    out, inp = _shape(node), _shape(x)
    if x not in sp.of or out is None or inp is None or len(out) < 2 or out[:2] != inp[:2]:
        return False
    sp.tie(node, sp.of[x])
    return True


def _visit_binary(node: fx.Node, sp: _Spaces) -> bool:
    """Elementwise a (op) b: operands carrying the output's channels are tied; size-1 channel dims broadcast."""
    out = _shape(node)
    if out is None or len(out) < 2 or len(node.args) != 2:
        return False
    carriers = []
    for arg in node.args:
        if isinstance(arg, (int, float, bool)):
            continue
        shape = _shape(arg)
        if shape is None or len(shape) != len(out) or arg not in sp.of:
            return False
        if shape[1] == out[1]:
            carriers.append(sp.of[arg])
        elif shape[1] != 1:
            return False
    if not carriers:
        return False
    space = carriers[0]
    for other in carriers[1:]:
        space = sp.union(space, other)
    sp.tie(node, space)
    return True


def _visit_reduction(node: fx.Node, x: Any, sp: _Spaces) -> bool:
    """mean/sum/amax over spatial dims only keep the channel axis at dim 1."""
    inp = _shape(x)
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if inp is None or dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims) or {d % len(inp) for d in dims} & {0, 1}:
        return False
    return _tie_if_channels_kept(node, x, sp) if x in sp.of else False


def _visit_pad(node: fx.Node, x: Any, sp: _Spaces) -> bool:
    """Constant padding: spatial only keeps the space; on the channel axis it embeds x at offset `front`."""
    inp, out = _shape(x), _shape(node)
    pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    if x not in sp.of or inp is None or out is None or mode != "constant" or not isinstance(pad, (tuple, list)):
        return False
    if not all(isinstance(p, int) and p >= 0 for p in pad) or len(pad) > 2 * (len(inp) - 1):
        return False  # negative pads crop; pads reaching dim 0 are not understood
    channel_pair = 2 * (len(inp) - 2)
    front, back = (pad[channel_pair], pad[channel_pair + 1]) if len(pad) > channel_pair else (0, 0)
    if front == back == 0:
        sp.tie(node, sp.of[x])
    else:
        sp.embeds.append((sp.of[x], sp.new(node, out[1]), front))
    return True


def _visit_getitem(node: fx.Node, x: Any, sp: _Spaces) -> bool:
    """Basic slicing that leaves the channel axis whole keeps the space."""
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) for i in index):
        return False
    if len(index) > 1 and index[1] != slice(None):
        return False
    return _tie_channelwise(node, x, sp)


def _visit_function(node: fx.Node, sp: _Spaces) -> bool:
    """Rules for call_function / call_method nodes; False when the call is not understood."""
    target = node.target
    if target in _SHAPE_QUERIES and _shape(node) is None:
        return True  # x.size(), x.shape: read the shape, not the channels
    if target in _ELEMENTWISE_BINARY:
        return _visit_binary(node, sp)
    x = node.args[0] if node.args else None
    if _other_tensor_inputs(node, x):
        return False
    if target in _CHANNELWISE_FUNCTIONS or target in _CHANNELWISE_METHODS:
        return _tie_channelwise(node, x, sp)
    if target in _RESHAPES:
        return _tie_if_channels_kept(node, x, sp)
    if target in _REDUCTIONS:
        return _visit_reduction(node, x, sp)
    if target in _PADS:
        return _visit_pad(node, x, sp)
    if target is operator.getitem:
        return _visit_getitem(node, x, sp)
    return False


def _not_understood(node: fx.Node, sp: _Spaces, model: nn.Module) -> None:
    """Fix every space the node reads and give its output a fixed space; freeze a module's own tensors."""
    reason = f"not understood: {node.op} {getattr(node.target, '__name__', node.target)}"
    for arg in node.all_input_nodes:
        sp.fix(arg, reason)
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        sp.frozen.update(sp.canonical.get(f"{node.target}.{n}", f"{node.target}.{n}")
                         for n, _ in [*module.named_parameters(), *module.named_buffers()])
    sp.new_for(node, fixed=reason)


def _visit(node: fx.Node, sp: _Spaces, model: nn.Module) -> None:
    if node.op == "placeholder":
        sp.new_for(node, fixed="network input")
    elif node.op == "get_attr":
        sp.frozen.add(sp.canonical.get(str(node.target), str(node.target)))
        sp.new_for(node, fixed="tensor read directly")
    elif node.op == "output":
        for arg in node.all_input_nodes:
            sp.fix(arg, "network output")
    else:
        understood = (_visit_module(node, model.get_submodule(str(node.target)), sp) if node.op == "call_module"
                      else _visit_function(node, sp))
        if not understood:
            _not_understood(node, sp, model)


# ------------------------------------------------------------------------------------------------ groups


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every state-dict name -> the first name of the same tensor, so a shared parameter is bound once."""
    first: dict[int, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: first.setdefault(id(tensor), name) for name, tensor in named}


def _default_example(model: nn.Module) -> Tensor:
    """A batch of 2 zero inputs sized for the first conv or Linear (32 pixels per spatial dim)."""
    for module in model.modules():
        if isinstance(module, _CONVS):
            shape = (2, module.in_channels, *[32] * (module.weight.dim() - 2))
        elif isinstance(module, nn.Linear):
            shape = (2, module.in_features)
        else:
            continue
        return torch.zeros(shape, dtype=module.weight.dtype, device=module.weight.device)
    raise NernError(f"cannot guess an input for {type(model).__name__} (no conv or Linear); pass example_input")


def _traced(model: nn.Module, example_input: Tensor | None) -> fx.GraphModule:
    """The fx graph with every node's output shape, from one eval-mode run (BN statistics untouched)."""
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise NernError(f"torch.fx cannot trace {type(model).__name__} ({str(exc).splitlines()[0]}); "
                        "use a coordinate permutation (--mode crossfilter or infilter) instead") from exc
    example = _default_example(model) if example_input is None else example_input
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    except Exception as exc:
        raise NernError(f"{type(model).__name__} does not run on an input of shape {tuple(example.shape)} "
                        f"({str(exc).splitlines()[0]}); pass an example_input it accepts") from exc
    finally:
        for module, training in modes.items():
            module.train(training)
    return graph_module


def _collect_groups(sp: _Spaces) -> tuple[dict[int, ChannelGroup], list[tuple[int, int, int]]]:
    """One group per union of spaces that binds a tensor or takes part in an embedding."""
    edges = [(sp.find(n), sp.find(w), off) for n, w, off in sp.embeds]
    roots = {sp.find(s) for s in sp.bound.values()} | {r for n, w, _ in edges for r in (n, w)}
    groups = {r: ChannelGroup(sp.size[r]) for r in sorted(roots)}
    for (name, axis), space in sorted(sp.bound.items()):
        group = groups[sp.find(space)]
        group.bindings.append((name, axis))
        if name in sp.frozen:
            group.fixed = group.fixed or f"{name} is used outside the analysis"
    for space, reason in sp.fixed.items():
        root = sp.find(space)
        if root in groups:
            groups[root].fixed = groups[root].fixed or reason
    return groups, edges


def _embedding_order(groups: dict[int, ChannelGroup], edges: list[tuple[int, int, int]]) -> list[int]:
    """Narrow groups before the wide ones they are embedded in; groups the rules cannot order get fixed."""
    by_wide: dict[int, list[tuple[int, int]]] = {}
    for n, w, off in edges:
        if n == w:
            groups[w].fixed = groups[w].fixed or "embedded into itself"
        by_wide.setdefault(w, []).append((off, n))
    for w, parts in by_wide.items():
        spans = sorted((off, off + groups[n].size) for off, n in parts)
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])) or spans[-1][1] > groups[w].size:
            for g in (w, *(n for _, n in parts)):
                groups[g].fixed = groups[g].fixed or "overlapping embeddings"
    indegree = {g: 0 for g in groups}
    for n, w, _ in edges:
        indegree[w] += n != w
    order = [g for g in groups if indegree[g] == 0]
    for g in order:  # Kahn's algorithm; the list grows while it is walked
        for n, w, _ in edges:
            if n == g and w != g:
                indegree[w] -= 1
                if indegree[w] == 0:
                    order.append(w)
    for g in groups:
        if g not in order:
            groups[g].fixed = groups[g].fixed or "cyclic embedding"
            order.append(g)
    return order


def _propagate_fixed(groups: dict[int, ChannelGroup], edges: list[tuple[int, int, int]]) -> None:
    """A fixed wide group keeps its embedded slots, so the narrow group copied onto them stays too."""
    changed = True
    while changed:
        changed = False
        for n, w, _ in edges:
            if groups[w].fixed and not groups[n].fixed:
                groups[n].fixed, changed = f"embedded into a fixed group ({groups[w].fixed})", True


def channel_groups(model: nn.Module, example_input: Tensor | None = None) -> list[ChannelGroup]:
    """The model's channel groups, narrow before wide (an embedded group's permutation is needed first)."""
    sp = _Spaces(_canonical_names(model))
    for node in _traced(model, example_input).graph.nodes:
        _visit(node, sp, model)
    groups, edges = _collect_groups(sp)
    order = _embedding_order(groups, edges)
    _propagate_fixed(groups, edges)
    index = {root: i for i, root in enumerate(order)}
    for n, w, off in edges:
        if n != w:
            groups[w].inherits.append((index[n], off, groups[n].size))
    return [groups[root] for root in order]


# ------------------------------------------------------------------------------------------ permutations


def compose_permutations(groups: Sequence[ChannelGroup], own_orders: Sequence[Tensor | None]) -> list[Tensor]:
    """Full permutations from each free group's order of its own slots (None: keep them).

    `perm[k]` is the old channel placed at new position k. Inherited slots copy the narrow group's
    permutation, shifted by the offset; fixed groups get the identity.
    """
    perms: list[Tensor] = []
    for group, order in zip(groups, own_orders, strict=True):
        perm = torch.arange(group.size)
        if group.fixed is None:
            for narrow, offset, size in group.inherits:
                perm[offset:offset + size] = perms[narrow] + offset
            own = group.own_slots()
            if order is not None:
                perm[own] = own[order.long()]
        perms.append(perm)
    return perms


def check_permutations(groups: Sequence[ChannelGroup], perms: Sequence[Tensor]) -> None:
    """Raise ValueError unless `perms` keeps fixed groups and copies every embedded group's permutation."""
    if len(perms) != len(groups):
        raise ValueError(f"{len(perms)} permutations for {len(groups)} groups")
    for i, (group, perm) in enumerate(zip(groups, perms)):
        if sorted(perm.tolist()) != list(range(group.size)):
            raise ValueError(f"permutation {i} is not a permutation of range({group.size})")
        if group.fixed and not torch.equal(perm, torch.arange(group.size)):
            raise ValueError(f"group {i} is fixed ({group.fixed}) but its permutation is not the identity")
        for narrow, offset, size in group.inherits:
            if not torch.equal(perm[offset:offset + size], perms[narrow] + offset):
                raise ValueError(f"group {i} does not copy the permutation of group {narrow} at offset {offset}")


def permute_groups(model: nn.Module, groups: Sequence[ChannelGroup], perms: Sequence[Tensor]) -> nn.Module:
    """A copy of `model` with every group's tensors permuted along their bound axes (the same function)."""
    check_permutations(groups, perms)
    permuted = copy.deepcopy(model)
    tensors = {**dict(permuted.named_parameters(remove_duplicate=False)),
               **dict(permuted.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for group, perm in zip(groups, perms):
            if torch.equal(perm, torch.arange(group.size)):
                continue
            for name, axis in group.bindings:
                tensor = tensors[name]
                tensor.copy_(tensor.index_select(axis, perm.to(tensor.device)))
    return permuted


# ----------------------------------------------------------------------------------- choosing the orders


def _unit_kernels(weight: Tensor) -> Tensor:
    """[Cout, Cin, k*k] kernels scaled to unit length; zero kernels stay zero (cosine 0 to all)."""
    kernels = weight.detach().float().cpu().reshape(weight.shape[0], weight.shape[1], -1)
    norms = kernels.norm(dim=2, keepdim=True)
    return torch.where(norms > 0, kernels / norms.clamp_min(1e-30), torch.zeros_like(kernels))


def _slot_features(group: ChannelGroup, represented: dict[str, Tensor], features: Features) -> Tensor:
    """Per channel of the group: its unit kernels in every represented conv bound to it, side by side."""
    parts = []
    for name, axis in group.bindings:
        weight = represented.get(name)
        if weight is None or axis > 1 or (axis == 0 and features == "input"):
            continue
        unit = _unit_kernels(weight)
        parts.append(unit.reshape(unit.shape[0], -1) if axis == 0 else unit.transpose(0, 1).reshape(unit.shape[1], -1))
    return torch.cat(parts, dim=1) if parts else torch.zeros(group.size, 0)


def _extended_features(groups: Sequence[ChannelGroup], own: list[Tensor]) -> list[Tensor]:
    """A channel's features plus those of the slots it decides in wider groups (transitively)."""
    wider: list[list[tuple[int, int]]] = [[] for _ in groups]
    for w, group in enumerate(groups):
        for narrow, offset, _ in group.inherits:
            wider[narrow].append((w, offset))
    ext: list[Tensor] = [torch.empty(0)] * len(groups)
    for i in reversed(range(len(groups))):  # wide groups come after their narrow ones
        size = groups[i].size
        ext[i] = torch.cat([own[i], *(ext[w][off:off + size] for w, off in wider[i])], dim=1)
    return ext


def _compact(vectors: Tensor) -> Tensor:
    """Rows with the same dot products in at most n dimensions (R^T of a QR of the transpose).

    A wide stream's channels have tens of thousands of feature dimensions; the chain code's refinement
    gathers whole rows per candidate move, so it slows down with the width, not the count.
    """
    if vectors.shape[1] <= vectors.shape[0]:
        return vectors
    return torch.linalg.qr(vectors.double().t(), mode="reduced").R.t().float()


def _best_chain(vectors: Tensor) -> Tensor | None:
    """The better (by mean neighbour cosine) of the paper's greedy chain and the fast chain."""
    n = vectors.shape[0]
    if n < 2 or vectors.shape[1] == 0 or not bool(vectors.abs().sum() > 0):
        return None
    vectors = _compact(vectors)
    greedy = greedy_chain(vectors)
    if n < 4:
        return greedy
    fast = fast_chain(vectors)
    return fast if chain_quality(vectors, fast) > chain_quality(vectors, greedy) else greedy


def identity_chain_quality(model: nn.Module, represent_cfg: RepresentConfig | None = None) -> float:
    """Chain quality of the represented layers on their own grid (identity coordinates: nothing stored)."""
    layers = find_conv_layers(model, represent_cfg)
    positions = [identity_permutation(layer.shape[0], layer.shape[1]) for layer in layers]
    return chain_quality_of_positions(conv_weights(model, layers), positions)


def symmetry_permute(model: nn.Module, represent_cfg: RepresentConfig | None = None,
                     example_input: Tensor | None = None, features: Features = "both",
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """A permuted copy of `model` (the same function, smoother kernel grids) and a report of what was done."""
    if features not in ("both", "input"):
        raise NernError(f"unknown symmetry features {features!r}; choose 'both' or 'input'")
    start = time.perf_counter()
    groups = channel_groups(model, example_input)
    canonical = _canonical_names(model)
    layers = find_conv_layers(model, represent_cfg)
    represented = {canonical.get(layer.param, layer.param): w for layer, w in zip(layers, conv_weights(model, layers))}
    ext = _extended_features(groups, [_slot_features(g, represented, features) for g in groups])
    orders = [None if g.fixed else _best_chain(ext[i][g.own_slots()]) for i, g in enumerate(groups)]
    perms = compose_permutations(groups, orders)
    permuted = permute_groups(model, groups, perms)
    report = {
        "mode": "symmetry", "features": features, "groups": len(groups),
        "free_groups": sum(g.fixed is None for g in groups),
        "moved_channels": int(sum(int((p != torch.arange(p.numel())).sum()) for p in perms)),
        "fixed": sorted({g.fixed for g in groups if g.fixed}),
        "chain_quality_none": identity_chain_quality(model, represent_cfg),
        "chain_quality": identity_chain_quality(permuted, represent_cfg),
        "permutation_bytes": 0, "seconds": time.perf_counter() - start,
    }
    return permuted, report
