"""Forgetting: task 1 MoNuSeg, then task 2 TNBC; naive fine-tuning vs CA-SAM continual.

1. ``base``: a ``ca-sam`` model trained on MoNuSeg (task 1; frozen pretrained tiny SAM, see
   ``variant_runs.pretrained_tiny_sam``).
2. ``naive``: ``base`` fine-tuned on TNBC (``init_from``: its alignment layer and heads keep
   training, as "continue training" does); evaluated as one network (every image through
   its alignment layer, with the thresholds its TNBC training tuned).
3. ``ca-sam continual``: ``base`` + TNBC as a new task (``continue_from``: new alignment
   layer + VAE; the heads and task 1 frozen; images routed by the VAEs).

Prints held-out AJI/Dice on both datasets for the three models, task-1 AJI drop of each
method, and the routing accuracy of the continual model on held-out images of both tasks
(an image counts as routed to the task most of its tiles went to). Every training run has the
same step budget. Results also go to ``OUT/continual.json``.

    nice -n 5 .venv/bin/python benchmarks/bench_continual.py [--steps 200] [--pretrain-steps 300]
"""

from __future__ import annotations

import time

from variant_runs import evaluate, load_heldout, prepare, save_json, tiny_config, train_row, variant_parser


def main() -> None:
    from napari_amasam.inference.predictor import Predictor

    parser = variant_parser(__doc__.splitlines()[0], steps=200, out="benchmarks/output/continual")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    setup = prepare(args)
    out, mon_train, tnbc_train, sam = setup.out, setup.monuseg_train, setup.tnbc_train, setup.sam
    mon_held, tnbc_held = setup.monuseg_heldout, setup.tnbc_heldout
    print(f"pretrained tiny SAM ready ({time.perf_counter() - t0:.0f}s)", flush=True)

    base = train_row(out / "base", mon_train, tiny_config("ca-sam"), args.steps, args.seed, sam)
    naive = train_row(out / "naive", tnbc_train, tiny_config("ca-sam"), args.steps, args.seed,
                      sam, init_from=str(base))
    continual = train_row(out / "continual", tnbc_train, tiny_config("ca-sam"), args.steps,
                          args.seed, sam, continue_from=str(base))
    print(f"trained ({time.perf_counter() - t0:.0f}s)", flush=True)

    held = {"monuseg": load_heldout(mon_held), "tnbc": load_heldout(tnbc_held)}
    results = {}
    # A fine-tuned model is one network: "forced" sends every image through task 0's
    # alignment layer (no routing), as any ordinary model would; the continual model routes.
    for name, folder, force in (("base, routed", base, None), ("base, forced", base, 0),
                                ("naive fine-tuning (forced)", naive, 0),
                                ("ca-sam continual (routed)", continual, None)):
        predictor = Predictor.from_folder(folder, device="cpu")
        predictor.model.active_task = force
        results[name] = {data: evaluate(predictor, items) for data, items in held.items()}

    print(f"\nheld-out images: MoNuSeg {len(held['monuseg'])}, TNBC {len(held['tnbc'])}; "
          f"{args.steps} steps per run, tiny backbone {tiny_config().image_size} px, seed {args.seed}")
    print("| model | MoNuSeg AJI | MoNuSeg Dice | TNBC AJI | TNBC Dice |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['monuseg']['mean']['aji']:.4f} | {r['monuseg']['mean']['dice']:.4f} | "
              f"{r['tnbc']['mean']['aji']:.4f} | {r['tnbc']['mean']['dice']:.4f} |")
    for name, reference in (("naive fine-tuning (forced)", "base, forced"),
                            ("ca-sam continual (routed)", "base, routed")):
        before = results[reference]["monuseg"]["mean"]["aji"]
        after = results[name]["monuseg"]["mean"]["aji"]
        print(f"task-1 (MoNuSeg) AJI drop, {name}: {before - after:+.4f} ({before:.4f} -> {after:.4f})")
    routed = results["ca-sam continual (routed)"]
    correct = [t == 0 for t in routed["monuseg"]["routed"].values()] + \
              [t == 1 for t in routed["tnbc"]["routed"].values()]
    print(f"routing accuracy (held-out images, majority of tiles): {sum(correct)}/{len(correct)} "
          f"= {sum(correct) / len(correct):.3f}; MoNuSeg -> {list(routed['monuseg']['routed'].values())}, "
          f"TNBC -> {list(routed['tnbc']['routed'].values())}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    save_json(out / "continual.json", {"steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
