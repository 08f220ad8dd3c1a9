"""Early-exit models: exits on ViT, Mixer and ResNet backbones, thresholded inference, compute saved."""

import pytest
import torch
import torch.nn.functional as F

import vitlab
import vitlab.models.early_exit  # noqa: F401  (registers the models)
from vitlab import VitlabError
from vitlab.analysis.early_exits import exit_costs, predict
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.models.early_exit import EarlyExitModel

# name: (backbone overrides that keep the test fast, default exits, parameters at 10 classes)
CASES = {
    "early_exit_vit_nano_patch4_32": (dict(depth=3), ["blocks.0", "blocks.1"], 1_045_116),
    "early_exit_mixer_nano_patch4_32": (dict(num_blocks=3), ["blocks.0", "blocks.1"], 1_084_732),
    "early_exit_resnet20_cifar": ({}, ["layer1.2", "layer2.2"], 371_374),
}
BACKBONES = {"early_exit_vit_nano_patch4_32": "vit_nano_patch4_32",
             "early_exit_mixer_nano_patch4_32": "mixer_nano_patch4_32",
             "early_exit_resnet20_cifar": "resnet20_cifar"}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: vitlab.create_model(name, num_classes=3, **args).eval() for name, (args, _, _) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_count_is_backbone_plus_branches(name):
    # No reference count exists (vitlab's design); pinned so the branch design does not drift.
    total = vitlab.count_parameters(name)
    assert total == CASES[name][2]
    assert vitlab.count_parameters(BACKBONES[name]) < total


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_exit_and_the_final_head(models, name):
    model, exits = models[name], CASES[name][1]
    assert model.exit_names == exits and model.num_exits == len(exits)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    try:
        outputs = model(x)
        assert isinstance(outputs, list) and len(outputs) == len(exits) + 1
        assert all(o.shape == (2, 3) for o in outputs)
        sum(F.cross_entropy(o, torch.tensor([0, 2])) for o in outputs).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    with torch.no_grad():
        final = model(x)  # eval mode: the final head's logits only, a tensor
        exit_logits, final_again = model.forward_exits(x)
        torch.testing.assert_close(final, model.backbone(x))
    torch.testing.assert_close(final_again, final)
    assert len(exit_logits) == len(exits)


def test_exits_by_label_path_or_index_sorted_by_depth():
    net = vitlab.create_model("resnet20_cifar")
    model = EarlyExitModel(net, exits=["backbone.layer2", "1.2", 1], img_size=32)
    assert model.exit_names == ["layer1.0", "layer1.1", "layer2"]
    assert model.exit_labels == ["1.1", "1.2", "layer2"]
    with pytest.raises(VitlabError, match="no layer 'layer9'"):
        EarlyExitModel(net, exits=["layer9"], img_size=32)


