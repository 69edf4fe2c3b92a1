"""Training across processes: --shard-degree (FSDP2) and --expert-parallel give the run of one process at the same
global batch (losses and final weights within 1e-5), resume after kill -9 step for step (also into another
number of processes), and write outputs that transformers loads with the one-process run's logits. Gloo, CPU."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from moekit.llama.config import LlamaConfig
from moekit.llama.errors import ConfigError
from moekit.llama.model import Llama
from moekit.moe.accounting import Plan, count_params, derive
from moekit.moe.train.source import load_model

from helpers import ROOT, one_line_error

# The trainer in a child, with two presets of its own: 8 experts of which the last two are never chosen (their
# router bias is -100: some ranks' experts receive no tokens), with and without a capacity factor (1.0, patched
# into the layer: an HF checkpoint cannot record one, so the run could not write its output). SLOW=1: it sleeps
# after each optimizer step, so a test can kill it between two saved states; STALL=R: process R hangs.
TRAINER = """
import math, os, sys, time, torch
from moekit.moe import config
from moekit.moe.model import MoEForCausalLM
from moekit.moe.router import Router
config.MOE_PRESETS["tiny-moe-idle"] = config.MOE_PRESETS["tiny-moe-capacity"] = config.MOE_PRESETS["tiny-moe-8x2"]
if "tiny-moe-capacity" in sys.argv:
    config.MoEConfig.capacity = lambda self, T: math.ceil(T * self.num_experts_per_tok / self.num_local_experts)
init = MoEForCausalLM._init_weights
def idle_experts(self, module):
    init(self, module)
    if isinstance(module, Router):
        module.e_score_correction_bias[-2:] = -100.0
MoEForCausalLM._init_weights = idle_experts
if os.environ.get("SLOW"):
    step = torch.optim.AdamW.step
    def slow(self, *a, **k):
        out = step(self, *a, **k)
        time.sleep(0.3)
        return out
    torch.optim.AdamW.step = slow
if os.environ.get("STALL", "none") == os.environ.get("RANK"):  # this process hangs in its first optimizer step
    torch.optim.AdamW.step = lambda self, *a, **k: time.sleep(3600)
