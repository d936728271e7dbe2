#!/usr/bin/env python3
"""Golden for RoBERTa position ids when a text holds a literal padding token.

transformers numbers RoBERTa positions from the input ids (create_position_ids_from_input_ids):
a token equal to pad_token_id gets position pad_token_id and the tokens after it shift. This
computes, with PyTorch, the tiny RoBERTa classifier of processor/tests/fixtures (made by
make-task-fixtures.py) on texts containing "<pad>", one at a time, and writes
processor/tests/fixtures/tiny-roberta-pad-literal.json (ids, mean embedding, logits).

    HF_HUB_OFFLINE=1 /tmp/torchvenv/bin/python scripts/make-pad-literal-golden.py
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXTS = ["hello <pad> world", "<pad> at the start", "two <pad><pad> in a row and more words"]


def main() -> None:
    fixtures = Path(__file__).resolve().parent.parent / "processor/tests/fixtures"
    model_dir = fixtures / "tiny-roberta-classify"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
    items = []
    with torch.no_grad():
        for text in TEXTS:
            encoded = tokenizer(text, return_tensors="pt")
            ids = encoded["input_ids"]
            assert (ids[0, 1:-1] == model.config.pad_token_id).any(), f"{text!r}: no pad id inside"
            states = model.base_model(**encoded).last_hidden_state[0]
            logits = model(**encoded).logits[0]
            items.append({
                "text": text,
                "input_ids": ids[0].tolist(),
                "embedding_mean": [float(f"{v:.7g}") for v in states.mean(0).tolist()],
                "logits": [float(f"{v:.7g}") for v in logits.tolist()],
            })
    out = {
        "model_dir": "tiny-roberta-classify/",
        "generator": f"transformers {transformers.__version__} / torch {torch.__version__}",
        "items": items,
    }
    (fixtures / "tiny-roberta-pad-literal.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
