"""Runs trained with different supervision, compared in one report (Walmer et al.)."""

import json

import numpy as np
import pytest

from vitlab import VitlabError
from vitlab.analysis.supervision import compare_supervision, is_self_supervised, supervision_of
from vitlab.cli import main
from vitlab.compare import compare
from vitlab.train import DataConfig, TrainConfig, train

DATA = DataConfig(num_train=128, num_val=64, augment="none")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervision")
    common = dict(model="vit_nano_patch8_sincos_32", epochs=1, batch_size=32, data=DATA)
    labels = train(TrainConfig.from_dict(dict(**common)), root / "labels", progress=False).run_dir
    mp3 = train(TrainConfig.from_dict(dict(objective="mp3", **common)), root / "mp3", progress=False).run_dir
    tuned = train(TrainConfig.from_dict(dict(finetune_from=str(mp3), finetune_mode="linear", **common)), root / "probe",
                  progress=False).run_dir
    return labels, mp3, tuned


def test_each_run_names_its_supervision(runs):
    labels, mp3, tuned = runs
    assert supervision_of(labels) == "supervised"
    assert supervision_of(mp3) == "MP3 (position prediction)"
    assert supervision_of(tuned) == "MP3 (position prediction), then linear probe"
    assert [is_self_supervised(r) for r in runs] == [False, True, False]


def test_compare_runs_reports_what_supervision_changes(runs, tmp_path):
    labels, mp3, _ = runs
    result = compare(runs=[labels, mp3], data=DATA, out=tmp_path / "c", analyses=["probes", "attention_distance",
                     "robustness"], analysis_images=64, analysis_batch_size=32, progress=False)
    assert [s.name for s in result.subjects] == ["labels", "mp3"]  # nothing trained again
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    sup = saved["supervision"]["runs"]
    assert sup["supervision"] == {"labels": "supervised", "mp3": "MP3 (position prediction)"}
    probe = result.analysis.results["probes"]["mp3"].accuracy["knn"]
    assert sup["knn"]["mp3"]["accuracy"] == pytest.approx(list(probe))
    distance = result.analysis.results["attention_distance"]["labels"].distances.mean(axis=1)
    assert sup["attention_distance_px"]["labels"]["mean"] == pytest.approx(list(distance))
    assert sup["knn"]["labels"]["relative_depth"][0] == 0 and sup["knn"]["labels"]["relative_depth"][-1] == 1
    html = (tmp_path / "c" / "report.html").read_text()
    assert "What supervision changes" in html and "best k-NN features" in html
    assert [r["supervision"] for r in saved["models"]] == ["supervised", "MP3 (position prediction)"]
    # The self-supervised run's classifier never saw a label: its robustness is flagged, not trusted.
    assert any(n.startswith("mp3 is self-supervised") and "robustness" in n for n in saved["notes"])


def test_one_kind_of_supervision_has_no_comparison(runs):
    # the suite's results are not consulted when nothing differs
    assert compare_supervision({"a": "supervised", "b": "supervised"}, {}) is None


def test_best_knn_layer_is_the_argmax():
    from vitlab.analysis.supervision import SupervisionComparison

    c = SupervisionComparison(["a"], {"a": "MAE (masked reconstruction)"},
                              knn={"a": (np.linspace(0, 1, 4), np.array([0.2, 0.6, 0.4, np.nan]))})
    assert c.best_knn() == {"a": (pytest.approx(1 / 3), 0.6)}
    assert "33% of its depth" in c.summary()


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vitlab: error: '{tmp_path / 'empty'}' is not a run directory (no config.yaml); pass "
                   "directories that vitlab train, pretrain or finetune wrote"]
    with pytest.raises(VitlabError, match="not a run directory"):
        compare(runs=[tmp_path / "empty"], out=tmp_path / "d", progress=False)
