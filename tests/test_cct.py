"""CCT, ViT-Lite and CVT: exact counts, equivalence with vit-pytorch's CCT, shapes, anatomy, capture."""

import pytest
import torch

import vitlab
import vitlab.models.cct as cct  # registers the models
from vitlab import VitlabError, count_parameters, create_model
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store

# ../shared/reference/models.md (official code), counted as sum(p.numel() for p in model.parameters()).
REFERENCE_COUNTS = [
    ("cct_2_3x2_32", 10, 283_723),
    ("cct_4_3x2_32", 10, 482_123),
    ("cct_6_3x1_32", 10, 3_233_803),
    ("cct_6_3x2_32", 10, 3_326_923),
    ("cct_7_3x1_32", 10, 3_760_139),
    ("cct_7_3x1_32", 100, 3_783_269),
    ("cct_7_3x2_32", 10, 3_853_259),
    ("cct_7_7x2_224", 102, 4_573_735),
    ("cct_14_7x2_224", 1000, 22_367_273),
    ("vit_lite_7_patch4_32", 10, 3_716_874),  # ViT-Lite-7/4
    ("vit_lite_seqpool_7_patch4_32", 10, 3_716_619),  # the paper's CVT-7/4
]
CCT_NAMES = ["cct_2_3x2_32", "cct_4_3x2_32", "cct_6_3x1_32", "cct_6_3x2_32", "cct_7_3x1_32", "cct_7_3x2_32",
             "cct_7_7x2_224", "cct_14_7x2_224", "cct_14_7x2_384"]
NAMES_32 = [n for n in CCT_NAMES if n.endswith("_32")]


def _vit_pytorch_cct(**overrides):
    """vit-pytorch's CCT with the arguments of CCT-7/3x1 at 32x32 (its signature: vit_pytorch.cct.CCT)."""
    from vit_pytorch.cct import CCT

    args = dict(img_size=32, embedding_dim=256, n_conv_layers=1, kernel_size=3, stride=1, padding=1,
                num_layers=7, num_heads=4, mlp_ratio=2, num_classes=10, positional_embedding="learnable")
    return CCT(**{**args, **overrides})


@pytest.mark.parametrize("name,classes,expected", REFERENCE_COUNTS)
def test_reference_parameter_counts(name, classes, expected):
    assert count_parameters(name, num_classes=classes) == expected


def test_every_name_is_registered_with_a_sine_variant():
    names = vitlab.list_models("cct_*")
    assert sorted(names) == sorted(CCT_NAMES + [n + "_sine" for n in CCT_NAMES])
    assert {"vit_lite_7_patch4_32", "vit_lite_seqpool_7_patch4_32"} <= set(vitlab.list_models("vit_lite*"))
    assert not vitlab.list_models("cvt_7*")  # no name to confuse with CvT (Wu et al.)


@pytest.mark.parametrize("name", CCT_NAMES)
def test_sine_variant_counts_its_frozen_embedding(name):
    with torch.device("meta"):
        learned, sine = create_model(name), create_model(name + "_sine")
        none = create_model(name, pos_embed="none")
    assert count_parameters(sine) == count_parameters(learned)  # the frozen table is a parameter
    assert sine.pos_embed.shape == learned.pos_embed.shape and not sine.pos_embed.requires_grad
    assert learned.pos_embed.requires_grad and none.pos_embed is None
    assert count_parameters(none) == count_parameters(learned) - learned.pos_embed.numel()


def test_same_count_as_vit_pytorch_cct():
    reference = _vit_pytorch_cct()  # vit-pytorch calls .item() while building: no meta device
    assert sum(p.numel() for p in reference.parameters()) == count_parameters("cct_7_3x1_32") == 3_760_139


