"""The training config: one small typed dataclass per concern, each validating itself, composed into TrainConfig.

    TrainConfig  out, nproc, zero, seed, log_every, ds_shm_comm, and the sections
      .model          ModelConfig            --model --loss --label-smoothing --patch-dropout --compile
      .data           DataConfig             --shards --shard-weights --resampled --workers --shuffle-buffer --aug-*
      .optim          OptimConfig            --steps | --epochs, --batch-size --grad-accum --lr --weight-decay ...
      .precision      PrecisionConfig        --precision --loss-scale-power
      .checkpointing  ActivationCheckpointing  --grad-checkpointing --offload-activations --checkpoint-chunks ...
      .eval           EvalConfig             --eval-retrieval --eval-zeroshot --eval-classes --eval-every ...
      .save           SaveConfig             --save-every --save-every-minutes --keep-last --resume

Every field is a command-line flag (trainer.clip.flags builds the parser: `python -m trainer.train --help`).
Validation that needs only the values lives here (__post_init__, a ValueError naming the flag); what needs the
machine or the files (the model preset, fp16 support, the shard dirs, the eval sets, the resume checkpoint) is
checked by trainer.train.validate before any rank starts. No DeepSpeed here.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.clip.flags import opt, require, section, with_flags
from trainer.clip.transform import TrainAugment
from trainer.loss import LOSSES
from trainer.parallel import POLICIES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAVE_ERRORS = ("continue", "stop")


@dataclass
class ModelConfig:
    """What is trained."""
    name: str = opt("ViT-B-32", flag="--model", help="model preset (trainer.clip.configs.PRESETS) or a JSON config")
    loss: str = opt("clip", choices=LOSSES, help="clip (softmax, learnable temperature) or siglip (sigmoid, + bias)")
    label_smoothing: float = opt(0.0, help="CLIP loss: label smoothing of the softmax targets (0: off)")
    patch_dropout: float = opt(0.0, help="FLIP patch dropout: fraction of ViT patch tokens dropped in training "
                                         "(0.5 ~ 2x faster)")
    compile: bool = opt(False, help="torch.compile every transformer block (fused element-wise kernels; the first "
                                    "steps compile); not with --zero 3, --offload-activations, --checkpoint-group > 1")

    def __post_init__(self):
        require(self, "loss", self.loss in LOSSES, f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(self, "patch_dropout", 0.0 <= self.patch_dropout < 1.0, "must be in [0, 1)")
        require(self, "label_smoothing", 0.0 <= self.label_smoothing < 1.0, "must be in [0, 1)")
        require(self, "label_smoothing", self.label_smoothing == 0 or self.loss == "clip", "needs --loss clip")


@dataclass
class DataConfig:
    """What is read, and how it is streamed (trainer.data)."""
    shards: list[str] = opt(default_factory=list, required=True, metavar="DIR",
                            help="shard dir(s): clipforge shards (manifest.json + *.tar) or plain img2dataset output")
    shard_weights: list[float] | None = opt(None, metavar="W", help="sample share of each --shards dir (default: "
                                                                    "proportional to its sample count)")
    resampled: bool = opt(False, help="draw shards with replacement instead of one shuffled round after another")
    workers: int = opt(0, help="DataLoader worker processes per rank (0: decode in the training process)")
    shuffle_buffer: int = opt(1000, help="samples in each data slot's seeded shuffle buffer")
    aug_scale: tuple[float, float] = opt((0.9, 1.0), metavar=("MIN", "MAX"),
                                         help="random resized crop: the range of the image area kept")
    aug_colour: float = opt(0.0, help="colour jitter: brightness, contrast and saturation factors drawn from "
                                      "[1 - C, 1 + C] (0: off)")
    aug_grayscale: float = opt(0.0, help="probability of turning a training image grayscale")
    aug_blur: float = opt(0.0, help="probability of a Gaussian blur (radius 0.2-2 %% of the image side)")
    aug_randconv: float = opt(0.0, help="probability of a random convolution mixed into the image (RandConv: a "
                                        "style change that keeps shapes)")
    aug_stroke: float = opt(0.0, help="probability of thinning or thickening a drawing's strokes (a max / min "
                                      "filter: outlines shrink or grow, colours and shapes stay)")

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        self.shards = [str(s) for s in self.shards]
        self.aug_scale = tuple(float(x) for x in self.aug_scale)
        require(self, "workers", self.workers >= 0, "must be >= 0")
        require(self, "shuffle_buffer", self.shuffle_buffer >= 1, "must be >= 1")
        lo, hi = self.aug_scale
        require(self, "aug_scale", 0 < lo <= hi <= 1, f"needs 0 < MIN <= MAX <= 1, got {lo} {hi}")
        require(self, "aug_colour", 0 <= self.aug_colour < 1, "must be in [0, 1)")
        require(self, "aug_grayscale", 0 <= self.aug_grayscale <= 1, "must be in [0, 1]")
        require(self, "aug_blur", 0 <= self.aug_blur <= 1, "must be in [0, 1]")
        require(self, "aug_randconv", 0 <= self.aug_randconv <= 1, "must be in [0, 1]")
        require(self, "aug_stroke", 0 <= self.aug_stroke <= 1, "must be in [0, 1]")

    def augment(self) -> TrainAugment:
        return TrainAugment(scale=tuple(self.aug_scale), colour=self.aug_colour, grayscale=self.aug_grayscale,
                            blur=self.aug_blur, randconv=self.aug_randconv, stroke=self.aug_stroke)


@dataclass
class OptimConfig:
    """How long, how big and how fast: AdamW with linear warmup and cosine decay."""
    steps: int = opt(0, exclusive="length", help="optimizer steps (0: --epochs over the data)")
    epochs: int = opt(1, exclusive="length", help="passes over the data, when --steps is 0")
    batch_size: int = opt(256, help="per-rank micro batch")
    grad_accum: int = opt(1, help="micro-batches per optimizer step, contrastive-aware (features of all "
                                  "micro-batches are cached without grad, each is re-run with grad against all)")
    lr: float = opt(5e-4, help="peak learning rate")
    weight_decay: float = opt(0.2, help="AdamW weight decay (matrices only)")
    betas: tuple[float, float] = opt((0.9, 0.98), metavar=("B1", "B2"), help="AdamW betas")
    eps: float = opt(1e-6, help="AdamW epsilon")
    warmup: int = opt(2000, help="linear warmup steps")
    grad_clip: float = opt(1.0, help="clip the global gradient norm to this")
    max_nonfinite_steps: int = opt(20, help="stop the run (exit 3) after N consecutive optimizer steps skipped "
                                            "because the loss or a gradient was not finite (0: never stop)")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("batch_size", "grad_accum"):
            require(self, name, getattr(self, name) >= 1, "must be >= 1")
        require(self, "steps", self.steps >= 0, "must be >= 0")
        if self.steps == 0:
            require(self, "epochs", self.epochs >= 1, "must be >= 1 (or give --steps >= 1)")
        require(self, "warmup", self.warmup >= 0, "must be >= 0")
        require(self, "max_nonfinite_steps", self.max_nonfinite_steps >= 0, "must be >= 0")


@dataclass
class PrecisionConfig:
    """Number formats (DeepSpeed's bf16 / fp16 with fp32 master weights)."""
    precision: str = opt("auto", choices=PRECISIONS,
                         help="auto = bf16 on a GPU, fp32 on CPU; fp16 (dynamic loss scaling) needs a GPU")
    loss_scale_power: int = opt(16, help="fp16: the dynamic loss scale starts at 2**N; a step whose gradients "
                                         "overflow is skipped and halves it, 1000 clean steps double it")

    def __post_init__(self):
        require(self, "precision", self.precision in PRECISIONS,
                f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        require(self, "loss_scale_power", 0 <= self.loss_scale_power <= 32, "must be in 0..32")


@dataclass
class ActivationCheckpointing:
    """Activation checkpointing, applied to the model from outside (trainer.parallel)."""
    enabled: bool = opt(True, flag="--grad-checkpointing", help="recompute each block's activations in backward")
    offload: bool = opt(False, flag="--offload-activations",
                        help="keep each checkpointed block's input in (pinned) host memory until backward")
    chunks: int = opt(1, flag="--checkpoint-chunks",
                      help="recompute each transformer block in K batch chunks (the block recomputed in backward "
                           "holds 1/K of the batch)")
    policy: str = opt("full", flag="--checkpoint-policy", choices=POLICIES,
                      help="full: keep block inputs only; selective: also keep matmul / attention outputs, "
                           "recompute only element-wise ops (no matmul runs twice: faster, more memory)")
    group: int = opt(1, flag="--checkpoint-group",
                     help="checkpoint transformer blocks K at a time, keeping 1/K of the block inputs")

    def __post_init__(self):
        require(self, "chunks", self.chunks >= 1, "must be >= 1")
        require(self, "group", self.group >= 1, "must be >= 1")
        require(self, "policy", self.policy in POLICIES,
                f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if (self.offload or self.chunks > 1 or self.group > 1 or self.policy != "full") and not self.enabled:
            raise ValueError("--offload-activations, --checkpoint-chunks, --checkpoint-group and --checkpoint-policy "
                             "apply to checkpointed blocks: they need --grad-checkpointing")


@dataclass
class EvalConfig:
    """Evaluation during training, on all ranks (trainer.evaluate)."""
    retrieval: str = opt("", flag="--eval-retrieval", help="held-out shard dir: image<->text recall@1/5/10")
    zeroshot: str = opt("", flag="--eval-zeroshot", help="labelled shard dir or ImageFolder dir: zero-shot top-1/5")
    classes: str = opt("", flag="--eval-classes", help='classes JSON {"classnames", "templates"} for --eval-zeroshot')
    every: int = opt(0, flag="--eval-every", help="evaluate every N steps (0: at the end only, if eval data is given)")
    batch_size: int = opt(64, flag="--eval-batch-size", help="images per evaluation forward pass")

    def __post_init__(self):
        require(self, "every", self.every >= 0, "must be >= 0")
        require(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        if self.classes and not self.zeroshot:
            raise ValueError("--eval-classes needs --eval-zeroshot")

    @property
    def enabled(self) -> bool:
        return bool(self.retrieval or self.zeroshot)


@dataclass
class SaveConfig:
    """Training checkpoints and resume (trainer.resume)."""
    every: int = opt(0, flag="--save-every", help="checkpoint every N optimizer steps (0: off)")
    every_minutes: float = opt(0.0, flag="--save-every-minutes", help="checkpoint every M minutes, checked at log "
                                                                      "steps (0: off)")
    keep_last: int = opt(2, flag="--keep-last", help="complete checkpoints kept in OUT/checkpoints")
    resume: str = opt("", flag="--resume", help="'latest' (the newest checkpoint in OUT/checkpoints, a fresh start "
                                                "if none) or a checkpoint dir: weights, optimizer, schedule, data "
                                                "position and RNG states")
    on_error: str = opt("continue", flag="--save-errors", choices=SAVE_ERRORS,
                        help="a save that fails (no space, an I/O error): 'continue' training and retry at the next "
                             "save, or 'stop' the run cleanly (exit 4); either way `latest` keeps the last good one")

    def __post_init__(self):
        for name in ("every", "every_minutes", "keep_last"):
            require(self, name, getattr(self, name) >= 0, "must be >= 0")
        require(self, "on_error", self.on_error in SAVE_ERRORS, f"must be one of {', '.join(SAVE_ERRORS)}")

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.every_minutes > 0


@dataclass
class TrainConfig:
    """A training run."""
    out: str = opt("", required=True, help="run dir: checkpoint/, metrics.jsonl, summary.json, checkpoints/, ...")
    nproc: int = opt(1, help="local ranks: > 1 relaunches this command under torch.distributed.run")
    zero: int = opt(2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    seed: int = opt(0, help="the seed of the model init, the data order and every augmentation")
    log_every: int = opt(10, help="optimizer steps between log lines / metrics rows")
    ds_shm_comm: bool = opt(False, help="DeepSpeed's CPU shared-memory allreduce (its first use compiles ~1 min)")
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    optim: OptimConfig = section(OptimConfig)
    precision: PrecisionConfig = section(PrecisionConfig)
    checkpointing: ActivationCheckpointing = section(ActivationCheckpointing)
    eval: EvalConfig = section(EvalConfig)
    save: SaveConfig = section(SaveConfig)

    def __post_init__(self):
        require(self, "nproc", self.nproc >= 1, "must be >= 1")
        require(self, "log_every", self.log_every >= 1, "must be >= 1")
        require(self, "zero", self.zero in (0, 1, 2, 3), f"must be 0, 1, 2 or 3, got {self.zero}")
        if self.model.compile:
            if self.checkpointing.group > 1:
                raise ValueError("--compile works with per-block checkpointing only (--checkpoint-group 1)")
            if self.zero == 3:
                raise ValueError("--compile does not work with --zero 3 (DeepSpeed's parameter-gathering hooks run "
                                 "inside every block); use --zero 0-2")
            if self.checkpointing.offload:
                raise ValueError("--compile does not work with --offload-activations (torch.compile cannot trace "
                                 "the saved-tensor hooks; the blocks would silently run uncompiled)")

    def global_batch_size(self, world_size: int) -> int:
        return self.optim.batch_size * self.optim.grad_accum * world_size

    @classmethod
    def tiny(cls, **flags) -> "TrainConfig":
        """The CPU-test preset; keyword arguments are flag names (batch_size=8, zero=3, grad_checkpointing=...)."""
        base = dict(model="tiny", steps=10, batch_size=8, lr=1e-3, warmup=2, log_every=1, shuffle_buffer=64)
        return with_flags(cls(), **{**base, **flags})

    @classmethod
    def from_flags(cls, **flags) -> "TrainConfig":
        """The default config with options set by flag name (e.g. from_flags(model="ViT-B-16", batch_size=256))."""
        return with_flags(cls(), **flags)


PRESETS = {"default": TrainConfig, "tiny": TrainConfig.tiny}
