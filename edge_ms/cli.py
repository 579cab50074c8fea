"""The `edge-ms` command. Thin: each command parses arguments and calls one library function."""

from __future__ import annotations

import functools
import sys

import click

from edge_ms.errors import EdgeMSError
from edge_ms.interrupts import import_held
from edge_ms.quants import KV_BYTES_PER_VALUE, QUANTS

_QUANT_NAMES = ", ".join(QUANTS)
_KV_TYPE_HELP = f"KV-cache type: {' or '.join(KV_BYTES_PER_VALUE)}."


def _one_line_errors(fn):
    """Turn EdgeMSError into one line on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            # Every command reads an ONNX head; imported here, where a Ctrl-C is one line.
            import_held("onnx", "onnxruntime")
            return fn(*args, **kwargs)
        except EdgeMSError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="edge-ms")
def main() -> None:
    """Reflective reasoning on device: sample N trajectories, score every step with the SPRM, keep the best."""


# Commands are registered below, one small function each.


def _parse_size(text: str | None) -> int | None:
    """'4GiB', '512MiB', '8G', '2000000000' -> bytes."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
             "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if value <= 0 or unit not in units:
        raise EdgeMSError(f"--memory {text}: not a size (use e.g. 4GiB, 512MiB)")
    return int(value * units[unit])


