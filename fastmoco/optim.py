"""The optimizers a run can use (config `optim.name`): AdamW (the ViT recipes of MoCo v3 and DINO) and
LARS (MoCo v3's ResNet-50 recipe), both client optimizers that DeepSpeed wraps (no C++ op to build),
and what happens to the gradients right before they step (`GradientRules`: DINO's per-parameter
clipping and its frozen last layer).

    optimizer = build_optimizer(cfg.optim, groups, lr=lrs[0], use_cuda=..., zero_stage=..., clip_per_parameter=...)
    engine, wrapper, ... = deepspeed.initialize(..., optimizer=optimizer)
    after_initialize(optimizer, wrapper)   # where each parameter lies in what the wrapper steps; rules on

LARS follows the official moco/optimizer.py: a parameter of ndim > 1 takes weight decay and the
per-tensor trust ratio, biases and BatchNorm parameters (ndim 1) neither; SGD momentum on an fp32
buffer. Its step is `fastmoco.ops.lars_`: the fused Triton kernels (three launches per group, whatever
the number of parameters) on CUDA, the official per-parameter loop otherwise.

LARS and ZeRO: the trust ratio needs each parameter's whole norm. ZeRO-1/2 step the client optimizer
once per group on this rank's slice of the group's flat fp32 buffer, where parameter boundaries and ndim
are gone. `LARS.locate_partitions(wrapper)` (the Trainer calls it after deepspeed.initialize) records
where each parameter lies in that slice (its offset in the flat buffer, as fastmoco/momentum.py locates
the EMA's master); a step on a slice is then one LARS step over the parameters' pieces
(`kernels/lars.py` `Pieces`): per-parameter partial sums of squares, one all-reduce of a (2, parameters)
fp32 table over the data-parallel group, the update on the slice (the alignment padding untouched).
ZeRO-3 (a shard of every parameter, the same rule would need its own layout) is refused at build time;
a flat buffer that was not located is refused at the first step.

Where parameters lie (`locate_partitions`, shared by LARS and the gradient rules): ZeRO-1/2 and
DeepSpeed's BF16_Optimizer step each group's flat fp32 partition (rank r: elements [r*P, (r+1)*P) of
the group's flat buffer); ZeRO-3 steps each sub-group's flat fp32 buffer of this rank's shards (rank r:
elements [r*S, (r+1)*S) of each flattened parameter, the last shard zero padded). Each is described by
its pieces: (start, length) in the flat tensor and the group parameter each belongs to.

Per-parameter clipping (DINO's utils.clip_gradients: every parameter's gradient scaled by
max_norm / (||g|| + 1e-6) where that is < 1): `clip_per_parameter_` on plain tensors, or on pieces of
parameters whose sums of squares are summed per parameter and over the ranks (one all-reduce of one
fp32 value per parameter per group). Multi-tensor ops, no per-parameter Python loop, no host sync.
DeepSpeed's own `gradient_clipping` is the other rule: the global norm over all parameters.

The frozen last layer (DINO's cancel_gradients_last_layer: gradients set to None in the first
`freeze_last_layer` epochs, so AdamW skips the layer: no moments, no step count): the Trainer marks a
group `frozen` per step; `GradientRules` drops its gradients before the step (under ZeRO the group's
flat partition: the last layer is a group of its own, fastmoco/dino.py `param_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from fastmoco import ops
from fastmoco.config import ConfigError
from fastmoco.kernels.lars import Pieces
from fastmoco.momentum import offset_in

OPTIMIZERS = ("adamw", "lars")
CLIP_EPS = 1e-6  # DINO's clip_gradients: max_norm / (norm + 1e-6)


@dataclass(frozen=True)
class Partition:
    """Where a group's parameters lie in one flat fp32 tensor that a ZeRO wrapper steps on this rank.

    spans: (start, length) of each piece, ascending; owner: the group's parameter each piece is part
    of; shapes: every parameter's full shape, in group order; all_reduce: sums a tensor in place over
    the ranks that hold the group's other pieces; device: the flat tensor's."""
    numel: int
    device: torch.device
    spans: tuple[tuple[int, int], ...]
    owner: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    all_reduce: Callable[[torch.Tensor], None]


def _all_reduce_over(pg) -> Callable[[torch.Tensor], None]:
    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=pg)
    return all_reduce


def _slice_pieces(group, flat16, lo: int, size: int) -> tuple[list, list]:
    """ZeRO-1/2 / BF16_Optimizer: the parts of the group's parameters inside [lo, lo + size) of the flat buffer."""
    spans, owner = [], []
    for n, p in enumerate(group):
        off = offset_in(p.data, flat16, f"parameter {n} {tuple(p.shape)}")
        a, b = max(off, lo), min(off + p.numel(), lo + size)
        if a < b:
            spans.append((a - lo, b - a))
            owner.append(n)
    return spans, owner


