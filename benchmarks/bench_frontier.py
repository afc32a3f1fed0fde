"""Where pruning methods diverge: 25x to 200x (96-99.5% sparsity), every method from the same dense models.

Run with ``python benchmarks/bench_frontier.py`` (LeNet-300-100 with 3 seeds, about 35 minutes on 2
cores; LeNet-5 with 2 seeds, about 80 more: ``--models lenet_300_100 lenet_5``, or one per session with
``--keep-others``, which keeps the other model's results in the file; ``--quick``: one
seed of LeNet-300-100 on 15,000 images up to 50x, a few minutes, numbers meaningless). The data,
split, loop, optimizer, batch and learning rate are ``bench_reproduce.py``'s (Fashion-MNIST,
5,000 validation images that choose every epoch kept, test only reported). Per seed one dense model;
from it:

* ``prunet``: the paper's ladder (``TargetThreshold``: quality × σ of the survivors, the last layer at
  half the others' relative quality), 4, 8, 12, 25, 50, 100, 200x, each step retrained;
* ``torch-global-l1``: ``torch.nn.utils.prune.global_unstructured`` (L1) along the same ladder;
* ``gmp-global``: gradual magnitude pruning (Zhu & Gupta's cubic schedule, one global cut every 50
  steps over 3/4 of the epochs), a run of its own per compression;
* ``gmp-erk``: the same gradual schedule, each step's sparsity shared among the layers by ERK's densities
  (``PruningSchedule.gradual(..., criterion="erk")``: small layers denser) instead of one global cut;
* ``acdc-global``: AC/DC (``PruningSchedule.acdc``: compressed phases of one global magnitude cut chosen
  afresh among every weight, decompressed phases in which every weight trains, a last compressed phase
  of at least a quarter of the epochs), a run of its own per compression.

Each per-compression run gets the epochs the ladder spends to reach that compression, so every
method has the same budget at every point. Results go to ``benchmarks/results/bench_frontier.json``
(``--quick``: ``bench_frontier_quick.json``); ``python benchmarks/make_results.py`` puts them in RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_reproduce as base  # noqa: E402

from prunet import Pruner, TargetThreshold, create_model  # noqa: E402
from prunet.data import num_batches  # noqa: E402
from prunet.phases import SLOWER  # noqa: E402
from prunet.schedule import PruningSchedule, acdc_events, gradual_events  # noqa: E402
from prunet.train import DivergedError, FitOptions, fit  # noqa: E402

LADDER = (4.0, 8.0, 12.0, 25.0, 50.0, 100.0, 200.0)
REPORTED = (25.0, 50.0, 100.0, 200.0)
METHODS = ("prunet", "torch-global-l1", "gmp-global", "gmp-erk", "acdc-global")
FULL = {
    "lenet_300_100": {**base.FULL["lenet_300_100"], "seeds": [0, 1, 2]},
    "lenet_5": {**base.FULL["lenet_5"], "seeds": [0, 1]},
}
QUICK = {"lenet_300_100": {**base.QUICK["lenet_300_100"], "ladder": (4.0, 8.0, 12.0, 25.0, 50.0),
                           "reported": (25.0, 50.0)}}


def epochs_to(c: float, spec: dict) -> int:
    """The epochs the ladder spends to reach compression ``c``: every budget of a per-compression run."""
    return (spec.get("ladder", LADDER).index(c) + 1) * spec["epochs"]


def fit_or_slower(model: nn.Module, epochs: int, data, norm, options: FitOptions, log, restart=None) -> float:
    """``fit`` at the benchmark's rate, or, where the loss diverges, again from the model as it was at the next
    of ``prunet.phases.SLOWER`` (as ``prunet run`` retries a phase); the fraction that trained it. ``restart()``
    sets up a run's own state again (a schedule)."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for fraction in SLOWER:
        try:
            fit(model, data.train, data.val, base.train_cfg(epochs, fraction), norm, options)
            return fraction
        except DivergedError:
            log(f"  {options.phase}: the loss diverged at {fraction:g} of the rate; again from the same start at "
                f"a lower one")
            model.load_state_dict(start)
            if restart is not None:
                options = restart(options)
    raise DivergedError(f"{options.phase}: diverged at every rate of {SLOWER}")


def ladders(model: nn.Module, data, norm, spec: dict, seed: int, log, method: str) -> list[dict]:
    """The paper's ladder (``prunet``) or torch's global L1 along it, a point at each reported compression."""
    ladder, reported = spec.get("ladder", LADDER), spec.get("reported", REPORTED)
    pruner = Pruner(model) if method == "prunet" else None
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(m.weight.numel() for m, _ in params)
    points, slower = [], {}  # the ladder's steps that diverged at the benchmark's rate: the fraction that trained
    for i, c in enumerate(ladder, start=1):
        if pruner is not None:
            pruner.prune(TargetThreshold(c, spec["relative"]))
        else:
            _, kept = base.kept_fraction(model)
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=kept - round(total / c))
        fraction = fit_or_slower(model, spec["epochs"], data, norm, FitOptions(
            batch_size=base.BATCH, seed=seed + i, pruner=pruner, phase=f"{method} {c:g}x"), log)
        slower = slower if fraction == 1.0 else {**slower, f"{c:g}": fraction}
        if c in reported:
            points.append({**base.point(model, data, norm, c, log, method), "slower": slower})
    return points


