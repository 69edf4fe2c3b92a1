"""moe.train.loop (`moekit train`): the loss falls, outputs load in moekit and transformers, exact gradient
accumulation, the router bias once per optimizer step, checkpoint sources, one-line errors."""

import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers

from moekit.cli import main
from moekit.llama import LlamaConfig
from moekit.llama.model import Llama
from moekit.moe.model import MoEForCausalLM
from moekit.moe.router import Router
from moekit.moe.train import TrainOptions, load_model, train

FAST = dict(batch_size=8, seq_len=32, warmup=5, log_every=10, eval_every=20, eval_batches=2, progress=False)
CLI_FAST = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]






@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_loss_falls_and_output_loads(preset, tmp_path):
    out = tmp_path / "out"
    r = train(TrainOptions(model=preset, out=str(out), steps=40, **FAST), log=None)
    assert r.steps == 40 and r.tokens == 40 * 8 * 32
    assert r.val_loss < 0.8 * r.initial_val_loss, (r.initial_val_loss, r.val_loss)  # ~5.6 -> ~2.6
    assert sorted(os.listdir(out)) == [".moekit", "config.json", "generation_config.json", "metrics.jsonl", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json", "train_config.json"]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 10, 20, 30, 40] and "val_loss" in lines[2] and "val_loss" in lines[-1]
    keys = {"step", "tokens", "lr", "loss", "grad_norm", "tokens_per_s"}
    keys |= {"lm_loss", "aux_loss", "z_loss", "max_load"} if preset == "tiny-moe" else set()
    assert keys <= set(lines[1]) and lines[-1]["val_loss"] == pytest.approx(r.val_loss, abs=1e-5)
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["options"]["seed"] == 0 and saved["options"]["steps"] == 40 and saved["source"] == f"preset {preset}"

    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = r.model(ids).logits
        ours = load_model(str(out)).model
        assert type(ours) is type(r.model)
        assert (ours.eval()(ids).logits - want).abs().max().item() <= 1e-5
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
        assert (hf(ids).logits - want).abs().max().item() <= 1e-5


def test_gradient_accumulation_is_exact(monkeypatch):
    grads = []
    original = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    # lr 1e-4: Adam's first step is lr * g / (|g| + eps), which turns fp32 rounding in gradients near eps into
    # lr-sized differences; the gradients themselves are compared exactly below.
    common = dict(model="tiny", steps=1, seq_len=16, lr=1e-4, warmup=0, eval_batches=1, progress=False)
    a = train(TrainOptions(batch_size=4, grad_accum=1, **common), log=None).model.state_dict()
    b = train(TrainOptions(batch_size=2, grad_accum=2, **common), log=None).model.state_dict()
    assert len(grads) == 2 and max((x - y).abs().max().item() for x, y in zip(*grads)) <= 1e-7
    assert max(x.abs().max().item() for x in grads[0]) > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    start = load_model("tiny").model
    assert max((a[k] - v).abs().max().item() for k, v in start.state_dict().items()) > 5e-5  # it did move


def test_router_bias_updates_once_per_optimizer_step(monkeypatch):
    calls = []
    original = MoEForCausalLM.update_router_bias

    def spy(self, counts, rate=None):
        calls.append(counts.clone())
        original(self, counts, rate)

    monkeypatch.setattr(MoEForCausalLM, "update_router_bias", spy)
    rate, B, A, S = 0.01, 2, 2, 16
    r = train(TrainOptions(model="tiny-moe", steps=2, batch_size=B, grad_accum=A, seq_len=S, eval_batches=1,
                          router_bias_rate=rate, progress=False), log=None)
    assert len(calls) == 2  # once per optimizer step, not per micro-batch
    k = r.model.config.num_experts_per_tok
    for counts in calls:  # [L_moe, E], summed over both micro-batches
        assert counts.shape == (2, 4) and (counts.sum(-1) == A * B * (S + 1) * k).all()
    want = sum(rate * torch.sign(c.float().mean(-1, keepdim=True) - c.float()) for c in calls)  # [L_moe, E]
    got = torch.stack([m.e_score_correction_bias for m in r.model.modules() if isinstance(m, Router)])
    assert torch.allclose(got, want) and got.abs().sum() > 0


def test_cli_trains_and_writes_out(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "tiny-moe", "--out", str(out), "--steps", "5", *CLI_FAST]) == 0
    assert (out / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert "trained preset tiny-moe: 5 steps" in capsys.readouterr().out
    assert main(["train", "tiny-moe", "--out", str(out), "--steps", "2", "--force", *CLI_FAST]) == 0


def _small_vocab_checkpoint(path):
    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case", ["missing-data", "exists", "small-vocab", "seq-too-long", "npy-ids", "steps",
                                  "bad-config", "unknown-model"])
