"""safeblend sweep --eval / --keep / --eval-only and sweep(evaluate=...): evaluation commands are
tiny Python scripts written here; expected metrics are computed here from the formula."""

from __future__ import annotations

import csv
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import safeblend
from safeblend.cli import main
from safeblend.errors import SpecError
from safeblend.evaluate import Command, EvalPlan, evaluate_directory
from safeblend.keep_rule import choose, parse_keep_rule
from tests.helpers import write_checkpoint

PY = shlex.quote(sys.executable)
WEIGHTS = [0.2, 0.4, 0.6, 0.8]

# Reads the model it is given: base is all zeros and ft all ones, so the merged tensor's mean is
# λ itself; the metrics are functions of what the model holds, not of its directory name.
METRICS_SCRIPT = """
import json, sys
from pathlib import Path
from safetensors.numpy import load_file
model = Path(sys.argv[1])
mean = float(load_file(str(model / "model.safetensors"))["w"].mean())
print("evaluating", model.name)
print(json.dumps({"safety": 1 - mean * mean / 2, "task": 0.5 + 0.4 * mean, "weight_arg": float(sys.argv[2]),
                  "index_arg": int(sys.argv[3]), "name": "not a number"}))
"""
FAILS = "import sys\nprint('partial output')\nprint('boom: no GPU', file=sys.stderr)\nsys.exit(3)\n"
SLEEPS = "import time\nprint('starting', flush=True)\ntime.sleep(60)\n"
GARBAGE = "print('{\"task\": 0.9}')\nprint('accuracy: 0.93')\n"
LOSS = "import json, sys\nw = float(sys.argv[1])\nprint(json.dumps({'loss': (w - 0.4) ** 2}))\n"


def safety(w: float) -> float:
    return 1 - w * w / 2


