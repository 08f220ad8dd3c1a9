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
