"""moekit's lm-eval model against lm-eval's own `--model hf` (transformers) on the same tiny checkpoints, dense and
upcycled: per-sample log-likelihoods of a local multiple-choice task, rolling log-likelihoods, loglikelihood
edge cases (empty / long / space-ending contexts) and greedy generations with stop strings; the
`python -m moekit.moe.eval.harness` route; one-line errors."""

import os
import subprocess
import sys

import pytest

from moekit.llama.errors import ConfigError
from moekit.moe.eval import harness
from moekit.moe.eval.harness import MoekitLM, run_tasks

from helpers import PROSE, ROOT, multiple_choice_task, single_thread, tiny_checkpoint

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")  # lm-eval's hf model, the reference
pytestmark = pytest.mark.slow

DOCS = [("What is the capital of France?", ["Paris", "London", "Rome"], 0),
        ("Which animal barks?", ["cat", "dog", "fish"], 1),
        ("def f(x): return", ["x", "None", "0"], 0),
        ("2 + 2 =", ["4", "5", "22"], 0),
        ("The sky is", ["blue", "green", "loud"], 0),
        ("import", ["json", "os", "re"], 2)]



@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"dense": a tiny Llama with its BPE tokenizer, "moe": its upcycle to 4 experts, top-2, whose experts differ
    (noise) and whose router is far from uniform, so routing matters}."""
    from moekit.upcycle import upcycle
    from moekit.upcycle.options import UpcycleOptions

    root = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(root / "dense")
    upcycle(str(root / "dense"), str(root / "moe"), UpcycleOptions(num_experts=4, top_k=2, recipe="noise",
                                                                      noise_scale=0.5, router_std=1.0),
            progress=False, log=None)
    return {"dense": str(root / "dense"), "moe": str(root / "moe")}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A directory with the local multiple-choice task tiny_mc (its jsonl beside it)."""
    return multiple_choice_task(tmp_path_factory.mktemp("tasks"), "tiny_mc", DOCS)


def hf_lm(directory, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=directory, dtype="float32", device="cpu", **kw)


def requests(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_a_local_multiple_choice_task_scores_as_lm_evals_hf_model(checkpoints, tasks, kind):
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = run_tasks(checkpoints[kind], ["tiny_mc"], include_path=str(tasks), batch_size=4, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoints[kind]},dtype=float32",
                                     device="cpu", batch_size=4, tasks=["tiny_mc"], log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    mine, hf = (sorted(r["samples"]["tiny_mc"], key=lambda s: s["doc_id"]) for r in (ours, theirs))
    assert len(mine) == len(hf) == len(DOCS)
    for a, b in zip(mine, hf):
        assert a["arguments"] == b["arguments"]
        assert len(a["resps"]) == 3
        for (ll_a, greedy_a), (ll_b, greedy_b) in [(x[0], y[0]) for x, y in zip(a["resps"], b["resps"])]:
            assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b, (a["arguments"], ll_a, ll_b)
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    if kind == "dense":  # the task named by its file; limit and num_fewshot reach lm-eval
        few = run_tasks(checkpoints[kind], [str(tasks / "tiny_mc.yaml")], limit=2, num_fewshot=1)
        assert few["results"]["tiny_mc"]["sample_len"] == 2 and few["n-shot"]["tiny_mc"] == 1


def test_loglikelihood_edge_cases_and_rolling_windows_match(checkpoints):
    """max_length 32 for both: long contexts are left-truncated and documents scored over several windows; an
    empty context is BOS; a context ending in spaces gives them to the continuation; a string that starts with
    the BOS text gets no second BOS."""
    ours, theirs = MoekitLM(checkpoints["dense"], batch_size=3, max_length=32), hf_lm(checkpoints["dense"],
                                                                                     max_length=32, batch_size=3)
    pairs = [("", "The old harbour"), (PROSE, " and the ships came home."), ("Fishermen mended their ", "nets"),
             ("<s>Nobody in the town", " remembered"), ("x", " y")]
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests("loglikelihood", pairs)),
                                            theirs.loglikelihood(requests("loglikelihood", pairs))):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b, (a, b)
    docs = [(PROSE,), (PROSE[:150],), ("def f(x):\n    return x * 2\n" * 4,), ("Hi",)]
    assert len(ours.tok_encode(PROSE)) > 3 * 32  # several windows
    a, b = (lm.loglikelihood_rolling(requests("loglikelihood_rolling", docs)) for lm in (ours, theirs))
    assert all(abs(x - y) < 1e-4 for x, y in zip(a, b)), (a, b)