@pytest.mark.parametrize("pos_embed,name", [("learnable", "cct_2_3x2_32"), ("sine", "cct_2_3x2_32_sine")])
def test_same_function_as_vit_pytorch_cct(pos_embed, name):
    # vit-pytorch's CCT has the official parameter names: its weights load through the official
    # checkpoint filter and give the same logits, so the two compute the same function.
    torch.manual_seed(0)
    reference = _vit_pytorch_cct(embedding_dim=128, n_conv_layers=2, num_layers=2, num_heads=2, mlp_ratio=1,
                                 positional_embedding=pos_embed).eval()
    model = create_model(name).eval()
    if pos_embed == "sine":  # the frozen table is the official one, bit for bit
        assert torch.equal(model.pos_embed, reference.classifier.positional_emb)
    model.load_state_dict(cct.checkpoint_filter_fn(reference.state_dict(), model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_official_checkpoint_resamples_position_embedding():
    reference = _vit_pytorch_cct(embedding_dim=128, n_conv_layers=2, num_layers=2, num_heads=2, mlp_ratio=1)
    model = create_model("cct_2_3x2_32", img_size=48)  # 12x12 tokens instead of 8x8
    model.load_state_dict(cct.checkpoint_filter_fn(reference.state_dict(), model))
    assert model.pos_embed.shape == (1, 144, 128)


def test_architecture_details():
    model = create_model("cct_7_3x2_32")
    convs = [stage.conv for stage in model.patch_embed.stages]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64), (64, 256)]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) and c.bias is None
               for c in convs)
    big = create_model("cct_7_7x2_224")
    assert big.patch_embed.stages[0].conv.stride == (2, 2) and big.patch_embed.stages[0].conv.padding == (3, 3)
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is None and blk.attn.proj.bias is not None and blk.mlp.fc1.out_features == 512
    assert model.cls_token is None and model.attn_pool.out_features == 1
    lite = create_model("vit_lite_7_patch4_32")
    assert lite.cls_token is not None and lite.attn_pool is None and lite.patch_embed.proj.bias is not None


@pytest.mark.parametrize("name", NAMES_32 + [n + "_sine" for n in NAMES_32] + ["vit_lite_7_patch4_32",
                                                                               "vit_lite_seqpool_7_patch4_32"])
def test_forward_backward_32(name):
    model = create_model(name, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_forward_backward_at_paper_resolution():
    model = create_model("cct_7_7x2_224")
    out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 102)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_shapes_and_classifier():
    model = create_model("cct_7_3x1_32").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 256, 256)  # 16x16 tokens, no class token
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier().out_features == 10
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    lite = create_model("vit_lite_7_patch4_32")
    assert lite.forward_features(x).shape == (2, 65, 256)  # 8x8 patches + class token


def test_without_position_embedding_any_size_runs():
    model = create_model("cct_2_3x2_32", pos_embed="none")
    assert anatomy(model).image_size is None
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 10)
    with pytest.raises(VitlabError, match="pos_embed must be one of learn, sine, none"):
        create_model("cct_2_3x2_32", pos_embed="rope")


