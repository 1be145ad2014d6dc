#!/usr/bin/env python3
"""Builds tests/fixtures/eval/smollm2-reference.json for crates/qpeft/tests/eval_reference.rs from
eval_reference.py's outputs (transformers) and its loaders/encoding:

    eval_reference.py models/smollm2-hf-tok --tasks hellaswag,piqa,winogrande,arc_easy,arc_challenge,boolq,openbookqa \
        --limit 250 --out zs.jsonl
    eval_reference.py models/smollm2-hf-tok --tasks mmlu --limit 3 --mmlu-per-subject --out mmlu.jsonl
    make_eval_fixture.py models/smollm2-hf-tok zs.jsonl mmlu.jsonl tests/fixtures/eval/smollm2-reference.json \
        [--zs-items 40] [--mmlu-rows 1]

The fixture holds the first --zs-items items of every zero-shot task and the first --mmlu-rows questions of every
MMLU subject (predictions, per-choice log-likelihoods / letter logits), plus prompt examples: each task's first item
(and HellaSwag's first WikiHow item) as (context, continuation) strings with their token ids, and MMLU's first
prompt with its ids and the answer-letter token ids."""
import argparse
import json
import os

from transformers import AutoTokenizer

import eval_reference as ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("zs_jsonl")
    ap.add_argument("mmlu_jsonl")
    ap.add_argument("out")
    ap.add_argument("--zs-items", type=int, default=40)
    ap.add_argument("--mmlu-rows", type=int, default=1)
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "datasets"))
    args = ap.parse_args()
    scorer = ref.Scorer.__new__(ref.Scorer)
    scorer.tok = AutoTokenizer.from_pretrained(args.model_dir)
    scorer.zs_special_tokens = True

    items = {}
    for line in open(args.zs_jsonl):
        r = json.loads(line)
        if r["index"] < args.zs_items:
            items.setdefault(r["task"], []).append(r)
    for line in open(args.mmlu_jsonl):
        r = json.loads(line)
        if r["row"] < args.mmlu_rows:
            items.setdefault("mmlu", []).append(r)

    prompts = {}
    for task, (loader, _) in ref.ZS_LOADERS.items():
        data = loader(args.data_dir)
        picks = [0]
        if task == "hellaswag":
            picks.append(next(i for i, it in enumerate(data) if it["context"].split(": ", 1)[0] in ref.WIKIHOW_LABELS))
        for i in picks:
            it = data[i]
            pairs = [(c, " " + it["target"]) for c in it["contexts"]] if task == "winogrande" else \
                [(it["context"], " " + c) for c in it["choices"]]
            enc = [scorer.encode_pair(c, x) for c, x in pairs]
            prompts.setdefault(task, []).append({
                "index": i, "gold": it["gold"], "pairs": [list(p) for p in pairs],
                "ctx_ids": [e[0] for e in enc], "cont_ids": [e[1] for e in enc]})

    subject = ref.mmlu_subjects(args.data_dir, "test")[0]
    dev = ref.read_mmlu_csv(os.path.join(args.data_dir, "mmlu", "dev", subject + "_dev.csv"))
    row = ref.read_mmlu_csv(os.path.join(args.data_dir, "mmlu", "test", subject + "_test.csv"))[0]
    header = "The following are multiple choice questions (with answers) about {}.\n\n".format(" " + subject.replace("_", " "))
    prompt = header + "".join(ref.mmlu_format(d, True) for d in dev[:5]) + ref.mmlu_format(row, False)
    prompts["mmlu"] = [{"subject": subject, "row": 0, "prompt": prompt, "ids": scorer.tok(prompt).input_ids,
                        "letter_ids": ref.mmlu_letter_ids(scorer.tok)}]

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized; models/smollm2-hf-tok)",
                   "zs_items": args.zs_items, "mmlu_rows": args.mmlu_rows, "prompts": prompts, "items": items}, f)
        f.write("\n")
    print("wrote %s: %s" % (args.out, {t: len(v) for t, v in items.items()}))


if __name__ == "__main__":
    main()
