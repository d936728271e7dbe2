#!/usr/bin/env python3
"""PyTorch reference for the bare-model benchmark (processor/benches/bert.rs).

Times the same inputs (bench/inputs.json), the same way: tokenised before timing, padded per
batch to the longest input, BertModel forward + mean pooling + L2 normalisation, 2 threads,
float32 on the CPU. Not part of CI; run it by hand in a throwaway venv:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch transformers
    HF_HUB_OFFLINE=1 /tmp/torchvenv/bin/python bench/pytorch_reference.py models/all-MiniLM-L6-v2

BENCH_SETS=short16 BENCH_BATCHES=32 (comma-separated) pick a subset, as in the Rust benchmark.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

BATCH_SIZES = [1, 8, 32, 64]
MIN_TIME = 3.0


def selected(variable: str, value: str) -> bool:
    """Whether `value` is in the comma-separated list in `variable` (all when it is unset)."""
    chosen = os.environ.get(variable)
    return chosen is None or value in chosen.split(",")


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/all-MiniLM-L6-v2"
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    inputs = json.loads((Path(__file__).parent / "inputs.json").read_text())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| backend | inputs | batch | sentences/s | ms/batch |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in ["short16", "mixed8_128"]:
        texts = inputs[name]
        for batch in BATCH_SIZES:
            if not (selected("BENCH_SETS", name) and selected("BENCH_BATCHES", str(batch))):
                continue
            # Tokenise outside the timed loop, padding each batch to its own longest input.
            batches = [
                tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
                for i in range(0, len(texts), batch)
            ]

            def run() -> None:
                with torch.inference_mode():
                    for encoded in batches:
                        states = model(**encoded).last_hidden_state
                        mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
                        pooled = (states * mask).sum(1) / mask.sum(1)
                        torch.nn.functional.normalize(pooled, p=2, dim=1)

            run()  # warm-up
            passes, started = 0, time.perf_counter()
            while passes == 0 or time.perf_counter() - started < MIN_TIME:
                run()
                passes += 1
            elapsed = time.perf_counter() - started
            rate = passes * len(texts) / elapsed
            per_batch = elapsed / (passes * len(batches))
            print(f"| pytorch | {name} | {batch} | {rate:.1f} | {per_batch * 1e3:.2f} |")


if __name__ == "__main__":
    main()
