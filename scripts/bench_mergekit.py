#!/usr/bin/env python
"""One mergekit-moe recipe, built by mergekit-moe (when installed) and by moekit: wall time, peak RSS, and how far
apart the outputs are. Donors: D random dense bf16 checkpoints of one shape (default: SmolLM2-135M's, 30 layers,
tied embeddings), the first also the base, with a byte-level tokenizer whose BOS is <|endoftext|>; a recipe with
`gate_mode` (default hidden), top-2, bf16, two prompts per expert and a negative prompt for one.

    .venv/bin/python scripts/bench_mergekit.py                       # 3 donors of SmolLM2-135M's shape
    .venv/bin/python scripts/bench_mergekit.py --gate cheap_embed --layers 8

Rows: mergekit-moe; moekit upcycle --config with --no-verify (mergekit verifies nothing); moekit as users run it
(each expert checked against its donor, routing shares measured). Checked (exit code 1 otherwise): moekit's peak
RSS at most half of mergekit's, its time with --no-verify no worse, and equal outputs: every expert bit for bit and
every router row within bf16 rounding (cosine >= 0.999). Prints a table, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_upcycle beside this file

import torch  # noqa: E402
from bench_upcycle import dir_bytes, generate_dense, machine, measure  # noqa: E402

from moekit.llama.checkpoint import CheckpointReader  # noqa: E402
from moekit.llama.config import LlamaConfig  # noqa: E402
from moekit.llama.io import write_json_atomic  # noqa: E402

BOS = "<|endoftext|>"

PROMPTS = [["def fibonacci(n): return n if n < 2 else", "import numpy as np"],
           ["Once upon a time, in a small harbour town,", "The weather was mild that spring."],
           ["Solve for x: 3x + 7 = 22. First subtract 7", "12 * 7 = 84, and 84 / 4 ="],
           ["Translate into French: the cat sleeps", "Bonjour, comment allez-vous ?"]]


def save_tokenizer(directory: Path, vocab_size: int = 2048) -> None:
    """A byte-level BPE trained on some standard-library sources, with <|endoftext|> as BOS and EOS (SmolLM2's)."""
    import json
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [Path(m.__file__).read_text() for m in (argparse, json, textwrap, shutil)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": BOS}))


def recipe(donors: list[Path], gate: str) -> str:
    lines = [f"base_model: {donors[0]}", f"gate_mode: {gate}", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for d, path in enumerate(donors):
        lines += [f"  - source_model: {path}", f"    positive_prompts: {PROMPTS[d % len(PROMPTS)]!r}"]
        if d == 1:
            lines.append(f"    negative_prompts: [{PROMPTS[0][0]!r}]")
    return "\n".join(lines) + "\n"


def expert_matrices(reader: CheckpointReader, layer: int, experts: int) -> list[torch.Tensor]:
    """[gate, up, down] of each expert of a Mixtral layer in either tool's layout (per-expert w1/w2/w3, or
    transformers 5's fused experts.gate_up_proj [E, 2F, H] and experts.down_proj [E, H, F])."""
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    if f"{prefix}.0.w1.weight" in reader:
        return [reader.get(f"{prefix}.{e}.{w}.weight") for e in range(experts) for w in ("w1", "w3", "w2")]
    fused, down = reader.get(f"model.layers.{layer}.mlp.experts.gate_up_proj"), \
        reader.get(f"model.layers.{layer}.mlp.experts.down_proj")
    F = fused.shape[1] // 2
    return [m for e in range(experts) for m in (fused[e, :F], fused[e, F:], down[e])]


def router(reader: CheckpointReader, layer: int) -> torch.Tensor:
    for name in (f"model.layers.{layer}.block_sparse_moe.gate.weight", f"model.layers.{layer}.mlp.gate.weight"):
        if name in reader:
            return reader.get(name).float()
    raise KeyError(f"layer {layer}: no router")


def compare(ours: Path, theirs: Path, layers: int, experts: int) -> dict:
    """Experts bit for bit; router rows' min cosine and max |difference|."""
    with CheckpointReader(str(ours)) as a, CheckpointReader(str(theirs)) as b:
        same = all(torch.equal(x, y) for i in range(layers)
                   for x, y in zip(expert_matrices(a, i, experts), expert_matrices(b, i, experts)))
        cos, diff = 1.0, 0.0
        for i in range(layers):
            x, y = router(a, i), router(b, i)
            cos = min(cos, torch.nn.functional.cosine_similarity(x, y, dim=-1).min().item())
            diff = max(diff, (x - y).abs().max().item())
    return {"experts_equal": same, "router_min_cosine": round(cos, 6), "router_max_abs_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moekit-bench-mergekit")
    ap.add_argument("--donors", type=int, default=3)
    ap.add_argument("--gate", default="hidden", help="gate_mode of the recipe (hidden)")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_mergekit.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated donors")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    donors = [work / f"donor{d}" for d in range(args.donors)]
    for d, path in enumerate(donors):
        generate_dense(path, config, torch.bfloat16, seed=d)
        save_tokenizer(path)
    (work / "moe.yml").write_text(recipe(donors, args.gate))
    print(f"{args.donors} donors of {dir_bytes(donors[0]) / 1e6:.0f} MB under {work}; gate_mode {args.gate}",
          flush=True)

    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    outs = {"mergekit-moe": work / "mergekit", "moekit --no-verify": work / "moekit-fast",
            "moekit (verified)": work / "moekit"}
    runs = {"moekit --no-verify": [sys.executable, "-m", "moekit", "upcycle", "--config", str(work / "moe.yml"),
                                   str(outs["moekit --no-verify"]), "--no-progress", "--no-verify"],
            "moekit (verified)": [sys.executable, "-m", "moekit", "upcycle", "--config", str(work / "moe.yml"),
                                  str(outs["moekit (verified)"]), "--no-progress"]}
    if importlib.util.find_spec("mergekit") is not None:
        runs = {"mergekit-moe": [sys.executable, "-m", "mergekit.scripts.moe", str(work / "moe.yml"),
                                 str(outs["mergekit-moe"]), "--random-seed", "0"], **runs}
    rows: dict[str, dict] = {}
    for name, cmd in runs.items():
        shutil.rmtree(outs[name], ignore_errors=True)
        os.sync()
        rows[name] = measure(cmd, env)
        rows[name]["output_bytes"] = dir_bytes(outs[name])
        print(f"{name}: {rows[name]['seconds']:.1f} s, {rows[name]['peak_rss_mib']:.0f} MiB", flush=True)
    result = {"machine": machine(), "gate_mode": args.gate, "donors": args.donors,
              "config": {"hidden_size": args.hidden, "intermediate_size": args.intermediate,
                         "num_hidden_layers": args.layers, "vocab_size": args.vocab, "dtype": "bf16"},
              "donor_bytes": dir_bytes(donors[0]), "rows": rows}
    ok = True
    if "mergekit-moe" in rows:
        theirs, fast = rows["mergekit-moe"], rows["moekit --no-verify"]
        result["outputs"] = compare(outs["moekit --no-verify"], outs["mergekit-moe"], args.layers, args.donors)
        result["rss_ratio"] = round(fast["peak_rss_mib"] / theirs["peak_rss_mib"], 3)
        result["time_ratio"] = round(fast["seconds"] / theirs["seconds"], 3)
        ok = (max(r["peak_rss_mib"] for n, r in rows.items() if n != "mergekit-moe") <= theirs["peak_rss_mib"] / 2
              and fast["seconds"] <= theirs["seconds"] and result["outputs"]["experts_equal"]
              and result["outputs"]["router_min_cosine"] >= 0.999)
    print(f"\n{'run':<22} {'seconds':>8} {'peak RSS MiB':>13} {'output MB':>10}")
    for name, r in rows.items():
        print(f"{name:<22} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13.0f} {r['output_bytes'] / 1e6:>10.0f}")
    if "outputs" in result:
        o = result["outputs"]
        print(f"\nmoekit / mergekit: peak RSS {result['rss_ratio']:.2f}x, time (--no-verify) {result['time_ratio']:.2f}x;"
              f" experts {'equal' if o['experts_equal'] else 'DIFFER'}, routers min cosine "
              f"{o['router_min_cosine']:.6f}, max |diff| {o['router_max_abs_diff']:.3g}: {'OK' if ok else 'NOT MET'}")
    else:
        print("\nmergekit is not installed: moekit's rows only")
    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")
    for path in outs.values():
        shutil.rmtree(path, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
