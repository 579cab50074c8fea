"""Will it fit? The memory of one generation from the model's shape, and what runs within a budget.

The estimate adds what a generation keeps resident: the weights (memory-mapped, so the
file's size), the KV cache (llama.cpp rounds the context up to 256 cells), the part of
llama.cpp's compute buffer that the engine's graphs write, the logits and sampler arrays,
the tap buffer, the SPRM head and the runtime itself. ``Reasoner.load(memory_bytes=...)``
refuses with the same estimate that ``edge-ms plan`` prints. The constants were measured
with ``benchmarks/bench_plan.py`` (peak RSS of fresh processes running a 1.5B-shaped Q4_K_M
model, llama-cpp-python 0.3.36, x86-64): within 1% without weight repacking, 4-8% above
with it (see examples/edge/README.md).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edge_ms.errors import EdgeMSError, fail
from edge_ms.modes import MODES
from edge_ms.quants import KV_BYTES_PER_VALUE, kv_bytes_per_cell
from edge_ms.sizes import human_size
from edge_ms.store import locate

if TYPE_CHECKING:
    from edge_ms.model import Model

__all__ = [
    "CTX_PAD",
    "ENGINE_BATCH",
    "KV_BYTES_PER_VALUE",
    "KV_LAYOUTS",
    "PRESETS",
    "auto_layout",
    "layout_estimate",
    "available_memory",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "PlanRow",
    "context_cells",
    "max_new_tokens_that_fit",
    "memory_breakdown",
    "plan",
    "plan_for",
    "plan_table",
    "preset_shape",
    "qwen2_tensors",
    "shape_estimate",
    "shape_from_gguf",
    "shape_from_model",
    "tensor_bytes",
]

CTX_PAD = 256  # llama.cpp allocates the KV cache in multiples of 256 cells
KV_LAYOUTS = ("auto", "unified", "streams")
ENGINE_BATCH = 512  # the engine's llama.cpp batch: prompt chunk size and tap buffer rows
# Python, numpy, onnxruntime, llama.cpp, the tap library and what a first generation imports
# (answer extraction pulls in sympy): the peak RSS of a run on a 7 MB fixture model, less the model.
RUNTIME_BYTES = 90 * 2**20
# llama.cpp's vocabulary tables (token text, lookup maps), per token: fitted on a 151,936-token model.
VOCAB_BYTES_PER_TOKEN = 32
# The head's weights are resident about three times (onnxruntime's copy, its pre-packed
# copy, and what the loader's buffers leave in the allocator) - measured on a 1536-wide head.
HEAD_COPIES = 3
DEFAULT_PROMPT_TOKENS = 256
DEFAULT_BUDGET_FRACTION = 0.8  # of MemAvailable, when no --memory is given


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a backbone."""

    name: str
    file_bytes: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Resident bytes of one generation, by where they go."""

    weights: int
    kv_cache: int
    compute: int
    outputs: int  # logits buffer + per-trajectory sampler scratch
    tap: int
    head: int
    runtime: int  # interpreter, libraries, vocabulary tables

    @property
    def total(self) -> int:
        return (
            self.weights + self.kv_cache + self.compute + self.outputs + self.tap + self.head + self.runtime
        )


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; else total physical)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def context_cells(n_prompt: int, n: int, max_new_tokens: int, layout: str = "unified") -> int:
    """KV cells a generation asks for.

    ``unified``: one pool holding the shared prompt once, then each trajectory's own tokens.
    ``streams``: one stream per trajectory, each with its own copy of the prompt and room for
    its own tokens; llama.cpp rounds every stream up to 256 cells.
    """
    if layout == "streams" and n > 1:
        return n * _pad(n_prompt + max_new_tokens + 1, CTX_PAD)
    return n_prompt + n * max_new_tokens + 1


def auto_layout(n_prompt: int, n: int, max_new_tokens: int, forks: bool = False) -> str:
    """The KV layout that fits the work (docs/llama_cpp.md, "KV layouts").

    In one unified pool every token attends over the cells of all N sequences, so a step's
    cost grows with N x length; one stream per sequence attends only over its own prompt copy
    and tokens. Streams pay when the trajectories' own tokens (at most ``max_new_tokens`` each)
    are at least twice the prompt and the copies (with their padding) at most double the cells;
    the unified pool wins for a long shared prompt (a few-shot prefix), for one sequence, and when
    a strategy forks sequences (a fork is free inside one pool, a whole-buffer copy across streams).
    """
    if n < 2 or forks or max_new_tokens < 2 * n_prompt:
        return "unified"
    if context_cells(n_prompt, n, max_new_tokens, "streams") > 2 * context_cells(n_prompt, n, max_new_tokens):
        return "unified"
    return "streams"


def _pad(x: int, to: int) -> int:
    return (x + to - 1) // to * to


def memory_breakdown(
    model_bytes: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_vocab: int,
    n_ctx: int,
    n_seq: int,
    kv_type: str,
    n_batch: int = ENGINE_BATCH,
    *,
    n_ff: int | None = None,
) -> MemoryEstimate:
    """Resident bytes, by part, of ``n_seq`` trajectories sharing a context of ``n_ctx`` cells.

    ``n_batch`` is the most prompt tokens one ``llama_decode`` call holds: the engine decodes
    the prompt in chunks of 512, so pass ``min(n_prompt, 512)``. llama.cpp reserves its compute
    buffer for a worst-case graph (512 tokens, all with logits) but only the pages that a
    graph writes become resident, so the estimate counts the two graphs the engine runs: a
    prompt chunk with one row of logits, and one token per trajectory with a row each.
    """
    if kv_type not in KV_BYTES_PER_VALUE:
        raise EdgeMSError(
            f"--kv-type {kv_type}: unknown KV-cache type (choose from {', '.join(KV_BYTES_PER_VALUE)})"
        )
    n_ff = n_ff or 4 * n_embd
    head_dim = n_embd // max(n_head, 1)
    cells = _pad(n_ctx, CTX_PAD)
    kv = int(cells * kv_bytes_per_cell(n_layer, n_head_kv, head_dim, kv_type))

    def graph(tokens: int, rows_of_logits: int) -> int:
        # Live at the widest point of a layer: the FFN's gate, up and product (n_ff wide) and
        # the residual stream (n_embd wide), plus the f16 attention mask (cells x tokens)
        # and the logits. Flash attention (llama.cpp's default on CPU) never holds KQ.
        return 4 * tokens * (3 * n_ff + 4 * n_embd) + 2 * cells * tokens + 4 * rows_of_logits * n_vocab

    compute = max(graph(max(1, min(n_batch, n_ctx)), 1), graph(n_seq, n_seq))
    # llama.cpp's logits buffer (one row per sequence), and each trajectory's sampler chain keeps
    # an n_vocab candidate array (12 bytes a token) between calls.
    outputs = 4 * n_seq * n_vocab + 12 * (n_seq + 1) * n_vocab
    tap = 4 * max(ENGINE_BATCH, n_seq) * n_embd
    head = HEAD_COPIES * 4 * (2 * n_embd * n_embd + 4 * n_embd + 1)
    runtime = RUNTIME_BYTES + VOCAB_BYTES_PER_TOKEN * n_vocab
    return MemoryEstimate(model_bytes, kv, compute, outputs, tap, head, runtime)


def shape_estimate(
    shape: ModelShape, n_ctx: int, n_seq: int, kv_type: str, n_prompt: int, batch: int = ENGINE_BATCH
) -> MemoryEstimate:
    """:func:`memory_breakdown` for ``shape``, with the engine's prompt chunking (``batch`` tokens a call)."""
    return memory_breakdown(
        shape.file_bytes,
        shape.n_layer,
        shape.n_embd,
        shape.n_head,
        shape.n_head_kv,
        shape.n_vocab,
        n_ctx,
        n_seq,
        kv_type,
        min(n_prompt, max(batch, n_seq)),
        n_ff=shape.n_ff,
    )


