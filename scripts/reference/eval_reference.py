#!/usr/bin/env python3
"""Independent reference implementation of the evaluation protocols of methods.md §9 with transformers.

Not lm-eval-harness and not the hendrycks/IR-QLoRA scripts: the written protocol re-implemented on
`transformers` (fp32, eager attention, one unpadded forward pass per scored sequence) so that qpeft's Rust
evaluator can be checked item by item.

    eval_reference.py MODEL_DIR --out OUT.jsonl [--limit N]
        [--tasks mmlu,hellaswag,piqa,winogrande,arc_easy,arc_challenge,boolq,openbookqa]  (default: all)
        [--data-dir /work/shared/datasets] [--mmlu-split test|val] [--max-len 2048] [--mmlu-per-subject]
        [--show-prompts] [--threads 2] [--zs-special-tokens default|none]

MODEL_DIR is an HF directory with config, weights and a tokenizer (e.g. models/smollm2-hf-tok), or a GGUF file.

--limit N takes the first N items of each task in file order. For MMLU the order is: subjects sorted by name
(the `{subject}_{split}.csv` file names), rows in file order, so --limit 3 gives the first 3 questions of
abstract_algebra; with --mmlu-per-subject it is the first N rows of every subject instead.

Output: one JSON line per item:
  zero-shot tasks: task, index (0-based position in the task's file), gold, pred (argmax LL), pred_norm
    (argmax LL/len, only where acc_norm applies), ll (per-choice sums of log-probabilities), lens (per-choice
    character lengths of the choice strings, where acc_norm applies), ntok (per-choice continuation token counts)
  mmlu: task, index (0-based position over the evaluated order), subject, row (0-based row in the subject's
    CSV), gold (0..3), pred (0..3), k (shots used), ntok (prompt tokens), letter_logits ([4], logits of the
    " A".." D" tokens at the last position)
A summary table (n, acc, acc_norm per task; MMLU micro and macro) is printed at the end.

--show-prompts prints, for the first item of every task, the exact strings (JSON-escaped) and token ids.

Decisions where the written protocol or the data left a choice:
- MMLU CSVs are read with the csv module (strings kept as written, embedded CR LF kept). hendrycks/IR-QLoRA read
  them with pandas, which turns the 10 test choices "None" into NaN ("nan" in the prompt); not reproduced here.
- MMLU: shots come from dev/ for both splits; k stops at 0 (the record gets "over_max_len" if still too long).
- MMLU letter token = last id of tok("Answer: L"), asserted to extend tok("Answer:") by exactly one token.
- HellaSwag: the shared copy is llama.cpp's text form (no ctx_a/ctx_b); see load_hellaswag for the recovery.
- WinoGrande: continuation " " + sentence[i+1:].strip(); no acc_norm, so no pred_norm/lens.
- Zero-shot LLs: fp32 logits, log-softmax in float64; each (context, choice) is one unpadded forward pass of
  (ctx ++ cont)[:-1], left-truncated to max_position_embeddings + 1 tokens.
"""

import argparse
import csv
import json
import math
import os
import re
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

