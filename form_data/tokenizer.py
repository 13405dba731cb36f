"""The one Chinese text tokenizer of the toolkit (DALLE text length 32, CLIP, BriVL length 80).

BERT-style WordPiece, the way ``bert-base-chinese`` does it: clean control characters, put spaces around every CJK
character, lowercase (which also strips accents), split on whitespace and punctuation, then WordPiece over a
``vocab.txt``. Built on the HF ``tokenizers`` library only; nothing here can contact a hub.

Where the vocabulary comes from (:func:`load_tokenizer`), first hit wins:

1. an explicit path: a ``vocab.txt``, a directory holding one, or a local HF tokenizer directory with
   ``tokenizer.json`` (e.g. a downloaded ``hfl/chinese-roberta-wwm-ext``);
2. the 21128-entry ``vocab.txt`` shipped inside the optional ``cn_clip`` package;
3. a fallback vocab built from the training captions by :func:`build_vocab` (``python -m form_data vocab``).

Every loaded tokenizer is probed: known Chinese characters must map to their own ids. A vocab or tokenizer config that
turns Chinese text into ``[UNK]`` (as ``transformers.BertTokenizer(vocab_file=...)`` can in transformers 5.x) is a
:class:`UserError`, never a silent all-``[UNK]`` training run.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from zh_t2i_base.cli import UserError
from zh_t2i_base.fileio import atomic_write, ensure_writable_dir, reading, utf8_error

if TYPE_CHECKING:
    import torch

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # build_vocab writes them first, in this order ([PAD] = 0)
REQUIRED_TOKENS = (PAD, UNK, CLS, SEP)
PROBE_CHARS = 16
VOCAB_HINT = ("pass a vocab path (a vocab.txt, or a directory with vocab.txt or tokenizer.json), install cn_clip, "
              "or build one from your captions with `python -m form_data vocab`")


def _is_cjk(c: str) -> bool:
    """CJK Unified Ideographs and Extension A: the characters every Chinese vocab must know."""
    cp = ord(c)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF


def bert_normalizer() -> normalizers.Normalizer:
    """bert-base-chinese normalisation: drop control chars, space out CJK chars, lowercase + strip accents."""
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def _wordpiece_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = bert_normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS if t in vocab])
    return tok


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read a BERT ``vocab.txt`` (one token a line, id = line number; a later duplicate line wins, as in BERT)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"vocab {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read vocab {path}: {e.strerror or e}") from None
    lines = text.split("\n")  # not splitlines(): U+2028 and friends are not line breaks in a vocab file
    if lines and lines[-1] == "":
        lines.pop()
    return {line.rstrip(): i for i, line in enumerate(lines)}


class ChineseTokenizer:
    """Fixed-length encoding of (batches of) Chinese captions to LongTensors, and back.

    Wraps a ``tokenizers.Tokenizer`` (``self.backend``); the constructor checks the special tokens and runs the
    Chinese probe, so every instance is known to tokenize Chinese text into real ids.
    """

    def __init__(self, backend: Tokenizer, source: str):
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.source = source
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise UserError(f"vocab {source} lacks the special token(s) {', '.join(missing)}; {VOCAB_HINT}")
        self.vocab_size = max(vocab.values()) + 1  # size of an embedding table: > every id, holes included
        self.pad_id, self.unk_id = vocab[PAD], vocab[UNK]
        self.cls_id, self.sep_id = vocab[CLS], vocab[SEP]
        self.mask_id: int | None = vocab.get(MASK)
        self._id_to_token: list[str | None] = [None] * self.vocab_size
        for token, i in vocab.items():
            self._id_to_token[i] = token
        self._special_ids = {i for i in (self.pad_id, self.cls_id, self.sep_id, self.mask_id) if i is not None}
        self._probe(vocab)

    def _probe(self, vocab: dict[str, int]) -> None:
        """Tokenize a string of up to 16 known CJK chars; each must come out as its own id."""
        known = sorted((i, t) for t, i in vocab.items() if len(t) == 1 and _is_cjk(t))
        if not known:
            raise UserError(f"vocab {self.source} maps Chinese text to [UNK]: it holds no CJK characters at all; "
                            f"{VOCAB_HINT}")
        step = max(1, len(known) // PROBE_CHARS)
        chars = [t for _, t in known[::step][:PROBE_CHARS]]
        text = "".join(chars)
        enc = self.backend.encode(text, add_special_tokens=False)
        got = set(enc.ids)
        bad = [c for c in chars if vocab[c] not in got]
        if 2 * len(bad) > len(chars):
            shown = " ".join(enc.tokens[:8])
            raise UserError(f"vocab {self.source} maps Chinese text to [UNK]: {text!r} -> {shown!r} "
                            f"({len(bad)}/{len(chars)} known characters lost); check its normaliser / pre-tokenizer, "
                            f"or pass the plain vocab.txt instead")
        if bad:
            warnings.warn(f"tokenizer {self.source}: {len(bad)}/{len(chars)} probe characters did not map to their "
                          f"own ids: {''.join(bad)}", stacklevel=3)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ChineseTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text``, without [CLS]/[SEP]; unknown pieces are '[UNK]'."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    @overload
    def encode(self, texts: str | Sequence[str], length: int, special: bool = True,
               return_truncated: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def encode(self, texts: str | Sequence[str], length: int, special: bool = True, *,
               return_truncated: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode(self, texts, length, special=True, return_truncated=False):
        """Encode to a LongTensor ``[B, length]`` (a single str gives B = 1).

        ``special=True``: ``[CLS] ids [SEP] [PAD]...``; a text too long is cut so that [SEP] stays the last real
        token. ``special=False``: ``ids [PAD]...``. With ``return_truncated`` also return a bool tensor ``[B]``
        that is True for the rows that were cut.
        """
        if isinstance(texts, str):
            texts = [texts]
        extra = 2 if special else 0
        if length < max(1, extra):
            raise ValueError(f"length must be >= {max(1, extra)} (special={special}), got {length}")
        body = length - extra
        rows, truncated = [], []
        for enc in self.backend.encode_batch(list(texts), add_special_tokens=False):
            ids = enc.ids
            truncated.append(len(ids) > body)
            ids = ids[:body]
            if special:
                ids = [self.cls_id, *ids, self.sep_id]
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        import torch  # here, not at the top: `form_data vocab` builds a vocab without paying torch's start-up

        out = torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
        if return_truncated:
            return out, torch.tensor(truncated, dtype=torch.bool)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row of ids. [PAD]/[CLS]/[SEP]/[MASK] are skipped, [UNK] (and any id outside the vocab) is shown
        as '[UNK]'; Chinese characters are joined without spaces, '##' pieces glued to the previous piece, and a
        space is kept only between two Latin words/numbers."""
        if hasattr(ids, "dim") and hasattr(ids, "tolist"):  # a tensor (torch is not imported for this test)
            if ids.dim() > 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}; use decode_batch")
            ids = ids.tolist()
        out = ""
        for i in ids:
            i = int(i)
            if i in self._special_ids:
                continue
            tok = self._id_to_token[i] if 0 <= i < self.vocab_size else None
            tok = UNK if tok is None else tok
            if tok.startswith("##") and len(tok) > 2:
                out += tok[2:]
            elif out and _wordish(out[-1]) and _wordish(tok[0]):
                out += " " + tok
            else:
                out += tok
        return out

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """:meth:`decode` for each row of a ``[B, L]`` tensor or list of lists."""
        return [self.decode(row) for row in ids]

    def vocab_tokens(self) -> list[str]:
        """The token of every id (holes in the id range as ``[unusedN]``): a checkpoint can carry its vocab this way
        and rebuild the same tokenizer with :func:`tokenizer_from_tokens`."""
        return [tok if tok is not None else f"[unused{i}]" for i, tok in enumerate(self._id_to_token)]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/vocab.txt`` (atomically; holes in the id range become ``[unusedN]``); return its path.

        Reloading it gives the standard bert-base-chinese pipeline over the same ids.
        """
        path = ensure_writable_dir(directory) / "vocab.txt"
        with atomic_write(path) as f:
            f.writelines(f"{tok}\n" for tok in self.vocab_tokens())
        return path


def vocab_digest(tokens: list[str]) -> str:
    """SHA-1 of a vocabulary (``ChineseTokenizer.vocab_tokens()``): a checkpoint stores it to recognise its vocab."""
    return hashlib.sha1("\n".join(tokens).encode("utf-8")).hexdigest()


def tokenizer_from_tokens(tokens: Sequence[str], source: str) -> ChineseTokenizer:
    """The BERT WordPiece tokenizer over ``tokens`` (id = position), e.g. a vocab stored inside a checkpoint."""
    return ChineseTokenizer(_wordpiece_tokenizer({t: i for i, t in enumerate(tokens)}), source)


def _wordish(c: str) -> bool:
    return c.isalnum() and not _is_cjk(c)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _load_path(path: str | os.PathLike, kind: str) -> ChineseTokenizer:
    """A vocab.txt, a tokenizer.json, or a directory holding either (tokenizer.json preferred: it is exact)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.txt").is_file():
            p = p / "vocab.txt"
        else:
            raise UserError(f"vocab not found: directory {p} holds neither vocab.txt nor tokenizer.json")
    elif not p.is_file():
        raise UserError(f"vocab not found: {p}")
    if p.suffix == ".json":
        try:
            backend = Tokenizer.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception for any bad tokenizer.json
            raise UserError(f"cannot read tokenizer {p}: {e}") from None
        return ChineseTokenizer(backend, f"{kind} {p}")
    return ChineseTokenizer(_wordpiece_tokenizer(read_vocab(p)), f"{kind} {p}")


