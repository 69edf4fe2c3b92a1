"""Training across processes beyond replication: sharded data parallelism (FSDP2 `fully_shard`) and expert
parallelism, on torch.distributed device meshes built from the world.

W processes, S = --shard-degree, N = --expert-parallel, E experts, El = E/N.

    dense weights    mesh (W/S replicate, S shard): FSDP2 over the shard dim (S = W: fully sharded; 1 < S < W:
                     hybrid, replicated across the replicate dim); S = 1 with N > 1: replicated, their gradients
                     all-reduced over the world
    routed experts   mesh (W/N expert-data-parallel, N expert-parallel): rank r holds experts (r % N)*El ..;
                     with S > 1 they are also sharded (FSDP2, by rows) over their W/N expert-data-parallel ranks;
                     their gradients are reduced over those ranks only, divided by W as every other gradient;
                     N = 1: sharded by rows on the dense weights' mesh

The FSDP2 unit is one decoder layer (its MoE block whole, the experts a nested unit on their own mesh: never one
unit per expert), the embeddings another when untied, and the root (final norm, LM head, tied embeddings).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.llama.errors import ConfigError
from moekit.moe.expert_parallel import ExpertGroup
from moekit.moe.experts import SwiGLUExperts

from .weights import materialize, persistent_buffers


@dataclass(frozen=True)
class Layout:
    """How W processes split the model: S ranks shard each dense weight, N ranks split each layer's experts."""

    world: int
    shard: int = 1
    expert: int = 1

    @property
    def parallel(self) -> bool:
        """Anything beyond replication (the accelerate-prepared path handles plain replication)."""
        return self.shard > 1 or self.expert > 1

    def expert_replicas(self) -> int:
        """How many ranks hold the same piece of a routed expert's weight."""
        if self.expert == 1:
            return self.dense_replicas()
        return 1 if self.shard > 1 else self.world // self.expert

    def dense_replicas(self) -> int:
        return self.world // self.shard

    def describe(self) -> str:
        parts = []
        if self.shard > 1:
            parts.append(f"dense weights sharded over {self.shard}" +
                         (f", replicated {self.dense_replicas()}x" if self.dense_replicas() > 1 else ""))
        if self.expert > 1:
            parts.append(f"experts split over {self.expert} ranks")
        return "; ".join(parts) or "replicated"


def check_layout(world: int, shard: int, expert: int, config) -> Layout:
    """The layout, or a one-line ConfigError naming the impossible degree and what would do."""
    for flag, n in (("--shard-degree", shard), ("--expert-parallel", expert)):
        if world % n:
            divisors = [d for d in range(1, world + 1) if world % d == 0]
            raise ConfigError(f"{flag} {n} does not divide the {world} process(es); expected one of "
                              f"{', '.join(map(str, divisors))}")
    if expert > 1:
        E = getattr(config, "num_local_experts", None)
        if not E or not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
            raise ConfigError(f"--expert-parallel {expert}: the model has no routed experts (a dense "
                              f"{config.model_type}); expected an MoE model, or --expert-parallel 1")
        if E % expert:
            raise ConfigError(f"--expert-parallel {expert} does not divide the model's {E} experts; expected a "
                              f"divisor of {E} that divides the {world} process(es)")
    return Layout(world, shard, expert)


def is_routed_expert(name: str) -> bool:
    """A routed expert's stacked weight (`model.layers.N.mlp.experts.gate_up_proj` / `down_proj`)."""
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def _mesh(device: str, shape: tuple[int, ...], names: tuple[str, ...]):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh(device, torch.arange(dist.get_world_size()).view(shape), mesh_dim_names=names)


