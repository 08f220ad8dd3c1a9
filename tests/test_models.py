"""Models: exact parameter counts, registration in timm, forward shapes, clear errors."""

import pytest
import timm
import torch

import vitlab
from vitlab import VitlabError, count_parameters, create_model, list_models
from vitlab.models.layers import ChannelPadShortcut

# ../shared/reference/models.md, counted as sum(p.numel() for p in model.parameters()).
REFERENCE_COUNTS = {
    "vit_base_patch16_224": 86_567_656,  # ViT-B/16, 224, 1000 classes (timm)
    "mixer_b16_224": 59_880_472,  # Mixer-B/16 (timm)
    "resnet20_cifar": 269_722,
    "resnet56_cifar": 853_018,
    "resnet110_cifar": 1_727_962,
    "resnet18_cifar": 11_173_962,
}


@pytest.mark.parametrize("name,expected", sorted(REFERENCE_COUNTS.items()))
def test_reference_parameter_counts(name, expected):
    assert count_parameters(name) == expected


def test_parameter_count_of_built_model_matches_meta_count():
    model = create_model("resnet20_cifar")
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) == 269_722


def _forward_backward(model, size):
    out = model(torch.randn(2, 3, size, size))
    outputs = out if isinstance(out, (list, tuple)) else [out]  # early-exit models: every exit's logits
    assert all(o.shape == (2, 7) for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _paper_size(name):
    return timm.models.get_pretrained_cfg(name).input_size[-1]


@pytest.mark.parametrize("name", list_models())
def test_every_vitlab_model_runs_forward_and_backward_at_its_own_size(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)  # registered in timm's registry
    _forward_backward(model, _paper_size(name))


@pytest.mark.parametrize("name", [n for n in list_models() if _paper_size(n) != 32])
def test_every_paper_resolution_model_also_runs_at_32(name):
    torch.manual_seed(0)
    _forward_backward(create_model(name, num_classes=7, img_size=32), 32)


def test_list_models_has_the_three_families():
    names = list_models()
    for expected in ["vit_tiny_patch4_32", "vit_nano_patch4_32", "mixer_tiny_patch4_32", "resnet20_cifar",
                     "resnet56_cifar", "resnet110_cifar", "resnet18_cifar"]:
        assert expected in names
    assert "vit_base_patch16_224" not in names  # stock timm models only with include_timm
    assert "vit_base_patch16_224" in list_models("vit_base*", include_timm=True)


def test_cifar_resnet_has_option_a_shortcuts_and_cifar_stem():
    model = create_model("resnet20_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    shortcuts = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    assert len(shortcuts) == 2  # entering stage 2 and stage 3
    feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 64, 8, 8)


def test_resnet18_cifar_keeps_full_resolution_in_first_stage():
    model = create_model("resnet18_cifar")
    x = model.act1(model.bn1(model.conv1(torch.randn(1, 3, 32, 32))))
    assert model.layer1(model.maxpool(x)).shape[-1] == 32
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ChannelPadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_small_vit_shape():
    model = create_model("vit_tiny_patch4_32")
    assert model.patch_embed.grid_size == (8, 8)
    assert len(model.blocks) == 12 and model.embed_dim == 192
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 65, 192)


def test_unknown_model_suggests_close_names():
    with pytest.raises(VitlabError, match=r"unknown model 'vit_tiny_patch4_31'.*vit_tiny_patch4_32"):
        create_model("vit_tiny_patch4_31")


def test_image_size_not_divisible_by_patch_is_refused():
    with pytest.raises(VitlabError, match=r"not divisible by the patch size 4.*multiple of 4"):
        create_model("vit_nano_patch4_32", img_size=30)


def test_unknown_model_option_is_one_clear_line():
    with pytest.raises(VitlabError, match=r"does not take the option 'bogus_option'") as info:
        create_model("resnet18_cifar", bogus_option=3)
    assert info.value.option == "bogus_option"  # callers check the option, not the message
    with pytest.raises(VitlabError, match=r"'mixer_s16_224' fixes 'num_blocks'.*pick another variant"):
        create_model("mixer_s16_224", num_blocks=2)


def test_public_api():
    assert vitlab.create_model is create_model
    assert isinstance(vitlab.__version__, str)


