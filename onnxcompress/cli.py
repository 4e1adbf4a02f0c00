"""Command line: a thin layer over :mod:`onnxcompress.api`.

Exit codes: 0 ok, 1 validation gate failed, 2 bad input or usage, 3 a pass or internal failure.
Errors print one line to stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console

from onnxcompress import api
from onnxcompress._version import __version__
from onnxcompress.core import serde
from onnxcompress.core.errors import GateFailed, InputError, OnnxCompressError
from onnxcompress.core.fileio import atomic_write, file_record
from onnxcompress.core.pass_api import Numerics
from onnxcompress.core.shapes import parse_dims
from onnxcompress.pipeline.auto_space import parse_space
from onnxcompress.pipeline.manager import registry
from onnxcompress.pipeline.recipes import builtin_recipes, load_recipe
from onnxcompress.pipeline.validate import Gate, gate_problem
from onnxcompress.reporting.display import (
    show_bench,
    show_metrics,
    show_nodes,
    show_outliers,
    show_passes,
    show_report,
    show_transformer,
    show_validation,
)
from onnxcompress.runtime import bench as _bench
from onnxcompress.runtime.detection import DET_LAYOUTS
from onnxcompress.runtime.tasks import TASKS, TaskSpec

__all__ = ["DIM_HELP", "GLOBAL_FLAGS", "PREPROCESS_HELP", "cli", "hoist_global_flags", "main"]

log = logging.getLogger("onnxcompress")

_STATE = {"debug": False}


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def _setup_logging(verbose: int, debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug or verbose > 1 else logging.INFO if verbose else logging.WARNING
    level = logging.ERROR if quiet and not (debug or verbose) else level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxcompress")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Debug logging and full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No tables, no progress bars; errors only.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool, quiet: bool) -> None:
    """Make ONNX models smaller and faster, and prove they still work."""
    _STATE["debug"] = debug
    _setup_logging(verbose, debug, quiet)
    ctx.obj = {"quiet": quiet, "progress": not quiet}


#: ``--preprocess`` help: every key, its default, the order of operations and the channel order.
PREPROCESS_HELP = (
    "How image folders become inputs: KEY=VALUE,... or a TOML file with the same keys. "
    "size=HxW (default: the model's static spatial dims); resize=stretch|crop (default stretch; crop: "
    "shorter side to size, then centre crop); order=RGB|BGR|L (default RGB; L is grayscale, 1 channel); "
    "scale=S (default 1/255); mean=a/b/c (default 0) and std=a/b/c (default 1), one value or one per "
    "channel, in the channel order of order=; layout=NCHW|NHWC (default NCHW). Each image is read, "
    "converted to order's channels, resized, then x = (pixel * scale - mean) / std, then laid out.")


#: ``--dim`` help: where the values of symbolic input dims come from.
DIM_HELP = ("Value of a symbolic input dim, e.g. --dim height=320 (repeatable). Dims not given take the "
            "shapes of the first batch of the data (--calib, else --data); batch dims (leading axis) 1; "
            "any other dim left is guessed as 32, with a warning.")


def _data_options(f):
    f = click.option("--dim", "dims", multiple=True, metavar="NAME=N", help=DIM_HELP)(f)
    f = click.option("--batch-size", default=32, show_default=True, help="Batch size for ORT runs.")(f)
    f = click.option("--samples", type=int, default=None, help="Use at most N validation samples.")(f)
    f = click.option("--preprocess", default=None, metavar="SPEC|TOML", help=PREPROCESS_HELP)(f)
    f = click.option("--seed", default=0, show_default=True, help="Seed for random inputs and passes.")(f)
    return f


def _gate_options(f):
    f = click.option("--max-rel-err", type=float, default=None, help="Max error relative to max|ref| (exact default 1e-4).")(f)
    f = click.option("--min-sqnr", type=float, default=None, help="Minimum SQNR in dB.")(f)
    f = click.option("--min-top1-agreement", type=float, default=None, help="Minimum top-1 agreement (0..1).")(f)
    f = click.option("--max-top1-drop", type=float, default=None, help="Max accuracy drop in points (needs labels).")(f)
    f = click.option("--min-cosine", type=float, default=None, help="Minimum cosine similarity per output.")(f)
    f = click.option("--slices", default=None, metavar="OUTPUT:START:STOP,...", help=_SLICES_HELP)(f)
    f = click.option("--min-det-f1", type=float, default=None,
                     help="Minimum detection F1 vs the original's detections (0..1; detection outputs).")(f)
    f = click.option("--min-seg-miou", type=float, default=None,
                     help="Minimum mean IoU of the argmax maps vs the original's (0..1; segmentation outputs).")(f)
    f = click.option("--min-emb-cosine", type=float, default=None,
                     help="Minimum per-sample cosine of embeddings (-1..1; --task embedding).")(f)
    return _task_options(f)


_TASK_HELP = ("Task metrics vs the original: classification (top-5 agreement), detection (YOLO-style heads "
              "decoded, NMS, precision/recall/F1 of the boxes), embedding (per-sample cosine, nearest-neighbour "
              "agreement), segmentation (argmax agreement, mIoU); none; auto infers it from the output layout "
              "only when unambiguous ([N, C] classifier, YOLOv8 head [N, 4+nc, A], [N, C, H, W] with C <= 64) "
              "and says so in one line.")


def _task_options(f):
    f = click.option("--det-layout", type=click.Choice(DET_LAYOUTS), default="auto", show_default=True,
                     help="Detection head: yolov8 (no objectness), yolov5 (objectness), auto: yolov8 for "
                          "[N, 4+nc, A], yolov5 for [N, A, 5+nc].")(f)
    f = click.option("--det-iou", type=float, default=0.45, show_default=True, help="Detection NMS IoU threshold.")(f)
    f = click.option("--det-conf", type=float, default=0.25, show_default=True,
                     help="Detection confidence threshold.")(f)
    f = click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True, help=_TASK_HELP)(f)
    return f


def _task_spec(kw: dict) -> TaskSpec:
    return TaskSpec(kw.pop("task"), det_conf=kw.pop("det_conf"), det_iou=kw.pop("det_iou"),
                    det_layout=kw.pop("det_layout"))


_SLICES_HELP = ("Also measure channel slices along axis 1 (the feature axis), gated like whole outputs: "
                "OUTPUT:START:STOP, comma-separated; OUTPUT a name or an index, STOP optional (to the end), "
                "e.g. output0:0:4,output0:4: . Without it, outputs of rank >= 3 whose channels form groups of "
                "clearly different scale (>10x) are sliced automatically.")


_GATE_KEYS = ("min_cosine", "max_top1_drop", "min_top1_agreement", "min_sqnr", "max_rel_err", "min_det_f1",
              "min_seg_miou", "min_emb_cosine")


def _gate_overrides(kw: dict) -> dict:
    """The gate thresholds given on the command line, each checked against its range."""
    gate = {k: kw.pop(k) for k in _GATE_KEYS}
    for key, value in gate.items():
        problem = None if value is None else gate_problem(key, value)
        if problem:
            raise InputError(f"--{key.replace('_', '-')} {value:g}: {problem}")
    return gate


def _write_json(target: str | None, payload: dict) -> None:
    if not target:
        return
    text = json.dumps(payload, indent=2, default=str)
    if target == "-":
        click.echo(text)
        return
    atomic_write(target, lambda fh: fh.write((text + "\n").encode("utf-8")))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output model (default: <model name>.opt.onnx in the current folder).")
@click.option("--passes", "spec", default=None, metavar="SPEC",
              help="name[:key=value[:key=value]],name2,...  (see `onnxcompress passes`).")
@click.option("--recipe", default=None, metavar="NAME|TOML", help="A built-in recipe or a recipe file (default: default).")
@click.option("--calib", default=None, metavar="PATH", help="Calibration data: .npz, folder of .npz/.npy, or image folder.")
@click.option("--calib-random", type=int, default=None, metavar="N", help="Use N random calibration samples (warns).")
@click.option("--data", default=None, metavar="PATH", help="Validation data (default: --calib, else 8 random samples).")
@click.option("--no-validate", is_flag=True, help="Skip validation against the original (not recommended).")
@click.option("--force", is_flag=True, help="Write the model even if the validation gate fails (exit code stays 1).")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the report as JSON ('-' for stdout).")
@click.option("--external-data/--no-external-data", default=None, help="Save weights to <output>.data (default: only above 2 GB).")
@click.option("--reference", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Validate against this model instead of MODEL (same inputs and outputs): the true original when "
                   "MODEL is itself an optimized model, so that metrics of a chain stay measured against it.")
@_gate_options
@_data_options
@click.pass_obj
def optimize(obj: dict, model: Path, output: Path | None, spec: str | None, recipe: str | None, calib: str | None,
             calib_random: int | None, data: str | None, no_validate: bool, force: bool, json_path: str | None,
             external_data: bool | None, reference: Path | None, **kw) -> None:
    """Run a pipeline of passes on MODEL, validate against the original, and save."""
    gate, task = _gate_overrides(kw), _task_spec(kw)
    output = output or Path(model.name.removesuffix(".onnx") + ".opt.onnx")
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise InputError(f"{output}: output path is the input model; choose another output")
    if calib is not None and calib_random is not None:
        raise InputError("give --calib or --calib-random, not both")
    calib_src = f"random:{calib_random}" if calib_random is not None else calib
    console = _console()
    show = {"quiet": obj["quiet"] or json_path == "-"}
    try:
        result, report = api.optimize(
            model, spec, recipe=recipe if spec is None else _no_both(recipe), calib=calib_src, data=data,
            validate=not no_validate, gate=gate, force=force, seed=kw["seed"], batch_size=kw["batch_size"],
            samples=kw["samples"], dims=parse_dims(kw["dims"]), preprocess=kw["preprocess"], progress=obj["progress"],
            slices=kw["slices"], reference=reference, task=task)
    except GateFailed as exc:
        _print_report(show, console, exc.report)
        _write_json(json_path, {"model": str(model), "output": None, **exc.report.as_dict(), "output_model": None})
        raise
    if report.extra.get("dry_run"):
        _print_report(show, console, report)
        _write_json(json_path, {"model": str(model), "output": None, **report.as_dict(), "output_model": None})
        if not show["quiet"]:
            console.print("dry run: the plan above; no model written")
        return
    serde.save_model(result, output, external=external_data, protect=model)
    _print_report(show, console, report)
    data_files = [output.name + ".data"] if serde.saves_external(result, external_data) else []
    _write_json(json_path, {"model": str(model), "output": str(output), **report.as_dict(),
                            "output_model": file_record(output, data_files).as_dict() if json_path else None})
    if not show["quiet"]:
        console.print(f"wrote {output}")
    if not report.passed:
        raise GateFailed("validation gate failed (written anyway because of --force)")


def _no_both(recipe: str | None) -> None:
    if recipe is not None:
        raise InputError("give --passes or --recipe, not both")
    return None


def _print_report(obj: dict, console: Console, report: api.Report) -> None:
    if not obj["quiet"]:
        show_report(console, report.before, report.after, report.passes, report.validation)
        reference = report.extra.get("reference") or {}
        if reference.get("given") and report.validation is not None:
            console.print(f"metrics measured against --reference {reference.get('path')}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write metrics as JSON ('-' for stdout).")
@click.option("--top", default=10, show_default=True, help="Show the N nodes with the most MACs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help=DIM_HELP)
@click.option("--calib", default=None, metavar="PATH",
              help="Data whose first sample gives the symbolic dims; its first 256 samples also give the activation "
                   "outlier statistics of every MatMul/Gemm input (per-channel max|x|: max / median).")
@click.option("--data", default=None, metavar="PATH", help="As --calib for the dims (used when --calib is not given).")
@click.option("--preprocess", default=None, metavar="SPEC|TOML", help=PREPROCESS_HELP)
@click.option("--nodes", "all_nodes", is_flag=True,
              help="Also list every node: name (what exclude= takes), op type, output shapes.")
@click.pass_obj
def inspect(obj: dict, model: Path, json_path: str | None, top: int, dims: tuple[str, ...], calib: str | None,
            data: str | None, preprocess: str | None, all_nodes: bool) -> None:
    """Size, parameters, MACs (per node and total) and op counts of MODEL, at the shapes of --calib/--data;
    with --calib, activation outlier statistics per MatMul/Gemm input (whether ``smooth`` will help)."""
    metrics = api.inspect(model, parse_dims(dims), calib=calib, data=data, preprocess=preprocess)
    used = {name: d["value"] for name, d in metrics.dims.items()}  # the same shapes, resolved once
    nodes = api.list_nodes(model, used) if all_nodes else None
    blocks = api.transformer_blocks(model)
    if json_path != "-" and not obj["quiet"]:
        show_metrics(_console(), metrics, top)
        if blocks["attention"]:
            show_transformer(_console(), blocks)
        if nodes is not None:
            show_nodes(_console(), nodes)
    outliers = api.activation_outliers(model, calib, used, preprocess=preprocess) if calib is not None else None
    if outliers is not None and json_path != "-" and not obj["quiet"]:
        show_outliers(_console(), outliers)
    payload = metrics.as_dict()
    if blocks["attention"]:
        payload["transformer"] = blocks
    if nodes is not None:
        payload["nodes"] = [dataclasses.asdict(n) for n in nodes]
    if outliers is not None:
        payload["activation_outliers"] = [o.as_dict() for o in outliers]
    _write_json(json_path, payload)


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", default=None, metavar="PATH", help="Inputs (.npz with optional labels, folder, images); default random.")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write metrics as JSON ('-' for stdout).")
@click.option("--no-gate", is_flag=True, help="Only measure: no default gate (thresholds given still apply).")
@_gate_options
@_data_options
@click.pass_obj
def compare(obj: dict, reference: Path, candidate: Path, data: str | None, json_path: str | None, no_gate: bool,
            **kw) -> None:
    """Compare CANDIDATE's outputs with REFERENCE's; exit 1 if the gate fails (by default the lossy
    gate: cosine >= 0.99 on every output and channel slice, accuracy drop <= 1 point with labels)."""
    overrides, task = _gate_overrides(kw), _task_spec(kw)
    given = {k: v for k, v in overrides.items() if v is not None}
    gate = (Gate(**given) if given else None) if no_gate else Gate.for_numerics(Numerics.LOSSY, **given)
    report = api.compare(reference, candidate, data, samples=kw["samples"], seed=kw["seed"],
                         batch_size=kw["batch_size"], dims=parse_dims(kw["dims"]), preprocess=kw["preprocess"],
                         gate=gate, progress=obj["progress"], slices=kw["slices"], task=task)
    if json_path != "-" and not obj["quiet"]:
        show_validation(_console(), report)
    _write_json(json_path, report.as_dict())
    if not report.passed:
        raise GateFailed("; ".join(report.failures))


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
def list_passes(as_json: bool) -> None:
    """List every pass (numerics, summary, options) and the built-in recipes."""
    recipes = {name: load_recipe(path).description for name, path in builtin_recipes().items()}
    if as_json:
        payload = {"passes": [{"name": n, "numerics": c.numerics.name.lower(), "summary": c.summary(),
                               "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help,
                                               "choices": list(o.choices) if o.choices else None,
                                               "interval": o.interval}
                                           for k, o in c.options.items()}}
                              for n, c in registry().items()],
                   "recipes": recipes}
        click.echo(json.dumps(payload, indent=2, default=str))
        return
    show_passes(_console(), recipes)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--provider", default="CPUExecutionProvider", show_default=True,
              help="Execution provider (any of onnxruntime.get_available_providers()).")
@click.option("--threads", default=0, show_default=True, help="Intra-op threads per session (0: ORT default).")
@click.option("--warmup", default=10, show_default=True, help="Untimed warm-up rounds.")
@click.option("--runs", default=100, show_default=True, help="Timed rounds (each runs every model once).")
@click.option("--batch", default=1, show_default=True, help="Value of the leading (batch) dim where dynamic.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N",
              help="Value of another symbolic input dim (default: the shape of --data, else guessed as 32, with a warning).")
@click.option("--data", default=None, metavar="PATH", help="Inputs: the first batch of this data (default: seeded random).")
@click.option("--preprocess", default=None, metavar="SPEC|TOML", help=PREPROCESS_HELP)
@click.option("--seed", default=0, show_default=True, help="Seed for random inputs and the round order.")
@click.option("--ort-opt/--no-ort-opt", default=True, show_default=True, help="ORT graph optimizations.")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the results as JSON ('-' for stdout).")
@click.pass_obj
def bench(obj: dict, models: tuple[Path, ...], provider: str, threads: int, warmup: int, runs: int, batch: int,
          dims: tuple[str, ...], data: str | None, preprocess: str | None, seed: int, ort_opt: bool,
          json_path: str | None) -> None:
    """Latency of MODELS on onnxruntime, in interleaved rounds; ratios vs the first model, pair by pair."""
    report = _bench.bench(list(models), provider=provider, threads=threads, warmup=warmup, runs=runs, batch=batch,
                          dims=parse_dims(dims), data=data, seed=seed, optimize=ort_opt,
                          progress=obj["progress"], preprocess=preprocess)
    if json_path != "-" and not obj["quiet"]:
        show_bench(_console(), report)
    _write_json(json_path, report.as_dict())


@cli.command(name="report")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="report.md (Markdown) or report.html (HTML only); PNG plots go next to it.")
@click.option("--html", "as_html", is_flag=True, help="Also write HTML next to the Markdown.")
@click.option("--title", default=None, help="Title of the report (default: onnxcompress report).")
@click.option("--top", default=30, show_default=True, help="Layers shown per table and plot.")
@click.option("--no-plots", is_flag=True, help="No PNG plots even if matplotlib is installed.")
@click.pass_obj
def report_cmd(obj: dict, inputs: tuple[Path, ...], output: Path, as_html: bool, title: str | None, top: int,
               no_plots: bool) -> None:
    """Markdown/HTML report (with plots) from the JSON of optimize, bench and sensitivity runs."""
    from onnxcompress.reporting.report import build_report

    written = build_report(list(inputs), output, html=as_html, title=title, plots=not no_plots, top=top)
    if not obj["quiet"]:
        click.echo("wrote " + ", ".join(str(p) for p in written), err=True)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", required=True, metavar="PATH", help="Calibration data (calibrated once for every layer).")
@click.option("--data", default=None, metavar="PATH", help="Evaluation data (default: --calib).")
@click.option("--method", default="mse", show_default=True, help="Calibration method: minmax, percentile, entropy, mse.")
@click.option("--options", "qopts", default=None, metavar="K=V[:K=V]",
              help="Other quantize_int8 options, e.g. per_channel=false:symmetric_activations=true.")
@click.option("--prepare", default="fold_bn", show_default=True, metavar="SPEC", help="Passes run first ('' for none).")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Write the ranking as JSON ('-' for stdout).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Bar chart PNG (needs matplotlib).")
@click.option("--top", default=20, show_default=True, help="Layers shown in the table and plot (0: all).")
@click.option("--slices", default=None, metavar="OUT:START:STOP,...",
              help="Channel slices (axis 1) scored like whole outputs, replacing the automatic ones.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=0),
              help="Worker processes scoring layers (0: one per core); the ranking is the same for any number.")
@_data_options
@click.pass_obj
def sensitivity(obj: dict, model: Path, calib: str, data: str | None, method: str, qopts: str | None, prepare: str,
                json_path: str | None, plot_path: Path | None, top: int, slices: str | None, jobs: int, **kw) -> None:
    """Quantize one layer at a time (the rest float) and rank layers by the output SQNR they cost
    (the worst over outputs and channel slices)."""
    from onnxcompress.pipeline.sensitivity import parse_options
    from onnxcompress.reporting.display import show_sensitivity
    from onnxcompress.reporting.plots import plot_sensitivity, require_matplotlib

    if plot_path is not None:
        require_matplotlib()
    report = api.sensitivity(model, calib, data, method=method, options=parse_options(qopts), prepare=prepare,
                             batch_size=kw["batch_size"], samples=kw["samples"], seed=kw["seed"],
                             dims=parse_dims(kw["dims"]), preprocess=kw["preprocess"], progress=obj["progress"],
                             name=str(model), slices=slices, jobs=jobs)
    if json_path != "-" and not obj["quiet"]:
        show_sensitivity(_console(), report, top)
    _write_json(json_path, report.as_dict())
    if plot_path is not None:
        plot_sensitivity(report, plot_path, top)


@cli.command(name="auto")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", default=None, metavar="PATH", help="Calibration data (required: every technique is data-aware).")
@click.option("--data", default=None, metavar="PATH", help="Validation data; labels make --max-drop accuracy points.")
@click.option("--target", "targets", multiple=True, metavar="KIND=R",
              help="latency=R, size=R or macs=R: candidate/original ratio bound (repeatable; all must hold; the "
                   "first is minimised).")
@click.option("--max-drop", type=float, default=None, help="Accuracy points the result may lose on --data.")
@click.option("--min-cosine", type=float, default=None, help="Cosine floor of every output vs the original.")
@click.option("--budget-minutes", type=float, default=10.0, show_default=True, help="Stop launching evaluations after N minutes.")
@click.option("--jobs", type=int, default=0, show_default=True, help="Parallel evaluations (0: one per core; 1: in-process).")
@click.option("--ray", default=None, metavar="auto|ADDRESS", help="Evaluate on Ray (pip install 'onnxcompress[distributed]').")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Evaluation cache (default ~/.cache/onnxcompress/auto): a rerun resumes.")
@click.option("--recipe", default=None, metavar="NAME|TOML", help="A recipe whose [auto] table gives the defaults.")
@click.option("--space", default=None, metavar="KEY=V|V,...",
              help="Settings tried per technique, e.g. 'prune=0.25|0.5,lowrank=,quant=int8' (empty: off; "
                   "default prune=0.25|0.375|0.5|0.625, prune_macs=0.5|0.4|0.3|0.25 (MAC budget by "
                   "sensitivity), lowrank=0.9|0.8, quant=int8|int8-mixed).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output model (default: <model name>.auto.onnx in the current folder).")
@click.option("--json", "json_path", default=None, metavar="PATH", help="Every candidate, the winner and the signals as JSON.")
@click.option("--samples", type=int, default=None, help="Use at most N validation samples.")
@click.option("--latency-runs", type=int, default=200, show_default=True,
              help="Timed rounds of the latency stage (paired, 1 thread).")
@click.option("--seed", default=0, show_default=True, help="Seed of every pass and of the latency rounds.")
@click.pass_obj
def auto_cmd(obj: dict, model: Path, output: Path | None, json_path: str | None, **kw) -> None:
    """Search pruning, factorization and int8 (and their combinations) for the model that meets the
    --target ratios within --max-drop / --min-cosine; exit 1 (nothing written) when none does."""
    output = output or Path(model.name.removesuffix(".onnx") + ".auto.onnx")
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise InputError(f"{output}: output path is the input model; choose another output")
    result = api.auto(model, kw["calib"], kw["data"], target=list(kw["targets"]) or None, max_drop=kw["max_drop"],
                      min_cosine=kw["min_cosine"], budget_minutes=kw["budget_minutes"], seed=kw["seed"],
                      jobs=kw["jobs"], ray=kw["ray"], cache_dir=kw["cache_dir"], samples=kw["samples"],
                      recipe=kw["recipe"], space=parse_space(kw["space"]), latency_runs=kw["latency_runs"],
                      progress=obj["progress"])
    payload = {"model": str(model), "output": str(output) if result.model is not None else None, **result.as_dict()}
    payload["reproduce"] = _reproduce(model, kw, result) if result.spec else None
    _write_json(json_path, payload)
    if not obj["quiet"] and json_path != "-":
        from onnxcompress.reporting.auto_view import show_auto
        show_auto(_console(), payload, payload["reproduce"])
    if result.model is None:
        raise GateFailed("no candidate met the targets within the quality bound; nothing written")
    serde.save_model(result.model, output, protect=model)
    if not obj["quiet"] and json_path != "-":
        _console().print(f"wrote {output}")


def _reproduce(model: Path, kw: dict, result: api.AutoResult) -> str:
    """The ``optimize`` command that rebuilds the winner, byte for byte, and applies the same gate."""
    flags = {"max_top1_drop": "--max-top1-drop", "min_cosine": "--min-cosine"}
    gate = " ".join(f"{flags[k]} {v:g}" for k, v in result.gate.items())
    data = kw["data"] if kw["data"] is not None else kw["calib"]
    samples = f" --samples {kw['samples']}" if kw["samples"] else ""
    return (f"onnxcompress optimize {model} --passes {result.spec} --calib {kw['calib']} --data {data} {gate}"
            f"{samples} --seed {kw['seed']}")


#: Options of the command group that may also be given after the subcommand.
GLOBAL_FLAGS = frozenset({"-q", "--quiet", "--debug", "-v", "-vv", "-vvv", "--verbose"})


def hoist_global_flags(args: list[str]) -> list[str]:
    """``args`` with the global flags given after the subcommand moved before it
    (``onnxcompress optimize m.onnx -q`` = ``onnxcompress -q optimize m.onnx``); nothing after
    ``--`` moves."""
    if "--" in args:
        cut = args.index("--")
        return hoist_global_flags(args[:cut]) + args[cut:]
    command = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if command is None:
        return list(args)
    late = [a for a in args[command + 1:] if a in GLOBAL_FLAGS]
    rest = [a for a in args[command + 1:] if a not in GLOBAL_FLAGS]
    return args[:command] + late + [args[command]] + rest


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to exit codes and one-line messages."""
    args = hoist_global_flags(sys.argv[1:] if argv is None else list(argv))
    try:
        cli.main(args=args, prog_name="onnxcompress", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except OnnxCompressError as exc:
        if _STATE["debug"]:
            raise
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:
        if _STATE["debug"]:
            raise
        click.echo(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