LETTERS = ["A", "B", "C", "D"]
ALL_TASKS = ["mmlu", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"]


# ----------------------------------------------------------------------------------------------- data loading

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def hs_pre(text):
    """lm-eval's HellaSwag preprocess."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


# WikiHow top-level categories seen as activity labels in HellaSwag val. Every item with one of these labels has a
# context ending in sentence punctuation (ctx_b empty); every other (ActivityNet) item ends in an incomplete noun
# phrase, which is ctx_b.
WIKIHOW_LABELS = {
    "Personal Care and Style", "Family Life", "Food and Entertaining", "Computers and Electronics", "Health",
    "Home and Garden", "Finance and Business", "Pets and Animals", "Education and Communications", "Youth",
    "Sports and Fitness", "Relationships", "Work World", "Cars & Other Vehicles", "Travel",
    "Holidays and Traditions", "Philosophy and Religion", "Home,Categories", "Uncategorized",
    "Arts and Entertainment", "Hobbies and Crafts",
}


def load_hellaswag(data_dir):
    """hellaswag_val_full.txt (llama.cpp / klosax text form): 6 lines per item,
    `pre'(activity_label) + ": " + pre'(ctx)`, gold label 0..3, then pre'(endings[0..3]), where pre' is the
    extract_hellaswag.cpp preprocessing (removes [header]/[step]/[substeps]/[title] tags, collapses double spaces,
    trims).  The raw ctx is ctx_a + " " + ctx_b (ctx_b non-empty only for ActivityNet items), so lm-eval's
    query pre(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) is recovered as:
      - WikiHow label (WIKIHOW_LABELS): ctx_b = "" -> query = pre(line)
      - otherwise (ActivityNet): ctx_b = text after the last ". " of ctx (whole ctx if none), ctx_a = text
        before it including the "." -> query = pre(label + ": " + ctx_a + " " + ctx_b.capitalize())
    lm-eval's pre is then applied on top (it also drops the 13 bracketed spans the C++ tool left in)."""
    path = os.path.join(data_dir, "hellaswag", "hellaswag_val_full.txt")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(lines) % 6 == 0, len(lines)
    items = []
    for i in range(len(lines) // 6):
        head, gold, *endings = lines[6 * i:6 * i + 6]
        label, ctx = head.split(": ", 1)
        if label in WIKIHOW_LABELS:
            ctx_a, ctx_b = ctx, ""
        else:
            k = ctx.rfind(". ")
            ctx_a, ctx_b = (ctx[:k + 1], ctx[k + 2:]) if k >= 0 else ("", ctx)
        context = hs_pre(label + ": " + ctx_a + " " + ctx_b.capitalize())
        items.append({"context": context, "choices": [hs_pre(e) for e in endings], "gold": int(gold)})
    return items


def load_piqa(data_dir):
    rows = read_jsonl(os.path.join(data_dir, "piqa", "valid.jsonl"))
    labels = read_lines(os.path.join(data_dir, "piqa", "valid-labels.lst"))
    assert len(rows) == len(labels)
    return [{"context": "Question: " + r["goal"] + "\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(l)}
            for r, l in zip(rows, labels)]


def load_winogrande(data_dir):
    rows = read_jsonl(os.path.join(data_dir, "winogrande", "dev.reconstructed.jsonl"))
    labels = read_lines(os.path.join(data_dir, "winogrande", "dev-labels.lst"))
    assert len(rows) == len(labels)
    items = []
    for r, l in zip(rows, labels):
        assert r["answer"] == l
        s = r["sentence"]
        i = s.index("_")
        items.append({"contexts": [s[:i] + r["option1"], s[:i] + r["option2"]],
                      "target": s[i + 1:].strip(),
                      "gold": {"1": 0, "2": 1}[r["answer"]]})
    return items


def load_arc(data_dir, which):
    name = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}[which]
    rows = read_jsonl(os.path.join(data_dir, which, name + "-Test.jsonl"))
    items = []
    for r in rows:
        labels = [c["label"] for c in r["question"]["choices"]]
        items.append({"context": "Question: " + r["question"]["stem"] + "\nAnswer:",
                      "choices": [c["text"] for c in r["question"]["choices"]],
                      "gold": labels.index(r["answerKey"])})
    return items


def load_boolq(data_dir):
    rows = read_jsonl(os.path.join(data_dir, "boolq", "val.jsonl"))
    return [{"context": r["passage"] + "\nQuestion: " + r["question"] + "?\nAnswer:", "choices": ["no", "yes"],
             "gold": {"false": 0, "true": 1}[str(r["label"]).lower()]} for r in rows]


def load_openbookqa(data_dir):
    rows = read_jsonl(os.path.join(data_dir, "openbookqa", "test.jsonl"))
    items = []
    for r in rows:
        labels = [c["label"] for c in r["question"]["choices"]]
        items.append({"context": r["question"]["stem"], "choices": [c["text"] for c in r["question"]["choices"]],
                      "gold": labels.index(r["answerKey"].lstrip())})
    return items


def read_mmlu_csv(path):
    # newline="" so quoted fields keep their embedded newlines byte for byte (CRLF inside quotes stays CRLF).
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f)]
    for r in rows:
        assert len(r) == 6 and r[5] in LETTERS, (path, r)
    return rows


