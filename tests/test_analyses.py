"""The papers' analyses against constructed cases: heads, skips, localisation, probes, robustness,
shape bias, feature visualisation, receptive fields, feature reuse, convolution as attention."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from vitlab import VitlabError, create_model
from vitlab.analysis.conv_attention import attention_from_conv, conv_attention_error
from vitlab.analysis.erf import effective_receptive_field
from vitlab.analysis.heads import aligned_attention, attention_entropy, attention_rollout, classify_heads, head_offsets
from vitlab.analysis.localisation import Localisation, image_patches
from vitlab.analysis.probes import LayerProbes
from vitlab.analysis.reuse import feature_reuse, same_parameter_shapes
from vitlab.analysis.robustness import drop_patches, robustness, salient_drop_masks, shuffle_patches
from vitlab.analysis.shape_bias import GEIRHOS_CATEGORIES, ConflictShapes, geirhos_shape_bias, shapes_shape_bias
from vitlab.analysis.skip import SkipRatios
from vitlab.analysis.subjects import Subject, subject_from_name
from vitlab.anatomy import Anatomy, Layer, anatomy
from vitlab.capture import Hooks

# --- convolution as attention (Li et al.) ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kernel,patch,bias,heads", [(5, 4, True, 9), (5, 4, False, 9), (3, 1, True, 9),
                                                      (9, 2, True, 25), (7, 4, False, 9), (1, 4, True, 1)])
def test_attention_reproduces_the_convolution(kernel, patch, bias, heads):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding=kernel // 2, bias=bias).double()
    layer = attention_from_conv(conv, patch, 16)
    assert layer.num_heads == heads
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    assert (layer(x) - conv(x)).abs().max().item() < 1e-10  # the reference's anchor: 8.9e-15 for K=5, P=4


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_even_kernel_with_same_padding_and_one_hot_heads():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 4, padding="same").double()
    result = conv_attention_error(conv, 4, image_size=16)
    assert result.max_abs_error < 1e-10 and result.num_heads == 9
    np.testing.assert_allclose(result.head_maps.sum(axis=(1, 2)), 1.0)
    assert ((result.head_maps == 0) | (result.head_maps == 1)).all()  # every head attends one-hot
    assert result.head_maps[4, 1, 1] == 1  # the middle head looks at the query's own patch


def test_convolutions_it_cannot_rebuild_are_one_clear_line():
    with pytest.raises(VitlabError, match="stride-1"):
        attention_from_conv(nn.Conv2d(2, 2, 3, stride=2, padding=1), 4, 16)
    with pytest.raises(VitlabError, match="'same'-padded"):
        attention_from_conv(nn.Conv2d(2, 2, 3, padding=0), 4, 16)
    with pytest.raises(VitlabError, match="not a multiple of the patch size"):
        attention_from_conv(nn.Conv2d(2, 2, 3, padding=1), 4, 18)


# --- attention heads (Walmer et al.) ----------------------------------------------------------


def _constructed_attention(kinds, grid=14, prefix=1):
    n = grid * grid
    maps = []
    for kind in kinds:
        a = torch.zeros(n, n)
        for q in range(n):
            r, c = divmod(q, grid)
            if kind == "self":
                a[q, q] = 1
            elif kind == "right":  # one neighbour, a fixed direction (itself at the right edge)
                a[q, q + 1 if c + 1 < grid else q] = 1
            elif kind == "uniform":
                a[q] = 1 / n
        full = torch.zeros(prefix + n, prefix + n)
        full[:prefix] = 1 / (prefix + n)
        full[prefix:, prefix:] = a
        maps.append(full)
    return torch.stack(maps)[None].repeat(2, 1, 1, 1)


def test_head_labels_on_constructed_attention():
    attn = _constructed_attention(["self", "right", "uniform"])
    aligned = aligned_attention(attn, 14)
    assert aligned.shape == (3, 27, 27)
    torch.testing.assert_close(aligned.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    assert classify_heads(aligned) == ["local", "offset-local", "global"]
    offsets = head_offsets(aligned)
    assert offsets[0] == 0 and offsets[1] == pytest.approx(13 / 14 / 13, rel=1e-9)  # (13/14) of one cell of 13
    assert offsets[2] == pytest.approx(0, abs=1e-12)
    entropy = attention_entropy(attn, 14)
    assert entropy[0] == 0 and entropy[1] == 0 and entropy[2] == pytest.approx(math.log(196))


def test_rollout_rows_sum_to_one_and_is_batched():
    torch.manual_seed(0)
    layers = [torch.rand(3, 2, 5, 5).softmax(-1) for _ in range(4)]
    rollout = attention_rollout(layers)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    one = attention_rollout([a[1:2] for a in layers])
    torch.testing.assert_close(rollout[1:2], one)
    # self-attention everywhere leaves every token to itself
    eye = torch.eye(5).expand(3, 2, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(5, dtype=torch.float64).expand(3, 5, 5))


# --- skip connections (Raghu et al.) ----------------------------------------------------------


def _ratios(model, size=32):
    a = anatomy(model.eval())
    ratios = SkipRatios(a.residuals)
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with Hooks(model, ratios.hooks()), torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    return ratios.result("m")


def test_skip_ratio_scales_inversely_with_the_branch():
    # Layer scale multiplies every branch by gamma: the first sub-block's stream is the same in both
    # models, so its ratio is exactly ten times larger with gamma = 0.1 than with gamma = 1.
    torch.manual_seed(0)
    big = create_model("vit_nano_patch4_32", depth=2, init_values=1.0)
    small = create_model("vit_nano_patch4_32", depth=2, init_values=1.0)
    small.load_state_dict(big.state_dict())
    with torch.no_grad():
        small.blocks[0].ls1.gamma.fill_(0.1)
    r_big, r_small = _ratios(big), _ratios(small)
    assert r_big.sites[:2] == ["block1.attn", "block1.mlp"] and len(r_big.sites) == 4
    assert r_small.spatial_ratio[0] == pytest.approx(10 * r_big.spatial_ratio[0], rel=1e-6)
    assert r_small.cls_ratio[0] == pytest.approx(10 * r_big.cls_ratio[0], rel=1e-6)


def test_skip_ratios_of_mixer_and_resnet():
    mixer = _ratios(create_model("mixer_nano_patch4_32", num_blocks=2))
    assert mixer.kinds == ["token_mixing", "channel_mixing"] * 2 and np.isnan(mixer.cls_ratio).all()
    resnet = create_model("resnet20_cifar", zero_init_last=False)
    r = _ratios(resnet)
    assert len(r.sites) == 9 and np.isfinite(r.spatial_ratio).all() and (r.spatial_ratio > 0).all()
    with torch.no_grad():  # halving a block's last BatchNorm halves its branch: the ratio doubles
        resnet.layer2[1].bn2.weight.mul_(0.5)
        resnet.layer2[1].bn2.bias.mul_(0.5)
    assert _ratios(resnet).spatial_ratio[4] == pytest.approx(2 * r.spatial_ratio[4], rel=1e-6)


# --- spatial localisation (Raghu et al.) --------------------------------------------------------


def test_tokens_that_are_their_patches_give_a_diagonal():
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(48, 48))[0]  # CKA is invariant to an orthogonal map
    loc = Localisation((4, 4), (4, 4), prefix_tokens=1)
    for _ in range(3):
        x = torch.randn(32, 3, 16, 16)
        tokens = torch.cat([torch.randn(32, 1, 48), image_patches(x, (4, 4)) @ rotation], 1)
        loc.add(x, tokens)
    result = loc.result("patches", "embed")
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-6)
    assert result.own_patch_rate() == 1.0
    off_diagonal = result.matrix[~np.eye(16, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.2


# --- layer probes ------------------------------------------------------------------------------


def test_probes_find_the_informative_layer():
    torch.manual_seed(0)
    centres = torch.randn(5, 16) * 3
    probes = LayerProbes([Layer("a", "informative"), Layer("b", "noise")], prefix_tokens=1, num_classes=5)

    def batch(n=64):
        y = torch.randint(0, 5, (n,))
        return y, centres[y][:, None, :] + torch.randn(n, 17, 16), torch.randn(n, 17, 16)

    for _ in range(4):
        y, good, noise = batch()
        probes.add_train("a", good, y)
        probes.add_train("b", noise, y)
    with pytest.raises(VitlabError, match="call fit"):
        probes.add_eval("a", good, y)
    probes.fit()
    for _ in range(2):
        y, good, noise = batch()
        probes.add_eval("a", good, y)
        probes.add_eval("b", noise, y)
    result = probes.result("toy")
    assert set(result.accuracy) == {"ridge/cls", "ridge/mean", "ridge/centre", "knn"}
    for task, acc in result.accuracy.items():
        assert acc[0] > 0.95 and acc[1] < 0.5, task
    assert {b["layer"] for b in result.best_layers().values()} == {"informative"}


# --- robustness (Naseer et al.) ------------------------------------------------------------------


def test_patch_drop_and_shuffle():
    images = torch.rand(2, 3, 32, 32)
    drop = torch.zeros(2, 8, 8, dtype=torch.bool)
    drop[0, 0, 0] = drop[1, 7, 7] = True
    out = drop_patches(images, drop)
    assert (out[0, :, :4, :4] == 0).all() and torch.equal(out[0, :, 4:], images[0, :, 4:])
    assert (out[1, :, 28:, 28:] == 0).all()
    shuffled = shuffle_patches(images, 4, torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, images)
    torch.testing.assert_close(shuffled.flatten(1).sort(1).values, images.flatten(1).sort(1).values)
    assert torch.equal(shuffle_patches(images, 1, torch.Generator()), images)
    with pytest.raises(VitlabError, match="does not divide"):
        drop_patches(images, torch.zeros(2, 7, 7, dtype=torch.bool))


def test_salient_masks_follow_the_attention_mass():
    saliency = torch.zeros(1, 4, 4, dtype=torch.float64)
    saliency[0, 0, 0], saliency[0, 1, 1], saliency[0, 2, 2] = 0.5, 0.3, 0.2
    salient = salient_drop_masks(saliency, 4, 0.5, salient=True)
    assert salient.sum() == 1 and salient[0, 0, 0]
    assert salient_drop_masks(saliency, 4, 0.8, salient=True).sum() == 2
    background = salient_drop_masks(saliency, 4, 0.5, salient=False)
    assert background.sum() == 15 and not background[0, 0, 0]  # only the most salient patch is left


class _Corner(nn.Module):
    """Predicts class 1 when the top-left quarter is bright, else 0 (a 'model' that sees one region)."""

    num_classes = 2

    def forward(self, x):
        bright = x[:, :, :16, :16].mean(dim=(1, 2, 3))
        return torch.stack([-bright, bright], 1)


def _fake_subject(model, name="fake", a=None):
    return Subject(name, model, a or Anatomy("fake", [Layer("", "all")]), (0.0,) * 3, (1.0,) * 3, 0)


def test_robustness_curves_of_a_model_that_sees_one_corner():
    images = torch.zeros(8, 3, 32, 32)
    images[:, :, :16, :16] = 1.0
    labels = torch.ones(8, dtype=torch.long)
    result = robustness(_fake_subject(_Corner()), [(images, labels)], tests=["random", "shuffle"], grid=8)
    levels, acc = result.curves["random"]
    assert levels[0] == 0 and acc[0] == 1.0 and acc[-1] <= acc[0]
    assert result.curves["shuffle"][1][0] == 1.0  # the intact image (g = 1)
    with pytest.raises(VitlabError, match="class-token attention"):
        robustness(_fake_subject(_Corner()), [(images, labels)], tests=["salient"])


def test_salient_patch_drop_on_a_vit():
    torch.manual_seed(0)
    vit = subject_from_name("vit_nano_patch4_32", depth=2)
    images, labels = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    result = robustness(vit, [(images, labels)], tests=["salient", "non_salient"], grid=8)
    for test in ("salient", "non_salient"):
        levels, acc = result.curves[test]
        assert levels == [k / 10 for k in range(1, 11)] and all(0 <= a <= 1 for a in acc)


# --- shape bias --------------------------------------------------------------------------------


class _ByCue(nn.Module):
    """A 'shapes model' that answers with the shape or the texture label it is handed."""

    num_classes = 10

    def __init__(self, cue):
        super().__init__()
        self.cue = cue
        self.answers = None

    def forward(self, x):
        return nn.functional.one_hot(self.answers, 10).float()


def test_shape_bias_counts_decisions():
    data = ConflictShapes(num_images=40)
    assert (data.labels != data.textures).all()  # every image is a cue conflict
    images, shapes, textures = data.images, data.labels, data.textures
    for cue, expected in (("shape", 1.0), ("texture", 0.0)):
        model = _ByCue(cue)
        model.answers = shapes if cue == "shape" else textures
        result = shapes_shape_bias(_fake_subject(model), [(images, shapes, textures)])
        assert result.shape_bias == expected and result.num_images == 40


def test_conflict_batches_stream_the_requested_images():
    from vitlab.analysis.shape_bias import conflict_batches

    batches = list(conflict_batches(70, batch_size=32))
    assert [b[0].shape[0] for b in batches] == [32, 32, 6]
    assert all((shapes != textures).all() for _, shapes, textures in batches)
    assert batches[0][0].shape[1:] == (3, 32, 32) and 0 <= batches[0][0].min() and batches[0][0].max() <= 1
    again = next(conflict_batches(70, batch_size=32))
    assert torch.equal(again[0], batches[0][0])  # the same stream every time


def test_geirhos_protocol_on_a_cue_conflict_folder(tmp_path):
    names = sorted(GEIRHOS_CATEGORIES)
    stimuli = [("cat", "elephant"), ("dog", "clock"), ("knife", "bottle"), ("car", "car")]  # the last agrees
    for i, (shape, texture) in enumerate(stimuli):
        (tmp_path / shape).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / shape / f"{shape}{i}-{texture}{i}.png")

    class Imagenet(nn.Module):
        num_classes = 1000

        def forward(self, x):  # decides by shape for the first two images, by texture for the third
            answers = [GEIRHOS_CATEGORIES["cat"][0], GEIRHOS_CATEGORIES["dog"][3], GEIRHOS_CATEGORIES["bottle"][0]]
            red = (x[:, 0, 0, 0] * 255).round().long()
            logits = torch.zeros(x.shape[0], 1000)
            for row, r in enumerate(red.tolist()):
                logits[row, answers[r] if r < 3 else 0] = 20.0
            return logits

    a = Anatomy("fake", [Layer("", "all")], image_size=(8, 8))
    result = geirhos_shape_bias(_fake_subject(Imagenet(), a=a), tmp_path)
    assert (result.shape_decisions, result.texture_decisions, result.num_images) == (2, 1, 3)
    assert result.shape_bias == pytest.approx(2 / 3)
    assert names == list(GEIRHOS_CATEGORIES) and len(names) == 16


# --- feature visualisation, receptive field, feature reuse ---------------------------------------


def test_feature_visualisation_excites_the_unit():
    from vitlab.analysis.featvis import visualise_unit

    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_32", depth=1)
    start = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    acts = {}
    model.blocks[0].mlp.act.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    with torch.no_grad():
        model(start)
    before = acts["a"][:, 1:, 5].mean().item()
    image, after = visualise_unit(model, "blocks.0.mlp.act", 5, (32, 32), prefix_tokens=1, steps=30)
    assert image.shape == (1, 3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert after > before + 0.05  # 30 steps of an untrained model: it rises, far from saturated
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_receptive_field_of_stacked_convolutions_grows_by_one_pixel_per_layer():
    torch.manual_seed(0)
    convs = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])
    a = Anatomy("cnn", [Layer(str(i), f"conv{i + 1}") for i in range(3)])
    result = effective_receptive_field(convs, a, [torch.randn(2, 3, 17, 17)])
    for depth, m in enumerate(result.maps, start=1):
        rows, cols = np.nonzero(m)
        assert rows.min() == 8 - depth and rows.max() == 8 + depth and cols.min() == 8 - depth
        assert m.sum() == pytest.approx(1.0)
    assert list(result.radii()) == sorted(result.radii())


def test_feature_reuse_of_a_model_with_itself_and_with_a_fresh_one():
    torch.manual_seed(0)
    a = subject_from_name("vit_nano_patch4_32", depth=2)
    torch.manual_seed(1)
    fresh = subject_from_name("vit_nano_patch4_32", depth=2)
    images = [(torch.rand(16, 3, 32, 32), torch.zeros(16))] * 2
    same = feature_reuse(a, a, images)
    np.testing.assert_allclose(same.cka, 1.0, atol=1e-6)
    assert np.nanmax(same.weight_change) == 0
    other = feature_reuse(a, fresh, images)
    assert (other.cka[1:] < 0.99).all() and (np.nan_to_num(other.weight_change[1:]) > 0.5).all()


def test_feature_reuse_refuses_one_model_name_built_with_other_options():
    # Same name and layer names, other MLP width (ViT-nano has ratio 2): once a shape error from deep in torch.
    narrow = subject_from_name("vit_nano_patch4_32", depth=2)
    wide = subject_from_name("vit_nano_patch4_32", depth=2, mlp_ratio=4.0)
    assert narrow.anatomy.layer_names == wide.anatomy.layer_names
    assert not same_parameter_shapes(narrow.model, wide.model)
    with pytest.raises(VitlabError, match="different model options"):
        feature_reuse(narrow, wide, [(torch.rand(4, 3, 32, 32), torch.zeros(4))])


def test_rollout_is_the_product_of_the_captured_attention():
    from vitlab.analysis.catalog import REGISTRY
    from vitlab.analysis.heads import attention_rollout
    from vitlab.analysis.subjects import subject_from_name
    from vitlab.analysis.suite import analysis_options, run_analyses
    from vitlab.capture import Capture, Store

    torch.manual_seed(0)
    vit, cnn = subject_from_name("vit_nano_patch4_32", depth=3), subject_from_name("resnet20_cifar")
    images = torch.rand(2, 8, 3, 32, 32)
    out = run_analyses([vit, cnn], list(images), ["rollout"], progress=False,
                       options=analysis_options(rollout_residual=0.3, rollout_examples=3))
    result = out.results["rollout"][vit.name]
    assert "rollout" in [a.name for a in REGISTRY] and set(out.results["rollout"]) == {vit.name}
    assert any("rollout: not applicable to resnet20_cifar" in note for note in out.notes)
    # by hand: the class token's row of the rollout of every layer, over the patches, averaged over images
    maps = []
    for batch in images:
        store = Store()
        with Capture(vit.model, attention=vit.anatomy.attention, on_attention=store), torch.no_grad():
            vit.model(vit.prepare(batch))
        rolled = attention_rollout([store[site.name] for site in vit.anatomy.attention], residual=0.3)
        row = rolled[:, 0, 1:]
        maps.append(row / row.sum(1, keepdim=True))
    maps = torch.cat(maps)
    np.testing.assert_allclose(result.mean_map, maps.mean(0).view(8, 8).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.example_maps, maps[:3].view(3, 8, 8).numpy(), rtol=0, atol=1e-12)
    entropy = (-(maps * maps.log()).sum(1) / np.log(64)).mean().item()
    assert result.entropy == pytest.approx(entropy, abs=1e-12) and 0 < result.entropy <= 1
    assert result.example_images.shape == (3, 3, 32, 32) and result.num_images == 16
