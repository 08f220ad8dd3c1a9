"""The spatial entropy regulariser: constructed maps, its schedule, and training with it."""

import math

import pytest
import torch

from vitlab import VitlabError, create_model
from vitlab.models.layers import remove_last_attention_skip
from vitlab.train import DataConfig, TrainConfig, train
from vitlab.train.spatial_entropy import SpatialEntropyProbe, entropy_weight, spatial_entropy


def logits_from(map2d: torch.Tensor) -> torch.Tensor:
    return map2d.reshape(1, 1, -1)


def test_one_blob_has_zero_entropy_and_k_equal_blobs_log_k():
    concentrated = torch.zeros(8, 8)
    concentrated[2:4, 2:5] = 5.0  # one 8-connected blob
    scattered = torch.zeros(8, 8)
    for r, c in ((0, 0), (0, 4), (4, 0), (4, 4)):  # four separate single patches, equal mass
        scattered[r, c] = 5.0
    se_one = spatial_entropy(logits_from(concentrated), (8, 8)).item()
    se_four = spatial_entropy(logits_from(scattered), (8, 8)).item()
    assert se_one == pytest.approx(0.0, abs=1e-6)
    assert se_four == pytest.approx(math.log(4), rel=1e-4)
    assert se_one < se_four


def test_diagonal_neighbours_are_one_component():
    diagonal = torch.zeros(6, 6)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[3, 3] = 4.0  # 8-connected, not 4-connected
    assert spatial_entropy(logits_from(diagonal), (6, 6)).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_through_the_logits_only():
    two_blobs = torch.zeros(4, 4)
    two_blobs[0, 0], two_blobs[3, 3] = 3.0, 1.0  # two components of unequal mass (one alone has zero gradient)
    logits = two_blobs.reshape(1, 1, 16).repeat(2, 3, 1).requires_grad_()
    spatial_entropy(logits, (4, 4)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_probe_reads_the_class_token_row_of_the_last_layer():
    model = create_model("vit_nano_patch4_32", depth=2).eval()
    with SpatialEntropyProbe(model) as probe:
        model(torch.randn(2, 3, 32, 32))
        se = probe.loss()
    assert se.requires_grad and 0 <= se.item() <= math.log(64)
    assert model.blocks[1].attn.fused_attn == create_model("vit_nano_patch4_32", depth=2).blocks[1].attn.fused_attn


def test_schedule_warms_up_then_decays_to_zero():
    weights = [entropy_weight(s, 100, 10, 0.01) for s in range(100)]
    assert weights[9] == pytest.approx(0.01) and weights[0] == pytest.approx(0.001)
    assert max(weights) == pytest.approx(0.01) and weights[-1] < 1e-5
    assert all(a >= b for a, b in zip(weights[9:], weights[10:]))


def test_a_model_without_attention_is_one_line():
    with pytest.raises(VitlabError,
                       match="spatial entropy needs attention over a token grid, and resnet20_cifar has none"):
        SpatialEntropyProbe(create_model("resnet20_cifar"), "resnet20_cifar")


def test_the_variant_without_the_last_skip():
    model = create_model("vit_nano_patch4_32", depth=2)
    remove_last_attention_skip(model)
    x = torch.randn(1, 65, model.embed_dim)
    block = model.blocks[-1]
    expected = block.attn(block.norm1(x))
    assert torch.allclose(block(x), expected + block.mlp(expected))
    with pytest.raises(VitlabError, match="needs timm transformer blocks"):
        remove_last_attention_skip(create_model("resnet20_cifar"))


def test_descending_the_regulariser_makes_attention_compact():
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", depth=2)
    images = torch.randn(8, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with SpatialEntropyProbe(model) as probe:
        model(images)
        start = probe.loss()
        for _ in range(30):  # 15 steps ended just short of half on one CPU (0.243 from 0.472): keep a margin
            model(images)
            loss = probe.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model(images)
        end = probe.loss()
    assert end.item() < 0.5 * start.item()


def test_training_with_the_regulariser(tmp_path):
    base = dict(model="vit_nano_patch4_32", epochs=2, batch_size=32, lr=1e-3, warmup_epochs=0.5,
                model_args={"depth": 2}, spatial_entropy_warmup=0.5, data=DataConfig(num_train=64, num_val=32))
    plain = train(TrainConfig.from_dict(dict(**base)), tmp_path / "plain", progress=False)
    regularised = train(TrainConfig.from_dict(dict(**base, spatial_entropy=0.01)), tmp_path / "se", progress=False)
    assert "spatial_entropy" in regularised.metrics[-1] and "spatial_entropy" not in plain.metrics[-1]
    assert not torch.equal(plain.model.blocks[1].attn.qkv.weight, regularised.model.blocks[1].attn.qkv.weight)
    variant = train(TrainConfig.from_dict(dict(**base, spatial_entropy=0.01, last_attention_skip=False)),
                    tmp_path / "variant", progress=False)
    from vitlab.analysis.subjects import subject_from_run

    assert subject_from_run(variant.run_dir).model.blocks[-1].norm2.__class__.__name__ == "Identity"
