"""Helpers shared by several test modules: running the command line as a user does, small configs and checkpoints
with real tokenizers."""

import contextlib
import json
import os

import torch

from moekit.cli import main
from moekit.llama import Llama, LlamaConfig
from moekit.moe import MoEConfig, MoEFeedForward, MoEForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, cwd of subprocess tests


def moekit(capsys, *argv) -> tuple[int, str, str]:
    """Run `moekit ARGV` in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def moekit_json(capsys, *argv) -> dict:
    rc, out, err = moekit(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def one_line_error(capsys, *argv) -> str:
    """`moekit ARGV` must fail with exit code 2 and exactly one stderr line, no traceback, nothing on stdout."""
    rc, out, err = moekit(capsys, *argv)
    assert rc == 2 and out == "", (rc, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tiny_llama(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                max_position_embeddings=64, rms_norm_eps=1e-5)
    return LlamaConfig(**{**base, **kw})


def saved_model(tmp_path, name: str):
    """A random tiny model saved as tmp_path/name (llama, mixtral, or qwen2_moe with a shared expert and dense
    layers): (the model in eval mode, its directory)."""
    torch.manual_seed(0)
    if name == "llama":
        model = Llama(tiny_llama(num_key_value_heads=2))
    else:
        model = MoEForCausalLM(MoEConfig.from_name("tiny-moe" if name == "mixtral" else "tiny-moe-shared"))
        for p in model.parameters():  # random, not near-uniform, routing
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / name, max_shard_size="20KB")
    return model.eval(), tmp_path / name


def layer_config(**kw) -> MoEConfig:
    base = dict(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_local_experts=6, num_experts_per_tok=2)
    return MoEConfig(**{**base, **kw})


def make_layer(**kw) -> MoEFeedForward:
    layer = MoEFeedForward(layer_config(**kw))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


def hf_llama(our_model):
    """The transformers LlamaForCausalLM with `our_model`'s config and weights (fp32, eager attention)."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in our_model.config.to_dict().items()
                                      if k not in ("model_type", "architectures", "torch_dtype")})
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(our_model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


CORPUS_MODULES = ("json", "argparse", "dataclasses", "textwrap", "string", "shlex")


def corpus(n_files: int = 3) -> list[str]:
    """Real text that every machine with Python has: some standard-library modules' sources."""
    import importlib

    return [open(importlib.import_module(m).__file__, encoding="utf-8").read() for m in CORPUS_MODULES[:n_files]]


def bpe_tokenizer(directory, vocab_size: int = 320, bos: bool = True):
    """A byte-level BPE tokenizer trained here on `corpus()`, saved as directory/tokenizer.json with a
    tokenizer_config.json (and a chat template) that transformers' AutoTokenizer reads. `bos`: its
    post-processor starts every sequence with <s> (Llama's convention); else none (EOS after each document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>", "chat_template": "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"},
                  f)
    return tok


def sharded_dense(path, vocab_size: int):
    """A 2-layer H=32 dense Llama (seed 0) saved in 20 KB shards: a sharded checkpoint for the safety tests."""

    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)).save_pretrained(path, max_shard_size="20KB")
    return path


def tiny_checkpoint(path, vocab_size: int = 320, dtype=None, tokenizer: bool = True, bos: bool = True):
    """A tiny Llama checkpoint directory (optionally in `dtype`) with its own trained tokenizer."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1)
    Llama(cfg).save_pretrained(path, dtype=dtype)
    if tokenizer:
        bpe_tokenizer(path, vocab_size, bos)
    return path


class Reference:
    """transformers' own count of a causal LM built from a config on the meta device (no memory, no init),
    walked independently of moe.accounting.

    raw: transformers' `sum(p.numel() for p in model.parameters())`: every parameter, tied ones once, frozen
    ones too (the routing-score correction bias that ERNIE 4.5, AFMoE and Laguna hold as
    nn.Parameter(requires_grad=False)); total: the same with each experts tensor counted for its real experts only
    (LongCat allocates rows for its zero-computation experts too).
    buffers: the routing-score correction biases registered as buffers (DeepSeek-V3 and most others), not
    parameters and in none of the counts above.
    active: every parameter in full, except the stacked [E', ...] (2-D or more) tensors of a module
    named `experts` or of a class named *Experts, which count per-expert size × real_experts × k / choices
    (E' the leading dim; real_experts and choices E' unless given; k may be a list, one per layer).
    Skips the test when the installed transformers lacks the model type."""

    def __init__(self, model_type: str, k, real_experts: int | None = None, choices: int | None = None, **config):
        import re

        import pytest
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            pytest.skip(f"transformers {transformers.__version__} has no model_type {model_type!r}")
        self.config = transformers.AutoConfig.for_model(model_type, **config)
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(self.config)
        self.raw = self.total = self.active = self.buffers = 0
        for name, p in self.model.named_parameters():
            self.raw += p.numel()
            module = name.rpartition(".")[0]
            experts = module.rpartition(".")[2] == "experts" or type(
                self.model.get_submodule(module)).__name__.endswith("Experts")
            if not experts or p.ndim == 1:  # a 1-D tensor serves the whole layer (JetMoE's output bias)
                self.total += p.numel()
                self.active += p.numel()
                continue
            per_expert, E = p.numel() // p.shape[0], real_experts or p.shape[0]
            k_layer = k[int(re.search(r"layers\.(\d+)\.", name).group(1))] if isinstance(k, list) else k
            self.total += per_expert * E
            self.active += per_expert * E * k_layer / (choices or p.shape[0])
        self.active = round(self.active)
        self.buffers = sum(b.numel() for n, b in self.model.named_buffers()
                           if n.endswith(("e_score_correction_bias", "expert_bias")))


def formula_vs_transformers(model_type: str, k, walk: dict | None = None, **config):
    """count_config of `config` as config.json holds it (model_type added) and as transformers completes it
    (derived fields such as layer_types filled in) both equal the `Reference` count: total, active and buffers.
    Returns (count, reference)."""
    from moekit.moe.accounting import count_config

    ref = Reference(model_type, k, **(walk or {}), **config)
    for cfg in (dict(config, model_type=model_type), ref.config.to_dict()):
        c = count_config(cfg)
        assert (c.total_params, c.active_params, sum(c.buffers.values())) == (ref.total, ref.active, ref.buffers)
    return c, ref


def near_published(n: int, printed: float | int) -> bool:
    """`n` parameters within the last printed digit of a publisher's figure in billions (17 → 17B ± 1B,
    5.13 → ± 0.01B): publishers round or truncate."""
    decimals = len(repr(float(printed)).split(".")[1].rstrip("0")) if not float(printed).is_integer() else 0
    return abs(n / 1e9 - printed) < 10.0 ** -decimals


def check_released(count, total: int, active: int, published: tuple | None = None) -> None:
    """`count` has the exact (total, active) and, where given, is near the publisher's figures: published is
    (total, active, components left out of active, components left out of total): embeddings and the LM head
    are what publishers differ on."""
    assert (count.total_params, count.active_params) == (total, active)
    if published:
        pub_total, pub_active, active_out, *total_out = published
        t = count.total_params - sum(count.total[c] for c in (total_out[0] if total_out else ()))
        a = count.active_params - sum(count.active[c] for c in active_out)
        assert near_published(t, pub_total) and near_published(a, pub_active), (t, pub_total, a, pub_active)


@contextlib.contextmanager
def single_thread():
    """One intra-op thread, for tiny models: two threads on a busy 2-core machine spin against each other and make
    tiny matmuls ten times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


PROSE = ("The old harbour town woke slowly under a grey sky. Fishermen mended their nets on the quay while gulls "
         "argued over the morning catch, and the baker's daughter carried warm loaves up the hill to the church. "
         "Nobody in the town remembered when the lighthouse had last been painted, but everyone agreed that it "
         "looked better in the rain, when its white tower shone against the dark water and the ships came home. ")


def arithmetic(n: int = 400) -> str:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 100, (2, n), generator=g).tolist()
    return "".join(f"{x} + {y} = {x + y}\n" if x % 2 else f"{x} * {y} = {x * y}\n" for x, y in zip(a, b))


def donor_texts() -> list[str]:
    """Three kinds of text: Python code, English prose, arithmetic."""
    return [corpus(1)[0], PROSE * 8, arithmetic()]


def fine_tune(base, text: str, out, steps: int = 4, seed: int = 0):
    """`base` (a checkpoint with a tokenizer.json) trained `steps` AdamW steps on `text`, saved with transformers'
    save_pretrained (with the base's tokenizer files)."""
    import shutil

    from tokenizers import Tokenizer

    from moekit.llama import Llama

    ids = torch.tensor(Tokenizer.from_file(os.path.join(base, "tokenizer.json")).encode(text).ids)
    model = Llama.from_pretrained(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g).tolist()
        batch = torch.stack([ids[s:s + 64] for s in starts])  # [8, 64]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    hf_llama(model).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(base, name), os.path.join(out, name))
    return out


def donor_checkpoints(root) -> tuple[str, list[str]]:
    """(base, [code, prose, math donors]): a tiny Llama with its own tokenizer, and three fine-tunes of it."""
    root = str(root)
    base = tiny_checkpoint(os.path.join(root, "base"))
    return str(base), [fine_tune(base, text, os.path.join(root, name), seed=i)
                       for i, (name, text) in enumerate(zip(("code", "prose", "math"), donor_texts()))]


def donor_prompts() -> dict[int, list[str]]:
    """Prompts like each donor's text: code (0), prose (1), arithmetic (2)."""
    code, prose, math = donor_texts()
    return {0: [ln.strip() for ln in code.splitlines() if ln.strip().startswith(("def ", "return ", "import ", "if "))][:8],
            1: [s.strip() + "." for s in prose.split(".")[:3]],
            2: math.splitlines()[:8]}


def prompt_flags(prompts: dict[int, list[str]]) -> list[str]:
    """--positive-prompts values, I:TEXT."""
    return [f"{i}:{t}" for i, texts in prompts.items() for t in texts]


MULTIPLE_CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def multiple_choice_task(root, name: str, docs: list[tuple[str, list[str], int]] = (), data=None):
    """A local lm-eval multiple-choice task in `root`: NAME.jsonl of `docs` (question, choices, answer index) and
    NAME.yaml reading it (or `data`, another file, when given); returns root."""
    import pathlib

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in docs))
    (root / f"{name}.yaml").write_text(MULTIPLE_CHOICE_TASK.format(name=name, data=data, cache=root / "cache"))
    return root
