"""Configuration: dataclasses for the models and the training runs, named presets, the demo's
settings, and how a run's config is put together from them (make_config; the flags themselves:
flags.py; a command line with --config or --resume: runconfig.py).

Stdlib only. Precedence when building a run's config: dataclass defaults < preset < the demo's
settings (only when no dataset is given) < flags given on the command line.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional

from errors import UserError
from flags import flag_name, option


def check_finite(cfg) -> None:
    """Every number of a config must be one: NaN and infinities pass `<` and `>` checks unseen."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag_name(f.name)} {value} is not a number: give a finite value.")


def require(cfg, minimums: dict) -> None:
    """Each named field (if not None) must be at least its minimum: one clear message otherwise."""
    for name, low in minimums.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise UserError(f"{flag_name(name)} {value} is out of range: it must be at least {low}.")


@dataclass
class VQGANConfig:
    """Stage-1 architecture. Defaults are the reference's ImageNet f16-1024 model."""
    ch: int = option(128, "base channel width of encoder and decoder")
    ch_mult: tuple[int, ...] = option((1, 1, 2, 2, 4), "width multiplier per level; the image is downsampled len-1 times")
    num_res_blocks: int = option(2, "ResnetBlocks per encoder level (the decoder has one more)")
    attn_resolutions: tuple[int, ...] = option((16,), "feature-map sides, counted from --resolution, that get self-attention")
    dropout: float = option(0.0, "dropout inside ResnetBlocks")
    out_norm_groups: int = option(32, "groups of the GroupNorm before the encoder's and the decoder's output convolutions (the reference: 32; the tiny preset: 1, which keeps an image's overall colour, see README)")
    weight_init: str = option("pytorch", "initialization of the convolutions and linear maps of encoder, decoder and quantizer: pytorch (its defaults, as the reference) or lecun (normal with std 1/sqrt(fan_in), biases 0; the tiny preset, which then learns colours within its demo, see README)", choices=("pytorch", "lecun"))
    in_channels: int = option(3, "channels of input images (1 or 3)")
    out_channels: int = option(3, "channels of reconstructed images")
    resolution: int = option(256, "training image side in pixels; also places attention")
    z_channels: int = option(256, "channels of the encoder output z")
    embed_dim: int = option(256, "dimension of a codebook vector")
    n_embed: int = option(1024, "number of codebook vectors")
    beta: float = option(0.25, "commitment weight of the codebook loss")
    legacy_beta: bool = option(False, "put beta on the codebook term as the reference's VectorQuantizer does (default: on the commitment term, as in the VQ-VAE paper)")
    quantizer: str = option("vq", "vq: nearest code (VQ-VAE); gumbel: Gumbel-softmax (the reference's Gumbel f8 model)", choices=("vq", "gumbel"))
    gumbel_kl_weight: float = option(1e-8, "weight of the Gumbel quantizer's KL term towards uniform code use (the reference's GumbelVQ)")
    # Codebook techniques (codebook.py says what each does and where it comes from); off = plain VQ.
    codebook_l2_norm: bool = option(False, "look codes up by cosine similarity of l2-normalized vectors (ViT-VQGAN)")
    codebook_dim: int = option(0, "look codes up in this many dimensions, projected from and back to --embed-dim (ViT-VQGAN factorized codes; 0: no projection)")
    codebook_ema: float = option(0.0, "decay of EMA code updates instead of codebook gradients, e.g. 0.99 (VQ-VAE appendix; 0: off)")
    codebook_kmeans_init: bool = option(False, "initialize the codes by k-means on the first batches' encoder outputs")
    codebook_warmup: int = option(0, "with --codebook-kmeans-init: train this many optimizer steps with z passed to the decoder unquantized, then initialize the codes by k-means on the latest encoder outputs (0: from the first steps')")
    codebook_restart_after: int = option(0, "replace a code unused for this many optimizer steps by a recent encoder output (Jukebox; 0: off)")
    codebook_entropy_weight: float = option(0.0, "weight of the entropy regularizer on soft code assignments (MAGVIT-v2; 0: off)")

    def __post_init__(self):
        check_finite(self)
        self.ch_mult, self.attn_resolutions = tuple(self.ch_mult), tuple(self.attn_resolutions)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise UserError(f"--ch-mult {' '.join(map(str, self.ch_mult))} is invalid: give one positive "
                            "multiplier per level, e.g. --ch-mult 1 2 4.")
        require(self, dict(ch=1, num_res_blocks=1, in_channels=1, out_channels=1, resolution=1, z_channels=1,
                            embed_dim=1, n_embed=1, beta=0.0, dropout=0.0, gumbel_kl_weight=0.0, codebook_dim=0,
                            codebook_ema=0.0, codebook_restart_after=0, codebook_entropy_weight=0.0,
                            codebook_warmup=0, out_norm_groups=1))
        if self.codebook_warmup and not self.codebook_kmeans_init:
            raise UserError(f"--codebook-warmup {self.codebook_warmup} ends with the k-means initialization of the "
                            "codes: add --codebook-kmeans-init, or drop --codebook-warmup.")
        if not self.codebook_ema < 1.0:
            raise UserError(f"--codebook-ema {self.codebook_ema} is out of range: give a decay below 1, e.g. 0.99, "
                            "or 0 to train the codes by gradient.")
        if self.quantizer == "gumbel" and self.codebook_options():
            raise UserError(f"{', '.join(self.codebook_options())} apply to the nearest-code quantizer only: "
                            "drop them or use --quantizer vq.")
        if self.quantizer == "gumbel" and self.z_channels != self.embed_dim:
            raise UserError("the Gumbel quantizer reads quant_conv's output with z_channels inputs, as in the "
                            "reference: make --z-channels equal to --embed-dim.")
        if self.ch % 32 or any((self.ch * m) % 32 for m in self.ch_mult):
            raise UserError(f"ch={self.ch} with ch_mult={list(self.ch_mult)} gives a width that is not a "
                            "multiple of 32, which GroupNorm(32) needs: choose --ch as a multiple of 32.")
        widths = (self.ch * self.ch_mult[0], self.ch * self.ch_mult[-1])
        if any(w % self.out_norm_groups for w in widths):
            raise UserError(f"--out-norm-groups {self.out_norm_groups} does not divide the widths it normalizes "
                            f"({widths[0]} and {widths[1]} channels): choose a divisor of both, e.g. 1 or 32.")
        if self.resolution % self.downsample_factor:
            raise UserError(f"image size {self.resolution} is not divisible by the downsampling factor "
                            f"{self.downsample_factor} (2^(len(ch_mult)-1)): choose --image-size as a multiple "
                            f"of {self.downsample_factor}.")

    def codebook_options(self) -> list[str]:
        """The codebook technique flags that are switched on."""
        return [flag_name(f.name) for f in fields(self) if f.name.startswith("codebook_") and getattr(self, f.name)]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the token grid for a --resolution image."""
        return self.resolution // self.downsample_factor


@dataclass
class GPTConfig:
    """Stage-2 transformer. vocab_size and block_size are derived from the VQGAN, the classes and
    the token layout (transformer.py, TokenLayout), never given as flags."""
    vocab_size: int = field(default=1025, metadata={"derived": True})
    block_size: int = field(default=256, metadata={"derived": True})
    n_layer: int = option(24, "transformer blocks")
    n_head: int = option(16, "attention heads")
    n_embd: int = option(1024, "width of the transformer")
    embd_pdrop: float = option(0.0, "dropout on token + position embeddings")
    resid_pdrop: float = option(0.0, "dropout on residual branches")
    attn_pdrop: float = option(0.0, "dropout on attention weights")

    def __post_init__(self):
        check_finite(self)
        require(self, dict(vocab_size=1, block_size=1, n_layer=1, n_head=1, n_embd=1))
        if self.n_embd % self.n_head:
            raise UserError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}: every head needs "
                            "an equal share of the width.")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{flag_name(name)} must be in [0, 1).")


# torch.compile's modes (--compile-mode) and the layouts of stage-1 training (--memory-format), for
# the training scripts and benchmark.py alike
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # those that replay the compiled graphs as CUDA graphs
MEMORY_FORMATS = ("auto", "channels-last", "contiguous")


@dataclass
class RunConfig:
    """What every training run has: data, length, optimizer, schedule, loading, seeding, logging,
    checkpoints, precision and device. Each stage's config lists its own fields first and may
    give these other defaults."""
    dataset_path: Optional[str] = option(None, "folder of training images, searched recursively; omit to train on the built-in demo photographs")
    output_dir: str = option("runs/vqgan", "run folder: config.json, checkpoints/, samples/, metrics.jsonl")
    file_list: Optional[str] = option(None, "text file naming the training images, one per line (relative to --dataset-path unless absolute), instead of searching the folder")
    val_dataset_path: Optional[str] = option(None, "folder of validation images (default: --val-fraction of the training images)")
    preset: Optional[str] = option(None, "named configuration to start from (the list is at the end of --help)")
    batch_size: int = option(8, "samples per micro-batch and process")
    learning_rate: float = option(2.25e-05, "learning rate (its peak, with warmup or cosine decay)")
    lr_warmup_steps: int = option(0, "linear learning-rate warmup, in steps")
    lr_schedule: str = option("constant", "learning rate after the warmup: constant, or cosine decay to a tenth at the last step", choices=("constant", "cosine"))
    beta1: float = option(0.5, "Adam beta1")
    beta2: float = option(0.9, "Adam beta2")
    epochs: int = option(100, "upper bound on passes over the data")
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps (default: only --epochs bounds the run)")
    grad_accum: int = option(1, "micro-batches of --batch-size per optimizer step (gradients synchronized on the last only)")
    scale_lr: bool = option(False, "multiply --learning-rate by the global batch (batch size x processes x --grad-accum), as the reference does")
    val_fraction: float = option(0.05, "fraction of the images held out for validation")
    val_batches: int = option(50, "validation batches evaluated at each sample step (0: the whole validation split)")
    num_workers: Optional[int] = option(None, "data-loading worker processes (default: from the CPUs: one per CPU of this process but one, at least 2, at most 8)")
    seed: int = option(0, "random seed of weights, data order and augmentation")
    log_every: int = option(50, "steps between metrics.jsonl lines (and the checks for skipped non-finite steps)")
    sample_every: int = option(1000, "steps between sample grids and validation")
    save_every: int = option(1000, "steps between checkpoints")
    keep_checkpoints: int = option(3, "numbered snapshots kept besides last.pt")
    precision: str = option("auto", "autocast precision; auto = bf16 on CUDA where supported, else fp32", choices=("auto", "fp32", "bf16", "fp16"))
    device: str = option("auto", "torch device; auto = cuda when available, else cpu")
    resume: Optional[str] = option(None, "continue a run from its checkpoint, with its saved configuration: 'latest' (OUTPUT_DIR's last.pt), 'auto' (that, or a new run when there is none), a run folder or a checkpoint file; flags given override training settings only")
    tensorboard: bool = option(False, "also write TensorBoard events: metrics, validation figures and sample grids")
    wandb: Optional[str] = option(None, "also log to this Weights & Biases project (needs pip install wandb); a resumed run continues the same W&B run")
    compile: bool = option(False, "torch.compile the networks for the training steps (stage 1: all but the decoder's last layer; stage 2: the GPT with its loss); validation and sample grids run them eagerly")
    compile_mode: str = option("default", "torch.compile's mode with --compile: reduce-overhead replays the compiled graphs as CUDA graphs (far fewer kernel launches from Python; not yet measured here, see README \"Performance\"; not with --grad-accum above 1), max-autotune also searches kernel configurations", choices=COMPILE_MODES)
    max_bad_fraction: float = option(0.05, "stop when more than this fraction of the image files cannot be used (they are listed in OUTPUT_DIR/skipped_files.txt)")
    ema_decay: float = option(0.0, "keep an exponential moving average of the trained weights with this decay, e.g. 0.999 (0: off); validation, sample grids, evaluation, export and sampling then use it")
    raw_weights: bool = option(False, "with --ema-decay: validation and sample grids use the trained weights, not their average")
    init_from: Optional[str] = option(None, "fine-tune: start a new run (step 0, fresh optimizers) from these weights, architecture included; see the README")
    max_bad_steps: int = option(20, "stop (after saving, at the next --log-every step) when this many steps in a row had non-finite losses or gradients; each is skipped")
    # Not a flag: what each resume changed ({"step": N, "changed": {field: [before, after]}}), kept in config.json.
    history: list = field(default_factory=list, metadata=dict(derived=True))

    def __post_init__(self):
        check_finite(self)
        require(self, dict(batch_size=1, grad_accum=1, max_bad_steps=1, epochs=1, max_steps=1, learning_rate=0.0,
                            lr_warmup_steps=0, num_workers=0, log_every=1, sample_every=1, save_every=1,
                            keep_checkpoints=0, val_batches=0))
        if not self.learning_rate > 0:
            raise UserError(f"--learning-rate {self.learning_rate} must be above 0.")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise UserError(f"--beta1 {self.beta1} and --beta2 {self.beta2} must be in [0, 1) (Adam's averages).")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"--max-bad-fraction {self.max_bad_fraction} is out of range: use a value in [0, 1].")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema-decay {self.ema_decay} is out of range: give a decay in (0, 1), e.g. 0.999, or 0 for "
                            "no average.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction} is out of range: use a value in [0, 1).")
        if self.compile_mode != "default" and not self.compile:
            raise UserError(f"--compile-mode {self.compile_mode} sets how --compile compiles: give --compile too.")
        if self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum > 1:
            # PyTorch's CUDA-graph trees hand a micro-batch's gradients to .grad in memory that the next
            # micro-batch's replay writes over (pytorch/pytorch issues 169545 and 96693)
            raise UserError(f"--compile-mode {self.compile_mode} replays CUDA graphs, which reuse the memory of one "
                            f"micro-batch's gradients for the next, so --grad-accum {self.grad_accum} cannot add them up "
                            "(PyTorch stops with an error or, in some versions, sums wrong gradients): use --grad-accum 1 "
                            "with a larger --batch-size, or --compile-mode default or max-autotune-no-cudagraphs.")


@dataclass
class TrainVQGANConfig(RunConfig):
    """A stage-1 training run (training_vqgan.py)."""
    checkpoint_kind: ClassVar[str] = "vqgan"  # what its checkpoints record as their kind
    script: ClassVar[str] = "training_vqgan.py"
    disc_start: int = option(10000, "step at which the discriminator and the GAN loss switch on")
    disc_factor: float = option(1.0, "weight of the GAN losses once the discriminator is on")
    disc_weight: float = option(0.8, "multiplies the adaptive weight lambda (the reference's disc_weight)")
    disc_loss: str = option("hinge", "discriminator loss", choices=("hinge", "vanilla"))
    disc_ndf: int = option(64, "width of the first PatchGAN layer")
    disc_layers: int = option(3, "stride-2 layers of the PatchGAN")
    disc_joint_batch: bool = option(False, "score real and reconstructed images in one discriminator forward over both (BatchNorm then normalizes them together); default: separate passes, as the reference")
    rec_loss_factor: float = option(1.0, "weight of the L1 reconstruction loss")
    perceptual_loss_factor: float = option(1.0, "weight of the LPIPS perceptual loss (0 disables LPIPS and its VGG16)")
    codebook_weight: float = option(1.0, "weight of the codebook loss")
    vgg_weights: Optional[str] = option(None, "VGG16 weights for LPIPS: torchvision's vgg16 file, or a taming-transformers VQGAN .ckpt (VGG16 and linear layers); default: torchvision's ImageNet weights, downloaded once")
    flip: bool = option(True, "random horizontal flips of training images")
    color_augment: bool = option(False, "random colour jitter, greyscale and scale of training crops, for small sets whose colours could otherwise be learnt by heart (the demo does without it: README \"Demo results\")")
    usage_window: int = option(100, "recent batches over which codebook usage and perplexity are also reported")
    sync_batchnorm: bool = option(False, "under torchrun on CUDA, the discriminator's BatchNorm uses statistics of the global batch")
    memory_format: str = option("auto", "layout of the images and convolution weights in training: channels-last (NHWC, the layout of cuDNN's bf16 kernels: no transposes around each convolution) or contiguous (NCHW); auto = channels-last with --compile on CUDA, else contiguous", choices=MEMORY_FORMATS)
    gumbel_temperature_start: float = option(0.9, "--quantizer gumbel: the Gumbel-softmax temperature at step 0 (the reference's schedule)")
    gumbel_temperature_end: float = option(1e-6, "--quantizer gumbel: the temperature the cosine schedule reaches at --gumbel-temperature-steps")
    gumbel_temperature_steps: int = option(1000001, "--quantizer gumbel: steps of the cosine temperature schedule")
    model: VQGANConfig = field(default_factory=VQGANConfig)

    def __post_init__(self):
        super().__post_init__()
        require(self, dict(disc_start=0, disc_factor=0.0, disc_weight=0.0, disc_ndf=1, disc_layers=1,
                            rec_loss_factor=0.0, perceptual_loss_factor=0.0, codebook_weight=0.0, usage_window=1,
                            gumbel_temperature_steps=1))
        if not 0 < self.gumbel_temperature_end <= self.gumbel_temperature_start:
            raise UserError("--gumbel-temperature-end must be above 0 and at most --gumbel-temperature-start.")
        m = self.model  # attention levels a training run asks for must exist (a loaded model may lack them)
        sides = [m.resolution // 2 ** i for i in range(len(m.ch_mult))]
        unused = [r for r in m.attn_resolutions if r not in sides]
        if unused:
            raise UserError(f"--attn-resolutions {' '.join(map(str, unused))} matches no level of this model: its "
                            f"feature maps are {', '.join(map(str, sides))} pixels wide at --resolution "
                            f"{m.resolution}; give some of those (or none).")
        res = self.model.resolution  # the PatchGAN's output side is res / 2^disc_layers - 2
        if res // 2 ** self.disc_layers - 2 < 1:
            fits = [n for n in range(1, 8) if res // 2 ** n - 2 >= 1]
            fix = f"use --disc-layers {max(fits)} or fewer" if fits else "train on images of at least 6 pixels"
            raise UserError(f"--disc-layers {self.disc_layers} leaves no patch of a {res}-pixel image for the "
                            f"PatchGAN to score (it needs at least 3 x 2^disc_layers pixels): {fix}.")
        if self.model.in_channels != self.model.out_channels:
            raise UserError(f"--in-channels {self.model.in_channels} and --out-channels {self.model.out_channels} "
                            "differ, but the reconstruction loss compares input and output: make them equal.")


@dataclass
class TrainTransformerConfig(RunConfig):
    """A stage-2 training run (training_transformer.py)."""
    checkpoint_kind: ClassVar[str] = "transformer"
    script: ClassVar[str] = "training_transformer.py"
    vqgan_checkpoint: Optional[str] = option(None, "stage-1 checkpoint, ours or a taming-transformers VQGAN .ckpt, or a stage-2 checkpoint (its VQGAN) (default: runs/vqgan/checkpoints/last.pt, the demo's)")
    vqgan_config: Optional[str] = option(None, "YAML config of a taming-transformers --vqgan-checkpoint (default: infer the architecture from its weights)")
    conditional: bool = option(False, "class-conditional: one class per first-level subfolder of --dataset-path")
    class_dropout: float = option(0.1, "probability of replacing the class token by 'no class' (classifier-free guidance)")
    pkeep: float = option(1.0, "probability of keeping each input code; the rest are replaced by random codes (paper's pkeep)")
    sos_token: Optional[int] = option(None, "accepted for compatibility and ignored: the start token has its own id")
    augment: bool = option(False, "random crops and flips instead of center crops (turns the token cache off)")
    cache_tokens: bool = option(True, "encode the dataset once with the frozen VQGAN (only without --augment)")
    weight_decay: float = option(0.01, "AdamW weight decay (Linear weights only)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    num_samples: int = option(8, "samples per row of the sample grids")
    temperature: float = option(1.0, "sampling temperature of the sample grids")
    top_k: Optional[int] = option(None, "top-k of the sample grids (default: all codes)")
    model: GPTConfig = field(default_factory=GPTConfig)
    # RunConfig's fields with stage 2's defaults (minGPT's AdamW recipe)
    output_dir: str = "runs/transformer"
    batch_size: int = 16
    learning_rate: float = 4.5e-4
    lr_warmup_steps: int = 100
    lr_schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        require(self, dict(num_samples=1, top_k=1, grad_clip=0.0, weight_decay=0.0))
        if not 0.0 < self.pkeep <= 1.0 or not 0.0 <= self.class_dropout < 1.0 or self.temperature <= 0:
            raise UserError("--pkeep must be in (0, 1], --class-dropout in [0, 1) and --temperature above 0.")


# ------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    """A named starting point: model fields, and the run settings that suit that model."""
    model: dict
    run: dict = field(default_factory=dict)


# The codebook that keeps (nearly) every code in use (codebook.py; README "Codebook usage"): 8-dimensional
# factorized codes, k-means initialization and dead-code restarts; the f16 presets also look codes up
# by cosine similarity (l2-normalized, as in ViT-VQGAN). The tiny demo looks up by Euclidean distance:
# with cosine lookup its encoder's early, nearly one-dimensional outputs fell onto two codes for the
# first ~100 steps, and it trained more slowly (README "Codebook usage").
# codebook_restart_after is set so that a code with a uniform share of the tokens would expect about
# 25 uses in that many steps (f16 at batch 16: 4096 tokens, 16384 codes, 100 steps; the tiny demo,
# 1536 tokens per batch of 6 and 1024 codes, expects 75 uses in its 50 steps): a code restarted
# then is really dead.
IMPROVED_CODEBOOK: dict = dict(codebook_dim=8, codebook_kmeans_init=True)
# The tiny model normalizes the input of both output convolutions as one group (out_norm_groups=1):
# with the reference's 32 groups, the encoder's last GroupNorm (2 channels a group over the latent
# grid) removes most of each crop's overall colour, and the decoder's (one channel a group) leaves it few
# ways to paint it back; the tiny codebook trains its first 50 steps unquantized (codebook_warmup)
# and then initializes the codes by k-means on what the encoder has learnt by then. It downsamples
# by 4 (16x16 tokens for 64x64 crops): at the same cost per step as 8x8 tokens (its last level has 64
# channels, not 128), the demo reached 2.8 dB more held-out PSNR and closer colours (README "Demo results").
# Its layers start with LeCun's variance-preserving initialization (weight_init="lecun"): with
# PyTorch's default, which shrinks a signal by about 1/sqrt(3) at each layer, it learnt colours so
# slowly that within the demo's 950 steps it guessed them from texture, and some seeds painted
# held-out crops in the wrong colours (README "Demo results").
_TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=64, z_channels=64,
             embed_dim=64, n_embed=1024, out_norm_groups=1, weight_init="lecun")
_TINY_RUN = dict(batch_size=8, learning_rate=1e-3, disc_start=2000)
_F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256, z_channels=256,
            embed_dim=256)
_L2 = dict(**IMPROVED_CODEBOOK, codebook_l2_norm=True, codebook_restart_after=100)

PRESETS: dict[str, Preset] = {
    # A CPU-sized model for the demo and quick experiments: 64x64 images, 16x16 tokens, the improved
    # codebook (tiny-vq: the same with plain VQ, for comparison).
    "tiny": Preset(dict(**_TINY, **IMPROVED_CODEBOOK, codebook_restart_after=50, codebook_warmup=50), _TINY_RUN),
    "tiny-vq": Preset(dict(_TINY), _TINY_RUN),
    # The reference's ImageNet models (Esser et al. 2021, Tab. 2 / released checkpoints): plain VQ.
    "f16-1024": Preset(dict(**_F16, n_embed=1024)),
    "f16-16384": Preset(dict(**_F16, n_embed=16384)),
    # The same architectures with the improved codebook (16384 codes: 8-dimensional, l2-normalized).
    "f16-1024-l2": Preset(dict(**_F16, n_embed=1024, **_L2)),
    "f16-16384-l2": Preset(dict(**_F16, n_embed=16384, **_L2)),
}

GPT_PRESETS: dict[str, Preset] = {
    "tiny": Preset(dict(n_layer=4, n_head=4, n_embd=128), dict(batch_size=16, learning_rate=1e-3)),
    "small": Preset(dict(n_layer=12, n_head=12, n_embd=768)),
    # the reference's FFHQ/CelebA-HQ-sized GPT at f16-1024 (24 layers, width 1024, 16 heads)
    "f16-1024": Preset(dict(n_layer=24, n_head=16, n_embd=1024)),
}

# `python training_vqgan.py` with no --dataset-path: the tiny preset on bundled photographs, sized to
# finish within 5 minutes on a 2-core CPU (README "Demo results"): 950 steps of batch 6, Adam's
# betas (0.9, 0.99) and a cosine learning rate. The discriminator stays off (the tiny preset starts
# it at step 2000): in 950 steps at 64x64 it cost held-out PSNR and added colour artefacts. No
# perceptual term, on every machine: LPIPS runs VGG16 on every batch, which more than doubled the
# demo's time (and first downloads VGG16's 528 MB of weights), so a newcomer with network access
# would wait for another demo than the one measured.
DEMO_VQGAN: dict = dict(preset="tiny", batch_size=6, max_steps=950, beta1=0.9, beta2=0.99, lr_schedule="cosine",
                        log_every=50, sample_every=250, save_every=500, perceptual_loss_factor=0.0)
# `python training_transformer.py` with no arguments: continue the stage-1 demo.
DEMO_TRANSFORMER: dict = dict(preset="tiny", augment=True, max_steps=600, lr_warmup_steps=50, log_every=50,
                              sample_every=300, save_every=300, top_k=100)

def make_config(train_cls, model_cls, given: dict, presets: dict[str, Preset], demo: Optional[dict] = None):
    """A training config from explicitly given values (field name -> value), applying the preset
    and, when no dataset path is given, the demo settings. Unknown names are an error."""
    return build_config(train_cls, model_cls, config_values(given, presets, demo))


def config_values(given: dict, presets: dict[str, Preset], demo: Optional[dict] = None) -> dict:
    """The flat values make_config builds from: demo settings (without a dataset path) under the
    preset's under the given values."""
    values: dict = {}
    if demo is not None and given.get("dataset_path") is None:
        values.update(demo)
    name = given.get("preset", values.get("preset"))
    if name is not None:
        if name not in presets:
            raise UserError(f"unknown preset '{name}': choose one of {', '.join(presets)}.")
        values = {**presets[name].model, **presets[name].run, **values}
    return {**values, **given}


