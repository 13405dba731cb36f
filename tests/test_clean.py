"""The caption rules, dedup, the seeded split, streaming inputs and the cleaner's CLI errors."""

from __future__ import annotations

import csv
import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import one_line_error
from form_data.clean import CaptionRules, _hyperscan, clean, load_keywords, read_split, row_verdict
from zh_t2i_base.cli import UserError

KW = ["牛肉面", "米饭", "饺子"]
ENGINES = ["ahocorasick"] + (["hyperscan"] if _hyperscan() is not None else [])


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def verdict(caption: str, keywords=KW) -> str:
    """The vectorised path for one caption, with every engine (must agree with the per-row reference)."""
    ref = row_verdict("http://x/1.jpg", caption, set(keywords) if keywords else None)
    for engine in ENGINES:
        mask, counts = CaptionRules(keywords, engine).apply(pa.array(["http://x/1.jpg"]), pa.array([caption]))
        fast = "kept" if mask[0] else next(rule for rule, n in counts.items() if n)
        assert fast == ref, engine
    return ref


def write_csv(path, rows, header=("url", "caption")):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("n, expected", [(32, "kept"), (33, "too_long")])
def test_length_limit_counts_code_points(n, expected):
    # 8 chars + separators keep every piece short; pad with a CJK char (3 UTF-8 bytes: counts as 1).
    caption = ("米饭" + "好" * 7 + " ") * 3
    caption = (caption + "好" * 40)[:n]
    caption = caption[:n - 1] + "好"
    assert len(caption) == n
    assert verdict(caption) == expected


@pytest.mark.parametrize("ch", list("？【】《》") + list(':?<>"') + ["3", "３", "٣", "߃"])
def test_bad_characters(ch):
    assert verdict(f"好吃的{ch}米饭") == "bad_char"


@pytest.mark.parametrize("ch", ["：", "“", "”", "（", "）", "，", "；", "！", "!", "'", "、", "二"])
def test_lookalikes_that_are_allowed(ch):
    # full-width colon, curly quotes, brackets, full-width comma/semicolon and Chinese numerals are not in the set
    assert verdict(f"好吃的{ch}米饭") == "kept"


@pytest.mark.parametrize("piece_len, expected", [(18, "kept"), (19, "long_piece")])
def test_piece_length(piece_len, expected):
    piece = ("米饭" + "很" * 30)[:piece_len]
    assert verdict(piece + ",好吃") == expected
    assert verdict("好吃;" + piece) == expected
    assert verdict("好吃 " + piece) == expected


def test_full_width_separators_do_not_split():
    piece = "米饭" + "很" * 8  # 10 chars
    assert verdict(piece + "，" + piece) == "long_piece"  # 21 chars in one piece: ， is not a separator
    assert verdict(piece + "," + piece) == "kept"
    assert verdict(piece + "\u3000" + piece) == "kept"  # ideographic space is whitespace


@pytest.mark.parametrize("caption, expected", [("牛肉面真好吃", "kept"), ("真好吃的牛肉面", "kept"), ("饺子", "kept"),
                                               ("牛肉真好吃", "no_keyword"), ("米 饭", "no_keyword")])
def test_keyword_substring_anywhere(caption, expected):
    assert verdict(caption) == expected


def test_rule_order_first_hit_counts():
    # too long AND a digit AND no keyword: counted once, under the first rule
    assert verdict("1" * 40) == "too_long"
    assert verdict("3号" + "很" * 20) == "bad_char"
    assert verdict("很" * 20 + "123") == "bad_char"


def test_no_keyword_file_means_rule_off():
    assert verdict("什么都有", keywords=None) == "kept"


