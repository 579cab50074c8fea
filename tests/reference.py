"""Independent PyTorch reference for MetaStone-S1 scoring (dev/test only).

Built on transformers + tokenizers and deliberately free of any edge_ms import: the runtime is
checked against this module, so the two must not share code. It follows the published
"score server" path: one full forward pass over the finished sequence, the SPRM head on
``hidden_states[-2]``, and the evaluation-code position rules of docs/method.md, section 3.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import Qwen2ForCausalLM

SCORE_CLAMP = 1e-10


def make_head(hidden_size: int) -> nn.Sequential:
    """The SPRM head exactly as published; Dropout makes the state-dict keys 0.* and 3.*."""
    c = hidden_size
    return nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * c, 1))


def load_model(model_dir: str | Path) -> tuple[Qwen2ForCausalLM, Tokenizer, nn.Sequential]:
    """The checkpoint in float32 eval mode, its `tokenizers` tokenizer and the SPRM head."""
    model_dir = Path(model_dir)
    # Eager attention: the plainest kernel, so the reference does not depend on SDPA backends.
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # weights_only: a .pt file is a pickle, and plain unpickling would run code from the file.
    state = torch.load(model_dir / "score_module.pt", map_location="cpu", weights_only=True)
    head = make_head(model.config.hidden_size)
    head.load_state_dict(state)
    head.float().eval()
    return model, tokenizer, head


@torch.no_grad()
def hidden_and_logits(model: Qwen2ForCausalLM, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``hidden_states[-2]`` ([T, c], output of decoder layer n_layer-2) and logits ([T, V])."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-2][0].float().numpy()
    logits = out.logits[0].float().numpy()
    return hidden, logits


def step_positions(
    ids: list[int], delimiter_ids: list[int], think_start_id: int, think_end_id: int
) -> list[int]:
    """Positions whose hidden state is scored (docs/method.md, section 3, evaluation variant)."""
    delims = set(delimiter_ids)
    n = len(ids)
    # Rule 5 bounds: a marker counts only when it occurs exactly once.
    start = ids.index(think_start_id) if ids.count(think_start_id) == 1 else 0
    end = ids.index(think_end_id) if ids.count(think_end_id) == 1 else n
    positions = []
    for p in range(n):
        if ids[p] not in delims:
            continue
        if p > 0 and ids[p - 1] in delims:  # rule 2: not the first of its run
            continue
        if p > 0 and ids[p - 1] == think_start_id:  # rule 3
            continue
        q = p - 1  # rule 4: score the token before the delimiter
        if start < q < end:  # rule 5: strictly inside the think region
            positions.append(q)
    return positions


@torch.no_grad()
def head_scores(head: nn.Sequential, hidden_rows: np.ndarray) -> np.ndarray:
    """sigmoid(head(h)) for each row of ``hidden_rows`` ([K, c]) -> [K] float32."""
    rows = torch.as_tensor(np.asarray(hidden_rows, dtype=np.float32)).reshape(-1, head[0].in_features)
    return torch.sigmoid(head(rows)).reshape(-1).numpy().astype(np.float32)


def trajectory_score(step_scores) -> float:
    """Geometric mean of the step scores, each clamped to >= 1e-10; 0.0 when there is none."""
    scores = [float(s) for s in step_scores]
    if not scores:
        return 0.0
    return math.exp(sum(math.log(max(s, SCORE_CLAMP)) for s in scores) / len(scores))


def score_sequence(model: Qwen2ForCausalLM, head: nn.Sequential, ids: list[int], spec: dict) -> dict:
    """Score a whole sequence with one full forward pass, the way the published score server does.

    ``spec`` needs ``step_delimiter_ids``, ``think_start_id`` and ``think_end_id``.
    """
    positions = step_positions(ids, spec["step_delimiter_ids"], spec["think_start_id"], spec["think_end_id"])
    hidden, _ = hidden_and_logits(model, ids)
    scores = head_scores(head, hidden[positions]) if positions else np.zeros(0, np.float32)
    return {
        "step_positions": positions,
        "step_scores": scores.tolist(),
        "score": trajectory_score(scores),
    }
