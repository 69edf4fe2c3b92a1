#!/usr/bin/env python
"""Upcycling memory and speed: generate a dense bf16 Llama checkpoint of >= 2 GB (few layers, wide FFN; written
tensor by tensor, so generation is bounded too), upcycle it to 8 experts with `moekit upcycle`, and compare with
`cp` of the upcycled bytes. Peak RSS of each child comes from `/usr/bin/time -v` (resource.getrusage otherwise).

    .venv/bin/python scripts/bench_upcycle.py                      # ~2.3 GB source, ~12 GB output, deleted after
    .venv/bin/python scripts/bench_upcycle.py --layers 1 --hidden 1024 --intermediate 4096   # a quick look

Checked (exit code 1 otherwise): the converter's memory bound, peak RSS < 2 x largest output tensor + 1 GiB, and
its time against cp + sync (the upcycler fsyncs its output): at most 2x. Writes a JSON record (--json) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from moekit.llama.checkpoint import CheckpointReader, ShardedWriter
from moekit.llama.config import LlamaConfig
from moekit.llama.io import AtomicDir, write_json, write_json_atomic
from moekit.llama.model import Llama

ROOT = Path(__file__).resolve().parents[1]

GiB = 1 << 30


def generate_dense(path: Path, config: LlamaConfig, dtype: torch.dtype, seed: int = 0) -> int:
    """A random dense checkpoint written one tensor at a time; returns its tensor bytes."""
    with torch.device("meta"):
        specs = [(n, dtype, tuple(t.shape)) for n, t in Llama(config).checkpoint_tensors()]
    with AtomicDir(path, force=True) as tmp:
        d = config.to_dict()
        d.update(architectures=["LlamaForCausalLM"], torch_dtype=str(dtype).removeprefix("torch."))
        write_json(os.path.join(tmp, "config.json"), d)
        writer = ShardedWriter(tmp, specs, "1GB")
        gen = torch.Generator().manual_seed(seed)
        for name, _, shape in specs:
            t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02
            writer.write(name, t.to(dtype))
        writer.close()
        write_json(os.path.join(tmp, "generation_config.json"), {"max_new_tokens": 8})
        return writer.total_size


def measure(cmd: list[str], env=None) -> dict:
    """Run cmd; wall seconds and peak RSS (MiB) of the process tree's largest process."""
    timer = shutil.which("time") if os.path.exists("/usr/bin/time") else None
    start = time.perf_counter()
    if timer:
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        rss = int(m.group(1)) / 1024 if m else float("nan")
    else:  # fallback: a fresh Python parent per command, so RUSAGE_CHILDREN is this command's alone
        probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)")
        p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        rss = int(p.stderr.strip().splitlines()[-1]) / 1024
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return {"command": " ".join(cmd), "seconds": round(wall, 2), "peak_rss_mib": round(rss, 1),
            "stdout": p.stdout.strip().splitlines()[-1:]}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__}


def shape_args(ap: argparse.ArgumentParser, layers: int) -> None:
    """--hidden, --intermediate, --layers, --vocab: the generated dense model's shape (see `dense_config`)."""
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--vocab", type=int, default=32000)


def dense_config(args) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8)