def test_vectorised_equals_row_reference_on_random_text(engine):
    rnd = random.Random(1)
    alphabet = list("牛肉面米饭饺子好吃的很一个") + list(' ;,:?<>"？【】《》12３\t　，；abc')
    caps = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40))) for _ in range(3000)]
    urls = [f"u{i}" if i % 97 else "" for i in range(len(caps))]
    rules = CaptionRules(KW, engine)
    mask, counts = rules.apply(pa.array(urls), pa.array(caps))
    ref = [row_verdict(u, c, set(KW)) for u, c in zip(urls, caps, strict=True)]
    assert mask.tolist() == [r == "kept" for r in ref]
    for rule, n in counts.items():
        assert n == ref.count(rule), rule
    # a sliced array (non-zero offset) gives the same verdicts
    sub_mask, _ = rules.apply(pa.array(urls).slice(500, 700), pa.array(caps).slice(500, 700))
    assert sub_mask.tolist() == mask[500:1200].tolist()
    par_mask, par_counts = rules.apply_parallel(pa.array(urls * 3), pa.array(caps * 3), workers=3)
    assert par_mask.tolist() == mask.tolist() * 3 and par_counts == {r: 3 * k for r, k in counts.items()}


def test_keyword_straddling_two_rows_is_not_a_match(engine):
    rules = CaptionRules(["牛肉"], engine)
    found = rules.contains_keyword(["好吃的牛", "肉很香", "牛肉", "", "牛\x00肉"]).tolist()
    assert found == [False, False, True, False, False]


def test_keyword_file_crlf_bom_blank_lines(tmp_path):
    p = tmp_path / "kw.txt"
    p.write_bytes("\ufeff牛肉面\r\n\r\n米饭\r\n  \r\n饺子\r\n米饭\r\n".encode())
    assert load_keywords(p) == ["牛肉面", "米饭", "饺子"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xe7\x89\x9b\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"bad.txt:2"):
        load_keywords(bad)


def test_clean_dedup_split_report(tmp_path):
    rows = [(f"http://h/{i}.jpg", f"好吃的米饭{'很' * (i % 5)}") for i in range(100)]
    rows += [rows[3], rows[4]]  # exact duplicates
    rows += [(rows[5][0], "另外的饺子")]  # same url, other caption
    rows += [("http://h/x.jpg", "没有关键词")]
    src = write_csv(tmp_path / "in.csv", rows)
    kw = tmp_path / "kw.txt"
    kw.write_text("米饭\n饺子\n", encoding="utf-8")
    rep = clean([src], tmp_path / "out", keywords=kw, seed=7, val_fraction=0.2, progress=False)
    assert (rep.rows_in, rep.dup_url_caption, rep.dup_url, rep.kept) == (104, 2, 1, 100)
    assert rep.dropped["no_keyword"] == 1
    assert (rep.train, rep.val) == (80, 20)
    train, val = read_split(tmp_path / "out/train.csv"), read_split(tmp_path / "out/val.csv")
    assert len(train) == 80 and len(val) == 20
    assert set(train) | set(val) == set(rows[:100])
    assert not {u for u, _ in train} & {u for u, _ in val}
    saved = json.loads((tmp_path / "out/clean_report.json").read_text(encoding="utf-8"))
    assert saved["kept"] == 100 and saved["dropped"]["no_keyword"] == 1
    # same seed -> same split and order; other seed -> another order
    clean([src], tmp_path / "again", keywords=kw, seed=7, val_fraction=0.2, progress=False)
    assert read_split(tmp_path / "again/train.csv") == train
    clean([src], tmp_path / "other", keywords=kw, seed=8, val_fraction=0.2, progress=False)
    assert read_split(tmp_path / "other/train.csv") != train


def test_streaming_many_files_formats_and_positional_columns(tmp_path):
    rows = [(f"http://h/{i}.jpg", f"米饭{i % 7 * '好'}") for i in range(60)]
    a = write_csv(tmp_path / "a.csv", rows[:20], header=("0", "1"))
    with gzip.open(tmp_path / "b.csv.gz", "wt", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("url", "caption"), *rows[20:40]])
    pq.write_table(pa.table({"caption": [r[1] for r in rows[40:]], "url": [r[0] for r in rows[40:]]}),
                   tmp_path / "c.parquet")
    rep = clean([a], tmp_path / "o1", url_col=0, caption_col="1", val_fraction=0.0, progress=False)
    assert rep.kept == 20
    d = tmp_path / "dir"
    d.mkdir()
    (tmp_path / "b.csv.gz").rename(d / "b.csv.gz")
    (tmp_path / "c.parquet").rename(d / "c.parquet")
    rep = clean([d], tmp_path / "o2", val_fraction=0.0, batch_rows=7, progress=False)
    assert rep.rows_in == 40 and rep.kept == 40
    assert set(read_split(tmp_path / "o2/train.csv")) == set(rows[20:])


