"""The momentum encoder's fp32 EMA state, in every precision and ZeRO stage.

    master <- m * master + (1 - m) * online;  copy <- bf16(master)   (one fused op on the GPU)

m and 1 - m come as one (2,) fp32 device tensor, each rounded from the float64 schedule
(`fastmoco.kernels.ema.ema_coefficients`; the methods' step functions pass a row of its table).

`online` is the online encoder's fp32 weights: under bf16 the optimizer's fp32
master (the official code blends fp32 weights; the bf16 module weights are a
rounding of them), read where the optimizer keeps it, so the EMA makes no extra
pass over memory. The momentum master is laid out like that fp32 master:

- fp32 module (CPU, tests): the momentum encoder's own parameters are the master
  and the online encoder's parameters the online weights.
- bf16, ZeRO-0 (DeepSpeed's unfused bf16 optimizer): one fp32 tensor per parameter.
- bf16, ZeRO-1/2 (and DeepSpeed's BF16_Optimizer): each rank owns one contiguous
  partition of every parameter group's flat buffer. The momentum encoder's bf16
  weights become views into a flat buffer laid out like the group's, so the rank
  blends only its partition (fp32 partition -> fp32 master partition -> bf16 copy)
  and one all-gather of the bf16 copy, the same one ZeRO does for the online
  weights, makes the momentum encoder whole on every rank. The predictor's slots
  in that buffer stay unused.
- bf16, ZeRO-3: each rank's shard of each parameter (`param.ds_tensor`); both
  encoders have the same shapes, so their shards cover the same element ranges
  and the EMA itself needs no communication; the small parameters ZeRO-3 keeps
  whole between steps are gathered again after it (`_shard_pieces`).

Under bf16, at construction the momentum master is set to the online encoder's fp32 master
(MoCo starts the momentum encoder as a copy of the online one; DeepSpeed built
its master from the bf16-cast module, so that is the starting point of both).
Parameters the optimizer does not hold (the frozen patch projection) are equal
in both encoders and never change: under bf16 the EMA leaves them out.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastmoco import ops


def local_data(p: torch.Tensor) -> torch.Tensor:
    """The data this rank holds of parameter p: its ZeRO-3 shard, else the whole tensor."""
    return p.ds_tensor.data if hasattr(p, "ds_tensor") else p.data


def offset_in(t: torch.Tensor, flat: torch.Tensor, what: str) -> int:
    """Element offset of tensor t inside the flat buffer that holds its storage."""
    if t.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr() or t.dtype != flat.dtype:
        raise ValueError(f"{what} is not a view of its optimizer group's flat buffer: cannot locate its fp32 master")
    return (t.data_ptr() - flat.data_ptr()) // t.element_size()


def assemble(states: list[dict]) -> dict[int, torch.Tensor]:
    """The full fp32 momentum weights from every rank's `MomentumState.state_dict()` (in rank order),
    keyed by the parameter's index in `momentum_encoder.parameters()` (what exports read)."""
    layout = states[0]["layout"]
    full = {i: torch.zeros(shape, dtype=torch.float32).reshape(-1)
            for i, shape in zip(layout["module_index"], layout["shapes"])}
    for sd in states[:1] if layout["replicated"] else states:
        for mi, ms, pi, ps, n in sd["layout"]["pieces"]:
            full[layout["module_index"][pi]][ps:ps + n] = sd["master"][mi].reshape(-1)[ms:ms + n].float()
    return {i: full[i].view(shape) for i, shape in zip(layout["module_index"], layout["shapes"])}


