"""Copycat fine-tuning of exit branches and the accuracy-against-compute curve."""

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from vitlab import VitlabError
from vitlab.analysis.early_exits import exit_curve
from vitlab.analysis.subjects import subject_from_name, subject_from_run
from vitlab.analysis.suite import run_analyses
from vitlab.train import DataConfig, TrainConfig, train

MODEL = "early_exit_vit_nano_patch4_32"


def config(**overrides) -> TrainConfig:
    values = dict(model=MODEL, epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.2,
                  data=DataConfig(num_train=256, num_val=64))
    values.update(overrides)
    return TrainConfig.from_dict(dict(**values))


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    return train(config(), tmp_path_factory.mktemp("joint") / "run", progress=False)


def test_copycat_trains_the_branches_only_and_they_learn_the_final_head(joint, tmp_path):
    weights = str(joint.run_dir / "model.safetensors")
    copycat = train(config(exit_training="copycat", init_weights=weights, epochs=3), tmp_path / "copycat",
                    progress=False)
    before, after = load_file(weights), load_file(str(copycat.run_dir / "model.safetensors"))
    backbone = [k for k in before if k.startswith("backbone.")]
    branches = [k for k in before if k.startswith("branches.")]
    assert backbone and branches
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # BatchNorm-free ViT: exactly unchanged
    assert any(not torch.equal(before[k], after[k]) for k in branches)
    losses = [m["train_loss"] for m in copycat.metrics]  # the copycat loss: branches against the final head
    assert losses[-1] < losses[0]


def test_copycat_needs_exit_branches(tmp_path):
    with pytest.raises(VitlabError, match="--exit-training copycat trains exit branches, and resnet20_cifar has none"):
        train(config(model="resnet20_cifar", exit_training="copycat"), tmp_path / "run", progress=False)


def images(n=64):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=32)


def test_curve_spans_early_exit_to_full_backbone(joint):
    subject = subject_from_run(joint.run_dir)
    curve = exit_curve(subject, images(), thresholds=(0.0, 0.5, 1.01))
    assert curve.num_images == 64
    assert curve.relative_compute[-1] == pytest.approx(1.0)  # never exiting early: one backbone pass
    assert curve.relative_compute[0] < curve.relative_compute[-1]  # threshold 0: everyone leaves at exit 1
    assert curve.exit_shares[0][0] == pytest.approx(1.0) and curve.exit_shares[-1][-1] == pytest.approx(1.0)
    assert all(0 <= a <= 1 for a in curve.accuracy)


def test_early_exits_in_the_suite_and_report(joint, tmp_path):
    from vitlab.report.html import ReportMeta, write_report

    subjects = [subject_from_run(joint.run_dir, name="exits"), subject_from_name("resnet20_cifar")]
    results = run_analyses(subjects, images(), ["early_exits"], progress=False)
    assert list(results.results["early_exits"]) == ["exits"]
    assert any("early exits: not applicable to resnet20_cifar" in note for note in results.notes)
    report = write_report(tmp_path, subjects, results, ReportMeta(title="t", data="shapes"))
    assert "Early exits: accuracy against compute" in report.read_text()
