"""Build the deterministic test fixtures: a tokenizer, two tiny Qwen2 checkpoints with SPRM heads,
and reference outputs computed with transformers.  Run: ``python tests/make_fixtures.py``.

Dev-only (torch, transformers, tokenizers).  Same bytes on every run on the same machine: fixed
seeds, one torch thread (float sums do not depend on thread blocking), and archives written with
fixed timestamps.  See tests/fixtures/README.md for what each file holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import reference  # tests/ is sys.path[0] when run as a script, as under pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / R1-Distill-Qwen).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB = 440  # incl. the 256 byte tokens; the added tokens come after
EOS, USER, ASSISTANT, BOS = (
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>",
)
EOT, THINK, END_THINK = "<|EOT|>", "<think>", "</think>"
# (content, special) in R1-Distill-Qwen's order.
ADDED_TOKENS = [
    (EOS, True),
    (USER, False),
    (ASSISTANT, False),
    (BOS, True),
    (EOT, False),
    (THINK, False),
    (END_THINK, False),
]
DELIMITER = ".\n\n"

CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

TEMPERATURE, TOP_P = 0.6, 0.95
# Per-token rates wanted when sampling from the chat prompt (TEMPERATURE, TOP_P).
TARGET_RATES = {DELIMITER: 0.075, END_THINK: 0.0075, EOS: 0.006}
SUPPRESSED = [BOS, USER, ASSISTANT, EOT, THINK]  # a sane model almost never emits these mid-answer
SUPPRESS_SHIFT, PAD_SHIFT = -12.0, -30.0  # logit shifts (tempered: x 1/0.6)
SAMPLE_LEN, SAMPLES_PER_PROMPT = 200, 8
PROMPTS = [
    "What is 2 + 3?",
    "Let x = 4. Find x + 1.",
    "Solve 7 * 6.",
    "def f(x): return x + 1. What is f(2)?",
]

MODELS = {
    "tiny-qwen2": {
        "seed": 1001,
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 256,
        "shards": 1,
        "config_style": "4.x",
    },
    "tiny-qwen2-sharded": {
        "seed": 2002,
        "hidden": 64,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 128,
        "shards": 3,
        "config_style": "5.x",
    },
}
VOCAB_SIZE, MAX_POSITIONS, ROPE_THETA, RMS_EPS = 512, 4096, 10000.0, 1e-6

# Reference texts: (name, text).  Short on purpose: the logits are stored for the full vocabulary.
TEXTS = [
    (
        "chat",
        f"{BOS}{USER}What is 2 + 3?{ASSISTANT}{THINK}\nWe add 2 and 3.\n\nSo the sum is 5.\n\n"
        f"{END_THINK}\n\nThe answer is 5.{EOS}",
    ),
    ("delimiter_runs", f"{THINK}\nLet x = 4.\n\n.\n\n.\n\nThen x + 1 = 5.\n\n.\n\n{END_THINK}"),
    ("delimiter_after_think", f"{THINK}.\n\nWe add 2 and 3.\n\nSo the sum is 5.\n\nDone.\n\n{END_THINK}"),
    ("unicode", f"{THINK}\nCafé über 中文 😀.\n\nñ 日 🎉.\n\n{END_THINK} é"),
    ("code", f"{THINK}\ndef f(x):\n\treturn x + 1\n\nif x > 0:\n    y = 2.\n\n{END_THINK}"),
    ("two_think_end", f"{THINK}\nLet x = 2.\n\n{END_THINK}\nWait.\n\nThen x = 3.\n\n{END_THINK} 3"),
    ("no_think", "So.\n\nWe add 2 and 3.\n\nSo the sum is 5.\n\nThe answer is 5."),
    ("two_think", f"{THINK}\nLet x = 2.\n\n{THINK}\nThen x = 3.\n\n{END_THINK} The answer is 3."),
    ("first_delimiter", ".\n\nLet x = 2.\n\nThen x + 1 = 3.\n\nSo x = 2."),
]
SELECTION = ["chat", "delimiter_runs", "delimiter_after_think", "code"]


# ---------------------------------------------------------------- tokenizer


def corpus() -> list[str]:
    """Math steps separated by ".\\n\\n", code, and some unicode; fixed seed."""
    rng = random.Random(1234)
    names = ["x", "y", "n", "a", "b", "k"]
    docs = []
    for _ in range(400):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        v = rng.choice(names)
        steps = [
            f"We add {a} and {b}",
            f"So the sum is {a + b}",
            f"Let {v} = {a}",
            f"Then {v} + {b} = {a + b}",
            f"Check: {a + b} - {b} = {a}",
            "Wait, let me check the answer again",
            f"First we find the value of {v}",
            f"Therefore the answer is {a * b}",
            f"Solve {a} * {b} step by step",
            f"The product of {a} and {b} is {a * b}",
            f"Now divide by {b} to get the result",
            "Hmm, that does not look right",
        ]
        rng.shuffle(steps)
        docs.append(DELIMITER.join(steps[: rng.randint(2, 7)]) + DELIMITER)
    for _ in range(80):
        docs.append(f"The answer is \\boxed{{{rng.randint(1, 999)}}} .\n\nDone.\n\n\nWhat is next?")
    code = [
        "def f(x):\n    return x + 1\n",
        "for i in range(n):\n\tprint(i)\n",
        "if x > 0:\n    y = x * 2\nelse:\n    y = 0\n",
        "while n:\n\tn -= 1\n",
        "import math\nprint(math.sqrt(16))\n",
    ]
    unicode = [
        "Café crème",
        "über alles",
        "naïve idea",
        "中文 数学",
        "😀 smile",
        "π ≈ 3.14",
        "x → y",
        "a ≤ b",
    ]
    return docs + code * 40 + unicode * 15


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE with Qwen2's normalizer/pre-tokenizer and R1-Distill's added tokens."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    for i, (content, special) in enumerate(ADDED_TOKENS):  # one at a time: ids follow this order
        added = AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        assert tok.token_to_id(content) == BPE_VOCAB + i, content
    bos_id = tok.token_to_id(BOS)
    # add_bos_token=true, as R1-Distill's tokenizer.json does it.
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: Tokenizer) -> None:
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    delim = enc(DELIMITER)
    assert len(delim) == 1, f"'.\\n\\n' must be one token, got {delim}"
    assert delim[0] in enc("x = 2.\n\nThen"), "delimiter not found inside text"
    for other in (" .\n\n", ".\n\n\n"):
        assert delim[0] not in enc(other), f"{other!r} must not contain the delimiter id"
    assert 400 <= tok.get_vocab_size() <= 460, tok.get_vocab_size()
    for content, _ in ADDED_TOKENS:
        assert enc(content) == [tok.token_to_id(content)], content
    sample = "Café über 中文 😀 ñ 日本 🎉\n\tx = 1.\n\n"
    assert tok.decode(enc(sample), skip_special_tokens=False) == sample


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, generation_config.json as text."""
    added_decoder = {
        str(tok.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in ADDED_TOKENS
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added_decoder,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": EOS,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
    }
    generation = {
        "_from_model_config": True,
        "bos_token_id": tok.token_to_id(BOS),
        "do_sample": True,
        "eos_token_id": tok.token_to_id(EOS),
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "transformers_version": "4.44.0",
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": dumps(config),
        "generation_config.json": dumps(generation),
    }


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def single_id(tok: Tokenizer, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def chat_prompt(question: str) -> str:
    return f"{BOS}{USER}{question}{ASSISTANT}{THINK}\n"  # CHAT_TEMPLATE with add_generation_prompt


# ---------------------------------------------------------------- model


def hf_config(spec: dict, tok: Tokenizer) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
    )


def config_json(spec: dict, tok: Tokenizer) -> dict:
    """config.json as transformers 4.x (top-level rope_theta) or 5.x (rope_parameters) writes it."""
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "hidden_act": "silu",
        "hidden_size": spec["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": spec["intermediate"],
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": spec["layers"],
        "model_type": "qwen2",
        "num_attention_heads": spec["heads"],
        "num_hidden_layers": spec["layers"],
        "num_key_value_heads": spec["kv_heads"],
        "rms_norm_eps": RMS_EPS,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }
    if spec["config_style"] == "4.x":
        cfg.update(
            rope_scaling=None,
            rope_theta=ROPE_THETA,
            sliding_window=4096,
            torch_dtype="bfloat16",
            transformers_version="4.44.0",
        )
    else:
        cfg.update(
            dtype="bfloat16",
            layer_types=["full_attention"] * spec["layers"],
            pad_token_id=None,
            rope_parameters={"rope_theta": ROPE_THETA, "rope_type": "default"},
            sliding_window=None,
            transformers_version="5.24.0",
        )
    return dict(sorted(cfg.items()))


def init_weights(model: Qwen2ForCausalLM, seed: int) -> None:
    """Random weights that make every part of the network matter.

    std 0.02 everywhere would leave the residual stream equal to the embedding (attention and MLP
    add ~1%), so a converter with broken RoPE or attention would still match.  Gains ~1/sqrt(fan_in)
    make each block add O(1); norm weights and q/k/v biases are non-trivial so dropping them shows.
    Embeddings share a common offset: it gives the final hidden state a stable direction that the
    lm_head calibration uses as a per-token bias.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    c = cfg.hidden_size

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1]
            if name.endswith("embed_tokens.weight"):
                offset = normal((c,), 1.0)
                offset *= 0.8 * math.sqrt(c) / offset.norm()
                p.copy_(normal(p.shape, 1.0) + offset)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + normal(p.shape, 0.1))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(normal(p.shape, 1.2 / math.sqrt(fan_in)))
            elif name.endswith("bias"):
                p.copy_(normal(p.shape, 0.2))
            elif name.endswith(("v_proj.weight", "o_proj.weight", "down_proj.weight")):
                p.copy_(normal(p.shape, 0.8 / math.sqrt(fan_in)))
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                p.copy_(normal(p.shape, 1.0 / math.sqrt(fan_in)))
            elif name == "lm_head.weight":
                p.copy_(normal(p.shape, 2.5 / math.sqrt(fan_in)))
            else:
                raise AssertionError(f"no init rule for {name}")
        round_to_bf16(model)


def round_to_bf16(model: Qwen2ForCausalLM) -> None:
    """Keep float32 weights that are exactly the bf16 values saved to disk."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def filtered_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax at TEMPERATURE restricted to the TOP_P nucleus (renormalised)."""
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < TOP_P
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


@torch.no_grad()
def sample(model: Qwen2ForCausalLM, prompt: list[int], n: int, length: int, seed: int):
    """n trajectories of `length` tokens; returns (tokens [n, length], probs [n, length, V])."""
    g = torch.Generator().manual_seed(seed)
    out = model(input_ids=torch.tensor([prompt] * n), use_cache=True)
    cache, logits = out.cache, out.logits[:, -1]
    tokens, probs = [], []
    for _ in range(length):
        p = filtered_probs(logits)
        nxt = torch.multinomial(p, 1, generator=g)
        tokens.append(nxt[:, 0])
        probs.append(p)
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(probs, 1)


def sample_all(model: Qwen2ForCausalLM, tok: Tokenizer, seed: int):
    """Trajectories from every prompt, with a mask of live positions (up to the first EOS)."""
    eos = tok.token_to_id(EOS)
    runs = []
    for i, question in enumerate(PROMPTS):
        prompt = tok.encode(chat_prompt(question), add_special_tokens=False).ids
        tokens, probs = sample(model, prompt, SAMPLES_PER_PROMPT, SAMPLE_LEN, seed + i)
        is_eos = (tokens == eos).int()
        live = (is_eos.cumsum(1) - is_eos) == 0  # positions up to and including the first EOS
        runs.append((prompt, tokens, probs, live))
    return runs


def rates(runs, tok: Tokenizer) -> dict:
    """Expected (model probability) and sampled per-token rates of the target tokens."""
    live = torch.cat([r[3] for r in runs]).flatten()
    tokens = torch.cat([r[1] for r in runs]).flatten()[live]
    probs = torch.cat([r[2] for r in runs]).flatten(0, 1)[live]
    report = {}
    for text in TARGET_RATES:
        tid = single_id(tok, text)
        report[text] = {
            "expected": float(probs[:, tid].mean()),
            "sampled": float((tokens == tid).float().mean()),
        }
    eos, delim = single_id(tok, EOS), single_id(tok, DELIMITER)
    all_tokens = torch.cat([r[1] for r in runs])
    all_live = torch.cat([r[3] for r in runs])
    steps = ((all_tokens == delim) & all_live).sum(1).float()
    report["trajectories"] = len(all_tokens)
    report["finished_fraction"] = float((all_tokens == eos).any(1).float().mean())
    report["mean_delimiters_per_trajectory"] = float(steps.mean())
    report["max_new_tokens"] = SAMPLE_LEN
    report["live_tokens"] = int(live.sum())
    return report


@torch.no_grad()
def final_state_direction(model: Qwen2ForCausalLM, tok: Tokenizer, seed: int) -> torch.Tensor:
    """Mean of the final (normed) hidden state over random token sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tok.get_vocab_size(), (16, 64), generator=g)
    return model.model(input_ids=ids, use_cache=False).last_hidden_state.mean((0, 1))


@torch.no_grad()
def set_lm_head(model, base: torch.Tensor, direction: torch.Tensor, shifts: dict[int, float]) -> None:
    """Rows = random rows without their component on `direction`, plus a per-token logit shift."""
    unit = direction / direction.norm()
    rows = base - (base @ unit)[:, None] * unit[None, :]
    bias = torch.zeros(rows.shape[0])
    for tid, shift in shifts.items():
        bias[tid] = shift
    # h . (shift * m / |m|^2) ~= shift, because final states point along m on average.
    rows += bias[:, None] * (direction / direction.norm() ** 2)[None, :]
    model.lm_head.weight.copy_(rows.to(torch.bfloat16).float())


def calibrate_lm_head(model: Qwen2ForCausalLM, tok: Tokenizer, seed: int) -> dict:
    """Tune logit shifts so sampling emits the delimiter, </think> and EOS at TARGET_RATES."""
    direction = final_state_direction(model, tok, seed)
    base = model.lm_head.weight.detach().clone()
    n_tok = tok.get_vocab_size()
    shifts = {tid: PAD_SHIFT for tid in range(n_tok, VOCAB_SIZE)}
    shifts.update({tok.token_to_id(t): SUPPRESS_SHIFT for t in SUPPRESSED})
    target_ids = {text: single_id(tok, text) for text in TARGET_RATES}
    shifts.update({tid: 0.0 for tid in target_ids.values()})
    for _ in range(7):
        set_lm_head(model, base, direction, shifts)
        measured = rates(sample_all(model, tok, seed + 100), tok)
        for text, tid in target_ids.items():
            expected = max(measured[text]["expected"], 1e-6)
            step = TEMPERATURE * math.log(TARGET_RATES[text] / expected)
            shifts[tid] += max(-4.0, min(4.0, step))
    set_lm_head(model, base, direction, shifts)
    return {text: shifts[tid] for text, tid in target_ids.items()}


@torch.no_grad()
def generated_hidden(model: Qwen2ForCausalLM, runs) -> torch.Tensor:
    """hidden_states[-2] rows of every generated token of `runs` -> [K, c]."""
    rows = []
    for prompt, tokens, _, _ in runs:
        ids = torch.cat([torch.tensor([prompt] * len(tokens)), tokens], 1)
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        rows.append(out.hidden_states[-2][:, len(prompt) :].flatten(0, 1))
    return torch.cat(rows)


def make_head(model: Qwen2ForCausalLM, hidden: torch.Tensor, seed: int) -> torch.nn.Sequential:
    """SPRM head with a seeded init, its output layer rescaled so scores spread over ~0.1-0.9."""
    torch.manual_seed(seed)
    head = reference.make_head(model.config.hidden_size).eval()
    with torch.no_grad():
        z = head(hidden)[:, 0]
        scale = 1.1 / z.std()
        head[3].weight.mul_(scale)
        head[3].bias.copy_((head[3].bias - z.mean()) * scale)
    return head


# ---------------------------------------------------------------- writing


def write_checkpoint(out: Path, model: Qwen2ForCausalLM, head, spec: dict, tok: Tokenizer) -> None:
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if spec["shards"] == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        write_shards(out, tensors, spec["shards"])
    (out / "config.json").write_text(dumps(config_json(spec, tok)), encoding="utf-8")
    for name, text in tokenizer_files(tok).items():
        (out / name).write_text(text, encoding="utf-8")
    torch.save({k: v.float().contiguous() for k, v in head.state_dict().items()}, out / "score_module.pt")


def write_shards(out: Path, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Split in state-dict order into n files of about equal size, plus the index."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    done = 0
    for name, t in tensors.items():
        shards[min(n - 1, done * n // total)][name] = t
        done += t.numel() * t.element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        assert shard, "empty shard"
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(dumps(index), encoding="utf-8")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ---------------------------------------------------------------- reference outputs


def scoring_spec(model, tok: Tokenizer) -> dict:
    cfg = model.config
    return {
        "layer": cfg.num_hidden_layers - 2,
        "n_layer": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "step_delimiter_ids": tok.encode(DELIMITER, add_special_tokens=False).ids,
        "think_start_id": tok.token_to_id(THINK),
        "think_end_id": tok.token_to_id(END_THINK),
        "eos_id": tok.token_to_id(EOS),
        "bos_id": tok.token_to_id(BOS),
    }


@torch.no_grad()
def hooked_layer_output(model, ids: list[int], layer: int) -> np.ndarray:
    """Output of model.model.layers[layer] captured by a forward hook (cross-check of [-2])."""
    seen = []

    def hook(_module, _inputs, output):
        seen.append((output[0] if isinstance(output, tuple) else output)[0].float().numpy().copy())

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def reference_outputs(model_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Recompute everything from the files on disk, as a user of the fixture would."""
    model, tok, head = reference.load_model(model_dir)
    spec = scoring_spec(model, tok)
    record = {"model": model_dir.name, "spec": spec, "names": [], "texts": [], "ids": []}
    record.update(step_positions=[], step_scores=[], trajectory_score=[])
    arrays = {}
    for i, (name, text) in enumerate(TEXTS):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert 20 <= len(ids) <= 80, (name, len(ids))
        hidden, logits = reference.hidden_and_logits(model, ids)
        hooked = hooked_layer_output(model, ids, spec["layer"])
        assert np.array_equal(hidden, hooked), f"hidden_states[-2] is not layer {spec['layer']}'s output"
        scored = reference.score_sequence(model, head, ids, spec)
        record["names"].append(name)
        record["texts"].append(text)
        record["ids"].append(ids)
        record["step_positions"].append(scored["step_positions"])
        record["step_scores"].append(scored["step_scores"])
        record["trajectory_score"].append(scored["score"])
        arrays[f"ids_{i}"] = np.asarray(ids, np.int32)
        arrays[f"hidden_{i}"] = hidden.astype(np.float32)
        arrays[f"logits_{i}"] = logits.astype(np.float32)
        arrays[f"step_positions_{i}"] = np.asarray(scored["step_positions"], np.int32)
        arrays[f"step_scores_{i}"] = np.asarray(scored["step_scores"], np.float32)
    cand = [record["names"].index(n) for n in SELECTION]
    scores = [record["trajectory_score"][i] for i in cand]
    best = max(range(len(cand)), key=lambda k: scores[k])
    assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-4, "selection case is a near tie"
    record["selection"] = {"candidates": cand, "names": SELECTION, "scores": scores, "best": best}
    return record, arrays


def verify(model_dir: Path, record: dict, npz_path: Path, built: Qwen2ForCausalLM) -> tuple[float, float]:
    """Reload from disk and reproduce the stored arrays.

    Returns the worst absolute difference to the stored arrays, and the worst logit difference
    to `built`, the in-memory model before saving (catches a config.json that reads back wrong).
    """
    model, tok, head = reference.load_model(model_dir)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    question = PROMPTS[0]
    rendered = hf_tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == chat_prompt(question), rendered
    stored = np.load(npz_path)
    worst = drift = 0.0
    for i, text in enumerate(record["texts"]):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == record["ids"][i] == stored[f"ids_{i}"].tolist()
        assert hf_tok.encode(text, add_special_tokens=False) == ids, "AutoTokenizer disagrees"
        hidden, logits = reference.hidden_and_logits(model, ids)
        drift = max(drift, float(np.abs(reference.hidden_and_logits(built, ids)[1] - logits).max()))
        scored = reference.score_sequence(model, head, ids, record["spec"])
        assert scored["step_positions"] == record["step_positions"][i]
        for a, b in (
            (hidden, stored[f"hidden_{i}"]),
            (logits, stored[f"logits_{i}"]),
            (np.asarray(scored["step_scores"], np.float32), stored[f"step_scores_{i}"]),
        ):
            worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
        worst = max(worst, abs(scored["score"] - record["trajectory_score"][i]))
    assert worst <= 1e-5, worst
    assert drift <= 1e-4, drift
    return worst, drift


# Hand-worked cases of the position rules: ids use 9 = delimiter, 1 = <think>, 2 = </think>.
# They pin this module's reading of the rules in docs/method.md (section 3) where the prose could be read two ways.
STEP_RULE_CASES = [
    ("basic: first of run, shift, window", [5, 1, 5, 9, 5, 9, 9, 5, 2, 5, 9], [2, 4]),
    ("delimiter run right after <think> is dropped whole", [1, 9, 9, 5, 9], [3]),
    ("no markers: window starts after position 0", [9, 5, 9, 5, 9], [1, 3]),
    ("no markers: position 0 is never scored", [5, 9, 5, 9], [2]),
    ("two </think>: window runs to the end", [1, 5, 9, 2, 5, 9, 2, 5, 9], [1, 4, 7]),
    ("two <think>: window starts at 0", [1, 5, 9, 1, 5, 9, 2], [1, 4]),
    ("delimiter after a second <think> is dropped too", [1, 5, 9, 1, 9, 5, 9, 2], [1, 5]),
    ("nothing scored after </think>", [1, 5, 9, 2, 5, 9], [1]),
    ("delimiter as the very last token", [1, 5, 5, 9], [2]),
    ("no delimiter", [1, 5, 5, 2], []),
]


def check_step_rules() -> list[dict]:
    cases = []
    for name, ids, expected in STEP_RULE_CASES:
        got = reference.step_positions(ids, [9], 1, 2)
        assert got == expected, (name, got, expected)
        cases.append({"name": name, "ids": ids, "step_positions": expected})
    return cases


# ---------------------------------------------------------------- main


def build_model(name: str, spec: dict, tok: Tokenizer) -> tuple[dict, Qwen2ForCausalLM]:
    """Create, calibrate and write one checkpoint; returns the sampling report and the model."""
    seed = spec["seed"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config(spec, tok)).float().eval()
    init_weights(model, seed)
    shifts = calibrate_lm_head(model, tok, seed)
    runs = sample_all(model, tok, seed + 500)  # fresh samples for the report and the head
    report = rates(runs, tok)
    report["logit_shifts"] = shifts
    h = generated_hidden(model, runs)
    head = make_head(model, h, seed + 7)
    with torch.no_grad():
        s = torch.sigmoid(head(h))[:, 0]
    report["hidden_m2_abs"] = {
        "mean": float(h.abs().mean()),
        "p99": float(h.abs().flatten().quantile(0.99)),
        "max": float(h.abs().max()),
    }
    report["head_scores"] = {f"p{q}": float(s.quantile(q / 100)) for q in (5, 50, 95)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=FIXTURES))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    write_checkpoint(tmp, model, head, spec, tok)
    replace_dir(tmp, FIXTURES / name)
    return report, model


