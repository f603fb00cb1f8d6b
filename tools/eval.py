"""Evaluate a trained workdir (or an imported Hugging Face model) outside training.

python -m tools.eval --workdir W [--checkpoint auto|best|latest] [--bpb] [--bpb_files GLOB]
    [--kshot add,reverse --k 0,1,2,4,8 --num 200] [--mc FILE.jsonl | --mc builtin] [--json OUT]

--workdir hf:DIR imports a Hugging Face model directory first (into a temporary workdir).
--bpb       bits per byte on the whole held-out split of the run's own data config (every row,
            the run's seq_len); equal to a training run's eval_bits_per_byte with eval_batches=0.
--bpb_files bits per byte on any text files (each file one document, packed like training data).
--kshot     greedy grader score on the graded tasks with k solved examples in the prompt (no
            training): in-context learning. A k whose prompts do not fit the model's context is
            reported as null.
--mc        multiple choice by log-likelihood in lm-evaluation-harness's conventions: a JSONL file
            of {"context", "choices", "gold"}; acc and length-normalised acc_norm. `builtin`: a
            small set made from held-out graded-task prompts (`lm.scoring.graded_choice_items`).
--json OUT  every figure: bits_per_byte, bpb_files, kshot {task: {k: score}}, mc {acc, acc_norm}.
A markdown table of the figures is printed. Definitions: lm/scoring.py.
"""

import argparse
import glob
import json
import os
import sys
import tempfile

from lm import metrics as metrics_lib
from lm import saved_model, scoring
from lm.data import graded_tasks, pipeline
from lm.errors import DataError, UserError
from tools import import_hf


def heldout_rows(model: saved_model.SavedModel, seq_len: int) -> pipeline.PackedRows:
    """The held-out split of the run's data config, tokenized by the model's own tokenizer (cached
    under the data dir as training caches it), as packed rows of seq_len."""
    data_cfg, tok = model.config.data, model.tokenizer
    data_dir = pipeline.resolve_data_dir(pipeline.config_get(data_cfg, "data_dir", ""))
    os.makedirs(data_dir, exist_ok=True)
    with pipeline.file_lock(os.path.join(data_dir, ".prepare.lock")):
        corpus = pipeline.open_corpus(data_cfg, data_dir)
        cache_dir = os.path.join(data_dir, "tokens", corpus.key, tok.identity)
        tokens, _ = pipeline.tokenize_split(corpus, corpus.eval_split, tok, cache_dir)
    return pipeline.PackedRows(tokens, seq_len, tok.bos_id, tok.pad_id)


def file_rows(pattern: str, model: saved_model.SavedModel, seq_len: int) -> tuple[pipeline.PackedRows, int]:
    """The files `pattern` matches (sorted), one document each, as packed rows; and how many files."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"--bpb_files {pattern}: matches no file")
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise DataError(f"--bpb_files: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    tok = model.tokenizer
    tokens, _ = pipeline.tokenize_documents(texts, tok)
    return pipeline.PackedRows(tokens, seq_len, tok.bos_id, tok.pad_id), len(paths)


def read_mc(path: str) -> list[dict]:
    """The items of a multiple-choice JSONL file; DataError naming the file and line of a bad one."""
    items = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"--mc {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"--mc {path}:{n}: not JSON ({e.msg})") from None
            ok = (
                isinstance(item, dict)
                and isinstance(item.get("context"), str)
                and isinstance(item.get("choices"), list)
                and len(item["choices"]) >= 2
                and all(isinstance(c, str) and c for c in item["choices"])
                and isinstance(item.get("gold"), int)
                and 0 <= item["gold"] < len(item["choices"])
            )
            if not ok:
                raise DataError(
                    f'--mc {path}:{n}: expected {{"context": str, "choices": [>= 2 non-empty str], '
                    f'"gold": index into choices}}'
                )
            items.append(item)
    if not items:
        raise DataError(f"--mc {path}: no items")
    return items


def parse_ks(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; UserError unless non-negative integers."""
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 0:
        raise UserError(f"--k {text}: expected comma-separated non-negative integers, e.g. 0,1,2,4,8")
    return ks


