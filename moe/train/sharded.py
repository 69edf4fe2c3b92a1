"""The training state of a sharded or expert-parallel run, saved and loaded with torch.distributed.checkpoint:
each rank writes its own shards (no rank gathers the model), and a state loads into any layout (another number of
processes, shard or expert-parallel degree: DCP reshards).

Keys name what a tensor is, not where it lived: `model.NAME` per parameter and persistent buffer,
`optim.NAME.exp_avg` / `.exp_avg_sq` / `.step` per parameter, a routed expert's weights one key per expert
(`model.model.layers.0.mlp.experts.down_proj.5`), and `rng.RANK` for each rank's torch RNG state. A state saved
by accelerate (a replicated run) loads here too.

E experts, El = E/N on this rank, first = its first expert's global index.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .parallel import is_routed_expert, resharded
from .weights import persistent_buffers


def _expert_view(t: torch.Tensor, j: int) -> torch.Tensor:
    """Expert j of a stacked [El, ...] weight or moment: a plain view, or, sharded by rows, a DTensor sharing the
    local storage (loading into it writes the weight)."""
    if not hasattr(t, "to_local"):
        return t[j]
    from torch.distributed.tensor import DTensor, Shard

    placements = [Shard(p.dim - 1) if isinstance(p, Shard) else p for p in t.placements]
    shape = t.shape[1:]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t.to_local()[j], t.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def _pieces(model: nn.Module, name: str, t: torch.Tensor):
    """(key, tensor) of a parameter or moment: itself, or a routed expert weight one expert at a time."""
    if not is_routed_expert(name):
        yield name, t
        return
    ep = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "ep", None)
    first = ep.first if ep is not None else 0
    for j in range(t.shape[0]):
        yield f"{name}.{first + j}", _expert_view(t, j)


def init_moments(optimizer) -> None:
    """AdamW's state for every parameter, zero, as its first step would create it (a load writes into it)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, or torch's optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state.get(p):
                local = p.to_local() if hasattr(p, "to_local") else p
                step = (torch.zeros((), dtype=torch.float32, device=local.device) if group.get("fused") or
                        group.get("capturable") else torch.tensor(0.0))
                opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def state_tensors(model: nn.Module, optimizer, rank: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the training state by key, as views of the live weights and moments (a load writes them)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    out = {}
    for name, p in resharded(model).named_parameters():
        for key, t in _pieces(model, name, p.detach()):
            out[f"model.{key}"] = t
        moments = opt.state.get(p)
        if moments:
            for m in ("exp_avg", "exp_avg_sq"):
                for key, t in _pieces(model, name, moments[m]):
                    out[f"optim.{key}.{m}"] = t
            out[f"optim.{name}.step"] = moments["step"]
    for name, b in persistent_buffers(model):
        out[f"model.{name}"] = b
    if rank is not None:
        out[f"rng.{rank}"] = torch.get_rng_state()
    return out


def save(path: str, model: nn.Module, optimizer, rank: int) -> None:
    """Every rank writes its shards of the model and moments, and its RNG state, into the directory `path`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state_tensors(model, optimizer, rank), checkpoint_id=path)


def is_sharded_state(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


def load(path: str, model: nn.Module, optimizer, rank: int, same_world: bool) -> None:
    """The state at `path` (a DCP state, or accelerate's) into the live model and moments, resharded to this
    layout; the RNG state only when the world is the one that saved it."""
    init_moments(optimizer)
    views = state_tensors(model, optimizer, rank if same_world else None)
    rng = views.pop(f"rng.{rank}", None)
    if is_sharded_state(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        target = dict(views, **({f"rng.{rank}": rng.clone()} if rng is not None else {}))
        reader = _tensor_reader(path)
        try:
            reader.read_metadata()  # checked here, where its error is one line (DCP wraps it per rank)
        except Exception as e:
            raise ValueError(f"{os.path.join(path, '.metadata')}: {e}") from None
        try:
            with warnings.catch_warnings():  # one process: DCP says it assumes so
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(target, storage_reader=reader)
        except CheckpointException as e:  # a BaseException: one line of what failed first
            first = next(iter(e.failures.values()), e)
            first = first[0] if isinstance(first, tuple) else first  # (exception, its frames)
            detail = f"{type(first).__name__}: {str(first)[:160]}" if str(first) else type(first).__name__
            raise ValueError(f"a file of the state is cut short or damaged ({detail})") from None
        if rng is not None:
            torch.set_rng_state(target[f"rng.{rank}"])
        return
    _load_full(views, accelerate_state(path, model, optimizer))


def accelerate_state(path: str, model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """A replicated run's state (accelerate's model.safetensors and optimizer.bin) under this module's keys."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "model.safetensors"))
    if "lm_head.weight" in weights and model.config.tie_word_embeddings:  # one tensor under either name
        weights.setdefault("model.embed_tokens.weight", weights.pop("lm_head.weight"))
    saved = torch.load(os.path.join(path, "optimizer.bin"), map_location="cpu", weights_only=True)
    opt = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]  # accelerate numbers them so
    full = {}
    for name, t in weights.items():
        full.update(_full_pieces(f"model.{name}", name, t))
    for i, moments in saved["state"].items():
        name = order[int(i)]
        for m in ("exp_avg", "exp_avg_sq"):
            full.update(_full_pieces(f"optim.{name}", name, moments[m], f".{m}"))
        full[f"optim.{name}.step"] = moments["step"]
    return full


def _full_pieces(key: str, name: str, t: torch.Tensor, suffix: str = "") -> dict[str, torch.Tensor]:
    if is_routed_expert(name):
        return {f"{key}.{e}{suffix}": t[e] for e in range(t.shape[0])}
    return {f"{key}{suffix}": t}


def _load_full(views: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the views (their shards: every rank takes its own chunk, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    for key, view in views.items():
        if key not in full:
            raise KeyError(f"{key} is not in the state")
        src = full[key]
        if hasattr(view, "to_local"):
            src = distribute_tensor(src.to(view.dtype), view.device_mesh, view.placements, src_data_rank=None)
            view.to_local().copy_(src.to_local())
        else:
            view.copy_(src.to(view.device, view.dtype).view_as(view))


def _tensor_reader(path: str):
    """DCP's file reader with its index (`.metadata`, a pickle) read by an unpickler that builds only DCP's metadata
    classes and torch sizes and dtypes, and that accepts tensors only: a crafted state never runs code."""
    import pickle
    import sys

    import torch.distributed.checkpoint.filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata
    from torch.distributed.checkpoint import FileSystemReader

    ALLOWED_MODULES = (dcp_metadata.__name__, torch.distributed.checkpoint.filesystem.__name__)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module in ALLOWED_MODULES and "." not in name:  # DCP's own classes and enums, nothing else of it
                value = getattr(sys.modules[module], name, None)
                if isinstance(value, type) and value.__module__ == module:
                    return value
            if module == "torch" and name == "Size":
                return torch.Size
            if (module, name) == ("torch.serialization", "_get_layout"):  # a layout by its name
                return torch.serialization._get_layout
            value = getattr(torch, name, None) if module == "torch" else None
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
            if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")):  # where it was saved
                return pickle.Unpickler.find_class(self, module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a training state")

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(path, ".metadata"), "rb") as f:
                metadata = Unpickler(f).load()
            entries = getattr(metadata, "state_dict_metadata", None)
            if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(entries, dict) or not all(
                    isinstance(m, dcp_metadata.TensorStorageMetadata) for m in entries.values()):
                raise ValueError(".metadata does not index tensors only")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp_metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)
