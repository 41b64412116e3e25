"""`stkd study` on digits: two methods as parallel runs, the table, one teacher object, resume; the table's
mean and std over seeds."""

from __future__ import annotations

import json
import types
from pathlib import Path

import mlflow
import pytest

from pipeline.sweep import study
from pipeline.train import teachers


def write_spec(folder: Path, methods: str = "  ce: {name: ce}\n  kd: {name: kd}\n", seeds: str = "[0, 1]") -> Path:
    (folder / "pair.yaml").write_text("base: test_tiny\nname: test-study-pair\nmethod: {name: kd, temperature: 2.0}\n"
                                      "teacher: {source: teacher-test-digits}\n")
    spec = folder / "spec.yaml"
    spec.write_text(f"description: test study\npairs: [{folder / 'pair.yaml'}]\nmethods:\n{methods}seeds: {seeds}\n"
                    "overrides: {optim.epochs: 1}\n")
    return spec


def test_every_cell_resolves_before_anything_runs(tmp_path, tiny_overrides):
    spec = write_spec(tmp_path, methods="  ce: {name: ce}\n  kd: {name: kd}\n  dkd-t2: {name: dkd, temperature: 2}\n")
    loaded = study.load_study(spec, tiny_overrides)
    assert len(loaded["configs"]) == 3 * 2
    pair = str(tmp_path / "pair.yaml")
    kd, ce, dkd = (loaded["configs"][(pair, label, 1)] for label in ("kd", "ce", "dkd-t2"))
    assert kd["method"]["temperature"] == 2.0, "the pair's own method keeps the pair's hyperparameters"
    assert (dkd["method"]["temperature"], dkd["method"]["ce_weight"]) == (2.0, 1.0), "another method: its defaults"
    assert ce["teacher"]["source"] is None and kd["teacher"]["source"] == "teacher-test-digits"
    assert kd["train"]["seed"] == 1 and kd["data"]["val_fraction"] == 0.1, "every run has a validation split"


def test_a_dataset_shared_by_two_pairs_is_checksummed_once(tmp_path, tiny_overrides, monkeypatch):
    spec = write_spec(tmp_path, methods="  kd: {name: kd}\n", seeds="[0]")
    (tmp_path / "pair2.yaml").write_text((tmp_path / "pair.yaml").read_text().replace("test-study-pair", "pair-two"))
    spec.write_text(spec.read_text().replace("pairs: [", f"pairs: [{tmp_path / 'pair2.yaml'}, "))
    loaded = study.load_study(spec, tiny_overrides)
    verified = []

    class Stop(Exception):
        pass

    def stop_before_ray():
        raise Stop

    monkeypatch.setattr(study.run_lib, "dataset_info", lambda config, verify=True: verified.append(verify) or {})
    monkeypatch.setattr(study.run_lib, "ensure_ray", stop_before_ray)
    with pytest.raises(Stop):
        study.run_study(loaded)
    assert verified == [True, False], "the second pair's dataset is the first one's: checksummed once"


@pytest.mark.parametrize("methods,seeds,needle", [
    ("  kd+std: {name: kd}\n", "[0]", "label 'kd+std' may hold only"),
    ("  kd: {name: kd, mixup_alpha: 0.2}\n", "[0]", "methods.kd on pair"),
    ("  kd: {temperature: 2}\n", "[0]", "methods.kd: expected {name: method"),
    ("  kd: {name: kd}\n", "[0, 0]", "seeds: expected a non-empty list of distinct integers"),
])
def test_bad_specs_name_the_key(tmp_path, tiny_overrides, methods, seeds, needle):
    with pytest.raises(study.StudyError, match="spec.yaml") as info:
        study.load_study(write_spec(tmp_path, methods, seeds), tiny_overrides)
    assert needle in str(info.value)


