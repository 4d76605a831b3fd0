"""The files of an image folder: finding them (a directory walk, or a --file-list), checking
that Pillow can read their headers, remembering both in the run folder (file_index.json) so a
resume does not reopen every file, decoding them to RGB, and the run's list of the files that
could not be used (skipped_files.txt).
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    return [path for path, _, _ in list_images(root)]


def _header_problem(path: str) -> Optional[str]:
    try:
        with _open(path) as img:
            img.size  # header only: cheap; full decode errors are caught when loading
        return None
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def check_images(paths: Sequence, skip_log: Optional[SkipLog] = None, max_bad_fraction: float = 1.0,
                 index: Optional["FileIndex"] = None) -> list[str]:
    """Drop files whose header Pillow cannot read (not an image, empty, an unsupported format,
    over the decompression-bomb limit), with one warning naming each; list them in skip_log.
    Too many bad files (over max_bad_fraction) is a UserError. paths: paths, or (path, size,
    mtime) entries of list_images, whose verdicts the index may already hold."""
    skip_log = skip_log if skip_log is not None else SkipLog()
    skip_log.scanned = len(paths)
    entries = [p if isinstance(p, tuple) else (p, 0, -1) for p in paths]  # mtime -1: never in an index
    problems = (index or FileIndex()).check(entries)
    paths = [e[0] for e in entries]
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


def list_images(root: str, file_list: Optional[str] = None) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image file under root, sorted: one directory walk with a
    stat per file. With file_list (--file-list), the files it names instead, one per line,
    relative to root unless absolute; a named file that is missing is listed with size -1."""
    if not os.path.isdir(root):
        raise UserError(f"--dataset-path {root} is not a folder: give the folder that holds your images.")
    if file_list is not None:
        try:
            names = [line.strip() for line in open(file_list) if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --file-list {file_list} ({e}): give a text file with one image path per "
                            "line.") from None
        entries = []
        for name in names:
            path = name if os.path.isabs(name) else os.path.join(root, name)
            try:
                st = os.stat(path)
                entries.append((path, st.st_size, st.st_mtime_ns))
            except OSError:
                entries.append((path, -1, 0))
        if not entries:
            raise UserError(f"--file-list {file_list} names no files: give one image path per line.")
        return sorted(entries)
    entries, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):  # as pathlib's rglob: no loops through links
                    stack.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    st = entry.stat()
                    entries.append((entry.path, st.st_size, st.st_mtime_ns))
    if not entries:
        raise UserError(f"--dataset-path {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                        "searched recursively: point it at the folder with your images.")
    return sorted(entries)


class FileIndex:
    """OUTPUT_DIR/file_index.json: every image file a run found, with its size, modification time
    and the verdict of its header check. A resumed run (or another process that starts after it
    was written) re-stats the files but reopens only those that are new or changed. Written once
    the run's checks have passed (start_writing)."""

    def __init__(self, path=None):
        self.path = None if path is None else Path(path)
        self.known: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.known = {k: v for k, v in json.loads(self.path.read_text()).items()
                              if isinstance(v, list) and len(v) == 3}
            except (OSError, ValueError, AttributeError):
                self.known = {}  # an unreadable index is rebuilt
        self.entries: dict[str, list] = {}
        self.reused = 0

    def check(self, entries: Sequence[tuple[str, int, int]]) -> list[Optional[str]]:
        """The header problem of each (path, size, mtime) entry (None: readable), from the index
        when the file is unchanged, else by opening it."""
        todo = []
        for path, size, mtime in entries:
            old = self.known.get(path)
            if size < 0:
                self.entries[path] = [size, mtime, "FileNotFoundError: named by --file-list, not found"]
            elif old is not None and old[0] == size and old[1] == mtime:
                self.entries[path] = old
                self.reused += 1
            else:
                todo.append((path, size, mtime))
        with ThreadPoolExecutor(max_workers=16) as pool:
            for (path, size, mtime), problem in zip(todo, pool.map(_header_problem, [t[0] for t in todo])):
                self.entries[path] = [size, mtime, problem]
        return [self.entries[path][2] for path, _, _ in entries]

    def start_writing(self) -> None:
        if self.path is None or not self.entries:
            return
        try:
            self.path.write_text(json.dumps(self.entries))
        except OSError as e:  # a convenience: the next start only checks the headers again
            warn(f"cannot write {self.path} ({e.strerror}); the next start checks every file again.")
