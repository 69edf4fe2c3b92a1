"""moe.accounting.cost / report: FLOPs, memory, time and cost; the textbook worked examples (7B at 2 bytes,
GPT-3's training time and cost) through `moekit params`."""

import pytest

from moekit.llama.config import LlamaConfig
from moekit.moe.accounting import Plan, count_config, derive
from moekit.moe.accounting.cost import known_peak_flops

from helpers import moekit, moekit_json

# mistralai/Mixtral-8x7B-v0.1 config.json (the fields that shape the model)
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False, sliding_window=None)


def test_7b_at_2_bytes_needs_14gb(capsys):
    out = moekit_json(capsys, "params", "7B", "--dtype", "bf16")
    assert out["total_params"] == 7_000_000_000
    assert out["derived"]["weight_memory_bytes"] == 14e9
    rc, text, _ = moekit(capsys, "params", "7B", "--dtype", "fp16")
    assert "weight memory (fp16)" in text and "14.00 GB" in text
    # The real Llama-2-7B has 6.74B parameters: 13.48 GB.
    assert moekit_json(capsys, "params", "llama2-7b")["derived"]["weight_memory_bytes"] == 6_738_415_616 * 2


def test_gpt3_days_at_60_tflops(capsys):
    out = moekit_json(capsys, "params", "175B", "--train-flops", "3.14e23", "--gpus", 256, "--peak-flops", "60e12")
    days = out["derived"]["train_days_at_peak"]
    assert days == pytest.approx(3.14e23 / (256 * 60e12 * 86400))  # 236.6: the worked example's "~236 days"
    assert 236 < days < 237
    # With the worked example's rounding of 60 TFLOP/s to 5.2e18 FLOPs a day: 235.9, which it prints as ~236.
    out = moekit_json(capsys, "params", "175B", "--train-flops", "3.14e23", "--gpus", 256,
                      "--peak-flops-per-day", "5.2e18")
    assert round(out["derived"]["train_days_at_peak"]) == 236
    # 6 x N x tokens from GPT-3's 300B tokens gives the 3.14e23 FLOPs to 0.3%.
    out = moekit_json(capsys, "params", "175B", "--tokens", "300B")
    assert out["derived"]["train_flops"] == pytest.approx(3.14e23, rel=0.005)


def test_gpt3_cost(capsys):
    argv = ["params", "175B", "--train-flops", "3.14e23", "--gpus", 256, "--peak-flops-per-day", "5.2e18",
            "--round-days", "--mfu", "0.7", "--price-per-gpu-hour", "2"]
    out = moekit_json(capsys, *argv, "--explain")
    d = out["derived"]
    assert d["train_days_at_peak"] == 236
    assert d["cost_usd"] == 4_142_811.43 == round(2 * 256 * 24 * 236 / 0.7, 2)
    assert "price_per_gpu_hour × gpus × 24 × days_at_peak / mfu" in out["explain"]["cost_usd"]
    rc, text, _ = moekit(capsys, *argv, "--explain")
    assert rc == 0 and "$4,142,811.43" in text and "236 days" in text
    assert "3.14e+23 / (256 × 5.2e+18) = 235.88, rounded" in text


def test_flops_memory_formulas():
    c = count_config(MIXTRAL_8X7B)
    r = derive(c, Plan(dtype="bf16", seq_len=4096, batch=8, tokens=1e12, gpus=64, zero=3))
    f = {x.key: x.value for x in r.figures}
    n_mm = c.active_params - 32000 * 4096 - c.active["norm"]  # the embedding lookup and norms are no matmuls
    attn = 2 * 32 * 4096 * 32 * (128 + 128)
    assert f["forward_flops_per_token"] == 2 * n_mm + attn
    assert f["train_flops"] == 6 * n_mm * 1e12 + 3 * attn * 1e12
    assert f["weight_memory_bytes"] == c.total_params * 2
    assert f["kv_cache_bytes"] == 8 * 4096 * 32 * (2 * 8 * 128) * 2
    assert f["train_memory_bytes_per_gpu"] == pytest.approx(c.total_params * 16 / 64)  # ZeRO-3: all sharded
    r = derive(c, Plan(dtype="bf16", gpus=64, zero=1))
    P = c.total_params
    assert r.figure("train_memory_bytes_per_gpu").value == pytest.approx(P * (2 + 2) + P * 12 / 64)
    r = derive(c, Plan(dtype="fp32"))
    assert r.figure("train_memory_bytes_per_gpu").value == P * 16  # fp32: no master copy, 4 + 4 + 8
    tied = count_config(LlamaConfig.from_name("tiny", tie_word_embeddings=True).to_dict())
    assert tied.total["lm_head"] == 0 and tied.tied
    assert tied.matmul_active_params == tied.active_params - tied.active["norm"]  # head matmul still counts


