"""Turn what benchmarks/gpu_check.sh left in its output folder into one summary.json.

    python benchmarks/summarize.py $OUT            # writes $OUT/summary.json and prints the layer table

Reads, each if present (a missing or broken piece is recorded, never fatal):
    layer*.csv            bench_layer.py's rows (a shape's retry without torch.compile: layer_*_nocompile.csv)
    layer*.log            rows bench_layer.py printed, for cases whose CSV was never written (killed run)
    finetune.csv          bench_finetune.py's rows
    status.tsv            one line per stage of gpu_check.sh: name, exit code, seconds, log file
    backend_cache/*.json  what auto chose per key, with the timings (FUSED_LORA_CACHE_DIR of the run)
    backends_report.txt, info.log
Writes, per layer shape and rank: each variant's times, ratios to the base Linear, held/peak memory,
and its distance from the roofline ideal (benchmarks/roofline.py); our variants are named by strategy:
auto (what the layer picks; `auto_ran` says which it ran), torch (cuBLAS), triton (fused kernels), triton-tma and
triton-onepass (the Hopper-path candidates, where the GPU runs them). Then the fine-tune rows, the
issue's targets with the measured values, and each stage's outcome (with its log's tail if it failed).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402

STRATEGY = {"fused_lora": "auto", "fused_lora[torch]": "torch", "fused_lora[triton]": "triton",
            "fused_lora[triton-tma]": "triton-tma", "fused_lora[triton-onepass]": "triton-onepass"}
NUMERIC = ("fwd_ms", "fwdbwd_ms", "fwd_x", "fwdbwd_x", "fwdbwd_vs_peft", "held_MiB", "peak_MiB")
PRINTED = ("fwd_ms", "fwd_x", "fwdbwd_ms", "fwdbwd_x", "fwdbwd_vs_peft", "held_MiB", "peak_MiB")  # bench_layer's column order
NOISE = 0.03  # auto counts as "not slower" than torch within this relative margin (timing noise)
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                 r"\s+(\S+)\s+([\d.]+)\s+([\d.]+)(\s.*)?$")
TAIL_LINES = 20


def _num(value):
    try:
        return float(value) if value not in ("", "-", None) else None
    except ValueError:
        return None


def _layer_row(d: dict) -> dict:
    row = {k: int(float(d[k])) for k in ("M", "K", "N", "r")}
    row["dropout"] = float(d["dropout"])
    row["variant"] = d["variant"]
    row.update({k: _num(d.get(k)) for k in NUMERIC})
    return row


def read_layer_rows(out: str, errors: list) -> list[dict]:
    """Every layer row, from the CSVs first, then from printed logs for cases no CSV has."""
    rows, seen = [], set()

    def add(row):
        key = (row["M"], row["K"], row["N"], row["r"], row["dropout"], row["variant"])
        if key not in seen:
            seen.add(key)
            rows.append(row)

    for path in sorted(glob.glob(os.path.join(out, "layer*.csv"))):
        try:
            with open(path, newline="") as f:
                for d in csv.DictReader(f):
                    add(_layer_row(d))
        except (OSError, KeyError, ValueError, TypeError) as err:
            errors.append(f"{os.path.basename(path)}: {type(err).__name__}: {err}")
    for path in sorted(glob.glob(os.path.join(out, "layer*.log"))):
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    m = ROW.match(line)
                    if m:
                        g = m.groups()
                        add(_layer_row(dict(zip(("M", "K", "N", "r", "dropout", "variant") + PRINTED, g[:13]))))
        except OSError as err:
            errors.append(f"{os.path.basename(path)}: {err}")
    return rows


def layer_cases(rows: list[dict], elt: int) -> list[dict]:
    """Rows grouped by (M, K, N, r), then dropout, then strategy name, with the roofline ideal."""
    cases = {}
    for row in rows:
        case = cases.setdefault((row["M"], row["K"], row["N"], row["r"]), {"rows": []})
        case["rows"].append(row)
    out = []
    for (M, K, N, r), case in sorted(cases.items()):
        ideal = roofline.ideal_ratios(M, K, N, r, elt)
        base = next((x for x in case["rows"] if x["variant"] == "base"), None)
        dropouts = sorted({x["dropout"] for x in case["rows"] if x["variant"] != "base"}) or [0.0]
        by_p = {}
        for p in dropouts:
            variants = {}
            for x in case["rows"]:
                if x["variant"] == "base" or x["dropout"] != p:
                    continue
                v = {k: x[k] for k in NUMERIC}
                for pass_ in ("fwd", "fwdbwd"):
                    if v[f"{pass_}_x"] is not None:
                        v[f"{pass_}_vs_ideal"] = round(v[f"{pass_}_x"] / ideal[pass_], 3)
                variants[STRATEGY.get(x["variant"], x["variant"])] = v
            if base is not None:
                variants["base"] = {k: base[k] for k in NUMERIC}
            variants["auto_not_slower_than_torch"] = _not_slower(variants.get("auto"), variants.get("torch"))
            by_p[str(p)] = variants
        out.append({"M": M, "K": K, "N": N, "r": r, "ideal": ideal, "dropout": by_p})
    return out


def _not_slower(auto, torch_row):
    if not auto or not torch_row:
        return None
    pairs = [(auto[k], torch_row[k]) for k in ("fwd_ms", "fwdbwd_ms") if auto[k] is not None and torch_row[k]]
    return all(a <= t * (1 + NOISE) for a, t in pairs) if pairs else None


def read_finetune(out: str, errors: list) -> list[dict]:
    path = os.path.join(out, "finetune.csv")
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="") as f:
            rows = []
            for d in csv.DictReader(f):
                row = {"variant": d["variant"], "dropout": float(d["dropout"]),
                       "checkpointing": d["checkpointing"] in ("True", "true", "1")}
                row.update({k: _num(d.get(k)) for k in ("step_ms", "tokens_per_s", "peak_GiB", "x_floor", "x_peft")})
                rows.append(row)
            return rows
    except (OSError, KeyError, ValueError) as err:
        errors.append(f"finetune.csv: {type(err).__name__}: {err}")
        return []


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-TAIL_LINES:])
    except OSError:
        return ""


def read_stages(out: str, errors: list) -> dict:
    """status.tsv: name, exit code (124/137: time limit), seconds, log file (relative to out)."""
    stages = {}
    path = os.path.join(out, "status.tsv")
    if not os.path.exists(path):
        return stages
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 2 or not parts[0]:
                    continue
                name, rc = parts[0], parts[1]
                code = int(rc) if rc.lstrip("-").isdigit() else None
                stage = {"rc": code if code is not None else rc, "ok": code == 0, "timed_out": code in (124, 137),
                         "run": rc != "not run",  # GPU_CHECK_SKIP named it
                         "seconds": _num(parts[2]) if len(parts) > 2 else None}
                if len(parts) > 3 and parts[3]:
                    stage["log"] = parts[3]
                    if code != 0:
                        stage["error_tail"] = _tail(os.path.join(out, parts[3]))
                stages[name] = stage
    except OSError as err:
        errors.append(f"status.tsv: {err}")
    return stages


def read_backend_choices(out: str, errors: list) -> dict:
    choices = {}
    for path in sorted(glob.glob(os.path.join(out, "backend_cache", "backends-*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
            choices.setdefault(str(data["device"]), {}).update(data["choices"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            errors.append(f"{os.path.basename(path)}: {type(err).__name__}: {err}")
    return choices


def targets(cases: list[dict], finetune: list[dict]) -> list[dict]:
    """The issue's targets (H100/H200, bf16) with what was measured; met is None when unmeasured."""
    found = []

    def check(what, value, limit):
        found.append({"what": what, "value": value, "limit": limit,
                      "met": None if value is None else value <= limit})

    for case in cases:
        if (case["M"], case["K"], case["N"]) != (8192, 4096, 4096):
            continue
        for p, variants in case["dropout"].items():
            auto = variants.get("auto") or {}
            where = f"8192x4096x4096 r={case['r']} dropout {p}, auto"
            if case["r"] == 16:
                check(f"{where}: forward / base", auto.get("fwd_x"), 1.05)
                check(f"{where}: forward+backward / base", auto.get("fwdbwd_x"), 1.10)
            elif case["r"] == 64:
                check(f"{where}: forward+backward / base", auto.get("fwdbwd_x"), 1.15)
    for row in finetune:
        if row["variant"] == "fused_lora" and not row["checkpointing"]:
            check(f"fine-tune step, dropout {row['dropout']}: fused_lora / frozen floor", row["x_floor"], 1.10)
    return found


