"""A mergekit-moe recipe builds mergekit-moe's model: mergekit 0.1.5 (a dev dependency) and `moekit upcycle --config`
run the same YAML on the same tiny donors (Llama-shaped, a BPE tokenizer with a BOS token, made here), and both
outputs, loaded in transformers, hold the same tensors: experts equal bit for bit (residual_scale included),
routers equal within bf16 rounding for hidden, hidden_avg and cheap_embed (with and without negative prompts), and
exactly for random and uniform_random under the same seed. Skipped where mergekit is not importable."""

import pytest
import torch

from helpers import moekit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

mergekit = pytest.importorskip("mergekit.moe", reason="mergekit (a dev dependency) is not installed")

# expert 0 has negative prompts and a residual scale, expert 1 neither, expert 2 prompts of several lengths
RECIPE = """base_model: {base}
gate_mode: {gate}
dtype: {dtype}
experts_per_token: 2
experts:
  - source_model: {code}
    positive_prompts: ["def fib(n):", "import os"]
    negative_prompts: ["Once upon a time there was"]
    residual_scale: 0.7
  - source_model: {prose}
    positive_prompts: ["The old harbour town was quiet."]
  - source_model: {math}
    positive_prompts: ["3 + 4 = 7", "12 * 2 = 24 and 5 * 5 = 25"]
"""
SHARED = """architecture: qwen
shared_experts:
  - source_model: {base}
    positive_prompts: ["Hello there, how are you?"]
    residual_scale: 0.5
"""


def tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as transformers loads it (either tool's file layout)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_both(tmp_path, capsys, donors, gate: str, dtype: str = "bfloat16", seed: int = 7, shared: bool = False):
    base, (code, prose, math) = donors
    recipe = tmp_path / f"{gate}.yml"
    recipe.write_text(RECIPE.format(base=base, gate=gate, dtype=dtype, code=code, prose=prose, math=math)
                      + (SHARED.format(base=base) if shared else ""))
    theirs, ours = tmp_path / f"mergekit-{gate}", tmp_path / f"moekit-{gate}"
    from mergekit.scripts.moe import main as mergekit_moe  # its command line, in this process (one import)

    mergekit_moe([str(recipe), str(theirs), "--random-seed", str(seed)], standalone_mode=False)
    code_, out, err = moekit(capsys, "upcycle", "--config", str(recipe), str(ours), "--seed", str(seed),
                             "--no-progress")
    assert code_ == 0, err
    return tensors(theirs), tensors(ours), out + err


def check_routers(theirs, ours, exact: bool = False) -> None:
    names = [k for k in theirs if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert len(names) >= 2
    for name in names:
        a, b = theirs[name].float(), ours[name].float()  # [E, H]
        assert a.shape == b.shape and a.dtype == b.dtype if exact else True, name
        if exact:
            assert torch.equal(a, b), name
            continue
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos.min() >= 0.999 and (a - b).abs().max() <= 1e-2, (name, cos.min().item(), (a - b).abs().max())


def check_the_rest(theirs, ours) -> None:
    """Every tensor that is not a router: bit for bit (mergekit's Qwen2-MoE also holds zero attention biases, which
    moekit's config leaves out: the same function)."""
    extra = theirs.keys() - ours.keys()
    assert not ours.keys() - theirs.keys() and all(k.endswith("_proj.bias") and not theirs[k].any() for k in extra)
    theirs = {k: v for k, v in theirs.items() if k not in extra}
    for name, t in theirs.items():
        if not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert t.dtype == ours[name].dtype and torch.equal(t, ours[name]), name


@pytest.mark.parametrize("gate", ["hidden", "hidden_avg", "cheap_embed"])
def test_prompt_gates_equal_mergekits(donors, tmp_path, capsys, gate):
    theirs, ours, _ = build_both(tmp_path, capsys, donors, gate)
    check_routers(theirs, ours)
    check_the_rest(theirs, ours)
    # the residual scale reached expert 0's down_proj only
    down = "model.layers.1.mlp.experts.down_proj"
    base = tensors(donors[1][0])["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(ours[down][0], (base * 0.7).to(torch.bfloat16))
    assert torch.equal(ours[down][1], tensors(donors[1][1])["model.layers.1.mlp.down_proj.weight"].bfloat16())


@pytest.mark.parametrize("gate", ["random", "uniform_random"])
def test_drawn_gates_equal_mergekits_under_the_same_seed(donors, tmp_path, capsys, gate):
    # random: with a shared expert (Qwen2-MoE), whose gate row is drawn with the others
    theirs, ours, _ = build_both(tmp_path, capsys, donors, gate, dtype="float32", shared=gate == "random")
    check_routers(theirs, ours, exact=True)
    check_the_rest(theirs, ours)
    rows = ours["model.layers.0.mlp.gate.weight"]
    if gate == "random":  # N(0, 1), not moekit's N(0, 0.02^2)
        assert 0.8 < rows.std() < 1.2
    else:  # U(-1/sqrt(H), 1/sqrt(H))
        assert rows.abs().max() <= 64 ** -0.5 and rows.abs().max() > 0.9 * 64 ** -0.5


def test_a_shared_expert_with_prompts_equals_mergekits_qwen(donors, tmp_path, capsys):
    theirs, ours, _ = build_both(tmp_path, capsys, donors, "hidden", shared=True)
    assert "model.layers.0.mlp.shared_expert_gate.weight" in ours
    check_routers(theirs, ours)
    check_the_rest(theirs, ours)