def locate_partitions(wrapper) -> dict[int, Partition]:
    """After deepspeed.initialize: each flat fp32 tensor the client optimizer will step (keyed by id),
    with where the parameters lie in it. Empty for wrappers that step whole parameters (ZeRO-0)."""
    out: dict[int, Partition] = {}
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of shards
        pg = wrapper.dp_process_group
        rank = dist.get_rank(group=pg)
        for flat16, flat32, group in zip(wrapper.fp16_partitioned_groups_flat, wrapper.fp32_partitioned_groups_flat,
                                         wrapper.fp16_groups):
            pieces = []
            for n, p in enumerate(group):
                off = offset_in(p.ds_tensor, flat16, f"ZeRO-3 shard of parameter {n} {tuple(p.ds_shape)}")
                part = p.ds_tensor.numel()
                length = max(0, min(part, p.ds_numel - rank * part))  # the last shard's padding left out
                if length:
                    pieces.append(((off, length), n))
            out[id(flat32)] = Partition(flat32.numel(), flat32.device, tuple(s for s, _ in pieces),
                                        tuple(n for _, n in pieces), tuple(tuple(p.ds_shape) for p in group),
                                        _all_reduce_over(pg))
        return out
    if hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flats16, parts32, groups = (wrapper.bit16_groups_flat, wrapper.single_partition_of_fp32_groups,
                                    wrapper.bit16_groups)
    elif hasattr(wrapper, "fp32_groups_flat_partition"):  # DeepSpeed's BF16_Optimizer
        flats16, parts32, groups = wrapper.bf16_groups_flat, wrapper.fp32_groups_flat_partition, wrapper.bf16_groups
    else:
        return out
    for i, (flat16, part32, group) in enumerate(zip(flats16, parts32, groups)):
        pg = wrapper.real_dp_process_group[i]
        size = part32.numel()
        spans, owner = _slice_pieces(group, flat16, dist.get_rank(group=pg) * size, size)
        out[id(part32)] = Partition(size, part32.device, tuple(spans), tuple(owner),
                                    tuple(tuple(p.shape) for p in group), _all_reduce_over(pg))
    return out


def _parameter_norms(grads: list[torch.Tensor], owner: torch.Tensor | None, num_params: int | None,
                     all_reduce: Callable[[torch.Tensor], None] | None, device: torch.device) -> torch.Tensor:
    """(parameters,) fp32 gradient norms: of each tensor, or (with `owner`) the root of the pieces' sums
    of squares summed per parameter and over the ranks."""
    if owner is None:
        return torch.stack(torch._foreach_norm(grads)).float()
    sq = torch.zeros(num_params + 1, dtype=torch.float32, device=device)   # + 1: the padding's slot
    if grads:
        sq.index_add_(0, owner, torch.stack(torch._foreach_norm(grads)).float().square())
    if all_reduce is not None:
        all_reduce(sq)
    return sq[:num_params].sqrt()


