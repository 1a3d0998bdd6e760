"""``decode_layers`` for CPUs with AMX: a decode step's whole layer stack in one compiled call.

The same kernels as the ops one by one on such a CPU, layer after layer inside one Numba function:
up to ``gemv_rows`` rows on ``int4_gemv`` (``norm_int4_gemv``, ``silu_int4_gemv``), more on
``int4_amx_matmul``; decode attention on tiles (``rope_attention_step_amx``). A function holding tile
code compiles only where the CPU has AMX, so this lives apart from ``decode_layers``.

Example::

    x = decode_layers_amx(h, residual, layers, positions, cos_sin, slots, starts, lens, tables,
                          scale, window, eps, n_heads, head_dim, threads, attention_threads, 9, threads, cfg)
"""
from __future__ import annotations

import numpy as np
from numba import njit

from edgellm.kernels.cpu.attention_amx import rope_attention_step_amx
from edgellm.kernels.cpu.decode_layers import _out_and_mlp, _qkv, norm_rows, silu_rows
from edgellm.kernels.cpu.decode_step_spin import decode_layers_spin
from edgellm.kernels.cpu.int4_amx import int4_amx_matmul
from edgellm.kernels.cpu.paged_attention import DEFAULT_Q_TILE


@njit(cache=True)
def _norm_matmul_amx(h, residual, norm_w, eps, has_residual, packed, sz, n_threads, norm_threads, cfg):
    """``norm_rows``, then ``int4_amx_matmul``."""
    x = norm_rows(h, residual, norm_w, eps, has_residual, norm_threads)
    out = np.empty((h.shape[0], sz.shape[1]), np.uint16)
    int4_amx_matmul(x, packed, sz, out, cfg, n_threads)
    return out


@njit(cache=True)
def _out_and_mlp_amx(attn, residual, layer, eps, n_threads, norm_threads, cfg):
    """The block's output projection, post norm, gate/up, SiLU-and-mul and down on AMX tiles."""
    t = attn.shape[0]
    o = np.empty((t, layer[4].shape[1]), np.uint16)
    int4_amx_matmul(attn.reshape(t, attn.shape[1] * attn.shape[2]), layer[3], layer[4], o, cfg, n_threads)
    gate_up = _norm_matmul_amx(o, residual, layer[5], eps, True, layer[6], layer[7], n_threads, norm_threads, cfg)
    act = silu_rows(gate_up, n_threads)
    out = np.empty((t, layer[9].shape[1]), np.uint16)
    int4_amx_matmul(act, layer[8], layer[9], out, cfg, n_threads)
    return out


@njit(cache=True)
def _layer_amx(h, residual, has_residual, layer, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
               n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, cfg):
    t = h.shape[0]
    if t <= gemv_rows:
        qkv = _qkv(h, residual, has_residual, layer, eps, n_threads)
    else:
        qkv = _norm_matmul_amx(h, residual, layer[0], eps, has_residual, layer[1], layer[2], n_threads,
                               norm_threads, cfg)
    attn = np.empty((t, n_heads, head_dim), np.uint16)
    rope_attention_step_amx(attn, qkv, positions, cos_sin, layer[10], slots, starts, lens, tables, scale, window, 0.0,
                            DEFAULT_Q_TILE, attn_threads, cfg)
    if t <= gemv_rows:
        return _out_and_mlp(attn, residual, layer, eps, n_threads)
    return _out_and_mlp_amx(attn, residual, layer, eps, n_threads, norm_threads, cfg)


@njit(cache=True)
def decode_layers_amx(h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
                      n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, cfg, n_dec=-1):
    """``decode_layers_dp``'s contract on AMX CPUs (bf16 cache of head size 64, ``attention_amx.supports``),
    with the tile configuration ``cfg`` (``amx.make_config()``), then ``n_dec``. On more than one
    thread the step runs in one parallel region (``decode_layers_spin``): the same kernels and
    numbers; there the sequences from ``n_dec`` on (when 0 or more) may be prompt chunks. On one
    thread every sequence is a decode."""
    if n_threads > 1:
        return decode_layers_spin(h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale, window,
                                  eps, n_heads, head_dim, n_threads, gemv_rows, cfg, n_dec)
    x = _layer_amx(h, residual, False, layers[0], positions, cos_sin, slots, starts, lens, tables, scale, window,
                   eps, n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, cfg)
    for i in range(1, len(layers)):
        x = _layer_amx(x, residual, True, layers[i], positions, cos_sin, slots, starts, lens, tables, scale, window,
                       eps, n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, cfg)
    return x
