"""``distill train``, ``run``, ``export``, ``extract`` and ``recipes``: pretraining a student and what it needs and
makes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..logs import count
from ..recipes import load_recipe, parse_overrides
from ..vocab import LATENT_STORAGE
from .common import RECIPE_HELP, RECIPE_TRUST, add_output_dir, add_recipe_args, add_set, keys_epilog


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="pretrain a student on a recipe", description=RECIPE_TRUST, epilog=keys_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(t)
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..trainer import train

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    summary = train(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.no_progress, allow_changes=args.allow_changes)
    print(json.dumps(summary, indent=2))
    return 0


def add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="train + export + probe against random-init and raw-pixel baselines",
                       description=RECIPE_TRUST, epilog=keys_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(r)
    r.add_argument("--test-fraction", type=float, default=None, metavar="F",
                   help="score the probes on a seeded stratified share F of the test split, for a quick look (the "
                        "same as --set probe_test_fraction=F); stated under the table")
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    """Pretrain, export, then probe the distilled student next to random init and raw pixels."""
    from ..pipeline import run_recipe

    overrides = list(args.set or []) + ([] if args.test_fraction is None else
                                        [f"probe_test_fraction={args.test_fraction!r}"])
    recipe = load_recipe(args.recipe, parse_overrides(overrides))
    res = run_recipe(recipe, args.output_dir, resume=args.resume, overwrite=args.overwrite,
                     allow_changes=args.allow_changes,
                     progress=not args.no_progress, recipe_name=str(args.recipe), overrides=overrides)
    rows = res["rows"]
    print(f"\n{res['table']}\n\nprobe: train on {rows[0]['num_train']} {recipe.dataset} train images "
          f"(fraction {recipe.probe_train_fraction}), {rows[0]['test']}; distillation {count(recipe.steps, 'step')} "
          f"in {res['train_seconds']:.0f}s; total {res['total_seconds']:.0f}s on {res['machine']}")
    return 0


def add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a run's student in timm format")
    e.add_argument("run_dir")
    add_output_dir(e, "directory for the exported student (config.json + model.safetensors)")
    e.add_argument("--checkpoint", default=None, help="a checkpoint-{step} directory (default: latest)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--ema", action="store_true", help="export the EMA of the student's weights (recipe ema: true)")
    e.add_argument("--onnx", action="store_true",
                   help="also write model.onnx: the exported timm model (pooled features, dynamic batch), checked "
                        "against it with onnxruntime (needs the onnx extra)")
    e.add_argument("--opset", type=int, default=None, metavar="N", help="with --onnx: the ONNX opset (default 18)")
    e.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="then upload the export (config.json, model.safetensors, README.md) to this Hugging Face Hub "
                        "model repo (log in with `hf auth login`, or set HF_TOKEN)")
    e.add_argument("--private", action="store_true",
                   help="with --push-to-hub: create the repo private; an existing public repo is refused before "
                        "anything is uploaded (the Hub keeps an existing repo's visibility)")
    e.add_argument("--make-private", action="store_true",
                   help="with --push-to-hub: make an existing public repo private before uploading (implies --private)")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from ..export import REPO_ID_RE, export_student

    if (args.private or args.make_private) and args.push_to_hub is None:
        raise ValueError(f"{'--make-private' if args.make_private else '--private'} applies to an upload; add "
                         f"--push-to-hub NAMESPACE/NAME, or drop it.")
    if args.push_to_hub is not None and not REPO_ID_RE.match(args.push_to_hub):  # before the export is written
        raise ValueError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repository id; valid: NAMESPACE/NAME "
                         f"(letters, digits, '-', '_', '.'), e.g. your-user/resnet18-distill-fmnist.")
    if args.opset is not None and not args.onnx:
        raise ValueError(f"--opset {args.opset} applies to an ONNX export; add --onnx, or drop --opset.")
    from ..deploy import ONNX_OPSETS

    if args.opset is not None and args.opset not in ONNX_OPSETS:
        raise ValueError(f"--opset {args.opset} is not valid; valid: {ONNX_OPSETS.start} to {ONNX_OPSETS.stop - 1} "
                         f"(default 18, run by onnxruntime >= 1.14; torch's exporter writes no lower opset). Fix: "
                         f"--opset 18.")
    extra = {"opset": args.opset} if args.opset is not None else {}
    out = export_student(args.run_dir, args.output_dir, checkpoint=args.checkpoint, overwrite=args.overwrite,
                         ema=args.ema, onnx=args.onnx, **extra)
    ckpt = Path(args.run_dir) / json.loads((out / "config.json").read_text())["distill"]["checkpoint"]
    print(f"exported the {'EMA ' if args.ema else ''}student of {ckpt} to {out}\nload it with: "
          f"timm.create_model('local-dir:{out}', pretrained=True, num_classes=K)")
    if args.onnx:
        meta = json.loads((out / "config.json").read_text())["distill"]["onnx"]
        print(f"wrote {out / meta['file']} (opset {meta['opset']}): input '{meta['input']}' {meta['input_shape']} "
              f"-> pooled features {meta['output_shape']}; max |onnxruntime - torch| = "
              f"{meta['max_abs_diff_onnxruntime']:.2g} on 3 random images")
    if args.push_to_hub:
        from ..export import push_to_hub

        url = push_to_hub(str(out), args.push_to_hub, private=args.private, make_private=args.make_private)
        print(f"pushed to {url}\nload it with: timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0


def add_extract_parser(sub) -> None:
    x = sub.add_parser("extract", help="cache the teacher's features of every training image (fp16, memory-mapped)",
                       description=RECIPE_TRUST, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("recipe", help=RECIPE_HELP)
    add_output_dir(x, "cache directory (written atomically; manifest.json + one .npy per teacher feature)")
    x.add_argument("--draws", dest="num_draws", type=int, default=2,  # dest: extract_features_cache's keyword
                   help="noise draws per image (training picks one per step)")
    x.add_argument("--batch-size", type=int, default=None, help="images per teacher forward (default: the recipe's)")
    x.add_argument("--max-images", type=int, default=None, help="cache only the first N training images")
    x.add_argument("--latents", action="store_true",
                   help="latent teachers (SD, DiT): cache the VAE posterior (mean, std) of every image, and of its "
                        "flip unless augment: none, instead of features; train with --set latent_cache=DIR (fresh "
                        "noise every step, the VAE never runs)")
    x.add_argument("--latent-dtype", dest="storage", default="float16", choices=LATENT_STORAGE,  # the keyword
                   help="with --latents: storage dtype (default float16)")
    add_set(x)
    x.add_argument("--overwrite", action="store_true", help="replace an existing cache in --output-dir")
    x.add_argument("--no-progress", action="store_true")
    x.set_defaults(func=cmd_extract)


def cmd_extract(args) -> int:
    """Write the teacher's features of every training image (N noise draws each) to a feature cache."""
    from ..cache import extract_features_cache

    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    if args.latents:
        from ..latent_cache import extract_latent_cache

        res = extract_latent_cache(recipe, args.output_dir, batch_size=args.batch_size, overwrite=args.overwrite,
                                   progress=not args.no_progress, max_images=args.max_images, storage=args.storage)
        print(f"wrote the VAE posterior (mean, std; {args.storage}) of {res['num_images']} images x {res['flips']} "
              f"view(s) to {res['path']}: {res['bytes'] / 2**20:.1f} MiB, {res['bytes_per_image'] / 1024:.1f} KiB per "
              f"image, {res['seconds']:.1f} s")
        print(f"train from it with: --set latent_cache={res['path']}")
        return 0
    res = extract_features_cache(recipe, args.output_dir, num_draws=args.num_draws, batch_size=args.batch_size,
                                 overwrite=args.overwrite, progress=not args.no_progress, max_images=args.max_images)
    mib = res["bytes"] / 2**20
    print(f"wrote {res['num_images']} images x {res['num_draws']} draws of {', '.join(res['keys'])} (float16) to "
          f"{res['path']}: {mib:.1f} MiB on disk, {res['bytes_per_image'] / 1024:.1f} KiB per image "
          f"({res['bytes_per_image'] / res['num_draws'] / 1024:.1f} KiB per draw), {res['seconds']:.1f} s")
    print(f"train from it with: --set feature_cache={res['path']} augment=none")
    return 0


def add_recipes_parser(sub) -> None:
    rc = sub.add_parser("recipes", help="list the shipped recipes (usable by name: distill train quickstart -o DIR)")
    rc.add_argument("--keys", action="store_true", help="print every recipe key (type, default, valid values)")
    rc.add_argument("--show", default=None, metavar="NAME", help="print one shipped recipe's YAML")
    rc.set_defaults(func=cmd_recipes)


def cmd_recipes(args) -> int:
    """List the shipped recipes (name and first comment line), the key reference, or one recipe's text."""
    from ..recipes import key_reference_text, recipe_summary, resolve_recipe, shipped_recipes

    if args.show:
        print(resolve_recipe(args.show).read_text(), end="")
    elif args.keys:
        print(key_reference_text())
    else:
        shipped = shipped_recipes()
        width = max(map(len, shipped), default=0)
        for name, path in shipped.items():
            print(f"{name:<{width}}  {recipe_summary(path)}")
        print("\nrun one by name: distill train NAME -o runs/NAME; see one: distill recipes --show NAME; keys: "
              "distill recipes --keys")
    return 0