def test_threshold_zero_exits_everything_at_the_first_branch(models):
    model = models["early_exit_vit_nano_patch4_32"]
    costs = exit_costs(model)  # measured once, on one image, before any predict
    seen = []
    hook = model.backbone.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        result = predict(model, torch.randn(5, 3, 32, 32), threshold=0.0, costs=costs)
    finally:
        hook.remove()
    assert seen == []  # the backbone stopped after block 1: nothing left to run
    assert result.exit_index.tolist() == [0] * 5
    assert result.macs.tolist() == [costs.backbone_macs[0] + costs.branch_macs[0]] * 5
    assert result.compute_saved == pytest.approx(1 - result.macs[0].item() / costs.full_macs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_threshold_above_one_never_exits(models, name):
    model = models[name]
    x = torch.randn(4, 3, 32, 32)
    result = predict(model, x, threshold=1.01)
    assert result.exit_index.tolist() == [model.num_exits] * 4
    assert result.compute_saved == 0.0
    with torch.no_grad():
        final = model(x)
    torch.testing.assert_close(result.logits, final)
    assert torch.equal(result.predictions, final.argmax(-1))


def test_predict_matches_per_sample_exits_and_shrinks_the_batch(models):
    model = models["early_exit_vit_nano_patch4_32"]
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        exit_logits, final = model.forward_exits(x)
    outputs = [*exit_logits, final]
    confidence = torch.stack([o.softmax(-1).amax(-1) for o in exit_logits])  # (exits, samples)
    threshold = confidence.median().item()
    # reference: per sample, the first branch confident enough, else the final head
    passes = torch.cat([confidence >= threshold, torch.ones(1, 16, dtype=torch.bool)])
    expected_exit = passes.int().argmax(0)
    assert 0 < (expected_exit == 0).sum() < 16  # the threshold splits the batch

    seen = {}
    def count(i):
        def hook(module, inputs, output):
            seen[i] = output.shape[0]
        return hook

    costs = exit_costs(model)  # measured on one image before the hooks count anything
    hooks = [model.backbone.blocks[i].register_forward_hook(count(i)) for i in range(3)]
    try:
        result = predict(model, x, threshold, costs)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(result.exit_index, expected_exit)
    expected_logits = torch.stack([outputs[e][s] for s, e in enumerate(expected_exit.tolist())])
    torch.testing.assert_close(result.logits, expected_logits, atol=1e-5, rtol=1e-5)
    # later blocks really ran only on the samples still in the batch
    assert [seen.get(i, 0) for i in range(3)] == [int((expected_exit >= i).sum()) for i in range(3)]


def test_compute_saved_falls_as_the_threshold_rises(models):
    model = models["early_exit_resnet20_cifar"]
    torch.manual_seed(2)
    x = torch.randn(16, 3, 32, 32)
    results = [predict(model, x, t) for t in torch.linspace(0, 1, 11).tolist()]
    saved = [r.compute_saved for r in results]
    assert all(a >= b for a, b in zip(saved, saved[1:]))
    assert saved[0] > 0.5 > saved[-1]  # everything at exit 1 vs (almost) everything at the end
    exits = torch.stack([r.exit_index for r in results])
    assert (exits[1:] >= exits[:-1]).all()  # no sample ever leaves earlier at a higher threshold


def test_macs_count_attention_even_when_fused(models):
    model = models["early_exit_vit_nano_patch4_32"]
    fused = exit_costs(model)
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert all(m.fused_attn for m in attentions)
    try:
        for m in attentions:
            m.fused_attn = False  # the explicit path: q k^T and attn v are plain matmuls
        explicit = exit_costs(model)
    finally:
        for m in attentions:
            m.fused_attn = True
    assert fused == explicit
    assert fused.backbone_macs == sorted(fused.backbone_macs) and fused.backbone_macs[-1] < fused.full_macs


def test_anatomy_and_capture_see_the_backbone(models):
    model = models["early_exit_vit_nano_patch4_32"]
    a = anatomy(model)
    assert a.layer_names == ["backbone.norm_pre", "backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2"]
    assert a.attention_names == [f"backbone.blocks.{i}.attn" for i in range(3)]
    assert (a.grid, a.prefix_tokens, a.patch_size, a.image_size) == ((8, 8), 1, (4, 4), (32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    layers, attn = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention, attn), torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert layers["backbone.blocks.2"].shape == (2, 65, 128)
    probs = attn["backbone.blocks.0.attn"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    vit, blk = model.backbone, model.backbone.blocks[0]
    with torch.no_grad():  # softmax(q k^T * scale) of the first block, by hand
        h = blk.norm1(layers["backbone.norm_pre"])
        q, k, _ = blk.attn.qkv(h).reshape(2, 65, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        manual = (q @ k.transpose(-2, -1) * blk.attn.scale).softmax(-1)
    torch.testing.assert_close(probs, manual, atol=1e-5, rtol=1e-4)
    assert vit.blocks[0].attn.fused_attn  # restored

    cnn = models["early_exit_resnet20_cifar"]
    a = anatomy(cnn)
    assert a.family == "early_exit_resnet" and len(a.layers) == 10 and a.image_size == (32, 32)
    with Capture(cnn, a.layer_names, layers), torch.no_grad():
        cnn(x)
    assert layers["backbone.layer2.2"].shape == (2, 32, 16, 16)


@pytest.mark.parametrize("name", ["early_exit_vit_nano_patch4_32", "early_exit_resnet20_cifar"])
def test_wrong_input_size_is_a_clear_error(models, name):
    model = vitlab.create_model(name, **CASES[name][0])
    with pytest.raises(VitlabError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(VitlabError, match="32x32"):
        predict(models[name], torch.randn(1, 3, 48, 48), 0.5)


def test_frozen_backbone_trains_only_the_branches():
    torch.manual_seed(0)
    model = vitlab.create_model("early_exit_resnet20_cifar", num_classes=3)
    model.freeze_backbone()
    model.train()
    assert not model.backbone.training and model.branches.training
    stats = model.backbone.bn1.running_mean.clone()
    sum(F.cross_entropy(o, torch.tensor([0, 1])) for o in model(torch.randn(2, 3, 32, 32))).backward()
    assert torch.equal(stats, model.backbone.bn1.running_mean)  # BatchNorm statistics untouched
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.branches.parameters())
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 32, 32))[0].shape == (2, 7) and model.num_classes == 7


def test_vitlab_train_runs(tmp_path):
    from vitlab.train import DataConfig, TrainConfig, train

    cfg = TrainConfig(model="early_exit_resnet20_cifar", epochs=1, batch_size=16,
                      data=DataConfig(num_train=32, num_val=16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert 0 <= result.val_acc <= 1
    # every exit trained: rebuild the run's initial weights (the trainer seeds before building the
    # model) and check that each branch moved away from them
    from vitlab.data.sampling import seed_all as seed_everything

    seed_everything(cfg.seed)
    initial = vitlab.create_model(result.config.model, **result.config.model_args)
    for before, after in zip(initial.branches, result.model.branches):
        assert not torch.equal(before.head.weight, after.head.weight)


def test_trainer_evaluate_takes_the_eval_mode_tensor(models):
    from vitlab.train.trainer import evaluate

    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
    loss, acc = evaluate(models["early_exit_mixer_nano_patch4_32"], batches)
    assert loss > 0 and 0 <= acc <= 1


def test_timm_protocol_is_the_backbones():
    torch.manual_seed(0)
    model = vitlab.create_model("early_exit_vit_nano_patch4_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=2)
        torch.testing.assert_close(final, model.backbone.forward_features(x), rtol=0, atol=0)
        assert [m.shape for m in maps] == [(2, 128, 8, 8)] * 2
    assert model.group_matcher()["stem"].startswith(r"^backbone\.")
    assert "backbone.cls_token" in model.no_weight_decay() and "branches.0.pos_embed" in model.no_weight_decay()
    assert [info["module"] for info in model.feature_info][:2] == ["backbone.blocks.0", "backbone.blocks.1"]
    # Pruning the backbone after block 3 keeps the exits after blocks 1-3 (and drops those after 4 and 5).
    assert model.exit_names == [f"blocks.{i}" for i in range(5)]
    model.prune_intermediate_layers([0, 2], prune_head=True)
    assert model.exit_names == ["blocks.0", "blocks.1", "blocks.2"] and model.num_exits == 3
    assert len(model.backbone.blocks) == 3 and model.num_classes == 0