def test_fused_and_explicit_attention_agree():
    model = create_model("cct_2_3x2_32").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        explicit = model(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_channels_last_tokenizer_gives_the_nchw_tokens():
    tokenizer = create_model("cct_4_3x2_32").patch_embed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tokenizer(x)
        nchw = tokenizer.stages(x).flatten(2).transpose(1, 2)  # the plain layout, token by token
    torch.testing.assert_close(tokens, nchw, atol=1e-5, rtol=1e-5)
    assert tokens.shape == (2, 64, 128) and tokens.is_contiguous()  # the channels-last reshape is a free view


def test_tokenizer_width_and_batchnorm_options_add_exactly_their_parameters():
    base = count_parameters(create_model("cct_4_3x2_32"))
    # conv 3->C and C->128, 3x3 kernels, no bias: 96 hidden channels instead of 64 add 32 * 9 * (3 + 128).
    assert count_parameters(create_model("cct_4_3x2_32", tokenizer_chans=96)) - base == 32 * 9 * (3 + 128)
    # A BatchNorm (weight and bias) after each convolution: 64 + 128 channels.
    assert count_parameters(create_model("cct_4_3x2_32", tokenizer_batchnorm=True)) - base == 2 * (64 + 128)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_batchnorm_tokenizer_is_invariant_to_the_input_scale(batchnorm):
    # Bias-free convolutions, ReLU and max-pool are positively homogeneous, so the plain tokenizer's
    # tokens scale with its input; a training-mode BatchNorm after each convolution removes the scale.
    torch.manual_seed(0)
    tokenizer = create_model("cct_4_3x2_32", tokenizer_batchnorm=batchnorm).patch_embed.train()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ratio = tokenizer(5.0 * x).norm() / tokenizer(x).norm()
    assert ratio.item() == pytest.approx(1.0 if batchnorm else 5.0, rel=1e-3)


ANATOMY = {
    # name: (layers, grid, prefix tokens, patch size in pixels, image size)
    "cct_7_3x1_32": (8, (16, 16), 0, (2, 2), (32, 32)),
    "cct_7_3x2_32": (8, (8, 8), 0, (4, 4), (32, 32)),
    "cct_2_3x2_32_sine": (3, (8, 8), 0, (4, 4), (32, 32)),
    "cct_7_7x2_224": (8, (14, 14), 0, (16, 16), (224, 224)),
    "cct_14_7x2_384": (15, (24, 24), 0, (16, 16), (384, 384)),
    "vit_lite_7_patch4_32": (8, (8, 8), 1, (4, 4), (32, 32)),
    "vit_lite_seqpool_7_patch4_32": (8, (8, 8), 0, (4, 4), (32, 32)),
}


@pytest.mark.parametrize("name", sorted(ANATOMY))
def test_anatomy(name):
    n_layers, grid, prefix, patch, image = ANATOMY[name]
    with torch.device("meta"):
        model = create_model(name)
    a = anatomy(model)
    assert (a.family, len(a.layers), a.grid, a.prefix_tokens, a.patch_size, a.image_size) == (
        "cct", n_layers, grid, prefix, patch, image)
    assert tuple(i // g for i, g in zip(image, grid)) == patch  # pixels per token = input size / grid
    assert len(set(a.layer_labels)) == len(a.layers) and a.layers[0].kind == "embed"
    assert len(a.attention) == n_layers - 1  # one site per encoder layer; sequence pooling is not one
    assert all((s.grid, s.patch_size, s.prefix_tokens) == (grid, patch, prefix) for s in a.attention)


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "vit_lite_7_patch4_32"])
def test_capture_materialises_fused_attention(name):
    model = create_model(name).eval()
    assert all(blk.attn.fused_attn for blk in model.blocks)  # built with fused attention
    a = anatomy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_logits = model(x)
    attn, layers = Store(), Store()
    with Capture(model, a.layer_names, layers, a.attention, attn), torch.no_grad():
        logits = model(x)
    assert all(blk.attn.fused_attn for blk in model.blocks)  # restored on exit
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)

    tokens = a.prefix_tokens + a.grid[0] * a.grid[1]
    assert set(layers.keys()) == set(a.layer_names)
    assert layers["blocks.1"].shape == (2, tokens, model.embed_dim)
    probs = attn["blocks.0.attn"]
    blk = model.blocks[0]
    assert probs.shape == (2, blk.attn.num_heads, tokens, tokens)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # softmax(q k^T / sqrt(d)) of the first layer, from the embedding output, by hand
    qkv = blk.attn.qkv(blk.norm1(layers["pos_drop"])).reshape(2, tokens, 3, blk.attn.num_heads, -1)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    manual = (q @ k.transpose(-2, -1) * blk.attn.scale).softmax(-1)
    torch.testing.assert_close(probs, manual.detach(), atol=1e-5, rtol=1e-4)


