"""Held-out bits per byte of an interpolated modified Kneser-Ney n-gram model (lm/ngram.py).

python -m tools.ngram --config configs/pretrain/tiny.py[:arg] --order 5 [--config.KEY=VALUE ...]
    [--json OUT.json] [--arpa OUT.arpa]

Counts the config's train split (`pipeline.prepare_data`: the same tokenizer and documents the
models train on), scores every predicted token of the held-out split (each token after `<s>`,
`</s>` included) and divides the summed -log2 p by the UTF-8 bytes those tokens stand for
(`tokenizer.token_bytes()`), the denominator of the models' `eval_bits_per_byte`. Prints a
markdown row; --json writes the figures (bits_per_byte, nats_per_token, the discounts and n-gram
counts per order, seconds), --arpa the model in ARPA format (words are the decimal token ids,
`<s>`/`</s>` for BOS/EOS; see lm/ngram.py).
"""

import argparse
import sys
import time

from lm import ngram
from lm.errors import UserError

MAX_ORDER = 5


def run(config, order: int, arpa_path: str | None = None) -> dict:
    """Estimates the order-`order` model on the config's train split and evaluates it on its
    held-out split; writes the ARPA file when `arpa_path` is given. Returns the report dict."""
    from lm.data import pipeline  # heavy imports: not for --help or a bad --order

    start = time.perf_counter()
    data = pipeline.prepare_data(config.data, config.tokenizer, config.train.seq_len)
    tok = data.tokenizer
    prepared = time.perf_counter()
    model = ngram.estimate(data.train.tokens, order, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    estimated = time.perf_counter()
    report = {"order": order, **ngram.evaluate(model, data.eval.tokens, tok.token_bytes())}
    scored = time.perf_counter()
    report.update(level_stats(model))
    report["train_tokens"] = int(len(data.train.tokens))
    if arpa_path:
        report["arpa"] = {"path": arpa_path, **ngram.write_arpa(model, arpa_path)}
    end = time.perf_counter()
    report["seconds"] = {
        "data": prepared - start,
        "estimate": estimated - prepared,
        "score": scored - estimated,
        "arpa": end - scored,
        "total": end - start,
    }
    return report


def level_stats(model: ngram.KNModel) -> dict:
    """Per order n (keys "1".."N"): the discounts [D1, D2, D3+], whether they are the fallback
    ones, and num_ngrams (distinct n-grams counted in training; order 1: distinct predicted ids);
    and vocabulary, the number of ids in V."""
    levels = list(enumerate(model.levels, 1))
    return {
        "discounts": {str(n): lev.discounts[1:].tolist() for n, lev in levels},
        "discount_fallback": {str(n): lev.fallback for n, lev in levels},
        "num_ngrams": {str(n): int((lev.counts > 0).sum()) if n == 1 else lev.size for n, lev in levels},
        "vocabulary": int(model.in_vocab.sum()),
    }


def markdown(report: dict, config_spec: str) -> str:
    """A markdown table (a header and one row) of the report's headline figures."""
    return (
        "| config | order | heldout tokens | heldout bytes | nats/token | bits/byte | seconds |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {config_spec} | {report['order']} | {report['heldout_tokens']} | {report['heldout_bytes']} "
        f"| {report['nats_per_token']:.4f} | {report['bits_per_byte']:.4f} "
        f"| {report['seconds']['total']:.1f} |"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config file[:arg]")
    p.add_argument("--order", type=int, default=5, help=f"n-gram order, 1..{MAX_ORDER}")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--arpa", help="write the model here in ARPA format")
    args, items = p.parse_known_args(argv)
    bad = [o for o in items if not o.startswith("--config.") or "=" not in o]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --config.KEY=VALUE)")
    try:
        if not 1 <= args.order <= MAX_ORDER:
            raise UserError(f"--order={args.order}: expected 1..{MAX_ORDER}")
        from tools.bench import load_config

        try:
            config = load_config(args.config, items)
        except ValueError as e:  # an override's value that does not fit its key's type
            raise UserError(str(e)) from e
        report = run(config, args.order, args.arpa)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["config"] = " ".join([args.config] + [o.removeprefix("--config.") for o in items])
    print(markdown(report, report["config"]))
    if args.json:
        from lm.metrics import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
