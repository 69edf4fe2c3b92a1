"""upcycle.donors end to end, with three donors (few-step fine-tunes of one tiny base on code, prose and arithmetic,
saved with transformers): the MoE loads in transformers; every expert is its donor's FFN bit for bit; routers set
from the base's hidden states send each donor's prompts to it, random routers do not; a published-format
mergekit-moe YAML and moekit's own recipe file give the checkpoint the command line gives; upcycling.json records
the recipe and every source file's sha256."""

import hashlib
import json
import os

import pytest
import torch

from moekit.llama.checkpoint import CheckpointReader
from moekit.moe import formats
from moekit.moe.model import MoEForCausalLM
from moekit.upcycle import UpcycleOptions, merge_donors, read_record
from moekit.upcycle.routers import routing_shares

from helpers import donor_prompts, moekit, prompt_flags, single_thread

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(1))


def tensors(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def hidden_options(donors, **kw) -> UpcycleOptions:
    base, paths = donors
    return UpcycleOptions(donors=paths, base=base, positive_prompts=prompt_flags(donor_prompts()),
                          **{"router_init": "hidden-mean", **kw})


@pytest.fixture(scope="module")
def merged(donors, tmp_path_factory):
    dst = tmp_path_factory.mktemp("merged") / "moe"
    with single_thread():
        merge_donors(dst, hidden_options(donors), progress=False, log=None)
    return dst


def test_every_expert_is_its_donors_ffn_and_transformers_loads_it(merged, donors):
    import transformers

    base, paths = donors
    record = read_record(merged)
    assert record["verify"]["ok"] and record["verify"]["per_expert"] == [0.0, 0.0, 0.0]
    t, b = tensors(merged), tensors(base)
    for j, donor in enumerate(paths):
        d = tensors(donor)
        for i in range(2):
            for role, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                mine = t[f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"]
                assert torch.equal(mine, d[f"model.layers.{i}.mlp.{role}_proj.weight"])
                assert not torch.equal(mine, b[f"model.layers.{i}.mlp.{role}_proj.weight"])  # the fine-tune moved it
    for name, w in b.items():  # attention, norms, embeddings, LM head: the base's
        assert ".mlp." in name or torch.equal(t[name], w), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 3
    with torch.no_grad():
        ours, theirs = MoEForCausalLM.from_pretrained(merged)(IDS).logits, hf(input_ids=IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert sorted(os.listdir(merged)) == [".moekit", "config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json", "upcycling.json"]


def test_hidden_routers_send_each_donors_prompts_to_it_random_ones_do_not(merged, donors, tmp_path):
    shares = read_record(merged)["verify"]["routing"]  # first choice, over both layers and every prompt token
    assert set(shares) == {"0", "1", "2"} and min(shares.values()) > 0.6, shares
    assert sum(shares.values()) / 3 > 0.75  # chance: 1/3
    # mergekit's hidden reads the residual stream at one token, not what the router multiplies: fewer hits
    theirs = merge_donors(tmp_path / "mergekit-hidden", hidden_options(donors, router_init="hidden"), progress=False,
                          log=None)["verify"]["routing"]
    assert 0.25 < min(theirs.values()) < 0.35 and max(theirs.values()) < 0.65, theirs  # measured 28%, 40%, 60%
    for seed in range(3):
        merge_donors(tmp_path / f"random{seed}", UpcycleOptions(donors=donors[1], base=donors[0], seed=seed),
                progress=False, log=None)
        blind = routing_shares(str(tmp_path / f"random{seed}"), hidden_options(donors))
        assert sum(blind.values()) / 3 < 0.45 and min(blind.values()) < 0.5, blind


def test_the_record_names_every_source_and_its_checksums(merged, donors):
    base, paths = donors
    record = read_record(merged)
    assert (record["base"], record["donors"], record["experts"]) == (base, paths, paths)
    assert record["router_init"] == "hidden-mean" and record["options"]["positive_prompts"][0].startswith("0:")
    assert record["function_preserving"] is False and record["format"] == "mixtral"
    for path in (base, *paths):
        files = record["sha256"][path]
        assert set(files) == {"config.json", "model.safetensors"}
        for name, digest in files.items():
            assert digest == hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()


MERGEKIT_YAML = """\
base_model: {base}
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
experts_per_token: 2
experts:
{experts}"""


def mergekit_yaml(base, paths, prompts, negatives) -> str:
    experts = ""
    for i, path in enumerate(paths):
        experts += f"  - source_model: {path}\n    positive_prompts:\n"
        experts += "".join(f"      - {json.dumps(p)}\n" for p in prompts[i])
        if negatives.get(i):
            experts += "    negative_prompts:\n" + "".join(f"      - {json.dumps(p)}\n" for p in negatives[i])
    return MERGEKIT_YAML.format(base=base, experts=experts)


def test_a_mergekit_yaml_and_a_moekit_recipe_give_the_command_lines_checkpoint(donors, tmp_path, capsys):
    base, paths = donors
    prompts, negatives = donor_prompts(), {1: ["def f(x):", "return x"]}
    (tmp_path / "merge.yml").write_text(mergekit_yaml(base, paths, prompts, negatives))
    rc, out, err = moekit(capsys, "upcycle", "--config", tmp_path / "merge.yml", tmp_path / "from-yaml",
                          "--no-progress")
    assert rc == 0, err
    assert out.startswith(f"merged 3 donors -> {tmp_path / 'from-yaml'}: base {base}, 3 experts of 128 (1 per donor")
    rc, out, err = moekit(capsys, "upcycle", tmp_path / "from-flags", "--donors", *paths, "--base", base,
                          "--router-init", "hidden", "--dtype", "bf16", "--top-k", "2", "--positive-prompts",
                          *prompt_flags(prompts), "--negative-prompts", "1:def f(x):", "1:return x", "--no-progress",
                          "--no-verify")
    assert rc == 0, err
    a, b = tensors(tmp_path / "from-yaml"), tensors(tmp_path / "from-flags")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    assert (tmp_path / "from-yaml/config.json").read_text() == (tmp_path / "from-flags/config.json").read_text()
    ra, rb = read_record(tmp_path / "from-yaml"), read_record(tmp_path / "from-flags")
    assert {**ra["options"], "config": None} == {**rb["options"], "verify": True}
    assert ra["verify"]["ok"]  # bf16 experts = the donors rounded to bf16
    assert ra["recipe_file"]["format"] == "mergekit-moe"
    assert ra["recipe_file"]["text"] == (tmp_path / "merge.yml").read_text()
    # moekit's own recipe: the options object of an upcycling.json
    (tmp_path / "recipe.json").write_text(json.dumps(rb["options"]))
    assert moekit(capsys, "upcycle", "--config", tmp_path / "recipe.json", tmp_path / "from-json", "--no-progress",
                  "--no-verify")[0] == 0
    c = tensors(tmp_path / "from-json")
    assert all(torch.equal(a[n], c[n]) for n in a)
    assert read_record(tmp_path / "from-json")["recipe_file"]["format"] == "moekit"
    rc, out, err = moekit(capsys, "verify", tmp_path / "from-yaml", "--no-progress")
    assert rc == 0 and out.startswith(f"{tmp_path / 'from-yaml'} vs its donors: max |expert - donor FFN| 0 over 3 "
                                      "experts on 32 tokens: OK; first choice on each donor's prompts: 0: "), out


def test_copies_with_noise_and_a_shared_donor(donors, tmp_path):
    import transformers

    base, paths = donors
    o = UpcycleOptions(donors=paths[1:], base=base, shared_donor=paths[0], num_experts=4, recipe="noise",
                       noise_scale=0.05, router_init="cheap-embed",
                       positive_prompts=["0:The old town.", "1:3 + 4 = 7", "shared:def f(x):"])
    record = merge_donors(tmp_path / "moe", o, progress=False, log=None)
    assert record["format"] == "qwen2_moe" and record["experts"] == [paths[1], paths[1], paths[2], paths[2]]
    v = record["verify"]
    assert not v["ok"] and min(v["per_expert"][:4]) > 1e-4 and v["per_expert"][4] == 0.0  # noisy copies, exact shared
    t, shared = tensors(tmp_path / "moe"), tensors(paths[0])
    for j, donor in enumerate((paths[1], paths[1], paths[2], paths[2])):
        w, d = t[f"model.layers.1.mlp.experts.{j}.up_proj.weight"], tensors(donor)["model.layers.1.mlp.up_proj.weight"]
        assert (w - d).std().item() / d.std().item() == pytest.approx(0.05, rel=0.1)
    router = t["model.layers.0.mlp.gate.weight"]  # cheap-embed: the same unit rows in every layer, copies tie
    assert torch.equal(router, t["model.layers.1.mlp.gate.weight"]) and torch.equal(router[0], router[1])
    assert router.norm(dim=1).sub(1).abs().max() < 1e-6 and not torch.equal(router[1], router[2])
    gate = t["model.layers.0.mlp.shared_expert_gate.weight"]  # from the shared expert's prompts, so down not doubled
    assert gate.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(t["model.layers.0.mlp.shared_expert.down_proj.weight"],
                       shared["model.layers.0.mlp.down_proj.weight"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert (MoEForCausalLM.from_pretrained(tmp_path / "moe")(IDS).logits - hf(input_ids=IDS).logits).abs().max() \
            <= 1e-5


def test_moekit_verify_of_a_merge_reports_an_expert_that_differs(merged, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(merged, tmp_path / "moe")
    t = tensors(tmp_path / "moe")
    name = formats.expert_names("mixtral", 1, 2)["down"]
    t[name] = t[name] * 1.01
    save_file(t, str(tmp_path / "moe" / "model.safetensors"), metadata={"format": "pt"})
    rc, out, _ = moekit(capsys, "verify", tmp_path / "moe", "--no-progress", "--json")
    result = json.loads(out)
    assert rc == 1 and not result["ok"] and result["per_expert"][:2] == [0.0, 0.0] and result["per_expert"][2] > 1e-4
    assert result["chance"] == pytest.approx(1 / 3, abs=1e-4) and set(result["routing"]) == {"0", "1", "2"}