def test_the_table_gives_each_method_its_mean_and_std_over_seeds(tmp_path, tiny_overrides):
    loaded = study.load_study(write_spec(tmp_path), tiny_overrides)
    pair = study.pair_name(loaded["pairs"][0])
    rows = [{"pair": pair, "method": method, "seed": seed, "test_top1_selected": selected,
             "test_top1_last": selected - 1.0, "val_top1_selected": selected + 2.0, "ece_selected": ece}
            for method, seed, selected, ece in (("ce", 0, 60.0, 0.125), ("ce", 1, 64.0, 0.0625),
                                                ("kd", 0, 70.0, 0.03125), ("kd", 1, 71.0, 0.03125))]
    teacher = types.SimpleNamespace(spec={"name": "resnet8"}, accuracy=90.0)
    table = study.aggregate(loaded, rows, {loaded["pairs"][0]: teacher})
    by_method = {row["method"]: row for row in table}
    assert [row["method"] for row in table] == ["teacher resnet8", "ce", "kd"]
    assert by_method["ce"]["n"] == 2 and by_method["ce"]["selected"] == (62.0, pytest.approx(2 ** 1.5))
    assert by_method["kd"]["last"] == (69.5, pytest.approx(0.5 ** 0.5))
    assert by_method["kd"]["val"][0] == 72.5 and by_method["teacher resnet8"]["selected"] == (90.0, 0.0)
    text = study.format_table(table)
    assert by_method["ce"]["ece"] == (9.375, pytest.approx(4.419417, abs=1e-6))  # percent: mean of 12.5, 6.25
    assert f"| {pair} | kd | 2 | 70.50 ± 0.71 | 69.50 ± 0.71 | 72.50 ± 0.71 | 3.12 ± 0.00 |" in text


FEATURE_STUDY_METHODS = ("ce", "kd", "at", "fitnet", "crd")


@pytest.mark.slow
def test_study_runs_the_grid_writes_the_table_and_resumes(teacher_run, tiny_overrides, mlflow_uri, tmp_path,
                                                          monkeypatch):
    puts = []
    original = teachers.put
    monkeypatch.setattr(teachers, "put", lambda state: puts.append(1) or original(state))
    # The logit baselines and the feature methods (issue 22: a digits study with kd, fitnet, at and crd).
    methods = "".join(f"  {m}: {{name: {m}}}\n" for m in FEATURE_STUDY_METHODS)
    # One worker a trial: data-parallel feature methods have their own tests (test_pipeline), and a second
    # worker would cost each of the five trials a process.
    loaded = study.load_study(write_spec(tmp_path, methods=methods, seeds="[1]"), tiny_overrides + ["train.workers=1"])
    summary = study.run_study(loaded)
    assert len(puts) == 1, "the pair's teacher was put into the object store once"
    assert not summary["errors"] and len(summary["rows"]) == len(FEATURE_STUDY_METHODS)
    assert sorted((r["method"], r["seed"]) for r in summary["rows"]) == sorted((m, 1) for m in FEATURE_STUDY_METHODS)
    table = {row["method"]: row for row in summary["table"]}
    assert set(table) == {"teacher resnet8", *FEATURE_STUDY_METHODS} and table["kd"]["n"] == 1
    assert all(0 < r["test_top1_selected"] <= 100 for r in summary["rows"])
    kd_selected = [r["test_top1_selected"] for r in summary["rows"] if r["method"] == "kd"]
    assert table["kd"]["selected"][0] == pytest.approx(kd_selected[0])
    assert "| pair | kd | 1 |" in summary["text"]

    c = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    artifacts = {a.path for a in c.list_artifacts(summary["parent_run_id"])}
    assert {"study_table.md", "study_plot.png", "study_runs.csv", "study_summary.json"} <= artifacts
    children = c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id],
                             f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == len(FEATURE_STUDY_METHODS) and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["variant"] for r in children} == set(FEATURE_STUDY_METHODS)
    assert all(int(r.data.tags["val_rows"]) > 0 for r in children)

    again = study.run_study(loaded, name=summary["name"], resume=True)
    assert again["parent_run_id"] == summary["parent_run_id"]
    children = c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id],
                             f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == len(FEATURE_STUDY_METHODS), "no finished run ran again"
    assert sorted(r["test_top1_selected"] for r in again["rows"]) == sorted(
        r["test_top1_selected"] for r in summary["rows"])


