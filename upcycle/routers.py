"""Router rows from prompts, and how a finished MoE routes those prompts.

Each expert key k (a donor's position in --donors, or 'shared') has positive prompts P_k and perhaps negative
prompts N_k, read with the base's tokenizer.json. Row k = s * v_k / |v_k|, s = --router-scale (1, as mergekit-moe
writes them). The router's logit for a token x is then s |x| cos(x, v_k): which experts a token picks does not depend
on s; s sets how the chosen experts' weights are mixed (the softmax temperature).

mergekit-moe's gate modes, computed as mergekit 0.1.5 computes them (mergekit/moe/router.py, and the tokenizer set-up
of mergekit/scripts/moe.py `build`): each prompt is the tokenizer's BOS text (tokenizer_config.json's bos_token;
none: nothing) + the prompt, tokenised without special tokens; P_k is one left-padded batch, N_k another, padded
with BOS (else EOS).

- hidden (`get_hidden_states`, average=False): for layer l, h_l = the residual stream entering layer l (the
  embeddings for l = 0) at each prompt's last token, in bf16 as mergekit's bf16 model computes it; v_k(l) =
  mean over P_k - mean over N_k, normalised, in bf16.
- hidden-avg (average=True): the same, but each prompt's h_l is its mean over every position of the padded batch:
  its own tokens (BOS included) and the pads, which attend to nothing (attention output 0, as transformers'
  masking gives), divided by the batch's padded length.
- cheap-embed (`get_cheap_embedding`): u(P) = the sum of the input embeddings of every token of the prompts P
  (BOS included), normalised; v_k = u(P_k) - u(N_k), normalised; the same row in every layer. fp32.

mergekit's random and uniform-random (`get_gate_params`) draw every layer's rows at once: see `drawn_routers`.

moekit's own variants average over the prompts' own tokens (not BOS, not padding), with the tokenizer's own
post-processor (which may add BOS):

- embed-mean: v_k = mean input embedding over P_k - the same over N_k; the same row for every layer.
- hidden-mean: for each MoE layer l, v_k(l) = mean of x_l over P_k - over N_k, x_l the hidden state entering layer
  l's FFN (after its post-attention RMSNorm: what layer l's router reads).

Both kinds run one streaming forward of the base over all prompts at once (right-padded: attention is causal, and
RoPE is relative, so a left-padded prompt's own states are the same), layer by layer, so memory stays near one
layer. Prompts are bounded before any work: at most MAX_PROMPTS of each kind and MAX_PROMPT_CHARS characters each
(`UpcycleOptions`), then at most the model's max_position_embeddings tokens each (one-line errors naming the limit),
and the forward's memory is estimated before it runs (`llama.io.check_memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.llama.checkpoint import checkpoint_tokenizer
from moekit.llama.errors import ConfigError, shown
from moekit.llama.io import check_memory, read_side_json
from moekit.moe import formats

from .options import DRAWN_INITS, UpcycleOptions
from .streamed import StreamedCheckpoint


@dataclass
class Prompts:
    ids: torch.Tensor  # [P, T] token ids, right-padded with 0
    own: torch.Tensor  # [P, T] bool: the prompt's own tokens (not special tokens, not padding)
    keys: list  # [P] the expert key of each prompt (donor position or 'shared')
    signs: list[int]  # [P] +1 positive, -1 negative
    pad: int | None = None  # mergekit's way: the id its batches are padded with (BOS, else EOS)


def special_token(directory: str, name: str) -> str | None:
    """The text of a checkpoint's `name` special token (bos_token, eos_token), as transformers reads it from
    tokenizer_config.json, else special_tokens_map.json: a string or {"content": ...}; None if neither says."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        value = (read_side_json(directory, file) or {}).get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            return value
    return None


