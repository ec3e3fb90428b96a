"""Text completion with Meta's command line: torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir DIR ...

Any checkpoint llamakit reads works (Meta, Hugging Face, llama2.c, llamakit). Base models continue
text, so each prompt is written to make its continuation obvious.
"""

import argparse
import os

from llamakit import Llama

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "A recipe for pancakes:\n1.",
    "Translate to German:\nGood morning => Guten Morgen\nThank you =>",
]


def main(ckpt_dir: str, tokenizer_path: str | None, temperature: float = 0.6, top_p: float = 0.9,
         max_seq_len: int = 128, max_gen_len: int = 64, max_batch_size: int = 4, quantize: str | None = None,
         group_size: int | None = None) -> None:
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, quantize=quantize, group_size=group_size)
    results = []
    for start in range(0, len(PROMPTS), max_batch_size):  # a batch holds at most max_batch_size prompts
        batch = PROMPTS[start:start + max_batch_size]
        results += generator.text_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if int(os.environ.get("RANK", 0)) == 0:  # every torchrun rank computes the same text; one prints it
        for prompt, result in zip(PROMPTS, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", required=True, help="checkpoint folder (or llama2.c .bin file)")
    p.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in ckpt_dir)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--max_seq_len", type=int, default=128, help="longest prompt + completion, in tokens")
    p.add_argument("--max_gen_len", type=int, default=64, help="most new tokens per prompt")
    p.add_argument("--max_batch_size", type=int, default=4, help="most prompts run together")
    p.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights while loading (CPU)")
    p.add_argument("--group_size", type=int, help="int4 group size: 32 (default), 64, 128 or 256")
    return p.parse_args()


if __name__ == "__main__":
    from llamakit.errors import LlamakitError

    try:
        main(**vars(parse_args()))
    except LlamakitError as e:
        raise SystemExit(f"error: {e}") from None
