"""`dcompress compress`, `decompress` and `evaluate`: thin commands over the library."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
import torch

import deepcompress
from deepcompress import allocation as _allocation
from deepcompress import criteria as _criteria
from deepcompress import regularisers as _regularisers
from deepcompress import schedules as _schedules
from deepcompress.errors import CompressError
from deepcompress.files import compress_file
from deepcompress.formats.readers import is_dcz, read_model
from deepcompress.inputs import build_model
from deepcompress.pipeline import CompressConfig, load_config, parse_sparsity, render_report
from deepcompress.tasks import load_task
from deepcompress.train import evaluate as task_metric

from .allocator import map_large_allocations


def check_output(out: str, force: bool) -> Path:
    """The output path, refused if it exists (without --force) or its folder does not."""
    path = Path(out)
    if not path.parent.is_dir():
        raise CompressError(f"{out}: folder {path.parent} does not exist; create it first")
    if path.exists() and not force:
        raise CompressError(f"{out}: already exists; pass --force to overwrite")
    return path


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .dcz to write. Example: -o model.dcz")
@click.option("--task", help="Retrain on this task: digits, mnist, file.py:factory or "
              "module:factory. Without it, compression is data-free. Example: --task mnist")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder with the task's data. Example: --data-dir ../shared/data/mnist")
@click.option("--arch", help="Factory that builds the model when INPUT is a bare state_dict. "
              "Example: --arch deepcompress.models:lenet5")
@click.option("--calib", help="Unlabeled example inputs for a model without its task: a .pt, "
              ".safetensors or .npy batch-first tensor (or dict of named tensors passed as "
              "keyword inputs), or module:factory yielding batches. Layer-wise second-order "
              "pruning and sharing (OBS, GPTQ onto the codebook); a few hundred inputs suffice. "
              "Example: --calib inputs.npy")
@click.option("--device", help="With a task or --calib: where retraining and the layer-wise "
              "solves run (cpu, cuda, cuda:N; default cpu). The file is the same either way "
              "up to floating-point rounding. Example: --device cuda")
@click.option("--distill-epochs", type=int, help="With --calib: retrain this many epochs on the "
              "original model's outputs (tensor inputs only), twice: the surviving weights "
              "after pruning, under their masks, then the codebooks after sharing; a second "
              "layer-wise pass. Example: --distill-epochs 10")
@click.option("--distill-mix", type=int, help="With --distill-epochs: also train on this many "
              "mixtures of two calibration inputs (a random convex combination, floating "
              "inputs only) per input, labelled by the original model: more of its function "
              "seen from few inputs, for that many times the epoch time. Example: --distill-mix 8")
@click.option("--example-input", help="Without a task or --calib: a file of inputs (as --calib) "
              "to export the architecture with --arch into the .dcz, so load() runs it. "
              "Example: --example-input x.npy")
@click.option("--sparsity", help="Fraction of weights to prune, global or per layer. "
              "Example: --sparsity 0.95 or --sparsity fc1=0.97,fc2=0.9")
@click.option("--quality", type=float, help="The paper's rule: prune |w| < QUALITY x std(w) per "
              "layer. Example: --quality 1.5")
@click.option("--bits", help="Bits per shared weight, one number or per type/pattern. "
              "Default conv=8,linear=5 with a task; without one, chosen per tensor by "
              "--max-weight-error. Example: --bits conv=8,linear=4")
@click.option("--init", help="k-means initialisation: linear, density, random, kmeans++, "
              "optimal. Default linear with a task, optimal without. Example: --init optimal")
@click.option("--criterion", type=click.Choice(_criteria.names()),
              help="What ranks the weights for pruning (default magnitude, needs no data; the "
              "others need a task; `dcompress methods` says what each needs and costs). "
              "Example: --criterion obd")
@click.option("--allocation", type=click.Choice(_allocation.names()),
              help="How many to prune where: global (one threshold across layers; default), "
              "layer (the same fraction of each), std (with --quality). Example: --allocation layer")
@click.option("--schedule", type=click.Choice(_schedules.names()),
              help="When to prune, with a task: agp (cubic ramp while training; default), "
              "iterative (the paper's prune-retrain rounds), oneshot. Example: --schedule agp")
@click.option("--structured", is_flag=True, default=None, help="With a task and a structured "
              "criterion (l1_filter, fpgm, ...): after pruning, remove the all-zero neurons and "
              "filters for real (smaller tensors, a smaller embedded architecture, faster); layers "
              "where that is not exact (residual adds, concatenations) keep theirs, reported.")
@click.option("--channels", type=float, help="With a task, before pruning: remove this fraction "
              "of every hidden layer's neurons and filters for real (ranked by "
              "--channel-criterion, default l1_filter), retrain, then prune the smaller model as "
              "asked. Example: --channels 0.5")
@click.option("--channel-criterion", help="Structured criterion for --channels: l1_filter, fpgm, "
              "taylor_filter, apoz, bn_scale. Example: --channel-criterion fpgm")
@click.option("--target-ratio", type=float, help="Make the file this many times smaller than "
              "fp32, each choice priced at the bytes it really codes to. Data-free: each "
              "tensor's bits (1 to 8) at the smallest weight error. With --calib: each layer's "
              "sparsity and bits, at the smallest output error on the calibration inputs (every "
              "layer tried at 35 settings first: costs about 35 forward passes of 16 inputs per "
              "layer). Example: --target-ratio 20")
@click.option("--target-bytes", type=int, help="The same as --target-ratio for a file size in "
              "bytes. Example: --target-bytes 2000000")
@click.option("--max-weight-error", type=float, help="Data-free, without --bits or a target "
              "(the default rule): choose each tensor's bits (1 to 8) for the fewest bytes whose "
              "mean relative squared weight error stays at most this (default 0.01, a mean SQNR "
              "of 20 dB). Example: --max-weight-error 0.003")
@click.option("--regulariser", type=click.Choice(_regularisers.names()),
              help="Penalty added to the loss while retraining with a task: slimming (L1 on "
              "BatchNorm scales; then --criterion bn_scale), group_lasso (L2 norms of filters). "
              "Example: --regulariser slimming")
@click.option("--regulariser-strength", type=float, help="Weight of --regulariser in the loss "
              "(default 1e-4). Example: --regulariser-strength 1e-3")
@click.option("--rounds", type=int, help="Prune-retrain rounds (iterative). Example: --rounds 3")
@click.option("--prune-epochs", type=int, help="Retraining epochs per pruning round. "
              "Example: --prune-epochs 4")
@click.option("--finetune-epochs", type=int, help="Centroid fine-tuning epochs. "
              "Example: --finetune-epochs 4")
@click.option("--lr", type=float, help="Learning rate for retraining. Example: --lr 0.01")
@click.option("--seed", type=int, help="Random seed (results are deterministic). Example: --seed 0")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML or YAML file with the same keys as these flags (flags win). "
              "Example: --config lenet5.toml")
@click.option("--report", "report_file", type=click.Path(dir_okay=False),
              help="Also write the full report as JSON. Example: --report report.json")
@click.option("--no-arch", is_flag=True, help="Do not embed the architecture (a torch.export "
              "program) even when it is known; the file then holds weights only.")
@click.option("--unsafe-pickle", is_flag=True, help="Allow INPUT to be a pickled nn.Module. "
              "Loading it runs code from the file: only for files you trust.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars or tables; just the final line.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def compress(input_path: str, output: str, task: str | None, data_dir: str | None,
             arch: str | None, calib: str | None, device: str | None, distill_epochs: int | None,
             distill_mix: int | None,
             example_input: str | None, sparsity: str | None, quality: float | None, bits: str | None,
             init: str | None, criterion: str | None, allocation: str | None,
             schedule: str | None, structured: bool | None, channels: float | None,
             channel_criterion: str | None, target_ratio: float | None,
             max_weight_error: float | None,
             target_bytes: int | None, regulariser: str | None,
             regulariser_strength: float | None, rounds: int | None, prune_epochs: int | None,
             finetune_epochs: int | None, lr: float | None, seed: int | None,
             config_file: str | None, report_file: str | None, no_arch: bool,
             unsafe_pickle: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Compress a model file (.pt/.pth state_dict, .safetensors, .pt2) into a .dcz.

    With --task: the full pipeline (prune with retraining, weight sharing with centroid
    fine-tuning, entropy coding). Without a task there is no retraining, so the default
    protects fidelity: no pruning unless --sparsity/--quality asks, sharing with the
    lowest-error (optimal) clustering at the per-tensor bits that keep the mean relative
    squared weight error within --max-weight-error, and a per-layer weight error (relative L2,
    SQNR) in the report. On CREPE (benchmarks/pretrained.py) that default is 13.0x with pitch
    accuracy unchanged; on a pretrained sentence encoder, --bits 8 kept embeddings at cosine
    0.996 to the original while data-free 50% magnitude pruning collapsed them to 0.72.

    \b
    Examples:
      dcompress compress model.safetensors -o model.dcz
      dcompress compress lenet5.pt -o lenet5.dcz --task mnist --data-dir data/mnist \\
          --sparsity 0.97 --bits 4
      dcompress compress crepe.pth -o crepe.dcz --arch crepe.py:full --calib tones.npy \\
          --sparsity 0.5 --bits 4
    """
    out = check_output(output, force)
    flags = {"sparsity": parse_sparsity(sparsity) if sparsity else None, "quality": quality,
             "bits": (int(bits) if bits and bits.isdigit() else bits), "init": init,
             "criterion": criterion, "allocation": allocation, "schedule": schedule,
             "structured": structured, "channels": channels,
             "channel_criterion": channel_criterion, "target_ratio": target_ratio,
             "max_weight_error": max_weight_error,
             "target_bytes": target_bytes, "regulariser": regulariser,
             "regulariser_strength": regulariser_strength,
             "rounds": rounds, "prune_epochs": prune_epochs, "finetune_epochs": finetune_epochs,
             "distill_epochs": distill_epochs, "distill_mix": distill_mix, "lr": lr, "seed": seed, "device": device,
             "quiet": quiet or as_json}
    flags = {k: v for k, v in flags.items() if v is not None}
    config = load_config(config_file, **flags) if config_file else CompressConfig(**flags)
    the_task = load_task(task, data_dir) if task else None
    if calib:
        map_large_allocations()
    report = compress_file(input_path, out, config, the_task, arch=arch,
                           unsafe_pickle=unsafe_pickle, architecture=not no_arch,
                           metadata={"task": task}, calib=calib, example_input=example_input)
    if report_file:
        Path(report_file).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if not quiet:
        click.echo(render_report(report))
    click.echo(f"wrote {out}: {report.bytes} bytes, {report.ratio:.1f}x smaller than fp32 "
               f"({report.stages[0].bytes} bytes)")


