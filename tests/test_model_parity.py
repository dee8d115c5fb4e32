"""clipforge's CLIP against open_clip's (same architecture, same weights -> same embeddings), plus the model
features that come with it: ResNet tower, presets, JSON configs, patch dropout, activation checkpointing.

CPU only, randomly initialised weights (nothing is downloaded: open_clip gets pretrained=None).
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from trainer.clip.model import CLIP, PRESETS, CLIPConfig, VisionConfig, get_config, load_config_file
from trainer.parallel import apply_activation_checkpointing
from trainer.clip.tokenizer import tokenize
from helpers import loss_and_grads

open_clip = pytest.importorskip("open_clip")

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
OPEN_CLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"


@pytest.fixture(autouse=True)
def _quiet_open_clip(caplog):
    caplog.set_level("ERROR")  # "No pretrained weights loaded" warnings


def small_resnet_config() -> CLIPConfig:
    cfg = get_config("tiny")
    cfg.vision = VisionConfig(image_size=64, width=16, layers=(1, 2, 1, 1), heads=16 * 32 // 64)
    return cfg


def with_quick_gelu(cfg: CLIPConfig, value: bool) -> CLIPConfig:
    return CLIPConfig.from_dict({**cfg.to_dict(), "quick_gelu": value})


def with_patch_dropout(cfg: CLIPConfig, p: float) -> CLIPConfig:
    d = cfg.to_dict()
    d["vision"]["patch_dropout"] = p
    return CLIPConfig.from_dict(d)


def open_clip_cfg(cfg: CLIPConfig) -> dict:
    """The open_clip model-config dict for a clipforge config (the inverse of load_config_file's mapping)."""
    v, t = cfg.vision, cfg.text
    attn_width = v.width * 32 if v.is_resnet else v.width
    vision = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers, "width": v.width,
              "patch_size": v.patch_size, "head_width": attn_width // v.heads, "mlp_ratio": v.mlp_ratio}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, "vision_cfg": vision, "text_cfg": text}


def build_open_clip(cfg_or_name):
    if isinstance(cfg_or_name, str):
        return open_clip.create_model(cfg_or_name, pretrained=None)
    d = open_clip_cfg(cfg_or_name)
    return open_clip.model.CLIP(d["embed_dim"], d["vision_cfg"], d["text_cfg"], quick_gelu=d["quick_gelu"])


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Make BatchNorm non-trivial (bn3 starts at zero; running stats at 0/1) and move logit_scale off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + torch.rand(m.running_var.shape, generator=g))
        model.logit_scale.fill_(3.3)


def inputs(cfg: CLIPConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    images = (torch.rand(2, 3, size, size, generator=g) - MEAN) / STD
    tokens = tokenize(["a photo of a dog", "a diagram", "two cats sleeping on a red sofa"], cfg.text.context_length)
    return images, tokens


def assert_same_embeddings(ours: CLIP, theirs, cfg: CLIPConfig, atol: float = 1e-5):
    images, tokens = inputs(cfg)
    with torch.no_grad():
        img_a, img_b = ours.encode_image(images), theirs.encode_image(images)
        txt_a, txt_b = ours.encode_text(tokens), theirs.encode_text(tokens)
        scale_a, scale_b = ours.logit_scale.exp(), theirs.logit_scale.exp()
    assert img_a.shape == img_b.shape == (2, cfg.embed_dim)
    assert txt_a.shape == txt_b.shape == (3, cfg.embed_dim)
    assert (img_a - img_b).abs().max().item() <= atol
    assert (txt_a - txt_b).abs().max().item() <= atol
    assert (scale_a - scale_b).abs().item() <= atol
    return (img_a, txt_a), (img_b, txt_b)


def load_ours_into_theirs(ours: CLIP, theirs) -> None:
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)  # 1:1 keys (open_clip's attn_mask is a non-persistent buffer)
    for k in ours_sd:
        assert ours_sd[k].shape == theirs_sd[k].shape, k
    theirs.load_state_dict(ours_sd, strict=True)


