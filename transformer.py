"""Stage 2: a GPT over the code indices of a frozen VQGAN (Esser et al. 2021, Sec. 3.2), with
class conditioning, classifier-free guidance, top-k/top-p sampling with a key/value cache, prefix
completion, and sliding-window sampling of token grids larger than the training grid (Sec. 3.2,
"Generating High-Resolution Images").

Which id means what is one small object, TokenLayout. This project's layout
(vocab_size = n_codes + n_classes + 1):
    [0, n_codes)                      codes, raster order over the (h, w) grid
    [n_codes, n_codes + n_classes)    one per class (conditional models)
    n_codes + n_classes               start token; in conditional models also "no class"
Special ids never share an id with a code and are never sampled. A sequence is
[first token, code_0, ..., code_{N-2}] and the GPT predicts code_0 ... code_{N-1}. The reference's
released transformers use TokenLayout.reference instead: vocab_size = n_codes, the start token
`sos_token` (0, shared with code 0) and class k is token k; they have no "no class" token.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_strict, require_entries
from config import GPTConfig, VQGANConfig, config_to_dict, model_config_from_dict
from errors import UserError
from mingpt import GPT
from ema import averaged_state
from official import checkpoint_kind, sub_state, transformer_configs
from pretrained import PretrainedMixin
from vqgan import VQGAN, stage2_entries, vqgan_from_stage2


@dataclass(frozen=True)
class TokenLayout:
    """The token ids of a stage-2 model and the GPT shape they imply."""
    n_codes: int
    n_classes: int = 0
    reference: bool = False  # the reference's released transformers (see the module docstring)
    sos_token: int = 0  # the reference layout's start token

    @property
    def vocab_size(self) -> int:
        return self.n_codes if self.reference else self.n_codes + self.n_classes + 1

    @property
    def class_offset(self) -> int:
        """The id of class 0."""
        return 0 if self.reference else self.n_codes

    @property
    def start_token(self) -> int:
        return self.sos_token if self.reference else self.n_codes + self.n_classes

    @property
    def has_null_class(self) -> bool:
        """Whether the start token also means "no class" (class dropout and guidance need it)."""
        return not self.reference

    def gpt_shape(self, vqgan_config: VQGANConfig) -> dict:
        """The derived GPT sizes: the one place they are computed."""
        return dict(vocab_size=self.vocab_size, block_size=vqgan_config.latent_size ** 2)


def gpt_shape(vqgan_config: VQGANConfig, n_classes: int) -> dict:
    """The GPT sizes of this project's token layout for a VQGAN and a number of classes."""
    return TokenLayout(vqgan_config.n_embed, n_classes).gpt_shape(vqgan_config)


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float],
                        error: type = ValueError) -> None:
    """Options that would leave no token to sample are refused before sampling (the CLIs pass
    error=UserError), not a NaN later."""
    if not temperature > 0:
        raise error(f"temperature {temperature} must be above 0 (use top-k 1 for greedy sampling).")
    if top_k is not None and top_k < 1:
        raise error(f"top-k {top_k} keeps no token: use at least 1.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise error(f"top-p {top_p} is out of range: use a value in (0, 1].")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Keep exactly the top_k largest logits, then the smallest set of the most likely tokens
    whose probability reaches top_p (always at least one); the rest become -inf. (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        values, idx = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, values)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, noise: torch.Tensor, n_codes: int, guided: bool, cfg_scale: float,
                temperature: float, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """The next code of each sample from the last position's logits (2B rows with guidance: the
    conditional ones, then the unconditional): guidance uncond + s * (cond - uncond), the codes
    only (special tokens are never sampled), temperature, top-k, top-p, then one draw per sample.
    `noise` (B, n_codes) holds Exp(1) numbers: argmax(p / noise) is a draw from p (the
    exponential race), the very draw torch.multinomial(p, 1) makes from the same numbers, but
    without its host synchronisation. Returns (B,), or (2B,) repeated with guidance."""
    logits = logits.float()
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + cfg_scale * (cond - uncond)
    probs = filter_logits(logits[:, :n_codes] / temperature, top_k, top_p).softmax(-1)
    nxt = (probs / noise).argmax(-1)
    return nxt.repeat(2) if guided else nxt


class TokenLoop:
    """Cached sampling of the codes from position p on. The prefill (the first token and a
    prefix) runs once through the GPT's forward; then every code is one step of fixed shapes:
    pick code t from the logits buffer, write it into `codes`, run GPT.decode_step on it at
    position t + 1, keep its logits, advance t (a device tensor). No step reads anything back
    to the host, so on CUDA the step is captured once as a CUDA graph and replayed per token.
    The random numbers are drawn into `noise` before each step, outside the graph."""

    @torch.no_grad()
    def __init__(self, model: "VQGANTransformer", first: torch.Tensor, codes: torch.Tensor, p: int,
                 noise: torch.Tensor, pick: dict):
        gpt = model.gpt
        self.model, self.codes, self.noise, self.pick, self.p = model, codes, noise, pick, p
        self.cache = gpt.new_cache(codes.shape[0])
        self.logits = gpt(torch.cat([first, codes[:, :p]], 1), cache=self.cache, start=0)[:, -1].clone()
        self.t = torch.tensor(p, device=codes.device)  # the position in `codes` of the next code
        self.weights = gpt.decode_weights(self.cache.dtype)  # under autocast: cast once here, not at every step

    def step(self) -> None:
        nxt = self.model._pick(self.logits, self.noise, **self.pick)
        self.codes.index_copy_(1, self.t.view(1), nxt.view(-1, 1))
        self.logits.copy_(self.model.gpt.decode_step(nxt.view(-1, 1), self.t + 1, self.cache, self.weights))
        self.t.add_(1)

    @torch.no_grad()
    def run(self, n: int, draw, cuda_graph: bool = False, compile: bool = False) -> torch.Tensor:
        """Codes p .. n-1 into `codes`; `draw()` refills the noise before each pick. compile: the
        step compiled (compiled_step), captured too with cuda_graph."""
        step = self.step
        if compile:
            fn = compiled_step()
            step = lambda: fn(self)  # noqa: E731
            if not cuda_graph:  # (captured() has its own fallback)
                step = first_call_or(step, self.step)
        if cuda_graph and self.p < n - 1:
            state = [self.logits, self.t]
            graphed = captured(step, state, "the compiled step" if compile else "the step")
            if graphed is None and compile:  # then the eager step, captured
                graphed = captured(self.step, state, "the step")
            step = graphed or self.step
        for _ in range(self.p, n - 1):
            draw()
            step()
        draw()  # the last code: no position after it to run the GPT on
        self.codes[:, n - 1] = self.model._pick(self.logits, self.noise, **self.pick)
        return self.codes


# torch.compile's options for the token step (sample(compile=True)); tests use backend "aot_eager"
STEP_COMPILE_OPTIONS: dict = dict(backend="inductor", fullgraph=True, dynamic=False)
_compiled_step = None


def compiled_step():
    """TokenLoop.step compiled, one function per process that every sampling call reuses. It
    recompiles only for what its guards see change: another batch size, sampling option or dtype."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(TokenLoop.step, **STEP_COMPILE_OPTIONS)
    return _compiled_step


def first_call_or(step, fallback):
    """`step`, unless its first call fails, where torch.compile compiles before anything runs (no
    C++ compiler, an unsupported operation): then, with a warning, `fallback` from that call on."""
    chosen = []

    def call():
        if chosen:
            return chosen[0]()
        try:
            step()
            chosen.append(step)
        except RuntimeError as e:  # noqa: BLE001 - compiling failed: sample with the eager step
            warnings.warn(f"sampling with the eager token step (compiling it failed: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
            chosen.append(fallback)
            fallback()
    return call


def captured(step, state: list, what: str = "the step"):
    """`step` captured as a CUDA graph; returns its replay. Capture needs a warm-up run first (on
    a side stream); the tensors the step advances (`state`) are put back after it, and what else
    it wrote (a code and a cache position) the first real step overwrites. Should the warm-up
    (where a compiled step compiles) or the capture fail, the state is put back, a warning
    names `what` failed, and it returns None."""
    saved = [t.clone() for t in state]
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        for t, value in zip(state, saved):
            t.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads (data loaders) may run
            step()
        return graph.replay
    except RuntimeError as e:  # noqa: BLE001 - a driver or PyTorch that cannot capture or compile: sample without
        for t, value in zip(state, saved):
            t.copy_(value)
        warnings.warn(f"sampling without a CUDA graph of {what} (it failed: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return None


class VQGANTransformer(PretrainedMixin, nn.Module):
    def __init__(self, vqgan: VQGAN, gpt_config: GPTConfig, classes: Sequence[str] = (),
                 layout: Optional[TokenLayout] = None):
        super().__init__()
        self.layout = layout or TokenLayout(vqgan.config.n_embed, len(classes))
        expected = self.layout.gpt_shape(vqgan.config)
        if (self.layout.n_codes, self.layout.n_classes) != (vqgan.config.n_embed, len(classes)):
            raise ValueError(f"the token layout {self.layout} does not fit this VQGAN and {len(classes)} classes")
        if gpt_config.vocab_size != expected["vocab_size"] or gpt_config.block_size < expected["block_size"]:
            raise ValueError(f"GPT vocab_size/block_size {gpt_config.vocab_size}/{gpt_config.block_size} do not fit "
                             f"this VQGAN and {len(classes)} classes (expected {expected['vocab_size']}/"
                             f"{expected['block_size']})")
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.gpt = GPT(gpt_config)
        self.classes = list(classes)
        self.n_codes = vqgan.config.n_embed
        self.latent_shape = (vqgan.config.latent_size, vqgan.config.latent_size)

    @property
    def conditional(self) -> bool:
        return len(self.classes) > 0

    def train(self, mode: bool = True) -> "VQGANTransformer":
        super().train(mode)
        self.vqgan.eval()  # the first stage stays frozen and in eval mode
        return self

    # ----------------------------------------------------------------------- tokens <-> images
    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> code indices (B, h, w)."""
        return self.vqgan.encode(x)[1]

    @torch.no_grad()
    def indices_to_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images (B, C, h*f, w*f) in [-1, 1]."""
        return self.vqgan.decode_indices(indices).clamp(-1, 1)

    def labels_tensor(self, class_labels, batch_size: int, device) -> Optional[torch.Tensor]:
        """Class labels (int, sequence or tensor) as a (B,) long tensor, checked against the
        model's classes; None stays None (unconditional)."""
        if class_labels is None:
            return None
        if not self.conditional:
            raise ValueError("class labels were given but this transformer is unconditional.")
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"{labels.numel()} class labels for {batch_size} samples.")
        bad = labels[(labels < 0) | (labels >= len(self.classes))]
        if bad.numel():
            raise ValueError(f"class label {bad[0].item()} is not known to this model: it has {len(self.classes)} "
                            f"classes, 0..{len(self.classes) - 1} ({', '.join(self.classes[:10])}"
                            f"{', ...' if len(self.classes) > 10 else ''}).")
        return labels

    def first_tokens(self, labels: Optional[torch.Tensor], batch_size: int, device, class_dropout: float = 0.0):
        """(B, 1): the class token of each label, or the start token ("no class")."""
        start = torch.full((batch_size, 1), self.layout.start_token, dtype=torch.long, device=device)
        if labels is None:
            return start
        tokens = (self.layout.class_offset + labels).view(-1, 1)
        if class_dropout > 0:
            if not self.layout.has_null_class:
                raise ValueError("the reference's token layout has no 'no class' token: class dropout needs a model "
                                 "trained here.")
            tokens = torch.where(torch.rand(batch_size, 1, device=device) < class_dropout, start, tokens)
        return tokens

    # --------------------------------------------------------------------------------- training
    def forward(self, indices: torch.Tensor, labels: Optional[torch.Tensor] = None, pkeep: float = 1.0,
                class_dropout: float = 0.0):
        """indices (B, h, w) or (B, N) codes -> logits (B, N, vocab_size), cross-entropy loss.
        pkeep < 1 replaces that share of the input codes by random codes (training only)."""
        codes = indices.flatten(1)  # (B, N)
        b = codes.shape[0]
        inputs = codes
        if self.training and pkeep < 1.0:
            keep = torch.rand(codes.shape, device=codes.device) < pkeep
            inputs = torch.where(keep, codes, torch.randint_like(codes, self.n_codes))
        first = self.first_tokens(labels, b, codes.device, class_dropout if self.training else 0.0)
        logits = self.gpt(torch.cat([first, inputs[:, :-1]], dim=1))  # (B, N, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))
        return logits, loss

    # --------------------------------------------------------------------------------- sampling
    def _pick(self, logits, noise, guided, cfg_scale, temperature, top_k, top_p):
        """The next code of each sample: pick_tokens with this model's codes."""
        return pick_tokens(logits, noise, self.n_codes, guided, cfg_scale, temperature, top_k, top_p)

    @torch.no_grad()
    def sample(self, num_samples: int, class_labels=None, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, cfg_scale: float = 1.0, use_cache: bool = True,
               generator: Optional[torch.Generator] = None, prefix: Optional[torch.Tensor] = None,
               grid: Optional[Sequence[int]] = None, cuda_graph: Optional[bool] = None,
               compile: bool = False) -> torch.Tensor:
        """Sample code indices (B, h, w). `prefix` (B, P) or (B, rows, w): codes to complete
        (e.g. the top half of an image). `grid=(H, W)` samples a grid of any size at least the
        training grid with the paper's sliding attention window (no cache). With the cache, each
        token is one fixed-shape step (TokenLoop), captured once as a CUDA graph and replayed on
        CUDA (`cuda_graph=False` runs it eagerly there too). `compile=True` also compiles that
        step (torch.compile, fewer and fused kernels): the first call of a process pays the
        compilation, later calls reuse it."""
        check_sampling_args(temperature, top_k, top_p)
        device = self.gpt.head.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device.")
        labels = self.labels_tensor(class_labels, num_samples, device)
        guided = labels is not None and cfg_scale != 1.0
        if guided and not self.layout.has_null_class:
            raise ValueError("classifier-free guidance needs a 'no class' token, which the reference's transformers "
                             "do not have: use cfg_scale=1.")
        first = self.first_tokens(labels, num_samples, device)
        if guided:  # second half of the batch: the same samples without their class
            first = torch.cat([first, self.first_tokens(None, num_samples, device)])
        pick = dict(guided=guided, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        # Exp(1) numbers for one draw per sample and step, drawn on the device from `generator`
        noise = torch.ones(num_samples, self.n_codes, device=device)
        draw = lambda: noise.exponential_(1, generator=generator)  # noqa: E731
        if grid is not None:
            if prefix is not None:
                raise ValueError("prefix completion and a grid cannot be combined.")
            return self._sample_window(first, num_samples, tuple(grid), pick, noise, draw)

        h, w = self.latent_shape
        n = h * w
        codes = torch.zeros(first.shape[0], n, dtype=torch.long, device=device)
        p = 0
        if prefix is not None:
            prefix = prefix.reshape(num_samples, -1).to(device)
            p = prefix.shape[1]
            if p >= n or prefix.min() < 0 or prefix.max() >= self.n_codes:
                raise ValueError(f"a prefix must hold fewer than {n} codes with ids in [0, {self.n_codes}).")
            codes[:, :p] = prefix.repeat(2, 1) if guided else prefix
        if use_cache:
            loop = TokenLoop(self, first, codes, p, noise, pick)
            loop.run(n, draw, cuda_graph=device.type == "cuda" if cuda_graph is None else cuda_graph, compile=compile)
        else:
            for t in range(p, n):
                logits = self.gpt(torch.cat([first, codes[:, :t]], 1))[:, -1]
                draw()
                codes[:, t] = self._pick(logits, noise, **pick)
        return codes[:num_samples].view(num_samples, h, w)

    def _sample_window(self, first, num_samples, grid, pick, noise, draw) -> torch.Tensor:
        """Each new token sees a training-sized window of the grid around it, clamped at the
        borders, and its position inside that window (as the reference's high-resolution
        sampling)."""
        h, w = self.latent_shape
        big_h, big_w = grid
        if big_h < h or big_w < w:
            raise ValueError(f"grid {big_h}x{big_w} is smaller than the transformer's training grid {h}x{w}: "
                            f"the sliding window needs at least {h}x{w} tokens.")
        codes = torch.zeros(first.shape[0], big_h, big_w, dtype=torch.long, device=first.device)
        for i in range(big_h):
            i0 = min(max(i - h // 2, 0), big_h - h)
            for j in range(big_w):
                j0 = min(max(j - w // 2, 0), big_w - w)
                window = codes[:, i0:i0 + h, j0:j0 + w].reshape(codes.shape[0], -1)
                pos = (i - i0) * w + (j - j0)
                logits = self.gpt(torch.cat([first, window[:, :pos]], 1))[:, -1]
                draw()
                codes[:, i, j] = self._pick(logits, noise, **pick)
        return codes[:num_samples]

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_entries(self) -> tuple[dict, dict]:
        """(description, weights) of this model: what save_pretrained writes (the GPT's weights
        prefixed "gpt.", the VQGAN's "vqgan.")."""
        layout = self.layout
        meta = {"kind": "transformer", "format_version": 1, "model_config": config_to_dict(self.gpt.config),
                "vqgan_config": config_to_dict(self.vqgan.config), "classes": list(self.classes),
                "token_layout": {"reference": layout.reference, "sos_token": layout.sos_token}}
        return meta, self.state_dict()

    @classmethod
    def from_checkpoint(cls, path, config: Optional[str] = None, map_location=None,
                        raw: bool = False) -> "VQGANTransformer":
        """Load a stage-2 checkpoint written by training_transformer.py (it carries its VQGAN),
        a model folder's .safetensors, or a taming-transformers transformer `.ckpt` (YAML
        `config`, or shapes of the releases) in the reference's token layout. A checkpoint with an
        EMA of the GPT's weights (--ema-decay) gives the averaged weights unless `raw`."""
        ckpt = load_checkpoint(path, map_location=map_location or "cpu")
        return cls.from_checkpoint_dict(ckpt, str(path), config, raw)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, path: str, config: Optional[str] = None,
                             raw: bool = False) -> "VQGANTransformer":
        kind = checkpoint_kind(ckpt)
        if kind == "reference-transformer":
            state = ckpt["state_dict"]
            vq_cfg, gpt_cfg, cond = transformer_configs(state, config)
            vqgan = VQGAN(vq_cfg)
            load_strict(vqgan, sub_state(state, "first_stage_model."), f"{path} (first_stage_model)")
            n_classes = cond.get("n_classes", 0)
            layout = TokenLayout(vq_cfg.n_embed, n_classes, reference=True, sos_token=cond.get("sos_token", 0))
            model = cls(vqgan, gpt_cfg, [str(k) for k in range(n_classes)], layout)
            load_strict(model.gpt, sub_state(state, "transformer."), f"{path} (transformer)")
            return model.eval()
        if kind != "transformer":
            raise UserError(f"{path} is not a stage-2 (transformer) checkpoint (kind '{kind}'): "
                            "give a checkpoint written by training_transformer.py.")
        ckpt = stage2_entries(ckpt)
        require_entries(ckpt, ("model", "model_config", "vqgan", "vqgan_config", "classes"), path, "stage-2 checkpoint")
        gpt_config = model_config_from_dict(GPTConfig, ckpt["model_config"])
        vqgan = vqgan_from_stage2(ckpt, str(path))
        classes = [str(c) for c in ckpt["classes"]]
        saved_layout = ckpt.get("token_layout") or {}
        try:
            layout = TokenLayout(vqgan.config.n_embed, len(classes), reference=bool(saved_layout.get("reference", False)),
                                 sos_token=int(saved_layout.get("sos_token", 0)))
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{path} has a malformed token_layout entry: the file is damaged.") from None
        if gpt_config.vocab_size != layout.vocab_size:
            raise UserError(f"{path} is inconsistent: its GPT has {gpt_config.vocab_size} token ids, but its VQGAN's "
                            f"{vqgan.config.n_embed} codes and {len(classes)} classes need "
                            f"{layout.vocab_size}: the file is damaged.")
        model = cls(vqgan, gpt_config, classes, layout)
        load_strict(model.gpt, averaged_state(ckpt, raw), path + ("" if raw or "ema" not in ckpt else " (EMA)"))
        return model.eval()