@click.command()
@click.argument("input_path", metavar="IN.dcz", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write: .pt (torch state_dict) or .safetensors, by suffix. "
              "Example: -o model.safetensors")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def decompress(input_path: str, output: str, force: bool) -> None:
    """Write the tensors of a .dcz back as a .pt state_dict or a .safetensors file.

    \b
    Example:
      dcompress decompress model.dcz -o model.safetensors
    """
    out = check_output(output, force)
    suffix = out.suffix.lower()
    if suffix not in (".pt", ".pth", ".safetensors"):
        raise CompressError(f"{output}: unknown output type; end it in .pt, .pth or .safetensors")
    state = deepcompress.load_state_dict(input_path)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file
            seen: set[int] = set()
            plain = {}
            for k, v in state.items():  # safetensors holds no ties: later names get copies
                plain[k] = v.clone() if id(v) in seen else v.contiguous()
                seen.add(id(v))
            save_file(plain, tmp)
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    click.echo(f"wrote {out}: {len(state)} tensors, {out.stat().st_size} bytes")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--task", required=True, help="Task whose test split to measure: digits, mnist, "
              "file.py:factory. Example: --task mnist")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder with the task's data. Example: --data-dir data/mnist")
@click.option("--arch", help="Factory that builds the model when the task has none and the "
              "file holds no architecture. Example: --arch deepcompress.models:lenet5")
