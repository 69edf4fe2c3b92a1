"""moe.train.sample and moe.train.chat (`moekit generate` on an instruct checkpoint): the chat template applied as
transformers' apply_chat_template applies it, the reply ending at the end-of-turn token, token for token what
transformers' greedy `generate` writes; --system, --top-p, --repetition-penalty; one-line errors."""

import json
import os
import shutil

import pytest
import torch

from moekit.llama import Llama, LlamaConfig
from moekit.llama.generate import sample
from moekit.moe.train.chat import load_chat_template, stop_ids
from moekit.moe.train.sample import completions, for_terminal, prompt_ids
from moekit.moe.train.tokenizer import load_tokenizer

from helpers import corpus, moekit, one_line_error

CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0-3
BOS, EOS, IM_START, IM_END = range(4)
RULE = "-" * 40


def chat_checkpoint(path, template=CHATML, model: Llama | None = None):
    """A tiny Llama (random unless `model`) with a byte-level BPE tokenizer holding ChatML's special tokens and a
    tokenizer_config.json naming <s> / </s> as BOS / EOS and holding `template` (None: no chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(1), trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    torch.manual_seed(0)
    (model or Llama(tiny_config())).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              **({"chat_template": template} if template is not None else {})}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS,
                       eos_token_id=EOS, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")


def transformers_reply(ckpt, messages, n=12, **generate):
    """(prompt ids, reply ids without the stop token, reply text) as transformers writes them, greedy."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    new = model.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=[EOS, IM_END], pad_token_id=EOS,
                         **generate)[0, ids.shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in (EOS, IM_END)), len(new))]
    return ids[0].tolist(), new, tok.decode(new)


@pytest.mark.parametrize("system", [None, "You answer in Python."])
def test_chat_is_the_default_and_equals_transformers(ckpt, system, capsys):
    messages = [{"role": "user", "content": "hi"}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    want_prompt, want_ids, want_text = transformers_reply(ckpt, messages)
    capsys.readouterr()  # transformers' progress bars
    tokenizer = load_tokenizer(None, str(ckpt))
    assert prompt_ids(tokenizer, "hi", 256, load_chat_template(str(ckpt)), system) == want_prompt
    assert want_prompt[0] == BOS and IM_START in want_prompt  # the template writes the special tokens
    got = completions(str(ckpt), ["hi"], max_new_tokens=12, system=system)[0]
    assert (got.ids, got.text, got.chat) == (want_ids, want_text, True) and len(want_ids) > 3
    argv = ["generate", ckpt, "--prompt", "hi", "--max-new-tokens", "12", *(["--system", system] if system else [])]
    assert moekit(capsys, *argv, "--json") == (0, json.dumps([{"prompt": "hi", "completion": want_text}], indent=1)
                                               + "\n", "")
    assert moekit(capsys, *argv) == (0, f"hi\n{for_terminal(want_text)}\n{RULE}\n", "")
    raw = completions(str(ckpt), ["hi"], max_new_tokens=12, chat=False)[0]  # --no-chat: the text as it is
    assert not raw.chat and raw.ids != got.ids
    assert json.loads(moekit(capsys, *argv[:6], "--no-chat", "--json")[1])[0]["completion"] == raw.text


def steered(path, last: int, chain: list[int]):
    """A checkpoint whose model writes `chain` after the token `last` (each token of the chain followed by the
    next), whatever came before: its decoder layers write nothing, so the logits depend on the last token alone."""
    model = Llama(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight")):
                p.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1  # every token but those steered: direction 0
        for i, (token, nxt) in enumerate(zip([last, *chain], chain), start=1):
            embed[token] = 0
            embed[token, i] = 1
            head[nxt, i] = 1
    return chat_checkpoint(path, model=model)


def test_the_reply_ends_at_the_end_of_turn_token(ckpt, tmp_path, capsys):
    last = prompt_ids(load_tokenizer(None, str(ckpt)), "hi", 256, load_chat_template(str(ckpt)))[-1]  # "\n"
    a, b = 300, 310  # merged pieces, never the "\n" of the prompt
    two = steered(tmp_path / "two", last, [a, b, IM_END, a])
    want = transformers_reply(two, [{"role": "user", "content": "hi"}])
    capsys.readouterr()  # transformers' progress bars
    got = completions(str(two), ["hi"], max_new_tokens=12)[0]
    assert (got.ids, got.text, got.ended_turn_at_once) == ([a, b], want[2], False) and want[1] == [a, b]
    assert moekit(capsys, "generate", two, "--prompt", "hi") == (0, f"hi\n{for_terminal(got.text)}\n{RULE}\n", "")
    assert stop_ids(load_tokenizer(None, str(two)), load_chat_template(str(two))) == [EOS, IM_END]

    at_once = steered(tmp_path / "at-once", last, [IM_END, a])
    assert moekit(capsys, "generate", at_once, "--prompt", "hi") == (
        0, f"hi\n\n(the model ended its turn at once)\n{RULE}\n", "")
    rc, out, _ = moekit(capsys, "generate", at_once, "--prompt", "hi", "--json")
    assert json.loads(out) == [{"prompt": "hi", "completion": "", "ended_turn_at_once": True}]


def test_chat_template_jinja_wins_over_tokenizer_config(ckpt, tmp_path):
    import transformers

    other = tmp_path / "jinja"
    shutil.copytree(ckpt, other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m.content | upper }}{% endfor %}"
                                               "{% if add_generation_prompt %}<|im_end|>{{ eos_token }}!{% endif %}")
    tokenizer = load_tokenizer(None, str(other))
    want = transformers.AutoTokenizer.from_pretrained(other).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
    assert prompt_ids(tokenizer, "hi", 256, load_chat_template(str(other))) == want
    assert tokenizer.decode(want) == "<|im_start|>HI<|im_end|></s>!"
    # a list of named templates in tokenizer_config.json: the one named "default"
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}]
    os.remove(other / "chat_template.jinja")
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(str(other)).text == CHATML


