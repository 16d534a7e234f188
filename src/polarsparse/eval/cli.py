"""``polarsparse eval``: perplexity and zero-shot accuracy, dense and sparse variants side by side.

Variants (``--variants``, comma separated) name what a decode step reads:

* ``dense``: no routers;
* ``default``: the router bundle's default settings;
* otherwise ``+``-joined parts: ``kv:F`` / ``query:F`` (heads selected per sequence at density F by
  KV group or by query head; layer 0 dense), ``importance`` (per-layer head budgets from measured
  head importance instead of a uniform k), ``mlp`` (MLP top-k from the calibrated table of the live
  batch size) or ``mlp:F`` (a fixed MLP density F). Example: ``dense,kv:0.5,kv:0.3,query:0.5+mlp``.
"""
from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path

from polarsparse.config import SparsityConfig
from polarsparse.errors import PolarsparseError
from polarsparse.eval.harness import EvalSettings, evaluate
from polarsparse.eval.report import accuracy_markdown, read_results, write_results
from polarsparse.eval.tasks import MC_TASKS, OTHER_TASKS, check_tasks

log = logging.getLogger(__name__)

DEFAULT_TASKS = ",".join((*OTHER_TASKS, *MC_TASKS))


class VariantError(PolarsparseError, ValueError):
    """A --variants entry that does not parse."""


def parse_variant(spec: str) -> SparsityConfig | None:
    """A variant spec (see the module docstring) -> SparsityConfig, or None for dense."""
    spec = spec.strip()
    if spec == "dense":
        return None
    if spec == "default":
        return SparsityConfig()
    fields: dict = {"attention": False, "mlp": False}
    for part in spec.split("+"):
        name, _, value = part.partition(":")
        try:
            if name in ("kv", "query"):
                fields.update(attention=True, head_unit=name, head_density=float(value))
            elif name == "mlp":
                fields.update(mlp=True, mlp_density=float(value) if value else None)
            elif name == "importance" and not value:
                fields["head_budget"] = "importance"
            else:
                raise ValueError
        except ValueError:
            raise VariantError(f"cannot parse variant part {part!r} of {spec!r}; expected kv:F, query:F, "
                               "importance, mlp or mlp:F joined by '+', or dense / default") from None
    return SparsityConfig(**fields)


def build_variants(engine, routers: str | None, specs: list[str]) -> dict:
    """variant name -> planner factory (None: dense)."""
    from polarsparse.sparsity.bundle import RouterBundle
    from polarsparse.sparsity.runtime import make_planners, resolve_config, resolve_routers

    configs = {s: parse_variant(s) for s in specs}
    bundle = None
    if any(c is not None for c in configs.values()):
        bundle = RouterBundle.load(resolve_routers(routers, engine.model_path))  # run() checked routers
        bundle.check_model(engine.model)
    return {s: None if c is None else make_planners(bundle, resolve_config(c, bundle.defaults), engine.device,
                                                     engine.dtype) for s, c in configs.items()}


def add_arguments(p) -> None:
    from polarsparse.cli import add_model_arguments, add_parallel_arguments

    add_model_arguments(p)
    add_parallel_arguments(p)
    d = EvalSettings()
    p.add_argument("--routers", default=None, help="router bundle directory, or 'default' (the bundle shipped for "
                   "the embedded model; used automatically with the default model)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated (default: {DEFAULT_TASKS})")
    p.add_argument("--variants", default=None, help="comma-separated variants, e.g. dense,kv:0.5,query:0.3+mlp "
                   "(default: dense, plus the bundle default when routers are in use)")
    p.add_argument("--limit", type=int, default=d.limit, help=f"items per task (default {d.limit}; 0 = all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences decoded together (the live "
                   f"batch size the MLP top-k is chosen for; default {d.batch_size})")
    p.add_argument("--ppl-windows", type=int, default=d.ppl_windows, help="perplexity: number of windows")
    p.add_argument("--ppl-window", type=int, default=d.ppl_window, help="perplexity: tokens per window")
    p.add_argument("--ppl-context", type=int, default=d.ppl_context,
                   help="perplexity: leading tokens of a window used as dense context (the rest are scored)")
    p.add_argument("--json", type=Path, default=None, help="write all metrics and settings here")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="do not evaluate: merge these --json results (same variants) into one table")
    p.add_argument("--markdown", type=Path, default=None, help="write the accuracy table here")


