"""``bpsim profile TRACE.parquet``: teacher-forced acceptance of every output position of a trace."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("profile", help="compute the acceptance profile of a trace (one row per request)")
    parser.add_argument("trace", type=Path, help="trace file (.parquet) written by bpsim record")
    parser.add_argument("--out", type=Path, default=None, help="profile file to write (default TRACE.profile.parquet)")
    parser.add_argument("--target", default=None, help="target model (default: the one named in the trace)")
    parser.add_argument("--draft", default=None, help="draft model (default: the one named in the trace)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--dtype", default="float32",
                        help="float32, float16, bfloat16 or auto (default float32, so near-ties stay rare)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing profile")
    parser.add_argument("--check", action="store_true",
                        help="for a greedy trace, report rounds whose accepted count the profile does not reproduce")
    parser.set_defaults(run=run)


def run(args) -> int:
    from bpsim.fitting import sampling_mode
    from bpsim.models import load_pair
    from bpsim.profile import compare_with_trace, default_profile_path, model_names, profile_table, write_profile
    from bpsim.traces import read_trace, trace_metadata

    trace = read_trace(args.trace)
    out = args.out or default_profile_path(args.trace)
    if out.exists() and not args.force:
        from bpsim.errors import BpsimError

        raise BpsimError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    metadata = trace_metadata(trace)
    target_name, draft_name = model_names(metadata) if not (args.target and args.draft) else (args.target, args.draft)
    pair = load_pair(args.target or target_name, args.draft or draft_name, args.device, args.dtype)
    table = profile_table(trace, pair, progress=True)
    write_profile(table, out, overwrite=args.force)
    print(f"wrote the profile of {table.num_rows} requests to {out}")
    if args.check:
        if sampling_mode(metadata) != "greedy":
            print("--check compares greedy accepted counts only; this trace was sampled, so nothing was checked")
            return 0
        disagreements = compare_with_trace(table, trace)
        ties = [d for d in disagreements if d.near_tie]
        for item in disagreements:
            kind = "near-tie" if item.near_tie else "DISAGREES"
            print(f"{kind}: request {item.request_id} round {item.round}: recorded {item.recorded}, profile "
                  f"{item.profiled} (position {item.position}, target gap {item.target_gap:.2e}, "
                  f"draft gap {item.draft_gap:.2e})")
        print(f"checked {trace.num_rows} rounds: {len(disagreements) - len(ties)} disagreements, {len(ties)} near-ties")
        return 1 if len(disagreements) > len(ties) else 0
    return 0
