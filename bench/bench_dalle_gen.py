"""DALLE generation speed: our batched, KV-cached sampler vs the seed's way, same weights, same N images.

Baseline (same run): what the seed's ``dalle_gen.py`` did through DALLE-pytorch at its default ``cond_scale=1``
(where the cache is silently off, dalle_anchor.md §1.5 bug A): one image per call, and at every one of the
``image_seq_len`` steps a full forward over the whole growing sequence, with logits over the joint text + image
vocabulary at every position. Both decode their tokens with the same (random) dVAE, so images/s counts everything
from caption ids to pixels.

Also: training throughput (tokens/s, forward + backward + AdamW at batch 32) and the process's peak RSS.

    python bench/bench_dalle_gen.py                       # the demo's model: dim 192, depth 4, 8x8 tokens, N = 16
    python bench/bench_dalle_gen.py --dim 512 --depth 8 --fmap 16 --n 4 --json bench/dalle.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dalle_train.model import DALLE, DALLEConfig
from dalle_train.sample import pick, sample_tokens, top_k_count
from vae_train.dvae import DiscreteVAE, DVAEConfig


def seed_way(model: DALLE, text: torch.Tensor, seeds: list[int], k: int) -> torch.Tensor:
    """One image per call, the full uncached forward over the growing sequence at every step."""
    out = []
    with torch.no_grad():
        for s in seeds:
            g = [torch.Generator().manual_seed(s)]
            image = torch.empty(1, 0, dtype=torch.long)
            for _ in range(model.cfg.image_seq_len):
                _, image_logits = model.logits(text, image)  # every position, joint vocabulary
                nxt = pick(image_logits[:, -1], k, 1.0, g)
                image = torch.cat([image, nxt[:, None]], dim=1)
            out.append(image)
    return torch.cat(out)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per measurement")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--fmap", type=int, default=8, help="token grid side (8 -> 64 image tokens)")
    ap.add_argument("--codes", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=21128, help="text vocabulary (the Chinese BERT vocab: 21128)")
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="our sampler's batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = DALLEConfig(num_text_tokens=a.vocab, text_seq_len=a.text_len, num_image_tokens=a.codes,
                      image_seq_len=a.fmap**2, image_fmap_size=a.fmap, dim=a.dim, depth=a.depth, heads=a.heads,
                      dim_head=a.dim // a.heads)
    model = DALLE(cfg).eval()
    vae = DiscreteVAE(DVAEConfig(image_size=a.fmap * 8, num_tokens=a.codes, codebook_dim=32, num_layers=3,
                                 num_resnet_blocks=1, hidden_dim=64, quantizer="vq")).eval()
    text = torch.randint(5, a.vocab, (1, a.text_len))
    seeds = list(range(a.n))
    k = top_k_count(a.codes, filter_thres=0.9)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M params, dim {a.dim}, depth {a.depth}, {cfg.image_seq_len} image tokens, "
          f"text vocab {a.vocab}, {torch.get_num_threads()} threads; N = {a.n}")

    sample_tokens(model, text, [0], batch_size=1, top_k=k)  # warm-up
    t0 = time.perf_counter()
    ours = sample_tokens(model, text, seeds, batch_size=a.batch_size, top_k=k)
    with torch.no_grad():
        vae.decode(ours)
    t_ours = time.perf_counter() - t0
    rss_ours = peak_rss_mb()

    t0 = time.perf_counter()
    base = seed_way(model, text, seeds, k)
    with torch.no_grad():
        for row in base:
            vae.decode(row[None])
    t_base = time.perf_counter() - t0
    agree = float((ours == base).float().mean())

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bt = torch.randint(5, a.vocab, (32, a.text_len))
    bi = torch.randint(0, a.codes, (32, cfg.image_seq_len))
    for i in range(6):  # 1 warm-up + 5 timed
        if i == 1:
            t0 = time.perf_counter()
        loss, _ = model(bt, bi)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_tok_s = 5 * 32 * (cfg.text_seq_len + cfg.image_seq_len) / (time.perf_counter() - t0)

    rows = {
        "ours_images_per_s": a.n / t_ours, "seed_way_images_per_s": a.n / t_base, "ratio": t_base / t_ours,
        "same_tokens_fraction": agree, "train_tokens_per_s": train_tok_s, "peak_rss_mb_after_generation": rss_ours,
    }
    print(f"{'':32s}{'images/s':>12s}")
    print(f"{'seed way (1 per call, no cache)':32s}{rows['seed_way_images_per_s']:12.2f}")
    print(f"{'ours (batched, KV cache)':32s}{rows['ours_images_per_s']:12.2f}")
    print(f"ratio: {rows['ratio']:.1f}x (target >= 20x); tokens identical to the baseline's: {agree:.1%}")
    print(f"training: {train_tok_s:,.0f} tokens/s (batch 32); peak RSS after generation: {rss_ours:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "benchmark": "dalle_gen", "machine": platform.platform(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "config": vars(a), "params": params, **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