from moekit import main
sys.exit(main(["train", *sys.argv[1:]]))
"""
BASE = ["--seq-len", "16", "--log-every", "1", "--eval-every", "3", "--eval-batches", "2", "--no-progress",
        "--lr", "3e-3"]
COMMON = [*BASE, "--balance", "global", "--router-bias-rate", "0.01"]  # MoE runs
KEYS = ("loss", "val_loss", "aux_loss", "z_loss", "grad_norm")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer") / "trainer.py"
    path.write_text(TRAINER)
    return str(path)


def launch(trainer, processes: int, *args, env=None, wait=True):
    """`moekit train ARGS` in `processes` gloo processes (torchrun), or in this interpreter's python for 1."""
    run = [sys.executable, trainer] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), trainer]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen([*run, *args], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run([*run, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    ours = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    assert done.returncode == 0, "\n".join(ours[:20]) or done.stderr[-3000:]
    return done


def metrics(out) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(out) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, one file or sharded (a sharded run writes one file per decoder layer)."""
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def check_same_run(a, b, tol: float = 1e-5) -> None:
    """Two runs' outputs: the same steps, the metrics and the final weights within tol."""
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb)
    for step in ma:
        for key in KEYS:
            if key in ma[step]:
                assert abs(ma[step][key] - mb[step][key]) <= tol, (step, key, ma[step], mb[step])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= tol, worst


def hf_logits(out) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.arange(3, 40).view(1, -1)).logits


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-moe-capacity", "tiny-moe-shared"])
def test_sharded_and_expert_parallel_runs_equal_one_process(trainer, tmp_path, model):
    args = [model, "--steps", "5", *COMMON]
    one = ["--batch-size", "4"]
    if model == "tiny-moe-capacity":  # an expert's capacity counts the tokens of one forward: the same batches
        args += ["--balance", "micro"]
        one = ["--batch-size", "2", "--grad-accum", "2", "--eval-batches", "4"]
    launch(trainer, 1, *args, *one, "--out", str(tmp_path / "one"))
    for name, layout in (("shard", ["--shard-degree", "2"]), ("ep", ["--expert-parallel", "2"])):
        done = launch(trainer, 2, *args, "--batch-size", "2", *layout, "--out", str(tmp_path / name))
        check_same_run(tmp_path / "one", tmp_path / name)
        assert "process(es) (" in done.stdout  # the layout is said
    saved = json.loads((tmp_path / "ep" / "train_config.json").read_text())
    assert saved["processes"] == 2 and saved["options"]["expert_parallel"] == 2
    assert metrics(tmp_path / "ep")[5]["peak_memory_gb"] > 0.05
    # the planner's training state per process (fp32: 16 bytes a parameter, split as the layout splits it) against
    # what the fullest process held; within 3% (a dimension that 2 does not divide leaves one rank a row more)
    count = count_params("tiny-moe-8x2" if model == "tiny-moe-capacity" else model)
    for name, plan in (("one", Plan(dtype="fp32")), ("shard", Plan(dtype="fp32", gpus=2, shard_degree=2)),
                       ("ep", Plan(dtype="fp32", gpus=2, expert_parallel=2))):
        planned = derive(count, plan).figure("train_memory_bytes_per_gpu").value / 1e9
        tolerance = dict(abs=1e-6) if name == "one" else dict(rel=0.03)  # the metric is rounded to 1 kB
        assert metrics(tmp_path / name)[5]["train_state_gb"] == pytest.approx(planned, **tolerance), name
    if model == "tiny-moe-shared":  # qwen2_moe layout: transformers reads it
        reference = hf_logits(tmp_path / "one")
        for name in ("shard", "ep"):
            assert (hf_logits(tmp_path / name) - reference).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_four_processes_expert_parallel_times_sharded(trainer, tmp_path):
    args = ["tiny-moe-idle", "--steps", "4", *COMMON]
    launch(trainer, 1, *args, "--batch-size", "4", "--out", str(tmp_path / "one"))
    launch(trainer, 4, *args, "--batch-size", "1", "--expert-parallel", "2", "--shard-degree", "2",
           "--activation-checkpointing", "--out", str(tmp_path / "four"))
    check_same_run(tmp_path / "one", tmp_path / "four")
    fractions = metrics(tmp_path / "four")[4]["expert_fraction"]
    assert all(layer[-2:] == [0.0, 0.0] for layer in fractions), fractions  # experts 6 and 7 never chosen


@pytest.mark.slow
def test_a_checkpoint_loads_straight_into_each_process_part(trainer, tmp_path):
    # a dense Llama with tied embeddings: each process reads its shards from the file and trains as one process
    # that read it whole (per-expert and fused MoE files, read for a rank's experts only: test_moe_train_weights.py)
    torch.manual_seed(4)
    Llama(LlamaConfig.from_name("tiny", tie_word_embeddings=True)).save_pretrained(tmp_path / "ckpt")
    args = [str(tmp_path / "ckpt"), "--tokenizer", "bytes", "--steps", "3", "--save-dtype", "fp32", *BASE]
    launch(trainer, 1, *args, "--batch-size", "4", "--out", str(tmp_path / "one"))
    launch(trainer, 2, *args, "--batch-size", "2", "--shard-degree", "2", "--out", str(tmp_path / "two"))
    check_same_run(tmp_path / "one", tmp_path / "two")


# every forward sees the same 2 sequences whatever the number of processes (one process: --grad-accum 2, as a resume
# into one process adjusts it), and the balancing loss counts them alone (--balance micro)
RESUMED = ["tiny-moe-idle", "--steps", "8", "--batch-size", "2", *COMMON, "--balance", "micro"]
ONE = ["--grad-accum", "2", "--eval-batches", "4"]


@pytest.fixture(scope="module")
def whole(trainer, tmp_path_factory):
    """The uninterrupted one-process run of RESUMED, which every interrupted and resumed run must equal."""
    out = tmp_path_factory.mktemp("whole") / "whole"
    launch(trainer, 1, *RESUMED, *ONE, "--out", str(out))
    return out


def kill_after_state(child, state, step: int, marker: str) -> None:
    """kill -9 the launcher and every process whose command line holds `marker` (torchrun's workers live in
    sessions of their own) once the state of `step` is saved."""
    deadline = time.time() + 180
    while not (state / f"step-{step:06d}").is_dir() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    child.wait()
    assert (state / f"step-{step:06d}").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [
    ((2, ["--shard-degree", "2"]), (2, [])),  # the same layout again
    ((2, ["--expert-parallel", "2"]), (1, [])),  # a sharded state into one process
    ((1, []), (2, ["--shard-degree", "2", "--expert-parallel", "2"])),  # a replicated state into both
], ids=["shard-2", "ep-2-into-1", "1-into-shard-ep"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(trainer, whole, tmp_path, before, after):
    (n, layout), out = before, tmp_path / "cut"
    child = launch(trainer, n, *RESUMED, "--save-every", "3", *layout, *(ONE if n == 1 else []), "--out", str(out),
                   env={"SLOW": "1"}, wait=False)
    kill_after_state(child, tmp_path / "cut.partial" / "state", 3, str(out))
    n, layout = after
    done = launch(trainer, n, "--resume", "--out", str(out), *layout)
    check_same_run(whole, out)
    if before[0] != after[0]:
        assert f"resuming with {after[0]} process(es) instead of {before[0]}" in done.stdout, done.stdout
    assert "state" not in os.listdir(out)


@pytest.mark.slow
def test_an_impossible_layout_is_one_line_from_each_process_before_any_step(trainer, tmp_path):
    expected = "--expert-parallel 3 does not divide the 2 process(es); expected one of 1, 2"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", trainer,
           "tiny-moe", "--steps", "2", "--expert-parallel", "3", "--out", str(tmp_path / "x")]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and expected in done.stderr, done.stderr[-2000:]
    # one error from each process (their lines may interleave on the shared stderr)
    assert done.stderr.count("moekit train: error:") == done.stderr.count(expected) == 2, done.stderr[-2000:]
    assert "]: Traceback" not in done.stderr and not os.listdir(tmp_path)  # torchrun's own report aside


@pytest.mark.parametrize("world, shard, expert, preset, expected", [
    (2, 1, 3, "tiny-moe", "--expert-parallel 3 does not divide the 2 process(es); expected one of 1, 2"),
    (2, 4, 1, "tiny-moe", "--shard-degree 4 does not divide the 2 process(es); expected one of 1, 2"),
    (2, 1, 2, "tiny", "--expert-parallel 2: the model has no routed experts (a dense llama); expected an MoE model"),
    (6, 1, 3, "tiny-moe", "--expert-parallel 3 does not divide the model's 4 experts; expected a divisor of 4"),
], ids=["ep-world", "shard-world", "dense", "ep-experts"])
def test_impossible_layouts_name_the_degree_and_what_would_do(world, shard, expert, preset, expected):
    from moekit.moe.train.parallel import check_layout

    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_layout(world, shard, expert, load_model(preset, meta=True).model.config)


def test_accelerates_fsdp_plugin_is_refused_for_the_flag(capsys, tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: "FSDP"))
    err = one_line_error(capsys, "train", "tiny-moe", "--out", str(tmp_path / "x"))
    assert "accelerate's FSDP plugin is not a path of moekit train" in err and "--shard-degree N" in err
    assert not os.listdir(tmp_path)