@click.option("--unsafe-pickle", is_flag=True, help="Allow a pickled nn.Module as FILE "
              "(runs code from the file).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(file: str, task: str, data_dir: str | None, arch: str | None,
             unsafe_pickle: bool, as_json: bool) -> None:
    """Measure a model (.pt, .safetensors, .pt2 or .dcz) on a task's validation and test splits.

    \b
    Example:
      dcompress evaluate lenet5.dcz --task mnist --data-dir data/mnist
    """
    the_task = load_task(task, data_dir)
    if Path(file).is_file() and is_dcz(file):
        model = _dcz_model(file, the_task, arch)
    else:
        model = build_model(read_model(file, unsafe_pickle=unsafe_pickle), the_task, arch)
        if model is None:
            raise CompressError(f"{file}: no architecture known; pass --arch module:factory")
    result = {"file": file, "task": the_task.name, "val": task_metric(model, the_task, "val"),
              "test": task_metric(model, the_task, "test")}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{file} on {the_task.name}: val {result['val']:.4f}, "
                   f"test {result['test']:.4f}")


def _dcz_model(file: str, task, arch: str | None) -> torch.nn.Module:
    if arch is not None:
        from deepcompress.tasks import load_object
        return deepcompress.load(file, load_object(arch, "--arch")())
    with deepcompress.open_lazy(file) as f:
        has_program = f.program_record is not None
    if has_program:
        return deepcompress.load(file)
    if task.build_model is None:
        raise CompressError(f"{file}: holds weights only and the task has no model; "
                            "pass --arch module:factory")
    return deepcompress.load(file, task.build_model())