# -- where shapes come from ------------------------------------------------------


def _shape(name: str, file_bytes: int, meta: Callable[[str], str | None], n_vocab: int) -> ModelShape | None:
    """The shape from GGUF metadata values (as text); None when a required key is missing or odd."""
    arch = meta("general.architecture")

    def num(key: str) -> int | None:
        text = meta(f"{arch}.{key}")
        return int(text) if text is not None and text.strip().isdigit() else None

    n_layer, n_embd, n_head = num("block_count"), num("embedding_length"), num("attention.head_count")
    if not arch or None in (n_layer, n_embd, n_head) or n_head == 0:
        return None
    # Architectures with per-layer widths store arrays here; the usual 4x is close enough for them.
    n_ff = num("feed_forward_length") or 4 * n_embd
    n_head_kv = num("attention.head_count_kv") or n_head
    return ModelShape(
        name, file_bytes, n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, num("context_length") or 4096
    )


def shape_from_gguf(path: str | os.PathLike[str]) -> ModelShape:
    """Read the shape from a GGUF file's metadata, without loading its weights.

    llama.cpp reads the header in its vocabulary-only mode: gguf-py's GGUFReader would do,
    but it takes seconds on a 150k-token vocabulary.
    """
    import llama_cpp

    from edge_ms.model import init_backend

    path = Path(path)
    if not path.is_file():
        raise fail(path, "model file not found")
    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not ptr:
        raise fail(path, "llama.cpp could not read this GGUF (corrupt, truncated or unsupported)")
    try:

        def meta(key: str) -> str | None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_model_meta_val_str(ptr, key.encode(), buf, len(buf))
            return buf.value.decode("utf-8", "replace") if n >= 0 else None

        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(ptr))
        shape = _shape(path.name, path.stat().st_size, meta, n_vocab)
    finally:
        llama_cpp.llama_model_free(ptr)
    if shape is None:
        raise fail(path, "the GGUF metadata lacks the layer count, widths or head count of a transformer")
    return shape


