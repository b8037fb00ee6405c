"""``distill plan``: a recipe's parameters, FLOPs, memory, disk and time, before it runs."""
from __future__ import annotations

import json

from ..recipes import load_recipe, parse_overrides
from .common import RECIPE_HELP, RECIPE_TRUST, add_set


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate a recipe's params, FLOPs, memory per process, extract disk and time",
                       description=RECIPE_TRUST)
    p.add_argument("recipe", help=RECIPE_HELP)
    add_set(p)
    p.add_argument("--processes", type=int, default=1, help="training processes (GPUs) the run will use")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="the GPU to plan for (H100, H100 PCIe, H200, A100, L40S, L4, RTX 4090); default: this "
                        "machine's (its CPU's measured matmul rate without a GPU)")
    p.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ..plan import format_plan, plan_recipe

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    plan = plan_recipe(recipe, processes=args.processes, gpu=args.gpu, mfu=args.mfu)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