# Tuning inside a study (``tune:``): the spec's checks, the choice on validation only, the stages.

def write_tuned_spec(folder: Path, section: str = "{samples: 2}", methods: str = "  ce: {name: ce}\n  kd: {name: kd}\n",
                     seeds: str = "[0, 1]") -> Path:
    spec = write_spec(folder, methods, seeds)
    spec.write_text(spec.read_text() + f"tune: {section}\n")
    return spec


def test_a_tuned_study_resolves_each_labels_space_and_budget(tmp_path, tiny_overrides):
    spec = write_tuned_spec(tmp_path, "{samples: 3, scheduler: asha, epochs: 8}")
    loaded = study.load_study(spec, tiny_overrides + ["optim.epochs=4", "optim.schedule=multistep",
                                                      "optim.milestones=[2]"])
    pair = str(tmp_path / "pair.yaml")
    assert (loaded["tune"]["samples"], loaded["tune"]["scheduler"]) == (3, "asha")
    spaces = loaded["tune"]["spaces"]
    assert Path(spaces["ce"]["file"]).name == "ce.yaml" and Path(spaces["kd"]["file"]).name == "kd.yaml"
    assert set(loaded["tune_configs"]) == {(pair, "ce"), (pair, "kd")}
    tuned, seeded = loaded["tune_configs"][(pair, "kd")], loaded["configs"][(pair, "kd", 1)]
    assert (tuned["optim"]["epochs"], tuned["optim"]["milestones"]) == (8, [4]), "the milestones move with the budget"
    assert (seeded["optim"]["epochs"], seeded["optim"]["milestones"]) == (4, [2])
    assert tuned["train"]["seed"] == 0 and tuned["data"]["val_fraction"] == 0.1
    assert loaded["tune_configs"][(pair, "ce")]["teacher"]["source"] is None
    assert study.tuning_epochs(loaded) == "8"


def test_each_tuning_trial_draws_from_its_own_labels_space_once(tmp_path, tiny_overrides):
    from ray.tune.search.variant_generator import generate_variants

    loaded = study.load_study(write_tuned_spec(tmp_path), tiny_overrides)
    samples = study.draw_samples(loaded)
    assert [s["cell"][1] for s in samples] == ["ce"] * 2 + ["kd"] * 2, "the same number of trials for every label"
    for s in samples:
        label, params = s["cell"][1], s["params"]
        assert 0.01 <= params["optim.lr"] <= (0.2 if label == "ce" else 0.1), "the label's own range"
        if label == "ce":
            assert set(params) == {"optim.lr", "optim.weight_decay"} and params["optim.weight_decay"] in (1e-4, 5e-4, 1e-3)
        else:
            assert "optim.weight_decay" not in params and 1.0 <= params["method.temperature"] <= 8.0
    assert study.draw_samples(loaded) == samples, "drawn the same way again"
    assert len({s["params"]["optim.lr"] for s in samples}) == 4, "each trial its own draw"
    # What Tune is given holds plain values only: nothing for it to draw again when it restores a trial.
    variants = [v["cell"] for _, v in generate_variants(study.tuning_space(samples))]
    assert variants == [[*s["cell"], i] for i, s in enumerate(samples)]
    json.dumps(samples)  # kept in the study's state file


def test_the_tuning_choice_reads_validation_only():
    class ValidationOnly(dict):
        def __getitem__(self, key):
            assert "test" not in key, f"the choice read {key}"
            return super().__getitem__(key)

        def get(self, key, default=None):
            assert "test" not in key, f"the choice read {key}"
            return super().get(key, default)

    def trial(label, trial_id, val, test, error=False):
        metrics = ValidationOnly({"selected/val_top1": val, "selected/test_top1": test, "test/top1": test,
                                  "trial_id": trial_id})
        return {"cell": ("pair", label), "params": {"optim.lr": val / 1000}, "metrics": metrics, "error": error}

    winners = study.choose_winners([
        trial("kd", "a", 80.0, 95.0),  # the best test, a worse validation
        trial("kd", "b", 90.0, 70.0),  # the best validation: wins
        trial("kd", "c", 99.0, 99.0, error=True),  # errored: left out
        trial("ce", "d", 60.0, 90.0), trial("ce", "e", 61.0, 50.0), trial("ce", "f", 61.0, 40.0),  # tie: earlier
    ])
    assert winners[("pair", "kd")] == {"pair": "pair", "method": "kd", "params": {"optim.lr": 0.09},
                                       "val_top1": 90.0, "trial_id": "b", "trials": 2}
    assert (winners[("pair", "ce")]["trial_id"], winners[("pair", "ce")]["trials"]) == ("e", 3)


