"""upcycle.routers, moekit's own prompt inits: router rows equal an independent computation (embed-mean from the
embedding matrix; hidden-mean from transformers' own Llama, each prompt run alone, the FFN inputs caught by hooks), the prompts'
own tokens exclude BOS and padding, and --router-scale sets the rows' norm."""

import pytest
import torch
from tokenizers import Tokenizer

from moekit.llama.checkpoint import CheckpointReader
from moekit.upcycle import UpcycleOptions
from moekit.upcycle.routers import prompt_routers, tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

POSITIVE = ["0:def f(x):", "0:return x + 1", "1:The old harbour town.", "2:3 + 4 = 7", "2:12 * 2 = 24",
            "shared:Hello there"]
NEGATIVE = ["0:The ships came home.", "2:def g(y):"]


def options(donors, init, **kw):
    return UpcycleOptions(donors=donors[1], base=donors[0], shared_donor=donors[1][0], router_init=init,
                          positive_prompts=POSITIVE, negative_prompts=NEGATIVE, **kw)


def own_tokens(base, text):
    """The prompt's ids with BOS, and its own tokens' positions."""
    enc = Tokenizer.from_file(f"{base}/tokenizer.json").encode(text)
    return enc.ids, [t for t, special in enumerate(enc.special_tokens_mask) if not special]


def expected(base, features):
    """{key: unit row} from features(text) -> [own tokens, H] per prompt, independently of upcycle.routers."""
    def mean(prompts):
        return torch.cat([features(p.partition(":")[2]) for p in prompts]).mean(0)

    out = {}
    for key in ("0", "1", "2", "shared"):
        v = mean([p for p in POSITIVE if p.startswith(key + ":")])
        neg = [p for p in NEGATIVE if p.startswith(key + ":")]
        v = v - mean(neg) if neg else v
        out[key] = v / v.norm()
    return out


def test_tokenized_prompts_keep_bos_in_context_but_out_of_the_means(donors):
    p = tokenize(donors[0], options(donors, "hidden-mean"), 320)
    ids, own = own_tokens(donors[0], "def f(x):")
    assert ids[0] == 0 and own[0] == 1  # <s> starts the prompt and is not one of its own tokens
    assert p.ids.shape == (8, max(len(own_tokens(donors[0], q.partition(":")[2])[0]) for q in POSITIVE + NEGATIVE))
    assert p.ids[0, :len(ids)].tolist() == ids and p.own[0].nonzero().flatten().tolist() == own
    assert p.keys == [0, 0, 1, 2, 2, "shared", 0, 2] and p.signs == [1] * 6 + [-1] * 2
    assert not p.own[:, p.ids.shape[1] - 1].all()  # shorter prompts are padded, padding is not theirs


def test_cheap_embed_rows_are_mean_embeddings_the_same_in_every_layer(donors):
    base = donors[0]
    with CheckpointReader(base) as r:
        embed = r.get("model.embed_tokens.weight")

    def features(text):
        ids, own = own_tokens(base, text)
        return embed[torch.tensor(ids)[own]]

    want = expected(base, features)
    routers, shared = prompt_routers(base, options(donors, "embed-mean", router_scale=0.5), [0, 1], 320)
    for i in (0, 1):
        assert routers[i].shape == (3, 64) and routers[i].norm(dim=1).sub(0.5).abs().max() < 1e-6
        for j in range(3):
            assert torch.allclose(routers[i][j], 0.5 * want[str(j)], atol=1e-6)
        assert torch.allclose(shared[i][0], 0.5 * want["shared"], atol=1e-6)


def test_hidden_rows_are_mean_ffn_inputs_of_the_base_as_transformers_computes_them(donors):
    import transformers

    base = donors[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    wants = {}
    for i in (0, 1):
        def features(text, i=i):
            ids, own = own_tokens(base, text)
            seen = []
            hook = hf.model.layers[i].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            with torch.no_grad():
                hf(input_ids=torch.tensor([ids]))
            hook.remove()
            return seen[0][0, own]  # [own tokens, H]

        wants[i] = expected(base, features)
    routers, shared = prompt_routers(base, options(donors, "hidden-mean"), [1], 320)
    assert list(routers) == [1] and routers[1].shape == (3, 64)
    for j in range(3):
        assert (routers[1][j] - wants[1][str(j)]).abs().max() <= 1e-5
    assert (shared[1][0] - wants[1]["shared"]).abs().max() <= 1e-5
    assert (wants[0]["0"] - wants[1]["0"]).abs().max() > 1e-2  # each layer its own rows
    with pytest.raises(Exception, match="tokenizer.json gives token id 3"):
        prompt_routers(base, options(donors, "hidden-mean"), [1], 3)