def build_config(train_cls, model_cls, values: dict):
    """Training and model config from one flat mapping of field names; unknown names are an error."""
    model_names = {f.name for f in fields(model_cls)}
    train_names = {f.name for f in fields(train_cls)} - {"model"}
    unknown = set(values) - model_names - train_names
    if unknown:
        raise UserError(f"unknown configuration field(s): {', '.join(sorted(unknown))}.")
    model_cfg = model_cls(**{k: v for k, v in values.items() if k in model_names})
    return train_cls(**{k: v for k, v in values.items() if k in train_names}, model=model_cfg)


# ----------------------------------------------------------------------------- plain values
def config_to_dict(cfg) -> dict:
    """Plain dict (lists, not tuples) for JSON and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def model_config_from_dict(cls, d: dict):
    """Rebuild a model config stored in a checkpoint; unknown keys are an error, not ignored
    (fields added since the checkpoint was written take their defaults)."""
    if not isinstance(d, dict):
        raise UserError(f"the checkpoint's model config is a {type(d).__name__}, not a dict: the file is damaged.")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"the checkpoint's model config has fields this version does not know: "
                        f"{', '.join(sorted(unknown))}; was it written by a newer version?")
    try:
        return cls(**d)
    except TypeError as e:  # a value of the wrong type fails the range checks
        raise UserError(f"the checkpoint's model config holds a value of the wrong type ({e}): the file is damaged.") from None
