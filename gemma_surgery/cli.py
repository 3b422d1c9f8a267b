"""The ``gemma-surgery`` command (also ``python -m gemma_surgery``).

Verbs:
  generate SOURCE --prompt TEXT   load a model and print a greedy continuation
  info SOURCE                     print the model's architecture
"""

from __future__ import annotations

import argparse
import sys
import time

from gemma_surgery import errors


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="gemma-surgery",
    description="Load Gemma 1/2/3 into Penzai, look inside, cut it open.",
  )
  verbs = parser.add_subparsers(dest="verb", required=True)

  def add_source(p):
    p.add_argument(
      "source",
      help="local path, hf:org/name, kaggle:owner/model/framework/variation,"
      " a variant name such as gemma2_2b, or 'tiny' (the embedded model)",
    )
    p.add_argument(
      "--dtype",
      default=None,
      choices=["bfloat16", "float32"],
      help="parameter dtype (default bfloat16; float32 for tiny)",
    )
    p.add_argument("--variant", default=None, help="variant of a Kaggle checkpoint")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model path")

  gen = verbs.add_parser("generate", help="print a greedy continuation")
  add_source(gen)
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--max-new-tokens", type=int, default=32)
  info = verbs.add_parser("info", help="print the architecture")
  add_source(info)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # Imported here so that `--help` is instant.
  from gemma_surgery.generate import greedy_generate
  from gemma_surgery.loading.api import load

  try:
    start = time.perf_counter()
    lm = load(
      args.source, dtype=args.dtype, variant=args.variant, tokenizer=args.tokenizer
    )
    print(f"loaded {lm.path} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if args.verb == "info":
      for key, value in lm.config.to_dict().items():
        print(f"{key:>24}: {value}")
      print(f"{'parameters':>24}: {lm.config.num_parameters():,}")
      return 0
    if lm.tokenizer is None:
      raise errors.TokenizerError(
        f"{lm.path} has no tokenizer.model; pass --tokenizer PATH."
      )
    ids = lm.tokenizer.encode(args.prompt, add_bos=True)
    out = greedy_generate(
      lm.model, [ids], max_new_tokens=args.max_new_tokens, eos_id=lm.config.eos_id
    )[0]
    new = [int(t) for t in out]
    if lm.config.eos_id in new:
      new = new[: new.index(lm.config.eos_id)]
    print(args.prompt + lm.tokenizer.decode(new))
    return 0
  except errors.GemmaSurgeryError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
