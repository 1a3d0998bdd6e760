"""A decode step's whole stack of Llama-family layers in one compiled call.

One stream's token costs ~150 kernel calls (five a layer), and each call from Python costs ~10 us of
wrapping and Numba dispatch around ~20-40 us of work: a fifth of the token. Here the same kernels
(``norm_int4_gemv``, ``rope_attention_step[_dp]``, ``int4_gemv``, ``silu_int4_gemv``; for bigger
batches on AVX512-BF16 the norms, ``int4_dpbf16_matmul`` and SiLU-and-mul) run layer after layer
inside one Numba function, on the same arrays, so the numbers are those of the ops one by one.

The layers come as one typed list of per-layer tuples (``layer_list``), built once per model and
cache: ``(input_norm, qkv packed, qkv sz, o packed, o sz, post_norm, gate_up packed, gate_up sz,
down packed, down sz, kv, qkv sz, o sz, gate_up sz, down sz)``, the int4 weights as
``Int4PackedWeight.amx_operands`` and the last four the scale-zeros ``int4_gemv`` reads
(``Int4PackedWeight.gemv_operands``).

``decode_layers_dp`` and ``decode_layers`` differ only in their attention kernel, and must stay two
functions: one holding ``vdpbf16ps`` code would not compile on a CPU without AVX512-BF16.
``decode_layers_dp`` also takes steps with prompt chunks after their decodes (a request joining
running ones), with the attention kernels ``CPUBackend.attention`` runs for them op by op
(``_attend_with_prompts``).

Example::

    x = decode_layers_dp(h, residual, layers, positions, cos_sin, slots, starts, lens, tables,
                         scale, window, eps, n_heads, head_dim, threads, attention_threads, 8, threads, n_decodes)
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numba.typed import List

from edgellm.kernels.cpu.activations import PARALLEL_MIN_ROWS, silu_and_mul, silu_and_mul_parallel
from edgellm.kernels.cpu.attention_dpbf16 import attend_dp, rope_attention_step_dp
from edgellm.kernels.cpu.decode_step_spin import decode_layers_spin
from edgellm.kernels.cpu.dpbf16 import int4_dpbf16_matmul_then
from edgellm.kernels.cpu.int4_gemv import int4_gemv, norm_int4_gemv, silu_int4_gemv
from edgellm.kernels.cpu.norm_rope import (
    add_rms_norm,
    add_rms_norm_parallel,
    rope_neox_qk,
    rope_neox_qk_parallel,
)
from edgellm.kernels.cpu.paged_attention import (
    DEFAULT_Q_TILE,
    prefetch_slots,
    rope_attention_step,
    write_kv,
    write_kv_parallel,
)
from edgellm.kernels.cpu.prompt_attention_dp import prompt_attention_dp


def layer_list(layers: list[tuple]) -> List:
    """The typed list the kernels take, from per-layer tuples of arrays (all layers alike). Built by
    compiled, cached functions: a typed list's own methods compile afresh in every process (~1 s)."""
    out = _list_of(layers[0])
    for layer in layers[1:]:
        _append(out, layer)
    return out


@njit(cache=True)
def _list_of(first):
    out = List()
    out.append(first)
    return out


@njit(cache=True)
def _append(items, item):
    items.append(item)


@njit(cache=True)
def _qkv(h, residual, has_residual, layer, eps, n_threads):
    """The block's input norm (adding ``h`` to the residual stream) and its qkv projection."""
    qkv = np.empty((h.shape[0], layer[2].shape[1]), np.uint16)
    norm_int4_gemv(h, residual, layer[0], eps, has_residual, layer[1], layer[11], qkv, n_threads)
    return qkv


@njit(cache=True)
def _out_and_mlp(attn, residual, layer, eps, n_threads):
    """The attention output's projection, the post norm, gate/up, SiLU-and-mul and down: the block's
    output (bf16 bits), its sum with the residual stream left for the next block's norm."""
    t = attn.shape[0]
    o = np.empty((t, layer[4].shape[1]), np.uint16)
    int4_gemv(attn.reshape(t, attn.shape[1] * attn.shape[2]), layer[3], layer[12], o, n_threads)
    gate_up = np.empty((t, layer[7].shape[1]), np.uint16)
    norm_int4_gemv(o, residual, layer[5], eps, True, layer[6], layer[13], gate_up, n_threads)
    out = np.empty((t, layer[9].shape[1]), np.uint16)
    silu_int4_gemv(gate_up, layer[8], layer[14], out, n_threads)
    return out


