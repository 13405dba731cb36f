"""The embedded synthetic data set: simple coloured shapes with Chinese captions built from their attributes.

Deterministic (every image is a function of ``(seed, index)``), small (64 px by default, up to 256) and labelled: a
ground-truth attributes file lets later stages measure whether generated images have the right colour and shape.
A fixed set of colour x shape combinations is held out of the training split entirely, so models can be tested on
combinations they never saw together.

Two outputs:

* default: the layout the real pipeline ends with (``form_data download`` + ``form_data export``):
  ``OUT/{train,val}/00000/{key}.{png,json,txt}`` plus the exports and ``OUT/attributes.jsonl``;
* ``--raw``: a Wukong-style raw CSV (``url,caption``) whose rows break each cleaning rule now and then and whose image
  URLs are sometimes missing (404), corrupt, too small or too elongated, plus the image files to serve over loopback.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import ensure_writable_dir, write_json, write_jsonl

COLOURS: dict[str, tuple[int, int, int]] = {
    "红": (220, 35, 35),
    "橙": (245, 140, 25),
    "黄": (240, 215, 30),
    "绿": (40, 165, 55),
    "青": (25, 190, 195),
    "蓝": (35, 75, 225),
    "紫": (140, 55, 200),
    "粉": (250, 145, 195),
}
SHAPES = ("圆形", "正方形", "三角形", "星形", "十字形", "菱形")
SIZES = {"大": 0.34, "小": 0.2}  # radius as a fraction of the image side
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"白": (238, 238, 238), "灰": (128, 128, 128), "黑": (22, 22, 22)}
TEMPLATES = (
    "{size}{colour}色{shape}",
    "一个{size}的{colour}色{shape}",
    "{bg}色背景上的{size}{colour}色{shape}",
    "{bg}底{size}{colour}色{shape}",
    "画面中有一个{size}{colour}色的{shape}",
)
# One combination in six never appears in training: colour i loses shape i mod 6.
DEFAULT_HOLDOUT = tuple((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS))


@dataclass
class Attributes:
    colour: str
    shape: str
    size: str
    background: str
    cx: float  # centre, as a fraction of the image side
    cy: float
    radius: float  # fraction of the image side

    @property
    def combo(self) -> tuple[str, str]:
        return self.colour, self.shape


def parse_holdout(spec: str | None) -> tuple[tuple[str, str], ...]:
    """``"default"`` | ``"none"`` | ``"红:圆形,蓝:正方形"``."""
    if spec is None or spec == "default":
        return DEFAULT_HOLDOUT
    if spec in ("", "none"):
        return ()
    out = []
    for item in spec.split(","):
        colour, _, shape = item.strip().partition(":")
        if colour not in COLOURS or shape not in SHAPES:
            raise UserError(f"bad --holdout item {item!r}: use colour:shape with colours {''.join(COLOURS)} "
                            f"and shapes {'/'.join(SHAPES)}")
        out.append((colour, shape))
    return tuple(out)


def parse_caption(caption: str) -> dict[str, str | None]:
    """Attributes named in a synthetic caption (None where absent): used to score prompts and generations."""
    colour = next((c for c in COLOURS if f"{c}色" in caption), None)
    shape = next((s for s in sorted(SHAPES, key=len, reverse=True) if s in caption), None)
    m = re.search(r"(大|小)(?:的)?(?:" + "|".join(COLOURS) + ")色", caption)
    bg = next((b for b in BACKGROUNDS if f"{b}色背景" in caption or f"{b}底" in caption), None)
    return {"colour": colour, "shape": shape, "size": m.group(1) if m else None, "background": bg}


def caption_for(attrs: Attributes, template: int) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(size=attrs.size, colour=attrs.colour, shape=attrs.shape,
                                                       bg=attrs.background)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "正方形":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "三角形":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "星形":
        return [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "十字形":
        a, b = r, r * 0.36
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    if shape == "菱形":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    return None  # circle


def render(attrs: Attributes, size: int = 64, seed: int = 0) -> Image.Image:
    """Draw the object at 4x and downsample (anti-aliased edges), then add mild per-pixel noise (std 0.75)."""
    big = size * 4
    rng = np.random.default_rng([seed, size, int(attrs.cx * 1e6), int(attrs.cy * 1e6)])
    bg = tuple(int(v) for v in np.clip(np.array(BACKGROUNDS[attrs.background]) + rng.normal(0, 6, 3), 0, 255))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(v) for v in np.clip(np.array(COLOURS[attrs.colour]) + rng.normal(0, 8, 3), 0, 255))
    cx, cy, r = attrs.cx * big, attrs.cy * big, attrs.radius * big
    poly = _shape_polygon(attrs.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=colour)
    else:
        draw.polygon(poly, fill=colour)
    small = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * 0.75
    return Image.fromarray(np.clip(small + noise + 0.5, 0, 255).astype(np.uint8))


def sample_attributes(rng: np.random.Generator, combos: Sequence[tuple[str, str]]) -> Attributes:
    colour, shape = combos[int(rng.integers(len(combos)))]
    size = ("大", "小")[int(rng.integers(2))]
    radius = SIZES[size] * float(rng.uniform(0.9, 1.1))
    margin = radius + 0.03
    return Attributes(colour=colour, shape=shape, size=size,
                      background=tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
                      cx=float(rng.uniform(margin, 1 - margin)), cy=float(rng.uniform(margin, 1 - margin)),
                      radius=radius)


def all_combos() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _check_size(image_size: int) -> None:
    if not 16 <= image_size <= 256:
        raise UserError(f"--image-size must be between 16 and 256, got {image_size}")


def generate_split(n: int, split: str, combos: Sequence[tuple[str, str]], seed: int, start: int = 0):
    """Yield (index, Attributes, caption) for ``n`` samples of a split, deterministically."""
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, {"train": 0, "val": 1, "raw": 2}[split], i])
        attrs = sample_attributes(rng, combos)
        yield i, attrs, caption_for(attrs, int(rng.integers(len(TEMPLATES))))


def write_dataset(out: str | os.PathLike, n_train: int = 4000, n_val: int = 400, image_size: int = 64,
                  holdout: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT, seed: int = 0, image_format: str = "png",
                  progress: bool = True) -> dict:
    """Write the synthetic set in the downloaded layout (``OUT/{split}/00000/{key}.*``) and export it.

    Train uses only the seen combinations; val draws from all of them (``"seen": false`` marks held-out ones)."""
    from form_data.export import export  # same package; imported here to keep module import light

    _check_size(image_size)
    root = ensure_writable_dir(out)
    seen = [c for c in all_combos() if c not in set(holdout)]
    if not seen:
        raise UserError("--holdout removes every colour x shape combination")
    attrs_rows = []
    for split, n, combos in (("train", n_train, seen), ("val", n_val, all_combos())):
        folder = root / split / "00000"
        folder.mkdir(parents=True, exist_ok=True)
        for i, attrs, caption in tqdm(generate_split(n, split, combos, seed), total=n, desc=f"synth {split}",
                                      disable=not progress, unit="img"):
            key = f"{i:09d}"
            img = render(attrs, image_size, seed)
            path = folder / f"{key}.{image_format}"
            img.save(path)
            (folder / f"{key}.txt").write_text(caption, encoding="utf-8")
            meta = {"key": key, "caption": caption, "status": "success", "url": None, "width": image_size,
                    "height": image_size, "error_message": None}
            (folder / f"{key}.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            attrs_rows.append({"filepath": f"{split}/00000/{key}.{image_format}", "split": split, "caption": caption,
                               "seen": attrs.combo not in set(holdout), **asdict(attrs)})
    write_jsonl(root / "attributes.jsonl", attrs_rows)
    info = {"image_size": image_size, "seed": seed, "train": n_train, "val": n_val,
            "holdout": [list(h) for h in holdout], "colours": list(COLOURS), "shapes": list(SHAPES)}
    write_json(root / "synth.json", info)
    export(root, splits=("train", "val"), progress=progress)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Raw Wukong-style input

# How many rows of each kind of trouble the raw CSV holds (for a CSV of n good rows: max(k, n // per) of each).
_RAW_NOISE_PER = 60


def _long_piece_caption(base: str) -> str:
    filler = "非常非常非常好看的"
    text = base
    while len(text) < 19:
        text = filler[: 19 - len(text)] + text
    return text  # >= 19 chars, no separator, no digit, contains the keyword


def _render_file(job: tuple[str, Attributes, int, int]) -> None:
    path, attrs, size, seed = job
    render(attrs, size, seed).save(path)


def _render_files(jobs: Sequence[tuple[str, Attributes, int, int]], progress: bool) -> None:
    """Render and save each (path, attributes, size, seed) on every core: the same bytes as one process writes."""
    import contextlib
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(jobs) // 256 + 1, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        done = pool.map(_render_file, jobs, chunksize=64) if pool else map(_render_file, jobs)
        for _ in tqdm(done, total=len(jobs), desc="synth raw", disable=not progress, unit="img"):
            pass


def write_raw(out: str | os.PathLike, base_url: str, n: int = 3000, image_size: int = 64,
              holdout: Sequence[tuple[str, str]] = DEFAULT_HOLDOUT, seed: int = 0, progress: bool = True) -> dict:
    """A Wukong-style raw CSV ``OUT/wukong_raw.csv`` (url,caption), the images to serve under ``OUT/www/``, the keyword
    file ``OUT/keywords.txt`` and ``OUT/expected.json`` (how many rows of each kind of trouble it holds).

    Held-out combinations never appear: the raw data stands for training data."""
    _check_size(image_size)
    root = ensure_writable_dir(out)
    www = root / "www"
    www.mkdir(exist_ok=True)
    base_url = base_url.rstrip("/")
    seen = [c for c in all_combos() if c not in set(holdout)]
    rows: list[tuple[str, str]] = []
    attrs_rows = []
    jobs = []
    for i, attrs, caption in generate_split(n, "raw", seen, seed):
        name = f"{i:06d}.png"
        rows.append((f"{base_url}/{name}", caption))
        attrs_rows.append({"url": f"{base_url}/{name}", "caption": caption, **asdict(attrs), "attrs": attrs})
        jobs.append((str(www / name), attrs, image_size, seed))
    _render_files(jobs, progress)

    k = max(2, n // _RAW_NOISE_PER)
    rng = np.random.default_rng([seed, 3])
    good = rows
    expected = {"good_rows": n}
    noise: list[tuple[str, str]] = []

    def pick() -> tuple[str, str]:
        return good[int(rng.integers(len(good)))]

    # Caption rules (each row breaks exactly one rule, images fine).
    bad_caption_kinds = {
        "too_long": lambda c: (c + "，这是一张非常清楚而且构图简洁漂亮的示意图片" * 2)[:36],
        "bad_char": lambda c: [f"{c}？", f"【{c}】", f"《{c}》", f"{c}:好看", f"{c}?", f"<{c}>", f'"{c}"', f"{c}3",
                               f"{c}４"][int(rng.integers(9))],
        "long_piece": _long_piece_caption,
        "no_keyword": lambda c: ["一张好看的图片", "今天天气很好", "彩色的抽象画", "红色的东西"][int(rng.integers(4))],
    }
    for kind, make in bad_caption_kinds.items():
        for j in range(k):
            url, cap = pick()
            noise.append((f"{url}?{kind}={j}", make(cap)))
        expected[kind] = k
    # Duplicates: k exact copies of good rows, k rows reusing a good url with another caption.
    for j in range(k):
        noise.append(good[j])
    expected["dup_url_caption"] = k
    for j in range(k):
        url, cap = good[k + j]
        noise.append((url, "另一个" + cap))
    expected["dup_url"] = k
    # Image troubles, valid captions.
    troubles = {
        "http_404": lambda j: None,
        "corrupt": lambda j: b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)),
        "too_small": lambda j: Image.new("RGB", (40, 40), (200, 30, 30)),
        "too_elongated": lambda j: Image.new("RGB", (240, 60), (30, 30, 200)),
    }
    for kind, make in troubles.items():
        for j in range(k):
            name = f"{kind}_{j}.png"
            obj = make(j)
            if isinstance(obj, Image.Image):
                obj.save(www / name)
            elif isinstance(obj, bytes):
                (www / name).write_bytes(obj)
            noise.append((f"{base_url}/{name}", ["大红色圆形", "小蓝色正方形", "一个大的绿色三角形"][j % 3]))
        expected[kind] = k
    # Large images (700x560: the download shrinks them to fit 512), each a good sample drawn larger on a wider canvas,
    # with its caption and ground truth: valid training data.
    for j in range(k):
        src = int(rng.integers(n))
        name = f"large_{j}.png"
        square = render(attrs_rows[src]["attrs"], 256, seed).resize((560, 560), Image.BICUBIC)
        canvas = Image.new("RGB", (700, 560), square.getpixel((0, 0)))  # 5:4, the shape undistorted in the middle
        canvas.paste(square, (70, 0))
        canvas.save(www / name)
        noise.append((f"{base_url}/{name}", rows[src][1]))
        attrs_rows.append({**attrs_rows[src], "url": f"{base_url}/{name}"})
    expected["large"] = k
    all_rows = rows + noise
    order = rng.permutation(len(all_rows))
    with open(root / "wukong_raw.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "caption"])
        w.writerows(all_rows[i] for i in order)
    (root / "keywords.txt").write_text("\r\n".join(SHAPES) + "\r\n", encoding="utf-8")
    write_jsonl(root / "attributes.jsonl", [{k: v for k, v in r.items() if k != "attrs"} for r in attrs_rows])
    expected.update(rows=len(all_rows), base_url=base_url)
    write_json(root / "expected.json", expected)
    return expected


def iter_attributes(path: str | os.PathLike) -> Iterable[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
