"""A whole decode step of a SmolLM2-shaped model through the CPU backend (``bench_kernels step``).

30 layers of random Q4_1 weights in SmolLM2-135M's shapes (576 hidden, 9 query and 3 kv heads of 64,
1536 intermediate; 66 MB of int4, each layer its own, so every step reads them from memory as a real
one does), a bf16 cache, and 32 sequences decoding one token each at a few context lengths. Their
blocks interleave as the engine allocates them while the sequences grow together. The time is the
layers' forward (``CPUBackend.decoder_layers``): matmuls, attention, norms; not the head.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from edgellm.backends.base import AttentionMetadata, DecoderLayer, DecoderShape
from edgellm.backends.cpu import CPUBackend
from edgellm.models.rope import cos_sin_table
from edgellm.quant import QuantizedTensor

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 576, 1536, 9, 3, 64, 16
SEQS = 32
CONTEXTS = (16, 262, 512)


def random_q4_1(n: int, k: int, gen: torch.Generator) -> QuantizedTensor:
    """Random Q4_1 blocks (scale 0.005, minimum -0.04, random nibbles): valid weights, made in
    milliseconds where quantizing random floats takes a minute for a whole model."""
    blocks = torch.randint(0, 256, (n, k // 32, 20), dtype=torch.uint8, generator=gen)
    head = torch.tensor([0.005, -0.04], dtype=torch.float16).view(torch.uint8)
    blocks[:, :, :4] = head
    return QuantizedTensor("Q4_1", blocks.reshape(n, -1), (n, k))


def model_layers(backend: CPUBackend, n_layers: int = LAYERS, seed: int = 0) -> list[DecoderLayer]:
    gen = torch.Generator().manual_seed(seed)

    def prep(n: int, k: int):
        return backend.prepare_weight(random_q4_1(n, k, gen), torch.float32)

    layers = []
    for _ in range(n_layers):
        qkv, gate_up = prep((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), prep(2 * INTER, HIDDEN)
        layers.append(DecoderLayer(
            input_norm=torch.ones(HIDDEN), qkv=qkv, qkv_bias=None, o_proj=prep(HIDDEN, HEADS * HEAD_DIM),
            post_norm=torch.ones(HIDDEN), gate_up=gate_up, down=prep(HIDDEN, INTER),
            qkv_in=backend.linear_input_dtype(qkv, torch.float32),
            gate_up_in=backend.linear_input_dtype(gate_up, torch.float32)))
    return layers


def decode_meta(ctx: int) -> AttentionMetadata:
    """``SEQS`` decodes at ``ctx`` keys, block ``j`` of sequence ``s`` at ``1 + j SEQS + s``."""
    per = -(-ctx // BLOCK)
    tables = (1 + torch.arange(per * SEQS, dtype=torch.int32)).reshape(per, SEQS).T.contiguous()
    slots = tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK
    starts = list(range(SEQS + 1))
    return AttentionMetadata(slots, torch.tensor(starts, dtype=torch.int32), torch.full((SEQS,), ctx, dtype=torch.int32),
                             tables, BLOCK, 1, ctx, num_decode_tokens=SEQS, query_start_loc_list=starts,
                             seq_lens_list=[ctx] * SEQS)


def bench_step(backend: CPUBackend, runs: int = 12, n_layers: int = LAYERS,
               contexts: tuple[int, ...] = CONTEXTS) -> list[str]:
    layers = model_layers(backend, n_layers)
    shape = DecoderShape(HEADS, KV_HEADS, HEAD_DIM, 1e-5, HEAD_DIM ** -0.5)
    blocks = 1 + SEQS * -(-max(contexts) // BLOCK)
    caches = [torch.randn(2, blocks, KV_HEADS, BLOCK, HEAD_DIM).bfloat16() for _ in range(n_layers)]
    cos_sin = cos_sin_table(HEAD_DIM, 1024, 10000.0, None)
    lines = []
    for ctx in contexts:
        meta = decode_meta(ctx)
        h = torch.randn(SEQS, HIDDEN).bfloat16()
        positions = torch.full((SEQS,), ctx - 1, dtype=torch.int64)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            backend.begin_step(meta)
            backend.decoder_layers(h, layers, shape, caches, positions, cos_sin, meta)
            times.append(time.perf_counter() - t)
        lines.append(f"decode step {n_layers} layers B={SEQS} ctx={ctx:<4d} | median {np.median(times[2:]) * 1e3:7.2f} ms"
                     f" | best {min(times[2:]) * 1e3:7.2f} ms")
    return lines