@njit(cache=True)
def norm_rows(h, residual, norm_w, eps, has_residual, norm_threads):
    """``add_rms_norm`` into bf16 bits, its rows split among ``norm_threads``."""
    x = np.empty(h.shape, np.uint16)
    if norm_threads > 1:
        add_rms_norm_parallel(h, residual, norm_w, eps, x, has_residual, norm_threads)
    else:
        add_rms_norm(h, residual, norm_w, eps, x, has_residual)
    return x


@njit(cache=True)
def _norm_matmul(h, residual, norm_w, eps, has_residual, packed, sz, n_threads, norm_threads, nxt_packed, nxt_sz):
    """``norm_rows``, then ``int4_dpbf16_matmul_then`` (streaming in the weight ``nxt_packed, nxt_sz``
    the next matmul takes)."""
    x = norm_rows(h, residual, norm_w, eps, has_residual, norm_threads)
    out = np.empty((h.shape[0], sz.shape[1]), np.uint16)
    int4_dpbf16_matmul_then(x, packed, sz, out, n_threads, nxt_packed, nxt_sz, True)
    return out


@njit(cache=True)
def silu_rows(gate_up, n_threads):
    """SiLU-and-mul of ``gate_up [T, 2I]`` (bf16 bits) into ``[T, I]``, rows split among the threads
    from ``PARALLEL_MIN_ROWS`` rows."""
    act = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.uint16)
    if gate_up.shape[0] >= PARALLEL_MIN_ROWS and n_threads > 1:
        silu_and_mul_parallel(gate_up, act, n_threads)
    else:
        silu_and_mul(gate_up, act)
    return act


@njit(cache=True)
def _out_and_mlp_batched(attn, residual, layer, eps, n_threads, norm_threads, nxt_layer):
    """``_out_and_mlp`` for more rows than ``int4_gemv`` takes: the linears on ``int4_dpbf16_matmul``,
    each streaming in the next one's weight, the last one ``nxt_layer``'s qkv."""
    t = attn.shape[0]
    o = np.empty((t, layer[4].shape[1]), np.uint16)
    int4_dpbf16_matmul_then(attn.reshape(t, attn.shape[1] * attn.shape[2]), layer[3], layer[4], o, n_threads,
                            layer[6], layer[7], True)
    gate_up = _norm_matmul(o, residual, layer[5], eps, True, layer[6], layer[7], n_threads, norm_threads, layer[8],
                           layer[9])
    act = silu_rows(gate_up, n_threads)
    out = np.empty((t, layer[9].shape[1]), np.uint16)
    int4_dpbf16_matmul_then(act, layer[8], layer[9], out, n_threads, nxt_layer[1], nxt_layer[2], True)
    return out


@njit(cache=True)
def _attend_with_prompts(attn, qkv, positions, cos_sin, kv, slots, starts, lens, tables, scale, n_dec, attn_threads,
                         n_threads, norm_threads):
    """Attention for a step whose sequences from ``n_dec`` on are prompt chunks: rotary for every row
    and the cache written (rows split among ``norm_threads``), then the decodes on ``attend_dp``
    (``attn_threads``) and the prompt chunks on ``prompt_attention_dp``: the kernels
    ``CPUBackend.attention`` runs op by op for such a step, on the same rows."""
    t = qkv.shape[0]
    n_q, n_k, dim = attn.shape[1], kv.shape[2], attn.shape[2]
    q = np.empty((t, n_q, dim), np.float32)
    k = np.empty((t, n_k, dim), np.float32)
    v = qkv[:, (n_q + n_k) * dim:]
    if norm_threads > 1:
        rope_neox_qk_parallel(qkv, positions, cos_sin, q, k, norm_threads)
        write_kv_parallel(kv, k, v, slots, norm_threads)
    else:
        rope_neox_qk(qkv, positions, cos_sin, q, k)
        write_kv(kv, k, v, slots)
    if n_dec:
        t_dec = starts[n_dec]
        attend_dp(attn[:t_dec], q[:t_dec], kv, starts[:n_dec + 1], lens[:n_dec], tables[:n_dec], scale, 0, 0.0,
                  DEFAULT_Q_TILE, attn_threads)
    prompt_attention_dp(attn, q, kv, starts, lens, tables, n_dec, starts.shape[0] - 1, scale, n_threads)