@pytest.mark.parametrize("name", ["tiny", "small-resnet", "ViT-B-32", "RN50"])
def test_same_embeddings_as_open_clip(name):
    cfg = small_resnet_config() if name == "small-resnet" else get_config(name)
    torch.manual_seed(0)
    ours = CLIP(cfg).eval()
    randomise_(ours)
    theirs = build_open_clip(cfg if name in ("tiny", "small-resnet") else name).eval()
    load_ours_into_theirs(ours, theirs)
    assert_same_embeddings(ours, theirs, cfg)


def test_open_clip_weights_load_into_clipforge_unrenamed():
    """The other direction: an open_clip RN state dict loads strictly into clipforge (the OpenAI key layout)."""
    cfg = small_resnet_config()
    torch.manual_seed(1)
    theirs = build_open_clip(cfg).eval()
    randomise_(theirs)
    ours = CLIP(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert "visual.layer2.0.downsample.0.weight" in ours.state_dict()  # conv; .1 is its BN (AvgPool is "-1")
    assert_same_embeddings(ours, theirs, cfg)


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny-vit", "RN50-quickgelu"])
def test_quickgelu_is_respected(tiny):
    if tiny:  # the ViT tower and the text tower both use the activation
        cfg = get_config("tiny")
        cfg.quick_gelu = True
        quick, gelu = build_open_clip(cfg), build_open_clip(with_quick_gelu(cfg, False))
    else:  # a -quickgelu preset vs open_clip's models of the same name (only the text tower has an MLP)
        cfg = get_config("RN50-quickgelu")
        quick, gelu = build_open_clip("RN50-quickgelu"), build_open_clip("RN50")
    assert cfg.quick_gelu
    torch.manual_seed(0)
    ours = CLIP(cfg).eval()
    randomise_(ours)
    load_ours_into_theirs(ours, quick.eval())
    (_, txt), _ = assert_same_embeddings(ours, quick, cfg)
    load_ours_into_theirs(ours, gelu.eval())
    images, tokens = inputs(cfg)
    with torch.no_grad():
        assert (gelu.encode_text(tokens) - txt).abs().max().item() > 1e-3  # GELU is a different model


def test_resnet_structure_and_parameter_count():
    model = CLIP(get_config("RN50"))
    assert sum(p.numel() for p in model.parameters()) == 102_007_137  # OpenAI RN50
    v = model.visual
    assert type(v).__name__ == "ModifiedResNet"
    assert [len(s) for s in (v.layer1, v.layer2, v.layer3, v.layer4)] == [3, 4, 6, 3]
    assert v.attnpool.positional_embedding.shape == (7 * 7 + 1, 2048) and v.attnpool.heads == 32
    assert all(b.bn3.weight.abs().sum() == 0 for s in (v.layer1, v.layer2, v.layer3, v.layer4) for b in s)
    assert model.visual.conv1.weight.shape == (32, 3, 3, 3)
    assert type(v.layer2[0].downsample[0]).__name__ == "AvgPool2d"  # downsample = AvgPool, 1x1 conv, BN


# ------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("name", ["tiny", "small-resnet"])
def test_activation_checkpointing_same_loss_grads_and_running_stats(name, policy):
    cfg = small_resnet_config() if name == "small-resnet" else get_config("tiny")
    torch.manual_seed(0)
    ref = CLIP(cfg).train()
    randomise_(ref)
    ckpt = copy.deepcopy(ref)
    keys = list(ckpt.state_dict())
    n_blocks = 8 if name == "tiny" else 4 + 5  # text blocks + Bottlenecks
    assert apply_activation_checkpointing(ckpt, policy=policy) == n_blocks
    assert apply_activation_checkpointing(ckpt, policy=policy) == 0  # idempotent
    assert list(ckpt.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    tokens = tokenize([f"a photo of {i} dogs" for i in range(4)], context_length=32)
    loss_a, grads_a = loss_and_grads(ref, images, tokens)
    loss_b, grads_b = loss_and_grads(ckpt, images, tokens)
    torch.testing.assert_close(loss_a, loss_b)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], msg=n)
    # BatchNorm running stats got exactly one update (the recomputation in backward does not update them)
    for (n, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), n
    if name == "small-resnet":
        assert ckpt.visual.layer1[0].bn1.num_batches_tracked.item() == 1


