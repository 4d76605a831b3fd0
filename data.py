"""Image data for both stages (Esser et al. 2021 train on image folders; the demo uses
photographs bundled with scikit-image): scanning and decoding image files, the albumentations
pipeline, a dataset whose augmentation is seeded per (epoch, index), the epoch-seeded sampler,
data loaders, the demo photographs and the train/validation split.
"""
from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from errors import UserError
from utils import warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
PIL_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # the only decoders we let open a file
# Pillow raises the bomb *error* above twice its pixel limit and only warns between one and two
# times; we make the warning an error too (see _open), so every image over the limit is skipped.
BAD_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning)


class SkipLog:
    """The run folder's skipped_files.txt: one 'path<TAB>reason' line per file that could not
    be used, each file listed once even when several data-loading workers or processes meet it
    (the file is appended under an exclusive lock). It only remembers until start_writing() is
    called, once the run's checks have passed: a start that fails writes nothing."""

    def __init__(self, path=None):
        self.path = None if path is None else Path(path)
        self.seen: dict[str, str] = {}  # file -> reason
        self.scanned = 0  # image files found in the dataset folder (set by check_images)
        self.writing = False

    def start_writing(self) -> None:
        """From now on entries go to the file; the ones met so far first."""
        self.writing = self.path is not None
        for file, reason in list(self.seen.items()):
            self._write(file, reason)

    def add(self, file: str, reason: str) -> bool:
        """Record a bad file; True the first time this process sees it (warn then)."""
        if file in self.seen:
            return False
        self.seen[file] = reason
        self._write(file, reason)
        return True

    def _write(self, file: str, reason: str) -> None:
        if not self.writing:
            return
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                if file not in {line.split("\t", 1)[0] for line in f}:
                    f.write(f"{file}\t{reason}\n")
        except OSError as e:  # the list is a convenience: a full disk must not stop the data loading
            warn(f"cannot add {file} to {self.path} ({e.strerror}).")

    def too_many(self, n_bad: int, max_bad_fraction: float) -> Optional[str]:
        """The error message when n_bad of the scanned files is more than max_bad_fraction."""
        if self.scanned and n_bad / self.scanned > max_bad_fraction:
            return bad_fraction_message(n_bad, self.scanned, max_bad_fraction, self.path or "the warnings above")
        return None

    def count(self) -> int:
        """Files listed so far (by every process), or seen by this one without a file."""
        if self.path is None or not self.path.exists():
            return len(self.seen)
        with open(self.path) as f:
            return sum(1 for _ in f)


def bad_fraction_message(n_bad: int, n_total: int, max_bad_fraction: float, where) -> str:
    return (f"{n_bad} of {n_total} image files could not be used ({100 * n_bad / n_total:.1f}%, more than "
            f"--max-bad-fraction {max_bad_fraction:g}); they are listed in {where}. Fix or remove them, or raise "
            "--max-bad-fraction.")