class MomentumState:
    """Holds the fp32 EMA state of `momentum_params` (the momentum encoder) over `online_params`.

    `optimizer`: the DeepSpeed optimizer wrapper; needed when the module is bf16 (its fp32
    master is what the EMA blends). `rank`: this process's data-parallel rank."""

    def __init__(self, momentum_params: list[torch.Tensor], online_params: list[torch.Tensor],
                 optimizer=None, rank: int = 0):
        if len(momentum_params) != len(online_params):
            raise ValueError("momentum and online encoders differ in parameter count")
        self.rank = rank
        self._publish = None  # after the EMA: make the bf16 copy whole on every rank (ZeRO-1/2)
        # Where master elements belong: (master index, start, index in self.params, start in the
        # flattened parameter, length); `replicated`: every rank holds all of them.
        self._pieces: list[tuple[int, int, int, int, int]] = []
        self._replicated = True
        index_of = {id(q): i for i, q in enumerate(momentum_params)}
        if all(local_data(p).dtype == torch.float32 for p in momentum_params):
            self._from_module(momentum_params, online_params)
            self._module_index = list(range(len(momentum_params)))
            return
        if optimizer is None:
            raise ValueError("the momentum encoder is not fp32: pass the optimizer whose fp32 master "
                             "weights the EMA blends")
        pairs = [(q, p) for q, p in zip(momentum_params, online_params) if p.requires_grad]
        for q, p in pairs:
            if q.shape != p.shape:
                raise ValueError(f"momentum parameter {tuple(q.shape)} != online parameter {tuple(p.shape)}")
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            self._from_zero3(optimizer, pairs)
        elif hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            self._from_flat_partitions(optimizer.bit16_groups_flat, optimizer.single_partition_of_fp32_groups,
                                       optimizer.bit16_groups, pairs)
        elif hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
            self._from_flat_partitions(optimizer.bf16_groups_flat, optimizer.fp32_groups_flat_partition,
                                       optimizer.bf16_groups, pairs)
        elif hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):  # ZeRO-0 bf16
            self._from_param_masters(optimizer.fp16_groups, optimizer.fp32_groups, pairs)
        else:
            raise ValueError(f"optimizer {type(optimizer).__name__}: no fp32 master weights found (expected one "
                             "of DeepSpeed's bf16 optimizers or ZeRO stages 1-3)")
        for t, c in zip(self._online, self._copy):
            if t.device != c.device:
                raise ValueError(f"the optimizer's fp32 master is on {t.device}, the momentum encoder on "
                                 f"{c.device}: optimizer offload is not supported")
        self._module_index = [index_of[id(q)] for q in self.params]
        self._write_copy()

    # -- layouts ------------------------------------------------------------------------------------
    def _from_module(self, momentum_params, online_params) -> None:
        """fp32 module: the parameters (or their ZeRO-3 shards) are the master and online weights."""
        self.params = list(momentum_params)
        self.master = [local_data(q) for q in momentum_params]
        self._ema_master, self._online, self._copy = self.master, [local_data(p) for p in online_params], None
        if hasattr(momentum_params[0], "ds_tensor"):
            self._shard_pieces()
        else:
            self._pieces = [(i, 0, i, 0, q.numel()) for i, q in enumerate(self.params)]

    def _from_param_masters(self, bit16_groups, fp32_groups, pairs) -> None:
        """One fp32 tensor per parameter, the whole of it on every rank."""
        fp32_of = {id(p16): p32 for g16, g32 in zip(bit16_groups, fp32_groups) for p16, p32 in zip(g16, g32)}
        missing = [tuple(p.shape) for _, p in pairs if id(p) not in fp32_of]
        if missing:
            raise ValueError(f"online parameters of shapes {missing} are not in the optimizer")
        self.params = [q for q, _ in pairs]
        self._online = [fp32_of[id(p)].data for _, p in pairs]
        self.master = [t.detach().clone() for t in self._online]
        self._ema_master, self._copy = self.master, [q.data for q in self.params]
        self._pieces = [(i, 0, i, 0, q.numel()) for i, q in enumerate(self.params)]

    def _from_flat_partitions(self, flats16, partitions32, groups, pairs) -> None:
        """ZeRO-1/2: rank r owns elements [r*P, (r+1)*P) of each group's flat buffer."""
        momentum_of = {id(p): q for q, p in pairs}
        self.params, self.master, mflats = [], [], []
        self._replicated = False
        self._ema_master, self._online, self._copy = [], [], []
        for flat16, part32, group in zip(flats16, partitions32, groups):
            size = part32.numel()
            world = flat16.numel() // size
            lo = self.rank * size
            mflat = torch.zeros_like(flat16)  # the momentum encoder's bf16 weights, laid out like the group
            master = torch.zeros_like(part32.data)
            located = sorted((offset_in(p.data, flat16, f"parameter {tuple(p.shape)}"), p) for p in group)
            runs, run = [], None  # element ranges of consecutive online parameters (padding between them included)
            for off, p in located:
                q = momentum_of.get(id(p))
                if q is None:
                    run = None
                    continue
                n = p.numel()
                mflat[off:off + n].copy_(q.data.reshape(-1))
                q.data = mflat[off:off + n].view(q.shape)
                a, b = max(off, lo), min(off + n, lo + size)  # the part inside this rank's partition
                if a < b:
                    self._pieces.append((len(self.master), a - lo, len(self.params), a - off, b - a))
                self.params.append(q)
                if run is None:
                    run = [off, off + n]
                    runs.append(run)
                else:
                    run[1] = off + n
            for start, end in runs:
                a, b = max(start, lo) - lo, min(end, lo + size) - lo  # the part inside this rank's partition
                if a < b:
                    master[a:b] = part32.data[a:b]
                    self._ema_master.append(master[a:b])
                    self._online.append(part32.data[a:b])
                    self._copy.append(mflat[lo + a:lo + b])
            self.master.append(master)
            mflats.append((mflat, lo, size, world))
        if len(self.params) != len(pairs):
            raise ValueError(f"{len(pairs) - len(self.params)} online parameters are not in the optimizer")

        def publish() -> None:
            for mflat, lo, size, world in mflats:
                if world > 1:
                    dist.all_gather_into_tensor(mflat, mflat[lo:lo + size])

        self._publish = publish

    def _from_zero3(self, optimizer, pairs) -> None:
        """ZeRO-3: each trainable shard is a view into its sub-group's flat bf16 buffer, whose fp32 twin
        the optimizer updates; the momentum master is the same shard range in fp32."""
        fp32_of = {}
        for flat16, flat32, group in zip(optimizer.fp16_partitioned_groups_flat,
                                         optimizer.fp32_partitioned_groups_flat, optimizer.fp16_groups):
            for p in group:
                off = offset_in(p.ds_tensor, flat16, f"ZeRO-3 shard of parameter {tuple(p.ds_shape)}")
                fp32_of[id(p)] = flat32.data[off:off + p.ds_tensor.numel()]
        missing = [tuple(p.ds_shape) for _, p in pairs if id(p) not in fp32_of]
        if missing:
            raise ValueError(f"online parameters of shapes {missing} are not in the optimizer")
        self.params = [q for q, _ in pairs]
        self._online = [fp32_of[id(p)] for _, p in pairs]
        self.master = [t.clone() for t in self._online]
        self._ema_master, self._copy = self.master, [q.ds_tensor.data for q in self.params]
        self._shard_pieces()

    def _shard_pieces(self) -> None:
        """ZeRO-3: rank r holds elements [r*part, (r+1)*part) of each flattened parameter, zero padded.

        ZeRO-3 keeps small parameters (under stage3_param_persistence_threshold elements: norms, biases)
        whole on every rank between steps and gathers them again from the shards only after its optimizer
        step. The EMA writes the shards, before the momentum forward (MoCo) or after the optimizer step
        (DINO), so the whole copies of such momentum parameters are released and gathered again after each
        update (one small all-gather), or the momentum forward would read them one update late (measured:
        DINO on two ranks 4e-5 off one process by step 4, exact to fp32 rounding with the gather)."""
        self._replicated = False
        for i, q in enumerate(self.params):
            part = q.ds_tensor.numel()
            start = self.rank * part
            self._pieces.append((i, 0, i, start, max(0, min(part, q.ds_numel - start))))
        persistent = [q for q in self.params if getattr(q, "ds_persist", False)]
        if persistent:
            def publish():   # release the stale whole copies (the shards stay), then gather the shards
                persistent[0].partition(persistent)
                persistent[0].all_gather(persistent)
            self._publish = publish

    def _shapes(self) -> list[torch.Size]:
        return [q.ds_shape if hasattr(q, "ds_tensor") else q.shape for q in self.params]

    # -- the step -----------------------------------------------------------------------------------
    def _write_copy(self) -> None:
        """copy <- bf16(master), then made whole on every rank."""
        if self._copy:
            torch._foreach_copy_(self._copy, self._ema_master)
        if self._publish is not None:
            self._publish()

    @torch.no_grad()
    def update(self, m: torch.Tensor) -> None:
        """`m`: [m, 1 - m], a (2,) fp32 tensor on the device (no host sync; see kernels/ema.py `_as_coef`
        for the other forms it takes)."""
        if self._ema_master:  # a ZeRO-1/2 rank whose partition holds only the predictor has none
            ops.ema_update_(self._ema_master, self._online, m, self._copy)
        if self._publish is not None:
            self._publish()

    @torch.no_grad()
    def full_master(self) -> list[torch.Tensor]:
        """The fp32 momentum weights of `self.params`, whole, on every rank (collective under ZeRO)."""
        full = [torch.zeros(shape, dtype=torch.float32, device=self.master[0].device).reshape(-1)
                for shape in self._shapes()]
        for mi, ms, pi, ps, n in self._pieces:
            full[pi][ps:ps + n] = self.master[mi].reshape(-1)[ms:ms + n]
        if not self._replicated and dist.is_initialized() and dist.get_world_size() > 1:
            for t in full:  # each element is held by exactly one rank, zeros elsewhere
                dist.all_reduce(t)
        return [t.view(shape) for t, shape in zip(full, self._shapes())]

    def state_dict(self) -> dict:
        """The master tensors and where their elements belong (`assemble` rebuilds the full weights)."""
        layout = {"module_index": self._module_index, "shapes": [list(s) for s in self._shapes()],
                  "pieces": self._pieces, "replicated": self._replicated}
        return {"master": [t.detach().cpu() for t in self.master], "layout": layout}

    def load_state_dict(self, sd: dict) -> None:
        saved = sd["master"]
        if len(saved) != len(self.master):
            raise ValueError(f"momentum state has {len(saved)} tensors, the model {len(self.master)}")
        for dst, src in zip(self.master, saved):
            if dst.shape != src.shape:
                raise ValueError(f"momentum state tensor of shape {tuple(src.shape)} where the model has "
                                 f"{tuple(dst.shape)} (different model, precision or ZeRO world size?)")
            dst.copy_(src)
        self._write_copy()
