"""moe.bench, absurd sizes and thread counts through `moekit bench`: a size whose estimated memory the device
does not have is refused before anything is allocated, naming the estimate and what is available; --threads above
the machine's cores is refused (it crashed torch's thread pool). Each refusal is one line, writes no --json and
leaves no temporary (tests/hostile.py); the absurd ones run in a child process that must end in time."""

import os

import pytest
import torch

import moekit.llama.io as io
from moekit.llama.errors import ConfigError
from moekit.moe.bench.timing import check_device_memory

from hostile import refused, refused_in_time


@pytest.fixture
def little_memory(monkeypatch):
    """The machine has 16 GB available, whatever it really has: the refusals below do not depend on it."""
    monkeypatch.setattr(io, "memory_available", lambda: 16e9)


def test_bench_layer_mixtral_on_cpu_is_refused_with_its_estimate(little_memory, tmp_path, capsys):
    err = refused(capsys, "bench", "layer", "--preset", "mixtral", "--device", "cpu", "--json", tmp_path / "l.json",
                  watch=[tmp_path])
    assert ("bench layer at H=4096 F=14336 E=8 k=2 T=65536 bfloat16 needs about 39.9 GB of memory; 16.0 GB is "
            "available; give smaller --tokens, --hidden, --ffn or --experts") in err


@pytest.mark.parametrize("argv, words", [
    (["layer", "--hidden", "1000000", "--device", "cpu"], "bench layer at H=1000000 F=2816 E=8 k=2 T=4096 float32 "
                                                           "needs about 1,313.4 GB of memory"),
    (["gemm", "--tokens", "1000000000", "--device", "cpu"], "bench gemm at T=1000000000 H=4096 F=14336 E=8 k=2 "
                                                            "float32 needs about 983,053.6 GB of memory"),
    (["train", "--vocab", "1000000000", "--device", "cpu"], "bench train of 3 models of 4 layers H=512 F=1408 E=8 "
                                                            "V=1000000000, batch 8x256 fp32 needs about 81,924.4 GB"),
    (["gemm", "--tokens", "1e9"], "argument --tokens: invalid int value: '1e9'"),
], ids=["layer", "gemm", "train", "1e9"])
def test_absurd_sizes_are_refused_before_allocating(argv, words, tmp_path):
    err = refused_in_time("bench", *argv, "--json", tmp_path / "b.json", watch=[tmp_path], timeout=60)
    assert words in err


@pytest.mark.parametrize("argv, words", [
    (["gemm", "--tokens", "4096", "--hidden", "4096", "--ffn", "14336"], "bench gemm at T=4096 H=4096 F=14336 E=8 "
                                                                         "k=2 float32 needs about 17.6 GB"),
    (["train"], "bench train of 3 models of 4 layers H=512 F=1408 E=8 V=8192, batch 8x256 fp32 needs about 5.1 GB"),
], ids=["gemm", "train"])
def test_sizes_beyond_the_available_memory_are_refused(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(io, "memory_available", lambda: 4e9)
    err = refused(capsys, "bench", *argv, "--device", "cpu", "--json", tmp_path / "b.json", watch=[tmp_path])
    assert words in err and "of memory; 4.0 GB is available" in err


def test_on_cuda_the_gpus_free_memory_is_the_bound(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8e9, 80e9))
    with pytest.raises(ConfigError, match=r"^bench x needs about 9.0 GB of GPU memory; 8.0 GB is free on cuda:0; "
                                          r"give less$"):
        check_device_memory(9e9, torch.device("cuda", 0), "bench x", "give less")
    check_device_memory(7e9, torch.device("cuda", 0), "bench x")  # fits: nothing raised


@pytest.mark.parametrize("bench", ["layer", "train"])
def test_threads_above_the_cores_are_refused(bench, tmp_path):
    cores = os.cpu_count()
    for threads in (5000, cores + 1):
        err = refused_in_time("bench", bench, "--threads", threads, "--json", tmp_path / "b.json", watch=[tmp_path],
                              timeout=60)
        assert f"--threads {threads} is more than this machine's {cores} cores; expected 1 to {cores}" in err
