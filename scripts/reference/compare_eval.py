#!/usr/bin/env python3
"""Per-item agreement of a `qpeft eval --json` report with eval_reference.py's JSONL.

    compare_eval.py QPEFT.json REFERENCE.jsonl

For each task both cover: items compared, identical predictions (acc and acc_norm), both accuracies on the
common items, and the largest |Δ| of the per-choice log-likelihoods (zero-shot) or letter logits (MMLU).
Exits 1 when a task has < 99% identical predictions or accuracies more than 0.5 points apart."""
import json
import sys


def main():
    q = json.load(open(sys.argv[1]))
    ref = {}
    for line in open(sys.argv[2]):
        r = json.loads(line)
        key = (r["subject"], r["row"]) if r["task"] == "mmlu" else r["index"]
        ref.setdefault(r["task"], {})[key] = r
    bad = False
    print("%-14s %6s %9s %9s %9s %9s %10s" % ("task", "items", "same", "acc q", "acc ref", "norm same", "max|dLL|"))
    for task, rep in q.items():
        if task not in ref:
            continue
        rows = []
        for it in rep["items"]:
            key = (it["subject"], it["index"]) if task == "mmlu" else it["index"]
            if key in ref[task]:
                rows.append((it, ref[task][key]))
        if not rows:
            continue
        n = len(rows)
        same = sum(a["pred"] == b["pred"] for a, b in rows)
        acc_q = sum(a["pred"] == a["gold"] for a, _ in rows) / n
        acc_r = sum(b["pred"] == b["gold"] for _, b in rows) / n
        golds = sum(a["gold"] == b["gold"] for a, b in rows)
        if task == "mmlu":
            dll = max(abs(x - y) for a, b in rows for x, y in zip(a["logits"], b["letter_logits"]))
        else:
            dll = max(abs(x - y) for a, b in rows for x, y in zip(a["ll"], b["ll"]))
        norm = "-"
        ok = same >= 0.99 * n and abs(acc_q - acc_r) <= 0.005 and golds == n
        if "pred_norm" in rows[0][1]:
            ns = sum(a.get("pred_norm") == b["pred_norm"] for a, b in rows)
            nq = sum(a.get("pred_norm") == a["gold"] for a, _ in rows) / n
            nr = sum(b["pred_norm"] == b["gold"] for _, b in rows) / n
            norm = "%d (%.4f/%.4f)" % (ns, nq, nr)
            ok = ok and ns >= 0.99 * n and abs(nq - nr) <= 0.005
        bad |= not ok
        print("%-14s %6d %9d %9.4f %9.4f %9s %10.2e %s" % (task, n, same, acc_q, acc_r, norm, dll, "" if ok else "FAIL"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
