"""A run's weights, one tensor at a time, so that a sharded or expert-parallel process never holds the whole model:
the model is built on the meta device (no storage), split by `parallel`, then `materialize` gives each process its
storage and fills its part of each tensor from a source of whole tensors:

    CheckpointWeights   a checkpoint directory, every name and shape checked before anything is read; a routed
                        expert tensor is read for this rank's experts only (their rows of the file)
    SeededWeights       a preset's random initialisation (torch.manual_seed(--seed), as when the model is built
                        whole), remade one module at a time from the random generator's state before it

A process holds at most one whole tensor beyond its own part (e.g. a layer's experts [El, 2F, H] under expert
parallelism, the embeddings [V, H] under sharding).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moekit.llama.checkpoint import CheckpointReader
from moekit.moe.experts import SwiGLUExperts


class CheckpointWeights:
    """The tensors of checkpoint `path` as `model` (its class and config: it may live on the meta device) names
    them, in fp32; the names, shapes and extra tensors are checked on construction (one line naming the file)."""

    def __init__(self, model: nn.Module, path: str):
        self.reader = CheckpointReader(path)
        self.plan = model.checkpoint_plan(self.reader)

    def __call__(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self.plan[name](rows)
        return t.float() if t.is_floating_point() else t

    def close(self) -> None:
        self.reader.close()


class SeededWeights:
    """The initial tensors of `model` (built on the meta device, not yet split) in fp32: the values of
    `torch.manual_seed(seed)` then building the model on the CPU (its constructors' draws, then `_init_weights` over
    every module, children first), without ever building it whole. The draws are replayed once, on one module at a
    time, keeping the generator's state before each module's `_init_weights`; a tensor is then remade alone from
    the state before the last module that writes it (a tied embedding: the LM head's)."""

    def __init__(self, model: nn.Module, seed: int):
        self.init = model._init_weights
        self.twins: dict[str, nn.Module] = {}  # module name -> a copy of it on meta, as built
        self.states: dict[str, torch.Tensor] = {}  # module name -> the CPU generator's state before its init
        self.writer: dict[str, tuple[str, str]] = {}  # tensor name -> (module name, its name there) of the last write
        for module_name, m in model.named_modules():
            if next(_direct_tensors(m, ""), None) is not None:  # (`_init_weights` sets a module's own tensors)
                self.twins[module_name] = copy.deepcopy(m)  # `parallel` changes the model's own modules in place
        last = {}  # id of a tensor -> (module, name there) of the module that initialises it last
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for twin in self.twins.values():  # the constructors' draws, in the order they are built
                if hasattr(twin, "reset_parameters"):
                    self._fresh(twin).reset_parameters()
            for module_name, m in _children_first(model):
                if module_name in self.twins:
                    self.states[module_name] = torch.get_rng_state()
                    self.init(self._fresh(self.twins[module_name]))
                for name, t in _direct_tensors(m, ""):
                    last[id(t)] = module_name, name
        for name, t in _named_tensors(model):
            self.writer[name] = last[id(t)]
        self._made: tuple[str, dict[str, torch.Tensor]] = ("", {})  # the last module remade

    @staticmethod
    def _fresh(twin: nn.Module) -> nn.Module:
        """A CPU copy of `twin` with zeros (a tensor nobody sets is zero, never garbage)."""
        fresh = copy.deepcopy(twin).to_empty(device="cpu")
        with torch.no_grad():
            for _, t in _direct_tensors(fresh, ""):
                t.zero_()
        return fresh

    def __call__(self, name: str, rows: slice | None = None) -> torch.Tensor:
        module_name, local = self.writer[name]
        if self._made[0] != module_name:
            self._made = module_name, self._remake(module_name)
        t = self._made[1][local]
        return t if rows is None else t[rows]

    def _remake(self, module_name: str) -> dict[str, torch.Tensor]:
        fresh = self._fresh(self.twins[module_name])
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if hasattr(fresh, "reset_parameters"):
                fresh.reset_parameters()  # the module's construction values (RMSNorm: ones)
            torch.set_rng_state(self.states[module_name])
            self.init(fresh)
        return {name: t.detach().float() for name, t in _direct_tensors(fresh, "")}

    def close(self) -> None:
        self._made = ("", {})


def materialize(model: nn.Module, device: torch.device, weights) -> None:
    """Give `model` (built on the meta device: whole, or split by `parallel`) its storage on `device` and its
    values from `weights` (name, rows -> whole tensor): a routed expert tensor only for this rank's experts
    (`SwiGLUExperts.ep`), a sharded one (a DTensor) only this rank's part of it; rotary tables recomputed; then
    `weights` closed."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty unties a plain module's weights
    done: set[int] = set()
    with torch.no_grad():
        for module_name, m in model.named_modules():
            rows = slice(m.ep.first, m.ep.first + m.ep.local) if isinstance(m, SwiGLUExperts) and m.ep else None
            for name, t in _direct_tensors(m, module_name):
                if id(t) in done:
                    continue
                done.add(id(t))
                whole = weights(name, rows)
                if isinstance(t, DTensor):  # this rank's part only, sliced here (no communication)
                    whole = distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None)
                t.copy_(whole)
    model.model.rotary_emb.reset(device)
    weights.close()


def _children_first(model: nn.Module, prefix: str = ""):
    """(name, module) in the order `nn.Module.apply` visits them: each module after its children."""
    for name, child in model.named_children():
        yield from _children_first(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, model


def _named_tensors(model: nn.Module):
    """(full name, tensor) of every parameter and persistent buffer, a tied one under each of its names."""
    for module_name, m in model.named_modules():
        yield from _direct_tensors(m, module_name)


def persistent_buffers(module: nn.Module, prefix: str = "", recurse: bool = True):
    """(full name, buffer) of the buffers `module`'s state_dict holds (the routers' bias; not rotary tables);
    recurse=False: its own, not its children's."""
    for mod_prefix, mod in module.named_modules(prefix=prefix) if recurse else [(prefix, module)]:
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                yield f"{mod_prefix}.{name}" if mod_prefix else name, b


def _direct_tensors(m: nn.Module, prefix: str):
    """(full name, tensor) of `m`'s own parameters and persistent buffers (not its children's)."""
    yield from m.named_parameters(prefix, recurse=False)
    yield from persistent_buffers(m, prefix, recurse=False)