def _open(path: str):
    """Image.open limited to known formats, with Pillow's decompression-bomb warning as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path, formats=PIL_FORMATS)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB: EXIF orientation applied, transparency
    composited on white, 16-bit and float greyscale scaled (not clipped) to 8 bits."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale (PNG/TIFF); Pillow's convert("RGB") would clip everything above 255.
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return np.repeat(np.clip(grey, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        grey = grey * 255.0 if grey.max(initial=0.0) <= 1.0 else grey
        return np.repeat(np.clip(grey, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))  # L, 1, P, CMYK, YCbCr, RGB


def load_image(path: str) -> np.ndarray:
    with _open(path) as img:
        img.load()  # decodes fully here, so truncated files fail now
        return to_rgb_array(img)


def scan_images(root: str) -> list[str]:
    """All files under root with an image extension, recursively, sorted. A missing folder or
    one without image files is a UserError."""
    if not os.path.isdir(root):
        raise UserError(f"--dataset-path {root} is not a folder: give the folder that holds your images.")
    paths = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(f"--dataset-path {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                        "searched recursively: point it at the folder with your images.")
    return paths


def _header_problem(path: str) -> Optional[str]:
    try:
        with _open(path) as img:
            img.size  # header only: cheap; full decode errors are caught when loading
        return None
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def check_images(paths: Sequence[str], skip_log: Optional[SkipLog] = None, max_bad_fraction: float = 1.0) -> list[str]:
    """Drop files whose header Pillow cannot read (not an image, empty, an unsupported format,
    over the decompression-bomb limit), with one warning naming each; list them in skip_log.
    Too many bad files (over max_bad_fraction) is a UserError."""
    skip_log = skip_log if skip_log is not None else SkipLog()
    skip_log.scanned = len(paths)
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = list(pool.map(_header_problem, paths))
    good = []
    for path, problem in zip(paths, problems):
        if problem is None:
            good.append(path)
        elif skip_log.add(path, problem):
            warn(f"skipping {path}: not a readable image ({problem})")
    if not good:
        raise UserError(f"none of the {len(paths)} image files could be read; check the files in the dataset folder.")
    problem = skip_log.too_many(len(paths) - len(good), max_bad_fraction)
    if problem:
        raise UserError(problem)
    return good


def build_transform(size: int, train: bool, flip: bool = False, resize: bool = True, color: bool = False):
    """Shortest side to `size` (unless resize=False), then a random (train) or center (val)
    size x size crop, optional horizontal flip. color (training only): the crop is taken at a
    random scale (x0.5 to x2 of its size, reflected at borders when the image is too small) and
    its colours are jittered (brightness, contrast, saturation, any hue) or turned grey, so that a
    small set of photographs cannot be learnt colour by colour. Albumentations 2.x."""
    # Albumentations checks for updates over the network on import unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    ops = [A.SmallestMaxSize(max_size=size, area_for_downscale="image")] if resize else []
    if train and color:
        ops += [A.RandomScale(scale_limit=(-0.5, 1.0), p=1.0),
                A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101)]
    ops.append(A.RandomCrop(size, size) if train else A.CenterCrop(size, size))
    if train and flip:
        ops.append(A.HorizontalFlip(p=0.5))
    if train and color:
        ops += [A.ColorJitter(brightness=0.3, contrast=0.3, saturation=(0.5, 1.5), hue=0.5, p=0.8),
                A.ToGray(p=0.2)]
    return A.Compose(ops)


def sample_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ImageDataset(Dataset):
    """Images as (C, H, W) float tensors in [-1, 1].

    Items are file paths or in-memory (H, W, 3) arrays; `length` may exceed the number of items
    (the demo draws many random crops from a few photographs). Keys are (index, epoch) pairs from
    EpochSampler: each sample's augmentation is seeded by (seed, epoch, index), so a run sees the
    same pixels whatever the number of workers, different ones every epoch and in every worker,
    and a resumed run continues exactly. A file that fails to decode (truncated, corrupt) is
    listed in `skip_log` and warned about once, and the next item is used in its place.
    """

    def __init__(self, items: Sequence, transform, seed: int, length: Optional[int] = None, channels: int = 3,
                 labels: Optional[Sequence[int]] = None, skip_log: Optional[SkipLog] = None):
        self.items, self.transform, self.seed = list(items), transform, seed
        self.length, self.channels = length or len(self.items), channels
        self.labels = None if labels is None else list(labels)
        self.skip_log = skip_log if skip_log is not None else SkipLog()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        """(C, H, W) tensor, or (tensor, label) when the dataset has labels."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        n = len(self.items)
        for attempt in range(min(n, 64)):
            item = self.items[(index + attempt) % n]
            try:
                image = load_image(item) if isinstance(item, str) else item
            except BAD_IMAGE_ERRORS as e:
                if self.skip_log.add(item, f"{type(e).__name__}: {e}"):
                    warn(f"skipping {item}: cannot decode it ({type(e).__name__}: {e})")
                continue
            self.transform.set_random_seed(sample_seed(self.seed, epoch, index))
            x = to_tensor(self.transform(image=image)["image"], self.channels)
            return x if self.labels is None else (x, self.labels[(index + attempt) % n])
        raise UserError(f"{min(n, 64)} images in a row could not be decoded (from item {index}); check the dataset.")


