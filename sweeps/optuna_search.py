"""Adaptive search with Optuna on Ray Tune: the best (β, γ, fade-in length, lr) for one family and dataset.

    python sweeps/optuna_search.py --family pro_vlae --dataset dsprites --trials 30 --preset demo
    python sweeps/optuna_search.py --family pro_vlae --dataset shapes3d --trials 100 --preset paper \\
        --objective mig_sup --seeds 0,1,2 --gpus-per-trial 0.25 --max-concurrent 8
    python sweeps/optuna_search.py --family vlae --dataset dsprites --trials 8 --set lr=1e-3 --dry-run

What is searched. The preset's config for (family, dataset) is the base; Optuna's TPE sampler (seeded,
--sampler-seed) proposes β log-uniform in [0.5, 32] and lr log-uniform in [1e-4, 2e-3], and for pro_vlae
also γ uniform in [0, 1] and fade_in_steps an integer in [0, steps_per_stage]. --set KEY=VALUE changes
the base for every trial; setting a searched field fixes it and takes it out of the search. At most
--max-concurrent configurations train at once (a ConcurrencyLimiter): TPE learns only from finished
ones, so more in flight means a more random search.

Seeds. Every configuration trains on each of --seeds (default: 0) and is scored by the mean of the
objective over them. TPE proposes one configuration per Tune trial, so the seeds train inside that trial
as one fused group (provlae/fused.py), a stage at a time (the mean exists at every stage end), each
seed's numbers those of a standalone run: exactly on a CPU (the seeds' steps in turn), to float rounding
on a GPU (one batched step for all seeds). A seed that diverges fails the configuration: its run ends
FAILED with the error, and so do the other seeds' unfinished runs. Each seed is its own MLflow child run,
so one Tune trial makes len(--seeds) runs: exactly one per (configuration, seed), across retries and
resumes — the unit that analysis/ ranks and averages (the seed mean is also reported to Tune as the
objective).

Early stopping. For the progressive families (pro_vlae, teacher_student) an ASHA scheduler may stop a
configuration at a stage end — the only points where the objective exists — when its seed mean is in
the worse half of those that reached the same stage (rungs at stage_steps · 2^k). Its runs end KILLED
with the tag early_stopped. beta_vae and vlae train in one stage and are never stopped early.
--no-early-stopping turns ASHA off.

Objective: one of the trainer's stage-end metrics (mig, mig_sup, factor_score, recon_error, mi_total,
mi_over, active_units); --mode defaults to min for recon_error, else max.

Tracking. The parent run (tagged provlae.role=sweep, search=optuna) holds the search as params
(space.beta = loguniform(0.5, 32), ...) and search_space.json; when the search ends, the best
configuration as params best.<field>, metric best_<objective>, tags best.trial_id and best.run_ids, and
best_config.json. Trial runs carry the grid's contract plus the tag search=optuna:
    python -m analysis trials --experiment E --objective mig_sup --search optuna

Resuming. Re-running the same command resumes an interrupted search: Tune keeps the Optuna study (the
searcher's state, sampler RNG included) and the ASHA state with the experiment, and Tuner.restore brings
them back, so the study goes on where it stopped and the total stays --trials. Finished trials never run
again; a configuration whose runs finished after Tune's last save is proposed again identically (seeded
sampler, restored state) and its runs are found in MLflow instead of retrained. The study lives in
Tune's experiment state rather than in an Optuna RDB storage because an RDB is not rolled back with
Tune's last save: after a hard kill it would hold trials Tune never heard of and feed TPE a different
history on resume. Checkpoints are taken at stage ends only (checkpoint_every does not apply: Tune
takes a checkpoint with a result, and a result must carry the objective), so a retried configuration
repeats at most a stage — for beta_vae and vlae, the whole run.

Exit status: 0 every trial ended (finished or stopped early), 1 some failed or did not finish (rerun to
resume), 2 a user error found before anything started.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provlae import plugins
from sweeps import grid
from sweeps.cli import SweepOptions, add_sweep_args, plan_target, registered, resolve_common, run_main
from sweeps.search_space import (
    OBJECTIVES,
    SearchSpec,
    build_spec,
    check_inputs,
    describe_distribution,
    parse_seed_list,
    search_plan,
)

DEFAULT_CONCURRENCY = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    plugins.preload(argv)  # the plug-ins' families and datasets are choices too
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Single-stage families are never stopped early. "
                                            "--max-concurrent defaults to 2 here.")
    parser.add_argument("--family", required=True, help=registered("families"))
    parser.add_argument("--dataset", required=True, help=registered("datasets"))
    parser.add_argument("--trials", type=int, required=True, help="configurations to try (>= 1)")
    parser.add_argument("--objective", default="mig_sup",
                        help=f"stage-end metric to optimise, the mean over seeds: {', '.join(OBJECTIVES)} "
                             f"(default: mig_sup)")
    parser.add_argument("--mode", help="max or min (default: min for recon_error, else max)")
    parser.add_argument("--preset", choices=sorted(grid.PRESETS), default="paper",
                        help="the base config and scale: paper, demo (minutes on CPU), smoke (tests)")
    parser.add_argument("--seeds", default="0",
                        help="seeds every configuration trains on: '0' (default) or '0,1,2' (objective = mean)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default: 0)")
    parser.add_argument("--no-early-stopping", dest="early_stopping", action="store_false",
                        help="never stop a configuration early (default: ASHA at stage ends, progressive "
                             "families only)")
    add_sweep_args(parser)
    parser.set_defaults(max_concurrent=DEFAULT_CONCURRENCY)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_inputs(args.family, args.dataset, args.trials, args.objective, args.mode)  # before they name a folder
    options = resolve_common(args, default_name=f"optuna-{args.preset}-{args.family}-{args.dataset}-"
                                                f"{args.objective}")
    spec = build_spec(args.preset, args.family, args.dataset, args.trials, args.objective, args.mode,
                      parse_seed_list(args.seeds), options.overrides, sampler_seed=args.sampler_seed,
                      early_stopping=args.early_stopping, data=options.data)
    if options.dry_run:
        print(describe(spec, options))
        return 0
    from sweeps.search import run_search  # imports Ray: only when the search really runs

    return run_search(spec, options)


def describe(spec: SearchSpec, options: SweepOptions) -> str:
    base = spec.base
    seeds = ",".join(map(str, spec.seeds))
    head = (f"search {options.name!r}: {spec.trials} trials of {base.family} on {base.dataset}, at most "
            f"{options.max_concurrent} at once (TPE, seed {spec.sampler_seed})")
    shape = (f"base: {base.num_stages} stage(s) of {base.stage_steps} steps, batch={base.batch_size} "
             f"z_dim={base.z_dim} subset={base.subset} device={base.device}")
    lines = [head, f"objective: {spec.objective} ({spec.mode}), mean over seeds {seeds}", shape, "space:"]
    lines += [f"  {k:<14} {describe_distribution(d)}" for k, d in spec.space.items()]
    if spec.rungs:
        lines.append(f"early stopping: ASHA at stage ends, steps {', '.join(map(str, spec.rungs))}")
    elif not spec.early_stopping:
        lines.append("early stopping: off (--no-early-stopping)")
    else:
        lines.append("early stopping: none (a single-stage family is never stopped early)")
    plan = search_plan(spec, plan_target(options))
    lines += plan.lines()
    if spec.rungs and plan.measured:
        lines.append("  note: an upper bound: ASHA stops some configurations at a stage end")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_main(main))