@njit(cache=True)
def _layer_dp(h, residual, has_residual, layer, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
              n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, n_dec, nxt_layer):
    t = h.shape[0]
    prefetch_slots(layer[10], slots)
    if t <= gemv_rows:
        qkv = _qkv(h, residual, has_residual, layer, eps, n_threads)
    else:
        qkv = _norm_matmul(h, residual, layer[0], eps, has_residual, layer[1], layer[2], n_threads, norm_threads,
                           layer[3], layer[4])
    attn = np.empty((t, n_heads, head_dim), np.uint16)
    if n_dec < starts.shape[0] - 1:
        _attend_with_prompts(attn, qkv, positions, cos_sin, layer[10], slots, starts, lens, tables, scale, n_dec,
                             attn_threads, n_threads, norm_threads)
    else:
        rope_attention_step_dp(attn, qkv, positions, cos_sin, layer[10], slots, starts, lens, tables, scale, window,
                               0.0, DEFAULT_Q_TILE, attn_threads)
    if t <= gemv_rows:
        return _out_and_mlp(attn, residual, layer, eps, n_threads)
    return _out_and_mlp_batched(attn, residual, layer, eps, n_threads, norm_threads, nxt_layer)


@njit(cache=True)
def _layer(h, residual, has_residual, layer, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
           n_heads, head_dim, n_threads, attn_threads):
    prefetch_slots(layer[10], slots)
    qkv = _qkv(h, residual, has_residual, layer, eps, n_threads)
    attn = np.empty((h.shape[0], n_heads, head_dim), np.uint16)
    rope_attention_step(attn, qkv, positions, cos_sin, layer[10], slots, starts, lens, tables, scale, window, 0.0,
                        DEFAULT_Q_TILE, attn_threads)
    return _out_and_mlp(attn, residual, layer, eps, n_threads)


@njit(cache=True)
def decode_layers_dp(h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
                     n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, n_dec):
    """Every layer of a step on AVX512-BF16 CPUs: decode attention's scores on ``vdpbf16ps``
    (``attention_dpbf16.supports``), the linears on ``int4_gemv`` up to ``gemv_rows`` rows and on
    ``int4_dpbf16_matmul`` past them (the norms' rows split among ``norm_threads``). ``h [T, D]`` is
    the embeddings (float32 or bf16 bits), ``residual [T, D]`` float32 to fill; returns the last
    block's output (bf16 bits).

    The sequences from ``n_dec`` on may be prompt chunks (``_attend_with_prompts``; then no sliding
    window, and more than ``gemv_rows`` rows): a step that adds a new request to running ones saves
    ~10 us of Python and dispatch around each of ~10 calls a layer.

    A step of decodes only runs in one parallel region (``decode_layers_spin``): the same kernels
    and numbers."""
    if n_dec == starts.shape[0] - 1 and n_threads > 1:
        return decode_layers_spin(h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale, window,
                                  eps, n_heads, head_dim, n_threads, gemv_rows)
    n = len(layers)
    x = _layer_dp(h, residual, False, layers[0], positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
                  n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, n_dec, layers[1 % n])
    for i in range(1, n):
        x = _layer_dp(x, residual, True, layers[i], positions, cos_sin, slots, starts, lens, tables, scale, window,
                      eps, n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads, n_dec,
                      layers[(i + 1) % n])
    return x


@njit(cache=True)
def decode_layers(h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
                  n_heads, head_dim, n_threads, attn_threads, gemv_rows, norm_threads):
    """``decode_layers_dp`` with the AVX-512 decode attention (``paged_attention``), any cache dtype,
    for steps of up to ``int4_gemv``'s rows only (the last two arguments go unused)."""
    x = _layer(h, residual, False, layers[0], positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
               n_heads, head_dim, n_threads, attn_threads)
    for i in range(1, len(layers)):
        x = _layer(x, residual, True, layers[i], positions, cos_sin, slots, starts, lens, tables, scale, window,
                   eps, n_heads, head_dim, n_threads, attn_threads)
    return x
