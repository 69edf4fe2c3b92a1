"""Router rows from prompts (mergekit-moe's gate modes), and how a finished MoE routes those prompts.

Each expert key k (a donor's position in --donors, or 'shared') has positive prompts P_k and perhaps negative
prompts N_k, tokenized with the base's tokenizer.json as a document starts (with BOS where the tokenizer adds
one). Means are taken over the prompts' own tokens (not BOS or other special tokens, not padding):

- cheap-embed: v_k = mean input embedding over P_k - the same over N_k; the same row for every layer.
- hidden: for each MoE layer l, v_k(l) = mean of x_l over P_k - over N_k, x_l the hidden state entering layer l's
  FFN (after its post-attention RMSNorm: what layer l's router reads) when the *base* reads the prompts. One
  streaming forward of the base over all prompts at once (right-padded; attention is causal), layer by layer, so
  memory stays near one layer.

Row k = s * v_k / |v_k|, s = --router-scale (1 by default). The router's logit for a token x is then
s |x| cos(x, v_k): which experts a token picks (its top k) does not depend on s; s sets only how the k chosen
experts' weights are mixed (the softmax temperature). s = 1 is what mergekit-moe writes, so a published config gives
the same routing; RMSNorm makes |x| about sqrt(H) times the norm weights, so unit rows already separate experts by
clear margins in real models; a smaller s mixes the chosen experts more evenly (e.g. before training on).

Prompts are bounded before any work: at most MAX_PROMPTS of each kind and MAX_PROMPT_CHARS characters each
(`UpcycleOptions`), then at most the model's max_position_embeddings tokens each (one-line errors naming the limit),
and the forward's memory is estimated before it runs (`llama.io.check_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.llama.checkpoint import checkpoint_tokenizer
from moekit.llama.errors import ConfigError, shown
from moekit.llama.io import check_memory
from moekit.moe import formats

from .options import UpcycleOptions
from .streamed import StreamedCheckpoint


@dataclass
class Prompts:
    ids: torch.Tensor  # [P, T] token ids, right-padded with 0
    own: torch.Tensor  # [P, T] bool: the prompt's own tokens (not special tokens, not padding)
    keys: list  # [P] the expert key of each prompt (donor position or 'shared')
    signs: list[int]  # [P] +1 positive, -1 negative


def tokenize(directory: str, options: UpcycleOptions, vocab_size: int, negatives: bool = True,
             max_positions: int | None = None) -> Prompts:
    """The options' prompts, tokenized with `directory`'s tokenizer.json; a prompt of more than `max_positions`
    tokens (the model's max_position_embeddings) is a one-line error."""
    why = f"; --router-init {options.router_init} reads the prompts with the base's tokenizer"
    tok = checkpoint_tokenizer(directory, why)
    rows, keys, signs = [], [], []
    for kind, sign in (("positive", 1), ("negative", -1))[:2 if negatives else 1]:
        for key, texts in options.prompts(kind).items():
            for text in texts:  # each at most MAX_PROMPT_CHARS characters (UpcycleOptions)
                enc = tok.encode(text, add_special_tokens=True)
                if max_positions is not None and len(enc.ids) > max_positions:
                    raise ConfigError(f"--{kind}-prompts: prompt {shown(text, 40)} of expert {key} is "
                                      f"{len(enc.ids):,} tokens with {directory}/tokenizer.json; the model reads at "
                                      f"most {max_positions:,} (its max_position_embeddings)")
                rows.append((enc.ids, [not m for m in enc.special_tokens_mask]))
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
    prompts = Prompts(ids, own, keys, signs)
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


def directions(x: torch.Tensor, prompts: Prompts, scale: float) -> dict:
    """x [P, T, H] -> {key: s * v / |v|}, v = mean of x over the key's positive tokens - over its negative ones."""
    own = prompts.own.to(x.dtype)
    sums, counts = (x * own[..., None]).sum(1), own.sum(1)  # [P, H], [P]
    out = {}
    for key in dict.fromkeys(k for k, s in zip(prompts.keys, prompts.signs) if s > 0):
        v = 0
        for sign in (1, -1):
            group = [p for p, (k, s) in enumerate(zip(prompts.keys, prompts.signs)) if k == key and s == sign]
            if group and counts[group].sum() > 0:
                v = v + sign * sums[group].sum(0) / counts[group].sum()  # [H]
        out[key] = v * (scale / v.norm().clamp_min(1e-12))
    return out


def prompt_routers(base: str, options: UpcycleOptions, layers: list[int], vocab_size: int,
                   progress: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """({layer: router [E, H]}, {layer: shared expert gate [1, H]} or None) in fp32, from the prompts (module
    docstring). Row j of a router is its donor's (j // c) direction, so the c copies of a donor tie."""
    donor = [j // options.copies for j in range(options.num_experts)]
    per_layer: dict[int, dict] = {}

    def tap(i: int, x: torch.Tensor) -> None:
        if i in layers:
            per_layer[i] = directions(x, prompts, options.router_scale)

    checkpoint = StreamedCheckpoint(base)
    try:
        prompts = tokenize(base, options, vocab_size, max_positions=checkpoint.config.max_position_embeddings)
        check_prompt_memory(prompts, checkpoint)
        if options.router_init == "cheap-embed":
            x = checkpoint.get("model.embed_tokens.weight")[prompts.ids].float()  # [P, T, H]
            per_layer = dict.fromkeys(layers, directions(x, prompts, options.router_scale))
        else:
            checkpoint.run(prompts.ids, tap, layers=max(layers) + 1, progress=progress)
    finally:
        checkpoint.close()
    routers = {i: torch.stack([d[donor[j]] for j in range(options.num_experts)]) for i, d in per_layer.items()}
    shared = {i: d["shared"][None] for i, d in per_layer.items()} if "shared" in options.prompts() else None
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
