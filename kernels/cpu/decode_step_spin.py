"""A decode step's whole stack of layers inside one parallel region.

``decode_layers_dp`` enters a parallel region (a ``prange`` loop) eight times a layer: the two norms,
the four int4 matmuls, attention and SiLU-and-mul, 240 times a step of this 30-layer model, each
entry and exit ~1-2 us on two cores while the other thread waits; and between them the calling
thread alone rotates q and k, writes the cache rows and plans attention's work (~10 us a layer).
Here the workers enter once a step and go through the same kernels as phases (``spin``): the rows
of norms, rotary, cache writes and SiLU-and-mul, the panels of each matmul and attention's work
items split among them as ``decode_layers_dp`` splits them among its threads, a spin wait between
phases (~30 ns). Attention's plan is made once a step: every layer's is the same.

Past ``int4_gemv``'s rows the matmuls keep the cores busy while DRAM idles, and the next layer's
attention then waits on DRAM for its cache blocks. So the gate/up and down matmuls also stream in the
next layer's decode blocks (``dpbf16.kv_runs``, a cache line a pair of products, into L2): attention
finds them in cache. 32 decodes at 262 keys on a Zen 4, in one process alternating: 28.1-29.4 against
29.7-30.7 ms a step (38.8 against 41.2 at 512 keys); the numbers are unchanged. Those matmuls also
read the weights widened to bf16 beforehand where the backend keeps such copies (``layer[15:19]``,
``Int4PackedWeight.wide_panels``) instead of widening every panel at every step: ~15 % of their time at
32 rows (a 32-decode step at ~250 keys 34.3 -> 30.4 ms median over a batch on a Zen 4), the same bits.

Every row, panel and item is computed by the same code as in ``decode_layers_dp`` whichever worker
takes it, so the output is the same bit for bit. One difference: a sequence of up to ``ROW_DECODES``
rows (the token it feeds back and the speculative drafts verified after it) attends row by row on
the decode kernels here, each row over the keys up to its own, where the op-by-op path takes it as a
prompt tile (8 two-row sequences among 32 added 13 ms to a step as tiles, 6-7 ms row by row), and
each row's numbers are those of decoding it alone. For steps of decodes only (``decode_layers_dp``
calls it for them): up to ``int4_gemv``'s rows on its kernel, each row range's int16 codes made once
as a phase, past them on ``int4_dpbf16_matmul``'s panels. ``decode_layers_amx`` calls it with its
AMX tile configuration: past ``int4_gemv``'s rows the matmuls take ``int4_amx_matmul``'s panels and
decode attention its tiles (``attention_amx``), the same numbers as that function's own path. There a
step may also hold prompt chunks after its decodes (a request joining running ones, or prompts alone):
their items go to ``prompt_attention_amx``'s tiles in the same attention phase, the numbers of the ops
one by one, without their ~80 Python calls and parallel regions (a joining 120-token prompt beside 31
decodes 68 -> 55 ms a step; a 128-token prompt alone 41 -> 30 ms).

Example::

    x = decode_layers_spin(h, residual, layers, positions, cos_sin, slots, starts, lens, tables,
                           scale, window, eps, n_heads, head_dim, threads, gemv_rows)
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from edgellm.kernels.cpu.activations import silu_and_mul
from edgellm.kernels.cpu.attention_amx import _run_items_amx
from edgellm.kernels.cpu.attention_dpbf16 import _run_items_dp
from edgellm.kernels.cpu.dpbf16 import PANEL, _int4_panels, kv_runs, run_lines
from edgellm.kernels.cpu.int4_amx import _panels as _amx_panels
from edgellm.kernels.cpu.int4_gemv import GROUP, MAX_ROWS, _block_rows, quantize_groups_int16_into
from edgellm.kernels.cpu.norm_rope import add_rms_norm, rope_neox_qk
from edgellm.kernels.cpu.paged_attention import (
    DEFAULT_Q_TILE,
    ROW_DECODES,
    _merge_partials,
    _plan,
    prefetch_slots,
    write_kv,
)
from edgellm.kernels.cpu.prompt_attention_amx import attend_prompt_items, prompt_scratch, prompt_width
from edgellm.kernels.cpu.prompt_attention_dp import _plan as _prompt_plan
from edgellm.kernels.cpu.spin import MAX_PARTS, SYNC_STRIDE, done_and_take, take
from edgellm.kernels.cpu.unmanaged import unmanaged

PHASES = 11  # a layer's: norm, qkv, rotary and cache rows, attention, merge, attention's int16 codes, o,
#              norm, gate/up, SiLU-and-mul, down


@njit(cache=True)
def _matmul(sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs, l0, l1, wide, nxt_wide):
    """``int4_dpbf16_matmul_then`` as a phase: its workers' panel ranges are the parts, each also
    streaming in its share of lines ``l0:l1`` of the cache runs ``runs`` of ``kv``; on the panels
    widened beforehand where ``wide`` has them (``nxt_wide``: the next weight's)."""
    x32 = x.view(np.uint32)
    n_panels = out.shape[1] // PANEL
    parts = max(1, min(n_workers, n_panels))
    nxt_panels = nxt_sz.shape[1] // PANEL
    nxt_parts = max(1, min(n_workers, nxt_panels))
    p = take(sync, phase, worker, parts)
    while p >= 0:
        q0 = p * nxt_panels // nxt_parts if p < nxt_parts else 0
        q1 = (p + 1) * nxt_panels // nxt_parts if p < nxt_parts else 0
        _int4_panels(x32, packed, sz, out, p * n_panels // parts, (p + 1) * n_panels // parts, nxt_packed, nxt_sz,
                     q0, q1, kv, runs, l0 + p * (l1 - l0) // parts, l0 + (p + 1) * (l1 - l0) // parts, wide, nxt_wide)
        p = done_and_take(sync, phase, worker, parts)


@njit(cache=True)
def _matmul_amx(sync, phase, worker, n_workers, x, packed, sz, out, cfg):
    """``int4_amx_matmul`` as a phase: its workers' ranges of 32-column panels are the parts. ``x``
    has whole 16-row A tiles (``out``'s rows, then padding), so no partial block needs a tail."""
    n_panels = out.shape[1] // 32
    parts = max(1, min(n_workers, n_panels))
    p = take(sync, phase, worker, parts)
    while p >= 0:
        _amx_panels(x, x, packed, sz, out, out.shape[0], cfg, p * n_panels // parts, (p + 1) * n_panels // parts)
        p = done_and_take(sync, phase, worker, parts)


def _batched(sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs, l0, l1, wide, nxt_wide,
             cfg):
    """The matmul of a step past ``int4_gemv``'s rows as a phase: on AMX tiles where ``cfg`` is a tile
    configuration, else on ``int4_dpbf16_matmul``'s panels (streaming in lines ``l0:l1`` of the cache
    runs ``runs`` of ``kv``). Chosen when compiled, so tile code is only generated for AMX CPUs."""
    raise NotImplementedError("only callable from Numba code")


@overload(_batched)
def _batched_impl(sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs, l0, l1, wide,
                  nxt_wide, cfg):
    if isinstance(cfg, (types.NoneType, types.Omitted)):
        return (lambda sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs, l0, l1, wide,
                nxt_wide, cfg: _matmul(sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs,
                                       l0, l1, wide, nxt_wide))
    return (lambda sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs, l0, l1, wide,
            nxt_wide, cfg: _matmul_amx(sync, phase, worker, n_workers, x, packed, sz, out, cfg))


def _items(attn, q_rot, kv, starts, lens, tables, scale, window, items, order, partials, part, parts, cfg):
    """Attention's work items dealt to ``part`` of ``parts``: decodes on AMX tiles where ``cfg`` is a
    tile configuration (``attention_amx``), else on AVX512-BF16 (``attention_dpbf16``)."""
    raise NotImplementedError("only callable from Numba code")


@overload(_items)
def _items_impl(attn, q_rot, kv, starts, lens, tables, scale, window, items, order, partials, part, parts, cfg):
    if isinstance(cfg, (types.NoneType, types.Omitted)):
        return (lambda attn, q_rot, kv, starts, lens, tables, scale, window, items, order, partials, part, parts,
                cfg: _run_items_dp(attn, q_rot, kv, starts, lens, tables, scale, window, 0.0, items, order, partials,
                                   part, parts))
    return (lambda attn, q_rot, kv, starts, lens, tables, scale, window, items, order, partials, part, parts, cfg:
            _run_items_amx(attn, q_rot, kv, starts, lens, tables, scale, window, 0.0, items, order, partials, part,
                           parts, cfg))


def _prompt_items(attn, q_rot, kv, starts, lens, tables, scale, prompts, scratch, part, parts, cfg):
    """Prompt chunks' items (``prompts = (items, order)`` of ``prompt_attention_dp._plan``) dealt to
    ``part``, on ``prompt_attention_amx``'s tiles where ``cfg`` is a tile configuration; without one
    a step has none (``decode_layers_dp`` runs steps with prompt rows layer by layer)."""
    raise NotImplementedError("only callable from Numba code")


@overload(_prompt_items)
def _prompt_items_impl(attn, q_rot, kv, starts, lens, tables, scale, prompts, scratch, part, parts, cfg):
    if isinstance(cfg, (types.NoneType, types.Omitted)):
        return lambda attn, q_rot, kv, starts, lens, tables, scale, prompts, scratch, part, parts, cfg: None
    return (lambda attn, q_rot, kv, starts, lens, tables, scale, prompts, scratch, part, parts, cfg:
            attend_prompt_items(attn, q_rot, kv, starts, lens, tables, scale, prompts[0], prompts[1], part, parts,
                                scratch, cfg))


@njit(cache=True)
def _gemv(sync, phase, worker, n_workers, codes, packed, sz, out):
    """``int4_gemv`` as a phase on rows already in int16 codes (``codes = (xq, xs, xsum)``): its
    workers' runs of 64-column blocks are the parts."""
    xq, xs, xsum = codes
    m = xq.shape[0]
    blocks = packed.shape[0]
    parts = max(1, min(n_workers, blocks))
    p = take(sync, phase, worker, parts)
    while p >= 0:
        for b in range(p * blocks // parts, (p + 1) * blocks // parts):
            for r0 in range(0, m, MAX_ROWS):
                r1 = min(m, r0 + MAX_ROWS)
                _block_rows(packed, b, xq[r0:r1], xs[r0:r1], xsum[r0:r1], r1 - r0, sz, out[r0:r1])
        p = done_and_take(sync, phase, worker, parts)


@njit(cache=True)
def _linear(sync, phase, worker, n_workers, gemv, x, codes, packed, sz, gemv_sz, out, nxt_packed, nxt_sz, kv, runs,
            l0, l1, wide, nxt_wide, cfg):
    """A linear as a phase: ``_gemv`` (on the scale-zeros ``gemv_sz``, block by block) where ``gemv``,
    else ``_batched`` (on ATen's ``sz``; streaming in lines ``l0:l1`` of the cache runs ``runs`` of
    ``kv``)."""
    if gemv:
        _gemv(sync, phase, worker, n_workers, codes, packed, gemv_sz, out)
    else:
        _batched(sync, phase, worker, n_workers, x, packed, sz, out, nxt_packed, nxt_sz, kv, runs, l0, l1, wide,
                 nxt_wide, cfg)


@njit(cache=True)
def _codes(x, codes, r0, r1):
    """Rows ``r0:r1`` of bf16 bits ``x`` into ``codes``, as ``quantize_groups_int16`` makes them; nothing
    where ``codes`` have no rows (steps past ``int4_gemv``'s rows, whose matmuls take bf16)."""
    xq, xs, xsum = codes
    if xq.shape[0] == 0:
        return
    xf = (x[r0:r1].astype(np.uint32) << np.uint32(16)).view(np.float32)
    quantize_groups_int16_into(xf, xq[r0:r1], xs[r0:r1], xsum[r0:r1])


@njit(cache=True)
def _norm(sync, phase, worker, parts, src, residual, weight, eps, x, codes, has_residual, kv, slots, ask):
    """``add_rms_norm`` (then the rows' int16 codes, for ``_gemv``) as a phase of row ranges, each
    first asking (with ``ask``) for the cache lines its rows' new K and V go to (``prefetch_slots``),
    as ``decode_layers_dp`` does before qkv."""
    t = src.shape[0]
    p = take(sync, phase, worker, parts)
    while p >= 0:
        r0, r1 = p * t // parts, (p + 1) * t // parts
        if ask:
            prefetch_slots(kv, slots[r0:r1])
        add_rms_norm(src[r0:r1], residual[r0:r1], weight, eps, x[r0:r1], has_residual)
        _codes(x, codes, r0, r1)
        p = done_and_take(sync, phase, worker, parts)


@njit(cache=True)
def _attention(sync, phase, worker, n_workers, qkv, positions, cos_sin, kv, slots, starts, lens, tables, scale,
               window, q_rot, k_rot, attn, items, order, partials, prompts, scratch, cfg):
    """Three phases from ``phase``: rotary and the cache rows (``rope_and_write``, row ranges), the
    work items (``_items``' and ``_prompt_items``' deals to each part), and the merge of split
    decodes (one part)."""
    t = qkv.shape[0]
    n_q, n_k, dim = q_rot.shape[1], k_rot.shape[1], q_rot.shape[2]
    rows = min(n_workers, t)
    p = take(sync, phase, worker, rows)
    while p >= 0:
        r0, r1 = p * t // rows, (p + 1) * t // rows
        rope_neox_qk(qkv[r0:r1], positions[r0:r1], cos_sin, q_rot[r0:r1], k_rot[r0:r1])
        write_kv(kv, k_rot[r0:r1], qkv[r0:r1, (n_q + n_k) * dim:], slots[r0:r1])
        p = done_and_take(sync, phase, worker, rows)
    parts = max(1, min(n_workers, order.shape[0] + prompts[1].shape[0]))
    p = take(sync, phase + 1, worker, parts)
    while p >= 0:
        _items(attn, q_rot, kv, starts, lens, tables, scale, window, items, order, partials, p, parts, cfg)
        _prompt_items(attn, q_rot, kv, starts, lens, tables, scale, prompts, scratch, p, parts, cfg)
        p = done_and_take(sync, phase + 1, worker, parts)
    if partials.shape[0]:  # long contexts' key ranges
        p = take(sync, phase + 2, worker, 1)
        while p >= 0:
            _merge_partials(attn, q_rot, items, partials, n_k)
            p = done_and_take(sync, phase + 2, worker, 1)


@njit(cache=True)
def _worker(worker, n_workers, sync, gemv, h, residual, layers, positions, cos_sin, slots, starts, lens, tables,
            scale, window, eps, x, qkv, q_rot, k_rot, attn, o, gate_up, act, out, codes_d, codes_a, codes_i, items,
            order, partials, prompts, runs, cfg):
    x, qkv, q_rot, k_rot, attn, o = unmanaged(x), unmanaged(qkv), unmanaged(q_rot), unmanaged(k_rot), unmanaged(
        attn), unmanaged(o)
    gate_up, act, out, residual = unmanaged(gate_up), unmanaged(act), unmanaged(out), unmanaged(residual)
    t = h.shape[0]
    n = len(layers)
    rows = min(n_workers, t)
    attn2d = attn.reshape(attn.shape[0], attn.shape[1] * attn.shape[2])
    scratch = prompt_scratch(layers[0][10], prompts[2])  # made once, used by every layer
    lines = run_lines(runs)
    for i in range(n):
        layer = layers[i]
        nxt = layers[(i + 1) % n]
        kv = layer[10]
        # the next layer's cache blocks stream in during this one's gate/up (2/3 of them) and down
        ask = lines if i + 1 < n else 0
        split = 2 * ask // 3
        ph = i * PHASES
        if i == 0:
            _norm(sync, ph, worker, rows, h, residual, layer[0], eps, x, codes_d, False, kv, slots, True)
        else:
            _norm(sync, ph, worker, rows, out, residual, layer[0], eps, x, codes_d, True, kv, slots, True)
        _linear(sync, ph + 1, worker, n_workers, gemv, x, codes_d, layer[1], layer[2], layer[11], qkv, layer[3],
                layer[4], kv, runs, 0, 0, layer[15], layer[16], cfg)
        _attention(sync, ph + 2, worker, n_workers, qkv, positions, cos_sin, kv, slots, starts, lens, tables, scale,
                   window, q_rot, k_rot, attn, items, order, partials, prompts, scratch, cfg)
        if gemv:
            p = take(sync, ph + 5, worker, rows)
            while p >= 0:
                _codes(attn2d, codes_a, p * t // rows, (p + 1) * t // rows)
                p = done_and_take(sync, ph + 5, worker, rows)
        _linear(sync, ph + 6, worker, n_workers, gemv, attn2d, codes_a, layer[3], layer[4], layer[12], o, layer[6],
                layer[7], kv, runs, 0, 0, layer[16], layer[17], cfg)
        _norm(sync, ph + 7, worker, rows, o, residual, layer[5], eps, x, codes_d, True, kv, slots, False)
        _linear(sync, ph + 8, worker, n_workers, gemv, x, codes_d, layer[6], layer[7], layer[13], gate_up, layer[8],
                layer[9], nxt[10], runs, 0, split, layer[17], layer[18], cfg)
        p = take(sync, ph + 9, worker, rows)
        while p >= 0:
            r0, r1 = p * t // rows, (p + 1) * t // rows
            silu_and_mul(gate_up[r0:r1], act[r0:r1])
            _codes(act, codes_i, r0, r1)
            p = done_and_take(sync, ph + 9, worker, rows)
        _linear(sync, ph + 10, worker, n_workers, gemv, act, codes_i, layer[8], layer[9], layer[14], out, nxt[1],
                nxt[2], nxt[10], runs, split, ask, layer[18], nxt[15], cfg)


@njit(cache=True)
def _codes_for(rows, k):
    """Empty int16 codes ``(xq [rows, k], xs, xsum [rows, k / 32])`` for ``_gemv``."""
    return (np.empty((rows, k), np.int16), np.empty((rows, k // GROUP), np.float32),
            np.empty((rows, k // GROUP), np.float32))


@njit(cache=True, parallel=True)
def decode_layers_spin(h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale, window, eps,
                       n_heads, head_dim, n_threads, gemv_rows, cfg=None, n_dec=-1):
    """``decode_layers_dp`` for a step of decodes only (one query row a sequence, ``h [T, D]``), its
    ``n_threads`` workers in one parallel region: up to ``gemv_rows`` rows the linears on
    ``int4_gemv``'s kernel, past them on ``int4_dpbf16_matmul``'s. The same arguments (the thread
    counts for attention and the norms are ``n_threads``) and the same output, bit for bit.

    With an AMX tile configuration ``cfg`` it is ``decode_layers_amx``'s step instead: matmuls past
    ``gemv_rows`` on ``int4_amx_matmul``'s panels, decode attention on tiles; and then the sequences
    from ``n_dec`` on (when 0 or more) may be prompt chunks, attended on ``prompt_attention_amx``'s
    tiles (no sliding window): the numbers of ``CPUBackend.attention`` for such a step."""
    t = h.shape[0]
    gemv = t <= gemv_rows
    # AMX matmuls read their inputs in whole 16-row tiles: those get zero rows up to a multiple of 16
    tp = t if cfg is None or gemv else -(-t // 16) * 16
    first = layers[0]
    n_k = first[10].shape[2]
    d, inter = first[0].shape[0], first[7].shape[1] // 2
    x = np.empty((tp, d), np.uint16)
    qkv = np.empty((t, first[2].shape[1]), np.uint16)
    q_rot = np.empty((t, n_heads, head_dim), np.float32)
    k_rot = np.empty((t, n_k, head_dim), np.float32)
    attn = np.empty((tp, n_heads, head_dim), np.uint16)
    o = np.empty((t, first[4].shape[1]), np.uint16)
    gate_up = np.empty((t, 2 * inter), np.uint16)
    act = np.empty((tp, inter), np.uint16)
    x[t:], attn[t:], act[t:] = 0, 0, 0  # only the padding rows: the workers write every other row
    out = np.empty((t, first[9].shape[1]), np.uint16)
    coded = t if gemv else 0
    codes_d, codes_a, codes_i = _codes_for(coded, d), _codes_for(coded, n_heads * head_dim), _codes_for(coded, inter)
    n_seqs = starts.shape[0] - 1
    nd = n_seqs if n_dec < 0 or cfg is None else n_dec
    items, order, partials = _plan(starts[:nd + 1], lens[:nd], n_k, DEFAULT_Q_TILE, window, n_heads // n_k, head_dim,
                                   ROW_DECODES)
    p_items, p_order = _prompt_plan(starts, lens, nd, n_seqs, n_k)
    prompts = (p_items, p_order, prompt_width(lens, nd, n_seqs))
    workers = max(1, min(n_threads, MAX_PARTS))
    # the decodes' cache blocks, for the batched int4 matmuls to stream in (none for int4_gemv or AMX)
    runs = kv_runs(first[10], lens, tables, nd, window) if not gemv and cfg is None else np.zeros((0, 3), np.int64)
    sync = np.zeros(len(layers) * PHASES * SYNC_STRIDE, np.int64)
    for w in prange(workers):
        _worker(w, workers, sync, gemv, h, residual, layers, positions, cos_sin, slots, starts, lens, tables, scale,
                window, eps, x, qkv, q_rot, k_rot, attn, o, gate_up, act, out, codes_d, codes_a, codes_i, items,
                order, partials, prompts, runs, cfg)
    return out
