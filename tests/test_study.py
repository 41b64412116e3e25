"""`stkd study` on digits: two methods as parallel runs, the table, one teacher object, resume; the table's
mean and std over seeds."""

from __future__ import annotations

import types
from pathlib import Path

import mlflow
import pytest

from pipeline import study, teacher_store


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
             "test_top1_last": selected - 1.0, "val_top1_selected": selected + 2.0}
            for method, seed, selected in (("ce", 0, 60.0), ("ce", 1, 64.0), ("kd", 0, 70.0), ("kd", 1, 71.0))]
    teacher = types.SimpleNamespace(spec={"name": "resnet8"}, accuracy=90.0)
    table = study.aggregate(loaded, rows, {loaded["pairs"][0]: teacher})
    by_method = {row["method"]: row for row in table}
    assert [row["method"] for row in table] == ["teacher resnet8", "ce", "kd"]
    assert by_method["ce"]["n"] == 2 and by_method["ce"]["selected"] == (62.0, pytest.approx(2 ** 1.5))
    assert by_method["kd"]["last"] == (69.5, pytest.approx(0.5 ** 0.5))
    assert by_method["kd"]["val"][0] == 72.5 and by_method["teacher resnet8"]["selected"] == (90.0, 0.0)
    text = study.format_table(table)
    assert f"| {pair} | kd | 2 | 70.50 ± 0.71 | 69.50 ± 0.71 | 72.50 ± 0.71 |" in text


@pytest.mark.slow
def test_study_runs_the_grid_writes_the_table_and_resumes(teacher_run, tiny_overrides, mlflow_uri, tmp_path,
                                                          monkeypatch):
    puts = []
    original = teacher_store.put
    monkeypatch.setattr(teacher_store, "put", lambda state: puts.append(1) or original(state))
    loaded = study.load_study(write_spec(tmp_path, seeds="[1]"), tiny_overrides)
    summary = study.run_study(loaded)
    assert len(puts) == 1, "the pair's teacher was put into the object store once"
    assert not summary["errors"] and len(summary["rows"]) == 2
    assert sorted((r["method"], r["seed"]) for r in summary["rows"]) == [("ce", 1), ("kd", 1)]
    table = {row["method"]: row for row in summary["table"]}
    assert set(table) == {"teacher resnet8", "ce", "kd"} and table["kd"]["n"] == 1
    kd_selected = [r["test_top1_selected"] for r in summary["rows"] if r["method"] == "kd"]
    assert table["kd"]["selected"][0] == pytest.approx(kd_selected[0])
    assert "| pair | kd | 1 |" in summary["text"]

    c = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    artifacts = {a.path for a in c.list_artifacts(summary["parent_run_id"])}
    assert {"study_table.md", "study_plot.png", "study_runs.csv", "study_summary.json"} <= artifacts
    children = c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id],
                             f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["variant"] for r in children} == {"ce", "kd"}
    assert all(int(r.data.tags["val_rows"]) > 0 for r in children)

    again = study.run_study(loaded, name=summary["name"], resume=True)
    assert again["parent_run_id"] == summary["parent_run_id"]
    children = c.search_runs([c.get_experiment_by_name("stkd-tests").experiment_id],
                             f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 2, "no finished run ran again"
    assert sorted(r["test_top1_selected"] for r in again["rows"]) == sorted(
        r["test_top1_selected"] for r in summary["rows"])