def device_options(fn):
    """Options every command that loads a model shares."""
    opts = [
        click.option("--model", "-m", default=None, help="Model directory, store name, or GGUF file (default: embedded model)."),
        click.option("--quant", default=None, help=f"Which GGUF of the model to use ({_QUANT_NAMES})."),
        click.option("--head", default=None, help="SPRM head file (.sprm.onnx), when --model is a bare GGUF."),
        click.option("--threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--n-gpu-layers", type=int, default=0, show_default=True, help="Layers to offload to the GPU."),
        click.option("--kv-type", default="f16", show_default=True, help=_KV_TYPE_HELP),
        click.option("--extra-bufts/--no-extra-bufts", default=None,
                     help="llama.cpp extra buffer types (weight repacking, AMX). Default: on unless the build has AMX."),
        click.option("--memory", default=None, help="Memory budget, e.g. 4GiB: plans N and the context to fit."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _load_reasoner(model, quant, head, threads, n_gpu_layers, kv_type, extra_bufts, memory, prompt_style=None):
    from edge_ms.model import DeviceSettings
    from edge_ms.reasoner import Reasoner

    settings = DeviceSettings(threads, n_gpu_layers, kv_type, extra_bufts)
    return Reasoner.load(model, quant=quant, head=head, settings=settings, memory_bytes=_parse_size(memory),
                         prompt_style=prompt_style)


@main.command()
@click.argument("prompt")
@device_options
@click.option("--mode", default="medium", show_default=True, help="low / medium / high = 2 / 8 / 32 trajectories.")
@click.option("--n", "n", type=int, default=None, help="Number of trajectories (overrides --mode).")
@click.option("--seed", type=int, default=None, help="Random seed (trajectory i uses seed + i).")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True)
@click.option("--temperature", type=float, default=0.6, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.05, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--strategy", default="best", show_default=True,
              help="best (SPRM best-of-N), majority, weighted (SPRM-weighted vote), prune (stop trajectories that "
                   "fall behind), beam (fork the best partial trajectories into the slots of the weakest), "
                   "early-stop (end once the SPRM-weighted vote is settled).")
@click.option("--beam-width", type=int, default=None,
              help="With --strategy beam: partial trajectories kept at each step (default N / 4).")
@click.option("--min-confidence", type=float, default=None,
              help="Say 'not sure' when the answer's calibrated confidence is below this (needs a calibrated head).")
@click.option("--raw", is_flag=True, help="Do not apply the model's chat template.")
@click.option("--prompt-style", default=None,
              help="chat (the question as one user turn) or arith (inside the few-shot arithmetic chat). "
                   "Default: arith for the embedded demo model, whose head was trained on it; else chat.")
@click.option("--kv-layout", default="auto", show_default=True,
              help="KV cache: unified (one pool all trajectories share), streams (one each), or auto (the plan's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_one_line_errors
def solve(prompt, model, quant, head, threads, n_gpu_layers, kv_type, extra_bufts, memory, mode, n, seed,
          max_new_tokens, temperature, top_p, repetition_penalty, stop, strategy, beam_width, min_confidence, raw,
          prompt_style, kv_layout, as_json) -> None:
    """Sample N reasoning trajectories for PROMPT, score every step, print the best answer."""
    import json

    from edge_ms.modes import resolve_n

    n_seq = resolve_n(mode, n)
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise EdgeMSError(f"--min-confidence {min_confidence}: must be a probability from 0 to 1")
    reasoner = _load_reasoner(model, quant, head, threads, n_gpu_layers, kv_type, extra_bufts, memory, prompt_style)
    calibration = reasoner.head.spec.calibration
    if min_confidence is not None and calibration is None:
        raise EdgeMSError(f"{reasoner.head.path}: --min-confidence needs a calibrated head and this one has no "
                          f"calibration (add one with `edge-ms calibrate`)")
    kwargs = dict(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  repetition_penalty=repetition_penalty, stop=stop, raw=raw, strategy=strategy, beam_width=beam_width,
                  kv_layout=kv_layout)
    if as_json or not sys.stderr.isatty():
        result = reasoner.solve(prompt, mode, n, **kwargs)
    else:
        from edge_ms.display import TrajectoryView

        with TrajectoryView(n_seq, title=f"{n_seq} trajectories ({mode if n is None else 'n=' + str(n)})",
                            confidence=calibration) as view:
            result = reasoner.solve(prompt, mode, n, on_event=view.update, **kwargs)
    not_sure = min_confidence is not None and (result.confidence or 0.0) < min_confidence
    if as_json:
        out = result.to_json()
        out.update(min_confidence=min_confidence, not_sure=not_sure)
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    from edge_ms.display import summary_lines

    for line in summary_lines(result):
        click.echo(line, err=True)
    if not_sure:
        click.echo(f"not sure: the answer below has a calibrated confidence of {result.confidence:.2f}, "
                   f"under --min-confidence {min_confidence:.2f}")
    click.echo(result.answer)


@main.command("pull")
@click.argument("repo_id")
@click.option("--quant", type=click.Choice(QUANTS), default="q4_k_m", show_default=True,
              help="GGUF type to convert to; pull again with another one to add it.")
@click.option("--revision", default=None, help="Branch, tag or commit on the Hub (default: main).")
@click.option("--name", default=None, help="Store name (default: the repo name, lower-cased).")
@click.option("--force", is_flag=True, help="Convert again and replace what the store holds under this name.")
@_one_line_errors
def pull_cmd(repo_id, quant, revision, name, force) -> None:
    """Download REPO_ID from the Hugging Face Hub, convert it, and add it to the local model store."""
    from edge_ms.store import pull

    files = pull(repo_id, quant=quant, revision=revision, name=name, force=force)
    click.echo(f"pulled {files.name} ({quant}): {files.gguf}")
    click.echo(f"use it with --model {files.name}")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array on stdout.")
@_one_line_errors
def list_cmd(as_json) -> None:
    """Show the models in the local store (EDGE_MS_HOME, default ~/.cache/edge_ms)."""
    import json

    from edge_ms.store import list_models, models_dir

    models = list_models()
    if as_json:
        rows = [dict(name=m.name, path=str(m.path), quants=list(m.quants), size_bytes=m.size_bytes,
                     fingerprint=m.fingerprint, note=m.note) for m in models]
        click.echo(json.dumps(rows, indent=2))
        return
    if not models:
        click.echo(f"no models in {models_dir()}; add one with `edge-ms pull REPO_ID`")
        return
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    from edge_ms.sizes import human_size

    table = Table("name", "quants", "size", "fingerprint", "path")
    for column in table.columns:
        column.no_wrap = True  # names, fingerprints and paths are copied: never cut or folded
    for m in models:
        fp = Text(m.fingerprint or "-") if m.note is None else Text("broken", style="red")
        table.add_row(Text(m.name), ", ".join(m.quants) or "-", human_size(m.size_bytes), fp, Text(str(m.path)))
    console = Console()
    # Rich cuts a table at the console's width (80 columns when piped): widen it to fit instead.
    width = Measurement.get(console, console.options.update(width=1 << 16), table).maximum
    Console(width=max(console.width, width)).print(table)
    for m in models:
        if m.note is not None:
            click.echo(f"{m.name}: broken: {m.note}")


@main.command("convert")
@click.argument("hf_dir")
@click.option("-o", "--out", "out_dir", required=True, help="Output directory (new unless --force).")
# A plain string, validated by edge_ms.convert, so a bad value is one error line, not a usage block.
@click.option("--quant", default="f16", show_default=True, help=f"GGUF type: {_QUANT_NAMES}.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR once the new conversion is complete.")
@_one_line_errors
def convert_cmd(hf_dir, out_dir, quant, force) -> None:
    """Convert a Hugging Face MetaStone-S1 checkpoint into a GGUF backbone and an ONNX SPRM head."""
    from edge_ms.convert import convert

    result = convert(hf_dir, out_dir, quant=quant, force=force)
    click.echo(f"backbone: {result.gguf_path}")
    click.echo(f"head:     {result.head_path}")
    click.echo(f"fingerprint {result.fingerprint}")


@main.command("serve")
@device_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free one; the log says which).")
@click.option("--api-key", default=None, envvar="EDGE_MS_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 requests (env: EDGE_MS_API_KEY).")
@click.option("--queue-size", type=int, default=16, show_default=True,
              help="Requests that may wait while one runs; more are answered 429.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Another name clients may use in Host (repeatable; '*': any). Default: loopback names and --host.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="A web origin whose pages may use the API, e.g. http://localhost:3000 (repeatable; '*': any).")
@_one_line_errors
def serve_cmd(model, quant, head, threads, n_gpu_layers, kv_type, extra_bufts, memory, host, port, api_key,
              queue_size, allowed_hosts, cors_origins) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health) on one loaded model."""
    from edge_ms.server import LOOPBACK_NAMES, check_settings, serve

    check_settings(queue_size=queue_size, api_key=api_key, port=port)
    reasoner = _load_reasoner(model, quant, head, threads, n_gpu_layers, kv_type, extra_bufts, memory)
    if api_key is None and host not in LOOPBACK_NAMES:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    try:
        serve(reasoner, host=host, port=port, api_key=api_key, queue_size=queue_size,
              allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    finally:
        reasoner.close()


@main.command("plan")
@click.option("--model", "-m", default=None, help="Model directory, store name, or GGUF file (default: embedded model).")
@click.option("--quant", default=None, help="Which GGUF of the model (with --shape: the size rule, default q4_k_m).")
@click.option("--shape", default=None, help="Plan a published size instead of a file: 1.5b, 7b or 32b.")
@click.option("--memory", default=None, help="Memory budget, e.g. 4GiB (default: 80% of available memory).")
@click.option("--mode", default="medium", show_default=True, help="low / medium / high = 2 / 8 / 32 trajectories.")
@click.option("--n", "n", type=int, default=None, help="Number of trajectories (overrides --mode).")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True)
@click.option("--kv-type", default="f16", show_default=True, help=_KV_TYPE_HELP)
@click.option("--prompt-tokens", type=int, default=256, show_default=True, help="Prompt length to plan for.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_one_line_errors
def plan_cmd(model, quant, shape, memory, mode, n, max_new_tokens, kv_type, prompt_tokens, threads, as_json) -> None:
    """Tell what fits in memory: N, new tokens per trajectory and KV-cache type, for a model and a budget."""
    import dataclasses
    import json

    from edge_ms.modes import resolve_n
    from edge_ms.plan import plan_for, plan_table

    label = mode if n is None else f"n={n}"
    p = plan_for(model, quant=quant, shape=shape, memory_bytes=_parse_size(memory), n=resolve_n(mode, n),
                 label=label, max_new_tokens=max_new_tokens, kv_type=kv_type, prompt_tokens=prompt_tokens, threads=threads)
    if as_json:
        out = dataclasses.asdict(p)
        for row in [out["requested"], *out["rows"]]:
            row["estimate"]["total"] = sum(row["estimate"].values())
        click.echo(json.dumps(out))
        return
    from rich.console import Console

    Console(width=max(Console().width, 100)).print(plan_table(p))



@main.command("train-sprm")
@click.option("--model", "-m", default=None, help="GGUF file, model directory or store name (default: embedded model).")
@click.option("--task", default="arith", show_default=True, help="arith, or a JSONL file with prompt/answer lines.")
@click.option("--output", "-o", required=True, help="Where to write the head (NAME.sprm.onnx).")
@click.option("--train-problems", type=int, default=200, show_default=True)
@click.option("--heldout-problems", type=int, default=100, show_default=True)
@click.option("--n", "n", type=int, default=8, show_default=True, help="Trajectories sampled per problem.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--epochs", type=int, default=40, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=int, default=5, show_default=True,
              help="Epochs of class-weighted BCE on every step before the agreement filter starts.")
@click.option("--delimiter", default=None, help='Step delimiter text, one token (default ".\\n\\n" with think markers, else "\\n").')
@click.option("--layer", type=int, default=None, help="Tap this layer alone (default: choose among --layers).")
@click.option("--layers", default=None,
              help="Candidate layers to choose among on the validation problems, comma separated "
                   "(default: n_layer/2, 3*n_layer/4, n_layer-2); all are tapped in one pass of sampling.")
@click.option("--losses", default="spr,bce,bce+spr", show_default=True,
              help="Losses to choose among: spr (the SPR loss from the start), bce (class-balanced BCE), "
                   "bce+spr (--warmup-epochs of BCE, then SPR).")
@click.option("--init", "init", default=None, help="Start from this head instead of a fresh one.")
@click.option("--threads", type=int, default=None, help="Threads in all (default: every core).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Sample this many problems at once, the threads split between them (small models: one per core).")
@click.option("--cache", default=None, help="Keep sampled trajectories here; a rerun reuses them (resume, retrain).")
@click.option("--calib-problems", type=int, default=50, show_default=True,
              help="Validation problems (train split, never trained on) to choose the recipe and calibrate on.")
@click.option("--force", is_flag=True, help="Overwrite an existing head file.")
@_one_line_errors
def train_sprm_cmd(model, task, output, train_problems, heldout_problems, n, seed, max_new_tokens, temperature,
                   epochs, lr, warmup_epochs, delimiter, layer, layers, losses, init, threads, workers, cache,
                   calib_problems, force) -> None:
    """Train an SPRM head on the frozen backbone from final-answer correctness alone (SPR loss)."""
    from pathlib import Path

    from rich.progress import Progress

    from edge_ms.model import DeviceSettings
    from edge_ms.sprm import TrainConfig, train_sprm
    from edge_ms.store import locate
    from edge_ms.tasks import load_jsonl, make_problems

    out = Path(output)
    if out.exists() and not force:
        raise EdgeMSError(f"{out}: already exists (use --force to replace it)")
    gguf, _ = locate(model)
    if task == "arith":
        # Validation problems come after the training ones in the train split: disjoint from both
        # the training problems and the test split the held-out problems come from.
        pool = make_problems("train", train_problems + calib_problems, seed)
        train, calib = pool[:train_problems], pool[train_problems:]
        heldout = make_problems("test", heldout_problems, seed)
    else:
        problems = load_jsonl(task)
        cut = max(1, int(len(problems) * 0.8))
        train, heldout = problems[:cut][:train_problems], problems[cut:][:heldout_problems]
        calib = problems[len(train):cut][:calib_problems]  # what --train-problems leaves of the first 80%
        if not heldout:
            raise EdgeMSError(f"{task}: too few problems to hold some out for evaluation")
    config = TrainConfig(n=n, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, epochs=epochs, lr=lr,
                         warmup_epochs=warmup_epochs, delimiter=delimiter, layer=layer, workers=workers,
                         candidate_layers=_int_list("--layers", layers), losses=_losses(losses))
    with Progress(transient=True) as bar:
        tasks: dict[str, object] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"sampling {phase} ({n} per problem)", total=total)
            bar.update(tasks[phase], completed=done)

        def on_epoch(e) -> None:
            # Its own key: "train" is the phase of sampling the training problems.
            if "epochs" not in tasks:
                tasks["epochs"] = bar.add_task("training", total=epochs)
            bar.update(tasks["epochs"], completed=e.epoch)

        def on_trial(t: dict) -> None:
            v = t["validation"]
            data = f"{t['problem_share']:.0%} of problems, {t['samples'] or n} per problem"
            bar.console.print(f"  layer {t['layer']:>3}  {t['loss']:<8} {data}: validation AUC {v['auc']:.3f}  "
                              f"best-of-{n} {v['sprm_best']:.3f}  weighted {v['sprm_weighted']:.3f}")

        report = train_sprm(gguf, train, heldout, out, config, DeviceSettings(n_threads=threads), init,
                            on_progress, on_epoch, cache, calib, on_trial)
    b, a = report.before, report.heldout
    click.echo(f"head: {report.head}  log: {report.log_path}  plot: {report.plot_path}")
    r = report.recipe
    click.echo(f"recipe: layer {r.layer}, loss {r.loss}, {r.problem_share:.0%} of {len(train)} problems, "
               f"{r.samples or n} trajectories per problem" + ("" if report.trials else " (nothing to choose among)"))
    if a:
        _print_heldout(a, b, n)
    if report.calibration is None:
        click.echo("no calibration: no validation problems left (lower --train-problems, or run edge-ms calibrate)")
    else:
        _print_calibration(report.calibration)


def _int_list(option: str, text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise EdgeMSError(f"{option} {text}: expected whole numbers separated by commas, e.g. 15,22,28") from None


def _losses(text: str) -> tuple[str, ...]:
    from edge_ms.sprm import LOSSES

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in LOSSES]
    if bad or not names:
        raise EdgeMSError(f"--losses {text}: choose from {', '.join(LOSSES)}")
    return names


def _print_heldout(a: dict, b: dict, n: int) -> None:
    click.echo(f"held-out ({a['problems']} problems, N={n}): pass@1 {a['pass@1']:.3f}  oracle {a['oracle']:.3f}  "
               f"majority {a['majority']:.3f}")
    click.echo(f"  SPRM best-of-{n}: {b['sprm_best']:.3f} before training -> {a['sprm_best']:.3f} after  "
               f"(weighted vote {a['sprm_weighted']:.3f}, random pick {a['random']:.3f}, AUC {a['auc']:.3f})")


def _print_calibration(report) -> None:
    f, c = report.fit, report.fit.calibration
    numbers = f"a={c.a:.4g} b={c.b:.4g}" if c.method == "platt" else f"{len(c.z)} points"
    click.echo(f"calibration: {c.method} ({numbers}) on {f.trajectories} trajectories of {f.problems} problems "
               f"({f.right} right): ECE {f.ece:.3f}, out of fold {f.oof_ece:.3f} (10 bins)")
    shown = report.shown
    click.echo(f"  as solve shows it (best-of-N, {shown['problems']} problems): ECE {shown['ece_10_bins']:.3f}, "
               f"out of fold {shown['out_of_fold_ece_10_bins']:.3f}; mean confidence "
               f"{shown['mean_confidence']:.3f}, right {shown['accuracy']:.3f}")
    click.echo(f"  fit: {report.log_path}  reliability diagram: {report.plot_path}")


@main.command("calibrate")
@click.option("--model", "-m", default=None, help="GGUF file, model directory or store name (default: embedded model).")
@click.option("--quant", default=None, help="Which GGUF of the model to use.")
@click.option("--head", default=None, help="Head to calibrate (default: the model's own).")
@click.option("--task", required=True, help="A JSONL file with prompt/answer lines, or arith (train split after --skip).")
@click.option("--output", "-o", default=None, help="Where to write the calibrated head (default: replace the head, with --force).")
@click.option("--problems", type=int, default=None, help="Use at most this many problems (arith: 150).")
@click.option("--skip", type=int, default=1000, show_default=True,
              help="arith: leave out the first K train-split problems, those a head trained on (the shipped head: 1000).")
@click.option("--n", "n", type=int, default=8, show_default=True, help="Trajectories sampled per problem.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--method", default="auto", show_default=True, help="platt, isotonic, or auto (lower out-of-fold log-loss).")
@click.option("--threads", type=int, default=None, help="Threads in all (default: every core).")
@click.option("--workers", type=int, default=1, show_default=True, help="Sample this many problems at once.")
@click.option("--cache", default=None, help="Keep sampled trajectories here; a rerun reuses them.")
@click.option("--force", is_flag=True, help="Overwrite an existing head file (the output, or the head itself).")
@_one_line_errors
def calibrate_cmd(model, quant, head, task, output, problems, skip, n, seed, max_new_tokens, temperature, method,
                  threads, workers, cache, force) -> None:
    """Fit a calibrated confidence for a head's trajectory scores on labelled problems and store it in the head."""
    from pathlib import Path

    from rich.progress import Progress

    from edge_ms.model import DeviceSettings
    from edge_ms.sprm import TrainConfig, calibrate_sprm
    from edge_ms.store import locate
    from edge_ms.tasks import load_jsonl, make_problems

    if method not in ("auto", "platt", "isotonic"):
        raise EdgeMSError(f"--method {method}: unknown (choose from auto, platt, isotonic)")
    gguf, head_path = locate(model, quant, head)
    if head_path is None:
        raise EdgeMSError(f"{gguf}: no SPRM head given (pass --head FILE.sprm.onnx)")
    out = Path(output) if output else Path(head_path)
    if out.exists() and not force:
        hint = "" if output else ", or -o NEW.sprm.onnx"
        raise EdgeMSError(f"{out}: already exists (use --force to replace it{hint})")
    if problems is not None and problems < 1:
        raise EdgeMSError(f"--problems {problems}: must be at least 1")
    if task == "arith":
        if skip < 0:
            raise EdgeMSError(f"--skip {skip}: must be 0 or more")
        picked = make_problems("train", skip + (150 if problems is None else problems), seed)[skip:]
        source = f"arith train split (seed {seed}), problems {skip} to {skip + len(picked) - 1}"
    else:
        picked = load_jsonl(task)[:problems]
        source = f"{Path(task).name}, {len(picked)} problems"
    if not picked:
        raise EdgeMSError(f"{task}: no problems to calibrate on")
    config = TrainConfig(n=n, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, workers=workers)
    with Progress(transient=True) as bar:
        job = bar.add_task(f"sampling {len(picked)} problems ({n} per problem)", total=len(picked))
        report = calibrate_sprm(gguf, head_path, picked, out, config, DeviceSettings(n_threads=threads), method,
                                lambda _phase, done, _total: bar.update(job, completed=done), cache, source)
    click.echo(f"head: {report.head}")
    _print_calibration(report)


if __name__ == "__main__":
    main()