def tokenize(directory: str, options: UpcycleOptions, vocab_size: int, negatives: bool = True,
             max_positions: int | None = None, mergekit: bool = False) -> Prompts:
    """The options' prompts, tokenized with `directory`'s tokenizer.json: as a document starts (the tokenizer's
    post-processor, which may add BOS; BOS is not the prompt's own), or `mergekit`'s way (BOS text + prompt without
    special tokens; every token the prompt's own). A prompt of more than `max_positions` tokens (the model's
    max_position_embeddings), or of none, is a one-line error."""
    why = f"; --router-init {options.router_init} reads the prompts with the base's tokenizer"
    tok = checkpoint_tokenizer(directory, why)
    prefix = (special_token(directory, "bos_token") or "") if mergekit else ""
    rows, keys, signs = [], [], []
    for kind, sign in (("positive", 1), ("negative", -1))[:2 if negatives else 1]:
        for key, texts in options.prompts(kind).items():
            for text in texts:  # each at most MAX_PROMPT_CHARS characters (UpcycleOptions)
                enc = tok.encode(prefix + text, add_special_tokens=not mergekit)
                if max_positions is not None and len(enc.ids) > max_positions:
                    raise ConfigError(f"--{kind}-prompts: prompt {shown(text, 40)} of expert {key} is "
                                      f"{len(enc.ids):,} tokens with {directory}/tokenizer.json; the model reads at "
                                      f"most {max_positions:,} (its max_position_embeddings)")
                if not enc.ids:
                    raise ConfigError(f"--{kind}-prompts: prompt {shown(text, 40)} of expert {key} has no tokens "
                                      f"with {directory}/tokenizer.json and no BOS token")
                rows.append((enc.ids, [True] * len(enc.ids) if mergekit else
                             [not m for m in enc.special_tokens_mask]))
                keys.append(key)
                signs.append(sign)
    T = max((len(ids) for ids, _ in rows), default=1)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    own = torch.zeros(len(rows), T, dtype=torch.bool)
    for p, (tokens, mask) in enumerate(rows):
        ids[p, :len(tokens)], own[p, :len(tokens)] = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ConfigError(f"{directory}/tokenizer.json gives token id {int(ids.max())}; the model's vocab_size is "
                          f"{vocab_size}")
    prompts = Prompts(ids, own, keys, signs, pad_token(directory, tok) if mergekit else None)
    for key in dict.fromkeys(k for k, s in zip(keys, signs) if s > 0):
        if not own[[p for p, k in enumerate(keys) if k == key and signs[p] > 0]].any():
            raise ConfigError(f"--positive-prompts: expert {key}'s prompts have no tokens of their own")
    return prompts


def check_prompt_memory(prompts: Prompts, checkpoint: StreamedCheckpoint) -> None:
    """Refuse, before running them, prompts whose one streamed forward (all at once, one layer at a time) would
    need more memory than the machine has: activations of about 8 H + 3 F fp32 numbers per token."""
    P, T = prompts.ids.shape
    cfg = checkpoint.config
    needed = 4 * P * T * (8 * cfg.hidden_size + 3 * cfg.intermediate_size)
    check_memory(needed, f"reading {P:,} prompts of up to {T:,} tokens through {checkpoint.source.path}",
                 "give fewer or shorter prompts")