def cn_clip_vocab() -> Path | None:
    """The vocab.txt shipped in the optional ``cn_clip`` package, found without importing it (None if absent)."""
    try:
        spec = importlib.util.find_spec("cn_clip")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    for root in map(Path, roots):
        if (root / "clip" / "vocab.txt").is_file():
            return root / "clip" / "vocab.txt"
    for root in map(Path, roots):
        found = sorted(root.rglob("vocab.txt")) if root.is_dir() else []
        if found:
            return found[0]
    return None


def load_tokenizer(path: str | os.PathLike | None = None,
                   fallback_vocab: str | os.PathLike | None = None) -> ChineseTokenizer:
    """The toolkit's tokenizer: explicit ``path``, else cn_clip's vocab, else ``fallback_vocab``, else UserError."""
    if path is not None and str(path) != "":
        return _load_path(path, "vocab")
    cn = cn_clip_vocab()
    if cn is not None:
        return _load_path(cn, "cn_clip vocab")
    if fallback_vocab is not None and str(fallback_vocab) != "":
        p = Path(fallback_vocab).expanduser()
        if not p.exists():
            raise UserError(f"vocab not found: {p} (build it with `python -m form_data vocab`)")
        return _load_path(p, "fallback vocab")
    raise UserError(f"no tokenizer vocab: {VOCAB_HINT}")


