"""Train the built-in default model that ``fastdecode generate`` uses without ``--model``.

Nothing can be downloaded at run time, so fastdecode ships a small model of its own: a byte-level
BPE tokenizer (2,048 tokens) and a 4-layer Llama (GQA 4/2 heads, head_dim 64, ~3.5M parameters)
trained on the docstrings of the Python standard library (PSF-licensed text that every Python
installation carries). It writes English-looking, docstring-flavoured text: a demo of the decoding
path, not a useful assistant. Reproduce with:

    python tools/train_default_model.py --minutes 20

The result (float16 safetensors, ~7 MB, plus tokenizer files) goes to fastdecode/data/default_model.
"""

from __future__ import annotations

import argparse
import ast
import math
import sysconfig
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "fastdecode" / "data" / "default_model"
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]


def stdlib_docstrings() -> list[str]:
    """Every ASCII docstring longer than 80 characters in the standard library (tests skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages", "lib2to3"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and doc.isascii():
                    docs.append(doc.strip())
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0],
                                   bos_token=SPECIALS[1], eos_token=SPECIALS[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    docs = stdlib_docstrings()
    tokenizer = train_tokenizer(docs, 2048)
    eos = tokenizer.eos_token_id
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [eos]]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"{len(docs)} docstrings, {data.numel()} tokens")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    budget, start, step = args.minutes * 60, time.time(), 0
    while (elapsed := time.time() - start) < budget:
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * math.cos(0.5 * math.pi *
                                                                         elapsed / budget))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch_size,))
        batch = torch.stack([data[s:s + args.seq_len + 1] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
        # labels are shifted inside the model: pass the inputs as labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {loss.item():.3f}  lr {lr:.2e}",
                  flush=True)
        step += 1
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    OUT.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    print(f"saved to {OUT}")


if __name__ == "__main__":
    main()
