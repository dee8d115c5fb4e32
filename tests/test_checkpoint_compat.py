"""Checkpoint compatibility with open_clip, OpenAI-layout and Hugging Face transformers state dicts.

Everything is random-init on CPU (no weights are downloaded). Equality is checked on fp32 eval-mode embeddings.
"""
from __future__ import annotations

import json
import logging
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import trainer.clip.model
from trainer.clip import convert
from trainer.clip.checkpoint import (CheckpointError, export_hf, export_open_clip, export_safetensors, load_checkpoint,
                                load_model, read_state_dict, save_model)
from trainer.clip.model import CLIP, get_config
from trainer.clip.tokenizer import tokenize

open_clip = pytest.importorskip("open_clip")
TOL = 1e-5
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow on a sunny day", "x"]


def _inputs(image_size: int, context_length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, image_size, image_size, generator=g), tokenize(CAPTIONS, context_length=context_length)


def _oc_tiny(quick_gelu: bool):
    torch.manual_seed(1)
    return open_clip.model.CLIP(
        embed_dim=128, quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=4, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=4)).eval()


def _tiny(quick_gelu: bool = False) -> CLIP:
    cfg = get_config("tiny")
    cfg.quick_gelu = quick_gelu
    torch.manual_seed(2)
    return CLIP(cfg).eval()


@torch.no_grad()
def _assert_same(a, b, image_size: int, context_length: int):
    """a, b: models with encode_image/encode_text (clipforge or open_clip)."""
    images, tokens = _inputs(image_size, context_length)
    torch.testing.assert_close(a.encode_image(images), b.encode_image(images), atol=TOL, rtol=0)
    torch.testing.assert_close(a.encode_text(tokens), b.encode_text(tokens), atol=TOL, rtol=0)


def _meta_state(cfg) -> dict:
    with torch.device("meta"):
        return CLIP(cfg).state_dict()


# ----------------------------------------------------------------------------------------------- open_clip -> clipforge
def test_open_clip_tiny_files_load(tmp_path):
    oc = _oc_tiny(quick_gelu=True)
    sd = oc.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "train.pt")
    expected = get_config("tiny")
    expected.quick_gelu = True
    for name, kwargs in [("plain.pt", {}), ("plain.safetensors", {}), ("train.pt", {"quick_gelu": True})]:
        model = load_checkpoint(tmp_path / name, **kwargs)
        assert model.config == expected, name
        _assert_same(model, oc, 64, 32)


def test_open_clip_gelu_checkpoint_with_json_config(tmp_path):
    oc = _oc_tiny(quick_gelu=False)
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in oc.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_1.pth")
    model = load_checkpoint(tmp_path / "epoch_1.pth")  # wrapped open_clip training checkpoint: GELU by default
    assert model.config.quick_gelu is False and model.config.vision.heads == 4
    _assert_same(model, oc, 64, 32)
    # the open_clip JSON config sitting next to the file decides the architecture and the activation
    d = tmp_path / "oc"
    d.mkdir()
    torch.save(oc.state_dict(), d / "weights.bin")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 128, "quick_gelu": False,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}}))
    model = load_checkpoint(d / "weights.bin")
    assert model.config.quick_gelu is False
    _assert_same(model, oc, 64, 32)


def test_open_clip_custom_text_layout(tmp_path):
    torch.manual_seed(6)
    oc = open_clip.model.CustomTextCLIP(
        embed_dim=128, quick_gelu=True,
        vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=2, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2)).eval()
    assert "text.token_embedding.weight" in oc.state_dict()
    torch.save(oc.state_dict(), tmp_path / "custom.pt")
    cfg = get_config("tiny")
    cfg.vision.layers = cfg.text.layers = 2
    cfg.quick_gelu = True
    model = load_checkpoint(tmp_path / "custom.pt", config=cfg)
    _assert_same(model, oc, 64, 32)


def test_open_clip_vit_b32_loads_with_inferred_config(tmp_path):
    torch.manual_seed(3)
    oc = open_clip.create_model("ViT-B-32").eval()
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(tmp_path / "b32.safetensors"))
    model = load_checkpoint(tmp_path / "b32.safetensors", quick_gelu=False)
    assert model.config == get_config("ViT-B-32")
    _assert_same(model, oc, 224, 77)


@pytest.mark.skipif("RN50" not in trainer.clip.model.PRESETS, reason="trainer.clip.model has no RN50 preset yet")
def test_open_clip_rn50_round_trip(tmp_path):
    torch.manual_seed(4)
    oc = open_clip.create_model("RN50-quickgelu").eval()
    torch.save(oc.state_dict(), tmp_path / "rn50.pt")
    model = load_checkpoint(tmp_path / "rn50.pt")  # plain OpenAI-layout dict: QuickGELU by default
    assert model.config == get_config("RN50-quickgelu")
    _assert_same(model, oc, 224, 77)
    export_open_clip(model, tmp_path / "oc_dir")
    back = open_clip.create_model(f"local-dir:{tmp_path / 'oc_dir'}").eval()
    _assert_same(model, back, 224, 77)


# ----------------------------------------------------------------------------------------------- clipforge -> open_clip
def test_export_open_clip_file_and_dir(tmp_path):
    model = _tiny(quick_gelu=True)
    arch = {**convert.open_clip_model_config(model)}
    cfg_dir = tmp_path / "archs"
    cfg_dir.mkdir()
    (cfg_dir / "clipforge-tiny-compat-test.json").write_text(json.dumps(arch))
    open_clip.add_model_config(cfg_dir)
    for name in ("w.pt", "w.safetensors"):
        path = export_open_clip(model, tmp_path / name)
        oc = open_clip.create_model("clipforge-tiny-compat-test", pretrained=str(path)).eval()
        _assert_same(model, oc, 64, 32)
    # a directory: open_clip_config.json + open_clip_model.safetensors, loadable with no registered arch
    export_open_clip(model, tmp_path / "oc_dir")
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc_dir'}").eval()
    _assert_same(model, oc, 64, 32)
    again = load_checkpoint(tmp_path / "oc_dir")  # and back: config (quick_gelu) from open_clip_config.json
    assert again.config == model.config
    _assert_same(model, again, 64, 32)


