"""The learnability ladder (research/ladder.py) as its runs use it, on the real embedded backbone where it trains.

The trainings here are smoke runs of a few steps: they check that every path of a run (each arm, the small recipe's
two-stage pipeline, continuing from a finished run) trains, probes and records its row. Whether a rung is climbed
takes minutes to hours; those runs are commands in research/README.md."""

import json
from pathlib import Path

import pytest
from transformers import TrainerControl

from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.cli.train import parse_train_args
from research import ladder

SCP_SAMPLE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "data" / "clara_pretrain_sample.jsonl"


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").open()]


def test_rung_definitions_hold_what_the_probe_needs():
    for name in ("1", "2"):
        rung = ladder.build_rung(name, max_steps=None)
        assert rung.n_choices == 8 and len(rung.cases) >= 8 and len(rung.train_rows) >= 320
        # held-out probe targets are not training rows (rung 2 draws fresh passages; rung 1 has only 8 words)
        assert all(case.gold != case.other for case in rung.cases)


def test_rung3_trains_on_the_shipped_models_training_documents_and_probes_its_bundled_ones():
    bundled = [json.loads(line)["text"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]
    train, heldout = ladder.shipped_split(SCP_SAMPLE)
    assert [row["docs"][0] for row in heldout] == bundled and len(train) + len(heldout) == 1000
    assert not {row["docs"][0] for row in train} & set(bundled)
    rung = ladder.build_rung("3a", max_steps=None, scp_sample=SCP_SAMPLE)
    assert [case.gold for case in rung.cases] == [" ".join(text.split()[:40]) for text in bundled[:24]]
    assert all(row["answers"] == row["docs"] and len(row["docs"][0].split()) <= 40 for row in rung.train_rows)
    assert {row["docs"][0] for row in rung.train_rows}.isdisjoint(case.gold for case in rung.cases)


def test_rung3_refuses_a_sample_without_the_bundled_passages(tmp_path):
    sample = tmp_path / "other.jsonl"
    sample.write_text(json.dumps({"data_type": "qa", "question": ["Q?"], "answers": ["A"], "docs": ["A text."]}) + "\n")
    with pytest.raises(ValueError, match="lacks 100 of the bundled passages"):
        ladder.build_rung("3a", max_steps=None, scp_sample=sample)


def test_a_finished_stage_is_reused_and_a_different_budget_refused(tmp_path):
    rung = ladder.build_rung("2", max_steps=None)
    finished = tmp_path / "rung2-small" / "pretrain"
    finished.mkdir(parents=True)
    (finished / "model.safetensors").write_bytes(b"")  # train_stage reads only that it exists
    state = {"global_step": 200, "max_steps": 200, "log_history": [{"loss": 1.0}, {"train_runtime": 812.5}]}
    (finished / "trainer_state.json").write_text(json.dumps(state))
    reused = ladder.train_stage(rung, "pretrain", [], "embedded", finished.parent, "small", 0, [], max_steps=200)
    assert reused == {"global_step": 200, "train_runtime": 812.5}
    with pytest.raises(ValueError, match="max_steps=200, not 300"):
        ladder.train_stage(rung, "pretrain", [], "embedded", finished.parent, "small", 0, [], max_steps=300)


def test_the_early_stop_reads_the_mean_of_the_last_three_logged_ces():
    stop, control = ladder.StopBelowCE(0.2), TrainerControl()
    for ce in (0.1, 0.5, 0.1, 0.45, 0.1):  # batches under the threshold among others are noise (means 0.23 to 0.35)
        stop.on_log(None, None, control, logs={"ce_loss": ce, "loss": ce})
        assert not control.should_training_stop
    stop.on_log(None, None, control, logs={"ce_loss": 0.02})  # mean of 0.45, 0.1, 0.02
    assert control.should_training_stop


def test_a_continuation_needs_a_finished_training_output(tmp_path):
    with pytest.raises(ValueError, match="no trainer_state.json"):
        ladder.trained_steps(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 40, "log_history": [{"loss": 2.0}]}))
    with pytest.raises(ValueError, match="checkpoint taken mid-run"):
        ladder.trained_steps(tmp_path)
    with pytest.raises(SystemExit):
        ladder.main(["--rungs", "3a", "--untrained", "--from", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.integration
def test_the_untrained_model_is_probed_as_a_reference_and_does_not_pass(tmp_path, capsys):
    ladder.main(["--rungs", "1", "--untrained", "--out", str(tmp_path)])
    (result,) = results(tmp_path)
    # Before training the generator cannot read the code word: no better than the floor, whatever memory it reads.
    assert result["arm"] == "untrained" and result["steps"] == 0 and not result["passed"]
    assert result["ce_gold"] > result["floor"] and abs(result["gap"]) < 0.5
    assert "| 1 | untrained | 0 |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_a_rung_continues_from_a_finished_run_in_its_own_directory(tmp_path, capsys):
    ladder.main(["--rungs", "1", "--arms", "mse0", "--max-steps", "2", "--out", str(tmp_path)])
    first_run = tmp_path / "rung1-mse0-seed0" / "pretrain"
    ladder.main(["--rungs", "1", "--arms", "mse0", "--max-steps", "2", "--out", str(tmp_path), "--from", str(first_run)])
    ladder.main(["--rungs", "1", "--arms", "mse0", "--max-steps", "2", "--out", str(tmp_path), "--seed", "1"])
    scratch, continued, other_seed = results(tmp_path)
    # The continuation is a new result (not the scratch run's, though rung, arm and seed match), trained in a
    # directory of its own, and counts the steps it started from; another seed trains its own model too.
    assert "from" not in scratch and continued["from"] == str(first_run)
    assert scratch["steps"] == 2 and continued["steps"] == 4 and other_seed["steps"] == 2
    assert len(list(tmp_path.glob("rung1-mse0-seed0-from-*/pretrain/model.safetensors"))) == 1
    assert (tmp_path / "rung1-mse0-seed1" / "pretrain" / "model.safetensors").exists()
    assert f"| 1 | mse0, from {first_run} | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize("arm", list(ladder.ARMS))
def test_every_arm_is_a_valid_training_run_of_each_stage(arm, tmp_path):
    for rung_name, stage in (("1", "pretrain"), ("2", "instruct")):
        rung = ladder.build_rung(rung_name, max_steps=None)
        argv = ladder.train_argv(rung, stage, "embedded", tmp_path / "rows.jsonl", tmp_path / "out", arm, 0, 10)
        _, args = parse_train_args(argv)
        assert args.max_steps == 10 and args.per_device_train_batch_size == 4 and args.learning_rate == 5e-4


@pytest.mark.slow
@pytest.mark.integration
def test_the_small_recipe_trains_and_probes_on_rung1(tmp_path, capsys):
    """A smoke run of 2 steps; the full rung-1 runs (`mse0` and `small` pass) are commands in research/README.md."""
    ladder.main(["--rungs", "1", "--arms", "small", "--max-steps", "2", "--out", str(tmp_path)])
    (row,) = results(tmp_path)
    assert row["arm"] == "small" and row["steps"] == 2
    assert row["floor"] > 0 and row["ce_gold"] > 0 and row["ce_other"] > 0 and 0 <= row["gold_lower"] <= 1
    assert row["passed"] == (row["ce_gold"] < row["floor"] / 2)
    assert "| 1 | small | 2 |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_the_small_recipe_runs_its_two_stage_pipeline_on_rung2(tmp_path):
    """On an instruct rung the small arm trains stage 1 on the rung's passages first, then `instruct` from it."""
    ladder.main(["--rungs", "2", "--arms", "small", "--max-steps", "2", "--pretrain-steps", "1", "--out", str(tmp_path)])
    (row,) = results(tmp_path)
    run = tmp_path / "rung2-small-seed0"
    assert row["steps"] == 3 and (run / "pretrain" / "model.safetensors").exists()
    assert json.loads((run / "instruct" / "trainer_state.json").read_text())["global_step"] == 2
    assert row["floor"] > 0 and "memory_cosine" in row
