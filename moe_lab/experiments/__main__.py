"""``python -m moe_lab.experiments list | run NAME [--seeds N] [--device cuda] [--quick] [--out PATH] | show NAME``."""
from __future__ import annotations

import argparse
import json

import pandas as pd
import torch

from . import REFERENCE_RUNS, load_result, provenance_text, reference_run, save_result, summary


def _show(result: dict) -> None:
    setup = result["setup"]
    print(f"{result['name']}: {result['description']}")
    print(f"budget {setup['budget']['amount']:g} {setup['budget']['kind']}, seeds {setup['seeds']}, "
          f"{setup['batch_size']} x {setup['seq_len']} tokens per step, lr {setup['lr']:g}, corpus {setup['corpus']}, "
          f"{setup['eval_tokens']:,} validation tokens")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(pd.DataFrame(summary(result)).set_index("arm").round(4).to_string())
    if result["name"] in REFERENCE_RUNS and REFERENCE_RUNS[result["name"]].claims:
        print("\nclaims:")
        for key, claim in REFERENCE_RUNS[result["name"]].claims(result).items():
            print(f"- [{key}] {claim.text}")
    print(f"\n{provenance_text(result)}")
    print("provenance:", json.dumps(result["provenance"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_lab.experiments", description="The course's reference runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registered reference runs")
    run = sub.add_parser("run", help="run one and store its result")
    run.add_argument("name")
    run.add_argument("--seeds", type=int, default=None, help="how many seeds, from 0 (default: the registered ones)")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--threads", type=int, default=1, help="CPU threads (toy models run fastest on one)")
    run.add_argument("--quick", action="store_true", help="a smoke test: 2%% of the budget, 2 seeds, not stored")
    run.add_argument("--out", default=None, help="where to write the result (default: the package's results/)")
    show = sub.add_parser("show", help="the stored result: table, claims, provenance")
    show.add_argument("name", help="a reference run's name or a result .json file")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, ref in REFERENCE_RUNS.items():
            print(f"{name}: {ref.description} ({len(ref.arms)} arms x {len(ref.seeds)} seeds)")
    elif args.command == "show":
        _show(load_result(args.name))
    else:
        torch.set_num_threads(args.threads)
        result = reference_run(args.name).run(seeds=args.seeds, device=args.device, quick=args.quick)
        if not args.quick or args.out:
            print(f"stored {save_result(result, args.out)}")
        _show(result)


if __name__ == "__main__":
    main()