def test_caption_with_newline_and_quotes_in_csv(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text('url,caption\nhttp://h/1.jpg,"米饭\n好吃"\nhttp://h/2.jpg,"米饭,很香"\n', encoding="utf-8")
    rep = clean([src], tmp_path / "o", val_fraction=0.0, progress=False)
    assert rep.rows_in == 2 and rep.kept == 2
    assert ("http://h/2.jpg", "米饭,很香") in read_split(tmp_path / "o/train.csv")


# ---- CLI errors: one line, exit 2, nothing half-written ------------------------------------------------------------

def test_cli_errors(tmp_path, cli, cli_fast):
    out = tmp_path / "out"
    msg = one_line_error(cli("-m", "form_data", "clean", str(tmp_path / "nope.csv"), "--out", str(out)))
    assert "not found" in msg and "nope.csv" in msg

    wrong = write_csv(tmp_path / "wrong.csv", [("http://h/1", "米饭")], header=("link", "text"))
    msg = one_line_error(cli_fast("-m", "form_data", "clean", str(wrong), "--out", str(out)))
    assert "'url'" in msg and "link" in msg and "text" in msg

    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    assert "empty" in one_line_error(cli_fast("-m", "form_data", "clean", str(empty), "--out", str(out)))
    header_only = write_csv(tmp_path / "header.csv", [])
    assert "no rows" in one_line_error(cli_fast("-m", "form_data", "clean", str(header_only), "--out", str(out)))

    bad = tmp_path / "bad.csv"
    bad.write_bytes("url,caption\nhttp://h/1,米饭\nhttp://h/2,".encode() + b"\xff\xfe\xfa" + b"\n")
    msg = one_line_error(cli_fast("-m", "form_data", "clean", str(bad), "--out", str(out)))
    assert "bad.csv:3" in msg and "UTF-8" in msg

    good = write_csv(tmp_path / "good.csv", [("http://h/1", "米饭")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = one_line_error(cli_fast("-m", "form_data", "clean", str(good), "--out", str(blocker / "sub")))
    assert "cannot write" in msg

    assert "--val-fraction" in one_line_error(
        cli_fast("-m", "form_data", "clean", str(good), "--out", str(out), "--val-fraction", "1.5"))
    assert "invalid" in one_line_error(cli_fast("-m", "form_data", "clean", str(good), "--out", str(out),
                                            "--seed", "abc"))
    assert not out.exists() or not any(out.iterdir()), "a failed run left files behind"


def test_cli_success_prints_table(tmp_path, cli):
    good = write_csv(tmp_path / "good.csv", [(f"http://h/{i}", "米饭") for i in range(10)])
    kw = tmp_path / "kw.txt"
    kw.write_text("米饭\r\n", encoding="utf-8")
    r = cli("-m", "form_data", "clean", str(good), "--out", str(tmp_path / "o"), "--keywords", str(kw), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "kept" in r.stdout and "too_long" in r.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["clean_report.json", "train.csv", "val.csv"]


def test_failed_run_keeps_previous_outputs(tmp_path, monkeypatch):
    good = write_csv(tmp_path / "good.csv", [(f"http://h/{i}", "米饭") for i in range(10)])
    clean([good], tmp_path / "o", val_fraction=0.0, progress=False)
    before = (tmp_path / "o/train.csv").read_bytes()
    import form_data.clean as mod

    def boom(*a, **k):
        raise RuntimeError("disk died")

    monkeypatch.setattr(mod, "write_json", boom)
    with pytest.raises(RuntimeError):
        clean([good], tmp_path / "o", val_fraction=0.5, progress=False)
    assert (tmp_path / "o/train.csv").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["clean_report.json", "train.csv", "val.csv"]
