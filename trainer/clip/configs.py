"""Typed CLIP model configs: the dataclasses, the presets (the paper's towers, open_clip names) and user-defined
configs from JSON files (clipforge's layout or open_clip's model-config layout). No torch here."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

@dataclass
class VisionConfig:
    """One dataclass for both image towers; the type of `layers` picks the tower.

    ViT:    layers = int (transformer depth), width = transformer width, heads = attention heads,
            patch_size = patch side in pixels.
    ResNet: layers = 4 ints (Bottleneck blocks per stage, e.g. (3, 4, 6, 3) for RN50), width = stem width
            (64; the last stage has width * 32 channels), heads = attention-pool heads (width * 32 // 64),
            patch_size = None (set automatically), patch_dropout must be 0.
    A list for `layers` (JSON has no tuples) is normalised to a tuple, so configs round-trip through JSON.
    """

    image_size: int = 224
    patch_size: int | None = 32
    width: int = 768
    layers: int | tuple[int, int, int, int] = 12
    heads: int = 12
    mlp_ratio: float = 4.0  # ViT only
    patch_dropout: float = 0.0  # ViT only (FLIP): fraction of patch tokens dropped while training

    def __post_init__(self):
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if isinstance(self.layers, (list, tuple)):
            self.layers = tuple(int(n) for n in self.layers)
            if len(self.layers) != 4:
                raise ValueError(f"ResNet layers must be 4 stage depths, got {self.layers}")
            if self.patch_dropout:
                raise ValueError("patch_dropout is only supported by the ViT tower")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
            self.patch_size = None  # meaningless for a ResNet
        else:
            if not self.patch_size or self.image_size % self.patch_size:
                raise ValueError(f"ViT image_size {self.image_size} must be a multiple of patch_size "
                                 f"{self.patch_size}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (tuple, list))


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # OpenAI weights use QuickGELU; it is saved with the weights (config.json)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        def pick(klass, sub: dict):
            names = {f.name for f in fields(klass)}
            unknown = set(sub) - names
            if unknown:
                raise ValueError(f"unknown {klass.__name__} keys: {sorted(unknown)}")
            return klass(**sub)

        d = dict(d)
        vision = pick(VisionConfig, d.pop("vision", {}))
        text = pick(TextConfig, d.pop("text", {}))
        top = pick(cls, {k: v for k, v in d.items() if k in {"embed_dim", "quick_gelu"}})
        return cls(embed_dim=top.embed_dim, vision=vision, text=text, quick_gelu=top.quick_gelu)

    @classmethod
    def from_open_clip_dict(cls, d: dict) -> "CLIPConfig":
        """Read open_clip's model-config layout ({"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}).

        Options clipforge does not implement raise ValueError unless they hold open_clip's default value.
        """
        d = dict(d.get("model_cfg", d))  # open_clip_config.json on the HF hub wraps it in "model_cfg"
        v, t = dict(d.pop("vision_cfg", {})), dict(d.pop("text_cfg", {}))
        _check_neutral("model", d, {"embed_dim", "quick_gelu", "custom_text"}, _OC_TOP_DEFAULTS)
        _check_neutral("vision_cfg", v, {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio",
                                         "patch_dropout"}, _OC_VISION_DEFAULTS)
        _check_neutral("text_cfg", t, {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
                       _OC_TEXT_DEFAULTS)
        size = v.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square images are supported, got image_size {size}")
            size = size[0]
        layers, width = v.get("layers", 12), v.get("width", 768)
        head_width = v.get("head_width", 64)
        resnet = isinstance(layers, (list, tuple))
        vision = VisionConfig(
            image_size=size, patch_size=None if resnet else v.get("patch_size", 16), width=width, layers=layers,
            heads=(width * 32 if resnet else width) // head_width, mlp_ratio=v.get("mlp_ratio", 4.0),
            patch_dropout=v.get("patch_dropout", 0.0),
        )
        text = TextConfig(**{k: t[k] for k in ("context_length", "vocab_size", "width", "heads", "layers",
                                                "mlp_ratio") if k in t})
        return cls(embed_dim=d["embed_dim"], vision=vision, text=text, quick_gelu=bool(d.get("quick_gelu", False)))


# open_clip options accepted only at these (default) values; any other value changes the architecture.
_OFF = (None, False)
_OC_BLOCK = {k: _OFF for k in ("ls_init_value", "final_ln_after_pool", "output_tokens", "act_kwargs", "norm_kwargs",
                                "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                                "scale_fc")} | {"block_type": (None, "default")}
_OC_TOP_DEFAULTS = {"init_logit_bias": _OFF, "nonscalar_logit_scale": _OFF, "cast_dtype": _OFF}
_OC_VISION_DEFAULTS = _OC_BLOCK | {k: _OFF for k in ("attentional_pool", "no_ln_pre", "timm_model_name")} | {
    "pos_embed_type": ("learnable",), "pool_type": ("tok",)}
_OC_TEXT_DEFAULTS = _OC_BLOCK | {k: _OFF for k in ("hf_model_name", "hf_tokenizer_name", "tokenizer_mode",
                                                   "tokenizer_kwargs", "embed_cls", "no_causal_mask", "proj_bias")} | {
    "pad_id": (0,), "pool_type": ("argmax",), "proj_type": ("linear", None)}


def _check_neutral(where: str, d: dict, supported: set, accepted: dict[str, tuple]) -> None:
    for k, value in d.items():
        if k in supported:
            continue
        if k not in accepted:
            raise ValueError(f"unknown open_clip {where} option {k!r}")
        if value not in accepted[k]:
            raise ValueError(f"open_clip {where} option {k}={value!r} is not supported by clipforge")


def _vit(image_size: int, patch_size: int, width: int, layers: int, heads: int) -> VisionConfig:
    return VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads)


def _resnet(layers: tuple[int, int, int, int], image_size: int = 224, width: int = 64) -> VisionConfig:
    return VisionConfig(image_size=image_size, patch_size=None, width=width, layers=layers, heads=width * 32 // 64)


PRESETS: dict[str, CLIPConfig] = {
    # CPU-fast: 64 px images, 8 px patches -> 64 tokens + class token; 32-token captions.
    "tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4),
        text=TextConfig(context_length=32, width=128, layers=4, heads=4),
    ),
    "small": CLIPConfig(
        embed_dim=256,
        vision=VisionConfig(image_size=128, patch_size=16, width=384, layers=6, heads=6),
        text=TextConfig(context_length=77, width=256, layers=6, heads=4),
    ),
    # The paper's sizes. Names follow open_clip: "-quickgelu" is the OpenAI-weights activation.
    "RN50": CLIPConfig(embed_dim=1024, vision=_resnet((3, 4, 6, 3)), text=TextConfig()),
    "RN101": CLIPConfig(embed_dim=512, vision=_resnet((3, 4, 23, 3)), text=TextConfig()),
    "ViT-B-32": CLIPConfig(embed_dim=512, vision=_vit(224, 32, 768, 12, 12), text=TextConfig()),
    "ViT-B-16": CLIPConfig(embed_dim=512, vision=_vit(224, 16, 768, 12, 12), text=TextConfig()),
    "ViT-L-14": CLIPConfig(
        embed_dim=768, vision=_vit(224, 14, 1024, 24, 16), text=TextConfig(width=768, heads=12)
    ),
    "ViT-L-14-336": CLIPConfig(
        embed_dim=768, vision=_vit(336, 14, 1024, 24, 16), text=TextConfig(width=768, heads=12)
    ),
}
for _name in ("RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
    _d = PRESETS[_name].to_dict()
    PRESETS[f"{_name}-quickgelu"] = CLIPConfig.from_dict({**_d, "quick_gelu": True})
del _name, _d


def load_config_file(path: str | Path) -> CLIPConfig:
    """A user-defined config from JSON: clipforge's to_dict layout (a checkpoint's config.json works too) or
    open_clip's model-config layout ({"embed_dim", "quick_gelu", "vision_cfg": {...}, "text_cfg": {...}})."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "vision_cfg" in d or "text_cfg" in d or "model_cfg" in d:
        return CLIPConfig.from_open_clip_dict(d)
    d.pop("format", None)  # clipforge checkpoint marker
    return CLIPConfig.from_dict(d)


def get_config(name_or_path: str | Path) -> CLIPConfig:
    """A fresh (safe to mutate) copy of a preset, or the config in a JSON file (see load_config_file)."""
    name = str(name_or_path)
    if name in PRESETS:
        return CLIPConfig.from_dict(PRESETS[name].to_dict())
    if name.endswith(".json") or Path(name).is_file():
        return load_config_file(name)  # FileNotFoundError if it does not exist
    raise KeyError(f"unknown model {name!r}; choose one of {sorted(PRESETS)} or pass a .json config file")
