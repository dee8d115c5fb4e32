import json
import math

import pytest
import torch
from PIL import Image

from trainer.clip.checkpoint import CheckpointError, load_model, load_pretrained, save_model
from trainer.clip.model import CLIP, CLIPConfig, PRESETS, get_config
from trainer.parallel import apply_activation_checkpointing
from trainer.clip.tokenizer import tokenize
from trainer.clip.transform import image_transform
from helpers import loss_and_grads


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CLIP(get_config("tiny"))


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=g)
    tokens = tokenize([f"a photo of {i} dogs" for i in range(n)], context_length=32)
    return images, tokens


def test_shapes_and_normalisation():
    model = tiny_model()
    images, tokens = batch()
    assert model.encode_image(images).shape == (4, 128)
    assert model.encode_text(tokens).shape == (4, 128)
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (4, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    assert scale.ndim == 0


def test_vit_b32_parameter_count_matches_paper_model():
    n = sum(p.numel() for p in CLIP(get_config("ViT-B-32")).parameters())
    assert abs(n - 151_277_313) < 1000  # OpenAI ViT-B/32


def test_openai_key_layout():
    keys = set(tiny_model().state_dict())
    for k in ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
              "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.bias",
              "visual.transformer.resblocks.3.mlp.c_fc.weight", "visual.transformer.resblocks.3.mlp.c_proj.weight",
              "visual.ln_post.bias", "visual.proj", "token_embedding.weight", "positional_embedding",
              "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.ln_2.bias", "ln_final.weight",
              "text_projection", "logit_scale"]:
        assert k in keys, k


def test_logit_scale_init_and_clamp():
    model = tiny_model()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images, tokens = batch()
    assert model(images, tokens)[2].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(images, tokens)[2].item() == pytest.approx(100.0)
    assert model.logit_scale.item() == 10.0  # the parameter itself is never edited


def test_text_features_read_at_end_token():
    model = tiny_model().eval()
    t1 = tokenize(["a dog"], 32)
    t2 = t1.clone()
    t2[0, 5:] = 7  # junk after the end token must not matter (causal mask)
    torch.testing.assert_close(model.encode_text(t1), model.encode_text(t2))


def test_quick_gelu_is_configurable():
    cfg = get_config("tiny")
    cfg.quick_gelu = True
    assert type(CLIP(cfg).visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert "ViT-B-32" in PRESETS and PRESETS["ViT-B-32-quickgelu"].quick_gelu


def test_config_round_trip():
    cfg = get_config("tiny")
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(KeyError):
        get_config("nope")


def test_activation_checkpointing_same_loss_grads_and_keys():
    images, tokens = batch()
    ref = tiny_model()
    ckpt = tiny_model()
    keys = list(ckpt.state_dict())
    assert apply_activation_checkpointing(ckpt) == 8
    assert apply_activation_checkpointing(ckpt) == 0  # idempotent
    assert list(ckpt.state_dict()) == keys
    loss_a, grads_a = loss_and_grads(ref, images, tokens)
    loss_b, grads_b = loss_and_grads(ckpt, images, tokens)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=3).eval()
    images, tokens = batch()
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        for a, b in zip(model(images, tokens), loaded(images, tokens)):
            assert torch.equal(a, b)
    model2, preprocess, tokenizer = load_pretrained(tmp_path / "ckpt")
    x = preprocess(Image.new("RGB", (120, 80), (200, 10, 10)))
    assert x.shape == (3, 64, 64)
    assert tokenizer(["a dog"]).shape == (1, 32)


def test_load_refuses_missing_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    save_model(tiny_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x80\x04garbage pickle-ish bytes")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "ck")
    save_model(tiny_model(), tmp_path / "ck2")
    (tmp_path / "ck2" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "ck2")
    # weights that do not match the config
    save_model(tiny_model(), tmp_path / "ck3")
    cfg = json.loads((tmp_path / "ck3" / "config.json").read_text())
    cfg["embed_dim"] = 64
    (tmp_path / "ck3" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "ck3")


def test_image_transform_eval_and_train():
    img = Image.new("RGBA", (100, 60), (255, 0, 0, 128))
    x = image_transform(64)(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    y = image_transform(64, train=True)(Image.new("L", (30, 200)))
    assert y.shape == (3, 64, 64)
    # eval is deterministic; a red image is red after normalisation
    assert torch.equal(x, image_transform(64)(img)) and x[0].mean() > x[1].mean()
