"""Every registered vitlab model works with anatomy, capture and the analysis suite unchanged."""

import numpy as np
import pytest
import timm
import torch

from vitlab import create_model, list_models
from vitlab.analysis.subjects import subject_from_name
from vitlab.analysis.suite import run_analyses
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store


def _size_override(name):
    return {} if timm.models.get_pretrained_cfg(name).input_size[-1] == 32 else {"img_size": 32}


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list_models())
def test_anatomy_and_capture_on_every_model(name):
    torch.manual_seed(0)
    model = create_model(name, **_size_override(name)).eval()
    a = anatomy(model)
    assert a.layers and len(set(a.layer_labels)) == len(a.layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    hooks = _hook_count(model)
    layers, attn = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention, attn):
        with torch.no_grad():
            logits = model(x)
    assert _hook_count(model) == hooks  # every hook removed on exit
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)  # capturing changes nothing
    assert set(layers.keys()) == set(a.layer_names)
    assert all(layers[n].shape[0] == 2 for n in a.layer_names)
    assert set(attn.keys()) == set(a.attention_names)
    for site in a.attention:
        probs, tokens = attn[site.name], site.prefix_tokens + site.grid[0] * site.grid[1]
        assert probs.shape == (2, site.num_heads, tokens, tokens), site.name
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-4, rtol=1e-4)


# One model of each family added after the foundation, through the same streamed pass as `compare`.
FAMILIES = ["cct_2_3x2_32", "vit_lite_7_patch4_32", "cvt_13_32", "t2t_vit_7_32", "levit_128s_32",
            "dhvt_tiny_patch4_32", "qna_vit_tiny_32", "early_exit_vit_nano_patch4_32"]


def test_cka_and_attention_distance_run_on_every_family():
    torch.manual_seed(0)
    subjects = [subject_from_name(name) for name in FAMILIES]
    images = torch.rand(3, 16, 3, 32, 32)
    results = run_analyses(subjects, list(images), progress=False)
    assert results.num_images == 48
    assert len(results.results["cka"]) == len(FAMILIES) * (len(FAMILIES) + 1) // 2
    for s in subjects:
        self_cka = results.results["cka"][f"{s.name} vs {s.name}"].matrix
        assert self_cka.shape == (len(s.anatomy.layers),) * 2
        np.testing.assert_allclose(np.diag(self_cka), 1.0, atol=1e-4)
    for result in results.results["cka"].values():
        assert np.isfinite(result.matrix).all()
    with_attention = {s.name for s in subjects if s.anatomy.has_attention}
    assert with_attention == set(FAMILIES) - {"cvt_13_32"}  # CvT's keys sit on a coarser grid than its queries
    assert set(results.results["attention_distance"]) == with_attention
    for name in with_attention:
        distances = results.results["attention_distance"][name].distances
        assert distances.shape[0] >= 1 and np.isfinite(distances[:, 0]).all() and (distances[:, 0] >= 0).all()
    assert any("cvt_13_32" in note for note in results.notes)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 24x24 PNGs (resized to the models' 32x32 by the data pipeline)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("circle", "square"):
        (root / c).mkdir()
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("name", FAMILIES)
def test_vitlab_train_on_an_image_folder(name, image_folder, tmp_path, capsys):
    from vitlab.analysis.subjects import subject_from_run
    from vitlab.cli import main

    out_dir = tmp_path / "run"
    code = main(["train", "--model", name, "--data", f"imagefolder:{image_folder}", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "8", "--out", str(out_dir)])
    assert code == 0, capsys.readouterr().err
    subject = subject_from_run(out_dir)  # the run directory rebuilds the trained model
    assert subject.model.num_classes == 2 and len(subject.metrics) == 1
    assert 0.0 <= subject.val_acc <= 1.0