def run(args) -> int:
    if args.from_json:
        return _merge(args)
    from polarsparse.engine.engine import LLMEngine

    from polarsparse.sparsity.runtime import implicit_routers

    routers = args.routers if args.routers is not None else implicit_routers(args.model)
    specs = [v.strip() for v in args.variants.split(",")] if args.variants else (
        ["dense", "default"] if routers else ["dense"])
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    s = EvalSettings(args.limit or None, args.batch_size, args.ppl_windows, args.ppl_window, args.ppl_context)
    check_tasks(tasks)  # fail fast, before loading the model
    if any(parse_variant(spec) is not None for spec in specs) and routers is None:
        raise VariantError("sparse variants need --routers (a bundle directory, or 'default')")
    t0 = time.perf_counter()
    if args.tensor_parallel_size == 1:
        engine = LLMEngine(args.model, dtype=args.dtype, device=args.device)
        results = evaluate(engine, tasks, build_variants(engine, routers, specs), s)
    else:
        results, engine = evaluate_sharded(args, routers, specs, tasks, s)
    table = accuracy_markdown(results, specs)
    print(table)
    meta = {"command": _command(args, routers, tasks, specs), "date": datetime.date.today().isoformat(),
            "model": engine.model_path.name, "routers": routers, "dtype": str(engine.dtype),
            "device": str(engine.device), "settings": s.__dict__, "variants": specs,
            "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        write_results(args.json, results, meta)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"Command: `{meta['command']}` ({meta['date']}, {meta['device']}, "
                                 f"{meta['dtype']}, {meta['seconds']:.0f} s)\n\n{table}")
    return 0


def evaluate_sharded(args, routers: str | None, specs: list[str], tasks: list[str], s: EvalSettings):
    """Tensor-parallel evaluation: the ranks of one engine cannot switch router configurations, so
    each variant gets its own engine (routers and settings fixed at start, every rank selecting
    among its own heads and neurons) and scores with that engine's planners. -> (results, last engine)"""
    from polarsparse.config import EngineConfig
    from polarsparse.engine.engine import LLMEngine

    results: dict = {}
    engine = None
    for spec in specs:
        config = parse_variant(spec)
        ecfg = EngineConfig(tensor_parallel_size=args.tensor_parallel_size)
        engine = LLMEngine(args.model, dtype=args.dtype, device=args.device, engine_config=ecfg,
                           routers=routers if config is not None else None, sparsity=config)
        try:
            part = evaluate(engine, tasks, {spec: engine.runner.planner_factory}, s)
        finally:
            engine.close()
        for task, res in part.items():
            if task in results:
                results[task].metrics.update(res.metrics)
                results[task].seconds += res.seconds
            else:
                results[task] = res
    return results, engine


def _command(args, routers: str | None, tasks: list[str], specs: list[str]) -> str:
    """The full command that reproduces this run (every setting explicit)."""
    parts = ["polarsparse eval"]
    for flag, value in (("--model", args.model), ("--routers", routers), ("--device", args.device),
                        ("--tensor-parallel-size", args.tensor_parallel_size if args.tensor_parallel_size > 1 else None),
                        ("--dtype", args.dtype), ("--tasks", ",".join(tasks)), ("--variants", ",".join(specs)),
                        ("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--ppl-windows", args.ppl_windows), ("--ppl-window", args.ppl_window),
                        ("--ppl-context", args.ppl_context)):
        if value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _merge(args) -> int:
    try:
        results, variants, metas = read_results(args.from_json)
    except (OSError, ValueError, KeyError) as e:
        raise VariantError(f"cannot merge {', '.join(map(str, args.from_json))}: {e}") from e
    table = accuracy_markdown(results, variants)
    print(table)
    if args.markdown:
        commands = "\n".join(f"    {m['command']}   # {m['date']}, {m['device']}, {m['seconds']:.0f} s" for m in metas)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"Commands:\n\n{commands}\n\n{table}")
    return 0
