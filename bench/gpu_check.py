#!/usr/bin/env python3
"""The PyTorch half of scripts/gpu-check: reference checkpoints, fidelity, bare-model speed.

Runs where the GPU is (torch + transformers, no network, no model hub):

    gpu_check.py env OUT --device cuda          GPU, driver, CPU and versions as JSON
    gpu_check.py texts OUT                      the texts the fidelity dumps compute
    gpu_check.py checkpoints OUT_DIR            MiniLM- and bert-base-shaped BERTs with random
                                                weights (seed 0) and the repo's tokenizer files
    gpu_check.py fidelity --model DIR --device cuda --dump NAME=FILE ... --out FILE
                                                `processor dump` outputs against PyTorch on the
                                                same token ids (and against the first dump)
    gpu_check.py bench --model DIR --device cuda --dtype f32 --out FILE
                                                sentences/s as `processor bench` measures them
    gpu_check.py report RESULTS_DIR             summary.md from every JSON in RESULTS_DIR

Both implementations read the same files: the checkpoints are written once, here, as
safetensors with config.json, and `processor` loads them as any HuggingFace checkpoint.
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]

# (name, layers, hidden, heads, intermediate): the shapes users run most.
SHAPES = [
    ("minilm-shape", 6, 384, 12, 1536),
    ("bert-base-shape", 12, 768, 12, 3072),
]


def env(args):
    def sh(command):
        try:
            return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as error:  # a missing tool is a fact to report, not a failure
            return f"({error})"

    info = {
        "device": args.device,
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -1"),
        "cores": sh("nproc"),
        "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader") or "none",
        "driver_cuda": sh("nvidia-smi | sed -n 's/.*CUDA Version: *\\([0-9.]*\\).*/\\1/p'") or "none",
        "python": platform.python_version(),
        "processor": sh("processor --version"),
        "nvrtc_dir": args.nvrtc,
        "loader": sh("ldconfig -p | grep -E 'libcuda\\.so|libnvrtc\\.so' | sed 's/^[[:space:]]*//' | tr '\\n' ';'"),
        # Kernels and autotune results are not cached on disk in this build: every process
        # compiles and tunes what it computes, so each step here starts cold.
        "kernel_cache": "none (cold start per process)",
    }
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, torch_cuda=str(torch.version.cuda), transformers=transformers.__version__)
    except Exception as error:
        info["torch"] = f"not importable: {error}"
    Path(args.out).write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def texts(args):
    fill = json.loads((REPO / "processor/tests/fixtures/tiny_mlm_fill_mask.json").read_text())["items"]
    chosen = [item["text"] for item in fill][:12] + [
        "The quick brown fox jumps over the lazy dog.",
        "NATS spreads the load across GPU nodes, and every request gets exactly one reply.",
        "a",
        "Café crème brûlée in Zürich costs 12.50 CHF — or so I was told on 2024-03-01.",
        " ".join(["a long input of many words to fill the positions of the model"] * 8),
    ]
    Path(args.out).write_text(json.dumps(chosen))


def checkpoints(args):
    import torch
    from transformers import BertConfig, BertModel

    out = Path(args.out)
    tokenizer_dir = Path(args.tokenizer_from)
    for name, layers, hidden, heads, intermediate in SHAPES:
        target = out / name
        if (target / "model.safetensors").is_file():
            continue
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=30522,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=512,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        )
        model = BertModel(config, add_pooling_layer=False).eval()
        model.save_pretrained(target, safe_serialization=True)
        for file in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / file, target / file)
        print(f"{target}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


def load_torch(model_dir, device, dtype):
    import torch
    from transformers import AutoModel, BertForMaskedLM

    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if "BertForMaskedLM" in config.get("architectures", []):
        mlm = BertForMaskedLM.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype)
        mlm = mlm.to(device).eval()
        return mlm.bert, mlm
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch_dtype)
    return model.to(device).eval(), None


def fidelity(args):
    import torch
    from transformers import AutoTokenizer

    model, mlm = load_torch(args.model, args.device, "f32")
    mask_id = AutoTokenizer.from_pretrained(args.model, local_files_only=True).mask_token_id
    dumps = {}
    for spec in args.dump:
        name, _, path = spec.rpartition("=")
        dump = json.loads(Path(path).read_text())
        # Named by what computed it: device, float type, attention.
        dumps[name or f"burn {dump['device']} {dump['dtype']} {dump['attention']}"] = dump
    # The CPU backend in f32 first: the other variants are also compared with it.
    order = sorted(dumps, key=lambda n: (dumps[n]["device"] != "cpu", dumps[n]["dtype"] != "f32", dumps[n]["attention"] != "explicit"))
    dumps = {name: dumps[name] for name in order}
    first = next(iter(dumps))
    items = dumps[first]["items"]

    with torch.inference_mode():
        # Hidden states of each text alone, as the dump computes them.
        hidden = [
            model(torch.tensor([item["ids"]], device=args.device)).last_hidden_state[0].float().cpu()
            for item in items
        ]
        # Embeddings of all texts in one padded batch (mean pooling over real tokens, L2).
        longest = max(len(item["ids"]) for item in items)
        ids = torch.zeros((len(items), longest), dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item["ids"])] = torch.tensor(item["ids"])
            mask[row, : len(item["ids"])] = 1
        states = model(ids.to(args.device), attention_mask=mask.to(args.device)).last_hidden_state
        m = mask.to(args.device).unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1)
        embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu()
        top1 = []
        if mlm is not None:
            logits = mlm(ids.to(args.device), attention_mask=mask.to(args.device)).logits.float().cpu()
            for row, item in enumerate(items):
                for pos, token in enumerate(item["ids"]):
                    if token == mask_id:
                        probs = logits[row, pos].softmax(-1)
                        best = int(probs.argmax())
                        top1.append((best, float(probs[best])))

    def compare(dump):
        worst_hidden = max(
            float((torch.tensor(item["hidden"]) - ref).abs().max()) for item, ref in zip(dump["items"], hidden)
        )
        ours = torch.tensor([item["embedding"] for item in dump["items"]])
        worst_embedding = float((ours - embeddings).abs().max())
        min_cosine = float(torch.nn.functional.cosine_similarity(ours, embeddings).min())
        result = {
            "max_abs_hidden": worst_hidden,
            "max_abs_embedding": worst_embedding,
            "min_cosine": min_cosine,
            "ids_equal": all(a["ids"] == b["ids"] for a, b in zip(dump["items"], items)),
        }
        masks = [mask for item in dump["items"] for mask in item["masks"]]
        if top1 and masks:
            agree = sum(1 for ours, ref in zip(masks, top1) if ours[0][0] == ref[0])
            result["top1_agree"] = f"{agree}/{len(top1)}"
            result["max_abs_top1_prob"] = max(abs(ours[0][1] - ref[1]) for ours, ref in zip(masks, top1))
        return result

    def between(a, b):
        worst_hidden = max(
            max(abs(x - y) for row_a, row_b in zip(ia["hidden"], ib["hidden"]) for x, y in zip(row_a, row_b))
            for ia, ib in zip(a["items"], b["items"])
        )
        worst_embedding = max(
            abs(x - y) for ia, ib in zip(a["items"], b["items"]) for x, y in zip(ia["embedding"], ib["embedding"])
        )
        return {"max_abs_hidden": worst_hidden, "max_abs_embedding": worst_embedding}

    # The model's own name (the tiny MLM's directory is the repo fixture's).
    report = {"model": Path(args.model).name, "torch": torch.__version__, "device": args.device, "vs_pytorch_f32": {}, "vs_first": {}}
    for name, dump in dumps.items():
        report["vs_pytorch_f32"][name] = compare(dump)
        if name != first:
            report["vs_first"][f"{name} vs {first}"] = between(dump, dumps[first])
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def bench(args):
    import torch
    from transformers import AutoTokenizer

    # PyTorch computes f32 matmuls in IEEE f32 unless told to use TF32 tensor cores.
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    model, _ = load_torch(args.model, args.device, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    sets = json.loads(Path(args.inputs).read_text())
    label = "tf32" if args.tf32 and args.dtype == "f32" else args.dtype
    rows = []
    cuda = args.device.startswith("cuda")
    for name in args.sets.split(","):
        texts = sets[name]
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            # Tokenised before timing, each batch padded to its own longest input.
            batches = [
                tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=512, return_tensors="pt").to(args.device)
                for i in range(0, len(texts), batch)
            ]

            def run():
                with torch.inference_mode():
                    for encoded in batches:
                        states = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
                        mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
                        pooled = (states * mask).sum(1) / mask.sum(1)
                        # Copied to the host, as a server returns them.
                        torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu()
                if cuda:
                    torch.cuda.synchronize()

            run()
            passes, started = 0, time.perf_counter()
            while passes == 0 or time.perf_counter() - started < args.min_time:
                run()
                passes += 1
            elapsed = time.perf_counter() - started
            rows.append(
                {
                    "set": name,
                    "batch": batch,
                    "sentences_per_s": passes * len(texts) / elapsed,
                    "ms_per_batch": elapsed * 1000 / (passes * len(batches)),
                }
            )
            print(f"| pytorch {label} | {name} | {batch} | {rows[-1]['sentences_per_s']:.1f} | {rows[-1]['ms_per_batch']:.2f} |")
    report = {"model": Path(args.model).name, "device": args.device, "dtype": label, "torch": torch.__version__, "attention": getattr(model.config, "_attn_implementation", "?"), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))


def report(args):
    results = Path(args.results)
    lines = ["# GPU check results", ""]
    env = results / "env.json"
    if env.is_file():
        info = json.loads(env.read_text())
        lines += [f"- {key}: {value}" for key, value in info.items()] + [""]

    # Bare-model speed: burn (processor bench) and PyTorch, same model, inputs and batches.
    burn = {}
    torch_rows = {}
    for path in sorted(results.glob("bench-*.json")):
        data = json.loads(path.read_text())
        for row in data["rows"]:
            cell = (data["model"], row["set"], row["batch"])
            if path.name.startswith("bench-pytorch-"):
                torch_rows.setdefault(data["dtype"], {})[cell] = row["sentences_per_s"]
            else:
                burn.setdefault((data["dtype"], data["attention"]), {})[cell] = row["sentences_per_s"]
    if burn or torch_rows:
        lines += ["## Bare model, sentences/s (embed path, tokenised before timing)", ""]
        lines += [
            "PyTorch f32 is IEEE f32; TF32 lets its f32 matmuls use tensor cores, as burn-cuda's f32 matmuls may.",
            "",
            "| model | dtype | attention | inputs | batch | burn | PyTorch | burn / PyTorch | PyTorch TF32 | burn / TF32 |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        variants = dict(burn)
        for dtype in torch_rows:
            if dtype != "tf32" and not any(d == dtype for d, _ in variants):
                variants[(dtype, "-")] = {}
        def num(value):
            return f"{value:.1f}" if value else "-"
        def ratio(a, b):
            return f"**{a / b:.2f}**" if a and b else "-"
        for (dtype, attention), cells in sorted(variants.items()):
            keys = sorted(set(cells) | set(torch_rows.get(dtype, {})))
            for cell in keys:
                rate = cells.get(cell)
                ref = torch_rows.get(dtype, {}).get(cell)
                tf32 = torch_rows.get("tf32", {}).get(cell) if dtype == "f32" else None
                model, name, batch = cell
                lines.append(
                    f"| {model} | {dtype} | {attention} | {name} | {batch} | {num(rate)} | {num(ref)} | {ratio(rate, ref)} | {num(tf32)} | {ratio(rate, tf32)} |"
                )
        lines.append("")

    fidelity = sorted(results.glob("fidelity-*.json"))
    if fidelity:
        lines += ["## Fidelity against PyTorch f32 on the same token ids", ""]
        lines += ["| model | outputs | max abs hidden | max abs embedding | min cosine | fill-mask top-1 |", "|---|---|---:|---:|---:|---|"]
        for path in fidelity:
            data = json.loads(path.read_text())
            for name, r in data["vs_pytorch_f32"].items():
                lines.append(
                    f"| {data['model']} | {name} | {r['max_abs_hidden']:.2e} | {r['max_abs_embedding']:.2e} | {r['min_cosine']:.6f} | {r.get('top1_agree', '-')} |"
                )
            for name, r in data["vs_first"].items():
                lines.append(f"| {data['model']} | {name} | {r['max_abs_hidden']:.2e} | {r['max_abs_embedding']:.2e} | | |")
        lines.append("")

    e2e = sorted(results.glob("e2e-*.json"))
    if e2e:
        lines += ["## End to end through a local nats-server (one processor, loadtest on the same machine)", ""]
        lines += ["| model | dtype | ready s | in flight | requests/s | p50 ms | p99 ms | mean batch | errors | bare model inputs/s | service / bare |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for path in e2e:
            data = json.loads(path.read_text())
            bare = data["baselines"]["model_inputs_per_s"]
            for run in data["runs"]:
                inflight = run["load"].get("concurrency", "open")
                lines.append(
                    f"| {Path(data['model_path']).name} | {data['dtype']} | {run.get('ready_s', 0):.1f} | {inflight} | {run['requests_per_s']:.1f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | {run['mean_batch_size']:.1f} | {run['errors']} | {bare:.1f} | **{run['vs_bare_model']:.2f}** |"
                )
        lines.append("")

    steps = results / "steps.tsv"
    if steps.is_file():
        lines += ["## Steps", "", "| step | status | seconds |", "|---|---|---:|"]
        for line in steps.read_text().splitlines():
            step, status, seconds = line.split("\t")
            lines.append(f"| {step} | {status} | {seconds} |")
        lines.append("")
    (results / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--nvrtc", default="not looked for")
    p = sub.add_parser("texts")
    p.add_argument("out")
    p = sub.add_parser("checkpoints")
    p.add_argument("out")
    p.add_argument("--tokenizer-from", default=str(REPO / "processor/tests/fixtures/tiny-bert-mlm"))
    p = sub.add_parser("fidelity")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dump", action="append", required=True, help="[NAME=]FILE from `processor dump`")
    p.add_argument("--out", required=True)
    p = sub.add_parser("bench")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--inputs", default=str(REPO / "bench/inputs.json"))
    p.add_argument("--sets", default="short16,mixed8_128")
    p.add_argument("--batch-sizes", default="1,8,32,128")
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--tf32", action="store_true", help="let f32 matmuls use TF32 tensor cores")
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("results")
    args = parser.parse_args()
    commands = {"env": env, "texts": texts, "checkpoints": checkpoints, "fidelity": fidelity, "bench": bench, "report": report}
    commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
