"""Write a random-weight LLaMA GGUF of a given shape (default: LLaMA-3-8B, f16) for GPU speed and memory runs.

Usage: python benchmarks/gpu_make_model.py OUT.gguf [--layers 32 --embd 4096 --heads 32 --kv-heads 8
       --ff 14336 --vocab 128256 --ctx 131072]

The weights are slices of one pool of N(0, 0.02) f16 values (a few seconds to draw instead of minutes for
8 billion); values do not change the work a decode does. Tensors are streamed to the file, so memory stays
at the pool's size. The vocabulary is a SentencePiece-style list padded with filler pieces to ``--vocab``.
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np


def write(path: str, layers: int, embd: int, heads: int, kv_heads: int, ff: int, vocab: int, ctx: int) -> int:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    fill = vocab - len(tokens)
    tokens += [f"\u2581w{i}" for i in range(fill)]
    types += [gguf.TokenType.NORMAL] * fill
    scores = [0.0] * 259 + [-float(i) for i in range(fill)]

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random-llama-{layers}L-{embd}")
    w.add_context_length(ctx)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(embd // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    kv = kv_heads * (embd // heads)
    shapes: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (vocab, embd), False)]
    for i in range(layers):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (embd,), True),
            (f"blk.{i}.attn_q.weight", (embd, embd), False),
            (f"blk.{i}.attn_k.weight", (kv, embd), False),
            (f"blk.{i}.attn_v.weight", (kv, embd), False),
            (f"blk.{i}.attn_output.weight", (embd, embd), False),
            (f"blk.{i}.ffn_norm.weight", (embd,), True),
            (f"blk.{i}.ffn_gate.weight", (ff, embd), False),
            (f"blk.{i}.ffn_up.weight", (ff, embd), False),
            (f"blk.{i}.ffn_down.weight", (embd, ff), False),
        ]
    shapes += [("output_norm.weight", (embd,), True), ("output.weight", (vocab, embd), False)]
    for name, shape, is_norm in shapes:
        dt = np.float32 if is_norm else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    biggest = max(int(np.prod(s)) for _, s, n in shapes if not n)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(biggest + 4096, dtype=np.float32) * 0.02).astype(np.float16)
    total = 0
    for k, (_, shape, is_norm) in enumerate(shapes):
        n = int(np.prod(shape))
        if is_norm:
            arr = np.ones(shape, np.float32)
        else:
            off = (k * 997) % 4096  # a different slice per tensor
            arr = pool[off : off + n].reshape(shape)
        w.write_tensor_data(arr)
        total += arr.nbytes
    w.close()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--embd", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ff", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--ctx", type=int, default=131072)
    a = ap.parse_args()
    t0 = time.perf_counter()
    n = write(a.out, a.layers, a.embd, a.heads, a.kv_heads, a.ff, a.vocab, a.ctx)
    print(f"wrote {a.out}: {n / 2**30:.2f} GiB of tensors in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