# ----------------------------------------------------------------------------------------------- Hugging Face
def _hf_tiny(hidden_act: str):
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  hidden_act=hidden_act)
    cfg = transformers.CLIPConfig(
        text_config=dict(common, max_position_embeddings=32, vocab_size=49408, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=0),
        vision_config=dict(common, image_size=64, patch_size=8), projection_dim=128)
    torch.manual_seed(5)
    return transformers.CLIPModel(cfg).eval()


@torch.no_grad()
def _assert_same_as_hf(model, hf):
    images, tokens = _inputs(64, 32)
    torch.testing.assert_close(model.encode_image(images), hf.get_image_features(pixel_values=images).pooler_output,
                               atol=TOL, rtol=0)
    torch.testing.assert_close(model.encode_text(tokens), hf.get_text_features(input_ids=tokens).pooler_output,
                               atol=TOL, rtol=0)


def test_hf_state_dict_loads(tmp_path):
    hf = _hf_tiny("quick_gelu")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # bare: config inferred, QuickGELU default
    model = load_checkpoint(tmp_path / "pytorch_model.bin")
    assert model.config.quick_gelu is True and model.config.vision.heads == 4
    _assert_same_as_hf(model, hf)
    hf = _hf_tiny("gelu")  # a transformers dir: config.json decides (GELU here)
    hf.save_pretrained(tmp_path / "hf_dir")
    model = load_checkpoint(tmp_path / "hf_dir")
    assert model.config == convert.hf_config_to_clip_config(hf.config) and model.config.quick_gelu is False
    _assert_same_as_hf(model, hf)


def test_export_hf_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _tiny(quick_gelu=False)
    sd = export_hf(model, tmp_path / "hf")
    hf = transformers.CLIPModel(transformers.CLIPConfig(**convert.clip_config_to_hf_config(model.config))).eval()
    hf.load_state_dict(sd, strict=True)
    _assert_same_as_hf(model, hf)
    assert load_checkpoint(tmp_path / "hf").config == model.config


# ----------------------------------------------------------------------------------------------- config, resize, safety
@pytest.mark.parametrize("name", ["tiny", "small", "ViT-B-32", "ViT-L-14", "RN50", "RN101"])
def test_infer_config_from_shapes(name):
    if name not in trainer.clip.model.PRESETS:
        pytest.skip(f"trainer.clip.model has no {name} preset yet")
    cfg = get_config(name)
    assert convert.infer_config(_meta_state(cfg), quick_gelu=cfg.quick_gelu) == cfg


def test_native_dir_and_bare_safetensors(tmp_path):
    model = _tiny(quick_gelu=True)
    out = export_safetensors(model, tmp_path / "ck")
    assert load_checkpoint(out).config == model.config == load_model(out).config
    bare = tmp_path / "bare.safetensors"  # the config also travels in the safetensors metadata
    bare.write_bytes((out / "model.safetensors").read_bytes())
    loaded = load_checkpoint(bare)
    assert loaded.config == model.config
    _assert_same(model, loaded, 64, 32)


def test_position_embedding_resize_and_context_truncation(tmp_path, caplog):
    model = _tiny()
    save_model(model, tmp_path / "ck")
    cfg = get_config("tiny")
    cfg.vision.image_size, cfg.text.context_length = 96, 16
    with caplog.at_level(logging.WARNING, logger="trainer.clip.checkpoint"):
        big = load_checkpoint(tmp_path / "ck", config=cfg)
    assert "interpolated 65 -> 145" in caplog.text and "truncated" in caplog.text
    pe = big.visual.positional_embedding
    assert pe.shape == (1 + 12 * 12, 128)
    assert torch.equal(pe[0], model.visual.positional_embedding[0])  # class token kept
    assert torch.equal(big.positional_embedding, model.positional_embedding[:16])
    with torch.no_grad():
        assert big.encode_image(torch.randn(2, 3, 96, 96)).shape == (2, 128)
        assert big.encode_text(tokenize(CAPTIONS, context_length=16)).shape == (3, 128)
    same = convert.resize_grid_pos_embed(model.visual.positional_embedding.detach(), 65)
    torch.testing.assert_close(same, model.visual.positional_embedding.detach())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = _tiny().state_dict()
    torch.save({"state_dict": sd, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt") as z:  # the payload is really in there: os.system("touch ...")
        assert b"system" in z.read("evil/data.pkl")
    with pytest.raises(CheckpointError, match=r"refused.*could run arbitrary code \(.*system"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_inputs_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        load_checkpoint(tmp_path / "w.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still the OpenAI format
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "jit.pt"))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_checkpoint(tmp_path / "jit.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP state dict"):
        load_checkpoint(tmp_path / "other.pt")
    sd = _tiny().state_dict()
    del sd["visual.ln_post.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing.*visual.ln_post.bias"):
        load_checkpoint(tmp_path / "partial.pt", config=get_config("tiny"))
    with pytest.raises(CheckpointError, match="does not match"):  # a ViT-B-32 config for tiny weights
        load_checkpoint(tmp_path / "partial.pt", config=get_config("small"))
