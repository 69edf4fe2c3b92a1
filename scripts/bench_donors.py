#!/usr/bin/env python
"""Merging donors, memory against the number of donors: generate 4 dense bf16 Llama checkpoints of one shape
(different seeds; the first has a byte-level tokenizer.json and serves as the base), then merge D = 1, 2 and 4 of
them into the same 4-expert MoE (`moekit upcycle DST --donors ... --num-experts 4 --router-init hidden`, 4 / D
copies of each donor; verification on, as users run it), and run the single-model converter on the first donor
(`moekit upcycle SRC DST --num-experts 4`) for reference. Peak RSS of each from `/usr/bin/time -v`.

    .venv/bin/python scripts/bench_donors.py                  # 4 x 1.4 GB donors, 3.5 GB outputs, deleted after
    .venv/bin/python scripts/bench_donors.py --hidden 1024 --intermediate 4096 --vocab 8000   # a quick look

Checked (exit code 1 otherwise): every merge stays under the single-model converter's memory bound, 2 x largest
output tensor + 1 GiB, and the peak RSS of D = 4 is within 10% (+ 64 MiB) of D = 1: independent of the number of
donors. Writes JSON (--json), prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_upcycle beside this file

import torch  # noqa: E402
from bench_upcycle import (  # noqa: E402
    GiB,
    dense_config,
    dir_bytes,
    generate_dense,
    largest_tensor,
    machine,
    measure,
    shape_args,
)

from moekit.llama.io import write_json_atomic  # noqa: E402
from moekit.moe.train.tokenizer import ByteTokenizer  # noqa: E402

PROMPTS = ["def fibonacci(n): return n if n < 2 else", "Once upon a time, in a small harbour town,",
           "Solve for x: 3x + 7 = 22. First subtract 7", "Translate into French: the cat sleeps"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moekit-bench-donors")
    shape_args(ap, layers=2)
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_donors.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated donors")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = dense_config(args)
    donors = [work / f"donor{d}" for d in range(4)]
    for d, path in enumerate(donors):
        cached = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        if any(cached.get(k) != v for k, v in config.to_dict().items()):
            generate_dense(path, config, torch.bfloat16, seed=d)
    ByteTokenizer().save(str(donors[0]))
    print(f"4 donors of {dir_bytes(donors[0]) / 1e9:.2f} GB under {work}", flush=True)

    py, env = [sys.executable, "-m", "moekit"], dict(os.environ)
    dst = work / "moe"
    rows: dict[str, dict] = {}
    runs = [("moekit upcycle SRC DST (one source, 4 copies)", [str(donors[0]), str(dst)])]
    for D in (1, 2, 4):
        prompts = [f"{d}:{PROMPTS[d]}" for d in range(D)]
        runs.append((f"moekit upcycle --donors, D = {D}", [str(dst), "--donors", *map(str, donors[:D]),
                                                           "--router-init", "hidden", "--positive-prompts", *prompts]))
    for name, argv in runs:
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        rows[name] = measure([*py, "upcycle", *argv, "--num-experts", "4", "--no-progress"], env)
        rows[name]["output_bytes"] = dir_bytes(dst)
        rows[name]["largest_tensor_bytes"] = largest_tensor(dst)
    single, merges = rows[runs[0][0]], [rows[n] for n, _ in runs[1:]]
    limit_mib = (2 * single["largest_tensor_bytes"] + GiB) / (1 << 20)
    one, four = merges[0]["peak_rss_mib"], merges[-1]["peak_rss_mib"]
    result = {"machine": machine(), "config": {"hidden_size": args.hidden, "intermediate_size": args.intermediate,
                                               "num_hidden_layers": args.layers, "vocab_size": args.vocab,
                                               "dtype": "bf16", "num_experts": 4},
              "donor_bytes": dir_bytes(donors[0]), "rows": rows, "rss_limit_mib": round(limit_mib, 1),
              "rss_ok": all(r["peak_rss_mib"] < limit_mib for r in merges),
              "independent_of_donors": four <= one * 1.1 + 64}
    print(f"\n{'run':<48} {'seconds':>8} {'peak RSS MiB':>13} {'output GB':>10}")
    for name, r in rows.items():
        print(f"{name:<48} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13.0f} {r['output_bytes'] / 1e9:>10.2f}")
    print(f"\nRSS limit 2 x largest output tensor + 1 GiB = {limit_mib:.0f} MiB: "
          f"{'OK' if result['rss_ok'] else 'OVER'}; D = 4 vs D = 1: {four:.0f} vs {one:.0f} MiB "
          f"({'independent' if result['independent_of_donors'] else 'GROWS'})")
    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")
    shutil.rmtree(dst, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["rss_ok"] and result["independent_of_donors"] else 1


if __name__ == "__main__":
    sys.exit(main())