def shape_from_model(model: Model) -> ModelShape:
    """The shape of a loaded model (what the engine checks a request's memory with)."""
    shape = _shape(model.path.name, model.path.stat().st_size, model.meta, model.n_vocab)
    if shape is None:  # odd metadata: llama.cpp's own numbers, which every loaded model has
        import llama_cpp

        n_head = max(1, llama_cpp.llama_model_n_head(model.ptr))
        shape = ModelShape(
            model.path.name,
            model.path.stat().st_size,
            model.n_layer,
            model.n_embd,
            n_head,
            llama_cpp.llama_model_n_head_kv(model.ptr) or n_head,
            4 * model.n_embd,
            model.n_vocab,
            model.n_ctx_train,
        )
    return shape


# Published MetaStone-S1 backbones (docs/method.md, section 2; the head counts, FFN width, vocabulary
# and context length are those of the Qwen2.5 / R1-Distill / QwQ bases they were trained from).
PRESETS = {
    "1.5b": dict(
        n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960, n_vocab=151936, n_ctx_train=131072
    ),
    "7b": dict(
        n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, n_ff=18944, n_vocab=152064, n_ctx_train=131072
    ),
    "32b": dict(
        n_layer=64, n_embd=5120, n_head=40, n_head_kv=8, n_ff=27648, n_vocab=152064, n_ctx_train=40960
    ),
}
PRESET_QUANTS = ("f16", "q8_0", "q4_k_m")


def qwen2_tensors(shape: ModelShape, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, (rows, cols), ggml type name) of a Qwen2 GGUF, with llama.cpp's type choices for ``quant``.

    Q4_K_M keeps the output matrix, and attn_v / ffn_down of the layers llama.cpp's
    ``use_more_bits`` picks (first and last eighth, every third in between), in Q6_K.
    """
    from edge_ms.gguf_export import qwen2_tensor_shapes

    if quant not in PRESET_QUANTS:
        raise EdgeMSError(f"--quant {quant}: no size rule for it (choose from {', '.join(PRESET_QUANTS)})")
    base = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K"}[quant]
    n = shape.n_layer

    def type_of(name: str, dims: tuple[int, ...]) -> str:
        if len(dims) == 1:
            return "F32"  # norms and biases
        if quant != "q4_k_m":
            return base
        if name == "output.weight":
            return "Q6_K"
        if not name.endswith(("attn_v.weight", "ffn_down.weight")):
            return base
        i = int(name.split(".")[1])  # blk.<i>.
        return "Q6_K" if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2 else base

    shapes = qwen2_tensor_shapes(
        n_layer=n, n_embd=shape.n_embd, n_head=shape.n_head, n_head_kv=shape.n_head_kv, n_ff=shape.n_ff,
        n_vocab=shape.n_vocab,
    )
    return [(name, dims, type_of(name, dims)) for name, dims in shapes.items()]


def tensor_bytes(dims: tuple[int, ...], type_name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    count = 1
    for d in dims:
        count *= d
    return count // block * size


def preset_shape(name: str, quant: str = "q4_k_m") -> ModelShape:
    """The shape of a published MetaStone-S1 size, with the file size llama.cpp's ``quant`` gives it."""
    key = name.lower().removeprefix("metastone-s1-")
    if key not in PRESETS:
        raise EdgeMSError(f"--shape {name}: unknown size (choose from {', '.join(PRESETS)})")
    shape = ModelShape(name=f"MetaStone-S1-{key.upper()} {quant}", file_bytes=0, **PRESETS[key])
    data = sum(tensor_bytes(dims, t) for _, dims, t in qwen2_tensors(shape, quant))
    # Plus the header: metadata and the vocabulary (about 4 MiB for Qwen2's).
    return replace(shape, file_bytes=data + 26 * shape.n_vocab)