def evaluate(args, model: saved_model.SavedModel, mc_items: list[dict]) -> dict:
    """Every figure the flags ask for, as the --json object; mc_items: the --mc items."""
    cfg, tok = model.model_cfg, model.tokenizer
    seq_len = min(args.seq_len or model.config.train.seq_len, cfg.max_seq_len)
    net = scoring.build_model(cfg)
    out: dict = {"workdir": args.workdir, "checkpoint": model.source}
    if args.bpb:
        out.update(
            scoring.bits_per_byte(
                net, model.params, heldout_rows(model, seq_len), tok.token_bytes(), args.batch_size
            )
        )
    if args.bpb_files:
        rows, n = file_rows(args.bpb_files, model, seq_len)
        figures = scoring.bits_per_byte(net, model.params, rows, tok.token_bytes(), args.batch_size)
        out["bpb_files"] = {"pattern": args.bpb_files, "num_files": n, **figures}
    if args.kshot:
        tasks, ks = graded_tasks.parse_tasks(args.kshot), parse_ks(args.k)
        template = model.config.get("template")
        out["kshot"] = {t: {} for t in tasks}
        out["kshot_exact"] = {t: {} for t in tasks}
        for task in tasks:
            for k in ks:
                r = scoring.kshot_score(
                    model.params, cfg, tok, template, task, k, num=args.num, seed=args.seed, max_new_tokens=0
                )
                out["kshot"][task][str(k)], out["kshot_exact"][task][str(k)] = r["score"], r["exact"]
        out["kshot_prompts"] = args.num
    if args.mc:

        def logprob_fn(pairs):
            encoded = [scoring.encode_pair(tok, c, x) for c, x in pairs]
            return scoring.continuation_logprobs(
                cfg, model.params, encoded, max_len=seq_len, pad_id=tok.pad_id
            )

        out["mc"] = {"file": args.mc, **scoring.multiple_choice(mc_items, logprob_fn)}
    return out


def markdown(figures: dict) -> str:
    """The figures as a two-column markdown table."""
    rows = []
    if "bits_per_byte" in figures:
        rows.append(("held-out bits per byte", f"{figures['bits_per_byte']:.4f}"))
    if "bpb_files" in figures:
        b = figures["bpb_files"]
        rows.append((f"bits per byte, {b['num_files']} files", f"{b['bits_per_byte']:.4f}"))
    for task, by_k in figures.get("kshot", {}).items():
        for k, score in by_k.items():
            rows.append((f"{task}, {k}-shot score", "n/a (too long)" if score is None else f"{score:.3f}"))
    if "mc" in figures:
        m = figures["mc"]
        rows.append((f"multiple choice acc ({m['num_items']} items)", f"{m['acc']:.3f}"))
        rows.append(("multiple choice acc_norm", f"{m['acc_norm']:.3f}"))
    return "\n".join(["| figure | value |", "|---|---:|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training workdir, or hf:DIR")
    p.add_argument("--checkpoint", default="auto", choices=saved_model.CHOICES)
    p.add_argument("--bpb", action="store_true", help="bits per byte on the whole held-out split")
    p.add_argument("--bpb_files", default="", help="bits per byte on the files this glob matches")
    p.add_argument("--kshot", default="", help="graded tasks, e.g. add,reverse")
    p.add_argument("--k", default="0,1,2,4,8", help="numbers of shots")
    p.add_argument("--num", type=int, default=200, help="prompts per task (k-shot, builtin mc)")
    p.add_argument("--mc", default="", help="multiple-choice JSONL file, or builtin")
    p.add_argument("--seq_len", type=int, default=0, help="rows of bits per byte (0: the run's)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="which graded prompts and shots")
    p.add_argument("--json", default="", help="write every figure here")
    args = p.parse_args(argv)
    if not (args.bpb or args.bpb_files or args.kshot or args.mc):
        p.error("nothing to evaluate: give --bpb, --bpb_files, --kshot or --mc")
    try:
        if args.num <= 0 or args.batch_size <= 0:
            raise UserError("--num and --batch_size must be positive")
        if args.kshot:
            graded_tasks.parse_tasks(args.kshot)
            parse_ks(args.k)
        mc_items = []
        if args.mc:
            mc_items = (
                scoring.graded_choice_items(list(graded_tasks.TASKS), args.num, args.seed)
                if args.mc == "builtin"
                else read_mc(args.mc)
            )
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir
            if workdir.startswith("hf:"):
                import_hf.import_hf(workdir[len("hf:") :], os.path.join(tmp, "import"))
                workdir = os.path.join(tmp, "import")
            model = saved_model.load(workdir, args.checkpoint)
            figures = evaluate(args, model, mc_items)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(figures))
    if args.json:
        metrics_lib.write_json_atomic(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