def scheduled(dense_state: dict, name: str, data, norm, spec: dict, seed: int, log, method: str) -> list[dict]:
    """GMP (``gmp-global``, ``gmp-erk``) or AC/DC from the dense model, one run per reported compression, each with
    the ladder's epochs."""
    steps = num_batches(len(data.train), base.BATCH)
    points = []
    for c in spec.get("reported", REPORTED):
        model = create_model(name)
        model.load_state_dict(dense_state)
        pruner = Pruner(model)
        epochs = epochs_to(c, spec)
        if method.startswith("gmp-"):
            events = gradual_events(0, round(0.75 * epochs * steps), 50, 0.0, 1 - 1 / c, method.split("-")[1])
            after = math.ceil(0.75 * epochs)
        else:
            phase = max(1, epochs // 8)
            final = max(2 * phase, epochs // 4)
            events = acdc_events(0, epochs * steps, phase * steps, 0, final * steps, 1 - 1 / c, "global")
            after = events[-1].step // steps
        options = FitOptions(batch_size=base.BATCH, seed=seed + 100, pruner=pruner,
                             on_step=PruningSchedule(pruner, events).advance_to, choose_after=after,
                             phase=f"{method} {c:g}x")
        fraction = fit_or_slower(model, epochs, data, norm, options, log, restart=lambda o: dataclasses.replace(
            o, on_step=PruningSchedule(pruner, events).advance_to))
        points.append({**base.point(model, data, norm, c, log, method), "epochs": epochs,
                       "slower": {} if fraction == 1.0 else {f"{c:g}": fraction}})
    return points


def dense_of(name: str, data, norm, spec: dict, seed: int, log) -> tuple[dict, dict]:
    """``bench_reproduce``'s dense model of a seed, trained again from its start at a lower rate where the loss
    diverges (LeNet-5's seed 1 did at lr 0.05 on one machine)."""
    torch.manual_seed(seed)
    model = create_model(name)
    t = time.perf_counter()
    fraction = fit_or_slower(model, spec["dense_epochs"], data, norm,
                             FitOptions(batch_size=base.BATCH, seed=seed, phase="dense"), log)
    dense = {**base.accuracies(model, data, norm), "seconds": time.perf_counter() - t, "lr_fraction": fraction}
    log(f"{name} seed {seed}: dense val {dense['val_acc']:.2f}  test {dense['test_acc']:.2f}")
    return {k: v.clone() for k, v in model.state_dict().items()}, dense


def run_model(name: str, spec: dict, log, on_seed=None, earlier: list[dict] = ()) -> dict:
    """Every method on every seed of ``spec``; ``on_seed(partial)`` after each seed, with the results so far.

    ``earlier``: seeds measured before (by another run of this benchmark), summarised with these.
    """
    data, norm = base.splits(spec)
    seeds = sorted(earlier, key=lambda s: s["seed"])
    for seed in spec["seeds"]:
        state, dense = dense_of(name, data, norm, spec, seed, log)
        result = {"seed": seed, "dense": dense, "methods": {}}
        for method in METHODS:
            t = time.perf_counter()
            if method in ("prunet", "torch-global-l1"):
                model = create_model(name)
                model.load_state_dict(state)
                points = ladders(model, data, norm, spec, seed, log, method)
            else:
                points = scheduled(state, name, data, norm, spec, seed, log, method)
            result["methods"][method] = {"points": points, "seconds": time.perf_counter() - t}
        seeds = sorted(seeds + [result], key=lambda s: s["seed"])
        if on_seed is not None and seed != spec["seeds"][-1]:
            on_seed(model_result(name, spec, seeds))
    return model_result(name, spec, seeds)


def model_result(name: str, spec: dict, seeds: list[dict]) -> dict:
    spec = {**spec, "seeds": [s["seed"] for s in seeds]}
    return {"model": name, "spec": {k: v for k, v in spec.items() if k not in ("ladder", "reported")},
            "reported": list(spec.get("reported", REPORTED)), "seeds": seeds, "summary": summarise(seeds)}


def summarise(seeds: list[dict]) -> dict:
    """Per method and compression: test and validation accuracy, mean and std over seeds; dense's means."""
    out = {"dense_test_mean": statistics.mean(s["dense"]["test_acc"] for s in seeds),
           "dense_val_mean": statistics.mean(s["dense"]["val_acc"] for s in seeds), "methods": {}}
    for method in METHODS:
        rows = []
        for k, p in enumerate(seeds[0]["methods"][method]["points"]):
            test = [s["methods"][method]["points"][k]["test_acc"] for s in seeds]
            val = [s["methods"][method]["points"][k]["val_acc"] for s in seeds]
            rows.append({"target": p["target"], "test_mean": statistics.mean(test),
                         "test_std": statistics.stdev(test) if len(test) > 1 else 0.0, "val_mean": statistics.mean(val),
                         "compression_mean": statistics.mean(s["methods"][method]["points"][k]["compression"]
                                                             for s in seeds)})
        out["methods"][method] = {"points": rows,
                                  "seconds": statistics.mean(s["methods"][method]["seconds"] for s in seeds)}
    return out


def same_run(earlier: dict, spec: dict, out: Path) -> None:
    """Refuse (SystemExit, before anything trains) to add seeds to a model measured with another protocol: other
    epochs, ladder, compressions or methods would be averaged point by point with this run's."""
    now = {"reported": list(spec.get("reported", REPORTED))}
    theirs = {k: v for k, v in earlier["spec"].items() if k != "seeds"}
    ours = {k: v for k, v in spec.items() if k not in ("ladder", "reported", "seeds")}
    methods = [sorted(s["methods"]) for s in earlier["seeds"]]
    targets = [[p["target"] for p in s["methods"][m]["points"]] for s in earlier["seeds"] for m in s["methods"]]
    if json.loads(json.dumps(ours)) != theirs or earlier["reported"] != now["reported"] \
            or any(m != sorted(METHODS) for m in methods) or any(t != now["reported"] for t in targets):
        raise SystemExit(f"--keep-others --seeds: {out} measured {earlier['model']} otherwise (spec {theirs}, "
                         f"compressions {earlier['reported']}, methods {methods[0] if methods else []}); this run "
                         f"would measure spec {ours}, compressions {now['reported']}, methods {sorted(METHODS)}: "
                         "run every seed again instead (--seeds, without --keep-others)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed of LeNet-300-100 on 15,000 images, to 50x")
    parser.add_argument("--models", nargs="+", choices=sorted(FULL), default=["lenet_300_100"],
                        help="which LeNets (default lenet_300_100; lenet_5 adds about 80 minutes)")
    parser.add_argument("--out", type=Path, help="the JSON file (default benchmarks/results/bench_frontier*.json)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="these seeds instead of the benchmark's (3 for LeNet-300-100, 2 for LeNet-5)")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep what the existing file holds that this run does not measure: the other models "
                             "(each with the command, machine and time it was measured with) and, with --seeds, "
                             "the model's other seeds; one LeNet, or one seed, per session")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    specs = QUICK if args.quick else {name: FULL[name] for name in args.models}
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_frontier{'_quick' if args.quick else ''}.json"
    command = " ".join(["python benchmarks/bench_frontier.py", *(sys.argv[1:] if argv is None else argv)])
    started, models = time.perf_counter(), []
    kept, kept_seeds = [], {}
    if args.keep_others and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("quick") != args.quick:
            raise SystemExit(f"--keep-others: {out} holds a {'quick' if earlier.get('quick') else 'full'} run")
        for m in earlier["models"]:  # a file from before models carried their own record: the run's
            for key in ("command", "machine", "seconds"):
                m.setdefault(key, earlier[key])
        kept = [m for m in earlier["models"] if m["model"] not in specs]
        if args.seeds:
            for m in earlier["models"]:
                if m["model"] in specs:
                    same_run(m, specs[m["model"]], out)
                    kept_seeds[m["model"]] = ([s for s in m["seeds"] if s["seed"] not in args.seeds],
                                              m["command"], m["seconds"], m["machine"])

    def write(done: list[dict]) -> dict:
        """The file as it stands: written after every seed, so a crash keeps what was measured."""
        report = {
            "quick": args.quick, "methods": METHODS, "lr": base.LR, "batch_size": base.BATCH,
            "train": base.DENSE_CFG, "machine": base.machine(), "command": command,
            "seconds": time.perf_counter() - started,
            "models": sorted(kept + done, key=lambda m: list(FULL).index(m["model"])),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    for name, spec in specs.items():
        if args.seeds:
            spec = {**spec, "seeds": args.seeds}
        t = time.perf_counter()
        earlier_seeds, earlier_command, earlier_seconds, earlier_machine = kept_seeds.get(name, ([], None, 0.0, None))
        if earlier_seeds:
            print(f"{name}: keeping seeds {[s['seed'] for s in earlier_seeds]} of {out}", flush=True)

        def record(result: dict) -> dict:
            if not earlier_seeds:
                return {**result, "command": command, "machine": base.machine(), "seconds": time.perf_counter() - t}
            return {**result, "command": f"{earlier_command}, then {command}", "machine": base.machine(),
                    "earlier_machine": earlier_machine, "seconds": earlier_seconds + time.perf_counter() - t}
        models.append(record(run_model(name, spec, lambda line: print(line, flush=True),
                                       on_seed=lambda partial: write(models + [record(partial)]),
                                       earlier=earlier_seeds)))
        report = write(models)
    print(f"wrote {out} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