# -- planning --------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    """One configuration: N trajectories of up to ``max_new_tokens`` each, with a KV-cache type."""

    label: str  # "low" / "medium" / "high", or "n=5"
    n: int
    kv_type: str
    kv_layout: str  # what auto chooses here: "unified" or "streams"
    max_new_tokens: int
    n_ctx: int
    estimate: MemoryEstimate
    fits: bool  # within the budget and the model's context
    over_context: bool  # prompt + max_new_tokens exceeds the model's trained context
    max_fit_tokens: int  # the most new tokens per trajectory that fit (0: not even one)


@dataclass
class Plan:
    shape: ModelShape
    budget_bytes: int
    budget_source: str
    prompt_tokens: int
    threads: int
    requested: PlanRow
    rows: list[PlanRow] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.requested.fits


def layout_estimate(
    shape: ModelShape, n_prompt: int, n: int, max_new_tokens: int, kv_type: str, budget: int | None,
    layout: str = "auto", batch: int = ENGINE_BATCH, forks: bool = False,
) -> tuple[str, int, MemoryEstimate]:
    """(layout, KV cells, estimate) of a generation; ``auto`` picks :func:`auto_layout` and falls
    back to the unified pool when the streams' prompt copies would not fit ``budget``."""
    if layout not in KV_LAYOUTS:
        raise EdgeMSError(f"--kv-layout {layout}: unknown (choose from {', '.join(KV_LAYOUTS)})")
    chosen = auto_layout(n_prompt, n, max_new_tokens, forks) if layout == "auto" else layout
    n_ctx = context_cells(n_prompt, n, max_new_tokens, chosen)
    est = shape_estimate(shape, n_ctx, n, kv_type, n_prompt, batch)
    if layout == "auto" and chosen == "streams" and budget is not None and est.total > budget:
        chosen = "unified"
        n_ctx = context_cells(n_prompt, n, max_new_tokens, chosen)
        est = shape_estimate(shape, n_ctx, n, kv_type, n_prompt, batch)
    return chosen, n_ctx, est


def _row(shape: ModelShape, label: str, n: int, kv_type: str, k: int, prompt: int, budget: int) -> PlanRow:
    layout, n_ctx, est = layout_estimate(shape, prompt, n, k, kv_type, budget)
    over = prompt + k > shape.n_ctx_train
    return PlanRow(
        label=label, n=n, kv_type=kv_type, kv_layout=layout, max_new_tokens=k, n_ctx=n_ctx, estimate=est,
        fits=est.total <= budget and not over, over_context=over,
        # The unified pool is the smallest layout, and auto falls back to it.
        max_fit_tokens=max_new_tokens_that_fit(shape, n, kv_type, prompt, budget),
    )


def max_new_tokens_that_fit(shape: ModelShape, n: int, kv_type: str, prompt: int, budget: int) -> int:
    """The largest per-trajectory token budget whose estimate stays within ``budget`` (0 if none)."""

    def fits(k: int) -> bool:
        return shape_estimate(shape, context_cells(prompt, n, k), n, kv_type, prompt).total <= budget

    lo, hi = 1, shape.n_ctx_train - prompt
    if hi < 1 or not fits(1):
        return 0
    while lo < hi:  # memory grows with k: bisect for the last k that fits
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(
    shape: ModelShape,
    memory_bytes: int | None = None,
    *,
    n: int = MODES["medium"],
    label: str | None = None,
    max_new_tokens: int = 1024,
    kv_type: str = "f16",
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    threads: int | None = None,
    available_bytes: int | None = None,
) -> Plan:
    """What fits in ``memory_bytes`` (default: 80% of ``available_bytes``, or of the memory available now).

    ``requested`` is the configuration asked for (N = ``n``, shown as ``label``, by default the
    mode of that N or "n=N"); ``rows`` cover every mode with both KV-cache types at the same
    ``max_new_tokens``, each with the most new tokens that would fit.
    """
    if n < 1:
        raise EdgeMSError(f"--n {n}: need at least one trajectory")
    if max_new_tokens < 1:
        raise EdgeMSError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if prompt_tokens < 1:
        raise EdgeMSError(f"--prompt-tokens {prompt_tokens}: must be at least 1")
    if kv_type not in KV_BYTES_PER_VALUE:
        raise EdgeMSError(
            f"--kv-type {kv_type}: unknown KV-cache type (choose from {', '.join(KV_BYTES_PER_VALUE)})"
        )
    if threads is not None and threads < 1:
        raise EdgeMSError(f"--threads {threads}: must be at least 1")
    if memory_bytes is None:
        avail = available_bytes if available_bytes is not None else available_memory()
        budget, source = (
            int(avail * DEFAULT_BUDGET_FRACTION),
            f"{DEFAULT_BUDGET_FRACTION:.0%} of available memory",
        )
    else:
        budget, source = memory_bytes, "--memory"
    if label is None:
        label = next((name for name, count in MODES.items() if count == n), f"n={n}")
    requested = _row(shape, label, n, kv_type, max_new_tokens, prompt_tokens, budget)
    configs = list(MODES.items())
    if n not in MODES.values():
        configs.append((label, n))
    rows = [
        _row(shape, name, count, kv, max_new_tokens, prompt_tokens, budget)
        for name, count in sorted(configs, key=lambda c: c[1])
        for kv in KV_BYTES_PER_VALUE
    ]
    return Plan(shape, budget, source, prompt_tokens, threads or max(1, os.cpu_count() or 1), requested, rows)


