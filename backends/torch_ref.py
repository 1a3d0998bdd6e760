"""The generic torch backend: plain ATen ops on any torch device; the reference in every kernel test."""
from __future__ import annotations

from typing import Any

import psutil
import torch
import torch.nn.functional as F

from edgellm.backends.base import AttentionMetadata, Backend, Capabilities
from edgellm.quant import QuantizedTensor
from edgellm.quant.kv_int8 import dequantize_kv_rows, quantize_kv_rows


class TorchBackend(Backend):
    name = "torch"

    def capabilities(self) -> Capabilities:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = psutil.virtual_memory().available
        return Capabilities(
            name=self.name,
            device=str(self.device),
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            default_dtype=torch.float32,
            kv_cache_bytes_available=int(free),
            native_quant_formats=(),
        )

    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(weight, QuantizedTensor):
            weight = weight.dequantize(x.dtype).to(x.device)
        return F.linear(x, weight, bias)

    def embedding(self, ids: torch.Tensor, weight: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(weight, QuantizedTensor):
            return weight.rows(ids.cpu(), dtype).to(self.device)
        return F.embedding(ids, weight).to(dtype)

    def rms_norm(self, x, weight, eps, residual=None, out_dtype=None):
        dtype = out_dtype or x.dtype
        if residual is not None:
            x = (x.to(residual.dtype) + residual) if x.dtype != residual.dtype else x + residual
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (out * weight.float()).to(dtype), x

    def rotary(self, q, k, positions, cos_sin):
        cs = cos_sin[positions]  # [T, D]
        half = cs.shape[-1] // 2
        cos, sin = cs[:, None, :half], cs[:, None, half:]

        def rot(x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            x1, x2 = xf[..., :half], xf[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

        return rot(q), rot(k)

    def act_and_mul(self, x, act="silu"):
        d = x.shape[-1] // 2
        gate, up = x[..., :d], x[..., d:]
        if act == "silu":
            return F.silu(gate) * up
        if act in ("gelu_pytorch_tanh", "gelu_tanh"):
            return F.gelu(gate, approximate="tanh") * up
        if act == "gelu":
            return F.gelu(gate) * up
        raise ValueError(f"unsupported activation {act!r}")

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata):
        bs = meta.block_size
        blocks, offs = meta.slot_mapping // bs, meta.slot_mapping % bs
        store = quantize_kv_rows if kv_cache.dtype == torch.int8 else (lambda x: x.to(kv_cache.dtype))
        kv_cache[0, blocks, :, offs] = store(k)
        kv_cache[1, blocks, :, offs] = store(v)

    def attention(self, q, k, v, kv_cache, meta, scale, sliding_window=None, soft_cap=None):
        self.write_kv(k, v, kv_cache, meta)
        out = torch.empty(q.shape, dtype=v.dtype, device=q.device)
        n_heads, n_kv = q.shape[1], k.shape[1]
        group = n_heads // n_kv
        bs = meta.block_size
        # the reference gathers the context; optimized backends read the blocks in place
        load = dequantize_kv_rows if kv_cache.dtype == torch.int8 else (lambda x: x.float())
        for i in range(meta.num_seqs):
            qs, qe = meta.query_start_loc_list[i], meta.query_start_loc_list[i + 1]
            ctx = meta.seq_lens_list[i]
            nb = (ctx + bs - 1) // bs
            blocks = meta.block_tables[i, :nb].long()
            kc = load(kv_cache[0, blocks].permute(1, 0, 2, 3).reshape(n_kv, nb * bs, -1)[:, :ctx])
            vc = load(kv_cache[1, blocks].permute(1, 0, 2, 3).reshape(n_kv, nb * bs, -1)[:, :ctx])
            kc = kc.repeat_interleave(group, dim=0)
            vc = vc.repeat_interleave(group, dim=0)
            qi = q[qs:qe].float().transpose(0, 1)  # [H, Q, D]
            scores = qi @ kc.transpose(1, 2) * scale  # [H, Q, ctx]
            if soft_cap:
                scores = soft_cap * torch.tanh(scores / soft_cap)
            qpos = torch.arange(ctx - (qe - qs), ctx, device=q.device)[:, None]
            kpos = torch.arange(ctx, device=q.device)[None, :]
            mask = kpos > qpos
            if sliding_window:
                mask |= kpos <= qpos - sliding_window
            scores.masked_fill_(mask, float("-inf"))
            out[qs:qe] = (scores.softmax(-1) @ vc).transpose(0, 1).to(v.dtype)
        return out