@dataclass
class Parallel:
    """A layout applied to a model: its meshes, and the operations the loop needs from them."""

    layout: Layout
    dense_mesh: object | None = None  # (replicate, shard), S > 1
    expert_mesh: object | None = None  # (edp, ep), N > 1

    @classmethod
    def apply(cls, model: nn.Module, layout: Layout, device: torch.device, weights, mixed_precision: str,
              activation_checkpointing: bool) -> Parallel:
        """Split `model` (built on the meta device) in place as `layout` says, then give it storage on `device` and
        fill this rank's part from `weights` (`weights.materialize`): no process ever holds the whole model."""
        kind = device.type
        par = cls(layout)
        W, S, N = layout.world, layout.shard, layout.expert
        model.model.checkpoint_layers = activation_checkpointing
        if N > 1:
            par.expert_mesh = _mesh(kind, (W // N, N), ("edp", "ep"))
            ep_group = par.expert_mesh.get_group("ep")
            ep = ExpertGroup(ep_group, N, dist.get_rank(ep_group), model.config.num_local_experts)
            for m in model.modules():
                if isinstance(m, SwiGLUExperts):
                    m.keep_local(ep)
        if S > 1:
            par.dense_mesh = _mesh(kind, (W // S, S), ("replicate", "shard"))
            par._fully_shard(model, mixed_precision)
        elif mixed_precision == "bf16":  # replicated weights: autocast, as accelerate's prepare does
            model.forward = torch.autocast(kind, dtype=torch.bfloat16)(model.forward)
        materialize(model, device, weights)
        gc.collect()
        return par

    def _fully_shard(self, model: nn.Module, mixed_precision: str) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import Shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
        dense = self.dense_mesh if self.layout.dense_replicas() > 1 else self.dense_mesh["shard"]
        for layer in model.model.layers:
            for m in layer.modules():
                if isinstance(m, SwiGLUExperts):
                    # by rows (dim 1): every rank holds a slice of each of its experts, so one expert's state is
                    # one tensor sharded the same way whatever the layout (see `sharded.state_tensors`)
                    by_rows = lambda p: Shard(1)  # noqa: E731
                    if self.expert_mesh is None:
                        fully_shard(m, mesh=dense, mp_policy=mp, shard_placement_fn=by_rows)
                        continue
                    fully_shard(m, mesh=self.expert_mesh["edp"], mp_policy=mp, shard_placement_fn=by_rows)
                    m.set_gradient_divide_factor(float(self.layout.world))
                    if self.expert_mesh["edp"].size() > 1:
                        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM (on one rank: no comm)
            fully_shard(layer, mesh=dense, mp_policy=mp)
        if not model.config.tie_word_embeddings:
            fully_shard(model.model.embed_tokens, mesh=dense, mp_policy=mp)
        fully_shard(model, mesh=dense, mp_policy=mp)

    # ---- the step ----------------------------------------------------------------------------------------------
    def reduce_gradients(self, model: nn.Module, bucket_bytes: int = 32 << 20) -> None:
        """Replicated weights under expert parallelism (S = 1): the mean gradient over the world; routed experts
        over their expert-data-parallel ranks, divided by W. In buckets of `bucket_bytes` (one flat copy of a bucket
        at a time, as DDP does). FSDP2 (S > 1) has reduced them in backward."""
        if self.layout.shard > 1:
            return
        dense, experts = [], []
        for name, p in model.named_parameters():
            if p.grad is not None:
                (experts if is_routed_expert(name) else dense).append(p.grad)
        for grads, group in ((dense, None), (experts, self.expert_mesh.get_group("edp"))):
            bucket, size = [], 0
            for g in [*grads, None]:  # None: flush the last bucket
                if g is not None:
                    bucket.append(g)
                    size += g.numel() * g.element_size()
                if bucket and (g is None or size >= bucket_bytes):
                    self._all_reduce_mean(bucket, group)
                    bucket, size = [], 0

    def _all_reduce_mean(self, grads: list[torch.Tensor], group) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= self.layout.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm of the whole model (every piece counted once), and the gradients scaled as
        torch.nn.utils.clip_grad_norm_ scales them."""
        squares, grads = None, []
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            replicas = self.layout.expert_replicas() if is_routed_expert(name) else self._dense_replicas_of(p)
            part = g.double().pow(2).sum() / replicas  # on the gradients' device: no host sync per parameter
            squares = part if squares is None else squares + part
            grads.append(g)
        dist.all_reduce(squares)  # one collective, on the device the backend runs on (NCCL: CUDA)
        total = squares.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device))
        return total

    def _dense_replicas_of(self, p: torch.Tensor) -> int:
        return self.layout.dense_replicas() if hasattr(p, "to_local") else self.layout.world

    # ---- the full model ----------------------------------------------------------------------------------------
    def gathered_units(self, model: nn.Module, main: bool):
        """{name: full tensor on the CPU} of one unit at a time (the embeddings, each decoder layer, then the final
        norm and LM head), gathered from the shards and the expert-parallel ranks: every rank takes part, `main`
        receives the tensors (the others None), and nobody holds more than one unit beyond its shards."""
        resharded(model)
        units = [("model.embed_tokens", model.model.embed_tokens),
                 *((f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)),
                 ("model.norm", model.model.norm)]
        if not model.config.tie_word_embeddings:
            units.append(("lm_head", model.lm_head))
        for prefix, module in units:
            yield {name: self._full(name, t, main) for name, t in _persistent(module, prefix)}

    def _full(self, name: str, t: torch.Tensor, main: bool) -> torch.Tensor | None:
        t = t.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if self.expert_mesh is not None and is_routed_expert(name):
            parts = [torch.empty_like(t) for _ in range(self.layout.expert)]
            dist.all_gather(parts, t.contiguous(), group=self.expert_mesh.get_group("ep"))
            t = torch.cat(parts)  # [E, ...]
        return t.cpu() if main else None


def _persistent(module: nn.Module, prefix: str):
    """(full name, tensor) of `module`'s parameters and persistent buffers, as its state_dict lists them."""
    yield from module.named_parameters(prefix)
    yield from persistent_buffers(module, prefix)


def return_large_frees() -> None:
    """glibc: allocations of 1 MiB and more straight from mmap, so that a freed tensor returns to the system at
    once (set before a sharded or expert-parallel CPU run allocates anything large). The heap otherwise keeps freed
    pages, and the run's resident memory would still count every step's gathered layers and the whole tensors read
    while loading (a 254M-parameter model sharded over 2 processes: a 4.03 GB peak without, 2.96 GB with;
    BENCHMARKS.md)."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "mallopt"):
        ctypes.CDLL(libc).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def resharded(model: nn.Module) -> nn.Module:
    """`model` with every FSDP2 unit holding its shards again: a forward without backward (evaluation) leaves the
    root's weights gathered, and the optimizer knows the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model
