"""The streaming converter: a dense Llama checkpoint directory -> an MoE checkpoint directory (mixtral or qwen2_moe).

A plan lists every output tensor (name, dtype, shape) with the recipe that makes it; the writer lays the shards out
from the plan, then each tensor is made and written the moment it is needed, one at a time: each expert's gate,
up and down as separate [F, H] / [H, F] tensors, never a stacked [E, ...] tensor. Experts are written role-major
(every expert's gate, then every up, then every down) so only one dense FFN matrix is held at a time. Peak memory
is about one dense tensor plus one output tensor, whatever the model size. Every expert is checked finite as it
is made (a non-finite one is a one-line error, and nothing is published). The directory is built in `DST.tmp-*`
and renamed when complete (`llama.io.AtomicDir`), with the source's side files (tokenizer, chat template, ...) but
not its training run's (`record.SOURCE_RUN_FILES`): upcycling.json records the learning rate that run ended at
instead (`source_final_lr`, validated).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moekit.llama.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    StateDictReader,
    copy_side_files,
    dtype_from_name,
)
from moekit.llama.config import LLAMA_PRESETS, LlamaConfig
from moekit.llama.errors import CheckpointError, ConfigError, shown
from moekit.llama.io import (
    AtomicDir,
    check_free_space,
    check_output,
    check_path,
    file_sha256,
    inside,
    package_version,
    read_config_json,
    write_json,
)
from moekit.llama.model import Llama
from moekit.moe import formats
from moekit.moe.config import MoEConfig

from . import recipes
from .options import DRAWN_INITS, UpcycleOptions
from .record import RECORD_NAME, SOURCE_RUN_FILES, source_final_lr
from .routers import drawn_routers
from .verify import LOGIT_ATOL, VerifyError, verify_checkpoints

_TAG = {"router": 1, "drop": 2, "gate": 3, "up": 4, "down": 5}  # generator stream ids
_DENSE_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight")


class _Context:
    """What a recipe step may read: dense tensors of source `src` (0: the base, then the donors), as stored or cast
    to a dtype (the last one cached, so the experts made from one dense matrix read it once), and per-matrix
    statistics (cached)."""

    def __init__(self, sources: list):
        self.sources, self.key, self.tensor, self._stats = sources, None, None, {}

    def __call__(self, name: str, dtype: torch.dtype | None = None, src: int = 0) -> torch.Tensor:
        if (src, name, dtype) != self.key:
            self.tensor = None  # drop the previous matrix before reading the next
            t = self.sources[src].get(name)
            self.tensor, self.key = (t if dtype is None else t.to(dtype)), (src, name, dtype)
        return self.tensor

    def stats(self, key, w: torch.Tensor) -> tuple[float, float]:
        if key not in self._stats:
            self._stats[key] = recipes.tensor_stats(w)
        return self._stats[key]


@dataclass
class Item:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[_Context], torch.Tensor]


@dataclass
class Layout:
    """Where experts come from when they come from several sources (`upcycle.donors`): the source of each expert,
    of the shared expert, and router rows set from prompts ({layer: [E, H]}, {layer: [1, H]} shared gates)."""

    expert_source: list[int]
    shared_source: int | None = None
    routers: dict[int, torch.Tensor] | None = None
    shared_gates: dict[int, torch.Tensor] | None = None
    residual: dict[int | str, float] = field(default_factory=dict)  # expert j or 'shared': down_proj x this
    noise: dict[int | str, float] = field(default_factory=dict)  # expert j or 'shared': + N(0, std^2)


@dataclass
class UpcyclePlan:
    dense: LlamaConfig
    config: MoEConfig
    format: str
    moe_layers: list[int]
    items: list[Item] = field(default_factory=list)

    def function_preserving(self, options: UpcycleOptions) -> bool:
        """options.function_preserving, and the scaling x R exact in the stored dtype (R a power of 2, or fp32)."""
        R = options.routed_shards
        exact_scale = R & (R - 1) == 0 or all(it.dtype.itemsize >= 4 for it in self.items if it.dtype.is_floating_point)
        return options.function_preserving and (exact_scale or options.recipe != "granular")

    def config_json(self) -> dict:
        d = formats.hf_config_dict(self.config, self.format)
        stored = next((it.dtype for it in self.items if it.dtype.is_floating_point), torch.float32)
        d["torch_dtype"] = str(stored).removeprefix("torch.")
        return d


def dense_tensors(source, dense: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the dense checkpoint, in model order; every one checked present with that shape."""
    with torch.device("meta"):
        model = Llama(dense)
    expected = {n: tuple(t.shape) for n, t in model.checkpoint_tensors()}
    for name, shape in expected.items():
        if name not in source:
            raise CheckpointError(f"{source.path}: tensor '{name}' is missing (not a Llama checkpoint of its "
                                  "config.json)")
        if source.shape(name) != shape:
            raise CheckpointError(f"{source.path}: tensor '{name}' has shape {list(source.shape(name))}, expected "
                                  f"{list(shape)} from config.json")
    for name in source.names():
        if name not in expected and not name.endswith("rotary_emb.inv_freq") and name != "lm_head.weight":
            raise CheckpointError(f"{source.path}: unexpected tensor '{name}' for a dense Llama checkpoint")
    return expected