def main() -> None:
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(exist_ok=True)
    (FIXTURES / "reference").mkdir(exist_ok=True)
    for stale in FIXTURES.glob(".tiny-qwen2*"):  # temp dirs of an interrupted run
        shutil.rmtree(stale)
    rule_cases = {
        "step_delimiter_ids": [9],
        "think_start_id": 1,
        "think_end_id": 2,
        "cases": check_step_rules(),
    }
    (FIXTURES / "reference" / "step_rules.json").write_text(dumps(rule_cases), encoding="utf-8")
    tok = build_tokenizer()
    print(f"tokenizer: {tok.get_vocab_size()} tokens, delimiter id {single_id(tok, DELIMITER)}")
    for name, spec in MODELS.items():
        report, built = build_model(name, spec, tok)
        print(f"{name}: {json.dumps(report, ensure_ascii=False)}")
        record, arrays = reference_outputs(FIXTURES / name)
        record["sampling"] = report
        npz_path = FIXTURES / "reference" / f"{name}.npz"
        save_npz(npz_path, arrays)
        (FIXTURES / "reference" / f"{name}.json").write_text(dumps(record), encoding="utf-8")
        worst, drift = verify(FIXTURES / name, record, npz_path, built)
        print(f"{name}: reference reproduced from disk, worst abs diff {worst:.2e}")
        print(f"{name}: in-memory model vs reloaded, worst logit diff {drift:.2e}")
        print(f"{name}: trajectory scores {[round(s, 4) for s in record['trajectory_score']]}")
    total = 0
    for path in sorted(p for p in FIXTURES.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"{size:>9}  {digest}  {path.relative_to(FIXTURES)}")
    print(f"{total:>9}  total")
    assert total < 6_000_000, "fixtures must stay under 6 MB"


if __name__ == "__main__":
    main()