def largest_tensor(path: Path) -> int:
    """Bytes of the largest tensor in a checkpoint directory, from the shards' headers."""
    with CheckpointReader(str(path)) as reader:
        return max(map(reader.nbytes, reader.names()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/moekit-bench-upcycle")
    shape_args(ap, layers=4)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--recipe", default="copy")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved upcycle / cp runs; the best of each (2)")
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench_upcycle.json"))
    ap.add_argument("--keep", action="store_true", help="keep the generated and upcycled checkpoints")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, dst, cp = work / "dense", work / "moe", work / "moe-cp"
    for p in (dst, cp):
        shutil.rmtree(p, ignore_errors=True)
    config = dense_config(args)
    H, Fd, L, V, E = args.hidden, args.intermediate, args.layers, args.vocab, args.num_experts
    attn = 2 * H * H + 2 * H * (H // 4)
    src_bytes = 2 * (2 * V * H + L * (attn + 3 * H * Fd + 2 * H) + H)
    out_bytes = 2 * (2 * V * H + L * (attn + E * 3 * H * Fd + E * H + 2 * H) + H)
    need = src_bytes + 2 * out_bytes
    free = shutil.disk_usage(work).free
    if free < need * 1.05:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.1f} GB")
    print(f"source {src_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, under {work}", flush=True)

    t0 = time.perf_counter()
    cached = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    if any(cached.get(k) != v for k, v in config.to_dict().items()):
        generate_dense(src, config, torch.bfloat16)  # none kept by an earlier --keep run, or another shape
    print(f"generated the dense checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)

    py = [sys.executable, "-m", "moekit"]
    env = dict(os.environ)
    upcycle_cmd = [*py, "upcycle", str(src), str(dst), "--num-experts", str(E), "--recipe", args.recipe,
                   "--no-verify", "--no-progress"]
    runs: dict[str, list[dict]] = {"moekit upcycle --no-verify": [], "cp -r": [], "sync (after cp)": [],
                                   "cp -r + sync": []}
    warm = work / "warm-up"  # one untimed copy first: the first big write after a quiet spell is throttled
    subprocess.run(["sh", "-c", f"cp -r '{src}' '{warm}' && sync '{warm}'/* && rm -r '{warm}'"], check=True)
    for _ in range(args.repeats):  # interleaved, each from a clean page cache state; the best of each is kept
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        runs["moekit upcycle --no-verify"].append(measure(upcycle_cmd, env))
        os.sync()
        c, s = measure(["cp", "-r", str(dst), str(cp)]), measure(["sh", "-c", f"sync '{cp}'/*"])
        runs["cp -r"].append(c)
        runs["sync (after cp)"].append(s)
        runs["cp -r + sync"].append({**c, "command": f"{c['command']} && sync", "seconds": c["seconds"] + s["seconds"]})
        shutil.rmtree(cp)
    rows = {"python + torch import": measure([sys.executable, "-c", "import torch, moekit.upcycle.convert"], env)}
    rows.update({name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()})
    os.sync()
    rows["moekit verify (streaming)"] = measure([*py, "verify", str(src), str(dst), "--no-progress"], env)

    written, largest = dir_bytes(dst), largest_tensor(dst)
    limit_mib = (2 * largest + GiB) / (1 << 20)
    up, cps = rows["moekit upcycle --no-verify"], rows["cp -r + sync"]
    result = {
        "machine": machine(), "config": {"hidden_size": H, "intermediate_size": Fd, "num_hidden_layers": L,
                                         "vocab_size": V, "dtype": "bf16", "num_experts": E, "recipe": args.recipe},
        "source_bytes": dir_bytes(src), "output_bytes": written, "largest_output_tensor_bytes": largest,
        "rows": rows, "all_runs": {k: [r["seconds"] for r in v] for k, v in runs.items()}, "rss_limit_mib": round(limit_mib, 1),
        "rss_ok": up["peak_rss_mib"] < limit_mib, "time_ratio_vs_cp_sync": round(up["seconds"] / cps["seconds"], 2),
        "time_ratio_vs_cp": round(up["seconds"] / rows["cp -r"]["seconds"], 2),
    }
    result["time_ok"] = result["time_ratio_vs_cp_sync"] <= 2.0
    print(f"\n{'step':<28} {'seconds':>8} {'peak RSS MiB':>13} {'GB/s':>6}")
    for name, r in rows.items():
        rate = "" if name.startswith(("python", "moekit verify", "sync")) else f"{written / 1e9 / r['seconds']:.2f}"
        print(f"{name:<28} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13.0f} {rate:>6}")
    print(f"\nsource {result['source_bytes'] / 1e9:.2f} GB -> output {written / 1e9:.2f} GB; largest output tensor "
          f"{largest / (1 << 20):.0f} MiB; RSS limit 2 x largest + 1 GiB = {limit_mib:.0f} MiB: "
          f"{'OK' if result['rss_ok'] else 'OVER'}; upcycle / (cp + sync) = {result['time_ratio_vs_cp_sync']} "
          f"({'OK' if result['time_ok'] else 'SLOW'}), upcycle / cp = {result['time_ratio_vs_cp']}")
    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["rss_ok"] and result["time_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