# ------------------------------------------------------------------------------------------- patch dropout
def test_patch_dropout():
    cfg = get_config("tiny")
    cfg.vision.patch_dropout = 0.5
    torch.manual_seed(0)
    model = CLIP(cfg)
    images, tokens = inputs(cfg)
    seen = []
    model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model.eval()
    with torch.no_grad():
        eval_out = model.encode_image(images)
    plain = CLIP(with_patch_dropout(cfg, 0.0))
    plain.load_state_dict(model.state_dict())  # patch dropout adds no parameters
    plain.train()  # p == 0 is the identity even while training
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), eval_out)
    assert seen == [1 + 64]
    model.train()
    img, txt, scale = model(images, tokens)
    assert seen[-1] == 1 + 32  # class token + half of the 64 patches
    (scale * img @ txt.T).sum().backward()
    assert model.visual.conv1.weight.grad is not None and model.visual.class_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ViT"):
        VisionConfig(image_size=64, width=16, layers=(1, 1, 1, 1), heads=8, patch_dropout=0.5)


# ------------------------------------------------------------------------------------------- configs
def test_presets():
    for name in ["tiny", "small", "ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "RN50", "RN101",
                 "ViT-L-14-336"] + [f"{n}-quickgelu" for n in ["RN50", "RN101", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]]:
        assert name in PRESETS, name
        assert PRESETS[name].quick_gelu == name.endswith("-quickgelu")
    rn50 = PRESETS["RN50"]
    assert rn50.embed_dim == 1024 and rn50.vision.layers == (3, 4, 6, 3) and rn50.vision.width == 64
    assert rn50.vision.is_resnet and rn50.vision.patch_size is None and rn50.text.width == 512
    assert PRESETS["RN101"].vision.layers == (3, 4, 23, 3) and PRESETS["RN101"].embed_dim == 512
    l14 = PRESETS["ViT-L-14-336"]
    assert (l14.embed_dim, l14.vision.image_size, l14.vision.patch_size, l14.vision.width) == (768, 336, 14, 1024)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = get_config(name)
    again = CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and type(again.vision.layers) is type(cfg.vision.layers)
    # each preset with an open_clip namesake has open_clip's numbers
    oc_file = OPEN_CLIP_CONFIGS / f"{name}.json"
    if oc_file.is_file():
        assert load_config_file(oc_file) == cfg


def test_load_config_file_layouts(tmp_path):
    oc = {"embed_dim": 256, "quick_gelu": True,
          "vision_cfg": {"image_size": [96, 96], "layers": [2, 2, 2, 2], "width": 32, "patch_size": None,
                         "head_width": 64},
          "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 3}}
    (tmp_path / "oc.json").write_text(json.dumps(oc))
    cfg = get_config(tmp_path / "oc.json")
    assert cfg.quick_gelu and cfg.embed_dim == 256
    assert cfg.vision == VisionConfig(image_size=96, patch_size=None, width=32, layers=(2, 2, 2, 2), heads=16)
    assert (cfg.text.context_length, cfg.text.width, cfg.text.heads, cfg.text.layers) == (40, 256, 4, 3)
    CLIP(cfg)  # buildable
    # clipforge's own layout (what checkpoints' config.json hold, "format" marker included)
    (tmp_path / "cf.json").write_text(json.dumps({"format": "clipforge.clip.v1", **get_config("RN101").to_dict()}))
    assert get_config(str(tmp_path / "cf.json")) == get_config("RN101")
    # HF-hub open_clip_config.json wraps the model config
    (tmp_path / "hub.json").write_text(json.dumps({"model_cfg": oc, "preprocess_cfg": {}}))
    assert load_config_file(tmp_path / "hub.json") == cfg
    # options clipforge does not implement are refused, not silently dropped
    bad = copy.deepcopy(oc)
    bad["vision_cfg"]["ls_init_value"] = 1e-5
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="ls_init_value"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(KeyError):
        get_config("nope")
    with pytest.raises(FileNotFoundError):
        get_config(tmp_path / "missing.json")


def test_logit_scale_default():
    assert CLIP(small_resnet_config()).logit_scale.item() == pytest.approx(math.log(1 / 0.07))
