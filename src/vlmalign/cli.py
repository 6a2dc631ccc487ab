"""Command line: vlmalign train | eval | data | chat | caption | embed | search | serve | export | report | bench | config | baseline | experiment | demo.

    vlmalign train align-cg train.max_steps=200 train.lr=5e-4
    vlmalign train configs/align.yaml data.root=/data/coco
    vlmalign eval runs/align-cg/checkpoint-90
    vlmalign data shapes --out data/shapes --n 1280 --seed 0
    vlmalign data check instruct data.train_file=llava_instruct.json
    vlmalign chat --checkpoint runs/instruct --image cat.jpg --prompt "What is in the image?"
    vlmalign caption --checkpoint runs/align-cg --images photos/ --out captions.jsonl
    vlmalign export runs/instruct --merge-lora --out exported/
    vlmalign export runs/instruct --format llava --out llava-export/
    vlmalign embed --checkpoint runs/discriminative --images photos/ --out photos.safetensors
    vlmalign search --checkpoint runs/discriminative --index photos.safetensors "a red car"
    vlmalign serve runs/instruct --index photos.safetensors
    vlmalign data shard --from data/shapes --out data/shards --shard-size 1000
    vlmalign report runs/align runs/align-cg
    vlmalign bench --recipes align,align-clip --steps 8
    vlmalign config show align-cg train.lr=5e-4
    vlmalign baseline clip align-clip train.max_steps=40
    vlmalign experiment [--quick] data-efficiency
    vlmalign experiment [--quick] vladva
    vlmalign experiment --checkpoint runs/align-clip prompts
    vlmalign experiment --out runs/ak-pooled --pool runs/ak runs/ak-seeds345 -- ak
    vlmalign demo [--quick]

Options go before positional arguments and dotted overrides.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

console = Console()


def _cmd_train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vlmalign.config import load_config
    from vlmalign.paths import recipe_config
    from vlmalign.train.trainer import train

    overrides = list(args.overrides)
    if args.max_skip_fraction is not None:
        overrides.append(f"data.max_skip_fraction={args.max_skip_fraction}")
    cfg = load_config(recipe_config(args.config), overrides)
    if not cfg.data.shards:
        _check_training_data(cfg)  # a misspelt path fails here, before anything is written
    from vlmalign.train.rundir import RunLock, is_main_process, provenance, write_provenance

    with RunLock(cfg.train.out_dir):
        # The launcher's RANK, not PartialState(): a process state made before the trainer's
        # Accelerator(cpu=...) would fix the wrong device and world for it.
        if is_main_process():
            write_provenance(cfg.train.out_dir, provenance(cfg))
        result = train(cfg)
        console.print(f"checkpoint: {result.checkpoint}")
        if cfg.train.eval_at_end and PartialState().is_main_process:
            from vlmalign.eval.run import evaluate_run

            evaluate_run(result.model, cfg, result.checkpoint, result.history, training=result.data_report)
    return 0


def _check_training_data(cfg) -> None:
    """Check the files the config names (and write `shapes` when the run asks for it, into
    a new or empty folder only); announce a held-out split of the user's training file."""
    from pathlib import Path

    from vlmalign.data.splits import ensure_data, holds_out
    from vlmalign.train.recipes import RECIPES

    ensure_data(cfg.data)
    if holds_out(cfg.data) and cfg.train.eval_at_end and "retrieval" in RECIPES.get(cfg.recipe).evals:
        d = cfg.data
        console.print(f"evaluation data: no data.eval_file, so {d.heldout_fraction:.0%} of the records of "
                      f"data.train_file={d.train_file} (at most {d.heldout_max}, seed {d.heldout_seed}) are held out "
                      f"of training and evaluated on; their list goes to {Path(cfg.train.out_dir) / 'heldout.jsonl'}",
                      highlight=False)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from vlmalign.eval.run import default_eval_dir, evaluate_run
    from vlmalign.inference import load_checkpoint, resolve_checkpoint
    from vlmalign.train.checkpoint import MANIFEST_NAME, verify_checkpoint
    from vlmalign.train.rundir import provenance_differences, read_provenance

    path = resolve_checkpoint(args.checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint folder or a run folder")
    out = Path(args.out) if args.out else default_eval_dir(path)
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        console.print(f"[red]eval:[/] --out {out} is inside the checkpoint {path}, which evaluation never writes; "
                      "give a folder outside it")
        return 2
    if (path / MANIFEST_NAME).exists():
        verify_checkpoint(path)
    record = read_provenance(path)
    if record is not None and (changed := provenance_differences(record)):
        console.print(f"[yellow]warning:[/] {path} was made with other versions: {'; '.join(changed)}; "
                      "results may differ from the run's own evaluation", highlight=False)
    model = load_checkpoint(path, args.overrides)
    history_file = Path(path).parent / "history.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else None
    evaluate_run(model, model.cfg, path, history, captions=args.caption, out_dir=out)
    console.print(f"evaluation written to {out}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from vlmalign.data.shapes_writer import write_shapes

    meta = write_shapes(args.out, args.n, seed=args.seed)
    console.print(f"wrote shapes to {args.out}: {meta.get('counts', meta)}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vlmalign.config import load_config
    from vlmalign.data.conversations import (
        ConversationLoadReport,
        check_conversations,
        format_check,
    )
    from vlmalign.data.splits import iter_train_conversations
    from vlmalign.models.vlm import VLM
    from vlmalign.paths import recipe_config
    from vlmalign.train.recipes import RECIPES

    cfg = load_config(recipe_config(args.config), args.overrides)
    kind = RECIPES.get(cfg.recipe).data
    model = VLM.build(cfg)
    if kind != "conversations":
        return _check_captions(cfg, model.tokenizer)
    report = ConversationLoadReport()
    # streamed: every record is read and checked, none is kept (files of any size)
    convs = iter_train_conversations(cfg.data, report)
    check = check_conversations(convs, model.tokenizer, model.image_token_id, model.num_visual_tokens,
                                cfg.data.max_conversation_tokens, show=args.show)
    if report.total_skipped() or report.repaired:
        console.print(f"[yellow]loading: {report.summary()}", highlight=False)
    console.print(format_check(check), markup=False, highlight=False)
    if check.mismatches or check.zero_label or not check.conversations:
        console.print("[red]data check failed:[/] fix the samples above (template mismatches, zero trained tokens) before training")
        return 1
    return 0


def _check_captions(cfg, tokenizer) -> int:
    """`data check` for caption recipes: every record of the training file read (streamed)
    and counted, caption lengths in tokens, how many exceed data.max_caption_tokens."""
    from vlmalign.data.sample import LoadReport
    from vlmalign.data.splits import iter_all_train_samples

    report = LoadReport()
    limit, n, over, longest, batch = cfg.data.max_caption_tokens, 0, 0, 0, []

    def count(texts: list[str]) -> None:
        nonlocal n, over, longest
        for ids in tokenizer(texts, add_special_tokens=False).input_ids:
            n, over, longest = n + 1, over + (len(ids) > limit), max(longest, len(ids))

    for sample in iter_all_train_samples(cfg.data, report):
        batch.append(sample.caption)
        if len(batch) == 256:  # tokenizer memory stays a few MB
            count(batch)
            batch = []
    if batch:
        count(batch)
    console.print(f"{n} caption records usable, {report.total_skipped()} skipped; longest caption {longest} tokens, "
                  f"{over} longer than data.max_caption_tokens={limit} (truncated in training)", highlight=False)
    if report.total_skipped() or report.repaired:
        console.print(f"[yellow]loading: {report.summary()}", highlight=False)
    if not n:
        console.print("[red]data check failed:[/] no usable caption record")
        return 1
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from vlmalign.inference import ChatSession, load_checkpoint

    session = ChatSession(load_checkpoint(args.checkpoint), args.image, max_new_tokens=args.max_new_tokens)
    if args.prompt:
        console.print(session.ask(args.prompt), markup=False, highlight=False)
        return 0
    console.print(f"chatting about {args.image}; an empty line or Ctrl-D ends")
    while True:
        try:
            question = input("you> ")
        except EOFError:
            break
        if not question.strip():
            break
        console.print(f"model> {session.ask(question)}", markup=False, highlight=False)
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from vlmalign.data.shards import shard_command

    shard_command(args.source, args.out, shard_size=args.shard_size, prefix=args.prefix,
                  split=args.split, caption_field=args.caption_field, kind=args.kind, image_root=args.image_root,
                  allow_outside_root=args.allow_outside_root)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vlmalign.export import export_checkpoint, export_llava
    from vlmalign.llava_format import NotExpressibleError

    if args.format == "llava":
        if not args.merge_lora:
            console.print("[red]export --format llava:[/] LLaVA holds one LLM: LoRA adapters are always merged "
                          "(--no-merge-lora is for the vlmalign format)")
            return 2
        try:
            out = export_llava(args.checkpoint, args.out)
        except NotExpressibleError as e:
            console.print(f"[red]export --format llava:[/] {e}", highlight=False)
            return 2
        console.print(f"exported {args.checkpoint} to {out} (LlavaForConditionalGeneration; README.md is its model card)")
        return 0
    out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora)
    console.print(f"exported {args.checkpoint} to {out} (llm/: plain transformers, vlm/: vlmalign)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from vlmalign.serve import serve

    serve(args.checkpoint, args.index, host=args.host, port=args.port, max_new_tokens=args.max_new_tokens,
          device=args.device)
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from vlmalign.inference import caption_command

    caption_command(args.checkpoint, args.images, args.prompt, args.out, args.batch_size, args.max_new_tokens)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from vlmalign.bench import bench_from_args

    return bench_from_args(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from vlmalign.eval.html_report import default_report_path, write_report

    out = write_report(args.run_dirs, args.out or default_report_path(args.run_dirs))
    console.print(f"report: {out}")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from vlmalign.config import show_config
    from vlmalign.paths import recipe_config

    print(show_config(recipe_config(args.config), args.overrides), end="")  # plain: rich eats [..]
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from vlmalign.inference import (
        embed_image_files,
        image_files,
        load_checkpoint,
        read_texts,
        write_index,
    )

    if bool(args.images) == bool(args.texts):
        console.print("[red]embed:[/] give exactly one of --images DIR or --texts FILE")
        return 2
    model = load_checkpoint(args.checkpoint)
    if args.images:
        emb, kept, report = embed_image_files(model, image_files(args.images), args.batch_size)
        names, kind = [str(p) for p in kept], "image"
        if report.total_skipped():
            console.print(f"[yellow]{report.summary()}")
    else:
        names, kind = read_texts(args.texts), "text"
        emb = model.embed_texts(names, batch_size=args.batch_size)
    write_index(args.out, emb, names, kind, str(args.checkpoint))
    console.print(f"wrote {len(names)} {kind} embeddings of size {emb.shape[1]} to {args.out}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from vlmalign.inference import load_checkpoint, read_index, search
    from vlmalign.search_index import EXACT_MAX_VECTORS, cached_index

    index, names, meta = read_index(args.index)
    if meta.get("kind") != "image":
        console.print(f"[red]search:[/] {args.index} holds {meta.get('kind')} embeddings; index images with `vlmalign embed --images`")
        return 2
    model = load_checkpoint(args.checkpoint)
    exact_max = EXACT_MAX_VECTORS if args.exact_max is None else args.exact_max
    found = cached_index(index, args.index, args.method, exact_max, args.nprobe)  # FAISS kept in <index>.faiss
    print(f"{found.kind} search over {found.ntotal} images", file=sys.stderr)
    for rank, (name, score) in enumerate(search(model, found, names, args.query, args.top), start=1):
        print(f"{rank:2d}. {score:.3f}  {name}")  # plain: paths must not wrap
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from vlmalign.baseline.clip import run_clip_baseline

    run_clip_baseline(args.config, args.overrides, args.out)
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    import importlib

    from vlmalign.experiments import EXPERIMENTS

    if args.name == "prompts" and args.checkpoint:
        from vlmalign.experiments.prompts import run_prompts

        run_prompts(args.checkpoint, args.out, args.overrides)
        return 0
    if args.name not in EXPERIMENTS:
        console.print(f"[red]unknown experiment {args.name!r}[/]; known: {', '.join(EXPERIMENTS)}")
        return 2
    module, entry, _ = EXPERIMENTS[args.name]
    kwargs = {"out": args.out or f"runs/{args.name}", "quick": args.quick, "seeds": args.seeds,
              "extra": args.overrides, "command": _command_line(), "report_only": args.report_only}
    if args.pool:
        from vlmalign.experiments.pool import pool_runs

        if not args.out or args.seeds:
            console.print("[red]--pool writes a new report: give it a new --out folder, and no --seeds "
                          "(the pooled runs' seeds are used)[/]")
            return 2
        kwargs |= {"seeds": pool_runs(args.name, args.pool, args.out, log=console.print), "report_only": True}
    if args.name in ("data-efficiency", "ak"):
        kwargs["sizes"] = {"scenes": args.scenes, "align_steps": args.align_steps, "epochs": args.epochs,
                           "eval_items": args.eval_items}
    try:
        getattr(importlib.import_module(module), entry)(**kwargs)
    except Exception:
        if args.pool:  # the pool's new (or empty) folder: no pooled records without their report
            import shutil

            for path in Path(args.out).iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    return 0


def _seed(value: str) -> int:
    """`--seeds` values: integers; a name there is an experiment swallowed by the list."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a seed. --seeds takes several values, so put what follows them before --seeds "
            f"or after '--', e.g. --seeds 3 4 5 -- {value}") from None


def _run_dir(value: str) -> str:
    """`--pool` values: run folders; an experiment's name there was swallowed by the list."""
    from vlmalign.experiments import EXPERIMENTS

    if value in EXPERIMENTS and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a run folder. --pool takes several values, so put the experiment's name "
            f"before --pool or after '--', e.g. --pool runs/a runs/b -- {value}")
    return value


def _command_line() -> str:
    """The command as typed, for an experiment's report."""
    import shlex

    return " ".join(["vlmalign", *(shlex.quote(a) for a in sys.argv[1:])])


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlmalign.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, extra=args.overrides, seeds=args.seeds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe: vlmalign train RECIPE|CONFIG.yaml [key=value ...]")
    t.add_argument("config", help="recipe id (align, align-cg, align-clip, instruct, discriminative) or a YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    t.add_argument("--max-skip-fraction", type=float, default=None,
                   help="abort before training when more than this share of records is bad (data.max_skip_fraction)")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (or a run folder's latest) on its held-out split")
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/coco")
    e.add_argument("--caption", action="store_true", help="also score generated captions (CIDEr, BLEU; the caption extra)")
    e.add_argument("--out", default=None,
                   help="folder for metrics.json, plots and logs (default: eval-<checkpoint> beside the checkpoint; "
                        "the checkpoint folder is never written)")
    e.set_defaults(fn=_cmd_eval)

    d = sub.add_parser("data", help="write, check and shard datasets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    s = dsub.add_parser("shapes", help="write the procedural shapes dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=1280)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_data)
    sh = dsub.add_parser("shard", help="write webdataset tar shards from captions, conversations or a shapes folder")
    sh.add_argument("--from", dest="source", required=True,
                    help="a captions .jsonl, a LLaVA conversation .json/.jsonl, or a shapes-layout folder")
    sh.add_argument("--out", required=True)
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    sh.add_argument("--prefix", default="shard")
    sh.add_argument("--split", default="train", help="which split of a shapes-layout folder")
    sh.add_argument("--caption-field", default="caption")
    sh.add_argument("--kind", choices=["auto", "captions", "conversations"], default="auto",
                    help="what --from holds; auto: a .json (or a .jsonl whose records have 'conversations') is conversations")
    sh.add_argument("--image-root", default=None, help="folder relative image paths resolve against (default: the file's folder)")
    sh.add_argument("--allow-outside-root", action="store_true", help="accept image paths that leave --image-root")
    sh.set_defaults(fn=_cmd_shard)
    c = dsub.add_parser("check", help="read every training record (streamed): conversations as tokenised, with the "
                        "tokens that train; captions with their lengths; fail on bad samples")
    c.add_argument("config", help="recipe id (instruct) or a YAML file")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train_file=llava.json")
    c.add_argument("--show", type=int, default=3, help="samples to print with their trained spans")
    c.set_defaults(fn=_cmd_data_check)

    ch = sub.add_parser("chat", help="chat with a trained model about an image")
    ch.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its latest)")
    ch.add_argument("--image", required=True)
    ch.add_argument("--prompt", default="", help="ask once and exit (otherwise interactive)")
    ch.add_argument("--max-new-tokens", type=int, default=64)
    ch.set_defaults(fn=_cmd_chat)

    cp = sub.add_parser("caption", help="caption images with a trained model")
    cp.add_argument("--checkpoint", required=True, help="checkpoint, run folder or export folder")
    cp.add_argument("--images", required=True, help="a folder (recursive) or one image")
    cp.add_argument("--prompt", default=None, help="an instruction (chat turn); default follows the recipe")
    cp.add_argument("--out", default=None, help="captions.jsonl; default prints path<TAB>caption")
    cp.add_argument("--batch-size", type=int, default=16)
    cp.add_argument("--max-new-tokens", type=int, default=32)
    cp.set_defaults(fn=_cmd_caption)

    ex = sub.add_parser("export", help="write a checkpoint as a plain transformers LLM + a vlmalign folder, or as LLaVA")
    ex.add_argument("checkpoint")
    ex.add_argument("--out", required=True)
    ex.add_argument("--format", choices=["vlmalign", "llava"], default="vlmalign",
                    help="vlmalign: llm/ + vlm/ folders (any checkpoint); llava: one transformers "
                         "LlavaForConditionalGeneration folder (HF CLIP/SigLIP tower, mlp2x_gelu projector; LoRA merged)")
    ex.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                    help="fold LoRA adapters into the LLM weights (default) or keep them apart (vlmalign format)")
    ex.set_defaults(fn=_cmd_export)

    sv = sub.add_parser("serve", help="a local web page (Gradio): chat about an image, caption it, search an index")
    sv.add_argument("checkpoint", help="checkpoint, run folder, export folder or transformers LLaVA folder")
    sv.add_argument("--index", default=None, help="an image index written by `vlmalign embed --images` (the Search tab)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--max-new-tokens", type=int, default=64)
    sv.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    sv.set_defaults(fn=_cmd_serve)

    em = sub.add_parser("embed", help="embed images or texts with a trained model into a safetensors file")
    em.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (its latest)")
    em.add_argument("--images", help="a folder of images (searched recursively)")
    em.add_argument("--texts", help="a UTF-8 file, one text per line")
    em.add_argument("--out", required=True, help="output .safetensors")
    em.add_argument("--batch-size", type=int, default=32)
    em.set_defaults(fn=_cmd_embed)

    se = sub.add_parser("search", help="the images of an index most similar to a text query")
    se.add_argument("query")
    se.add_argument("--checkpoint", required=True)
    se.add_argument("--index", required=True, help="a file written by `vlmalign embed --images`")
    se.add_argument("--top", type=int, default=5)
    se.add_argument("--method", choices=["auto", "exact", "faiss"], default="auto",
                    help="auto: exact up to --exact-max images, FAISS IVF above (kept in INDEX.faiss)")
    se.add_argument("--exact-max", type=int, default=None,
                    help="largest index searched exactly by auto (default: search_index.EXACT_MAX_VECTORS)")
    se.add_argument("--nprobe", type=int, default=None,
                    help="IVF lists searched per query, recall vs time (default: an eighth of them, at least 8)")
    se.set_defaults(fn=_cmd_search)

    bn = sub.add_parser("bench", help="time the training step of each recipe, defaults vs naive (ms, samples/s, memory, MFU)")
    bn.add_argument("--recipes", default="", help="comma list; default all five")
    bn.add_argument("--llm", default="smollm2-135m")
    bn.add_argument("--tower", default="efficientnet-lite0")
    bn.add_argument("--batch-size", type=int, default=16)
    bn.add_argument("--steps", type=int, default=8,
                    help="timed steps per mode (default 8: a multiple of 8 times every mode on the same samples)")
    bn.add_argument("--warmup", type=int, default=1)
    bn.add_argument("--no-naive", action="store_true", help="skip the naive mode")
    bn.add_argument("--ablate", default="", help="recipes to time with each optimisation off in turn")
    bn.add_argument("--threads", default="", help="extra optimised rows at these thread counts, e.g. 1,2")
    bn.add_argument("--num-threads", type=int, default=None)
    bn.add_argument("--caption-format", default="", choices=["", "plain", "prompted"],
                    help="caption sequences of the caption recipes (default: the config's, as training uses)")
    bn.add_argument("--extra-formats", default="",
                    help="also time the caption recipes' optimised step in these formats, e.g. prompted")
    bn.add_argument("--data-root", default=None)
    bn.add_argument("--feature-store", default=None, help="a folder for the on-disk feature cache")
    bn.add_argument("--plain-reference", action="store_true", help="same as --extra-formats plain")
    bn.add_argument("--json", default=None, help="where to write the JSON (default: printed path)")
    bn.add_argument("overrides", nargs="*")
    bn.set_defaults(fn=_cmd_bench)

    r = sub.add_parser("report", help="one self-contained report.html comparing runs")
    r.add_argument("run_dirs", nargs="+", help="run folders, checkpoint folders or a folder of runs")
    r.add_argument("--out", default=None, help="HTML file (default: report.html in the runs' common folder)")
    r.set_defaults(fn=_cmd_report)

    cf = sub.add_parser("config", help="inspect configs")
    cfsub = cf.add_subparsers(dest="config_command", required=True)
    cs = cfsub.add_parser("show", help="print the resolved config with where each value came from")
    cs.add_argument("config", help="recipe id or YAML file")
    cs.add_argument("overrides", nargs="*")
    cs.set_defaults(fn=_cmd_config_show)

    b = sub.add_parser("baseline", help="train and evaluate a peer baseline on the same data (the CLIP row)")
    b.add_argument("kind", choices=["clip"])
    b.add_argument("config", help="recipe id or YAML whose data, steps and batch size the baseline copies")
    b.add_argument("overrides", nargs="*", help="dotted overrides; baseline.* keys configure the dual encoder")
    b.add_argument("--out", default=None, help="default: <train.out_dir>-clip")
    b.set_defaults(fn=_cmd_baseline)

    x = sub.add_parser("experiment", help="reproduce a paper's claim in miniature on shapes")
    x.add_argument("name", help="vladva (VladVA), data-efficiency (CG-VLM), ak (Ak et al.), prompts (Ak et al.'s "
                   "prompt study), caption-format (plain vs prompted captions in align-clip); docs/experiments.md")
    x.add_argument("--checkpoint", default=None, help="prompts: evaluate this checkpoint under each prompt (no training)")
    x.add_argument("--quick", action="store_true", help="small sizes: a smoke run (under 3 minutes)")
    x.add_argument("--report-only", action="store_true",
                   help="write results.json, table and plot from the runs finished so far; run nothing")
    x.add_argument("--out", default=None)
    x.add_argument("--pool", type=_run_dir, nargs="+", metavar="RUN", help="summarise these run folders of the experiment together "
                   "(e.g. seeds run on different machines) into the new folder --out; nothing trains. "
                   "The experiment's name goes before them or after '--'")
    x.add_argument("--seeds", type=_seed, nargs="+", help="seeds (default: 0 1 2; --quick: 0); "
                   "the experiment's name goes before them or after '--'")
    x.add_argument("--scenes", type=int, help="data-efficiency, ak: shapes scenes (default 1000; 80%% train)")
    x.add_argument("--align-steps", type=int, help="data-efficiency, ak: alignment steps (default 60)")
    x.add_argument("--epochs", type=float, help="data-efficiency, ak: instruction-tuning epochs (default 1)")
    x.add_argument("--eval-items", type=int, help="data-efficiency, ak: held-out questions (default 300)")
    x.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    x.set_defaults(fn=_cmd_experiment)

    m = sub.add_parser("demo", help="train align, align-cg and align-clip on shapes and compare")
    m.add_argument("--quick", action="store_true", help="a ~2 minute version")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--seeds", type=_seed, nargs="+", help="several seeds (intervals over seeds and items in table.md)")
    m.add_argument("overrides", nargs="*", help="dotted overrides applied to every recipe")
    m.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls a transformers method that transformers 5 deprecates (not our call).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from rich.markup import escape  # messages hold paths and overrides with [brackets]

    from vlmalign.config import ConfigError
    from vlmalign.data.sample import DataQualityError
    from vlmalign.errors import DiskFullError, TrainingOOMError
    from vlmalign.models.registry import UnknownIdError
    from vlmalign.train.checkpoint import CheckpointError
    from vlmalign.train.guard import NonFiniteError
    from vlmalign.train.rundir import RunLockedError
    from vlmalign.train.trainer import TrainingInterrupted

    try:
        return args.fn(args)
    except RunLockedError as e:
        console.print(f"[red]run folder in use:[/] {escape(str(e))}", highlight=False)
        return 2
    except (ConfigError, UnknownIdError) as e:
        console.print(f"[red]config error:[/] {escape(str(e))}")
        return 2
    except FileNotFoundError as e:
        console.print(f"[red]not found:[/] {escape(str(e))}")
        return 2
    except FileExistsError as e:
        console.print(f"[red]already exists:[/] {escape(str(e))}")
        return 2
    except (DataQualityError, CheckpointError, DiskFullError, TrainingOOMError, NonFiniteError) as e:
        console.print(f"[red]{type(e).__name__}:[/] {escape(str(e))}", highlight=False)
        return 1
    except ImportError as e:
        if "pip install" not in str(e):  # a missing optional extra names its install command
            raise
        console.print(f"[red]missing dependency:[/] {escape(str(e))}", highlight=False)
        return 1
    except TrainingInterrupted as e:
        console.print(f"[yellow]{e}")
        return 128 + e.signum  # the shell's convention for a run ended by a signal
    except (ValueError, OSError) as e:  # bad data (JSON, encoding, a file that is not what it should be)
        if args.verbose:
            logging.getLogger("vlmalign").exception("the error in full")
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
