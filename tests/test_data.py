"""data.py and imagefiles.py: image conversion, scanning, bad files, seeded datasets and sampler, the split."""
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from conftest import write_images
from data import EpochSampler, ImageDataset, build_transform, split_files
from imagefiles import SkipLog, check_images, load_image, scan_images, to_rgb_array


def roundtrip(img: Image.Image, fmt: str, **kw) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    buf.seek(0)
    return to_rgb_array(Image.open(buf))


def test_grayscale_palette_cmyk():
    grey = Image.fromarray(np.full((4, 5), 77, np.uint8), "L")
    out = roundtrip(grey, "PNG")
    assert out.shape == (4, 5, 3) and (out == 77).all()
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = roundtrip(pal, "PNG")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (0, 0, 255)
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    out = roundtrip(cmyk, "JPEG", quality=100)
    assert out.shape == (3, 3, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black -> white
    rgba[0, 1] = (0, 0, 0, 255)  # opaque black stays black
    rgba[1, :] = (255, 0, 0, 128)  # half red over white
    out = roundtrip(Image.fromarray(rgba, "RGBA"), "PNG")
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)
    assert out[1, 0, 0] == 255 and 120 <= out[1, 0, 1] <= 135
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    out = roundtrip(pal, "PNG", transparency=0)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 128, 65535]], np.uint16)
    out = roundtrip(Image.fromarray(arr), "PNG")
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied():
    arr = np.zeros((2, 4, 3), np.uint8)
    arr[0, 0] = 255  # top-left pixel white in the stored (2 x 4) image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = roundtrip(Image.fromarray(arr), "PNG", exif=exif.tobytes())
    assert out.shape == (4, 2, 3)
    assert out[0, 1].min() > 200  # the stored top-left is now top-right


def test_scan_is_recursive_sorted_and_filtered(tmp_path):
    paths = write_images(tmp_path, n=4)
    (tmp_path / "notes.txt").write_text("not an image")
    assert scan_images(str(tmp_path)) == sorted(paths)
    with pytest.raises(UserError, match="is not a folder"):
        scan_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        scan_images(str(tmp_path / "empty"))


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, capsys):
    paths = write_images(tmp_path, n=2)
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is not a jpeg")
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    good = check_images(sorted(paths + [str(fake), str(empty)]))
    assert good == sorted(paths)
    err = capsys.readouterr().err
    assert str(fake) in err and str(empty) in err
    # a truncated file passes the header check and is skipped when decoded
    data = open(paths[1], "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        load_image(str(truncated))
    ds = ImageDataset([str(truncated), paths[1]], build_transform(16, train=True), seed=0)
    x = ds[(0, 0)]
    assert x.shape == (3, 16, 16)
    assert str(truncated) in capsys.readouterr().err


def test_dataset_is_seeded_per_sample_and_epoch(tmp_path):
    paths = write_images(tmp_path, n=2, size=(64, 80))
    ds = ImageDataset(paths, build_transform(32, train=True, flip=True), seed=3)
    a, b = ds[(0, 0)], ds[(0, 0)]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(0, 1)])  # another epoch, another crop
    assert a.shape == (3, 32, 32) and -1 <= a.min() and a.max() <= 1
    grey = ImageDataset(paths, build_transform(32, train=False), seed=3, channels=1)
    assert grey[(1, 0)].shape == (1, 32, 32)


def test_sampler_order_depends_on_epoch_and_resumes():
    s = EpochSampler(10, seed=1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and all(e == 0 for _, e in first)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in first]
    s.set_epoch(0, start=4)
    assert list(s) == first[4:] and len(s) == 6
    assert [i for i, _ in EpochSampler(5, 0, shuffle=False)] == list(range(5))


def test_split_is_disjoint_and_seeded():
    paths = [f"p{i}" for i in range(20)]
    train, val = split_files(paths, 0.1, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(paths)
    assert split_files(paths, 0.1, seed=0) == (train, val)
    small_train, small_val = split_files(["a", "b"], 0.05, 0)  # at least one image each
    assert len(small_train) == 1 and len(small_val) == 1


# ------------------------------------------------------------------ large folders: index, file list
def test_a_resume_reuses_the_file_index_and_checks_only_changed_files(images, tmp_path, cli, monkeypatch):
    import imagefiles
    from conftest import TINY_FLAGS

    data = tmp_path / "data"
    shutil.copytree(images, data)
    out = tmp_path / "run"
    args = ["--dataset-path", data, "--output-dir", out, *TINY_FLAGS, "--sample-every", "100", "--val-fraction", "0.2"]
    assert cli("training_vqgan", *args, "--max-steps", "1").returncode == 0
    index = json.loads((out / "file_index.json").read_text())
    files = sorted(str(p) for p in data.rglob("*") if p.is_file())
    assert sorted(index) == files and all(v[2] is None for v in index.values())
    opened = []
    real = imagefiles._header_problem
    monkeypatch.setattr(imagefiles, "_header_problem", lambda path: opened.append(path) or real(path))
    changed = Path(files[0])
    Image.new("RGB", (30, 20), (1, 2, 3)).save(changed, format=Image.open(changed).format)
    os.utime(changed, ns=(1, 1))
    r = cli("training_vqgan", "--output-dir", out, "--resume", "latest", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert opened == [str(changed)]  # every other header check came from the index
    assert f"{len(files) - 1} header checks reused" in r.stdout


def test_file_list_and_a_separate_validation_folder(images, tmp_path):
    from data import image_datasets

    files = sorted(str(p.relative_to(images)) for p in Path(images).rglob("*") if p.is_file())
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(files[:4] + ["class0/not_there.png"]) + "\n")
    val_dir = tmp_path / "val"
    write_images(val_dir, n=3, seed=5)
    skip = SkipLog()
    train, val, description = image_datasets(str(images), 16, 3, False, 0.5, 0, file_list=str(listing),
                                             val_dataset_path=str(val_dir), skip_log=skip)
    assert sorted(train.items) == sorted(str(Path(images) / f) for f in files[:4])  # all listed, none split off
    assert sorted(val.items) == sorted(str(p) for p in val_dir.rglob("*") if p.is_file())
    assert list(skip.seen) == [str(Path(images) / "class0" / "not_there.png")]
    assert "4 training and 3 validation images" in description
    with pytest.raises(UserError, match="cannot read --file-list"):
        image_datasets(str(images), 16, 3, False, 0.5, 0, file_list=str(tmp_path / "none.txt"))
    with pytest.raises(UserError, match="need --dataset-path"):
        image_datasets(None, 16, 3, False, 0.5, 0, file_list=str(listing))


def test_the_folder_walk_does_not_follow_links_to_folders(tmp_path):
    """As pathlib's rglob did: a link back up the tree is not a loop, a linked folder is not walked."""
    write_images(tmp_path / "real", n=2)
    os.symlink(tmp_path, tmp_path / "real" / "loop")
    assert scan_images(str(tmp_path)) == sorted(str(p) for p in (tmp_path / "real").rglob("*.*") if p.is_file())
    assert len(scan_images(str(tmp_path))) == 2
