"""GGUF metadata, vocabulary and tensors as written, read back with gguf-py's own reader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edge_ms import gguf_export
from edge_ms.errors import EdgeMSError
from edge_ms.safetensors_io import load_tensor, open_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["tiny-qwen2", "tiny-qwen2-sharded"]


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("model", MODELS)
def test_params_from_both_config_styles(model):
    # tiny-qwen2 is written the 4.x way (top-level rope_theta), the sharded one the 5.x way.
    cfg = json.loads((FIXTURES / model / "config.json").read_text())
    p = gguf_export.read_params(FIXTURES / model / "config.json")
    assert p.rope_theta == 10000.0
    assert ("rope_theta" in cfg) == (model == "tiny-qwen2")
    assert (p.n_layer, p.hidden_size, p.vocab_size) == (4, cfg["hidden_size"], 512)
    assert (p.n_head, p.n_head_kv, p.ffn_size, p.context_length) == (4, 2, cfg["intermediate_size"], 4096)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c.update(architectures=["LlamaForCausalLM"]),
            "architecture ['LlamaForCausalLM'] is not supported",
        ),
        (lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
        (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
        (lambda c: c.pop("rope_theta"), "rope_theta"),
        (lambda c: c.update(num_hidden_layers=1), "at least 2"),
        (lambda c: c.update(hidden_size="256"), "hidden_size must be a positive integer"),
    ],
)
def test_unsupported_config_is_refused(tmp_path, edit, message):
    cfg = json.loads((FIXTURES / "tiny-qwen2" / "config.json").read_text())
    edit(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(EdgeMSError) as err:
        gguf_export.read_params(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_vocab_types_padding_and_specials():
    tok = json.loads((FIXTURES / "tiny-qwen2" / "tokenizer.json").read_text())
    tcfg = json.loads((FIXTURES / "tiny-qwen2" / "tokenizer_config.json").read_text())
    v = gguf_export.read_vocab(FIXTURES / "tiny-qwen2", 512)
    n_tok = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    assert len(v.tokens) == len(v.types) == 512
    assert v.tokens[n_tok:] == [f"[PAD{i}]" for i in range(n_tok, 512)]
    assert set(v.types[n_tok:]) == {gguf.TokenType.UNUSED}
    for added in tok["added_tokens"]:
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        assert (v.tokens[added["id"]], v.types[added["id"]]) == (added["content"], kind)
    assert v.types[v.ids["<think>"]] == gguf.TokenType.USER_DEFINED  # R1-Distill: not special
    assert len(v.merges) == len(tok["model"]["merges"]) and all(m.count(" ") == 1 for m in v.merges)
    assert v.bos_id == v.ids["<｜begin▁of▁sentence｜>"] and v.eos_id == v.ids["<｜end▁of▁sentence｜>"]
    assert v.add_bos is True and v.chat_template == tcfg["chat_template"]
    assert tok["normalizer"] == {"type": "NFC"} and v.normalizer == ("NFC",)


def test_non_qwen2_pretokenizer_is_refused(tmp_path):
    hf = tmp_path / "m"
    shutil.copytree(FIXTURES / "tiny-qwen2", hf)
    tok = json.loads((hf / "tokenizer.json").read_text())
    # GPT-2's split: tokenizes digits and contractions differently from Qwen2's.
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = (
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    )
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EdgeMSError, match=r"tokenizer.json: pre-tokenizer is not Qwen2's"):
        gguf_export.read_vocab(hf, 512)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_written_gguf_metadata_and_tensors(tmp_path, quant):
    hf = FIXTURES / "tiny-qwen2-sharded"
    params = gguf_export.read_params(hf / "config.json")
    vocab = gguf_export.read_vocab(hf, params.vocab_size)
    entries = open_checkpoint(hf)
    plan = gguf_export.plan_tensors(entries, params)
    path = tmp_path / "m.gguf"
    gguf_export.write_gguf(path, "tiny-qwen2-sharded", params, vocab, plan, "0123456789abcdef", quant)

    r = gguf.GGUFReader(path)
    expect = {
        "general.architecture": "qwen2",
        "general.name": "tiny-qwen2-sharded",
        "qwen2.context_length": 4096,
        "qwen2.embedding_length": 64,
        "qwen2.block_count": 4,
        "qwen2.feed_forward_length": 128,
        "qwen2.attention.head_count": 4,
        "qwen2.attention.head_count_kv": 2,
        "qwen2.rope.freq_base": 10000.0,
        "general.file_type": 0 if quant == "f32" else 1,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": vocab.bos_id,
        "tokenizer.ggml.eos_token_id": vocab.eos_id,
        "tokenizer.ggml.add_bos_token": True,
        "edge_ms.backbone_fingerprint": "0123456789abcdef",
        "edge_ms.tokenizer.normalizer": "NFC",  # the fixture's tokenizer.json declares NFC
    }
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _field(r, "tokenizer.ggml.tokens") == vocab.tokens
    assert _field(r, "tokenizer.ggml.token_type") == vocab.types

    by_name = {hf_name: e for hf_name, e in entries.items()}
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, 4)
    gguf_to_hf = {name_map.get_name(n, try_suffixes=(".weight", ".bias")): n for n in by_name}
    assert len(r.tensors) == len(entries) == 4 * 12 + 3
    for t in r.tensors:
        src = load_tensor(by_name[gguf_to_hf[t.name]])
        want = (
            gguf.GGMLQuantizationType.F16
            if quant == "f16" and src.ndim == 2
            else gguf.GGMLQuantizationType.F32
        )
        assert t.tensor_type == want, t.name  # norms and biases stay f32
        data = np.asarray(t.data).reshape(src.shape)
        np.testing.assert_array_equal(data, src.astype(data.dtype))


def _tiny_f16(path: Path) -> Path:
    """The tiny-qwen2 fixture as an f16 GGUF with fingerprint "fp"."""
    hf = FIXTURES / "tiny-qwen2"
    params = gguf_export.read_params(hf / "config.json")
    vocab = gguf_export.read_vocab(hf, params.vocab_size)
    plan = gguf_export.plan_tensors(open_checkpoint(hf), params)
    gguf_export.write_gguf(path, "m", params, vocab, plan, "fp", "f16")
    return path


def test_quantize_writes_the_requested_types(tmp_path):
    f16 = _tiny_f16(tmp_path / "m-f16.gguf")
    types = {}
    for quant in ("q8_0", "q4_k_m"):
        out = tmp_path / f"m-{quant}.gguf"
        gguf_export.quantize(f16, out, quant)
        r = gguf.GGUFReader(out)
        types[quant] = {t.tensor_type.name for t in r.tensors}
        assert _field(r, "edge_ms.backbone_fingerprint") == "fp"  # the quantizer keeps custom keys
        assert out.stat().st_size < f16.stat().st_size
    assert types["q8_0"] == {"Q8_0", "F32"}
    assert "Q4_K" in types["q4_k_m"] and "F16" not in types["q4_k_m"]


def test_tokenize_with_written_vocab(tmp_path):
    path = _tiny_f16(tmp_path / "m.gguf")
    ref = json.loads((FIXTURES / "reference" / "tiny-qwen2.json").read_text())
    assert gguf_export.tokenize(path, ".\n\n") == tuple(ref["spec"]["step_delimiter_ids"])
    assert gguf_export.tokenize(path, "<think>", parse_special=False) == (ref["spec"]["think_start_id"],)


_MEASURE = textwrap.dedent(
    """
    import sys
    from edge_ms.convert import convert
    import llama_cpp, onnxruntime  # imported first so that their pages are in the baseline

    def status(key):
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    convert(sys.argv[1], sys.argv[2], sys.argv[3])
    print(base, status("VmHWM"))
    """
)


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """A 230 MB bf16 checkpoint converts with a peak far below the checkpoint's own size."""
    hf = tmp_path / "big"
    hf.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "tiny-qwen2" / name, hf / name)
    c, ffn, n_layer, kv = 1024, 4096, 8, 256
    cfg = json.loads((FIXTURES / "tiny-qwen2" / "config.json").read_text())
    cfg.update(hidden_size=c, intermediate_size=ffn, num_hidden_layers=n_layer, num_attention_heads=8)
    (hf / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(512, c), "lm_head.weight": w(512, c), "model.norm.weight": w(c)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": w(c),
            p + "post_attention_layernorm.weight": w(c),
            p + "self_attn.q_proj.weight": w(c, c),
            p + "self_attn.q_proj.bias": w(c),
            p + "self_attn.k_proj.weight": w(kv, c),
            p + "self_attn.k_proj.bias": w(kv),
            p + "self_attn.v_proj.weight": w(kv, c),
            p + "self_attn.v_proj.bias": w(kv),
            p + "self_attn.o_proj.weight": w(c, c),
            p + "mlp.gate_proj.weight": w(ffn, c),
            p + "mlp.up_proj.weight": w(ffn, c),
            p + "mlp.down_proj.weight": w(c, ffn),
        }
    save_file(tensors, str(hf / "model.safetensors"))
    checkpoint = (hf / "model.safetensors").stat().st_size
    largest = max(t.numel() for t in tensors.values()) * 2
    del tensors
    head = torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(2 * c, 1)
    )
    torch.save(head.state_dict(), hf / "score_module.pt")

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(hf), str(out), "f16"], capture_output=True, text=True, check=True
    )
    base, peak = map(int, proc.stdout.split())
    peak_extra = peak - base
    print(
        f"checkpoint {checkpoint / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB (bf16), "
        f"peak RSS over baseline {peak_extra / 2**20:.0f} MiB"
    )
    assert checkpoint > 220 * 2**20
    assert (out / "big-f16.gguf").stat().st_size > checkpoint
    # Whole-model buffering would need >= the checkpoint (f16 is as big as bf16); allow the
    # largest tensor several times over (source pages, f32 widening, f16 output) plus the head.
    assert peak_extra < 0.5 * checkpoint