def mmlu_subjects(data_dir, split):
    d = os.path.join(data_dir, "mmlu", split)
    suffix = "_" + split + ".csv"
    return sorted(f[:-len(suffix)] for f in os.listdir(d) if f.endswith(suffix))


# ----------------------------------------------------------------------------------------------- model scoring

class Scorer:
    def __init__(self, model_dir, threads, zs_special_tokens=True):
        torch.set_num_threads(threads)
        self.zs_special_tokens = zs_special_tokens
        # A GGUF file is loaded the way transformers loads one (dequantized to f32).
        kw = {}
        if model_dir.endswith(".gguf"):
            model_dir, kw["gguf_file"] = os.path.split(os.path.abspath(model_dir))
        self.tok = AutoTokenizer.from_pretrained(model_dir, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager", **kw)
        self.model.eval()
        cfg = self.model.config
        self.max_length = getattr(cfg, "max_position_embeddings", None) or 2048

    def encode(self, text):
        # zero-shot encoding. Default: the tokenizer's default special tokens (methods.md §9.2; BOS where the
        # tokenizer adds one, none for SmolLM2). --zs-special-tokens none: add_special_tokens=False, which is what
        # lm-eval's HF causal-LM classes actually do (v0.3 gpt2.py/huggingface.py, v0.4 add_bos_token=False).
        if self.zs_special_tokens:
            return self.tok(text).input_ids
        return self.tok(text, add_special_tokens=False).input_ids

    @torch.no_grad()
    def logits(self, ids):
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long))
        return out.logits[0].float()

    def encode_pair(self, context, continuation):
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        # split by length only, as lm-eval does (no check that whole starts with ctx)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, context, continuation):
        ctx, cont = self.encode_pair(context, continuation)
        if not ctx:
            raise ValueError("empty context: %r" % context)
        if not cont:
            raise ValueError("empty continuation: %r + %r" % (context, continuation))
        seq = (ctx + cont)[-(self.max_length + 1):]
        inp = seq[:-1]
        logits = self.logits(inp)
        logp = torch.log_softmax(logits.double(), dim=-1)
        n = len(cont)
        # position p predicts token p+1; the continuation tokens are the last n of seq
        pos = torch.arange(len(inp) - n, len(inp))
        tgt = torch.tensor(cont, dtype=torch.long)
        ll = logp[pos, tgt].sum().item()
        greedy = bool((logits[pos].argmax(-1) == tgt).all().item())
        return ll, ctx, cont, greedy


# ----------------------------------------------------------------------------------------------- tasks

ZS_LOADERS = {
    "hellaswag": (load_hellaswag, True),
    "piqa": (load_piqa, True),
    "winogrande": (load_winogrande, False),
    "arc_easy": (lambda d: load_arc(d, "arc_easy"), True),
    "arc_challenge": (lambda d: load_arc(d, "arc_challenge"), True),
    "boolq": (load_boolq, False),
    "openbookqa": (load_openbookqa, True),
}


