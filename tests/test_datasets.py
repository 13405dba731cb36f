"""form_data.datasets: decoding of odd and broken images, every listing format, workers, DDP splitting."""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from form_data.datasets import (
    CsvImageText,
    ImageCache,
    ImageFolderDataset,
    JsonlImageText,
    NoReadableImage,
    StrictRows,
    WebDatasetShards,
    collate,
    collate_rows,
    default_transform,
    expand_shards,
    load_image,
    open_dataset,
)
from zh_t2i_base.cli import UserError

SIZE = 16


# ---------------------------------------------------------------------------------------------------------------------
# Fixture builders


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _color(n: int) -> tuple[int, int, int]:
    return (n * 37 % 256, n * 91 % 256, n * 53 % 256)


def _jpeg(n: int = 0, size: tuple[int, int] = (24, 20)) -> bytes:
    return _encode(Image.new("RGB", size, _color(n)), "JPEG", quality=95)


def _noise(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _noise_jpeg(size: int = 64) -> bytes:
    return _encode(_noise(size), "JPEG", quality=95)


def _damaged_png() -> bytes:
    """A PNG whose header is fine but whose compressed pixel data is scrambled: fails only when decoded."""
    data = bytearray(_encode(_noise(32), "PNG"))
    start = data.find(b"IDAT") + 20
    data[start:start + 40] = bytes(b ^ 0x5A for b in data[start:start + 40])
    return bytes(data)


BROKEN = {
    "corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
    "damaged_png": _damaged_png(),
    "truncated": _noise_jpeg()[: len(_noise_jpeg()) // 2],
    "zero_byte": b"",
    "text": "这不是图片, just text\n".encode(),
}


def _convertible() -> dict[str, bytes]:
    gradient16 = np.tile(np.linspace(0, 65535, 32), (8, 1)).astype(np.uint16)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))  # left half red, right half index 0 = transparent
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (4, 0, 8, 8))  # right half fully transparent (black) -> white
    return {
        "cmyk": _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        "i16": _encode(Image.fromarray(gradient16), "PNG"),
        "gray": _encode(Image.new("L", (8, 8), 128), "PNG"),
        "palette": _encode(palette, "PNG", transparency=0),
        "rgba": _encode(rgba, "PNG"),
        "la": _encode(Image.new("LA", (8, 8), (0, 0)), "PNG"),
        "int32": _encode(Image.fromarray(np.full((8, 8), 40000, np.int32)), "TIFF"),
        "float": _encode(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"),
    }


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def _write_images(root: Path, names: list[str], broken: dict[int, str] | None = None) -> None:
    """``names[i]`` gets a solid image of colour i, or the broken bytes ``BROKEN[broken[i]]``."""
    broken = broken or {}
    for i, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(BROKEN[broken[i]] if i in broken else _jpeg(i))


def _names(n: int, split: str = "train") -> list[str]:
    return [f"{split}/{i // 4:05d}/{i:09d}.jpg" for i in range(n)]


def _captions(n: int) -> list[str]:
    return [f"第{i}张, \"图\"" for i in range(n)]


def _csv(tmp_path: Path, n: int = 6, broken: dict[int, str] | None = None) -> Path:
    out = tmp_path / "export"
    names = _names(n)
    _write_images(out, names, broken)
    path = out / "train.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["title", "filepath"])
        w.writerows(zip(_captions(n), names, strict=True))
    return path


def _shard(path: Path, samples: list[tuple[str, bytes | None, str]]) -> None:
    """Write a webdataset shard: (key, image bytes or None, caption) per sample, with a .json beside."""
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            if image is not None:
                add(tar, f"{key}.jpg", image)
            add(tar, f"{key}.txt", caption.encode())
            add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}, ensure_ascii=False).encode())


def _shards(tmp_path: Path, n_shards: int = 4, per_shard: int = 5, broken_key: int | None = None) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            k = s * per_shard + j
            image = BROKEN["corrupt"] if k == broken_key else _jpeg(k)
            samples.append((f"{k:09d}", image, f"样本{k}"))
        _shard(d / f"{s:05d}.tar", samples)
    return d


