#!/usr/bin/env python3
"""Peer for `cargo bench -p qpeft --bench eval_loglik`: zero-shot log-likelihood scoring with transformers the way
lm-evaluation-harness's HF model scores it (requests sorted by length, right-padded batches, one pass per
(context, choice), fp32 or bf16 weights and activations on the CPU, where torch runs bf16 products on AMX tiles), on
the same first N items of a task.

    eval_peer.py MODEL_DIR --task arc_easy --n 200 --batch 8 [--threads 2] [--dtype fp32|bf16]
        [--data-dir ../shared/datasets]

Prints scored tokens/s with scored tokens = Σ |context| + |continuation| over the requests, as the bench does."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import eval_reference as ref  # noqa: E402  (loaders and the lm-eval request encoding)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets"))
    args = ap.parse_args()
    scorer = ref.Scorer(args.model_dir, args.threads)
    loader, _ = ref.ZS_LOADERS[args.task]
    items = loader(args.data_dir)[:args.n]
    reqs = []
    for it in items:
        pairs = [(c, " " + it["target"]) for c in it["contexts"]] if args.task == "winogrande" else \
            [(it["context"], " " + c) for c in it["choices"]]
        for c, x in pairs:
            reqs.append(scorer.encode_pair(c, x))
    scored = sum(len(c) + len(x) for c, x in reqs)
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    lls = [0.0] * len(reqs)
    model = scorer.model if args.dtype == "fp32" else scorer.model.to(torch.bfloat16)
    start = time.time()
    with torch.no_grad():
        for b in range(0, len(order), args.batch):
            chunk = order[b:b + args.batch]
            inps = [(reqs[i][0] + reqs[i][1])[-(scorer.max_length + 1):][:-1] for i in chunk]
            width = max(len(x) for x in inps)
            ids = torch.zeros((len(inps), width), dtype=torch.long)
            mask = torch.zeros((len(inps), width), dtype=torch.long)
            for r, x in enumerate(inps):
                ids[r, :len(x)] = torch.tensor(x)
                mask[r, :len(x)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
            for r, i in enumerate(chunk):
                cont = reqs[i][1]
                n = len(inps[r])
                pos = torch.arange(n - len(cont), n)
                lls[i] = logp[r, pos, torch.tensor(cont)].sum().item()
    secs = time.time() - start
    at, acc = 0, 0
    for it in items:
        k = len(it["contexts"]) if args.task == "winogrande" else len(it["choices"])
        acc += ref.argmax(lls[at:at + k]) == it["gold"]
        at += k
    print("%s items %d requests %d: %.1f s, %.0f scored tokens/s (%d scored), acc %.4f (transformers %s, batch %d, "
          "%d threads, %s)" % (args.task, len(items), len(reqs), secs, scored / secs, scored, acc / len(items),
                               __import__("transformers").__version__, args.batch, args.threads, args.dtype))


if __name__ == "__main__":
    main()