def test_repetition_penalty_equals_transformers(ckpt):
    messages = [{"role": "user", "content": "hi"}]
    _, want_ids, want_text = transformers_reply(ckpt, messages, n=16, repetition_penalty=1.5)
    got = completions(str(ckpt), ["hi"], max_new_tokens=16, repetition_penalty=1.5)[0]
    assert (got.ids, got.text) == (want_ids, want_text)
    assert got.ids != completions(str(ckpt), ["hi"], max_new_tokens=16)[0].ids  # it changed something


def test_top_p_keeps_the_tokens_transformers_keeps():
    from transformers import TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.9]])
    for p in (0.3, 0.7, 0.9):
        kept = TopPLogitsWarper(p)(None, logits.clone()).isfinite()[0]
        drawn = sample(logits.expand(20_000, -1), temperature=1.0, top_p=p, generator=torch.Generator().manual_seed(0))
        counts = torch.bincount(drawn, minlength=logits.shape[1]).float() / len(drawn)
        assert torch.equal(counts > 0, kept), p
        want = logits[0].masked_fill(~kept, float("-inf")).softmax(-1)  # renormalised over the kept tokens
        assert torch.allclose(counts, want, atol=0.015), (p, counts, want)


def test_top_p_sampling_through_generate_is_seeded(ckpt):
    template, tokenizer = load_chat_template(str(ckpt)), load_tokenizer(None, str(ckpt))
    ids = prompt_ids(tokenizer, "hi", 256, template)
    want = Llama.from_pretrained(ckpt).generate(torch.tensor([ids]), 12, temperature=1.0, top_p=0.8,
                                                stop_tokens=[EOS, IM_END], generator=torch.Generator().manual_seed(5))
    want = want[0, len(ids):].tolist()
    want = want[:next((i for i, t in enumerate(want) if t in (EOS, IM_END)), len(want))]
    assert completions(str(ckpt), ["hi"], 12, temperature=1.0, seed=5, top_p=0.8)[0].ids == want


def test_bad_input_is_one_line(ckpt, tmp_path, capsys):
    bare = chat_checkpoint(tmp_path / "bare", template=None)
    err = one_line_error(capsys, "generate", bare, "--chat")
    assert "--chat needs a chat template" in err and "chat_template.jinja" in err and "tokenizer_config.json" in err
    assert "--system needs a chat template" in one_line_error(capsys, "generate", bare, "--system", "be brief")
    assert "hi" in moekit(capsys, "generate", bare, "--prompt", "hi", "--max-new-tokens", "2")[1]  # raw by default
    assert "--system goes through the chat template, which --no-chat turns off" in one_line_error(
        capsys, "generate", ckpt, "--system", "be brief", "--no-chat")
    assert "--chat and --no-chat" in one_line_error(capsys, "generate", ckpt, "--chat", "--no-chat")
    assert "--top-p must be in (0, 1], got 0" in one_line_error(capsys, "generate", ckpt, "--top-p", "0")
    assert "--top-p 0.9 needs --temperature above 0" in one_line_error(capsys, "generate", ckpt, "--top-p", "0.9")
    assert "--repetition-penalty must be >= 1, got 0.5" in one_line_error(
        capsys, "generate", ckpt, "--repetition-penalty", "0.5")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "chat_template.jinja").write_text("{{ raise_exception('only user\nmessages') }}")
    err = one_line_error(capsys, "generate", broken)
    assert "chat_template.jinja: the chat template failed" in err and "only user\\nmessages" in err
    (broken / "chat_template.jinja").write_text("{% for m in messages %}")
    assert "chat_template.jinja: the chat template is not valid jinja" in one_line_error(capsys, "generate", broken)
    (broken / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")  # the sandbox refuses
    assert "the chat template failed" in one_line_error(capsys, "generate", broken)
