"""GGUF files: the real SmolLM2 (config, formats kept, exact match with transformers), synthetic tiny
files (dtypes, q/k un-permutation, rope scaling) and damaged copies (always a ModelLoadError)."""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, RopeScalingType

from edgellm.loader import ModelLoadError, load_model
from edgellm.loader.gguf import fast_permute_rows, load_gguf, reverse_permutation
from edgellm.loader.gguf_file import read_header
from edgellm.quant import QuantizedTensor, permute_rows, quantize_rows

# ---------------------------------------------------------------- synthetic files

H, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 128, 32


def llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to attn_q/attn_k rows (its interleaved rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path, arch: str = "llama", qtype: str = "Q4_0", tied: bool = False, rope_linear: float | None = None
) -> dict[str, torch.Tensor]:
    """Write a one-layer model; return the dense weights (HF names) the loader must reproduce."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H // HEADS)
    if rope_linear:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_linear)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(3)
    ref: dict[str, torch.Tensor] = {}

    def quant(name: str, hf: str, x: torch.Tensor, fmt: str, n_head: int | None = None) -> None:
        # quantization is per row, so quantize-then-permute rows == permute-then-quantize
        stored = llamacpp_permute(x, n_head) if n_head and arch != "qwen2" else x
        w.add_tensor(name, quantize_rows(fmt, stored).numpy(), raw_dtype=GGMLQuantizationType[fmt])
        ref[hf] = QuantizedTensor(fmt, quantize_rows(fmt, x), tuple(x.shape)).dequantize()

    def dense(name: str, hf: str, x: torch.Tensor, dtype: torch.dtype) -> None:
        y = x.to(dtype)
        if dtype == torch.bfloat16:
            w.add_tensor(name, y.view(torch.uint16).numpy(), raw_dtype=GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, y.numpy())
        ref[hf] = y.float()

    a = "model.layers.0."
    quant("token_embd.weight", "model.embed_tokens.weight", rnd(VOCAB, H), "Q8_0")
    dense("blk.0.attn_norm.weight", a + "input_layernorm.weight", rnd(H), torch.float32)
    quant("blk.0.attn_q.weight", a + "self_attn.q_proj.weight", rnd(H, H), qtype, HEADS)
    quant("blk.0.attn_k.weight", a + "self_attn.k_proj.weight", rnd(KV_HEADS * 16, H), qtype, KV_HEADS)
    dense("blk.0.attn_v.weight", a + "self_attn.v_proj.weight", rnd(KV_HEADS * 16, H), torch.float16)
    dense("blk.0.attn_output.weight", a + "self_attn.o_proj.weight", rnd(H, H), torch.bfloat16)
    quant("blk.0.ffn_gate.weight", a + "mlp.gate_proj.weight", rnd(FFN, H), qtype)
    quant("blk.0.ffn_up.weight", a + "mlp.up_proj.weight", rnd(FFN, H), "Q4_1")
    quant("blk.0.ffn_down.weight", a + "mlp.down_proj.weight", rnd(H, FFN), "Q8_0")
    dense("blk.0.ffn_norm.weight", a + "post_attention_layernorm.weight", rnd(H), torch.float32)
    dense("output_norm.weight", "model.norm.weight", rnd(H), torch.float32)
    if not tied:
        dense("output.weight", "lm_head.weight", rnd(VOCAB, H), torch.float16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_file_round_trips_with_qk_unpermuted(tmp_path, qtype, arch):
    path = tmp_path / "tiny.gguf"
    ref = write_tiny_gguf(path, arch=arch, qtype=qtype)
    config, weights, _ = load_gguf(str(path))
    assert (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim) == (H, HEADS, KV_HEADS, 16)
    assert (config.vocab_size, config.num_layers, config.intermediate_size) == (VOCAB, 1, FFN)
    assert config.bos_token_id == 1 and config.eos_token_ids == [2, 3]
    assert not config.tie_word_embeddings and config.rope_scaling is None
    assert set(weights) == set(ref)
    for name, want in ref.items():
        got = weights[name]
        got = got.dequantize() if isinstance(got, QuantizedTensor) else got.float()
        assert torch.equal(got, want), name
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, QuantizedTensor) and q.fmt == qtype
    assert weights["model.layers.0.self_attn.v_proj.weight"].dtype == torch.float16
    assert weights["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16

    _, dense, _ = load_gguf(str(path), dequantize=True)
    for name, want in ref.items():
        assert dense[name].dtype == torch.float32
        assert torch.equal(dense[name], want), name


def test_tied_file_and_linear_rope_scaling(tmp_path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tied=True, rope_linear=4.0)
    config, weights, _ = load_gguf(str(path))
    assert config.tie_word_embeddings and "lm_head.weight" not in weights
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_reverse_permutation_undoes_llamacpp_and_matches_quant_permute_rows():
    w = torch.randn(6 * 16, 32)
    perm = reverse_permutation(w.shape[0], 6)
    assert torch.equal(llamacpp_permute(w, 6)[perm], w)
    qt = QuantizedTensor("Q4_1", quantize_rows("Q4_1", w), tuple(w.shape))
    assert torch.equal(fast_permute_rows(qt, perm).data, permute_rows(qt, perm).data)
    assert torch.equal(fast_permute_rows(w, perm), permute_rows(w, perm))


def test_unsupported_architecture_names_file_and_choices(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path))
    assert str(e.value) == f"unsupported architecture gpt2 in {path}; supported: llama, mistral, qwen2"


def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path):
    path = tmp_path / "q5k.gguf"
    w = GGUFWriter(str(path), "llama")
    for add, v in [(w.add_block_count, 1), (w.add_embedding_length, 256), (w.add_feed_forward_length, 256),
                   (w.add_head_count, 4)]:
        add(v)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 176), np.uint8), raw_dtype=GGMLQuantizationType.Q5_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=rf"{path}: tensor token_embd\.weight has unsupported type Q5_K"):
        load_model(str(path))


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(str(smollm2_gguf))


@pytest.mark.slow
def test_smollm2_config(smollm2):
    c = smollm2.config
    assert c.architecture == "llama"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.slow
def test_smollm2_formats_stay_quantized_and_memory_is_bounded(smollm2):
    w = smollm2.weights
    assert len(w) == 30 * 9 + 2
    emb = w["model.embed_tokens.weight"]
    assert isinstance(emb, QuantizedTensor) and emb.fmt == "Q8_0" and emb.shape == (49152, 576)
    q = w["model.layers.7.self_attn.q_proj.weight"]
    assert isinstance(q, QuantizedTensor) and q.fmt == "Q4_1" and q.shape == (576, 576)
    assert w["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)
    assert w["model.layers.7.mlp.down_proj.weight"].shape == (576, 1536)
    norm = w["model.norm.weight"]
    assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float32
    assert smollm2.file_bytes == smollm2_file_size(smollm2.path)
    assert smollm2.weight_bytes <= 1.3 * smollm2.file_bytes
    # every tensor owns its memory: no mapping of the file, no shared giant buffer kept alive
    for t in w.values():
        data = t.data if isinstance(t, QuantizedTensor) else t
        assert data.untyped_storage().nbytes() == data.numel() * data.element_size()


def smollm2_file_size(path: str) -> int:
    return Path(path).stat().st_size


@pytest.mark.slow
def test_smollm2_matches_transformers_exactly(smollm2, smollm2_gguf, smollm2_hf_dir):
    from safetensors.torch import load_file

    hf = load_file(str(smollm2_hf_dir / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight"):
        assert torch.equal(smollm2.weights[name].dequantize(), hf[name]), name
    dense = load_model(str(smollm2_gguf), dequantize=True).weights
    assert set(dense) == set(hf)
    for name, want in hf.items():
        assert dense[name].dtype == torch.float32
        assert torch.equal(dense[name], want), name


@pytest.mark.slow
def test_header_parser_agrees_with_gguf_reader(smollm2_gguf):
    ours = read_header(str(smollm2_gguf))
    theirs = GGUFReader(str(smollm2_gguf))
    assert ours.data_offset == theirs.data_offset
    assert [(t.name, t.offset, t.nbytes, t.ggml_type) for t in ours.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes), int(t.tensor_type)) for t in theirs.tensors
    ]
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        mine = ours.metadata[key]
        mine = mine.tolist() if isinstance(mine, np.ndarray) else mine
        assert mine == pytest.approx(value) if isinstance(value, float) else mine == value, key


@pytest.mark.slow
def test_smollm2_weights_load_fast(smollm2_gguf):
    load_gguf(str(smollm2_gguf))  # warm the page cache
    t0 = time.perf_counter()
    load_gguf(str(smollm2_gguf))
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"reading SmolLM2's weights took {elapsed:.2f} s (about 0.1 s expected)"


# ---------------------------------------------------------------- damaged copies of the real file

PREFIX = 2_000_000  # past the 1.8 MB header: enough for every header-level corruption


@pytest.fixture(scope="module")
def real_prefix(smollm2_gguf) -> bytes:
    with open(smollm2_gguf, "rb") as f:
        return f.read(PREFIX)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", r"not a GGUF file"),
        ("bad_magic", r"not a GGUF file \(starts with b'GGML'"),
        ("cut_in_header", r"truncated GGUF header: expected at least \d+ bytes, found 1000"),
        ("cut_in_data", r"truncated: expected 98362432 bytes, found 2000000"),
        ("version_99", r"unsupported GGUF version 99"),
        ("huge_string", r"truncated GGUF header: expected at least \d+ bytes, found 2000000"),
        ("garbage_after_magic", r"(corrupt|truncated|unsupported)"),
    ],
)
def test_damaged_file_gives_model_load_error_naming_it(tmp_path, smollm2_gguf, real_prefix, case, message):
    data = bytearray(real_prefix)
    if case == "empty":
        data = bytearray()
    elif case == "bad_magic":
        data[:4] = b"GGML"
    elif case == "cut_in_header":
        data = data[:1000]
    elif case == "version_99":
        data[4:8] = (99).to_bytes(4, "little")
    elif case == "huge_string":  # length of the first metadata key
        data[24:32] = (2**62).to_bytes(8, "little")
    elif case == "garbage_after_magic":
        data = bytearray(b"GGUF" + (3).to_bytes(4, "little") + random.Random(0).randbytes(5000))
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=message) as e:
        load_model(str(path))
    assert str(e.value).startswith(str(path)), str(e.value)
    assert e.value.__cause__ is None or isinstance(e.value.__cause__, ModelLoadError)


@pytest.mark.slow
def test_last_byte_missing_is_reported(tmp_path, smollm2_gguf):
    path = tmp_path / "short.gguf"
    shutil.copyfile(smollm2_gguf, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(ModelLoadError, match=rf"{path}: truncated: expected {size} bytes, found {size - 1}"):
        load_model(str(path))


@pytest.mark.slow
def test_random_header_corruption_never_escapes_as_another_error(tmp_path, smollm2_gguf, real_prefix):
    rng = random.Random(1234)
    header_end = read_header(str(smollm2_gguf)).data_offset
    for i in range(40):
        data = bytearray(real_prefix)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(4, header_end)] = rng.randrange(256)
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(bytes(data))
        try:
            read_header(str(path))
        except ModelLoadError as e:
            assert str(path) in str(e)