def to_tensor(image: np.ndarray, channels: int = 3) -> torch.Tensor:
    """(H, W, 3) uint8 -> (channels, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    if channels == 1:  # ITU-R 601 luma
        x = (0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3])
    return x


class EpochSampler(Sampler):
    """Yields (index, epoch) keys in an order fixed by (seed, epoch), from position `start`, so
    that a run resumed in the middle of an epoch continues with the same samples. Distributed
    (world_size > 1): the epoch's order is dealt round-robin to the ranks, each rank getting
    n // world_size keys (the remainder is dropped, as DistributedSampler does with
    drop_last), and `start` counts this rank's keys."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size if self.world_size > 1 else self.n

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[self.rank::self.world_size][:self.per_rank]
        for i in mine[self.start:].tolist():
            yield (i, self.epoch)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # differs per worker (PyTorch adds the worker id)
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, num_workers: int,
                drop_last: bool, pin_memory: bool = False) -> DataLoader:
    # The loader draws its workers' base seed from its own generator: starting an iterator
    # (each epoch, each validation pass, after a resume) then leaves the global torch RNG alone,
    # which a resumed run needs to continue exactly. The data itself is seeded per sample.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=_seed_worker,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(sampler.seed))


# Colour photographs that ship inside scikit-image's wheel (no download).
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
               "stereo_motorcycle")


def demo_images(shortest_side: int, min_val_width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The demo photographs as RGB arrays, shortest side resized once, each cut into a training
    part and a held-out strip on the right (a quarter of the width, at least `min_val_width`
    columns) that is never trained on."""
    import skimage.data

    train, val = [], []
    for name in DEMO_IMAGES:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pair: the left view
        pil = Image.fromarray(image).convert("RGB")
        scale = shortest_side / min(pil.size)
        pil = pil.resize((max(shortest_side, round(pil.width * scale)), max(shortest_side, round(pil.height * scale))),
                         Image.Resampling.LANCZOS)
        array = np.asarray(pil)
        val_width = max(min_val_width, array.shape[1] // 4)
        train.append(array[:, :-val_width])
        val.append(array[:, -val_width:])
    return train, val


def demo_validation(val_parts: list[np.ndarray], size: int, channels: int, seed: int, length: int = 64) -> ImageDataset:
    """Fixed random crops (epoch 0, fixed seed) of the demo's held-out strips; a longer set
    starts with the same crops as a shorter one."""
    return ImageDataset(val_parts, build_transform(size, True, resize=False), seed + 1, length=length,
                        channels=channels)


def fixed_images(train: Dataset, val: Dataset, n: int):
    """The first n images of the validation split (of the training set when there is none), in
    a fixed order: what the sample grids show at every sample step. Labels too, when they have them."""
    dataset = val if len(val) else train
    return next(iter(make_loader(dataset, EpochSampler(len(dataset), 0, shuffle=False), n, 0, False)))


def split_files(paths: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded hold-out split: (train, val), each sorted."""
    shuffled = list(paths)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(paths) - 1, max(1 if val_fraction > 0 else 0, round(len(paths) * val_fraction)))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def class_names(paths: Sequence[str], root: str) -> list[str]:
    """Sorted names of the first-level subfolders that hold the images (one class each)."""
    names = set()
    for path in paths:
        parts = Path(path).relative_to(root).parts
        if len(parts) < 2:
            raise UserError(f"{path} lies directly in --dataset-path, but a class-conditional run needs every image "
                            "inside a first-level subfolder named after its class (DIR/<class>/...).")
        names.add(parts[0])
    return sorted(names)