def moe_config(dense: LlamaConfig, options: UpcycleOptions, source_name: str) -> tuple[MoEConfig, str, list[int]]:
    """The MoE config the options ask for, the HF format that can hold it, and the MoE layer indices."""
    F, G, s = dense.intermediate_size, options.num_shards, options.shared_experts
    shared = F if options.shared_donor else s * (F // G)  # a shared donor: its whole FFN
    if F % G:
        what = f"--granularity {G}" if options.recipe == "granular" else f"{G} shards (--shared-experts {s} + 1)"
        raise ConfigError(f"{source_name}: intermediate_size {F} is not divisible by {what}")
    layers = options.layers(dense.num_hidden_layers)
    if not layers:
        raise ConfigError(f"--moe-layers {shown(options.moe_layers)}: no layer of the {dense.num_hidden_layers} "
                          "becomes MoE")
    sparse: dict = {}
    if options.moe_layers == "every-other":
        sparse["decoder_sparse_step"] = 2  # HF: layer i is MoE when (i + 1) % 2 == 0
    elif len(layers) < dense.num_hidden_layers:
        sparse["mlp_only_layers"] = [i for i in range(dense.num_hidden_layers) if i not in layers]
    Fe = F // G
    config = MoEConfig.from_dense(
        dense, num_local_experts=options.total_experts, num_experts_per_tok=options.total_top_k,
        moe_intermediate_size=Fe, num_shared_experts=1 if options.shared_donor else s,
        shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0, norm_topk_prob=True, **sparse)
    assert config.moe_layers == layers, (config.moe_layers, layers)
    return config, formats.choose_format(config, options.format), layers


def planned_config(target: str, options: UpcycleOptions) -> tuple[MoEConfig, list[int]]:
    """The MoE config (and MoE layers) an upcycle of `target` (a dense Llama preset, config.json or checkpoint
    directory) with `options` would make: what `moekit params DENSE --num-experts E` costs before it is made."""
    if target.lower() in LLAMA_PRESETS:
        dense = LlamaConfig.from_name(target.lower())
    elif os.path.isdir(target) or os.path.isfile(target):
        path = os.path.join(target, "config.json") if os.path.isdir(target) else target
        dense = LlamaConfig.from_dict(read_config_json(path), source=path)
    else:
        raise ConfigError(f"{shown(target)}: --num-experts costs an upcycle of a dense Llama: expected a llama "
                          "preset, config.json or checkpoint directory")
    config, _, layers = moe_config(dense, options, target)
    return config, layers


def plan_upcycle(source, options: UpcycleOptions, layout: Layout | None = None) -> UpcyclePlan:
    """Check the source (the base) and options; list every output tensor with how to make it (`layout`: experts
    from several sources, read through the context's sources)."""
    layout = layout or Layout([0] * options.total_experts)
    cfg_name = f"{source.path}/config.json"
    dense = LlamaConfig.from_dict(source.config, source=cfg_name)
    expected = dense_tensors(source, dense)
    config, fmt, layers = moe_config(dense, options, cfg_name)
    want = dtype_from_name(options.dtype)
    plan = UpcyclePlan(dense, config, fmt, layers)
    if options.router_init in DRAWN_INITS and layout.routers is None:
        layout.routers, layout.shared_gates = drawn_routers(options, dense.num_hidden_layers, dense.hidden_size,
                                                            layers, layout.shared_source is not None)

    def out_dtype(name: str) -> torch.dtype:
        dt = source.dtype(name)
        return want if want is not None and dt.is_floating_point else dt

    for name, shape in expected.items():
        m = _DENSE_MLP.fullmatch(name)
        if m and int(m[1]) in layers:
            if m[2] == "gate":
                _plan_moe_layer(plan, int(m[1]), options, out_dtype(name), layout)
            continue
        dt = out_dtype(name)
        plan.items.append(Item(name, dt, shape, lambda ctx, n=name, d=dt: ctx(n).to(d)))  # copied as is
    return plan


def _plan_moe_layer(plan: UpcyclePlan, i: int, o: UpcycleOptions, dtype: torch.dtype, layout: Layout) -> None:
    cfg, fmt = plan.config, plan.format
    H, Fe, G, s, R, E = cfg.hidden_size, cfg.moe_intermediate_size, o.num_shards, o.shared_experts, \
        o.routed_shards, o.num_experts
    dense = formats.dense_mlp_names(i)
    add = plan.items.append
    rows = layout.routers[i] if layout.routers else None  # [E, H] set from prompts
    add(Item(formats.router_name(fmt, i), dtype, (E * R, H), (lambda ctx: rows.to(dtype)) if rows is not None else
             lambda ctx: recipes.router_weight(E, R, H, o.router_init, o.router_std,
                                               recipes.generator(o.seed, i, _TAG["router"]), dtype)))
    if fmt == "qwen2_moe":  # the shared expert: shards 0..s-1 or a shared donor's FFN (width 0 if none)
        names, S, src = formats.shared_expert_names(fmt, i), cfg.shared_expert_intermediate_size, layout.shared_source
        src = 0 if src is None else src
        gate = layout.shared_gates[i] if layout.shared_gates else None  # [1, H] from prompts, else 0: sigmoid = 1/2
        comp = 1.0 if gate is not None else recipes.SHARED_GATE_COMPENSATION  # down x 2 against sigmoid(0)
        if layout.shared_source is not None:  # a shared donor's whole FFN, with its residual scale and noise
            for role in recipes.ROLES:
                add(Item(names[role], dtype, (H, S) if role == "down" else (S, H), _donor_maker(
                    i, "shared", role, dense[role], src, dtype, layout, comp if role == "down" else 1.0, o.seed)))
        else:
            add(Item(names["gate"], dtype, (S, H), lambda ctx: ctx(dense["gate"], src=src).narrow(0, 0, S).to(dtype)))
            add(Item(names["up"], dtype, (S, H), lambda ctx: ctx(dense["up"], src=src).narrow(0, 0, S).to(dtype)))
            add(Item(names["down"], dtype, (H, S), lambda ctx: recipes.scaled(
                ctx(dense["down"], src=src).narrow(1, 0, S), comp, dtype)))
        add(Item(names["shared_gate"], dtype, (1, H), (lambda ctx: gate.to(dtype)) if gate is not None else
                 lambda ctx: recipes.shared_gate_weight(H, dtype)))
    scales = recipes.granular_scales(R, o.weight_scaling) if o.recipe == "granular" else None
    for role in recipes.ROLES:
        shape = (H, Fe) if role == "down" else (Fe, H)
        for j in range(E * R):
            if j in layout.residual or j in layout.noise:
                make = _donor_maker(i, j, role, dense[role], layout.expert_source[j], dtype, layout, 1.0, o.seed)
            else:
                make = _expert_maker(o, i, j, role, dense[role], s + j % R, G, scales, dtype, layout.expert_source[j])
            add(Item(formats.expert_names(fmt, i, j)[role], dtype, shape, make))


def _donor_maker(i: int, j: int | str, role: str, dense_name: str, src: int, dtype: torch.dtype, layout: Layout,
                 factor: float, seed: int) -> Callable[[_Context], torch.Tensor]:
    """A donor's whole `role` matrix for expert j ('shared': the shared expert) of layer i, as mergekit-moe's
    noise_and_scale makes it (mergekit/moe/common.py): + N(0, noise^2), then down_proj x residual scale, in the
    donor's own dtype; then x `factor` and cast to `dtype` (checked finite)."""
    def make(ctx: _Context) -> torch.Tensor:
        w = ctx(dense_name, None, src)
        if layout.noise.get(j):
            gen = recipes.generator(seed, i, j if j != "shared" else -1, _TAG[role])
            w = w + (torch.randn(w.shape, generator=gen) * layout.noise[j]).to(w.dtype)
        if role == "down" and layout.residual.get(j, 1.0) != 1.0:
            w = w * layout.residual[j]
        w = recipes.scaled(w, factor, dtype)
        if not torch.isfinite(w).all():
            raise ConfigError(f"expert {j} of layer {i} ({role}_proj) would hold non-finite values with "
                              f"--residual-scale / --expert-noise on {ctx.sources[src].path}'s '{dense_name}'; "
                              "nothing written")
        return w
    return make


def _expert_maker(o: UpcycleOptions, i: int, j: int, role: str, dense_name: str, shard: int, G: int,
                  scales: dict | None, dtype: torch.dtype, src: int) -> Callable[[_Context], torch.Tensor]:
    """How expert j of layer i gets its `role` matrix from shard `shard` of source `src`'s dense one (checked
    finite: nothing non-finite is written)."""
    def make(ctx: _Context) -> torch.Tensor:
        w = made(ctx)
        if not torch.isfinite(w).all():
            how = f"--recipe {o.recipe}" + (f" --noise-scale {o.noise_scale:g}" if o.recipe == "noise" else "")
            raise ConfigError(f"expert {j} of layer {i} ({role}_proj, {str(dtype).removeprefix('torch.')}) would "
                              f"hold non-finite values: {how} on {ctx.sources[src].path}'s '{dense_name}'; nothing "
                              "written")
        return w

    def made(ctx: _Context) -> torch.Tensor:
        exact_copy = o.recipe in ("copy", "granular")  # cast once, then slice (noise / drop use the source values)
        w = recipes.shard(ctx(dense_name, dtype if exact_copy else None, src), role, shard, G)  # [F/G, H] | [H, F/G]
        if o.recipe == "noise":
            std = ctx.stats((src, dense_name, shard), w)[1]
            return recipes.noise_expert(w, o.noise_scale, recipes.generator(o.seed, i, j, _TAG[role]), dtype, std)
        if o.recipe == "drop":
            mean, std = ctx.stats((src, dense_name, shard), w)
            idx = recipes.drop_indices(w.shape[recipes.neuron_dim(role)], o.drop_ratio,
                                       recipes.generator(o.seed, i, j, _TAG["drop"]))  # same for gate, up, down
            return recipes.drop_expert(w, role, idx, mean, std, recipes.generator(o.seed, i, j, _TAG[role]), dtype)
        return recipes.scaled(w, scales[role] if scales else 1.0, dtype)
    return make


# ---- running a plan ---------------------------------------------------------------------------------

def upcycle(src: str | os.PathLike | None, dst: str | os.PathLike, options: UpcycleOptions | None = None,
            progress: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Upcycle the dense checkpoint directory `src` into the MoE checkpoint directory `dst`; return the record
    written to `dst/upcycling.json` (several donors: `donors.merge_donors`). Nothing appears at `dst` unless the whole directory was written (and, for a
    function-preserving recipe with verification on, verified)."""
    options = options or UpcycleOptions()
    if options.donors:
        raise ConfigError("upcycle() makes an MoE from one dense model; merge --donors with "
                          "moekit.upcycle.merge_donors(dst, options)")
    start = time.perf_counter()
    src = check_path(src or "", "SRC")
    dst = check_output(dst, options.force, "DST", [("SRC", src), ("--config", options.config)])
    with CheckpointReader(src) as source:
        plan = plan_upcycle(source, options)
        exact = plan.function_preserving(options)
        record = {"moekit_version": package_version("moekit"), "source": src,
                  "source_config_sha256": file_sha256(inside(src, "config.json", "config.json")),
                  "source_final_lr": source_final_lr(src), **plan_record(plan, options),
                  "function_preserving": exact}

        def check(tmp: str, record: dict) -> None:
            if not options.verify:
                return
            atol = LOGIT_ATOL if options.verify_atol is None else options.verify_atol
            result = verify_checkpoints(src, tmp, tokens=options.verify_tokens, atol=atol, seed=options.seed,
                                        progress=progress, dense_dtype=dtype_from_name(options.dtype))
            record["verify"] = result.to_dict()
            if exact and not result.ok:
                raise VerifyError(f"recipe '{options.recipe}' should reproduce the dense model but {result.line()}; "
                                  f"nothing written to {dst}")

        write_checkpoint(plan, [source], dst, options, record, check, start, progress)
    if log:
        log(summary_line(src, dst, plan, record))
    return record


def plan_record(plan: UpcyclePlan, options: UpcycleOptions) -> dict:
    """What upcycling.json says about the recipe and the layout."""
    c = plan.config
    return {"recipe": options.recipe, "seed": options.seed, "options": options.to_dict(), "format": plan.format,
            "moe_layers": plan.moe_layers, "num_local_experts": c.num_local_experts,
            "num_experts_per_tok": c.num_experts_per_tok, "moe_intermediate_size": c.moe_intermediate_size,
            "shared_expert_intermediate_size": c.shared_expert_intermediate_size}


def write_checkpoint(plan: UpcyclePlan, sources: list, dst: str, options: UpcycleOptions, record: dict,
                     check: Callable[[str, dict], None], start: float, progress: bool) -> None:
    """Write `plan` (tensors read from `sources`, 0 the base) into `dst` through `DST.tmp-*`: config.json, the
    shards one tensor at a time, the base's side files; then `check(tmp, record)` (raising: nothing is published),
    then upcycling.json (`record`, completed here)."""
    if not options.ignore_free_space:
        check_free_space(dst, sum(math.prod(it.shape) * it.dtype.itemsize for it in plan.items), "the MoE")
    inputs = [("SRC", s.path) for s in sources] + [("--config", options.config)]
    with AtomicDir(dst, options.force, inputs) as tmp:
        write_json(os.path.join(tmp, "config.json"), plan.config_json())
        writer = ShardedWriter(tmp, [(it.name, it.dtype, it.shape) for it in plan.items], options.max_shard_size)
        ctx = _Context(sources)
        for item in tqdm(plan.items, desc="upcycle", unit="tensor", disable=not progress, leave=False):
            writer.write(item.name, item.make(ctx))
        ctx.tensor = None
        writer.close()
        copied, skipped = copy_side_files(sources[0].path, tmp, skip=(RECORD_NAME, *SOURCE_RUN_FILES))
        record.update(copied_files=copied, not_copied=skipped, output_bytes=writer.total_size,
                      shards=len(writer.files), seconds=None, verify=None)
        check(tmp, record)
        record["seconds"] = round(time.perf_counter() - start, 3)
        write_json(os.path.join(tmp, RECORD_NAME), record)



def summary_line(src: str, dst: str, plan: UpcyclePlan, record: dict) -> str:
    o, c = record["options"], plan.config
    gb, secs = record["output_bytes"] / 1e9, record["seconds"]
    shared = f" + shared expert {c.shared_expert_intermediate_size}" if c.has_shared_expert else ""
    line = (f"upcycled {src} -> {dst}: recipe {o['recipe']}, {c.num_local_experts} experts of "
            f"{c.moe_intermediate_size}{shared}, top-{c.num_experts_per_tok}, {len(plan.moe_layers)}/"
            f"{c.num_hidden_layers} MoE layers, {plan.format}, {len(plan.items)} tensors, {gb:.3f} GB in "
            f"{record['shards']} shard(s), {secs:.1f} s ({gb / max(secs, 1e-9):.2f} GB/s)")
    v = record["verify"]
    if v is not None:
        tag = "" if record["function_preserving"] else " (recipe not function-preserving by design)"
        line += f"; verify: max |dlogit| {v['max_abs']:.3g} (rel {v['max_rel']:.3g}) on {v['tokens']} tokens{tag}"
    return line


def upcycle_model(dense_model: Llama, options: UpcycleOptions | None = None):
    """The same recipes on a live dense model: returns an MoEForCausalLM (its own tensors, on the dense model's
    device), in the dense model's train/eval mode."""
    from moekit.moe.model import MoEForCausalLM

    options = options or UpcycleOptions()
    if options.donors:
        raise ConfigError("upcycle_model upcycles one live model; merge donors from their checkpoint directories "
                          "with merge_donors(dst, options)")
    device = next(dense_model.parameters()).device
    tensors = {n: t.detach().cpu() for n, t in dense_model.checkpoint_tensors()}
    source = StateDictReader(dense_model.config.to_dict(), tensors)
    plan = plan_upcycle(source, options)
    ctx = _Context([source])
    out = StateDictReader(plan.config_json(), {it.name: it.make(ctx) for it in plan.items}, "<upcycled>")
    with torch.device("meta"):
        model = MoEForCausalLM(plan.config)
    state = model.load_checkpoint_tensors(out)
    model.load_state_dict({k: v.to(device, copy=True) for k, v in state.items()}, strict=False, assign=True)
    if plan.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset(device)
    return model.train(dense_model.training)
