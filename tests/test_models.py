"""Model shapes, probabilities, parameter count, gradients and ViT weight loading (CPU, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer, _load_weights

from lcmap.errors import LcmapInputError
from lcmap.models import build_model, predict_proba
from lcmap.models.paraformer import CONFIGS, build_paraformer
from lcmap.models.vit_weights import load_vit_weights

TINY = CONFIGS["paraformer-tiny"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("bands", [3, 4, 6])
@pytest.mark.parametrize("size", [64, 128, 224])
def test_tiny_output_shapes(bands: int, size: int) -> None:
    model = build_model("paraformer-tiny", bands, 5).eval()
    with torch.no_grad():
        out = model(torch.randn(2 if size < 224 else 1, bands, size, size))
    assert isinstance(out, list) and len(out) == 2
    for logits in out:
        assert logits.shape == (2 if size < 224 else 1, 5, size, size)
        assert torch.isfinite(logits).all()


def test_tiny_non_square_input() -> None:
    model = build_model("paraformer-tiny", 4, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 64, 96))
    assert [o.shape for o in out] == [(1, 3, 64, 96)] * 2


@pytest.mark.parametrize("bands", [3, 4, 6])
def test_unet_output_shapes(bands: int) -> None:
    model = build_model("unet", bands, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, bands, 64, 64))
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == (1, 7, 64, 64)


@pytest.mark.parametrize("size", [(100, 100), (128, 120)])
def test_size_not_multiple_of_16_raises(size: tuple[int, int]) -> None:
    model = build_model("paraformer-tiny", 4, 3).eval()
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        model(torch.randn(1, 4, *size))


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("paraformer-huge", 4, 3)


@pytest.mark.parametrize("name", ["paraformer-tiny", "unet"])
def test_predict_proba_sums_to_one(name: str) -> None:
    model = build_model(name, 4, 6).eval()
    with torch.no_grad():
        probs = predict_proba(model, torch.randn(2, 4, 64, 64))
    assert probs.shape == (2, 6, 64, 64)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 64, 64))


def test_paper_size_parameter_count() -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = build_paraformer("paraformer", 4, 17)
    counts = model.branch_parameters()
    assert 135e6 < counts["total"] < 150e6
    # Paper: CNN 34.2 M, ViT 85.1 M (+ token projection), decoder 22.4 M.
    assert 33e6 < counts["cnn"] < 36e6
    assert 85e6 < counts["vit"] < 88e6
    assert 21e6 < counts["decoder"] < 24e6


def test_tiny_is_small() -> None:
    model = build_paraformer("paraformer-tiny", 4, 17)
    assert sum(p.numel() for p in model.parameters()) < 6e6


def test_gradients_reach_both_heads_and_both_branches() -> None:
    model = build_model("paraformer-tiny", 4, 3).train()
    head1, head2 = model(torch.randn(2, 4, 64, 64))
    head1.square().mean().backward(retain_graph=True)
    dec = model.decoder
    assert dec.head1_out.weight.grad.abs().sum() > 0
    assert dec.head2_out.weight.grad is None
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.cnn.stem[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    head2.square().mean().backward()
    assert dec.head2_out.weight.grad.abs().sum() > 0
    assert dec.head1_out.weight.grad is None
    assert model.vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.cnn.blocks[0].path5[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- ViT weights


def _timm_vit(
    hidden: int = TINY.hidden_size, depth: int = TINY.num_layers, heads: int = TINY.num_heads, img_size: int = 224
) -> VisionTransformer:
    torch.manual_seed(1)
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=16,
        embed_dim=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=TINY.mlp_dim / TINY.hidden_size,
        qkv_bias=True,
        num_classes=10,
    )
    with torch.no_grad():  # timm zero-inits biases / norms: randomise so the copy check means something
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit


def _to_google_npz(vit: VisionTransformer, path) -> None:
    """Write a timm ViT in the layout of Google's ImageNet-21k ``ViT-B_16.npz``."""
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d = vit.embed_dim
    h = vit.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(vit.blocks)):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[g + "LayerNorm_0/scale"] = sd[b + "norm1.weight"]
        out[g + "LayerNorm_0/bias"] = sd[b + "norm1.bias"]
        out[g + "LayerNorm_2/scale"] = sd[b + "norm2.weight"]
        out[g + "LayerNorm_2/bias"] = sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[g + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(d, h, d // h)
            out[g + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(h, d // h)
        out[g + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        out[g + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[g + f"MlpBlock_3/{dense}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            out[g + f"MlpBlock_3/{dense}/bias"] = sd[b + f"mlp.{fc}.bias"]
    np.savez(path, **out)


def _write(vit: VisionTransformer, path, fmt: str) -> None:
    if fmt == "pth":
        torch.save({"epoch": 3, "state_dict": vit.state_dict()}, path)
    elif fmt == "pt":
        torch.save({"model": {f"module.{k}": v for k, v in vit.state_dict().items()}}, path)
    elif fmt == "bin":
        torch.save(vit.state_dict(), path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    elif fmt == "npz":
        _to_google_npz(vit, path)
    else:
        raise AssertionError(fmt)


def test_npz_writer_matches_timm_reader(tmp_path) -> None:
    """The test's Google-layout writer is read back identically by timm's own npz loader."""
    vit = _timm_vit()
    _to_google_npz(vit, tmp_path / "vit.npz")
    other = VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=vit.blocks[0].attn.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=10,
    )
    _load_weights(other, str(tmp_path / "vit.npz"))
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("fmt", ["pth", "pt", "bin", "safetensors", "npz"])
def test_load_vit_weights_all_formats(tmp_path, fmt: str) -> None:
    vit = _timm_vit()
    path = tmp_path / f"vit.{fmt}"
    _write(vit, path, fmt)
    model = build_paraformer("paraformer-tiny", 4, 3)
    token_proj_before = model.vit.token_proj.weight.clone()
    info = load_vit_weights(model, path)
    n_block = len(vit.blocks[0].state_dict())
    assert info["loaded"] == TINY.num_layers * n_block + 2 + 1  # blocks, final norm, pos_embed
    assert info["missing"] == 0
    assert info["skipped"] >= 4  # patch embedding, CLS token, head
    for i in range(TINY.num_layers):
        for key, value in vit.blocks[i].state_dict().items():
            torch.testing.assert_close(model.vit.blocks[i].state_dict()[key], value, msg=f"{i}.{key}")
    torch.testing.assert_close(model.vit.norm.weight, vit.norm.weight)
    torch.testing.assert_close(model.vit.pos_embed, vit.pos_embed[:, 1:])  # same 14x14 grid, CLS dropped
    torch.testing.assert_close(model.vit.token_proj.weight, token_proj_before)  # trained from scratch
    # The loaded encoder computes what timm's does on the same tokens.
    tokens = torch.randn(1, 5, TINY.hidden_size)
    model.eval()
    vit.eval()
    with torch.no_grad():
        ours, ref = tokens, tokens
        for a, b in zip(model.vit.blocks, vit.blocks, strict=True):
            ours, ref = a(ours), b(ref)
    torch.testing.assert_close(ours, ref)


def test_build_with_vit_weights_and_grid_resize(tmp_path) -> None:
    vit = _timm_vit(img_size=64)  # 4x4 grid + CLS: resized to the model's 14x14 base grid
    _write(vit, tmp_path / "vit.npz", "npz")
    model = build_model("paraformer-tiny", 4, 3, vit_weights=tmp_path / "vit.npz").eval()
    assert model.vit.pos_embed.shape == (1, 14 * 14, TINY.hidden_size)
    torch.testing.assert_close(model.vit.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 64, 64))[1].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("fmt", ["pth", "npz"])
@pytest.mark.parametrize("what", ["hidden", "depth"])
def test_wrong_size_vit_file_raises(tmp_path, fmt: str, what: str) -> None:
    vit = _timm_vit(hidden=96, heads=3) if what == "hidden" else _timm_vit(depth=TINY.num_layers + 2)
    path = tmp_path / f"vit.{fmt}"
    _write(vit, path, fmt)
    model = build_paraformer("paraformer-tiny", 4, 3)
    before = model.vit.blocks[0].attn.qkv.weight.clone()
    with pytest.raises(LcmapInputError, match="does not fit the model") as err:
        load_vit_weights(model, path)
    assert str(path) in str(err.value)
    assert ("96" in str(err.value) and "192" in str(err.value)) if what == "hidden" else "6" in str(err.value)
    torch.testing.assert_close(model.vit.blocks[0].attn.qkv.weight, before)  # nothing half-loaded


def test_wrong_heads_npz_raises(tmp_path) -> None:
    vit = _timm_vit(heads=6)
    _write(vit, tmp_path / "vit.npz", "npz")
    with pytest.raises(LcmapInputError, match="heads"):
        load_vit_weights(build_paraformer("paraformer-tiny", 4, 3), tmp_path / "vit.npz")


def test_missing_unknown_and_non_vit_files_raise(tmp_path) -> None:
    model = build_paraformer("paraformer-tiny", 4, 3)
    with pytest.raises(LcmapInputError, match="does not exist"):
        load_vit_weights(model, tmp_path / "nope.pth")
    (tmp_path / "vit.h5").write_bytes(b"\x89HDF")
    with pytest.raises(LcmapInputError, match="unknown format"):
        load_vit_weights(model, tmp_path / "vit.h5")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LcmapInputError, match="junk.pth"):
        load_vit_weights(model, tmp_path / "junk.pth")
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "cnn.pth")
    with pytest.raises(LcmapInputError, match="no timm ViT encoder"):
        load_vit_weights(model, tmp_path / "cnn.pth")
    with pytest.raises(ValueError, match="ViT weights|Paraformer"):
        build_model("unet", 4, 3, vit_weights=tmp_path / "cnn.pth")


def test_sum_probabilities_per_target_class_of_a_legend():
    from lcmap.geodata.legends import get_legend
    from lcmap.models import sum_probabilities

    nlcd = get_legend("nlcd")
    group = nlcd.index_to_target_group()
    n_target = len(nlcd.target)
    assert group[nlcd.codes.index(12)] == n_target  # perennial ice/snow: no target class
    assert group[nlcd.codes.index(41)] == nlcd.target.index_of("tree canopy")
    probs = torch.softmax(torch.randn(2, len(nlcd), 3, 4), dim=1)
    summed = sum_probabilities(probs, torch.from_numpy(group), n_target + 1)
    assert summed.shape == (2, n_target + 1, 3, 4)
    low = [i for i, c in enumerate(nlcd.classes) if c.target == "low vegetation"]
    assert torch.allclose(summed[:, nlcd.target.index_of("low vegetation")], probs[:, low].sum(1))
    assert torch.allclose(summed.sum(1), torch.ones(2, 3, 4))


def test_sum_probabilities_reuses_the_buffer_it_is_given():
    from lcmap.models import sum_probabilities

    probs = torch.softmax(torch.randn(2, 5, 3, 4), dim=1)
    group = torch.tensor([0, 0, 1, 2, 1])
    first = sum_probabilities(probs, group, 3)
    again = sum_probabilities(probs * 0 + 0.2, group, 3, out=first)
    assert again.data_ptr() == first.data_ptr()  # reused, and zeroed before summing
    assert torch.allclose(again, torch.tensor([0.4, 0.4, 0.2]).view(1, 3, 1, 1).expand(2, 3, 3, 4))


@pytest.mark.parametrize("name", ["unet", "paraformer-tiny"])
def test_checkpoint_weights_load_without_random_initialisation(name: str) -> None:
    from lcmap.models import build_model_with_weights

    torch.manual_seed(0)
    model = build_model(name, 4, 3).eval()
    state = model.state_dict()
    loaded = build_model_with_weights(name, 4, 3, dict(state)).eval()
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x), strict=True))
    with pytest.raises(RuntimeError):  # strict: a missing weight is an error, not a random tensor
        build_model_with_weights(name, 4, 3, {k: v for k, v in list(state.items())[1:]})