def _clip_scale(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """DINO's rule: c = max_norm / (norm + 1e-6), applied where c < 1 (else the gradient is left as is)."""
    coef = max_norm / (norms + CLIP_EPS)
    return torch.where(coef < 1, coef, torch.ones_like(coef))


@torch.no_grad()
def clip_per_parameter_(grads: list[torch.Tensor], max_norm: float, *, owner: torch.Tensor | None = None,
                        num_params: int | None = None,
                        all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """DINO's utils.clip_gradients on tensors, in place: each parameter's gradient g scaled by
    c = max_norm / (||g|| + 1e-6) where c < 1. Returns the (parameters,) fp32 norms before clipping
    (on the device: no host sync; the official returns them as host floats).

    Without `owner` each tensor is a whole parameter. With `owner` ((tensors,) int64 on the device)
    tensor k is a piece of parameter owner[k] of `num_params` (owner num_params: padding, left as it
    is): a parameter's norm is the root of its pieces' sums of squares, summed over the ranks by
    `all_reduce` (every rank calls it, also one whose list is empty)."""
    if owner is None and not grads:
        return torch.zeros(0, dtype=torch.float32)
    device = grads[0].device if grads else owner.device
    norms = _parameter_norms(grads, owner, num_params, all_reduce, device)
    if grads:
        scale = _clip_scale(norms, max_norm)
        if owner is not None:
            scale = torch.cat([scale, scale.new_ones(1)])[owner]  # padding: 1
        torch._foreach_mul_(grads, list(scale.to(grads[0].dtype).unbind()))
    return norms


class _Segments:
    """A located flat tensor cut into consecutive segments (the pieces and the gaps between them): one
    `torch.split` gives every piece's view for the norms, and one repeat_interleave of the segments'
    scales the factor of every element (two launches, not one per parameter)."""

    def __init__(self, part: Partition):
        lengths, owner, at = [], [], 0
        for (start, length), n in zip(part.spans, part.owner):
            if start > at:
                lengths.append(start - at)
                owner.append(len(part.shapes))  # a gap: padding between parameters
            lengths.append(length)
            owner.append(n)
            at = start + length
        if at < part.numel:
            lengths.append(part.numel - at)
            owner.append(len(part.shapes))
        self.numel = part.numel
        self.lengths = lengths
        self.lengths_dev = torch.tensor(lengths, dtype=torch.int64, device=part.device)
        self.owner = torch.tensor(owner, dtype=torch.int64, device=part.device)
        self.num_params = len(part.shapes)
        self.all_reduce = part.all_reduce

    @torch.no_grad()
    def clip_(self, grad: torch.Tensor, max_norm: float) -> None:
        """`clip_per_parameter_` of the pieces of this flat gradient, in place."""
        norms = _parameter_norms(list(torch.split(grad, self.lengths)), self.owner, self.num_params,
                                 self.all_reduce, grad.device)
        scale = torch.cat([_clip_scale(norms, max_norm), norms.new_ones(1)])[self.owner]   # (segments,)
        grad.mul_(torch.repeat_interleave(scale.to(grad.dtype), self.lengths_dev, output_size=self.numel))


class GradientRules:
    """Applied to the gradients the client optimizer is about to step, in a step pre-hook (so under
    every ZeRO stage they see the reduced fp32 gradients of exactly the tensors being stepped):

    - a group whose dict says `frozen` has its gradients set to None: the optimizer skips it (DINO's
      cancel_gradients_last_layer; AdamW then keeps no moments and no step count for it);
    - `clip_per_parameter` > 0: each parameter's gradient clipped to that norm on its own
      (`clip_per_parameter_`; under ZeRO over the located pieces, `locate`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip_per_parameter: float = 0.0):
        if clip_per_parameter < 0:
            raise ValueError(f"clip_per_parameter must be >= 0, got {clip_per_parameter}")
        self.clip = clip_per_parameter
        self._optimizer = optimizer
        self._whole: set[int] = set()
        self._segments: dict[int, _Segments] = {}
        self._active = False  # until locate(): a wrapper may step the optimizer while it is built
        optimizer.register_step_pre_hook(self._before_step)

    def locate(self, wrapper) -> None:
        """After deepspeed.initialize (`wrapper`: what it returned, or None without DeepSpeed): where each
        parameter lies in the flat tensors the wrapper steps; any other tensor the optimizer now holds is
        a whole parameter (ZeRO-0 under bf16: the wrapper's fp32 copies). The rules apply from now on."""
        if self.clip and wrapper is not None:
            self._segments = {key: _Segments(part) for key, part in locate_partitions(wrapper).items()}
        self._whole = {id(p) for g in self._optimizer.param_groups for p in g["params"]} - set(self._segments)
        self._active = True

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._active:
            return
        for group in optimizer.param_groups:
            params = group["params"]
            if not params:  # ZeRO-3 empties the groups it is not stepping
                continue
            if group.get("frozen"):
                for p in params:  # one flat partition under ZeRO; the layer's parameters otherwise
                    p.grad = None
            elif self.clip:
                self._clip(params)

    def _clip(self, params: list[torch.Tensor]) -> None:
        seg = self._segments.get(id(params[0])) if len(params) == 1 else None
        if seg is not None:
            if params[0].grad is None:
                raise ValueError("per-parameter clipping: a located flat partition has no gradient")
            seg.clip_(params[0].grad, self.clip)
            return
        if id(params[0]) not in self._whole:
            raise ValueError(f"per-parameter clipping: the optimizer steps a tensor of {params[0].numel()} elements "
                             "that is not one of its parameters, and was not located (a ZeRO wrapper's flat "
                             "partition?): call after_initialize(optimizer, wrapper) after deepspeed.initialize")
        clip_per_parameter_([p.grad for p in params if p.grad is not None], self.clip)


class LARS(torch.optim.Optimizer):
    """LARS with MoCo v3's exclusions (no weight decay, no adaptation for ndim <= 1). State per parameter:
    `mu`, the fp32 momentum buffer. Group keys: lr, weight_decay, momentum, trust_coefficient."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                            ("trust_coefficient", trust_coefficient)):
            if value < 0:
                raise ValueError(f"LARS {name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))
        # What each group held when built: a wrapper that swaps in flat partitions it did not let
        # `locate_partitions` see is caught at the first step.
        self._shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        # id(flat fp32 partition) -> (its parameters' pieces as (start, length) in it, Pieces without tensors)
        self._partitions: dict[int, tuple[list[tuple[int, int]], Pieces]] = {}

    def locate_partitions(self, wrapper) -> None:
        """After deepspeed.initialize: under ZeRO-1/2 (and DeepSpeed's BF16_Optimizer) record where each
        parameter of each group lies in this rank's fp32 partition (`locate_partitions`); otherwise nothing."""
        for key, part in locate_partitions(wrapper).items():
            adapted = tuple(len(s) > 1 for s in part.shapes)
            sums = torch.zeros(2, len(part.shapes), dtype=torch.float32, device=part.device)
            self._partitions[key] = (list(part.spans), Pieces(part.owner, adapted, sums, part.all_reduce))

    def _check_whole_tensors(self) -> None:
        shapes = [[tuple(p.shape) for p in g["params"]] for g in self.param_groups]
        if shapes != self._shapes:
            got = [s for g in shapes for s in g][:3]
            raise ValueError(f"LARS is stepped on tensors of shapes {got}..., not the {sum(map(len, self._shapes))} "
                             "parameters it was built with: a flat-partition wrapper hides the per-parameter "
                             "norms the trust ratio needs; under ZeRO-1/2 call LARS.locate_partitions(wrapper) "
                             "after deepspeed.initialize; ZeRO-3 is not supported: use "
                             "deepspeed.zero_optimization.stage 0, 1 or 2")
        self._shapes = None  # checked once

    def _mu(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "mu" not in state:  # first step only
            state["mu"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state["mu"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hp = ("lr", "weight_decay", "momentum", "trust_coefficient")
        for g in self.param_groups:
            located = self._partitions.get(id(g["params"][0])) if len(g["params"]) == 1 else None
            if located is not None:  # ZeRO-1/2: this rank's slice of the group's flat buffer
                part, (spans, pieces) = g["params"][0], located
                grad, mu = part.grad, self._mu(part)
                ops.lars_([part[a:a + n] for a, n in spans], [grad[a:a + n] for a, n in spans],
                          [mu[a:a + n] for a, n in spans], pieces=pieces, **{k: g[k] for k in hp})
                continue
            if self._shapes is not None:
                self._check_whole_tensors()
            params = [p for p in g["params"] if p.grad is not None]
            if params:
                ops.lars_(params, [p.grad for p in params], [self._mu(p) for p in params],
                          **{k: g[k] for k in hp})
        return loss


def build_optimizer(optim_cfg, groups: list[dict], *, lr: float, use_cuda: bool, zero_stage: int,
                    clip_per_parameter: float = 0.0) -> torch.optim.Optimizer:
    """The run's optimizer over the method's parameter groups (fastmoco/methods.py), with its
    `GradientRules` (frozen groups, per-parameter clipping) attached as `optimizer.gradient_rules`."""
    o = optim_cfg
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                fused=use_cuda)
    elif o.name == "lars":
        if zero_stage > 2:
            raise ConfigError(f"optim.name lars needs deepspeed.zero_optimization.stage 0, 1 or 2, got "
                              f"{zero_stage}: ZeRO-3 shards every parameter, and LARS locates its per-parameter "
                              "norms in ZeRO-1/2's flat partitions only")
        opt = LARS(groups, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                   trust_coefficient=o.trust_coefficient)
    else:
        raise ConfigError(f"optim.name {o.name!r} unknown (known: {', '.join(OPTIMIZERS)})")
    opt.gradient_rules = GradientRules(opt, clip_per_parameter)
    return opt


def after_initialize(optimizer: torch.optim.Optimizer, wrapper) -> None:
    """After deepspeed.initialize(optimizer=optimizer) returned `wrapper`: everything that needs to know
    where the parameters lie in the tensors the wrapper steps (LARS's norms, per-parameter clipping),
    and the gradient rules switched on.

    DeepSpeed's fp16/bf16 ZeRO-0 wrappers step the optimizer once while they are built, on zero
    gradients, to create its state: every parameter would start training with a step count of 1 that
    the official code's AdamW never took (its bias correction then differs in every early step) and
    the frozen last layer with a state it must not have. That state is dropped here: the optimizer
    counts from the first training step, as the official one does."""
    optimizer.state.clear()
    if isinstance(optimizer, LARS):
        optimizer.locate_partitions(wrapper)
    rules = getattr(optimizer, "gradient_rules", None)
    if rules is not None:
        rules.locate(wrapper)