def _read_text(path: str):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def auto_choices(cases: list[dict], choices: dict, dtype: str) -> None:
    """Add to each case and dropout what auto ran (forward, backward) per the backend cache, keyed as
    fused_lora.dispatch.registry keys it (bench_layer: frozen base, gradients for x and the adapter)."""
    if not cases:
        return
    try:
        import torch

        from fused_lora.dispatch import Problem
    except ImportError:
        return
    for case in cases:
        for p, variants in case["dropout"].items():
            got = {}
            for op, grads in (("fwd", ()), ("bwd", ("dx", "lora"))):
                if op == "bwd" and float(p) > 0:
                    got[op] = got.get("fwd")  # with dropout, backward runs what forward chose
                    continue
                key = Problem(op, torch.device("cuda"), getattr(torch, dtype), case["M"], case["N"], case["K"],
                              case["r"], float(p) > 0, grads).key()
                got[op] = next((c[key]["winner"] for c in choices.values() if isinstance(c.get(key), dict)), None)
            variants["auto_ran"] = got


def summarize(out: str, elt: int = 2, dtype: str = "bfloat16") -> dict:
    errors: list[str] = []
    rows = read_layer_rows(out, errors)
    cases = layer_cases(rows, elt)
    finetune = read_finetune(out, errors)
    choices = read_backend_choices(out, errors)
    auto_choices(cases, choices, dtype)
    verdicts = [v["auto_not_slower_than_torch"] for c in cases for v in c["dropout"].values()
                if v["auto_not_slower_than_torch"] is not None]
    return {
        "roofline_machine": roofline.H100.name,
        "element_bytes": elt,
        "layer": cases,
        "auto_never_slower_than_torch": all(verdicts) if verdicts else None,
        "auto_noise_margin": NOISE,
        "finetune": finetune,
        "targets": targets(cases, finetune),
        "stages": read_stages(out, errors),
        "backend_choices": choices,
        "backends_report": _read_text(os.path.join(out, "backends_report.txt")),
        "info": _read_text(os.path.join(out, "info.log")),
        "errors": errors,
    }


