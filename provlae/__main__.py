"""``python -m provlae``: train one trial, generate or check datasets, measure this machine's throughput.

  python -m provlae train [--config FILE] [--set key=value ...] [--plugin MODULE ...] --out DIR
  python -m provlae data generate {dsprites,shapes3d} --out PATH
  python -m provlae data check PATH
  python -m provlae calibrate [--device auto|cpu|cuda] [--fuse 1,4] [--batch-size N] [--dataset D] [--family F]
                            [--eval-images N]

User errors print one line ``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from provlae.atomic import write_atomic
from provlae.errors import ProvlaeError

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


def build_config(config_file: str | None, assignments: list[str], plugin_modules: list[str] = (),
                 data_dir: str | None = None, data_files: list[str] = ()):
    """The trial's config: the file, then --set; --plugin modules loaded first; the dataset's file from
    --data-file / --data-dir / $PROVLAE_DATA_DIR unless data_path is set."""
    from provlae import plugins
    from provlae.config import TrialConfig, parse_assignments
    from provlae.data.files import DataFiles

    names = plugins.load(list(plugin_modules))  # before the config file: it may name a plug-in's family
    raw = {**(TrialConfig.from_file(config_file).to_dict() if config_file else {}), **parse_assignments(assignments)}
    names = list(dict.fromkeys(plugins.parse(raw.get("plugins")) + names))
    if names:
        raw["plugins"] = ",".join(names)
    data = DataFiles.from_args(data_dir, list(data_files))
    if data and raw.get("data_path") in (None, "", "None", "none"):
        raw.update(data.layer(raw.get("dataset", TrialConfig.dataset)))
    return TrialConfig.from_dict(raw)


def data_record(cfg) -> dict:
    """Which file the trial trained on and its sha256 (procedural data: no file)."""
    if cfg.data_path is None:
        return {"source": "procedural"}
    from provlae.data.files import checksum

    return {"source": cfg.data_path, "sha256": checksum(cfg.data_path)}


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class TerminalProgress:
    """One line per progress event on stderr: stage, step, loss terms, alpha, img/s, ETA (throttled)."""

    def __init__(self, total_steps: int, batch_size: int, every_s: float = 1.0):
        self.total, self.batch, self.every_s, self.last = total_steps, batch_size, every_s, 0.0

    def __call__(self, event) -> None:
        now = time.monotonic()
        if event.kind == "step" and now - self.last < self.every_s and event.step != self.total:
            return
        self.last = now
        m = event.metrics
        if event.kind == "step":
            kls = " ".join(f"{k}={m[k]:.2f}" for k in sorted(m) if k.startswith("kl_z"))
            eta = (self.total - event.step) * self.batch / max(m["img_s"], 1e-9)
            print(f"stage {event.stage} step {event.step}/{self.total} loss={m['loss']:.2f} "
                  f"recon={m['recon']:.2f} {kls} alpha={m['alpha']:.2f} {m['img_s']:.0f} img/s "
                  f"ETA {_fmt_eta(eta)}", file=sys.stderr, flush=True)
        elif event.kind == "stage_end":
            keys = ("recon_error", "mig", "mig_sup", "factor_score", "mi_total")
            shown = " ".join(f"{k}={m[k]:.3f}" for k in keys if k in m)
            print(f"stage {event.stage} done at step {event.step}: {shown}", file=sys.stderr, flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def cmd_train(args: argparse.Namespace) -> int:
    from provlae.train import Trainer

    cfg = build_config(args.config, args.set, args.plugin, args.data_dir, args.data_file)
    out = Path(args.out)
    trainer = Trainer(cfg)  # loads data and builds the model: every input error surfaces here
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        trainer.load_checkpoint(ckpt)
        print(f"resuming {cfg.run_name} from step {trainer.step} ({ckpt})", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    progress = TerminalProgress(cfg.total_steps, cfg.batch_size)

    def on_event(event) -> None:
        progress(event)
        if event.kind == "stage_end":
            trainer.write_stage_figures(out / "figures")
        if event.kind in ("checkpoint", "stage_end"):
            trainer.save_checkpoint(ckpt)

    t0 = time.perf_counter()
    metrics = trainer.run(on_event)
    trainer.write_figures(out / "figures")
    figures = sorted((out / "figures").rglob("*.png"))  # the last stage's and every stage end's
    write_json_atomic(out / "config.json", cfg.to_dict())
    # kl_z<l> of the result is the evaluated KL per level (eval_kl_z<l>), not the last batch's
    kl = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_kl_z")}
    result = {
        "config": cfg.to_dict(),
        "metrics": {**metrics, **kl},
        "stages": trainer.history,
        "figures": [str(p.relative_to(out)) for p in figures],
        "data": data_record(cfg),
        "timing": {"run_s": time.perf_counter() - t0, "train_s": trainer.train_seconds},
    }
    write_json_atomic(out / RESULT, result)
    print(json.dumps(metrics, sort_keys=True))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from provlae.calibrate import calibrate
    from provlae.config import TrialConfig, parse_assignments
    from provlae.errors import ConfigError
    from provlae.throughput import add

    try:
        fuse = sorted({int(k) for k in args.fuse.split(",") if k.strip()})
    except ValueError:
        fuse = []
    if not fuse or fuse[0] < 1:
        raise ConfigError(f"--fuse must be a comma list of group sizes >= 1, got {args.fuse!r}")
    if not args.seconds > 0 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--seconds must be > 0 and --threads >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TrialConfig.from_dict({**parse_assignments(args.set), "dataset": args.dataset, "family": args.family,
                                  "batch_size": args.batch_size, "device": args.device})
    measured = calibrate(base, fuse, seconds=args.seconds, say=lambda line: print(line, flush=True),
                         eval_images=args.eval_images)
    print(f"added {len(measured)} measurement(s) to {add(measured)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ProvlaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    from provlae import plugins
    from provlae.data.cli import add_subcommands as add_data_subcommands

    plugins.preload(argv)  # the plug-ins' datasets are choices of `data generate` too
    parser = argparse.ArgumentParser(prog="python -m provlae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one trial and write DIR/result.json and DIR/figures/")
    train.add_argument("--config", help="YAML or JSON file of config fields")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field (repeatable)")
    train.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="import MODULE first: a module of your own that registers a family or dataset "
                            "(repeatable; installed packages' provlae.families / provlae.datasets entry "
                            "points load by themselves)")
    train.add_argument("--data-dir", help="a folder with each dataset's real file under its standard name "
                                          "(default: $PROVLAE_DATA_DIR; neither: procedural data)")
    train.add_argument("--data-file", action="append", default=[], metavar="DATASET=PATH",
                       help="the real file of one dataset, over --data-dir (repeatable)")
    train.add_argument("--out", required=True, help="output directory (resumes from its checkpoint)")
    train.set_defaults(func=cmd_train)
    cal = sub.add_parser("calibrate", help="measure training img/s and one evaluation on this machine's device "
                                           "into the throughput table that sweep plans read")
    cal.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu or cuda")
    cal.add_argument("--fuse", default="1", metavar="K,...", help="group sizes to measure (default 1: solo)")
    cal.add_argument("--dataset", default="dsprites")
    cal.add_argument("--family", default="pro_vlae")
    cal.add_argument("--batch-size", type=int, default=128)
    cal.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config field")
    cal.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement (default 6)")
    cal.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; a sweep trial: its CPUs)")
    cal.add_argument("--eval-images", type=int, default=4096,
                     help="images of the timed evaluation (default 4096; fewer: sooner, a rougher figure)")
    cal.set_defaults(func=cmd_calibrate)
    data = sub.add_parser("data", help="generate or check datasets")
    add_data_subcommands(data.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ProvlaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