def unit(v: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * v / |v| in v's dtype (mergekit: clamp(min=1e-8); the scale 1 multiplies nothing)."""
    v = v / v.norm(p=2).clamp(min=1e-8)
    return v if scale == 1 else v * scale


def groups(prompts: Prompts) -> dict:
    """{key: {sign: [prompt index, ...]}} for the keys with positive prompts, in order."""
    out: dict = {}
    for p, (key, sign) in enumerate(zip(prompts.keys, prompts.signs)):
        out.setdefault(key, {}).setdefault(sign, []).append(p)
    return {k: g for k, g in out.items() if 1 in g}


def directions(x: torch.Tensor, prompts: Prompts, scale: float) -> dict:
    """moekit's: x [P, T, H] -> {key: s * v / |v|}, v = mean of x over the key's positive tokens - over its
    negative ones."""
    own = prompts.own.to(x.dtype)
    sums, counts = (x * own[..., None]).sum(1), own.sum(1)  # [P, H], [P]
    out = {}
    for key, by_sign in groups(prompts).items():
        v = 0
        for sign, group in by_sign.items():
            if counts[group].sum() > 0:
                v = v + sign * sums[group].sum(0) / counts[group].sum()  # [H]
        out[key] = v * (scale / v.norm().clamp_min(1e-12))
    return out


def mergekit_embed(x: torch.Tensor, prompts: Prompts, scale: float) -> dict:
    """mergekit's cheap_embed (mergekit/moe/router.py `get_cheap_embedding` and `get_gate_params`): x [P, T, H]
    fp32 input embeddings -> {key: unit(u(P) - u(N))}, u = the normalised sum over every token of the prompts."""
    sums = (x * prompts.own[..., None]).sum(1)  # [P, H]: each prompt's tokens, then the prompts
    out = {}
    for key, by_sign in groups(prompts).items():
        u = [sums[by_sign[s]].sum(0) for s in (1, -1) if s in by_sign]
        u = [w / w.norm(p=2).clamp(min=1e-8) for w in u]
        out[key] = unit(u[0] - u[1] if len(u) > 1 else u[0], scale)
    return out


def mergekit_hidden(x: torch.Tensor, pad: torch.Tensor, prompts: Prompts, average: bool, scale: float) -> dict:
    """mergekit's hidden / hidden_avg for one layer (mergekit/moe/router.py `get_hidden_states` and
    `get_gate_params`), in bf16 as its bf16 model gives them: x [P, T, H] fp32, the residual stream entering the
    layer (right-padded prompts), pad [H] the pads' state (hidden_avg) -> {key: unit(mean over P - mean over N)}."""
    lengths = prompts.own.sum(1).tolist()  # [P]
    out = {}
    for key, by_sign in groups(prompts).items():
        means = []
        for sign in (1, -1):
            group = by_sign.get(sign)
            if not group:
                continue
            if average:  # the batch left-padded as mergekit pads it, summed over all its positions
                T = max(lengths[p] for p in group)
                batch = pad.to(torch.bfloat16).expand(len(group), T, pad.shape[-1]).clone()  # [B, T, H]
                for b, p in enumerate(group):
                    batch[b, T - lengths[p]:] = x[p, :lengths[p]].to(torch.bfloat16)
                each = batch.sum(1) / T  # [B, H]
            else:  # each prompt's last token
                each = torch.stack([x[p, lengths[p] - 1] for p in group]).to(torch.bfloat16)  # [B, H]
            means.append(each.sum(0) / len(group))
        out[key] = unit(means[0] - means[1] if len(means) > 1 else means[0], scale)
    return out


def pad_token(directory: str, tok) -> int | None:
    """The id mergekit pads prompts with: BOS, else EOS (mergekit/scripts/moe.py `build`)."""
    for name in ("bos_token", "eos_token"):
        text = special_token(directory, name)
        if text is not None and tok.token_to_id(text) is not None:
            return tok.token_to_id(text)
    return None


def drawn_routers(options: UpcycleOptions, num_layers: int, hidden: int, layers: list[int], shared: bool
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """mergekit's random (N(0, 1)) and uniform_random (U(-1/sqrt(H), 1/sqrt(H))) gates (mergekit/moe/router.py
    `get_gate_params`): one draw of [layers, experts (+ the shared expert's gate), H] in fp32 for the whole model,
    from a generator seeded with --seed: `mergekit-moe --random-seed N` seeds torch's global generator so, and
    draws nothing before, so the same N gives the same rows."""
    assert options.router_init in DRAWN_INITS, options.router_init
    E, H = options.total_experts, hidden
    gen = torch.Generator().manual_seed(options.seed)
    if options.router_init == "random":
        rows = torch.randn((num_layers, E + shared, H), generator=gen)
    else:
        bound = math.sqrt(1.0 / H)
        rows = torch.rand((num_layers, E + shared, H), generator=gen) * 2 * bound - bound
    return {i: rows[i, :E] for i in layers}, ({i: rows[i, E:] for i in layers} if shared else None)


def prompt_routers(base: str, options: UpcycleOptions, layers: list[int], vocab_size: int,
                   progress: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """({layer: router [E, H]}, {layer: shared expert gate [1, H]} or None) in fp32, from the prompts (module
    docstring). Row j of a router is its donor's (j // c) direction, so the c copies of a donor tie."""
    donor = [j // options.copies for j in range(options.num_experts)]
    init, scale = options.router_init, options.router_scale
    mergekit = init in ("hidden", "hidden-avg", "cheap-embed")
    per_layer: dict[int, dict] = {}
    checkpoint = StreamedCheckpoint(base)
    try:
        prompts = tokenize(base, options, vocab_size, max_positions=checkpoint.config.max_position_embeddings,
                           mergekit=mergekit)
        check_prompt_memory(prompts, checkpoint)
        if init in ("cheap-embed", "embed-mean"):
            x = checkpoint.get("model.embed_tokens.weight")[prompts.ids].float()  # [P, T, H]
            rows = mergekit_embed(x, prompts, scale) if mergekit else directions(x, prompts, scale)
            per_layer = dict.fromkeys(layers, rows)
        elif init == "hidden-mean":
            def at_ffn(i: int, x: torch.Tensor) -> None:
                if i in layers:
                    per_layer[i] = directions(x, prompts, scale)
            checkpoint.run(prompts.ids, at_ffn, layers=max(layers) + 1, progress=progress)
        else:
            if init == "hidden-avg" and prompts.pad is None:
                raise ConfigError(f"{base}: --router-init hidden-avg pads prompts with the BOS or EOS token, and "
                                  "tokenizer_config.json names neither")
            pads = [checkpoint.get("model.embed_tokens.weight")[prompts.pad or 0].float()[None]]  # [1, H]

            def at_layer(i: int, x: torch.Tensor, layer) -> None:
                if i in layers:
                    per_layer[i] = mergekit_hidden(x, pads[0][0], prompts, init == "hidden-avg", scale)
                if init == "hidden-avg":  # a pad attends to nothing: its attention adds 0
                    pads[0] = pads[0] + layer.mlp(layer.post_attention_layernorm(pads[0]))

            checkpoint.run(prompts.ids, layers=max(layers) + 1, progress=progress, on_layer=at_layer)
    finally:
        checkpoint.close()
    routers = {i: torch.stack([d[donor[j]] for j in range(options.num_experts)]).float() for i, d in per_layer.items()}
    shared = {i: d["shared"][None].float() for i, d in per_layer.items()} if "shared" in options.prompts() else None
    return routers, shared


def routing_shares(moe: str, options: UpcycleOptions, progress: bool = False) -> dict[str, float]:
    """For each donor with positive prompts: the share of (own token, MoE layer) pairs of its prompts whose first
    choice (largest router weight) is one of its experts, when the MoE itself reads them."""
    if not options.prompts("positive"):
        return {}
    checkpoint = StreamedCheckpoint(moe)
    try:
        prompts = tokenize(moe, options, checkpoint.config.vocab_size, negatives=False,
                           max_positions=checkpoint.config.max_position_embeddings)
        check_prompt_memory(prompts, checkpoint)
        keep = [p for p, k in enumerate(prompts.keys) if k != "shared"]
        if not keep:
            return {}
        ids, own, keys = prompts.ids[keep], prompts.own[keep], [prompts.keys[p] for p in keep]
        hits, total = torch.zeros(len(options.donors)), torch.zeros(len(options.donors))
        owner = torch.tensor(keys)[:, None]  # [P, 1]

        def tap(i: int, x: torch.Tensor) -> None:
            if checkpoint.is_moe(i):
                logits = x @ checkpoint.get(formats.router_name(checkpoint.format, i)).float().T  # [P, T, E]
                first = logits.argmax(-1) // options.copies  # [P, T] the donor of the first choice
                hits.index_add_(0, owner[:, 0], ((first == owner) & own).sum(1).float())
                total.index_add_(0, owner[:, 0], own.sum(1).float())

        checkpoint.run(ids, tap, progress=progress)
    finally:
        checkpoint.close()
    return {str(d): round(float(hits[d] / total[d]), 4) for d in sorted(set(keys))}