def test_asha_in_a_study_compares_a_labels_trials_only_with_each_other():
    import types as _types

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    def asha():
        return ASHAScheduler(time_attr="epochs_done", metric="val/top1", mode="max", max_t=4, grace_period=1,
                             reduction_factor=2, brackets=1)

    scheduler = study.per_cell_scheduler({("p", "ce"): asha(), ("p", "kd"): asha()})
    assert scheduler.set_search_properties(None, None)
    ce, kd, kd2 = (_types.SimpleNamespace(trial_id=i, config={"cell": ["p", label]})
                   for i, label in (("1", "ce"), ("2", "kd"), ("3", "kd")))
    for t in (ce, kd, kd2):
        scheduler.on_trial_add(None, t)
    assert scheduler.on_trial_result(None, ce, {"epochs_done": 1, "val/top1": 90.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, kd, {"epochs_done": 1, "val/top1": 10.0}) == TrialScheduler.CONTINUE, \
        "a KD trial is not stopped for being worse than a CE trial"
    assert scheduler.on_trial_result(None, kd2, {"epochs_done": 1, "val/top1": 5.0}) == TrialScheduler.STOP


@pytest.mark.parametrize("section,methods,needle", [
    ("{samples: 0}", None, "tune.samples: trials per method label, an integer >= 1, got 0"),
    ("{samples: true}", None, "tune.samples"),
    ("{samples: 2, epochs: 0}", None, "tune.epochs"),
    ("{samples: 2, scheduler: hyperband}", None, "tune.scheduler: one of fifo, asha"),
    ("{samples: 2, trials: 3}", None, "tune: unknown key(s) ['trials']"),
    ("{samples: 2, spaces: {kd: no-such-space}}", None, "tune.spaces.kd: search space 'no-such-space' not found"),
    ("{samples: 2, spaces: {kd: stkd}}", None, "tune.spaces.kd: space"),
    ("{samples: 2, spaces: {stkd: stkd}}", None, "tune.spaces.stkd: not a label of methods"),
    ("{samples: 2}", "  kd: {name: kd, temperature: 3}\n", "searches method.temperature, which methods.kd fixes"),
    ("{samples: 2}", "  dkd: {name: mystery}\n", "tune.spaces.dkd (the default: method 'mystery'"),
    ("[2]", None, "tune: expected a mapping"),
])
def test_bad_tune_sections_name_the_key_before_anything_runs(tmp_path, tiny_overrides, section, methods, needle):
    spec = write_tuned_spec(tmp_path, section, **({"methods": methods} if methods else {}))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(study.StudyError, match="spec.yaml") as info:
        study.load_study(spec, tiny_overrides)
    assert needle in str(info.value)
    assert sorted(tmp_path.rglob("*")) == before, "nothing written"


def test_a_space_of_another_method_or_with_a_grid_is_refused(tmp_path, tiny_overrides):
    with pytest.raises(study.StudyError, match="trains method 'stkd', but label 'kd' is method 'kd'"):
        study.load_study(write_tuned_spec(tmp_path, "{samples: 2, spaces: {kd: stkd}}"), tiny_overrides)
    (tmp_path / "grid.yaml").write_text("method: kd\nparameters:\n"
                                        "  optim.lr: {distribution: grid, values: [0.01, 0.1]}\n")
    with pytest.raises(study.StudyError, match=r"tune\.spaces\.kd: optim\.lr: a grid multiplies"):
        study.load_study(write_tuned_spec(tmp_path, f"{{samples: 2, spaces: {{kd: {tmp_path / 'grid.yaml'}}}}}"),
                         tiny_overrides)


@pytest.mark.slow
def test_a_tuned_study_tunes_each_label_then_runs_its_seeds_with_the_winner(teacher_run, tiny_overrides, mlflow_uri,
                                                                            tmp_path, monkeypatch):
    from pipeline import storage
    from pipeline.sweep import trials

    loaded = study.load_study(write_tuned_spec(tmp_path), tiny_overrides + ["train.workers=1"])
    name = trials.new_sweep_name("study-tuned")

    class Interrupted(Exception):
        pass

    def interrupt(*args, **kwargs):
        raise Interrupted

    run_seeds = study.run_seeds
    monkeypatch.setattr(study, "run_seeds", interrupt)  # the study stops between its stages
    with pytest.raises(Interrupted):
        study.run_study(loaded, name=name)

    c = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    experiment = c.get_experiment_by_name("stkd-tests").experiment_id
    storage_path = loaded["configs"][next(iter(loaded["configs"]))]["train"]["storage_path"]
    parent = json.loads(storage.read_text(f"{storage_path}/{name}/{trials.SWEEP_FILE}"))["parent_run_id"]

    def children(stage):
        return c.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}' and tags.stage = '{stage}'")

    tuned = children("tune")
    assert sorted(r.data.tags["variant"] for r in tuned) == ["ce", "ce", "kd", "kd"]
    assert all(r.info.status == "FINISHED" for r in tuned) and not children("seeds")

    monkeypatch.setattr(study, "run_seeds", run_seeds)
    monkeypatch.setattr(study, "run_tuning", lambda *args, **kwargs: pytest.fail("the tuning stage ran again"))
    summary = study.run_study(loaded, name=name, resume=True)
    assert summary["parent_run_id"] == parent and not summary["errors"]
    assert len(children("tune")) == 4, "no tuning trial ran again"
    seeded = children("seeds")
    assert sorted((r.data.tags["variant"], r.data.params["train.seed"]) for r in seeded) == [
        ("ce", "0"), ("ce", "1"), ("kd", "0"), ("kd", "1")]
    assert all(r.info.status == "FINISHED" for r in seeded)
    assert max(r.info.end_time for r in tuned) <= min(r.info.start_time for r in seeded), "tuning, then the seeds"

    winners = {w["method"]: w for w in summary["tuning"]}
    for label, keys in (("ce", ["optim.lr", "optim.weight_decay"]),
                        ("kd", ["method.temperature", "method.ce_weight", "method.kd_weight", "optim.lr"])):
        trials = [r for r in tuned if r.data.tags["variant"] == label]
        best_val = max(r.data.metrics["final/val_top1_selected"] for r in trials)
        best = next(r for r in trials if r.data.tags["trial_id"] == winners[label]["trial_id"])
        assert best.data.metrics["final/val_top1_selected"] == pytest.approx(best_val)
        assert winners[label]["val_top1"] == pytest.approx(best_val) and winners[label]["trials"] == 2
        chosen = {k: best.data.params[k] for k in keys}
        assert {k: str(v) for k, v in winners[label]["params"].items()} == chosen
        for run in (r for r in seeded if r.data.tags["variant"] == label):
            assert {k: run.data.params[k] for k in keys} == chosen, f"{label}'s seed runs carry its winner"
    assert "Tuning budget: 2 trials x 1 epoch(s) per method (fifo)" in summary["text"]
    assert f"| pair | kd | kd | 2 | {winners['kd']['val_top1']:.2f} |" in summary["text"]
    assert c.get_run(parent).data.tags["tuned.pair/ce.optim.lr"] == str(winners["ce"]["params"]["optim.lr"])


@pytest.mark.parametrize("spec", sorted(p.stem for p in study.STUDIES_DIR.glob("*.yaml")))
def test_shipped_studies_load(spec, tiny_overrides):
    loaded = study.load_study(spec, [o for o in tiny_overrides if o.startswith("train.")])
    assert loaded["configs"] and (loaded["tune"] is None or set(loaded["tune_configs"]) == {
        (pair, label) for pair in loaded["pairs"] for label in loaded["methods"]})