# ---------------------------------------------------------------------------------------------------------------------
# Building a vocab from captions

ASCII_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def count_chars(captions: Iterable[str], chunk: int = 4096) -> Counter[str]:
    """Character counts after the tokenizer's own normalisation (whitespace dropped); C-speed per chunk of captions."""
    norm = bert_normalizer()
    counts: Counter[str] = Counter()
    buf: list[str] = []
    for cap in captions:
        if cap:
            buf.append(cap)
        if len(buf) >= chunk:
            counts.update(norm.normalize_str("\n".join(buf)))
            buf.clear()
    if buf:
        counts.update(norm.normalize_str("\n".join(buf)))
    for c in [c for c in counts if c.isspace()]:
        del counts[c]
    return counts


def _in_word(chars: Iterable[str]) -> list[str]:
    """The chars that can sit inside a word (not CJK, not punctuation): WordPiece needs a '##c' piece for them."""
    norm, pre = bert_normalizer(), pre_tokenizers.BertPreTokenizer()
    return [c for c in chars if len(pre.pre_tokenize_str(norm.normalize_str("a" + c))) == 1]


def build_vocab(captions: Iterable[str], out_path: str | os.PathLike, min_count: int = 1,
                extra_chars: str = "") -> ChineseTokenizer:
    """Write a vocab.txt for ``captions`` and return its tokenizer.

    Order (deterministic): [PAD] [UNK] [CLS] [SEP] [MASK]; every character seen >= ``min_count`` times, by
    descending count then code point; ``extra_chars``; ASCII lowercase letters, digits and punctuation; then '##'
    continuation pieces for ASCII letters/digits and for every other in-word character of the vocab (Latin with
    accents stripped, kana, full-width letters ...). ``out_path`` is a file, or a directory to hold vocab.txt.
    """
    if min_count < 1:
        raise UserError(f"min_count must be >= 1, got {min_count}")
    out = Path(out_path).expanduser()
    if out.is_dir():
        out = out / "vocab.txt"
    ensure_writable_dir(out.parent)
    counts = count_chars(captions)
    seen = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], ord(c)))
    extra = [c for c in bert_normalizer().normalize_str(extra_chars) if not c.isspace()]
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *seen, *extra, *ASCII_CHARS]))
    continuation = _in_word(c for c in tokens if len(c) == 1)
    tokens += [f"##{c}" for c in continuation]
    with atomic_write(out) as f:
        f.write("".join(f"{t}\n" for t in tokens))
    return _load_path(out, "built vocab")


