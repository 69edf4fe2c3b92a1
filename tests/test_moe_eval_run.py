"""moe.eval.run and its options through `moekit eval`: lm-eval tasks from local files run on moekit's model and
land in the table, the JSON and --out DIR/results.json; impossible option combinations are one line."""

import json

import pytest

from moekit.moe.eval.run import table

from helpers import moekit, multiple_choice_task, one_line_error, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.slow
def test_lm_eval_tasks_from_local_files_through_moekit_eval(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model = str(tiny_checkpoint(tmp_path / "dense"))
    tasks = multiple_choice_task(tmp_path / "tasks", "tiny_qa", [("2 + 2 =", ["4", "5"], 0),
                                 ("def f(x): return", ["x", "]"], 0), ("The sky is", ["blue", "loud"], 0)])
    code, out, err = moekit(capsys, "eval", model, "--tasks", "tiny_qa", "--include-path", str(tasks), "--limit", "2",
                            "--out", str(tmp_path / "report"), "--json")
    assert code == 0, err
    results = json.loads(out)["tasks"][model]
    assert results["n-samples"]["tiny_qa"]["effective"] == 2 and 0 <= results["results"]["tiny_qa"]["acc,none"] <= 1
    assert json.loads((tmp_path / "report" / "results.json").read_text())["tasks"] == json.loads(out)["tasks"]
    shown = table(json.loads(out))  # what the command prints without --json
    assert f"lm-eval tasks on {model}:" in shown and "tiny_qa: acc " in shown, shown
    assert "no_such_task" in one_line_error(capsys, "eval", model, "--tasks", "no_such_task", "--include-path",
                                            tasks)


def test_options_that_need_others_are_one_line(tmp_path, capsys):
    assert "--limit is an option of --tasks" in one_line_error(capsys, "eval", tmp_path, "--data", "x", "--limit",
                                                               "3")
    assert "--routing reads the --data specs" in one_line_error(capsys, "eval", tmp_path, "--tasks", "t", "--routing")
    assert "checkpoint directory not found" in one_line_error(capsys, "eval", tmp_path / "none", "--data", "x")
