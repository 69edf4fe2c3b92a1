"""moe.accounting.sources: a checkpoint of an architecture without a formula (an invented model_type) is counted
exactly from its safetensors headers, routed experts found by tensor name (experts.N.*) or shape (stacked
[E, ...]), top-k from the config's usual field names; `moekit params DIR` says so."""

import json
import math

import torch
from safetensors.torch import save_file

from moekit.moe.accounting import count_checkpoint

from helpers import moekit, moekit_json, one_line_error

V, H, F, E, L = 32, 8, 12, 4, 2


def write_checkpoint(path, config: dict, shapes: dict) -> None:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path / "model.safetensors"))


def zebra_shapes(stacked: bool) -> dict:
    """An invented MoE: fused qkv, a router, E experts (one tensor per expert, or stacked [E, ...] under names
    that do not say 'experts'), a shared expert, a routing-score correction bias."""
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.attn.wqkv.weight": (3 * H, H), f"{p}.attn.out.weight": (H, H), f"{p}.ln1.weight": (H,),
                   f"{p}.ln2.weight": (H,), f"{p}.moe.router.weight": (E, H),
                   f"{p}.moe.router.e_score_correction_bias": (E,), f"{p}.moe.shared_expert.w_in.weight": (2 * F, H),
                   f"{p}.moe.shared_expert.w_out.weight": (H, F)}
        if stacked:
            shapes |= {f"{p}.moe.w_in": (E, 2 * F, H), f"{p}.moe.w_out": (E, H, F)}
        else:
            for j in range(E):
                shapes |= {f"{p}.moe.experts.{j}.w_in.weight": (2 * F, H), f"{p}.moe.experts.{j}.w_out.weight": (H, F)}
    return shapes


def expected(k: int) -> tuple[int, int]:
    experts = L * E * 3 * F * H
    rest = 2 * V * H + H + L * (4 * H * H + 2 * H + E * H + 3 * F * H)
    return rest + experts, rest + experts * k // E


def test_per_expert_names(tmp_path, capsys):
    config = dict(model_type="zebra_moe", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_experts=E, moe_topk=3)
    write_checkpoint(tmp_path, config, zebra_shapes(stacked=False))
    out = moekit_json(capsys, "params", tmp_path)
    total, active = expected(k=3)
    assert (out["total_params"], out["active_params"]) == (total, active)
    assert out["components"]["routed_experts"] == {"total": L * E * 3 * F * H, "active": L * 3 * 3 * F * H}
    assert out["components"]["shared_experts"]["total"] == L * 3 * F * H
    assert out["components"]["router"]["total"] == L * E * H
    assert out["buffers"] == {"e_score_correction_bias": L * E}  # not in the totals
    rc, text, _ = moekit(capsys, "params", tmp_path)
    assert rc == 0 and f"{total:,} parameters" in text and f"{active:,} active per token" in text
    assert "model_type 'zebra_moe' has no formula" in text and "classified by tensor name" in text
    assert "E = 4 and k = 3 from config.json" in text


def test_stacked_experts_found_by_leading_dim(tmp_path):
    config = dict(model_type="zebra_moe", vocab_size=V, hidden_size=H, num_hidden_layers=L, n_routed_experts=E,
                  num_experts_per_tok=1)
    write_checkpoint(tmp_path, config, zebra_shapes(stacked=True))
    c = count_checkpoint(tmp_path)
    assert (c.total_params, c.active_params) == expected(k=1)
    assert c.total_params == sum(math.prod(s) for n, s in zebra_shapes(True).items() if "bias" not in n)


def test_missing_top_k_is_one_line(tmp_path, capsys):
    config = dict(model_type="zebra_moe", vocab_size=V, hidden_size=H, num_hidden_layers=L, num_experts=E)
    write_checkpoint(tmp_path, config, zebra_shapes(stacked=False))
    err = one_line_error(capsys, "params", tmp_path)
    assert "config.json" in err and "no top-k" in err and "'num_experts_per_tok' is missing" in err
    config_only = one_line_error(capsys, "params", tmp_path / "config.json")  # no weights, no formula: refused
    assert "model_type 'zebra_moe' is not supported" in config_only
