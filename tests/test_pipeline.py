"""synth --raw -> clean -> download (img2dataset, loopback) -> export, and the synthetic set itself."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error
from form_data import synth
from form_data.clean import clean, read_split
from form_data.download import categorize, download
from form_data.export import export
from form_data.serve import LoopbackServer


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    raw = root / "raw"
    (raw / "www").mkdir(parents=True)
    with LoopbackServer(raw / "www") as srv:
        expected = synth.write_raw(raw, srv.url, n=120, progress=False)
        report = clean([raw / "wukong_raw.csv"], root / "clean", keywords=raw / "keywords.txt", seed=0,
                       val_fraction=0.1, progress=False)
        dl = download(root / "clean", root / "dl", encode_format="png", threads=8, progress=False)
    return root, expected, report, dl


@pytest.mark.slow
def test_raw_csv_rows_break_each_cleaning_rule(pipeline):
    _, expected, report, _ = pipeline
    for rule in ("too_long", "bad_char", "long_piece", "no_keyword"):
        assert report.dropped[rule] == expected[rule], rule
    assert report.dup_url_caption == expected["dup_url_caption"]
    assert report.dup_url == expected["dup_url"]
    image_kinds = ("http_404", "corrupt", "too_small", "too_elongated", "large")
    assert report.kept == expected["good_rows"] + sum(expected[k] for k in image_kinds)


@pytest.mark.slow
def test_download_counts_each_failure(pipeline):
    root, expected, _report, dl = pipeline
    failures: dict[str, int] = {}
    ok = 0
    for split in ("train", "val"):
        s = dl["splits"][split]
        ok += s["ok"]
        for k, v in s["failures"].items():
            failures[k] = failures.get(k, 0) + v
    assert failures == {"http_404": expected["http_404"], "decode_error": expected["corrupt"],
                        "too_small": expected["too_small"], "too_elongated": expected["too_elongated"]}
    assert ok == expected["good_rows"] + expected["large"]
    report = json.loads((root / "dl/download_report.json").read_text())
    assert report["splits"]["train"]["ok"] == dl["splits"]["train"]["ok"]


@pytest.mark.slow
def test_download_shrinks_large_images_to_fit_512(pipeline):
    root, *_ = pipeline
    sizes = []
    for meta in (root / "dl").glob("*/*/*.json"):
        m = json.loads(meta.read_text())
        if m["status"] == "success" and "large_" in m["url"]:
            with Image.open(meta.with_suffix(".png")) as im:
                sizes.append(im.size)
    assert sizes and all(s == (512, 410) for s in sizes), sizes  # 700x560 -> fit in 512, aspect kept


@pytest.mark.slow
def test_download_is_resumable(pipeline, tmp_path):
    root, *_ = pipeline
    before = sorted(p.name for p in (root / "dl/train").rglob("*.png"))
    # a second run over the same output (incremental mode) keeps finished shards and rewrites nothing
    with LoopbackServer(root / "raw/www"):  # server up again, though nothing should be fetched
        download(root / "clean", root / "dl", encode_format="png", threads=8, progress=False)
    assert sorted(p.name for p in (root / "dl/train").rglob("*.png")) == before


@pytest.mark.slow
def test_export_formats_relative_paths_and_idempotency(pipeline):
    root, _, _report, dl = pipeline
    out = root / "dl"
    counts = export(out, webdataset=True, shard_size=50, progress=False)
    assert counts == {"train": dl["splits"]["train"]["ok"], "val": dl["splits"]["val"]["ok"]}
    clip_lines = (out / "train_clip.csv").read_text(encoding="utf-8").splitlines()
    assert clip_lines[0] == "title\tfilepath"
    assert len(clip_lines) == counts["train"] + 1
    train_pairs = {u: c for u, c in read_split(root / "clean/train.csv")}
    for line in clip_lines[1:]:
        caption, path = line.split("\t")
        assert not Path(path).is_absolute() and (out / path).is_file()
        assert caption in train_pairs.values()
    dalle = [json.loads(x) for x in (out / "train_dalle.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(dalle[0]) == {"image_path", "sentences"} and isinstance(dalle[0]["sentences"], str)
    brivl = [json.loads(x) for x in (out / "val_brivl.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(brivl[0]) == {"image_id", "sentences", "bbox"}
    assert brivl[0]["sentences"][0][0] == "sur_text" and brivl[0]["bbox"] == []
    assert all((out / r["image_id"]).is_file() for r in brivl)
    shards = sorted((out / "wds").glob("train-*.tar"))
    assert len(shards) == -(-counts["train"] // 50)
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert len(names) == 3 * 50 and any(n.endswith(".txt") for n in names)
    # re-running writes the same bytes: no duplicated lines
    snapshot = {p.name: p.read_bytes() for p in out.glob("*_*.*")}
    export(out, webdataset=True, shard_size=50, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*_*.*")} == snapshot
    assert sorted((out / "wds").glob("train-*.tar")) == shards


@pytest.mark.slow
def test_export_to_another_dir_keeps_paths_relative(pipeline, tmp_path):
    root, *_ = pipeline
    export(root / "dl", tmp_path / "exports", splits=("val",), progress=False)
    line = (tmp_path / "exports/val_clip.csv").read_text(encoding="utf-8").splitlines()[1]
    path = line.split("\t")[1]
    assert path.startswith("../") and (tmp_path / "exports" / path).resolve().is_file()


def test_export_counts_what_it_leaves_out(tmp_path, cli_fast):
    """A .gif (no trainer format), a failed download, unreadable metadata and a sample without its image are left
    out, counted per reason in the printed summary and export_report.json; never silently dropped."""
    shard = tmp_path / "dl" / "train" / "00000"
    shard.mkdir(parents=True)

    def sample(key: str, meta: dict | str, image: str | None = None) -> None:
        (shard / f"{key}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta), encoding="utf-8")
        if image:
            Image.new("RGB", (8, 8), (200, 30, 30)).save(shard / f"{key}.{image}")

    ok = {"status": "success", "caption": "红色圆形"}
    sample("000000000", {**ok, "key": "000000000"}, "png")
    sample("000000001", {**ok, "key": "000000001"}, "gif")
    sample("000000002", {**ok, "key": "000000002"}, "gif")
    sample("000000003", {"status": "failed_to_download", "key": "000000003"})
    sample("000000004", "{not json")
    sample("000000005", {**ok, "key": "000000005"})
    sample("000000006", {**ok, "key": "000000006"}, "jpg")
    r = cli_fast("-m", "form_data", "export", str(tmp_path / "dl"), "--splits", "train", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "train: 2 samples" in r.stdout
    assert ("skipped 5 (failed_download 1, no_image 1, unreadable_json 1, unsupported_gif 2)" in r.stdout), r.stdout
    report = json.loads((tmp_path / "dl" / "export_report.json").read_text(encoding="utf-8"))
    assert report["samples"] == {"train": 2}
    assert report["skipped"] == {"train": {"failed_download": 1, "no_image": 1, "unreadable_json": 1,
                                           "unsupported_gif": 2}}
    assert len((tmp_path / "dl" / "train_clip.csv").read_text(encoding="utf-8").splitlines()) == 3


@pytest.mark.parametrize("message, kind", [("HTTP Error 404: File not found", "http_404"),
                                           ("image too small", "too_small"),
                                           ("aspect ratio too large", "too_elongated"),
                                           ("Image decoding error", "decode_error"),
                                           ("The read operation timed out", "timeout"),
                                           ("<urlopen error [Errno 111] Connection refused>", "connection_error")])
def test_failure_categories(message, kind):
    assert categorize(message) == kind


# ---- the synthetic set -----------------------------------------------------------------------------------------------

def test_synth_dataset_layout_holdout_and_determinism(tmp_path):
    info = synth.write_dataset(tmp_path / "a", n_train=60, n_val=40, image_size=32, seed=3, progress=False)
    synth.write_dataset(tmp_path / "b", n_train=60, n_val=40, image_size=32, seed=3, progress=False)
    rows = list(synth.iter_attributes(tmp_path / "a/attributes.jsonl"))
    assert len(rows) == 100 and info["holdout"]
    held = {tuple(h) for h in info["holdout"]}
    assert len(held) == len(synth.all_combos()) // 6
    assert all((r["colour"], r["shape"]) not in held for r in rows if r["split"] == "train")
    assert all(r["seen"] == ((r["colour"], r["shape"]) not in held) for r in rows)
    for r in rows[:10]:
        assert (tmp_path / "a" / r["filepath"]).read_bytes() == (tmp_path / "b" / r["filepath"]).read_bytes()
        assert synth.parse_caption(r["caption"])["colour"] == r["colour"]
        assert synth.parse_caption(r["caption"])["shape"] == r["shape"]
        assert len(r["caption"]) <= 32
    assert len((tmp_path / "a/train_clip.csv").read_text(encoding="utf-8").splitlines()) == 61
    with Image.open(tmp_path / "a" / rows[0]["filepath"]) as im:
        assert im.size == (32, 32)


def test_synth_object_has_its_colour():
    a = synth.Attributes("蓝", "正方形", "大", "白", 0.5, 0.5, 0.34)
    px = np.asarray(synth.render(a, 64)).astype(int)
    centre, corner = px[32, 32], px[2, 2]
    assert abs(centre - np.array(synth.COLOURS["蓝"])).max() < 40
    assert abs(corner - np.array(synth.BACKGROUNDS["白"])).max() < 30


def test_synth_captions_pass_the_cleaner():
    from form_data.clean import row_verdict

    for _, _attrs, cap in synth.generate_split(300, "train", synth.all_combos(), seed=0):
        assert row_verdict("u", cap, set(synth.SHAPES)) == "kept", cap


def test_holdout_spec():
    assert synth.parse_holdout("none") == ()
    assert synth.parse_holdout("红:圆形,蓝:星形") == (("红", "圆形"), ("蓝", "星形"))
    with pytest.raises(Exception, match="bad --holdout"):
        synth.parse_holdout("红:方块")


def test_cli_errors_download_export_synth(tmp_path, cli, cli_fast):
    assert "argument splits_dir: not found" in one_line_error(
        cli("-m", "form_data", "download", str(tmp_path / "nope"), "--out", str(tmp_path / "o")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/train.csv").write_text("link,text\nhttp://x,米饭\n", encoding="utf-8")
    (tmp_path / "bad/val.csv").write_text("url,caption\n", encoding="utf-8")
    assert "expected header url,caption" in one_line_error(
        cli_fast("-m", "form_data", "download", str(tmp_path / "bad"), "--out", str(tmp_path / "o")))
    assert "argument root: not found" in one_line_error(cli_fast("-m", "form_data", "export", str(tmp_path / "x")))
    assert "none of the split folders" in one_line_error(cli_fast("-m", "form_data", "export", str(tmp_path / "bad")))
    assert "--image-size" in one_line_error(
        cli_fast("-m", "form_data", "synth", "--out", str(tmp_path / "s"), "--image-size", "1000"))
    assert "--base-url" in one_line_error(cli_fast("-m", "form_data", "synth", "--out", str(tmp_path / "s"), "--raw"))
    assert "invalid choice" in one_line_error(cli_fast("-m", "form_data", "frobnicate"))
    assert "must be an integer >= 1" in one_line_error(
        cli_fast("-m", "form_data", "export", str(tmp_path), "--shard-size", "0"))
    assert "must be an integer >= 1" in one_line_error(
        cli_fast("-m", "form_data", "download", str(tmp_path), "--out", str(tmp_path / "o"), "--threads", "0"))
    r = cli_fast("-m", "form_data", "clean", "--help")
    assert r.returncode == 0 and "--keywords" in r.stdout and "default" in r.stdout


@pytest.mark.slow
def test_export_attributes_cover_every_downloaded_sample(pipeline, tmp_path):
    """Every image the download kept (the large ones too) has its ground truth, and its caption states it."""
    root, expected, *_ = pipeline
    counts = export(root / "dl", tmp_path / "ex", attributes=root / "raw" / "attributes.jsonl", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "ex" / "attributes.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == sum(counts.values()) == expected["good_rows"] + expected["large"]
    assert {r["filepath"] for r in rows} == {
        line.split("\t")[1] for split in counts
        for line in (tmp_path / "ex" / f"{split}_clip.csv").read_text(encoding="utf-8").splitlines()[1:]}
    for r in rows:
        stated = synth.parse_caption(r["caption"])
        assert (stated["colour"], stated["shape"]) == (r["colour"], r["shape"]), r
