"""The analysis suite and the report: every pair of models, attention where it exists, one HTML file."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitlab import VitlabError
from vitlab.analysis.cka import MinibatchCKA
from vitlab.analysis.subjects import subject_from_name
from vitlab.analysis.suite import run_analyses
from vitlab.capture import Capture
from vitlab.report.html import ReportMeta, write_report


@pytest.fixture(scope="module")
def subjects():
    torch.manual_seed(0)
    return [subject_from_name("vit_nano_patch4_32", depth=3), subject_from_name("resnet20_cifar")]


@pytest.fixture(scope="module")
def loader():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(images, torch.zeros(48, dtype=torch.long)), batch_size=16)


def test_suite_gives_every_pair_and_notes(subjects, loader):
    out = run_analyses(subjects, loader, progress=False)
    vit, cnn = (s.name for s in subjects)
    cka, distance = out.results["cka"], out.results["attention_distance"]
    assert set(cka) == {f"{vit} vs {vit}", f"{vit} vs {cnn}", f"{cnn} vs {cnn}"}
    self_vit = cka[f"{vit} vs {vit}"].matrix
    np.testing.assert_allclose(np.diag(self_vit), 1.0, atol=1e-12)
    np.testing.assert_allclose(self_vit, self_vit.T, atol=1e-12)
    cross = cka[f"{vit} vs {cnn}"]
    assert cross.matrix.shape == (4, 10) and cross.layers_a[0] == "embed" and cross.layers_b[0] == "stem"
    assert list(distance) == [vit]
    assert distance[vit].distances.shape == (3, 4)
    assert any(cnn in note and "no attention" in note for note in out.notes)
    assert out.num_images == 48


def test_suite_cross_cka_equals_a_separate_two_model_accumulator(subjects, loader):
    """The one big accumulator over all models gives what a plain pairwise accumulator gives."""
    out = run_analyses(subjects, loader, analyses=["cka"], progress=False)
    a, b = subjects
    acc = MinibatchCKA(a.anatomy.layer_names, b.anatomy.layer_names)
    with Capture(a.model, a.anatomy.layer_names, lambda n, t: acc.add(0, n, t)), \
         Capture(b.model, b.anatomy.layer_names, lambda n, t: acc.add(1, n, t)), torch.no_grad():
        for images, _ in loader:
            a.model(a.prepare(images))
            b.model(b.prepare(images))
            acc.end_batch()
    np.testing.assert_allclose(out.results["cka"][f"{a.name} vs {b.name}"].matrix, acc.compute().numpy(), atol=1e-10)
    assert out.results.get("attention_distance", {}) == {}


def test_subject_prepare_resizes_and_normalises():
    s = subject_from_name("vit_tiny_patch16_224")
    x = s.prepare(torch.full((1, 3, 32, 32), 0.5))
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x, torch.zeros_like(x))  # (0.5 - mean 0.5) / std 0.5


def test_unknown_analysis_is_refused(subjects, loader):
    with pytest.raises(VitlabError, match=r"unknown analysis 'ckaa'.*cka"):
        run_analyses(subjects, loader, analyses=["ckaa"], progress=False)


def test_report_files(subjects, loader, tmp_path):
    out = run_analyses(subjects, loader, progress=False)
    report = write_report(tmp_path, subjects, out, ReportMeta(title="test <report>", data="random"))
    html = report.read_text()
    assert html.startswith("<!doctype html>") and "test &lt;report&gt;" in html
    # CKA within models, CKA across models, attention distance: each an embedded PNG with a caption
    assert html.count('<img src="data:image/png;base64,') == 3
    assert html.count("<figcaption>") == 3
    assert "no attention" in html
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cka"]) == set(out.results["cka"])
    entry = results["cka"][f"{subjects[0].name} vs {subjects[1].name}"]
    assert np.array(entry["matrix"]).shape == (4, 10) and entry["layers_b"][0] == "stem"
    assert results["models"][0]["params"] == subjects[0].params
    assert len(results["attention_distance"][subjects[0].name]["distances"]) == 3


def test_every_analysis_runs_and_reaches_the_report(subjects, tmp_path):
    from vitlab.analysis.catalog import ANALYSES, BY_NAME
    from vitlab.analysis.suite import analysis_options

    g = torch.Generator().manual_seed(1)
    labelled = DataLoader(TensorDataset(torch.rand(32, 3, 32, 32, generator=g),
                                        torch.randint(0, 10, (32,), generator=g)),
                          batch_size=16)
    options = analysis_options(probe_images=32, robustness_images=16, erf_images=16, featvis_steps=3, featvis_layers=1,
                              featvis_units=2, shuffle_grids=(1, 4))
    out = run_analyses(subjects, labelled, ANALYSES, progress=False, options=options, train_loader=lambda: labelled)
    vit, cnn = (s.name for s in subjects)
    per_model = {name: set(results) for name, results in out.results.items()}
    assert per_model["attention_heads"] == {vit} and per_model["localisation"] == {vit}
    assert per_model["feature_visualisation"] == {vit} and per_model["conv_attention"] == {cnn}
    for name in ("skip_connections", "probes", "robustness", "erf"):
        assert per_model[name] == {vit, cnn}, name
    assert "shape_bias" not in out.results and "feature_reuse" not in out.results
    notes = " ".join(out.notes)
    for expected in ("shape bias: not applicable", "feature reuse: no run", "salient PatchDrop skipped for resnet20",
                     "localisation: not applicable to resnet20", "feature visualisation: not applicable to resnet20"):
        assert expected in notes
    assert set(out.results["robustness"][cnn].curves) == {"random", "shuffle"}
    assert set(out.results["robustness"][vit].curves) == {"random", "salient", "non_salient", "shuffle"}

    report = write_report(tmp_path, subjects, out, ReportMeta(title="all analyses", data="random"))
    html = report.read_text()
    for name in out.results:
        title = (BY_NAME[name].figures[0].title or BY_NAME[name].title).format(key=vit)
        assert f"<h2>{title}</h2>" in html
    # CKA within, across, attention distance, then one each
    assert html.count("<figure>") == 3 + len(set(out.results) - {"cka", "attention_distance"})
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(out.results) <= set(results)
    assert results["probes"][vit]["best"]["knn"]["layer"] in results["probes"][vit]["layers"]
    assert results["conv_attention"][cnn]["max_abs_error"] < 1e-5


def test_analyses_on_stock_timm_models():
    # timm's own ViT and Mixer classes, built by timm (not vitlab's registry), untrained, offline
    subjects = [subject_from_name("deit_tiny_patch16_224", depth=3), subject_from_name("mixer_s16_224")]
    g = torch.Generator().manual_seed(2)
    loader = DataLoader(TensorDataset(torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)),
                        batch_size=8)
    out = run_analyses(subjects, loader, ["attention_heads", "skip_connections", "localisation"], progress=False)
    heads = out.results["attention_heads"]["deit_tiny_patch16_224"]
    assert heads.layers == ["block1", "block2", "block3"] and heads.aligned[0].shape == (3, 27, 27)
    assert set(out.results["skip_connections"]) == {"deit_tiny_patch16_224", "mixer_s16_224"}
    assert out.results["localisation"]["mixer_s16_224"].matrix.shape == (196, 196)
