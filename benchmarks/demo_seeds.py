"""Does selection improve training? The demo's --compare over several seeds and both arm pools (issue 16).

For each pool (hard first) and seed, the demo's assets, held-out set and probe are built once; then each method
trains its own copy of SmolLM2 with GRPO for --steps steps and is evaluated on the same held-out prompts:

    laser-verifier     LASeR (LinUCB), bandit feedback from reasoning-gym's verifier
    laser-<label-free> LASeR with the recommended label-free feedback (once laser_rl.feedback.LABEL_FREE exists)
    mean               mean ensemble: every RM scores every sample (K RM passes per sample)
    random             a random RM per prompt
    single             the best single RM by the probe (mean agreement with the verifier over domains)

One JSON per run (pool, method, seed) under --results-dir holds per-prompt correctness on the held-out set, so
differences against LASeR are paired (the same prompts and seeds): a paired bootstrap over seeds and, within
each seed, over held-out prompts (stratified by domain). A run whose JSON exists is skipped: the study resumes.

    nohup nice -n 10 python benchmarks/demo_seeds.py > laser_runs/demo_seeds.log 2>&1 &    # hours on 2 cores
    python benchmarks/demo_seeds.py --report-only       # rebuild the table and PNG from the JSONs, run nothing

Several processes may share one results folder (e.g. `--threads 1` each on a small machine): each run is claimed
(`<run>.json.claim`, the holder's PID) before it starts, so none runs twice; a killed run's claim is taken over.

A driver loop of one (pool, seed) group per process (`--max-groups 1`, exit status 3 once nothing is left) picks up
code that lands while the study runs, e.g. the label-free feedback: its method is then added to finished seeds too.

Writes <out>.md (the tables), <out>.json (the aggregates) and <out>.png (accuracy per method, per pool).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import inspect
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

# Run as a script, this folder is sys.path[0], and its kernels.py would shadow the `kernels` package that
# bitsandbytes probes at import (a misleading "pip install kernels" warning).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

POOL_ORDER = ("hard", "default")  # the hard pool first: it is the one the question is about
BASELINES = ("mean", "random", "single")
LABELS = {
    "laser-verifier": "LASeR, verifier feedback",
    "mean": "mean ensemble",
    "random": "random RM",
    "single": "best single RM",
}
REFERENCE = "laser-verifier"  # the method every difference is taken against
NOTHING_TO_DO = 3  # exit status when every run already has its JSON


def label_free_signal(requested: str | None = None) -> str | None:
    """The label-free feedback LASeR runs with, or None while the core recommends none.

    `requested` (--label-free) must be in laser_rl.feedback.LABEL_FREE. Otherwise the recommended one:
    RewardSelector's default feedback once that is label-free and not the paper's pair_loss (which the project
    measured preferring the policy's own likelihood RM, issue 12); until then the method is left out.
    """
    feedback = importlib.import_module("laser_rl.feedback")
    label_free = getattr(feedback, "LABEL_FREE", ())
    if requested:
        if requested not in label_free:
            raise ValueError(f"--label-free {requested!r} is not a label-free feedback; choose from {sorted(label_free)}")
        return requested
    from laser_rl.selector import RewardSelector

    default = inspect.signature(RewardSelector).parameters["feedback"].default
    return default if default in label_free and default != "pair_loss" else None


def study_methods(label_free: str | None) -> list[str]:
    return ["laser-verifier"] + ([f"laser-{label_free}"] if label_free else []) + list(BASELINES)


def label(method: str) -> str:
    return LABELS.get(method) or f"LASeR, {method.removeprefix('laser-')} feedback (label-free)"


def label_with_audits(method: str, audit: dict) -> str:
    """The method's label, with a consensus run's audit schedule: '... (label-free; audits 40% x 8 steps, then 3%)'."""
    if not audit:
        return label(method)
    schedule = f"audits {audit['fraction']:.0%}"
    if audit["warmup_steps"]:
        schedule = f"audits {audit['warmup_fraction']:.0%} x {audit['warmup_steps']} steps, then {audit['fraction']:.0%}"
    text = label(method)
    return f"{text[:-1]}; {schedule})" if text.endswith(")") else f"{text} ({schedule})"


def run_path(results_dir: str, pool: str, method: str, seed: int) -> str:
    return os.path.join(results_dir, f"{pool}__{method}__seed{seed}.json")


def claim(path: str) -> bool:
    """Claim the run whose JSON is `path` for this process: True if no live process holds it.

    The claim is `path`.claim with the holder's PID, made atomically (O_EXCL), so processes started on the same
    results folder share the work without running anything twice; a claim whose process has died is taken over.
    """
    lock = path + ".claim"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    text = f.read().strip()
                if not text:
                    return False  # its holder has made it and not yet written its PID: alive
                holder = int(text)
                os.kill(holder, 0)  # raises if no such process
                return holder == os.getpid()
            except (ProcessLookupError, ValueError):
                os.remove(lock)  # a dead holder (a killed run): take the run over
                continue
            except (PermissionError, FileNotFoundError):
                return False  # alive under another user, or just released: leave it
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a killed study never leaves half a JSON that resume would trust


# ------------------------------------------------------------------------------------------------
def run_study(
    base,
    pools: list[str],
    seeds: list[int],
    methods: list[str],
    results_dir: str,
    progress: bool = True,
    max_groups: int | None = None,
) -> int:
    """Run every missing (pool, seed, method); seeds interleaved (each seed finishes all methods first).

    base: a DemoConfig whose pool and seed are replaced per group. Returns the number of runs made.
    max_groups: stop after this many (pool, seed) groups with work (a driver loop can re-import fresh code).
    """
    import torch
    from tqdm import tqdm

    from laser_rl.demo.run import DemoAssets, best_single_arm, evaluate_detailed, probe_arm_accuracy, run_method, tied_with_best

    os.makedirs(results_dir, exist_ok=True)
    todo = [(p, s, [m for m in methods if not os.path.exists(run_path(results_dir, p, m, s))]) for p in pools for s in seeds]
    todo = [t for t in todo if t[2]]
    if max_groups is not None:
        todo = todo[:max_groups]
    bar = tqdm(total=sum(len(t[2]) for t in todo), desc="demo_seeds runs", unit="run", disable=not progress, dynamic_ncols=True)
    done = 0
    for pool, seed, missing in todo:
        config = dataclasses.replace(base, pool=pool, seed=seed, grpo=dataclasses.replace(base.grpo))
        if config.threads:
            torch.set_num_threads(config.threads)
        start = time.time()
        assets = DemoAssets(config, verbose=False)
        before = evaluate_detailed(assets.reference, assets.tokenizer, assets.tasks.eval, config.max_new_tokens, progress)
        accuracy = probe_arm_accuracy(assets, assets.reference, seed, progress)
        names = [a.name for a in assets.arm_list]
        single = best_single_arm(accuracy)
        ties = tied_with_best(assets.probe_agreement)
        shared_time = time.time() - start
        for method in missing:
            path = run_path(results_dir, pool, method, seed)
            if os.path.exists(path) or not claim(path):  # another process finished it or is running it
                bar.update(1)
                continue
            bar.set_description(f"demo_seeds {pool} seed {seed} {method}")
            base_method, _, feedback = method.partition("-")
            result = run_method(base_method, assets, before.accuracy, names.index(single), None, progress, feedback=feedback or None)
            record = {
                "pool": pool, "method": method, "seed": seed, "arms": names,
                "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "grpo"} | {"grpo": dataclasses.asdict(config.grpo)},
                "probe_accuracy": accuracy, "tied_with_best": ties, "single_arm": single,
                "eval_before_correct": before.correct, "eval_before_length": before.mean_length,
                "shared_setup_time": shared_time,
                "result": dataclasses.asdict(result),
            }
            _write_json(path, record)
            os.remove(path + ".claim")
            done += 1
            bar.update(1)
    bar.close()
    return done


# ------------------------------------------------------------------------------------------------
def load_runs(results_dir: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*__*__seed*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def _t95(df: int) -> float:
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
    return table.get(df, 1.96 if df > 30 else 2.1)


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean over seeds and a t-based 95% interval (nan-width with one seed)."""
    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = _t95(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


def bootstrap(cells: np.ndarray, reps: int = 4000, seed: int = 0) -> np.ndarray:
    """Bootstrap means of cells [M, S, D, N] (methods, seeds, domains, held-out prompts of a domain).

    Each replicate resamples seeds, then prompts within each (seed, domain), with the SAME indices for every
    method (paired). Returns [reps, M, D + 1]: per domain, and the mean over domains last.
    """
    M, S, D, N = cells.shape
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, S, size=(reps, S))
    p_idx = rng.integers(0, N, size=(reps, S, D, N))
    out = np.empty((reps, M, D + 1))
    for m in range(M):
        picked = cells[m][s_idx[:, :, None, None], np.arange(D)[None, None, :, None], p_idx]  # [reps, S, D, N]
        per_domain = picked.mean(axis=(1, 3))
        out[:, m, :D] = per_domain
        out[:, m, D] = per_domain.mean(axis=1)
    return out


def aggregate(runs: list[dict], reps: int = 4000) -> dict:
    """Per pool: per method the mean accuracy (per domain and mean) with bootstrap 95% CIs, paired differences
    against LASeR-verifier, RM passes, wall time, and the hacking measures. Only seeds every method finished count."""
    by_pool: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        by_pool[r["pool"]][r["method"]][r["seed"]] = r
    out = {}
    for pool in sorted(by_pool, key=lambda p: (POOL_ORDER + (p,)).index(p)):
        per_method = by_pool[pool]
        methods = [m for m in _method_order(per_method)]
        seeds = sorted(set.intersection(*(set(per_method[m]) for m in methods)))
        if not seeds:
            continue
        first = per_method[methods[0]][seeds[0]]
        domains = list(first["result"]["eval_correct"])
        N = min(len(per_method[m][s]["result"]["eval_correct"][d]) for m in methods for s in seeds for d in domains)
        cells = np.array([[[per_method[m][s]["result"]["eval_correct"][d][:N] for d in domains] for s in seeds] for m in methods], dtype=float)
        before = np.array([[[per_method[methods[0]][s]["eval_before_correct"][d][:N] for d in domains] for s in seeds]], dtype=float)
        boot = bootstrap(cells, reps)
        point = np.concatenate([cells.mean(axis=(1, 3)), cells.mean(axis=(1, 2, 3))[:, None]], axis=1)  # [M, D + 1]
        lasers = [j for j, m in enumerate(methods) if m.startswith("laser")]
        arms = first["arms"]
        ensemble_passes = np.mean([per_method["mean"][s]["result"]["rm_passes"] for s in seeds]) if "mean" in per_method else None
        rows = []
        for i, m in enumerate(methods):
            res = [per_method[m][s]["result"] for s in seeds]
            schedules = {json.dumps(r.get("audit") or {}, sort_keys=True) for r in res}
            if len(schedules) > 1:  # one row must be one method: runs from before a default changed are stale
                raise ValueError(f"{pool} pool, {m}: the runs used different audit schedules {sorted(schedules)}; "
                                 "move the stale runs' JSONs to a subfolder (e.g. superseded/) and rerun them")
            audit = json.loads(schedules.pop())
            lo, hi = np.percentile(boot[:, i], [2.5, 97.5], axis=0)
            row = {
                "method": m, "label": label_with_audits(m, audit),
                "audit": audit,
                "accuracy": {k: [float(point[i, j]), float(lo[j]), float(hi[j])] for j, k in enumerate(domains + ["mean"])},
                "rm_passes": mean_ci([r["rm_passes"] for r in res]),
                "rm_passes_vs_ensemble": (float(np.mean([r["rm_passes"] for r in res]) / ensemble_passes) if ensemble_passes else None),
                "wall_time": mean_ci([r["wall_time"] for r in res]),
                "cpu_time": mean_ci([r["cpu_time"] for r in res]),  # steadier than wall time on a shared machine
                "eval_length": {d: mean_ci([r["eval_length"][d] for r in res]) for d in domains},
                "train_length": {d: mean_ci([r["train_length"][d] for r in res]) for d in domains},
                "single_arms": sorted({r["single_arm"] for r in res if r.get("single_arm")}),
            }
            if m.startswith("laser") or m in ("random", "single"):
                row["arm_share"] = {
                    d: {a: mean_ci([r["arm_counts"][d].get(a, 0) / max(sum(r["arm_counts"][d].values()), 1) for r in res]) for a in arms}
                    for d in domains
                }
            row["diff_vs"] = {}  # LASeR method -> [this minus it, 95% low, high] on mean accuracy, paired
            for j in lasers:
                if j != i:
                    d_lo, d_hi = np.percentile(boot[:, i, -1] - boot[:, j, -1], [2.5, 97.5])
                    row["diff_vs"][methods[j]] = [float(point[i, -1] - point[j, -1]), float(d_lo), float(d_hi)]
            rows.append(row)
        probe: dict[str, dict[str, list[float]]] = {}
        for s in seeds:
            for arm, per in per_method[methods[0]][s]["probe_accuracy"].items():
                for d, v in per.items():
                    probe.setdefault(arm, {}).setdefault(d, []).append(v if v is not None else math.nan)
        out[pool] = {
            "lasers": [methods[j] for j in lasers],
            "seeds": seeds, "prompts_per_domain": N, "domains": domains, "arms": arms,
            "untrained_length": {d: mean_ci([per_method[methods[0]][s]["eval_before_length"][d] for s in seeds]) for d in domains},
            "untrained": {k: float(v) for k, v in zip(domains + ["mean"], list(before.mean(axis=(1, 3))[0]) + [float(before.mean())])},
            # A probe with no mixed prompt on a domain has no accuracy there: NaN, without numpy's empty-slice warning.
            "probe_accuracy": {a: {d: float(np.nanmean(v)) if np.isfinite(np.asarray(v, dtype=float)).any() else float("nan")
                                   for d, v in per.items()} for a, per in probe.items()},
            "methods": rows,
            "incomplete": {m: sorted(set(per_method[m]) - set(seeds)) for m in per_method if set(per_method[m]) - set(seeds)},
        }
    return out


def _method_order(per_method: dict) -> list[str]:
    lasers = sorted(m for m in per_method if m.startswith("laser"))
    lasers = ([REFERENCE] if REFERENCE in lasers else []) + [m for m in lasers if m != REFERENCE]
    return lasers + [m for m in BASELINES if m in per_method]


# ------------------------------------------------------------------------------------------------
def _ci(v, digits: int = 3) -> str:
    m, lo, hi = v
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if not math.isnan(lo) else f"{m:.{digits}f}"


def markdown(agg: dict, command: str = "") -> str:
    lines = ["# LASeR vs. baselines on the demo, over seeds (benchmarks/demo_seeds.py)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        "Held-out accuracy: greedy answers after GRPO, scored by reasoning-gym, mean over seeds with a 95% bootstrap",
        "interval (seeds resampled, then held-out prompts within each seed and domain). Δ vs a LASeR method: the row's",
        "method minus that LASeR on mean accuracy, paired (same seeds, same prompts, same resampling); an interval",
        "that excludes 0 is a difference the data support. Only seeds every method finished are counted.",
        "",
    ]
    for pool, a in agg.items():
        doms = a["domains"]
        lines += [f"## Pool `{pool}`: {', '.join(a['arms'])}", "",
                  f"{len(a['seeds'])} seeds ({', '.join(map(str, a['seeds']))}), {a['prompts_per_domain']} held-out prompts per domain; "
                  f"untrained policy: " + ", ".join(f"{k} {v:.3f}" for k, v in a["untrained"].items()), ""]
        if a["incomplete"]:
            lines += ["Runs of unfinished seeds (not counted): " + "; ".join(f"{m}: seeds {s}" for m, s in a["incomplete"].items()), ""]
        lasers = a["lasers"]
        lines.append("| method | " + " | ".join(doms) + " | mean | " + " | ".join(f"Δ vs {label(m)}" for m in lasers)
                     + " | RM passes | vs ensemble | wall (s) | CPU (s) |")
        lines.append("|---" * (len(doms) + 6 + len(lasers)) + "|")
        for r in a["methods"]:
            name = r["label"] + (f" ({', '.join(r['single_arms'])})" if r["single_arms"] else "")
            diff = " | ".join(_ci(r["diff_vs"][m]) if m in r["diff_vs"] else "—" for m in lasers)
            ratio = f"{r['rm_passes_vs_ensemble']:.2f}" if r["rm_passes_vs_ensemble"] is not None else ""
            lines.append(f"| {name} | " + " | ".join(_ci(r["accuracy"][d]) for d in doms) + f" | {_ci(r['accuracy']['mean'])} | {diff} | "
                         f"{r['rm_passes'][0]:.0f} | {ratio} | {r['wall_time'][0]:.0f} | {r['cpu_time'][0]:.0f} |")
        K = len(a["arms"])
        lines += ["", f"RM passes against the mean ensemble's (issue 16's bound: 1/K + 0.10 = {1 / K + 0.1:.2f} with K = {K}): "
                  + "; ".join(f"{r['label']} {r['rm_passes_vs_ensemble']:.2f}" for r in a["methods"]
                              if r["method"].startswith("laser") and r["rm_passes_vs_ensemble"] is not None)]
        lines += ["", "Probe (each RM's pairwise agreement with the verifier on the untrained policy's samples, mean over seeds; 0.5 = blind):", "",
                  "| RM | " + " | ".join(doms) + " |", "|---" * (len(doms) + 1) + "|"]
        for arm, per in a["probe_accuracy"].items():
            lines.append(f"| {arm} | " + " | ".join(f"{per[d]:.2f}" for d in doms) + " |")
        lines += ["", "Hacking: mean characters of the greedy held-out answers per domain (untrained policy in the first row), "
                  "and each arm's share of each domain's prompts after warm-up (mean over seeds):", "",
                  "| method | " + " | ".join(f"length {d}" for d in doms) + " | " + " | ".join(f"shares {d}" for d in doms) + " |",
                  "|---" * (2 * len(doms) + 1) + "|"]
        lines.append("| untrained policy | " + " | ".join(_ci(a["untrained_length"][d], 1) for d in doms) + " |" + " |" * len(doms))
        for r in a["methods"]:
            shares = []
            for d in doms:
                if "arm_share" in r:
                    shares.append(", ".join(f"{arm} {v[0]:.2f}" for arm, v in r["arm_share"][d].items() if v[0] >= 0.005))
                else:
                    shares.append("all RMs")
            lines.append(f"| {r['label']} | " + " | ".join(_ci(r["eval_length"][d], 1) for d in doms) + " | " + " | ".join(shares) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(agg: dict, path: str) -> None:
    """One panel per pool: mean held-out accuracy per method with its 95% interval; untrained level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = list(agg)
    fig, axes = plt.subplots(1, len(pools), figsize=(5.5 * len(pools), 4.2), squeeze=False, sharey=True)
    for ax, pool in zip(axes[0], pools):
        a = agg[pool]
        rows = a["methods"]
        x = np.arange(len(rows))
        m = np.array([r["accuracy"]["mean"][0] for r in rows])
        lo = np.array([r["accuracy"]["mean"][1] for r in rows])
        hi = np.array([r["accuracy"]["mean"][2] for r in rows])
        colors = [f"C{i}" for i in range(len(rows))]
        ax.bar(x, m, color=colors, alpha=0.75)
        ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="none", ecolor="black", capsize=5)
        ax.axhline(a["untrained"]["mean"], ls="--", color="gray", label="untrained policy")
        # Short tick labels (the schedule and "feedback" live in the table): "LASeR\nconsensus\n(label-free)".
        ticks = [r["label"].split(" (")[0].replace(" feedback", "").replace(", ", "\n")
                 + ("\n(label-free)" if "label-free" in r["label"] else "") for r in rows]
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_title(f"pool '{pool}': {', '.join(a['arms'])}\n{len(a['seeds'])} seeds x {a['prompts_per_domain']} prompts per domain", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_ylabel("held-out accuracy, mean of 3 domains (95% CI)")
    fig.suptitle("Held-out accuracy after GRPO on the demo, per method", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results_dir: str, out: str, command: str = "") -> dict:
    agg = aggregate(load_runs(results_dir))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(agg, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown(agg, command))
    if agg:
        plot(agg, out + ".png")
    return agg


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", default="hard,default", help="comma-separated arm pools, run in this order (default hard,default)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    # Two processes with --threads 1 and disjoint seed ranges use both cores of a small machine.
    p.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST..N-1 only (default 0)")
    p.add_argument("--steps", type=int, default=32, help="GRPO steps per run (default 32, as laser-rl demo)")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts per domain (default 64)")
    # Two-term one-digit sums have only ~120 distinct questions: 64 held out leave ~56 for training (the demo's 64
    # training prompts would not fit); 32 steps x 2 prompts then revisit some, as the demo does after its pool.
    p.add_argument("--train-prompts", type=int, default=48, help="training prompts per domain (default 48)")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every method available)")
    p.add_argument("--label-free", default=None, help="the label-free feedback for LASeR (default: the core's recommended one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results-dir", default="benchmarks/results/demo_seeds_runs",
                   help="one JSON per (pool, method, seed); the default holds the committed runs, so a study resumes from them")
    p.add_argument("--out", default="benchmarks/results/demo_seeds", help="writes OUT.md, OUT.json, OUT.png")
    p.add_argument("--max-groups", type=int, default=None, help="stop after this many (pool, seed) groups")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from the JSONs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if min(args.seeds, args.steps, args.eval_prompts, args.train_prompts) < 1:
        p.error("--seeds, --steps, --eval-prompts and --train-prompts must be >= 1")
    if not 0 <= args.first_seed < args.seeds:
        p.error(f"--first-seed must be in 0..{args.seeds - 1} (--seeds {args.seeds}); got {args.first_seed}")
    command = "python benchmarks/demo_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.report_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from laser_rl.demo.arms import POOLS
        from laser_rl.demo.run import DemoConfig

        pools = [x.strip() for x in args.pools.split(",") if x.strip()]
        bad = [x for x in pools if x not in POOLS]
        if bad or not pools:
            p.error(f"--pools takes names from {sorted(POOLS)}; got {args.pools!r}")
        methods = study_methods(label_free_signal(args.label_free))
        if args.methods:
            wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in wanted if m not in methods]
            if bad:
                p.error(f"--methods takes names from {methods}; got {bad}")
            methods = wanted
        base = DemoConfig(steps=args.steps, eval_per_domain=args.eval_prompts, train_per_domain=args.train_prompts, threads=args.threads)
        print(f"demo_seeds: pools {pools}, seeds {args.first_seed}..{args.seeds - 1}, methods {methods}, results in {args.results_dir}", flush=True)
        made = run_study(base, pools, list(range(args.first_seed, args.seeds)), methods, args.results_dir, not args.no_progress, args.max_groups)
    agg = write_report(args.results_dir, args.out, command)
    print(markdown(agg), flush=True)
    if not args.report_only and made == 0:
        raise SystemExit(NOTHING_TO_DO)  # lets a driver loop (one group per process) stop


if __name__ == "__main__":
    main()
