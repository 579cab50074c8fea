"""Tap rows of a GPU-resident layer: engine on CUDA (all layers offloaded) vs the same on CPU."""
import json
import logging
import os
import sys

import numpy as np

os.environ["EDGE_MS_LLAMA_LOG"] = "1"
logging.basicConfig(level=logging.DEBUG, format="%(message)s", stream=sys.stdout)
import edge_ms  # noqa: E402, F401, I001  (first: it loads onnx before llama.cpp, see edge_ms/__init__.py)
import llama_cpp  # noqa: E402

from edge_ms.engine import Engine  # noqa: E402
from edge_ms.sampling import SamplingParams  # noqa: E402
from edge_ms.head import load_head  # noqa: E402
from edge_ms.model import DeviceSettings, Model  # noqa: E402

print("llama_supports_gpu_offload:", llama_cpp.llama_supports_gpu_offload())
FX = "tmp/gpu/fx/out"
head = load_head(f"{FX}/tiny-qwen2.sprm.onnx")
runs = {}
for ngl in (0, 99):
    logging.getLogger().setLevel(logging.DEBUG if ngl else logging.WARNING)
    m = Model(f"{FX}/tiny-qwen2-f32.gguf", DeviceSettings(n_gpu_layers=ngl, n_threads=8))
    logging.getLogger().setLevel(logging.WARNING)
    e = Engine(m, head, keep_rows=True)
    ids = m.tokenize(m.apply_chat_template([{"role": "user", "content": "Compute 12 * 7 step by step."}]),
                     add_special=False)
    out = []
    for temp, seed in ((0.0, 1), (0.6, 11)):
        done = [ev for ev in e.generate(ids, 4, SamplingParams(temperature=temp, seed=seed, max_new_tokens=80))
                if ev.kind == "done"][0]
        out.append([(t.tokens, t.tracker.candidates, t.step_rows()) for t in done.trajectories])
    runs[ngl] = out
    e.close()
    m.close()
report = {}
for k, name in enumerate(("greedy", "sampled")):
    cpu, gpu = runs[0][k], runs[99][k]
    same_tokens = [a[0] == b[0] for a, b in zip(cpu, gpu)]
    diffs, rowdiffs, n_steps = [], [], 0
    for a, b in zip(cpu, gpu):
        if a[0] != b[0]:
            continue
        assert [q for q, _ in a[1]] == [q for q, _ in b[1]]
        diffs += [abs(x - y) for (_, x), (_, y) in zip(a[1], b[1])]
        if len(a[2]):
            rowdiffs.append(float(np.abs(a[2] - b[2]).max() / np.abs(a[2]).max()))
        n_steps += len(a[1])
    report[name] = {"same_tokens": same_tokens, "steps_compared": n_steps,
                    "max_step_score_diff": max(diffs) if diffs else None,
                    "max_rel_row_diff": max(rowdiffs) if rowdiffs else None}
print(json.dumps(report, indent=1))
# Greedy decoding must give the same trajectories and step scores; sampled ones may part ways
# at the first token where GPU and CPU arithmetic differ (reported, not judged).
g = report["greedy"]
ok = all(g["same_tokens"]) and g["steps_compared"] > 0 and g["max_step_score_diff"] < 2e-2
print("GPU TAP CHECK:", "PASS" if ok else "FAIL")
