"""The layouts of tests/test_moe_train_parallel.py on NCCL: --shard-degree 2 and --expert-parallel 2 on 2 GPUs give
the one-GPU run (fp32, within 1e-4: GPU reductions differ in order), and a bf16 run trains. Skipped without 2 GPUs."""

import pytest
import torch
from test_moe_train_parallel import COMMON, check_same_run, launch, metrics, trainer  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


@pytest.mark.parametrize("layout", [["--shard-degree", "2"], ["--expert-parallel", "2"],
                                    ["--shard-degree", "2", "--expert-parallel", "2"]], ids=["shard", "ep", "both"])
def test_two_gpus_give_the_losses_of_one(trainer, tmp_path, layout):  # noqa: F811
    args = ["tiny-moe-idle", "--steps", "5", *COMMON]
    launch(trainer, 1, *args, "--batch-size", "4", "--out", str(tmp_path / "one"))
    launch(trainer, 2, *args, "--batch-size", "2", *layout, "--out", str(tmp_path / "two"))
    check_same_run(tmp_path / "one", tmp_path / "two", tol=1e-4)


def test_bf16_sharded_and_expert_parallel_trains(trainer, tmp_path):  # noqa: F811
    launch(trainer, 2, "tiny-moe-idle", "--steps", "20", *COMMON, "--batch-size", "4", "--mixed-precision", "bf16",
           "--shard-degree", "2", "--expert-parallel", "2", "--out", str(tmp_path / "bf16"))
    m = metrics(tmp_path / "bf16")
    assert m[20]["val_loss"] < m[0]["val_loss"] - 0.1