# ---------------------------------------------------------------------------------------------------------------------
# load_image


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_images_give_none(tmp_path, kind):
    p = tmp_path / f"{kind}.jpg"
    p.write_bytes(BROKEN[kind])
    assert load_image(p) is None
    assert load_image(BROKEN[kind]) is None


def test_missing_file_and_directory_give_none(tmp_path):
    assert load_image(tmp_path / "nope.jpg") is None
    assert load_image(tmp_path) is None


def test_decompression_bomb_gives_none(monkeypatch):
    data = _jpeg(1, (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2*100: DecompressionBombError
    assert load_image(data) is None


def test_truncated_images_stay_strict():
    from PIL import ImageFile

    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert load_image(_noise_jpeg()) is not None


@pytest.mark.parametrize("kind", sorted(_convertible()))
def test_convertible_modes_become_rgb(kind):
    img = load_image(_convertible()[kind])
    assert img is not None and img.mode == "RGB"
    x = default_transform(SIZE)(img)
    assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_conversion_values():
    conv = _convertible()
    # 16-bit gradient 0..65535 -> 8-bit 0..255, not saturated
    g = np.asarray(load_image(conv["i16"]))
    assert g[..., 0].min() == 0 and g[..., 0].max() == 255
    assert np.all(np.diff(g[0, :, 0].astype(int)) >= 0) and 100 < g.mean() < 155
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert np.asarray(load_image(conv["int32"])).mean() == pytest.approx(40000 * 255 / 65535, abs=1)
    assert np.asarray(load_image(conv["float"])).mean() == pytest.approx(128, abs=1)
    assert np.asarray(load_image(conv["gray"]))[0, 0].tolist() == [128, 128, 128]
    # transparency is composited on white
    p = np.asarray(load_image(conv["palette"]))
    assert p[0, 0].tolist() == [255, 0, 0] and p[0, 7].tolist() == [255, 255, 255]
    a = np.asarray(load_image(conv["rgba"]))
    assert a[0, 0].tolist() == [0, 0, 255] and a[0, 7].tolist() == [255, 255, 255]
    assert np.asarray(load_image(conv["la"]))[0, 0].tolist() == [255, 255, 255]
    c = np.asarray(load_image(conv["cmyk"]))[4, 4]
    assert c[0] > 200 and c[1] < 60 and c[2] < 60  # cyan-free, magenta+yellow = red


# ---------------------------------------------------------------------------------------------------------------------
# transforms and collate


def test_default_transform_shapes():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    for t in (default_transform(SIZE), default_transform(SIZE, random_crop=True)):
        x = t(img)
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert torch.allclose(x[0], torch.ones(SIZE, SIZE)) and x[1:].abs().max() < 1e-6
    with pytest.raises(UserError):
        default_transform(0)


@pytest.mark.parametrize("size", [(64, 64, 64), (64, 64, 32), (700, 560, 64), (560, 700, 64), (33, 90, 64),
                                  (100, 99, 224), (123, 77, 31)])
def test_default_transform_is_torchvisions_resize_crop_to_tensor(size):
    """Our torchvision-free transform gives torchvision's pixels exactly (importing torchvision costs seconds)."""
    from torchvision import transforms as T

    w, h, s = size
    img = Image.fromarray(np.random.default_rng(w * h + s).integers(0, 256, (h, w, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(s),
                     T.ToTensor()])(img)
    assert torch.equal(default_transform(s)(img), ref)


def test_image_cache_gives_the_decoded_items_and_falls_through_broken_files(tmp_path, monkeypatch):
    path = _csv(tmp_path, n=9, broken={2: "corrupt", 3: "zero_byte", 8: "text"})
    plain = CsvImageText(path, image_size=SIZE, cache=False)
    cached = CsvImageText(path, image_size=SIZE)
    assert cached._cache is not None and plain._cache is None
    files = list((path.parent / ".cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("train.csv-16px-")
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        assert torch.equal(a["image"], b["image"]) and (a["index"], a["skipped"], a["caption"]) == (
            b["index"], b["skipped"], b["caption"]), i
    assert cached[2]["index"] == 4 and cached[2]["skipped"] == 2 and cached[8]["index"] == 0  # wraps around
    # A second dataset reads the cache file instead of decoding any image.
    from form_data import datasets

    want = plain[5]["image"]
    with monkeypatch.context() as m:
        m.setattr(datasets, "load_image", lambda *a: pytest.fail("decoded an image despite the cache"))
        reread = CsvImageText(path, image_size=SIZE)
        assert torch.equal(reread[5]["image"], want) and reread[2]["index"] == 4
    # An edited image changes the digest: it is decoded anew.
    (path.parent / _names(9)[5]).write_bytes(_jpeg(7))
    fresh = CsvImageText(path, image_size=SIZE)
    assert torch.equal(fresh[5]["image"], plain[7]["image"])
    assert [p.name for p in (path.parent / ".cache").iterdir()] != [f.name for f in files]  # replaced, not piled up
    assert len(list((path.parent / ".cache").iterdir())) == 1


def test_image_cache_is_skipped_for_random_crops_and_large_listings(tmp_path, monkeypatch):
    path = _csv(tmp_path, n=4)
    assert CsvImageText(path, transform=default_transform(SIZE, random_crop=True))._cache is None
    monkeypatch.setattr(ImageCache, "MAX_BYTES", 4 * 3 * SIZE * SIZE - 1)
    assert CsvImageText(path, image_size=SIZE)._cache is None
    assert not (path.parent / ".cache").exists()


def test_collate():
    batch = [{"image": torch.zeros(3, 4, 4), "caption": f"c{i}", "index": i, "skipped": i % 2} for i in range(3)]
    out = collate(batch)
    assert out["image"].shape == (3, 3, 4, 4)
    assert out["caption"] == ["c0", "c1", "c2"]
    assert out["index"].dtype == torch.long and out["index"].tolist() == [0, 1, 2]
    assert out["skipped"] == 1 and isinstance(out["skipped"], int)


# ---------------------------------------------------------------------------------------------------------------------
# Map-style datasets


def test_csv_captions_and_relative_paths(tmp_path, monkeypatch):
    path = _csv(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # paths resolve against the CSV's directory, not the cwd
    ds = CsvImageText(path, image_size=SIZE)
    assert len(ds) == 6
    for i in range(6):
        s = ds[i]
        assert s["caption"] == _captions(6)[i] and s["index"] == i and s["skipped"] == 0
        assert s["image"].shape == (3, SIZE, SIZE)
        assert torch.allclose(s["image"][:, 0, 0], torch.tensor(_color(i)) / 255, atol=0.03)
    assert ds[-1]["index"] == 5
    with pytest.raises(IndexError):
        ds[6]


def test_csv_custom_columns(tmp_path):
    out = tmp_path / "x"
    _write_images(out, ["a.jpg", "b.jpg"])
    (out / "list.csv").write_text("url,caption,image\nhttp://x,甲,a.jpg\nhttp://y,乙,b.jpg\n", encoding="utf-8")
    ds = CsvImageText(out / "list.csv", img_key="image", caption_key="caption", sep=",", image_size=SIZE)
    assert [ds[i]["caption"] for i in range(2)] == ["甲", "乙"]


def test_csv_missing_columns_names_found_ones(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("caption\turl\n猫\ta.jpg\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"'filepath'.*'title'.*found columns: 'caption', 'url'"):
        CsvImageText(p)
    p.write_text("title,filepath\n猫,a.jpg\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"found columns: 'title,filepath'.*separator"):
        CsvImageText(p)


def test_listing_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        CsvImageText(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="no such file"):
        JsonlImageText(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no such directory"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty.csv").write_text("title\tfilepath\n", encoding="utf-8")
    with pytest.raises(UserError, match="no images listed"):
        CsvImageText(tmp_path / "empty.csv")
    (tmp_path / "blank.csv").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty file"):
        CsvImageText(tmp_path / "blank.csv")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no images listed"):
        JsonlImageText(tmp_path / "empty.jsonl")
    (tmp_path / "other.jsonl").write_text('{"url": "a.jpg", "text": "猫"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="found keys: 'url', 'text'"):
        JsonlImageText(tmp_path / "other.jsonl")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="no image files"):
        ImageFolderDataset(tmp_path / "emptydir")
    # listed paths that resolve nowhere: the usual "wrong directory" mistake
    (tmp_path / "elsewhere.csv").write_text("title\tfilepath\n猫\tnot/here.jpg\n", encoding="utf-8")
    with pytest.raises(UserError, match="relative to"):
        CsvImageText(tmp_path / "elsewhere.csv")


def test_dalle_jsonl(tmp_path):
    out = tmp_path / "dalle"
    names = _names(3)
    _write_images(out, names)
    rows = [{"image_path": n, "sentences": c} for n, c in zip(names, _captions(3), strict=True)]
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    ds = JsonlImageText(out / "train.jsonl", image_size=SIZE)
    assert ds.layout == "dalle"
    assert [ds[i]["caption"] for i in range(3)] == _captions(3)


def test_brivl_jsonl(tmp_path):
    out = tmp_path / "brivl"
    names = _names(3, "val")
    _write_images(out, names)
    rows = [
        {"image_id": names[0], "sentences": [["sur_text", "一个红色的圆形"]], "bbox": []},
        {"image_id": names[1], "sentences": [["other", "不是这个"], ["sur_text", "蓝色的方块"]], "bbox": []},
        {"image_id": names[2], "sentences": [["other", "第一个"]], "bbox": []},
    ]
    (out / "val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    ds = JsonlImageText(out / "val.jsonl", image_size=SIZE)
    assert ds.layout == "brivl"
    assert [ds[i]["caption"] for i in range(3)] == ["一个红色的圆形", "蓝色的方块", "第一个"]


def test_jsonl_row_missing_key(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"image_path": "a.jpg", "sentences": "猫"}\n{"image_path": "b.jpg"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="row 2"):
        JsonlImageText(p)


def test_image_folder(tmp_path):
    root = tmp_path / "folder"
    _write_images(root, ["b/2.png", "a/1.jpg", "a/0.JPEG", "c.webp"])
    (root / "a" / "1.txt").write_text("一只猫\n", encoding="utf-8")
    (root / "c.txt").write_text("狗", encoding="utf-8")
    (root / "notes.md").write_text("not an image", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(_jpeg())
    ds = ImageFolderDataset(root, image_size=SIZE)
    assert len(ds) == 4
    got = {Path(ds.image_path(i)).relative_to(root).as_posix(): ds[i]["caption"] for i in range(4)}
    assert got == {"a/0.JPEG": "", "a/1.jpg": "一只猫", "b/2.png": "", "c.webp": "狗"}


def test_each_broken_kind_is_skipped_and_counted(tmp_path, caplog):
    kinds = sorted(BROKEN)
    broken = {1 + 2 * k: kind for k, kind in enumerate(kinds)}  # odd indices broken, even ones good
    n = 2 * len(kinds) + 1
    ds = CsvImageText(_csv(tmp_path, n=n, broken=broken), image_size=SIZE)
    with caplog.at_level(logging.WARNING, logger="form_data.datasets"):
        for i, kind in broken.items():
            s = ds[i]
            assert (s["index"], s["skipped"]) == (i + 1, 1), kind
            assert s["caption"] == _captions(n)[i + 1]
        ds[1]  # again: no second warning for the same path
    assert ds.broken == {ds.image_path(i) for i in broken}
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warned) == len(broken)


def test_broken_run_and_wraparound(tmp_path):
    ds = CsvImageText(_csv(tmp_path, n=6, broken={2: "corrupt", 3: "text", 5: "zero_byte"}), image_size=SIZE)
    assert (ds[2]["index"], ds[2]["skipped"]) == (4, 2)
    assert (ds[5]["index"], ds[5]["skipped"]) == (0, 1)  # wraps to the start


@pytest.mark.parametrize("cache", [True, False])
def test_nothing_readable_is_refused_when_opened(tmp_path, cache):
    path = _csv(tmp_path, n=4, broken={0: "corrupt", 1: "text", 2: "truncated", 3: "zero_byte"})
    with pytest.raises(NoReadableImage, match="no readable image among its 4 listed files") as e:
        CsvImageText(path, image_size=SIZE, cache=cache)
    assert isinstance(e.value, UserError)  # one line, exit 2 in every CLI
    assert CsvImageText(_csv(tmp_path / "ok", n=3, broken={0: "corrupt", 1: "text"}), image_size=SIZE,
                        cache=cache)[0]["index"] == 2


@pytest.mark.parametrize("cache", [True, False])
def test_rows_are_read_without_fall_through(tmp_path, cache):
    broken = {1: "corrupt", 2: "zero_byte", 5: "text"}
    ds = CsvImageText(_csv(tmp_path, n=6, broken=broken), image_size=SIZE, cache=cache)
    assert [ds.row(i) is None for i in range(6)] == [i in broken for i in range(6)]
    s = ds.row(3)
    assert (s["index"], s["skipped"], s["caption"]) == (3, 0, _captions(6)[3])
    assert torch.equal(s["image"], ds[3]["image"]) and torch.equal(ds.row(-6)["image"], ds[0]["image"])
    loader = DataLoader(StrictRows(ds), batch_size=4, num_workers=0, collate_fn=collate_rows)
    batches = list(loader)
    assert [b["index"].tolist() for b, _ in batches] == [[0, 3], [4]]
    assert [left for _, left in batches] == [[1, 2], [5]]
    assert collate_rows([(0, None)]) == (None, [0])


@pytest.mark.parametrize("cache", [True, False])
def test_any_run_of_broken_images_falls_through(tmp_path, cache):
    """100 broken files in a row before the one readable image: every index still yields an image (no give-up)."""
    n = 101
    ds = CsvImageText(_csv(tmp_path, n=n, broken={i: "text" for i in range(n - 1)}), image_size=SIZE, cache=cache)
    s = ds[0]
    assert (s["index"], s["skipped"]) == (n - 1, n - 1)
    assert ds[n - 1]["skipped"] == 0 and ds[50]["skipped"] == 50


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored landscape with Orientation=6 ("rotate 90 CW to view") comes out portrait."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 20))  # blue stripe on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(img, "JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "a.jpg").write_bytes(data)
    for src in (tmp_path / "a.jpg", data):
        out = load_image(src)
        assert out.size == (20, 40)  # turned upright
        top, bottom = out.getpixel((10, 2)), out.getpixel((10, 37))
        assert top[2] > 200 and top[0] < 60 and bottom[0] > 200  # the stored left edge is now on top
    plain = load_image(_encode(img, "JPEG", quality=95))
    assert plain.size == (40, 20)
    # a listing reads it upright too (the image cache holds upright pixels)
    (tmp_path / "l.csv").write_text("title\tfilepath\n竖图\ta.jpg\n", encoding="utf-8")
    item = CsvImageText(tmp_path / "l.csv", transform=default_transform(SIZE))[0]["image"]
    assert item[2, 1, SIZE // 2] > 0.8 and item[0, -2, SIZE // 2] > 0.8


def test_dataloader_workers_sum_skipped(tmp_path):
    n, broken = 12, {1: "corrupt", 4: "truncated", 8: "zero_byte", 11: "text"}
    ds = CsvImageText(_csv(tmp_path, n=n, broken=broken), image_size=SIZE)
    pickle.loads(pickle.dumps(ds))  # spawn-started workers get a pickled copy
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 3, SIZE, SIZE)] * 3  # constant batch size
    seen = [i for b in batches for i in b["index"].tolist()]
    assert set(seen) == set(range(n)) - set(broken)
    assert sum(b["skipped"] for b in batches) == len(broken)
    captions = dict(zip(seen, (c for b in batches for c in b["caption"]), strict=True))
    assert all(captions[i] == _captions(n)[i] for i in seen)


def test_distributed_sampler_splits_disjointly(tmp_path):
    ds = CsvImageText(_csv(tmp_path, n=10), image_size=SIZE)
    parts = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=5, sampler=sampler, collate_fn=collate)
        parts.append({i for b in loader for i in b["index"].tolist()})
        assert len(parts[-1]) == 5
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(10))


# ---------------------------------------------------------------------------------------------------------------------
# webdataset shards


def test_shards_captions_and_broken(tmp_path):
    d = _shards(tmp_path, n_shards=2, per_shard=4, broken_key=2)
    samples = list(WebDatasetShards(d, image_size=SIZE))
    assert [s["index"] for s in samples] == [0, 1, 3, 4, 5, 6, 7]
    assert [s["caption"] for s in samples] == [f"样本{k}" for k in (0, 1, 3, 4, 5, 6, 7)]
    assert [s["skipped"] for s in samples] == [0, 0, 1, 0, 0, 0, 0]  # counted in the next sample
    assert samples[0]["image"].shape == (3, SIZE, SIZE)


def test_shards_with_two_workers_read_each_sample_once(tmp_path):
    ds = WebDatasetShards(_shards(tmp_path, n_shards=4, per_shard=5, broken_key=7), image_size=SIZE)
    batches = list(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate))
    counts = Counter(i for b in batches for i in b["index"].tolist())
    assert counts == Counter({k: 1 for k in range(20) if k != 7})
    assert sum(b["skipped"] for b in batches) == 1


def test_shards_split_across_ranks(tmp_path):
    d = _shards(tmp_path, n_shards=4, per_shard=2)
    per_rank = [{s["index"] for s in WebDatasetShards(d, image_size=SIZE, rank=r, world_size=2,
                                                      shuffle_shards=True, seed=5)} for r in range(2)]
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(range(8))
    assert len(per_rank[0]) == len(per_rank[1]) == 4


def test_shard_without_image_and_damaged_shard(tmp_path, caplog):
    d = tmp_path / "odd"
    d.mkdir()
    _shard(d / "a.tar", [("000000000", None, "无图"), ("000000001", _jpeg(1), "有图")])
    good = (d / "a.tar").read_bytes()
    (d / "b.tar").write_bytes(good[: len(good) // 2 + 100])  # cut mid-member
    with caplog.at_level(logging.WARNING, logger="form_data.datasets"):
        samples = list(WebDatasetShards([d / "a.tar", d / "b.tar"], image_size=SIZE))
    assert [(s["caption"], s["skipped"]) for s in samples] == [("有图", 1)]
    assert any("b.tar" in r.getMessage() for r in caplog.records)


def test_expand_shards(tmp_path):
    d = _shards(tmp_path, n_shards=3, per_shard=1)
    names = [str(d / f"{s:05d}.tar") for s in range(3)]
    assert expand_shards(d) == names
    assert expand_shards(str(d / "*.tar")) == names
    assert expand_shards(str(d / "{00000..00002}.tar")) == names
    with pytest.raises(UserError):
        expand_shards(str(d / "{00000..00004}.tar"))
    with pytest.raises(UserError):
        expand_shards(str(tmp_path / "none-*.tar"))


# ---------------------------------------------------------------------------------------------------------------------
# open_dataset


def test_open_dataset_dispatch(tmp_path):
    csv_path = _csv(tmp_path)
    assert isinstance(open_dataset(csv_path, image_size=SIZE), CsvImageText)
    tsv = csv_path.with_suffix(".tsv")
    tsv.write_bytes(csv_path.read_bytes())
    assert isinstance(open_dataset(tsv, image_size=SIZE), CsvImageText)
    jl = csv_path.with_suffix(".jsonl")
    jl.write_text(json.dumps({"image_path": _names(1)[0], "sentences": "猫"}) + "\n", encoding="utf-8")
    assert isinstance(open_dataset(jl, image_size=SIZE), JsonlImageText)
    d = _shards(tmp_path, n_shards=2, per_shard=1)
    assert isinstance(open_dataset(d, image_size=SIZE), WebDatasetShards)
    assert isinstance(open_dataset(d / "00000.tar", image_size=SIZE), WebDatasetShards)
    assert isinstance(open_dataset(str(d / "*.tar"), image_size=SIZE), WebDatasetShards)
    assert isinstance(open_dataset(tmp_path / "export" / "train", image_size=SIZE), ImageFolderDataset)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="unknown dataset format"):
        open_dataset(tmp_path / "x.parquet")
    with pytest.raises(UserError, match="no such"):
        open_dataset(tmp_path / "missing")