def test_wrong_input_size_is_refused():
    with pytest.raises(VitlabError, match=r"cct_7_7x2_224 takes 224x224 images, got 32x32"):
        create_model("cct_7_7x2_224")(torch.randn(1, 3, 32, 32))
    with pytest.raises(VitlabError, match=r"cct_7_3x1_32 takes 32x32 images, got 64x64"):
        create_model("cct_7_3x1_32")(torch.randn(1, 3, 64, 64))
    with pytest.raises(VitlabError, match=r"not divisible by the patch size 4"):
        create_model("vit_lite_7_patch4_32", img_size=30)
    assert create_model("cct_2_3x2_32", img_size=30)(torch.randn(1, 3, 30, 30)).shape == (1, 10)


def test_trains_one_epoch(tmp_path):
    from vitlab.train import DataConfig, TrainConfig, train

    result = train(TrainConfig(model="cct_2_3x2_32", epochs=1, batch_size=16,
                               data=DataConfig(num_train=32, num_val=16)), tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and 0 <= result.val_acc <= 1
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_dynamic_img_size_resamples_the_position_embedding():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    fixed = create_model("cct_4_3x2_32").eval()
    dynamic = create_model("cct_4_3x2_32", dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    assert anatomy(dynamic) == anatomy(fixed)  # analyses still see the size it was built for and its grid
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dynamic(x), fixed(x))  # its own size: the table as it is
    # 24x24 gives a 6x6 grid: the same function as a 24x24 model holding timm's resampling of the 8x8 table.
    small = create_model("cct_4_3x2_32", img_size=24).eval()
    resampled = resample_abs_pos_embed(fixed.pos_embed.detach(), [6, 6], [8, 8], num_prefix_tokens=0)
    state = dict(fixed.state_dict(), pos_embed=resampled)
    small.load_state_dict(state)
    x = torch.randn(2, 3, 24, 24)
    assert torch.allclose(dynamic(x), small(x), atol=1e-6)
    dynamic(x).sum().backward()  # the gradient reaches the one 8x8 table
    assert dynamic.pos_embed.grad.shape == (1, 64, 128) and dynamic.pos_embed.grad.abs().sum() > 0
    # Analyses feed it the size its anatomy's grid belongs to, as they do the fixed model.
    from vitlab.analysis.subjects import subject_from_name

    subject = subject_from_name("cct_4_3x2_32", dynamic_img_size=True)
    assert subject.prepare(torch.rand(1, 3, 48, 48)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("size", [16, 24, 30, 40])
def test_tokenizer_grid_arithmetic_matches_its_output(size):
    tokenizer = create_model("cct_7_3x2_32", dynamic_img_size=True).patch_embed
    rows, cols = tokenizer.dynamic_feat_size((size, size + 8))
    assert tokenizer(torch.randn(1, 3, size, size + 8)).shape == (1, rows * cols, 256)


def test_learned_position_embedding_is_weight_decayed_as_officially():
    # The official models define no no_weight_decay and train with timm's create_optimizer_v2, which
    # exempts only 1-D parameters: the (1, N, d) position embedding (and ViT-Lite's class token) decay.
    from timm.optim import create_optimizer_v2

    for name, token in (("cct_7_3x1_32", "pos_embed"), ("vit_lite_7_patch4_32", "cls_token")):
        model = create_model(name)
        assert model.no_weight_decay() == set()
        optimizer = create_optimizer_v2(model, "adamw", lr=5.5e-4, weight_decay=0.06)
        decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
        assert id(model.pos_embed) in decayed and id(getattr(model, token)) in decayed
        assert id(model.norm.weight) not in decayed and id(model.head.bias) not in decayed
    sine = create_model("cct_7_3x1_32_sine")
    optimizer = create_optimizer_v2(sine, "adamw", lr=5.5e-4, weight_decay=0.06)
    assert all(p is not sine.pos_embed for group in optimizer.param_groups for p in group["params"])  # frozen