def image_datasets(dataset_path: Optional[str], size: int, channels: int, flip: bool, val_fraction: float,
                   seed: int, augment: bool = True, classes: Optional[list[str]] = None, demo_length: int = 2048,
                   skip_log: Optional[SkipLog] = None, max_bad_fraction: float = 1.0, color: bool = False
                   ) -> tuple[ImageDataset, ImageDataset, str]:
    """(train, val, description) for a folder of images or, without a path, the demo photos.
    Training crops are random (augment) or central, with scale and colour augmentation when
    `color` (build_transform). With `classes` (a list, filled here from the first-level
    subfolders when empty), items come with integer labels. Unusable files go to skip_log; more
    than max_bad_fraction of them is a UserError."""
    if dataset_path is None:
        if classes is not None:
            raise UserError("a class-conditional run needs --dataset-path with one subfolder per class; "
                            "the demo photographs have no classes.")
        # Shortest side 4x the crop, so a crop shows a quarter of it; the right quarter (at least
        # one crop wide) of every photo is held out for validation.
        side = 4 * size
        train_parts, val_parts = demo_images(side, min_val_width=size)
        train = ImageDataset(train_parts, build_transform(size, augment, flip, resize=False, color=color), seed,
                             length=demo_length, channels=channels)
        val = demo_validation(val_parts, size, channels, seed)
        return train, val, (f"demo: random {size}x{size} crops of {len(DEMO_IMAGES)} scikit-image photographs "
                            f"(validation: crops of a held-out strip of each)")
    paths = check_images(scan_images(dataset_path), skip_log, max_bad_fraction)
    train_paths, val_paths = split_files(paths, val_fraction, seed)
    label = lambda ps: None  # noqa: E731
    if classes is not None:
        found = class_names(paths, dataset_path)
        if classes and classes != found:
            raise UserError(f"the classes of {dataset_path} ({', '.join(found)}) differ from the checkpoint's "
                            f"({', '.join(classes)}): use the same folder layout as the original run.")
        classes[:] = found
        index = {name: i for i, name in enumerate(found)}
        label = lambda ps: [index[Path(p).relative_to(dataset_path).parts[0]] for p in ps]  # noqa: E731
    train = ImageDataset(train_paths, build_transform(size, augment, flip and augment, color=color), seed, channels=channels,
                         labels=label(train_paths), skip_log=skip_log)
    val = ImageDataset(val_paths, build_transform(size, False), seed, channels=channels, labels=label(val_paths),
                       skip_log=skip_log)
    return train, val, f"{len(train_paths)} training and {len(val_paths)} validation images from {dataset_path}"


def training_batches(dataset: Dataset, cfg, dist_info, device: torch.device, step: int, total_steps: int):
    """The (epoch, micro-batches) of every optimizer step from `step` on: this process's share of
    each epoch's seeded order (run settings cfg: batch_size, grad_accum, num_workers, seed)."""
    sampler = EpochSampler(len(dataset), cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    loader = make_loader(dataset, sampler, cfg.batch_size, cfg.num_workers, drop_last=True,
                         pin_memory=device.type == "cuda")
    return epoch_batches(step, total_steps, cfg.batch_size, sampler, loader, cfg.grad_accum)


def epoch_batches(step: int, total_steps: int, batch_size: int, sampler: EpochSampler, loader: DataLoader,
                  accum: int = 1):
    """Yield (epoch, [accum micro-batches]) for each optimizer step from `step` on until
    `total_steps`, setting the sampler so that a resumed run continues at the same place of the
    same epoch order. `batch_size` is the loader's (per-process) batch."""
    per_step = batch_size * accum
    steps_per_epoch = sampler.per_rank // per_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, offset * per_step)
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) < accum:
                continue
            yield epoch, group
            group = []
            step += 1
            if step >= total_steps or step % steps_per_epoch == 0:
                break  # the next epoch starts with a fresh order (an incomplete group is dropped)