def test_mistral_sliding_window_limits_context():
    cfg = dict(MIXTRAL_8X7B, model_type="mistral", sliding_window=4096)
    r = derive(count_config(cfg), Plan(seq_len=32768))
    assert r.figure("kv_cache_bytes").value == 4096 * 32 * 2 * 8 * 128 * 2




def test_known_gpus_peak_flops_by_name_and_precision():
    assert known_peak_flops("NVIDIA H200", half_precision=True) == 989e12
    assert known_peak_flops("NVIDIA A100-SXM4-80GB", half_precision=False) == 19.5e12
    assert known_peak_flops("NVIDIA A10G", half_precision=True) == 125e12
    assert known_peak_flops("NVIDIA L40", half_precision=True) is None  # not an L4 (nor an L40S)
    assert known_peak_flops("CPU (x86_64)", half_precision=True) is None


def test_an_upcycle_is_costed_before_it_is_made(tmp_path, capsys):
    from helpers import tiny_checkpoint

    dense = tiny_checkpoint(tmp_path / "dense", tokenizer=False)
    flags = ["--num-experts", "4", "--top-k", "2", "--moe-layers", "1", "--shared-experts", "1"]
    planned = moekit_json(capsys, "params", str(dense), *flags, "--json")
    rc, _, err = moekit(capsys, "upcycle", str(dense), str(tmp_path / "moe"), *flags, "--no-progress")
    assert rc == 0, err
    made = moekit_json(capsys, "params", str(tmp_path / "moe"), "--json")
    assert (planned["total_params"], planned["active_params"]) == (made["total_params"], made["active_params"])
    assert planned["components"] == made["components"] and planned["total_params"] > 0


def test_layouts_divide_the_training_state_as_moekit_train_splits_it():
    from moekit.moe.accounting import count_params

    c = count_params("mixtral-8x7b")
    P, X = c.total_params, c.total["routed_experts"]
    figure = lambda **kw: {f.key: f.value for f in derive(c, Plan(dtype="bf16", **kw)).figures}  # noqa: E731
    f = figure(gpus=64, shard_degree=64, expert_parallel=8)  # --shard-degree alone: ZeRO-3
    assert f["train_memory_bytes_per_gpu"] == pytest.approx((P - X) * 16 / 64 + X / 8 * 16 / 8)
    assert f["train_weights_bytes_per_gpu"] == pytest.approx((P - X) * 2 / 64 + X / 8 * 2 / 8)
    assert f["train_optimizer_bytes_per_gpu"] == pytest.approx((P - X) * 12 / 64 + X / 8 * 12 / 8)
    assert f["all_to_all_bytes_per_layer_step"] == 2048 * 2 * 7 / 8 * 4096 * 2 * 4
    replicated_ep = figure(gpus=8, expert_parallel=8)
    assert replicated_ep["train_memory_bytes_per_gpu"] == pytest.approx((P - X) * 16 + X / 8 * 16)
    assert figure(gpus=8, expert_parallel=8, activation_checkpointing=True)["all_to_all_bytes_per_layer_step"] == \
        pytest.approx(f["all_to_all_bytes_per_layer_step"] * 6 / 4)


@pytest.mark.parametrize("target, flags, expected", [
    ("mixtral-8x7b", ["--gpus", "8", "--expert-parallel", "3"], "--expert-parallel 3 does not divide --gpus 8"),
    ("mixtral-8x7b", ["--gpus", "16", "--expert-parallel", "16"], "has its 8 experts; expected a divisor"),
    ("llama3-8b", ["--gpus", "8", "--expert-parallel", "8"], "no routed experts (a dense model)"),
    ("llama3-8b", ["--top-k", "4"], "give --num-experts too"),
    ("mixtral-8x7b", ["--num-experts", "8"], "costs an upcycle of a dense Llama"),
])
def test_impossible_plans_are_one_line(capsys, target, flags, expected):
    from helpers import one_line_error

    assert expected in one_line_error(capsys, "params", target, *flags)
