"""``bench_kernels step``: a SmolLM2-shaped decode step on random Q4_1 weights runs and reports."""
from __future__ import annotations

import torch

from edgellm.backends.cpu import CPUBackend
from edgellm.kernels.cpu.bench_step import bench_step, decode_meta, random_q4_1


def test_random_q4_1_weights_are_the_blocks_scale_and_minimum_apart():
    w = random_q4_1(64, 96, torch.Generator().manual_seed(0)).dequantize()
    d, m = (torch.tensor(v, dtype=torch.float16).item() for v in (0.005, -0.04))  # as the blocks hold them
    steps = (w.float() - m) / d
    assert w.shape == (64, 96)
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.min() >= 0 and steps.max() <= 15
    assert len(steps.round().unique()) == 16  # every nibble value occurs


def test_decode_meta_interleaves_the_sequences_blocks():
    meta = decode_meta(40)  # 3 blocks each, block j of sequence s at 1 + 32 j + s
    assert meta.block_tables[5].tolist() == [6, 38, 70]
    assert meta.slot_mapping[5].item() == 70 * 16 + 7 and meta.num_decode_tokens == 32


def test_the_step_section_times_each_context():
    lines = bench_step(CPUBackend(threads=2, warmup=False), runs=3, n_layers=2, contexts=(16, 40))
    assert [line.split("ctx=")[1].split()[0] for line in lines] == ["16", "40"]
    assert all(float(line.split("median")[1].split()[0]) > 0 for line in lines)
