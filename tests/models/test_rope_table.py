"""The rotary table: transformers' float32 angles, their cos and sin rounded once (torch's threaded
float32 cos/sin, 1 ulp off in ~5 % of entries depending on how threads split the table, made answers
differ between processes on a busy machine)."""
from __future__ import annotations

import math

import numpy as np
import torch

from edgellm.models.rope import cos_sin_table, inv_frequencies


def test_entries_are_the_rounded_cos_and_sin_of_float32_angles():
    table = cos_sin_table(64, 8192, 100000.0, None)
    inv = inv_frequencies(64, 100000.0, None).numpy()
    assert table.shape == (8192, 64) and table.dtype == torch.float32
    rng = np.random.default_rng(0)
    for pos, i in zip(rng.integers(0, 8192, 400), rng.integers(0, 32, 400)):
        angle = float(np.float32(np.float32(pos) * inv[i]))  # the float32 product transformers takes
        assert table[pos, i].item() == float(np.float32(math.cos(angle)))
        assert table[pos, 32 + i].item() == float(np.float32(math.sin(angle)))
