"""Helpers shared by several test modules: running the command line as a user does, and small configs."""

import json

import torch

from llama import LlamaConfig
from moe import MoEConfig, MoEFeedForward
from moekit.cli import main


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