def plan_for(
    model: str | os.PathLike[str] | None = None,
    *,
    quant: str | None = None,
    shape: str | None = None,
    **kwargs,
) -> Plan:
    """:func:`plan` for a model directory, store name or GGUF file (default: the embedded model),
    or for a published size (``shape`` "1.5b" / "7b" / "32b", sized for ``quant``, default q4_k_m)."""
    if shape is not None:
        if model is not None:
            raise EdgeMSError("--shape and --model: give one of them")
        return plan(preset_shape(shape, quant or "q4_k_m"), **kwargs)
    gguf_path, _ = locate(model, quant)
    return plan(shape_from_gguf(gguf_path), **kwargs)


def plan_table(p: Plan):
    """The plan as rich renderables (a header, a table of every mode, the requested breakdown)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = p.shape
    head = Text.assemble(
        (s.name, "bold"),
        f": {human_size(s.file_bytes)} of weights, {s.n_layer} layers x {s.n_embd}, {s.n_head_kv} KV heads, "
        f"context {s.n_ctx_train}\nbudget {human_size(p.budget_bytes)} ({p.budget_source}), "
        f"prompt {p.prompt_tokens} tokens, {p.threads} threads",
    )
    k = p.requested.max_new_tokens
    table = Table("mode", "N", "KV cache", "layout", f"memory at {k} new tokens", "", "most new tokens that fit")
    for col in table.columns[1:3] + table.columns[4:5] + table.columns[6:]:
        col.justify = "right"
    for r in p.rows:
        verdict = (
            ("over context", "yellow")
            if r.over_context
            else ("fits", "green")
            if r.fits
            else ("too big", "red")
        )
        chosen = r.n == p.requested.n and r.kv_type == p.requested.kv_type
        table.add_row(
            r.label,
            str(r.n),
            r.kv_type,
            r.kv_layout,
            human_size(r.estimate.total),
            Text(*verdict),
            f"{r.max_fit_tokens:,}" if r.max_fit_tokens else Text("none", "red"),
            style="bold" if chosen else "",
        )
    r, e = p.requested, p.requested.estimate
    if r.over_context:
        verdict = Text(
            f"does not fit: prompt + {r.max_new_tokens} tokens exceeds the model's context", "yellow"
        )
    elif r.fits:
        verdict = Text(f"fits ({human_size(p.budget_bytes - e.total)} to spare)", "green")
    elif r.max_fit_tokens:
        verdict = Text(
            f"does not fit ({human_size(e.total - p.budget_bytes)} over): at most {r.max_fit_tokens:,} new tokens",
            "red",
        )
    else:
        verdict = Text(f"does not fit: not even one new token ({human_size(e.total - p.budget_bytes)} over)", "red")
    mib = 2**20
    asked = Text.assemble(
        ("requested: ", "bold"),
        f"{r.label} (N={r.n}), {r.max_new_tokens} new tokens, KV {r.kv_type} {r.kv_layout}: {human_size(e.total)} of "
        f"{human_size(p.budget_bytes)}\n  ",
        verdict,
        f"\n  weights {e.weights // mib:,} + KV {e.kv_cache // mib:,} ({r.n_ctx:,} cells) + compute "
        f"{e.compute // mib} + logits {e.outputs // mib} + tap/head {(e.tap + e.head) // mib} + runtime "
        f"{e.runtime // mib} MiB",
    )
    return Group(head, table, asked)