def argmax(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def run_zero_shot(task, scorer, args, out):
    loader, has_norm = ZS_LOADERS[task]
    items = loader(args.data_dir)
    if args.limit is not None:
        items = items[:args.limit]
    n = c_acc = c_norm = 0
    for idx, it in enumerate(items):
        if task == "winogrande":
            pairs = [(c, " " + it["target"]) for c in it["contexts"]]
        else:
            pairs = [(it["context"], " " + c) for c in it["choices"]]
        lls, ntok, shown = [], [], []
        for ctx_s, cont_s in pairs:
            ll, ctx_ids, cont_ids, _ = scorer.loglikelihood(ctx_s, cont_s)
            lls.append(ll)
            ntok.append(len(cont_ids))
            shown.append({"context": ctx_s, "continuation": cont_s, "ctx_ids": ctx_ids, "cont_ids": cont_ids})
        rec = {"task": task, "index": idx, "gold": it["gold"], "pred": argmax(lls)}
        if has_norm:
            lens = [len(c) for c in it["choices"]]
            rec["pred_norm"] = argmax([l / n_ for l, n_ in zip(lls, lens)])
            rec["lens"] = lens
        rec["ll"] = lls
        rec["ntok"] = ntok
        out.write(json.dumps(rec) + "\n")
        out.flush()
        n += 1
        c_acc += rec["pred"] == it["gold"]
        if has_norm:
            c_norm += rec["pred_norm"] == it["gold"]
        if idx == 0 and args.show_prompts:
            print("=== %s item 0 (gold %d)" % (task, it["gold"]))
            for k, s in enumerate(shown):
                print("choice %d context:      %s" % (k, json.dumps(s["context"], ensure_ascii=False)))
                print("choice %d continuation: %s" % (k, json.dumps(s["continuation"], ensure_ascii=False)))
                print("choice %d ctx_ids:  %s" % (k, s["ctx_ids"]))
                print("choice %d cont_ids: %s" % (k, s["cont_ids"]))
                print("choice %d ll: %r" % (k, lls[k]))
    return {"task": task, "n": n, "acc": c_acc / n if n else float("nan"),
            "acc_norm": (c_norm / n if n else float("nan")) if has_norm else None}


def mmlu_format(row, include_answer):
    s = row[0]
    for j, L in enumerate(LETTERS):
        s += "\n" + L + ". " + row[1 + j]
    s += "\nAnswer:"
    if include_answer:
        s += " " + row[5] + "\n\n"
    return s


def mmlu_letter_ids(tok):
    """Token of " L" as it follows "Answer:": last token of tok("Answer: L"), asserted to be a single token that
    extends tok("Answer:")."""
    base = tok("Answer:").input_ids
    ids = []
    for L in LETTERS:
        full = tok("Answer: " + L).input_ids
        assert full[:len(base)] == base and len(full) == len(base) + 1, (L, base, full)
        ids.append(full[-1])
    assert len(set(ids)) == 4
    return ids


def run_mmlu(scorer, args, out):
    tok = scorer.tok
    letter_ids = mmlu_letter_ids(tok)
    print("MMLU answer tokens: " + ", ".join("%s -> id %d %s" % (L, i, json.dumps(tok.convert_ids_to_tokens(i)))
                                               for L, i in zip(LETTERS, letter_ids)))
    split = args.mmlu_split
    subjects = mmlu_subjects(args.data_dir, split)
    per_subject = {}
    idx = 0
    remaining = args.limit
    for subject in subjects:
        if remaining is not None and remaining <= 0 and not args.mmlu_per_subject:
            break
        dev = read_mmlu_csv(os.path.join(args.data_dir, "mmlu", "dev", subject + "_dev.csv"))
        rows = read_mmlu_csv(os.path.join(args.data_dir, "mmlu", split, subject + "_" + split + ".csv"))
        if args.limit is not None:
            rows = rows[:args.limit] if args.mmlu_per_subject else rows[:remaining]
            if not args.mmlu_per_subject:
                remaining -= len(rows)
        header = "The following are multiple choice questions (with answers) about {}.\n\n".format(
            " " + subject.replace("_", " "))
        correct = 0
        for r, row in enumerate(rows):
            question = mmlu_format(row, False)
            k = 5
            while True:
                prompt = header + "".join(mmlu_format(d, True) for d in dev[:k]) + question
                ids = tok(prompt).input_ids
                if len(ids) <= args.max_len or k == 0:
                    break
                k -= 1
            logits = scorer.logits(ids)[-1]
            ll = [logits[i].item() for i in letter_ids]
            pred = argmax(ll)
            gold = LETTERS.index(row[5])
            correct += pred == gold
            rec = {"task": "mmlu", "index": idx, "subject": subject, "row": r, "gold": gold, "pred": pred,
                   "k": k, "ntok": len(ids), "letter_logits": ll}
            if len(ids) > args.max_len:
                rec["over_max_len"] = True
            out.write(json.dumps(rec) + "\n")
            out.flush()
            if idx == 0 and args.show_prompts:
                print("=== mmlu item 0 (%s row 0, gold %s, k %d)" % (subject, row[5], k))
                print("prompt: " + json.dumps(prompt, ensure_ascii=False))
                print("prompt_ids: %s" % ids)
                print("letter_logits: %r" % ll)
            idx += 1
        if rows:
            per_subject[subject] = (len(rows), correct)
    n = sum(v[0] for v in per_subject.values())
    c = sum(v[1] for v in per_subject.values())
    accs = [v[1] / v[0] for v in per_subject.values()]
    return {"task": "mmlu", "n": n, "acc": c / n if n else float("nan"),
            "acc_macro": sum(accs) / len(accs) if accs else float("nan"),
            "subjects": {s: {"n": v[0], "acc": v[1] / v[0]} for s, v in per_subject.items()}}


# ----------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--tasks", default=",".join(ALL_TASKS))
    ap.add_argument("--limit", type=int, default=None, help="first N items per task (MMLU: see --mmlu-per-subject)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default="/work/shared/datasets")
    ap.add_argument("--mmlu-split", choices=["test", "val"], default="test")
    ap.add_argument("--mmlu-per-subject", action="store_true",
                    help="--limit applies to every MMLU subject instead of to the questions overall")
    ap.add_argument("--max-len", type=int, default=2048, help="MMLU prompt token limit for shot reduction")
    ap.add_argument("--show-prompts", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--zs-special-tokens", choices=["default", "none"], default="default",
                    help="zero-shot encoding: the tokenizer's default special tokens (methods.md) or none "
                         "(lm-eval's actual HF behaviour); identical for tokenizers that add no BOS (SmolLM2)")
    args = ap.parse_args()

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in ALL_TASKS:
            sys.exit("unknown task %r (known: %s)" % (t, ", ".join(ALL_TASKS)))

    t0 = time.time()
    scorer = Scorer(args.model_dir, args.threads, args.zs_special_tokens == "default")
    print("model loaded in %.1fs; zero-shot max length %d" % (time.time() - t0, scorer.max_length))
    results = []
    with open(args.out, "w", encoding="utf-8") as out:
        for t in tasks:
            t1 = time.time()
            res = run_mmlu(scorer, args, out) if t == "mmlu" else run_zero_shot(t, scorer, args, out)
            res["seconds"] = time.time() - t1
            results.append(res)
            print("%s done: n=%d in %.1fs" % (t, res["n"], res["seconds"]), flush=True)

    print()
    print("%-14s %6s %8s %9s %8s" % ("task", "n", "acc", "acc_norm", "sec"))
    for r in results:
        if r["task"] == "mmlu":
            print("%-14s %6d %8.4f %9s %8.1f   (micro; macro over %d subjects %.4f)" % (
                "mmlu", r["n"], r["acc"], "-", r["seconds"], len(r["subjects"]), r["acc_macro"]))
        else:
            an = "-" if r["acc_norm"] is None else "%.4f" % r["acc_norm"]
            print("%-14s %6d %8.4f %9s %8.1f" % (r["task"], r["n"], r["acc"], an, r["seconds"]))
    for r in results:
        if r["task"] == "mmlu" and len(r["subjects"]) > 1:
            print()
            for s, v in r["subjects"].items():
                print("  mmlu %-40s n=%4d acc=%.4f" % (s, v["n"], v["acc"]))
    print("total %.1fs" % (time.time() - t0))


if __name__ == "__main__":
    main()