def test_cli_errors_are_one_line_and_write_nothing(case, tmp_path, capsys):
    out, model, extra = tmp_path / "out", "tiny", []
    if case == "missing-data":
        extra = ["--data", str(tmp_path / "nope.txt")]
    elif case == "exists":
        out.mkdir()
    elif case == "small-vocab":
        model = _small_vocab_checkpoint(tmp_path / "ckpt")
    elif case == "seq-too-long":
        extra = ["--seq-len", "256"]  # tiny: max_position_embeddings 256, windows of 257
    elif case == "npy-ids":
        np.save(tmp_path / "ids.npy", np.array([1, 2, 300] * 100))
        extra = ["--data", str(tmp_path / "ids.npy")]
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "bad-config":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text("{not json")
        model = str(tmp_path / "ckpt")
    elif case == "unknown-model":
        model = "no-such-preset"
    assert main(["train", model, "--out", str(out), *CLI_FAST, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moekit train: error:") and "\n" not in err, err
    assert out.is_dir() == (case == "exists") and not glob.glob(str(out) + ".tmp-*")
    if case == "exists":
        assert os.listdir(out) == []




def test_checkpoint_source_keeps_its_format_and_save_every(tmp_path):
    from moekit.moe.config import MoEConfig

    MoEForCausalLM(MoEConfig.from_name("tiny-moe-shared")).save_pretrained(tmp_path / "src")  # qwen2_moe
    out = tmp_path / "out"
    r = train(TrainOptions(model=str(tmp_path / "src"), out=str(out), steps=4, batch_size=2, seq_len=16, tokenizer="bytes",
                          eval_batches=1, save_every=2, progress=False), log=None)
    assert isinstance(r.model, MoEForCausalLM) and (out / "step-000002" / "model.safetensors").is_file()
    for d in (out, out / "step-000002"):
        assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert json.loads((out / "train_config.json").read_text())["source"] == str(tmp_path / "src")


def test_the_final_validation_loss_is_of_the_weights_as_saved(tmp_path):
    """A bf16 source is saved in bf16 (auto): the reported loss is the rounded weights', and a rounding that costs
    more than a tenth of the gain says so, naming --save-dtype fp32."""
    from safetensors.torch import load_file

    from moekit.moe.train import loop

    torch.manual_seed(0)
    Llama(LlamaConfig.from_name("tiny")).save_pretrained(tmp_path / "src", dtype="bf16")
    logs = []
    r = train(TrainOptions(model=str(tmp_path / "src"), out=str(tmp_path / "out"), steps=6, batch_size=4, seq_len=32,
                           tokenizer="bytes", lr=3e-3, eval_batches=2, progress=False), log=logs.append)
    config = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert config["saved_dtype"] == "bfloat16" and r.saved_dtype == "bfloat16"
    assert config["val_loss"] == r.val_loss != config["val_loss_before_rounding"] == r.val_loss_unrounded
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, t in r.model.state_dict().items():  # the model evaluated last holds exactly what OUT holds
        if name in saved:
            assert torch.equal(t, saved[name].float()), name
    assert f"(as saved in bfloat16; {r.val_loss_unrounded:.4f} before rounding)" in logs[-1 - bool(r.note)]
    gain, cost = r.initial_val_loss - r.val_loss_unrounded, r.val_loss - r.val_loss_unrounded
    assert (r.note is not None) == (gain > 0 and cost > loop.ROUNDING_SHARE * gain)
    if r.note:
        assert "--save-dtype fp32 keeps the trained weights" in r.note and logs[-1] == r.note
    fp32 = train(TrainOptions(model=str(tmp_path / "src"), out=str(tmp_path / "fp32"), steps=6, batch_size=4,
                              seq_len=32, tokenizer="bytes", lr=3e-3, eval_batches=2, progress=False,
                              save_dtype="fp32"), log=None)
    assert fp32.val_loss_unrounded is None and fp32.val_loss == pytest.approx(r.val_loss_unrounded, abs=1e-6)


# ---- real checkpoints: the upcycled model continues the dense one, the output is complete -------------------

def test_upcycled_copy_starts_at_its_dense_parents_loss_and_the_output_is_complete(tmp_path):
    from moekit.upcycle import UpcycleOptions, upcycle

    from helpers import corpus, tiny_checkpoint

    dense = tiny_checkpoint(tmp_path / "dense", dtype=torch.bfloat16)
    upcycle(str(dense), str(tmp_path / "moe"), UpcycleOptions(num_experts=4, top_k=2), progress=False, log=None)
    (tmp_path / "data.txt").write_text("\n".join(corpus(3)))
    common = dict(data=str(tmp_path / "data.txt"), steps=3, batch_size=2, seq_len=32, eval_batches=2,
                  progress=False)
    a = train(TrainOptions(model=str(dense), out=str(tmp_path / "dense-more"), **common), log=None)
    b = train(TrainOptions(model=str(tmp_path / "moe"), out=str(tmp_path / "moe-more"), **common), log=None)
    assert abs(a.initial_val_loss - b.initial_val_loss) <= 1e-4, (a.initial_val_loss, b.initial_val_loss)
    assert 2 < a.initial_val_loss < 7  # through the BPE tokenizer (320 ids), not bytes
    out = tmp_path / "moe-more"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "metrics.jsonl",
            "train_config.json"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # the source's dtype
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.dtype == torch.bfloat16
    ids = tok("def main():", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 0 and hf.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [("tiny", []), ("tiny-moe", ["--balance", "global", "--router-bias-rate",
                                                                       "0.01"])], ids=["dense", "moe"])
def test_two_processes_give_the_losses_of_one(tmp_path, model, extra):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [model, "--steps", "4", "--seq-len", "16", "--log-every", "1", "--eval-batches", "2", "--no-progress",
            "--grad-accum", "2", *extra]
    one = subprocess.run([sys.executable, "-m", "moekit", "train", *args, "--batch-size", "4", "--out",
                          str(tmp_path / "one")], cwd=root, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moekit", "train",
                          *args, "--batch-size", "2", "--out", str(tmp_path / "two")], cwd=root, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda d: [json.loads(s) for s in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read("one"), read("two")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "aux_loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5, (key, x, y)
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "train_config.json").read_text())["processes"] == 1