def test_sincos_position_embedding_is_fixed_and_two_dimensional():
    model = create_model("vit_nano_patch8_sincos_32")
    assert not model.pos_embed.requires_grad and model.pos_embed.shape == (1, 16, 128)
    assert model.no_embed_class  # the class token gets no position
    table = model.pos_embed[0]
    # 2-D: tokens in one grid row share the half of the embedding that encodes the row, tokens in
    # one column share the other half (grid is 4x4, row-major)
    same_row = (table[0] == table[3]).sum().item()
    same_col = (table[0] == table[12]).sum().item()
    assert same_row == same_col == 64
    assert ((table[0] == table[3]) & (table[0] == table[12])).sum().item() < 64
    # the option works on every small ViT and leaves the parameter count unchanged
    learned = create_model("vit_nano_patch4_32", pos_embed="sincos")
    assert not learned.pos_embed.requires_grad
    assert count_parameters("vit_nano_patch8_sincos_32") == count_parameters("vit_nano_patch8_32") - 128


def test_default_comparison_models_exist():
    from vitlab.compare import DEFAULT_RECIPES

    families = {name.split("_")[0] for name in (r.model for r in DEFAULT_RECIPES)}
    assert families == {"vit", "resnet20", "mixer"}
    for recipe in DEFAULT_RECIPES:
        assert recipe.model in list_models()


def test_wrong_input_size_names_the_accepted_size():
    model = create_model("vit_nano_patch8_32")
    with pytest.raises(VitlabError, match=r"vit_nano_patch8_32 takes 32x32 images, got 224x224.*img_size=224"):
        model(torch.randn(1, 3, 224, 224))
    assert create_model("resnet20_cifar")(torch.randn(1, 3, 40, 40)).shape == (1, 10)  # CNNs take any size


# --- timm's model protocol on vitlab's own families -----------------------------------------------
# One small model per family (depth cut where the full model is slow on a CPU), and the shapes of
# its intermediates for a batch of two 32x32 images: a map per block (token models) or stage.
PROTOCOL = {
    "cct_2_3x2_32": ({}, [(2, 128, 8, 8)] * 2),
    "vit_lite_7_patch4_32": ({"depth": 2}, [(2, 256, 8, 8)] * 2),
    "cvt_13_32": ({"depths": (1, 1, 2)}, [(2, 64, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4)]),
    "t2t_vit_t_14_32": ({"depth": 2}, [(2, 384, 8, 8)] * 2),
    "dhvt_tiny_patch4_32": ({"depth": 2}, [(2, 192, 8, 8)] * 2),
    "qna_vit_tiny_32": ({"qna_depths": (1, 1, 1, 0), "lsa_depths": (0, 0, 1, 1)},
                        [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]),
    "levit_128s_32": ({}, [(2, 128, 8, 8), (2, 256, 4, 4), (2, 384, 2, 2)]),
    "resnet20_cifar": ({}, [(2, 16, 32, 32), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]),
    "early_exit_vit_nano_patch4_32": ({"depth": 3}, [(2, 128, 8, 8)] * 3),
    "early_exit_resnet20_cifar": ({}, [(2, 16, 32, 32), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]),
}
PREFIX_TOKENS = {"vit_lite_7_patch4_32": 1, "t2t_vit_t_14_32": 1, "dhvt_tiny_patch4_32": 1, "cvt_13_32": 1}


