"""LeViT: timm's models analysable in vitlab, and the 32x32 variants."""

import pytest
import timm
import torch

from vitlab import VitlabError, count_parameters, create_model
from vitlab.anatomy import anatomy
from vitlab.capture import Capture, Store
from vitlab.models.levit import levit_attention_probs
from vitlab.train import DataConfig, TrainConfig, train


@pytest.mark.parametrize("name,expected", [("levit_128s", 7_777_058), ("levit_256", 18_893_876)])
def test_timm_levit_counts(name, expected):
    # ../shared/reference/models.md: timm counts the unfused training model (distillation head included)
    assert count_parameters(name) == expected


def test_anatomy_of_timm_levit():
    a = anatomy(timm.create_model("levit_128s"))
    assert a.family == "levit" and a.image_size == (224, 224) and a.grid == (14, 14)
    assert [s.label for s in a.layers][:4] == ["stem", "s1.b1", "s1.b2", "s2.down"]
    assert len(a.layers) == 1 + 2 + 1 + 3 + 1 + 4
    assert [(s.grid, s.num_heads) for s in a.attention][::3] == [((14, 14), 4), ((7, 7), 6), ((4, 4), 8)]


@pytest.mark.parametrize("name", ["levit_128s_32", "levit_128s"])
def test_recomputed_attention_reproduces_the_block(name):
    """The probabilities the hook recomputes are the ones the block uses: probs @ v gives its output."""
    model = timm.create_model(name).eval()
    a = anatomy(model)
    attn_store, layer_store, inputs = Store(), Store(), {}
    block = model.stages[1].blocks[0].attn
    block.register_forward_hook(lambda m, i, o: inputs.update(x=i[0], out=o))
    with Capture(model, a.layer_names, layer_store, a.attention, attn_store), torch.no_grad():
        model(torch.randn(2, 3, *a.image_size))
    probs = attn_store["stages.1.blocks.0.attn"]
    n = a.attention[2].grid[0] * a.attention[2].grid[1]
    assert probs.shape == (2, block.num_heads, n, n)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, block.num_heads, n))
    x = inputs["x"]
    with torch.no_grad():
        _, _, v = block.qkv(x).view(2, n, block.num_heads, -1).split([block.key_dim, block.key_dim, block.val_dim], 3)
        out = block.proj((probs @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(2, n, block.val_attn_dim))
    torch.testing.assert_close(out, inputs["out"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(levit_attention_probs(block, (x,)), probs)


def test_levit_32_variants_keep_a_token_grid():
    model = create_model("levit_128s_32")
    a = anatomy(model)
    assert [s.grid for s in a.attention][::3] == [(8, 8), (4, 4), (2, 2)]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    with pytest.raises(VitlabError, match="takes 32x32 images, got 224x224"):
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(VitlabError, match="takes 224x224 images, got 32x32"):
        create_model("levit_128s")(torch.randn(1, 3, 32, 32))


def test_levit_32_trains(tmp_path):
    cfg = TrainConfig(model="levit_128s_32", epochs=1, batch_size=16, data=DataConfig(num_train=32, num_val=16))
    result = train(cfg, tmp_path / "run", progress=False)
    assert len(result.metrics) == 1 and (tmp_path / "run" / "model.safetensors").exists()
