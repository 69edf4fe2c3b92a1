"""moekit's main job end to end on real text, through the `moekit` command line only (every command is printed,
so a user can run each by hand), reproducing the sparse-upcycling result (Komatsuzaki et al., 2022) in miniature:

1. a byte-level BPE tokenizer trained on the Python standard library's sources (`builtin:python-stdlib`; one file
   in 20 is held out for validation);
2. a small dense Llama pretrained from scratch on them;
3. its parameters; 4. upcycled to 8 experts, top-2 (`copy`), verified, its parameters;
5. training continued from the same point, for the same steps and tokens, twice: the dense model and the MoE;
6. a table (parameters, continuation FLOPs, validation loss and perplexity, tokens/s), `moekit plot` pictures and
   greedy completions of code prompts from both;
7. `moekit eval` of both on the held-out files: bits per byte with intervals, and the MoE's gap to the dense model
   with its paired interval; where the MoE sends the tokens of three standard-library packages (a heatmap).

Finished steps are not redone (`--fresh` starts over); an interrupted training run resumes from its last state.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import time

from moekit.cli import main as moekit_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("def fibonacci(n):", "def read_lines(path):", "class Stack:", "    for key, value in")
ROUTED = ("email", "json", "asyncio")  # standard-library packages whose tokens' routes are compared
SIZES = {  # the default, and a toy size for the test of this script (seconds)
    "full": dict(preset="mini", vocab=4096, pretrain_steps=400, continue_steps=200, batch=16, seq_len=256,
                 lr_pretrain="3e-3", lr_continue="1e-3", eval_every=50, save_every=100, eval_batches=8),
    "toy": dict(preset="tiny", vocab=320, pretrain_steps=6, continue_steps=4, batch=2, seq_len=32,
                lr_pretrain="3e-3", lr_continue="1e-3", eval_every=2, save_every=2, eval_batches=1),
}


def moekit(*args: str, head: int | None = None, quiet: bool = False) -> str:
    """Run the moekit command line (in this process: one torch import for the whole demo) with the arguments a
    user would type; echo the command and (the first `head` lines of) its output."""
    print("  $ moekit " + " ".join(shlex.quote(a) for a in args), flush=True)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = moekit_main(list(args))
    out = (stdout.getvalue() + stderr.getvalue()).rstrip()
    if not quiet:
        print("\n".join("    " + line for line in out.splitlines()[:head]), flush=True)
    if code:
        raise SystemExit(f"moekit {args[0]} failed (exit code {code}):\n{out[-2000:]}")
    return stdout.getvalue()


def _short(path: str) -> str:
    """`path` relative to the repository when it lies inside it (shorter commands to read and copy)."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def train(out: str, *args: str) -> None:
    """`moekit train`, skipped when OUT is finished, resumed when an interrupted OUT.partial is there."""
    if os.path.isdir(out):
        print(f"  (done: {out})")
    elif os.path.isdir(out + ".partial"):
        moekit("train", "--resume", "--out", out, "--no-progress", head=3)
    else:
        moekit("train", *args, "--out", out, "--no-progress", head=3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="working directory (runs/demo)")
    p.add_argument("--fresh", action="store_true", help="start over: remove the working directory first")
    p.add_argument("--seed", default="0", help="seed of the pretraining and the continuations (0)")
    p.add_argument("--toy", action="store_true", help="a toy size that runs in seconds (for tests)")
    p.add_argument("--docs", default="docs/demo",
                   help="where a copy of the pictures goes, for the README ('' for none)")
    args = p.parse_args()
    size = SIZES["toy" if args.toy else "full"]
    t0 = time.time()
    args.out, args.docs = (_short(os.path.abspath(p)) if p else p for p in (args.out, args.docs))
    os.chdir(ROOT)  # the moekit commands run here: paths are shown relative to the repository
    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    d = {name: os.path.join(args.out, name) for name in ("tokenizer", "dense", "moe", "dense-continued",
                                                         "moe-continued", "plots", "eval", "routing")}
    data = ["--data", "builtin:python-stdlib", "--val-data", "builtin:python-stdlib-val"]
    common = [*data, "--batch-size", str(size["batch"]), "--seq-len", str(size["seq_len"]), "--eval-every",
              str(size["eval_every"]), "--eval-batches", str(size["eval_batches"]), "--save-every",
              str(size["save_every"]), "--seed", args.seed, "--log-every", str(size["eval_every"] // 2 or 1)]

    print("[1] a byte-level BPE tokenizer trained on the standard library's sources (held-out files excluded)")
    if os.path.isdir(d["tokenizer"]):
        print(f"  (done: {d['tokenizer']})")
    else:
        moekit("tokenizer", "train", "builtin:python-stdlib", "--out", d["tokenizer"], "--vocab-size",
               str(size["vocab"]), "--no-progress")

    print(f"[2] pretrain a dense Llama '{size['preset']}' from scratch with it")
    train(d["dense"], size["preset"], "--tokenizer", d["tokenizer"], *common, "--steps", str(size["pretrain_steps"]),
          "--lr", size["lr_pretrain"])

    print("[3] its parameters")
    moekit("params", d["dense"], head=1)

    print("[4] upcycle it: every FFN becomes 8 copies of itself, 2 active per token; check the function is kept")
    if os.path.isdir(d["moe"]):
        print(f"  (done: {d['moe']})")
    else:
        moekit("upcycle", d["dense"], d["moe"], "--num-experts", "8", "--top-k", "2", "--recipe", "copy",
               "--no-progress")
    moekit("verify", d["dense"], d["moe"], "--no-progress")
    moekit("params", d["moe"], head=1)

    steps = str(size["continue_steps"])
    print(f"[5] continue both from the same point: {steps} steps, same data order, optimizer and schedule")
    for name in ("dense", "moe"):
        train(d[f"{name}-continued"], d[name], *common, "--steps", steps, "--lr", size["lr_continue"])

    print("[6] results")
    report(d, size, args)
    if os.path.isdir(d["plots"]):
        shutil.rmtree(d["plots"])
    moekit("plot", d["dense-continued"], d["moe-continued"], "--out", d["plots"])
    if args.docs and not args.toy:
        os.makedirs(args.docs, exist_ok=True)
        for name in (n for n in os.listdir(d["plots"]) if n.endswith(".png")):
            shutil.copyfile(os.path.join(d["plots"], name), os.path.join(args.docs, name))
    for name in ("dense-continued", "moe-continued"):
        print(f"  greedy completions, {name}:")
        out = json.loads(moekit("generate", d[name], "--prompt", *PROMPTS, "--max-new-tokens", "30", "--json",
                                quiet=True))
        for item in out:
            print("    " + json.dumps(item["prompt"] + item["completion"])[:160])
    evaluation(d, size, args)
    print(f"done in {time.time() - t0:.0f} s; everything is under {args.out}/")


def evaluation(d: dict, size: dict, args) -> None:
    """[7] Both continuations on the held-out files, and the MoE's routing of three standard-library packages."""
    import sysconfig

    print("[7] evaluate both on the held-out files; where the MoE sends each package's tokens")
    window = ["--max-length", str(size["seq_len"]), "--stride", str(size["seq_len"] // 2),
              *(["--max-documents", "6"] if args.toy else [])]
    made = [os.path.join(d[n], "results.json") for n in ("eval", "routing")]
    trained = max(os.path.getmtime(os.path.join(d[f"{n}-continued"], "train_config.json")) for n in ("dense", "moe"))
    if all(os.path.isfile(f) and os.path.getmtime(f) > trained for f in made):
        print(f"  (done: {d['eval']}, {d['routing']})")  # evaluated after the models were last trained
        return
    for name in ("eval", "routing"):
        if os.path.isdir(d[name]):
            shutil.rmtree(d[name])
    result = json.loads(moekit("eval", d["dense-continued"], d["moe-continued"], "--data",
                               "held-out=builtin:python-stdlib-val", *window, "--out", d["eval"], "--json",
                               "--no-progress", quiet=True))
    for r in result["rows"]:
        print(f"  {r['model']}: {r['bits_per_byte']:.4f} bits/byte [{r['bits_per_byte_low']:.4f}, "
              f"{r['bits_per_byte_high']:.4f}] on {r['documents']} files, {r['bytes']:,} bytes")
    gap = result["gaps"][0]
    print(f"  MoE - dense: {gap['bits_per_byte_diff']:+.4f} bits/byte, 95% interval "
          f"[{gap['bits_per_byte_diff_low']:+.4f}, {gap['bits_per_byte_diff_high']:+.4f}] (paired over the files)")
    stdlib = sysconfig.get_paths()["stdlib"]
    moekit("eval", d["moe-continued"], "--data", *(f"{p}={os.path.join(stdlib, p)}" for p in ROUTED), *window,
           "--routing", "--out", d["routing"], "--no-progress", head=12)
    if args.docs and not args.toy:
        shutil.copyfile(os.path.join(d["routing"], "routing-moe-continued.png"),
                        os.path.join(args.docs, "routing.png"))


def report(d: dict, size: dict, args) -> None:
    rows = []
    for name in ("dense", "moe"):
        with open(os.path.join(d[f"{name}-continued"], "train_config.json")) as f:
            run = json.load(f)
        count = json.loads(moekit("params", d[name], "--tokens", str(run["tokens"]), "--seq-len",
                                  str(size["seq_len"]), "--json", quiet=True))
        with open(os.path.join(d[f"{name}-continued"], "metrics.jsonl")) as f:
            speeds = [m["tokens_per_s"] for m in map(json.loads, f) if "tokens_per_s" in m]
        rows.append((name, count["total_params"], count["active_params"], count["derived"]["train_flops"],
                     run["initial_val_loss"], run["val_loss"], sorted(speeds)[len(speeds) // 2], run["tokens"]))
    print(f"  {'model':<6} {'total':>11} {'active':>11} {'continuation FLOPs':>19} {'val loss (ppl) before':>22} "
          f"{'after':>16} {'tokens/s':>9}")
    for name, total, active, flops, before, after, speed, _ in rows:
        print(f"  {name:<6} {total:>11,} {active:>11,} {flops:>19.3e} {before:>13.4f} ({math.exp(before):>6.1f}) "
              f"{after:>8.4f} ({math.exp(after):>5.1f}) {speed:>9,.0f}")
    dense_after, moe_after, tokens = rows[0][5], rows[1][5], rows[0][7]
    print(f"  after {tokens:,} more tokens each: MoE {moe_after:.4f} vs dense {dense_after:.4f} validation loss "
          f"({'MoE lower' if moe_after < dense_after else 'dense lower'} by {abs(moe_after - dense_after):.4f});"
          f" the MoE spent {rows[1][3] / rows[0][3]:.2f}x the dense model's training FLOPs")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump([dict(zip(("model", "total", "active", "train_flops", "val_before", "val_after", "tokens_per_s",
                             "tokens"), r)) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
