"""moekit's import package `kernels` shares its name with Hugging Face's kernel-hub package: transformers must
still import, not mistake ours for theirs, and run a model."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_transformers_does_not_mistake_our_kernels_package():
    code = ("import kernels, transformers, torch\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "assert kernels.__file__.endswith('kernels/__init__.py') and hasattr(kernels, 'swiglu_experts')\n"
            "assert not is_kernels_available(), 'transformers thinks our kernels is the kernel hub'\n"
            "cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,\n"
            "    num_hidden_layers=1, num_attention_heads=2)\n"
            "m = transformers.AutoModelForCausalLM.from_config(cfg)\n"
            "print(m(torch.tensor([[1, 2, 3]])).logits.shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3, 50])" in out.stdout