def _protocol_model(name):
    torch.manual_seed(0)
    return create_model(name, **PROTOCOL[name][0])


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_forward_intermediates_ends_in_forward_features(name):
    model = _protocol_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=1e-6)
        assert [tuple(t.shape) for t in intermediates] == PROTOCOL[name][1]
        # Stopping after the first map gives the same map, and so does asking for the last one alone.
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert len(first) == len(last) == 1
    torch.testing.assert_close(first[0], intermediates[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(last[0], intermediates[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PREFIX_TOKENS))
def test_forward_intermediates_returns_prefix_tokens_and_tokens(name):
    model = _protocol_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        pairs = model.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=True)
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    width = maps[-1].shape[1]
    assert pairs[-1][1].shape == (2, PREFIX_TOKENS[name], width)  # the class token of the last block
    assert all(torch.equal(m, p[0]) for m, p in zip(maps, pairs))
    assert torch.equal(tokens[-1], maps[-1].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("name", sorted(set(PROTOCOL) - {"resnet20_cifar", "early_exit_vit_nano_patch4_32",
                                                         "early_exit_resnet20_cifar"}))
def test_features_only_follows_feature_info(name):
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, **PROTOCOL[name][0]).eval()
    with torch.no_grad():
        maps = features(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [32 // m.shape[-1] for m in maps] == features.feature_info.reduction()


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_gradient_checkpointing_changes_neither_outputs_nor_gradients(name):
    plain, checkpointed = _protocol_model(name).train(), _protocol_model(name).train()
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout and stochastic depth in both
        out = model(x)
        out = torch.stack(out) if isinstance(out, list) else out  # early exits: every exit's logits
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_group_matcher_orders_every_parameter_from_stem_to_head(name):
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = _protocol_model(name)
    group_of = group_parameters(model, model.group_matcher(), reverse=True)
    assert set(group_of) == {n for n, _ in model.named_parameters()}
    first = next(n for n, _ in model.named_parameters())  # the stem (or class token) comes first
    assert group_of[first] == 0
    assert group_of[f"{model.pretrained_cfg['classifier']}.weight"] == max(group_of.values()) >= 2
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert max(coarse.values()) <= max(group_of.values())
    # what the groups are for: layer-wise learning-rate decay in timm's optimizer factory
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_no_weight_decay_names_real_parameters(name):
    import fnmatch

    model = _protocol_model(name)
    names = [n for n, _ in model.named_parameters()]
    for pattern in getattr(model, "no_weight_decay", set)():
        if pattern.endswith(("reg_token", "dist_token")):
            continue  # timm's ViT names the tokens it may have
        assert fnmatch.filter(names, pattern), pattern


def test_pruned_model_keeps_the_intermediates_it_was_pruned_for():
    model = _protocol_model("cvt_13_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)[:2]
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_features == 192
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, intermediates_only=True), expected))
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)


# --- names ------------------------------------------------------------------------------------------


def test_every_name_follows_one_scheme():
    import re

    from vitlab.models import model_aliases

    # family_size_patchN_imgsize; a paper's own scheme where it has one (cct_L_kxC_S, cvt_13,
    # t2t_vit_14, qna_vit_tiny, levit_128s) with _32 for an adaptation to 32x32; resnetN_cifar.
    for name in list_models():
        assert not re.search(r"_p\d+_", name), name  # the patch is spelled patchN, as in vit_nano_patch4_32
        assert not re.fullmatch(r"vit_.*_\d+_\d+_\d+", name), name
    assert set(model_aliases()).isdisjoint(list_models())


def test_earlier_names_still_build_the_same_model():
    from vitlab.models import is_vitlab_model, model_aliases

    aliases = model_aliases()
    assert aliases["dhvt_tiny_p4_32"] == "dhvt_tiny_patch4_32"
    assert aliases["vit_lite_7_4_32"] == "vit_lite_7_patch4_32"
    assert len(aliases) == 8
    for old, new in aliases.items():
        assert new in list_models() and old not in list_models()
        assert is_vitlab_model(old)
        with pytest.warns(UserWarning, match=f"deprecated model name {old} to current {new}"):
            with torch.device("meta"):
                built = timm.create_model(old)
        with torch.device("meta"):
            current = timm.create_model(new)
        assert type(built) is type(current) and built.pretrained_cfg["architecture"] == new
        shapes = {k: v.shape for k, v in built.state_dict().items()}
        assert shapes == {k: v.shape for k, v in current.state_dict().items()}
    # vitlab.create_model (what a run directory's config.yaml goes through) builds the same weights
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="deprecated model name dhvt_tiny_p4_32"):
        old_model = create_model("dhvt_tiny_p4_32", depth=1)
    torch.manual_seed(0)
    new_model = create_model("dhvt_tiny_patch4_32", depth=1)
    assert all(torch.equal(a, b) for a, b in zip(old_model.state_dict().values(), new_model.state_dict().values()))
    with pytest.warns(UserWarning, match="deprecated model name vit_lite_seqpool_7_4_32"):
        assert count_parameters("vit_lite_seqpool_7_4_32") == count_parameters("vit_lite_seqpool_7_patch4_32")