def test_fp16_with_sharding_is_refused(capsys, tmp_path):
    err = one_line_error(capsys, "train", "tiny-moe", "--shard-degree", "2", "--mixed-precision", "fp16",
                         "--out", str(tmp_path / "x"))
    assert "--shard-degree with --mixed-precision fp16" in err and not os.listdir(tmp_path)


def test_activation_checkpointing_gives_the_plain_run(tmp_path):
    from moekit.moe.train.loop import train
    from moekit.moe.train.options import TrainOptions

    base = dict(model="tiny-moe-shared", steps=3, batch_size=4, seq_len=16, log_every=1, eval_batches=1,
                progress=False)
    for name, recompute in (("plain", False), ("recomputed", True)):
        train(TrainOptions(**base, activation_checkpointing=recompute, out=str(tmp_path / name)), log=lambda *a: None)
    check_same_run(tmp_path / "plain", tmp_path / "recomputed", tol=0.0)  # the same arithmetic, recomputed


@pytest.mark.slow
def test_a_damaged_sharded_state_falls_back_to_the_previous_one(trainer, whole, tmp_path):
    out, state = tmp_path / "cut", tmp_path / "cut.partial" / "state"
    child = launch(trainer, 2, *RESUMED, "--save-every", "2", "--keep-last", "3", "--shard-degree", "2",
                   "--out", str(out), env={"SLOW": "1"}, wait=False)
    kill_after_state(child, state, 4, str(out))
    shard = state / "step-000004" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # cut, as a full disk or a kill mid-write leaves it
    done = launch(trainer, 1, "--resume", "--out", str(out))
    assert "step-000004" in done.stdout and "resuming from the previous complete state, step 2" in done.stdout, \
        done.stdout
    check_same_run(whole, out)


@pytest.mark.slow
def test_a_stalled_process_stops_the_others_in_one_line(trainer, tmp_path):
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", trainer,
           "tiny-moe", "--steps", "3", "--seq-len", "16", "--collective-timeout", "10", "--out", str(tmp_path / "x")]
    start = time.time()
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "STALL": "1"})
    assert done.returncode != 0 and time.time() - start < 120, done.stderr[-2000:]
    assert ("moekit train: error: process 0 of 2: another process stopped or stalled (no answer within "
            "--collective-timeout 10 s)") in done.stderr, done.stderr[-2000:]
    assert "]: Traceback" not in done.stderr and not os.listdir(tmp_path)
