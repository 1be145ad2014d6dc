#!/usr/bin/env python3
"""Peer for `cargo bench -p qpeft --bench eval_loglik` and scripts/bench/cpu_vs_peers.sh: zero-shot log-likelihood
scoring with transformers the way lm-evaluation-harness's HF model scores it (requests sorted by length,
right-padded batches, one pass per (context, choice), fp32 or bf16 weights and activations on the CPU, where torch
runs bf16 products on AMX tiles or AVX512-BF16 through oneDNN), on the same first N items of a task; or MMLU 5-shot
on the first N questions of every subject (the letter logits at the prompt's last position, prompts sorted by length
in right-padded batches).
The log-softmax runs in float32 on the scored positions alone (the harness takes it over every position).

    eval_peer.py MODEL --task arc_easy|...|mmlu --n 200 --batch 8 [--threads 2] [--dtype fp32|bf16]
        [--data-dir ../shared/datasets]

Prints the wall time and, for zero-shot tasks, scored tokens/s with scored tokens = Σ |context| + |continuation|
over the requests, as the bench does."""
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
    model = scorer.model if args.dtype == "fp32" else scorer.model.to(torch.bfloat16)
    if args.task == "mmlu":
        return mmlu(scorer, model, args)
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
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r, i in enumerate(chunk):
                cont = reqs[i][1]
                n = len(inps[r])
                logp = torch.log_softmax(logits[r, n - len(cont):n].float(), dim=-1)
                lls[i] = logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
    secs = time.time() - start
    at, acc = 0, 0
    for it in items:
        k = len(it["contexts"]) if args.task == "winogrande" else len(it["choices"])
        acc += ref.argmax(lls[at:at + k]) == it["gold"]
        at += k
    print("%s items %d requests %d: %.1f s, %.0f scored tokens/s (%d scored), acc %.4f (transformers %s, batch %d, "
          "%d threads, %s)" % (args.task, len(items), len(reqs), secs, scored / secs, scored, acc / len(items),
                               __import__("transformers").__version__, args.batch, args.threads, args.dtype))


def mmlu(scorer, model, args):
    tok = scorer.tok
    letter_ids = ref.mmlu_letter_ids(tok)
    prompts = []  # (ids, gold)
    for subject in ref.mmlu_subjects(args.data_dir, "test"):
        dev = ref.read_mmlu_csv(os.path.join(args.data_dir, "mmlu", "dev", subject + "_dev.csv"))
        rows = ref.read_mmlu_csv(os.path.join(args.data_dir, "mmlu", "test", subject + "_test.csv"))[:args.n]
        header = "The following are multiple choice questions (with answers) about {}.\n\n".format(
            " " + subject.replace("_", " "))
        for row in rows:
            question = ref.mmlu_format(row, False)
            k = 5
            while True:
                ids = tok(header + "".join(ref.mmlu_format(d, True) for d in dev[:k]) + question).input_ids
                if len(ids) <= 2048 or k == 0:
                    break
                k -= 1
            prompts.append((ids, ref.LETTERS.index(row[5])))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][0]))
    preds = [0] * len(prompts)
    start = time.time()
    with torch.no_grad():
        for b in range(0, len(order), args.batch):
            chunk = order[b:b + args.batch]
            width = max(len(prompts[i][0]) for i in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :len(prompts[i][0])] = torch.tensor(prompts[i][0])
                mask[r, :len(prompts[i][0])] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r, i in enumerate(chunk):
                last = logits[r, len(prompts[i][0]) - 1].float()
                preds[i] = ref.argmax([last[t].item() for t in letter_ids])
    secs = time.time() - start
    acc = sum(p == g for p, (_, g) in zip(preds, prompts)) / len(prompts)
    tokens = sum(len(p[0]) for p in prompts)
    print("mmlu questions %d: %.1f s, %.0f prompt tokens/s (%d tokens), acc %.4f (transformers %s, batch %d, "
          "%d threads, %s)" % (len(prompts), secs, tokens / secs, tokens, acc, __import__("transformers").__version__,
                               args.batch, args.threads, args.dtype))


if __name__ == "__main__":
    main()