# ---------------------------------------------------------------------------------------------------------------------
# Captions from the toolkit's data formats


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _json_captions(row: dict) -> list[str]:
    """DALLE ``"sentences": "caption"``; BriVL ``"sentences": [["sur_text", caption], ...]``; plain ``"caption"``."""
    s = row.get("sentences", row.get("caption"))
    if isinstance(s, str):
        return [s]
    out = []
    for item in s if isinstance(s, list) else []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (list, tuple)) and item and isinstance(item[-1], str):
            out.append(item[-1])
    return out


def read_captions(path: str | os.PathLike) -> Iterator[str]:
    """Stream the captions of one data file of the toolkit (checked eagerly: errors raise here, not mid-stream).

    Formats: clean split CSV (``url,caption``), open_clip TSV (``title<TAB>filepath``), DALLE JSONL
    (``{"image_path", "sentences": str}``), BriVL JSONL (``{"image_id", "sentences": [["sur_text", str]], "bbox"}``).
    Optionally gzip-compressed (``.gz``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"no such caption file: {p}")
    with reading(p, "caption file"), _open_text(p) as f:
        first = next((line for line in f if line.strip()), "")
    if not first:
        return iter(())
    if first.lstrip().startswith("{"):
        try:
            row = json.loads(first)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: first line is not valid JSON ({e.msg})") from None
        keys = list(row) if isinstance(row, dict) else []
        if "sentences" not in keys and "caption" not in keys:
            raise UserError(f"{p}: no caption field (expected 'sentences' or 'caption'); fields found: "
                            f"{', '.join(keys) or '(none)'}")
        return _iter_jsonl(p)
    delimiter = "\t" if "\t" in first else ","
    header = next(csv.reader([first], delimiter=delimiter))
    col = next((c for c in ("caption", "title") if c in header), None)
    if col is None:
        raise UserError(f"{p}: no caption column (expected 'caption' or 'title'); columns found: {', '.join(header)}")
    return _iter_table(p, delimiter, header.index(col))


def _iter_table(path: Path, delimiter: str, col: int) -> Iterator[str]:
    with reading(path, "caption file"), _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        next(reader, None)  # header
        for row in reader:
            if len(row) > col and row[col]:
                yield row[col]


def _iter_jsonl(path: Path) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if isinstance(row, dict):
                    yield from (c for c in _json_captions(row) if c)
    except UnicodeDecodeError:
        raise utf8_error(path) from None
