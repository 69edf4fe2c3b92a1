import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