def test_greedy_generation_with_stop_strings_matches(checkpoints):
    ours, theirs = MoekitLM(checkpoints["moe"], batch_size=4, max_length=32), hf_lm(checkpoints["moe"],
                                                                                   max_length=32, batch_size=1)
    prompts = ["The old harbour town", "The old harbour city", "def f(x):", PROSE, "Nobody"]  # two of one length
    free = theirs.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12})
                                                              for p in prompts]))
    stops = [text[2:4] if len(text) > 4 else "zz" for text in free]  # strings that do occur: cut there
    args = [(p, {"until": [s], "max_gen_toks": 12}) for p, s in zip(prompts, stops)]
    args += [(p, {"until": ["\n", "."], "max_gen_toks": 5, "do_sample": False}) for p in prompts]
    mine, hf = (lm.generate_until(requests("generate_until", args)) for lm in (ours, theirs))
    assert mine == hf
    assert ours.generate_until(requests("generate_until", args[:5])) == hf[:5]  # in other batches: the same
    assert any(len(m) < len(f) for m, f in zip(mine, free))  # some stop string cut its generation short
    assert ours.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 12})
                                                           for p in prompts])) == free


def test_the_python_m_route_runs_lm_evals_command_line_with_model_moekit(checkpoints, tasks):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "moekit.moe.eval.harness", "--model", "moekit", "--model_args",
                          f"pretrained={checkpoints['dense']}", "--tasks", "tiny_mc", "--include_path", str(tasks),
                          "--batch_size", "4"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout[run.stdout.index("|"):]
    assert "tiny_mc" in table and "acc" in table


def test_the_model_is_registered_as_moekit():
    from lm_eval.api.registry import get_model

    assert get_model("moekit") is MoekitLM


def one_line_error(call) -> str:
    with pytest.raises(ConfigError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_errors_are_one_line(checkpoints, tasks, tmp_path, monkeypatch):
    dense = checkpoints["dense"]
    assert "does not exist" in one_line_error(lambda: run_tasks(dense, [str(tmp_path / "none.yaml")]))
    assert "--include-path" in one_line_error(lambda: run_tasks(dense, ["tiny_mc"], include_path=tmp_path / "no"))
    bare = tmp_path / "bare"  # a checkpoint without its tokenizer
    tiny_checkpoint(bare, tokenizer=False)
    assert "no tokenizer.json" in one_line_error(lambda: run_tasks(str(bare), ["tiny_mc"], include_path=tasks))
    assert "float16" in one_line_error(lambda: MoekitLM(dense, dtype="float16"))
    assert "batch_size" in one_line_error(lambda: MoekitLM(dense, batch_size="auto"))
    # a task whose data file is gone fails while lm-eval loads it, before the model is asked anything
    gone = multiple_choice_task(tmp_path / "gone", "gone_mc", data=tmp_path / "missing.jsonl")
    msg = one_line_error(lambda: run_tasks(dense, ["gone_mc"], include_path=gone))
    assert "gone_mc" in msg and "failed to load" in msg
    (gone / "broken.yaml").write_text("task: [unclosed\n")
    assert "broken.yaml failed to load" in one_line_error(lambda: run_tasks(dense, [str(gone / "broken.yaml")]))
    # an unknown name, with a task file beside it that lm-eval cannot read (lm-eval's full index: ~9 s)
    msg = one_line_error(lambda: run_tasks(dense, ["no_such_task"], include_path=gone))
    assert "unknown task 'no_such_task'" in msg and "broken.yaml failed to load" in msg
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the `eval` extra not installed
    assert "pip install 'moekit[eval]'" in one_line_error(lambda: run_tasks(dense, ["tiny_mc"]))
    assert harness.main(["--tasks", "x"]) == 2