def print_table(summary: dict) -> None:
    names = ("auto", "torch", "triton", "triton-tma", "triton-onepass", "peft", "compile(peft)")
    print("layer / base Linear, forward / forward+backward (ideal: the roofline)")
    print(f"{'shape':<17} {'r':>3} {'p':>4} {'ideal':>11} " + " ".join(f"{n:>13}" for n in names) + "  auto ran")
    for case in summary["layer"]:
        shape = f"{case['M']}x{case['K']}x{case['N']}"
        for p, variants in case["dropout"].items():
            cells = []
            for n in names:
                v = variants.get(n)
                ok = v and v["fwd_x"] is not None and v["fwdbwd_x"] is not None
                cells.append((f"{v['fwd_x']:.2f}/{v['fwdbwd_x']:.2f}" if ok else "-").rjust(13))
            ideal = f"{case['ideal']['fwd']:.2f}/{case['ideal']['fwdbwd']:.2f}"
            ran = variants.get("auto_ran") or {}
            print(f"{shape:<17} {case['r']:>3} {p:>4} {ideal:>11} " + " ".join(cells)
                  + f"  {ran.get('fwd') or '?'}/{ran.get('bwd') or '?'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "out"), help="the folder gpu_check.sh wrote (default: $OUT, else benchmarks/out)")
    ap.add_argument("--dtype", choices=sorted(roofline.ELT_BYTES), default="bfloat16",
                    help="the layer benchmark's dtype, for the roofline (GPU suite: bfloat16)")
    args = ap.parse_args(argv)
    summary = summarize(args.out, roofline.ELT_BYTES[args.dtype], args.dtype)
    path = os.path.join(args.out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print_table(summary)
    for t in summary["targets"]:
        print(f"target {t['what']}: {t['value']} (<= {t['limit']}): {t['met']}")
    print(f"auto never slower than torch: {summary['auto_never_slower_than_torch']}")
    for name, stage in summary["stages"].items():
        if stage["run"] and not stage["ok"]:
            print(f"stage {name} failed (rc {stage['rc']}{', time limit' if stage['timed_out'] else ''})")
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