def task(w: float) -> float:
    return 0.5 + 0.4 * w


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A zeros/ones fp32 pair and the evaluation scripts."""
    root = tmp_path_factory.mktemp("eval")
    write_checkpoint(root / "base", {"w": np.zeros((8, 4), np.float32)})
    write_checkpoint(root / "ft", {"w": np.ones((8, 4), np.float32)})
    for name, text in {"metrics.py": METRICS_SCRIPT, "fails.py": FAILS, "sleeps.py": SLEEPS,
                       "garbage.py": GARBAGE, "loss.py": LOSS}.items():
        (root / name).write_text(text)
    return root


def _sweep(setup: Path, out: Path, *extra: str, weights: str = "0.2,0.4,0.6,0.8"):
    args = ["sweep", str(setup / "base"), str(setup / "ft"), "-o", str(out), "--weights", weights, *extra]
    return CliRunner().invoke(main, args)


def _metrics_cmd(setup: Path) -> str:
    return f"{PY} {shlex.quote(str(setup / 'metrics.py'))} {{model}} {{weight}} {{index}}"


def _script(setup: Path, name: str, *args: str) -> str:
    return " ".join([PY, shlex.quote(str(setup / name)), *args])


def test_sweep_evaluates_keeps_the_chosen_model_and_writes_the_report(setup, tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(setup, out, "--eval", _metrics_cmd(setup), "--keep", "best task where safety >= 0.85")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [row["weight"] for row in report["rows"]] == WEIGHTS
    for i, (w, row) in enumerate(zip(WEIGHTS, report["rows"])):
        assert row["metrics"]["safety"] == pytest.approx(safety(w), abs=1e-6)
        assert row["metrics"]["task"] == pytest.approx(task(w), abs=1e-6)
        assert row["metrics"]["weight_arg"] == w and row["metrics"]["index_arg"] == i  # placeholders
        assert row["evaluations"][0]["ignored"] == ["name"] and row["ok"]
        assert row["model"] == str(out / f"lambda-{w}")
    # safety(0.6) = 0.82 < 0.85: the best task among 0.2 and 0.4 is 0.4.
    assert report["keep"]["chosen"] == 0.4 and report["keep"]["model"] == str(out / "lambda-0.4")
    dropped = {row["weight"]: row["dropped"] for row in report["rows"]}
    assert dropped[0.4] is None
    assert "λ=0.4 has higher" in dropped[0.2]
    assert dropped[0.6] == "safety = 0.82, not >= 0.85" and dropped[0.8] == "safety = 0.68, not >= 0.85"
    assert sorted(p.name for p in out.iterdir()) == ["lambda-0.4", "logs", "report.csv", "report.json",
                                                      "tradeoff.png"]
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = out / "logs" / "lambda-0.6.eval-1.stdout"
    assert log.read_text().startswith("evaluating lambda-0.6\n")
    assert report["sweep"]["weights"] == WEIGHTS and report["evaluators"] == [_metrics_cmd(setup)]
    # The table: one line per λ as it arrives, then the final table.
    assert "λ=0.6" in result.stdout and "chosen" in result.stdout
    assert "Kept " in result.stderr and "removed 3 other model(s)" in result.stderr

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [float(r["lambda"]) for r in rows] == WEIGHTS
    assert [float(r["task"]) for r in rows] == pytest.approx([task(w) for w in WEIGHTS], abs=1e-6)
    assert [r["keep"].split(":")[0] for r in rows] == ["dropped", "chosen", "dropped", "dropped"]
    assert rows[1]["model"] == str(out / "lambda-0.4") and str(log) in rows[2]["logs"].split(" ")
    assert all(float(r["seconds"]) > 0 for r in rows) and {r["status"] for r in rows} == {"ok"}


def test_failed_timed_out_and_garbage_evaluations_are_recorded_not_fatal(setup, tmp_path):
    out = tmp_path / "sweep"
    started = time.perf_counter()
    result = _sweep(setup, out, "--eval", _script(setup, "fails.py"), "--eval", _script(setup, "sleeps.py"),
                    "--eval", _script(setup, "garbage.py"), "--eval", _metrics_cmd(setup),
                    "--eval-timeout", "0.5", "--eval-jobs", "4", weights="0.3,0.7")
    assert time.perf_counter() - started < 20  # the sleepers were killed, not waited for
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for row in report["rows"]:
        fails, sleeps, garbage, metrics = row["evaluations"]
        assert fails["returncode"] == 3 and fails["error"] == "exit status 3: 'boom: no GPU'"
        assert sleeps["error"] == "timed out after 0.5 s (killed)" and sleeps["returncode"] is None
        assert garbage["error"] == "last stdout line is not a JSON object: 'accuracy: 0.93'"
        assert metrics["error"] is None and not row["ok"]
        assert set(row["metrics"]) == {"safety", "task", "weight_arg", "index_arg"}  # the good one still counts
    assert (out / "logs" / "lambda-0.3.eval-2.stdout").read_text() == "starting\n"
    assert (out / "lambda-0.3").is_dir() and (out / "lambda-0.7").is_dir()
    assert "4 evaluation(s) failed" not in result.stderr and "6 evaluation(s) failed" in result.stderr
    assert "FAILED eval 1: exit status 3" in result.stdout
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert rows[0]["status"].startswith("failed: eval 1: exit status 3")


def test_keep_that_needs_a_failed_metric_chooses_nothing_and_deletes_nothing(setup, tmp_path):
    out = tmp_path / "sweep"
    code = "import sys, json; w = float(sys.argv[1]); sys.exit(1) if w < 0.3 else print(json.dumps({'score': w}))"
    fails_at_first = f"{PY} -c {shlex.quote(code)} {{weight}}"
    result = _sweep(setup, out, "--eval", fails_at_first, "--keep", "best score")
    assert result.exit_code == 1
    assert "Error: --keep 'best score': metrics the rule needs are missing (λ=0.2: score)" in result.stderr
    assert "nothing deleted" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in out.glob("lambda-*")) == [f"lambda-{w}" for w in WEIGHTS]
    report = json.loads((out / "report.json").read_text())
    assert report["keep"]["chosen"] is None and report["keep"]["removed"] == []
    assert report["rows"][0]["dropped"] == "no value for score"


def test_keep_that_selects_nothing_is_reported_not_guessed(setup, tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(setup, out, "--eval", _metrics_cmd(setup), "--keep", "best task where safety > 0.99")
    assert result.exit_code == 1
    assert "no λ meets safety > 0.99" in result.stderr and "nothing deleted" in result.stderr
    assert len(list(out.glob("lambda-*"))) == 4
    report = json.loads((out / "report.json").read_text())
    assert all(row["dropped"].startswith("safety = ") for row in report["rows"])


def test_lowest_keeps_the_minimum_and_eval_only_reevaluates(setup, tmp_path):
    out = tmp_path / "sweep"
    assert _sweep(setup, out, "--eval", _metrics_cmd(setup)).exit_code == 0
    (out / "lambda-9.0").mkdir()  # not written by safeblend: neither evaluated nor deleted
    result = CliRunner().invoke(main, ["sweep", "--eval-only", str(out), "--eval", _script(setup, "loss.py", "{weight}"),
                                       "--keep", "lowest loss"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [row["weight"] for row in report["rows"]] == WEIGHTS and report["sweep"] is None
    assert report["keep"]["chosen"] == 0.4 and report["metrics"] == ["loss"]
    assert sorted(p.name for p in out.glob("lambda-*")) == ["lambda-0.4", "lambda-9.0"]


def test_eval_only_with_weights_evaluates_those(setup, tmp_path):
    out = tmp_path / "sweep"
    assert _sweep(setup, out).exit_code == 0
    report = evaluate_directory(out, _script(setup, "loss.py", "{weight}"), weights=[0.8, 0.2])
    assert [row.weight for row in report.rows] == [0.2, 0.8]
    with pytest.raises(SpecError, match="no complete model for lambda-0.5"):
        evaluate_directory(out, _script(setup, "loss.py", "{weight}"), weights=[0.5])


def test_python_api_returns_the_report(setup, tmp_path):
    seen = []

    def evaluate(model: str, weight: float) -> dict:
        seen.append((Path(model).name, weight))
        if weight == 0.6:
            raise RuntimeError("out of memory")
        return {"task": task(weight), "safety": safety(weight)}

    report = safeblend.sweep(setup / "base", setup / "ft", tmp_path / "s", WEIGHTS,
                             evaluate=EvalPlan(evaluate, keep="best task where safety >= 0.9", plot=False))
    assert isinstance(report, safeblend.SweepReport)
    assert seen == [(f"lambda-{w}", w) for w in WEIGHTS]
    assert report.rows[2].evaluations[0].error == "RuntimeError: out of memory"
    # 0.6 failed: the rule cannot know whether it would have won, so nothing is chosen.
    assert report.chosen is None and "λ=0.6: task, safety" in report.keep["reason"]
    assert report.sweep["weights"] == WEIGHTS and not (tmp_path / "s" / "tradeoff.png").exists()
    plain = safeblend.sweep(setup / "base", setup / "ft", tmp_path / "t", [0.2, 0.4],
                            evaluate=lambda m, w: {"task": task(w)})
    assert [row.metrics for row in plain.rows] == [{"task": task(0.2)}, {"task": task(0.4)}]
    assert plain.keep is None and (tmp_path / "t" / "lambda-0.2").is_dir()


def test_a_metric_printed_by_two_commands_is_not_guessed_between(setup, tmp_path):
    out = tmp_path / "sweep"
    result = _sweep(setup, out, "--eval", _metrics_cmd(setup), "--eval", _metrics_cmd(setup), weights="0.5")
    assert result.exit_code == 0
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["evaluations"][1]["error"] == "metric 'safety' is also printed by eval 1; give each metric one evaluator"
    assert row["metrics"]["safety"] == pytest.approx(safety(0.5))


def test_placeholders_stay_one_argument_and_shell_mode_quotes_them(setup, tmp_path):
    target_dir = tmp_path / "a dir with spaces"
    argv_script = "import json, sys; print(json.dumps({'argc': len(sys.argv) - 1}))"
    plain = f"{PY} -c {shlex.quote(argv_script)} {{model}}"
    result = _sweep(setup, target_dir, "--eval", plain, weights="0.5")
    assert result.exit_code == 0, result.output
    assert json.loads((target_dir / "report.json").read_text())["rows"][0]["metrics"] == {"argc": 1.0}
    shell = f"{PY} -c {shlex.quote(argv_script)} {{model}} | cat && echo '{{\"piped\": 1}}'"
    result = _sweep(setup, tmp_path / "t t", "--eval", shell, "--eval-shell", weights="0.5")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "t t" / "report.json").read_text())["rows"][0]
    assert row["metrics"] == {"piped": 1.0} and row["evaluations"][0]["argv"][:2] == ["/bin/sh", "-c"]
    assert (tmp_path / "t t" / "logs" / "lambda-0.5.eval-1.stdout").read_text().startswith('{"argc": 1}')


def test_braces_that_are_not_near_a_placeholder_are_the_commands_own(setup, tmp_path):
    code = "import json, sys; print(json.dumps({'n': len(sys.argv[1])}))"
    report = safeblend.sweep(setup / "base", setup / "ft", tmp_path / "s", [0.5],
                             evaluate=f"{PY} -c {shlex.quote(code)} {{print}}")
    assert report.rows[0].metrics == {"n": len("{print}")}


def test_environment_names_the_model(setup, tmp_path):
    env_script = "import json, os; print(json.dumps({'w': float(os.environ['SAFEBLEND_WEIGHT']), " \
                 "'i': int(os.environ['SAFEBLEND_INDEX']), 'dir': os.path.isdir(os.environ['SAFEBLEND_MODEL'])}))"
    report = safeblend.sweep(setup / "base", setup / "ft", tmp_path / "s", [0.1, 0.3],
                             evaluate=f"{PY} -c {shlex.quote(env_script)}")
    assert [row.metrics for row in report.rows] == [{"w": 0.1, "i": 0.0}, {"w": 0.3, "i": 1.0}]
    assert report.rows[0].evaluations[0].ignored == ["dir"]  # a bool is not a metric


@pytest.mark.parametrize("args, message", [
    (["--eval", "python {modle}"], "unknown placeholder {modle}"),
    (["--eval", "python x.py --model {Model}"], "unknown placeholder {Model}"),
    (["--eval", "python x.py {weights}"], "unknown placeholder {weights}"),
    (["--eval", "no-such-program-xyz {model}"], "no-such-program-xyz: command not found"),
    (["--eval", "python 'unclosed"], "No closing quotation"),
    (["--eval", "python x.py", "--keep", "best"], "'best' must be followed by a metric name"),
    (["--eval", "python x.py", "--keep", "highest task"], "must start with 'best' or 'lowest'"),
    (["--eval", "python x.py", "--keep", "best task where safety = 0.9"], "cannot read '= 0.9'"),
    (["--keep", "best task"], "--keep needs at least one --eval CMD"),
])
def test_bad_evaluation_options_are_one_line_usage_errors_before_the_sweep(setup, tmp_path, args, message):
    out = tmp_path / "sweep"
    result = _sweep(setup, out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()  # refused before any model was written


def test_eval_only_misuse(setup, tmp_path):
    runner = CliRunner()
    both = runner.invoke(main, ["sweep", str(setup / "base"), "--eval-only", str(tmp_path), "--eval", "python x"])
    assert both.exit_code == 2 and "give no BASE" in both.stderr
    empty = runner.invoke(main, ["sweep", "--eval-only", str(tmp_path), "--eval", "python x"])
    assert empty.exit_code == 2 and "no complete lambda-<w>/ model directory" in empty.stderr
    missing = runner.invoke(main, ["sweep", "-o", str(tmp_path / "s")])
    assert missing.exit_code == 2 and "give BASE and at least one fine-tuned MODEL (or a lone adapter)" in missing.stderr


def test_without_matplotlib_the_plot_is_a_note_not_a_failure(setup, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "sweep"
    result = _sweep(setup, out, "--eval", _script(setup, "loss.py", "{weight}"), weights="0.5")
    assert result.exit_code == 0, result.output
    assert "Note: tradeoff.png not drawn: matplotlib is not installed" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["plot"] is None and report["notes"] == [
        "tradeoff.png not drawn: matplotlib is not installed (pip install 'safeblend[plot]')"]
    assert not (out / "tradeoff.png").exists()


def test_eval_jobs_run_evaluations_at_the_same_time(setup, tmp_path):
    stamp = ("import json, sys, time; t0 = time.time(); time.sleep(0.4); "
             "print(json.dumps({'start': t0, 'end': time.time()}))")
    report = safeblend.sweep(setup / "base", setup / "ft", tmp_path / "s", WEIGHTS,
                             evaluate=EvalPlan([Command(f"{PY} -c {shlex.quote(stamp)}", 1)], jobs=4, plot=False))
    spans = [(row.metrics["start"], row.metrics["end"]) for row in report.rows]
    overlapping = sum(1 for a in spans for b in spans if a is not b and a[0] < b[1] and b[0] < a[1])
    assert overlapping > 0, spans
    serial = safeblend.sweep(setup / "base", setup / "ft", tmp_path / "t", WEIGHTS[:2],
                             evaluate=EvalPlan([Command(f"{PY} -c {shlex.quote(stamp)}", 1)], plot=False))
    (s0, e0), (s1, _) = [(row.metrics["start"], row.metrics["end"]) for row in serial.rows]
    assert s1 >= e0  # jobs=1: one after the other, in weight order


# -- the --keep grammar and choice -----------------------------------------------------------------


@pytest.mark.parametrize("text, goal, metric, conditions", [
    ("best task", "best", "task", []),
    ("lowest loss", "lowest", "loss", []),
    ("BEST task WHERE safety >= 0.95", "best", "task", [("safety", ">=", 0.95)]),
    ("best task where safety>=0.95 and refusal_rate<0.1", "best", "task",
     [("safety", ">=", 0.95), ("refusal_rate", "<", 0.1)]),
    ("lowest ppl/wiki where mmlu.acc > -1e-3 and harm-score <= 2", "lowest", "ppl/wiki",
     [("mmlu.acc", ">", -0.001), ("harm-score", "<=", 2.0)]),
])
def test_keep_rules_parse(text, goal, metric, conditions):
    rule = parse_keep_rule(text)
    assert (rule.goal, rule.metric) == (goal, metric)
    assert [(c.metric, c.op, c.value) for c in rule.conditions] == conditions


@pytest.mark.parametrize("text, message", [
    ("", "must start with 'best' or 'lowest'"),
    ("max task", "must start with 'best' or 'lowest'"),
    ("best", "must be followed by a metric name"),
    ("best 3", "must be followed by a metric name"),
    ("best task safety >= 1", "expected 'where' after the metric, got 'safety'"),
    ("best task where", "expected a condition like 'safety >= 0.95', got 'nothing'"),
    ("best task where safety >=", "expected a condition"),
    ("best task where safety >= high", "expected a condition"),
    ("best task where safety >= 0.9 or x < 1", "conditions are joined with 'and', got 'or'"),
    ("best task where safety >= 0.9 and", "expected a condition"),
    ("best task where safety == 0.9", "cannot read '== 0.9'"),
    ("best task where safety >= 1e999", "is not a finite number"),
])
def test_bad_keep_rules_say_what_is_wrong_and_the_grammar(text, message):
    with pytest.raises(SpecError, match="the rule is best METRIC|not a finite") as info:
        parse_keep_rule(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_choose_applies_conditions_and_breaks_ties_towards_the_smaller_weight():
    rows = [{"task": 0.7, "safety": 0.99}, {"task": 0.8, "safety": 0.97}, {"task": 0.8, "safety": 0.96},
            {"task": 0.9, "safety": 0.90}]
    labels = ["λ=0.1", "λ=0.2", "λ=0.3", "λ=0.4"]
    choice = choose(parse_keep_rule("best task where safety > 0.95"), rows, labels)
    assert choice.chosen == 1
    assert choice.dropped == {0: "task = 0.7; λ=0.2 has higher 0.8",
                              2: "task = 0.8, tied with λ=0.2 (ties go to the smaller λ)",
                              3: "safety = 0.9, not > 0.95"}
    assert choose(parse_keep_rule("lowest safety where task < 0.85"), rows, labels).chosen == 2
    assert choose(parse_keep_rule("best safety where task <= 0.7"), rows, labels).chosen == 0
    assert choose(parse_keep_rule("best task where safety >= 0.99 and task >= 0.8"), rows, labels).chosen is None
    unknown = choose(parse_keep_rule("best tsak"), rows, labels)
    assert unknown.chosen is None and "λ=0.1: tsak" in unknown.reason


def test_keep_removes_only_what_the_sweep_wrote(setup, tmp_path):
    """An evaluation that saves its results inside the model directory keeps them: --keep deletes
    the files safeblend wrote there (its manifest's list) and leaves the rest, with a note."""
    writes = setup / "writes_results.py"
    writes.write_text("import json, sys, pathlib\n"
                      "pathlib.Path(sys.argv[1], 'eval_results.json').write_text('{}')\n"
                      "print(json.dumps({'loss': (float(sys.argv[2]) - 0.4) ** 2}))\n")
    out = tmp_path / "sweep"
    result = _sweep(setup, out, "--eval", f"{PY} {shlex.quote(str(writes))} {{model}} {{weight}}",
                    "--keep", "lowest loss")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "lambda-0.2").iterdir()) == ["eval_results.json"]
    assert (out / "lambda-0.4" / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert any("eval_results.json" in note and "lambda-0.2" in note for note in report["notes"])
