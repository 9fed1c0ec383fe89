"""``bpsim export FIT_DIR --out predictor.json``: export the predictor with the best replayed held-out speed."""

from __future__ import annotations

from pathlib import Path

from bpsim.errors import BpsimError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export the fitted predictor with the best replayed speed on held-out requests",
        description="Replay every predictor that bpsim fit scored on the requests it held out (or reuse the "
                    "replay kept in FIT_DIR/replay-heldout.json) and write the fastest one as a versioned "
                    "JSON config.")
    parser.add_argument("fit_dir", type=Path, metavar="FIT_DIR", help="output folder of bpsim fit (with summary.json)")
    parser.add_argument("--out", type=Path, required=True, help="exported predictor file to write (JSON)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--recompute", action="store_true", help="replay again even if FIT_DIR keeps a replay")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of requests (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replay's draws and bootstrap (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="torch device of the replay (default auto: CUDA when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of a CPU replay (default 1; its per-round tensors are small)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from bpsim.export import export_winner

    if args.out.exists() and not args.force:
        raise BpsimError(f"{args.out} already exists; pass --force to overwrite it or choose another --out")
    exported = export_winner(args.fit_dir, args.out, device=args.device, bootstrap=args.bootstrap, seed=args.seed,
                             recompute=args.recompute, threads=args.threads)
    expected = exported.expected
    speedup = expected["speedup_vs_target"]
    versus_plain = expected["speedup_vs_best_plain"]
    label = "" if expected["mode"] == "exact" else " (APPROXIMATE replay)"
    print(f"exported {exported.predictor_config['family']} to {args.out}: first draft_len {exported.first_draft_len}, "
          f"expected speedup {speedup[0]:.2f}x [{speedup[1]:.2f}, {speedup[2]:.2f}] over the target alone and "
          f"{versus_plain[0]:.2f}x [{versus_plain[1]:.2f}, {versus_plain[2]:.2f}] over the best plain setting "
          f"(draft_len {expected['best_plain_draft_len']}) on {expected['held_out_requests']} held-out "
          f"requests{label}")
    return 0
