"""Image data for both stages (Esser et al. 2021 train on image folders; the demo uses
photographs bundled with scikit-image): the albumentations pipeline, a dataset whose augmentation
is seeded per (epoch, index), the epoch-seeded sampler, data loaders, the demo photographs and the
train/validation split. Finding and checking the files of a folder: imagefiles.py.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from errors import UserError
from imagefiles import BAD_IMAGE_ERRORS, FileIndex, SkipLog, check_images, list_images, load_image
from utils import warn

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


def default_workers() -> int:
    """Data-loading processes when --num-workers is not given: the CPUs this process may use
    (its share under torchrun's LOCAL_WORLD_SIZE), one left for the training process, at least 2
    and at most 8 (a GPU machine's 16 cores feed one GPU with 8: decoding, resizing and cropping
    stay off the training process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return min(8, max(2, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def make_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, num_workers: Optional[int],
                drop_last: bool, pin_memory: bool = False) -> DataLoader:
    """num_workers None: default_workers()."""
    num_workers = default_workers() if num_workers is None else num_workers
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
                   skip_log: Optional[SkipLog] = None, max_bad_fraction: float = 1.0, color: bool = False,
                   file_list: Optional[str] = None, val_dataset_path: Optional[str] = None,
                   index: Optional[FileIndex] = None) -> tuple[ImageDataset, ImageDataset, str]:
    """(train, val, description) for a folder of images or, without a path, the demo photos.
    Training crops are random (augment) or central, with scale and colour augmentation when
    `color` (build_transform). With `classes` (a list, filled here from the first-level
    subfolders when empty), items come with integer labels. The files: every image under the
    folder, or those --file-list names; validation: a seeded val_fraction of them, or every image
    of val_dataset_path. Header checks already in the run's file index are not repeated. Unusable
    files go to skip_log; more than max_bad_fraction of them is a UserError."""
    if dataset_path is None:
        if classes is not None:
            raise UserError("a class-conditional run needs --dataset-path with one subfolder per class; "
                            "the demo photographs have no classes.")
        if file_list is not None or val_dataset_path is not None:
            raise UserError("--file-list and --val-dataset-path need --dataset-path (the demo has its own photographs).")
        # Shortest side 4x the crop, so a crop shows a quarter of it; the right quarter (at least
        # one crop wide) of every photo is held out for validation.
        side = 4 * size
        train_parts, val_parts = demo_images(side, min_val_width=size)
        train = ImageDataset(train_parts, build_transform(size, augment, flip, resize=False, color=color), seed,
                             length=demo_length, channels=channels)
        val = demo_validation(val_parts, size, channels, seed)
        return train, val, (f"demo: random {size}x{size} crops of {len(DEMO_IMAGES)} scikit-image photographs "
                            f"(validation: crops of a held-out strip of each)")
    index = index if index is not None else FileIndex()
    paths = check_images(list_images(dataset_path, file_list), skip_log, max_bad_fraction, index)
    if val_dataset_path is None:
        train_paths, val_paths = split_files(paths, val_fraction, seed)
    else:
        train_paths, val_paths = paths, check_images(list_images(val_dataset_path), skip_log, max_bad_fraction, index)
    label = lambda ps: None  # noqa: E731
    if classes is not None:
        found = class_names(paths, dataset_path)
        if classes and classes != found:
            raise UserError(f"the classes of {dataset_path} ({', '.join(found)}) differ from the checkpoint's "
                            f"({', '.join(classes)}): use the same folder layout as the original run.")
        if val_dataset_path is not None and set(class_names(val_paths, val_dataset_path)) - set(found):
            raise UserError(f"{val_dataset_path} has class folders that {dataset_path} lacks: give both the same "
                            "class subfolders.")
        classes[:] = found
        number = {name: i for i, name in enumerate(found)}
        label = lambda ps, root=dataset_path: [number[Path(p).relative_to(root).parts[0]] for p in ps]  # noqa: E731
    train = ImageDataset(train_paths, build_transform(size, augment, flip and augment, color=color), seed, channels=channels,
                         labels=label(train_paths), skip_log=skip_log)
    val_labels = label(val_paths) if val_dataset_path is None or classes is None else label(val_paths, val_dataset_path)
    val = ImageDataset(val_paths, build_transform(size, False), seed, channels=channels, labels=val_labels,
                       skip_log=skip_log)
    reused = f"; {index.reused} header checks reused from the run's file index" if index.reused else ""
    return train, val, (f"{len(train_paths)} training and {len(val_paths)} validation images from {dataset_path}"
                        + (f" and {val_dataset_path}" if val_dataset_path else "") + reused)


def run_datasets(cfg, size: int, channels: int, flip: bool, augment: bool = True, classes: Optional[list[str]] = None,
                 color: bool = False) -> tuple[ImageDataset, ImageDataset, str, SkipLog, FileIndex]:
    """image_datasets for a training run's config (its folders, file list, seed and bad-file limit),
    with the run folder's skip log and file index, both written only once the run's checks have
    passed (their start_writing)."""
    skip_log = SkipLog(Path(cfg.output_dir) / "skipped_files.txt")
    index = FileIndex(Path(cfg.output_dir) / "file_index.json")
    train, val, description = image_datasets(
        cfg.dataset_path, size, channels, flip, cfg.val_fraction, cfg.seed, augment=augment, classes=classes,
        skip_log=skip_log, max_bad_fraction=cfg.max_bad_fraction, color=color, file_list=cfg.file_list,
        val_dataset_path=cfg.val_dataset_path, index=index)
    return train, val, description, skip_log, index


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
