#!/usr/bin/env python3
"""Make tiny random-weight sequence-classification checkpoints and golden outputs.

Writes into processor/tests/fixtures/:

  tiny-bert-rerank/         BertForSequenceClassification, num_labels=1 (cross-encoder reranker)
  tiny-bert-classify/       BertForSequenceClassification, num_labels=3 (negative/neutral/positive)
  tiny-roberta-classify/    RobertaForSequenceClassification, num_labels=4 (world/sports/business/science)
  tiny-xlm-roberta-rerank/  XLMRobertaForSequenceClassification, num_labels=1 (like bge-reranker)

and next to each directory a golden file <dir-name>.json with token ids, base-encoder embeddings
(mean over all real tokens, special tokens included, not normalised; and the first row), and the
classifier logits (plus softmax/sigmoid) for a fixed list of texts and (query, passage) pairs.

Everything is made locally and deterministically (a rerun gives byte-identical files). Nothing is
downloaded from a model hub. The tokenizers are trained on a small corpus written below, plus the
golden texts except one held-out text:
  - byte-level BPE: tokenizers' ByteLevelBPETokenizer trainer;
  - WordPiece: BPE-style merges done in this script (tokenizers' WordPiece trainer is not
    reproducible from run to run), loaded into tokenizers' BertWordPieceTokenizer pipeline;
  - Unigram: tokenizers' SentencePieceUnigramTokenizer trainer, canonicalised, and topped up with
    whole-word pieces (see topped_up_unigram).
The weights come from the transformers initialiser under a fixed torch seed, with
initializer_range=0.2 so that outputs are well spread; the seeds were chosen so that the checks
below (top-1 margins, label and score spread) pass.

How to run (from the repository root):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch transformers tokenizers safetensors
    HF_HUB_OFFLINE=1 /tmp/torchvenv/bin/python scripts/make-task-fixtures.py

Optional: --out DIR writes somewhere else (default processor/tests/fixtures). The script checks
its own output (tokenizer.json vs transformers ids, reload of every checkpoint, padded batch vs
one-at-a-time outputs, spread of the logits) and fails with an AssertionError if a check fails.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic tokenizer training

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, processors  # noqa: E402
from tokenizers.implementations import (  # noqa: E402
    BertWordPieceTokenizer,
    ByteLevelBPETokenizer,
    SentencePieceUnigramTokenizer,
)
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 1000
MAX_LEN = 128  # max tokens per encoded input (BERT: 128 positions; RoBERTa: 130 = 128 + pad offset)
INIT_RANGE = 0.2
ATTN = "eager"

# ---------------------------------------------------------------------------------------------
# Golden inputs (same for every model)

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "I absolutely loved this movie, it was wonderful!",
    "This was the worst meal I have ever had.",
    "The meeting is scheduled for Tuesday at 3pm.",
    "Stocks fell sharply after the central bank raised interest rates.",
    "The team won the championship in a dramatic overtime finish.",
    "Wait... what?! Really?? (yes, really) -- #wow @home; 100% sure.",
    "In 2024, the population was 8,045,311 and grew by 1.5% to 3.14 million units.",
    "Café crème at Zürich",
    "東京は日本の首都です",
    "MiXeD CaSe TeXt With SHOUTING and lowercase Words",
    "Scientists at the university published a detailed study on Tuesday describing how a new "
    "battery design could store renewable energy for days instead of hours. The researchers "
    "tested the cells in cold and hot weather, and they found that performance stayed stable "
    "over thousands of cycles. Industry experts said the approach could lower costs, but they "
    "warned that building factories at scale will take years.",
]

LONG_PASSAGE = TEXTS[-1]

# Held out of the tokenizer training corpus, so that the goldens also cover unknown characters
# and words split into several pieces.
HELD_OUT = ["Zebras graze near 大阪 🦓 quietly"]
TEXTS.append(HELD_OUT[0])

PAIRS = [
    ("what is the capital of france", "Paris is the capital and largest city of France."),
    ("what is the capital of france", "The quick brown fox jumps over the lazy dog."),
    ("how do batteries store energy", LONG_PASSAGE),
    ("who won the championship", "The team won the championship in a dramatic overtime finish."),
    ("who won the championship", "Stocks fell sharply after the central bank raised interest rates."),
    ("best pizza in town", "I absolutely loved this movie, it was wonderful!"),
    ("Café crème", "Café crème at Zürich"),
    ("東京", "東京は日本の首都です"),
    ("interest rates", "interest rates"),
    ("When is the meeting?", "The meeting is scheduled for Tuesday at 3pm."),
]

CORPUS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "The river flows through the old town and into the sea.",
    "She bought fresh bread, cheese, and apples at the market this morning.",
    "Our flight was delayed by two hours because of heavy snow.",
    "He plays football every Saturday with his friends from school.",
    "The basketball team lost the final game by a single point.",
    "The tennis player served an ace to win the match.",
    "The company reported record profits in the third quarter.",
    "Investors worry that inflation will keep prices high next year.",
    "The market rallied after the quarterly earnings were announced.",
    "The new phone has a faster processor and a better camera.",
    "Researchers discovered a new species of frog in the rainforest.",
    "The telescope captured images of a distant galaxy.",
    "Climate scientists measured the melting of glaciers over a decade.",
    "The vaccine trial showed strong results in older patients.",
    "I really enjoyed the concert; the music was beautiful.",
    "The service was slow and the food was cold, which was disappointing.",
    "It was an ordinary day, nothing special happened.",
    "The film was boring and far too long.",
    "What a fantastic experience, I would recommend it to everyone!",
    "Terrible customer support, I will never buy from them again.",
    "The report is due on Friday, please send it before noon.",
    "How many people live in the city? About two million.",
    "Where can I find the nearest train station?",
    "Why do leaves change colour in the autumn?",
    "Water boils at 100 degrees Celsius at sea level.",
    "The recipe needs 250 grams of flour, 3 eggs, and 1.5 cups of milk.",
    "Elections will be held in May, and the results are expected in June.",
    "The president met foreign leaders to discuss trade and security.",
    "A strong earthquake struck the coast early on Monday.",
    "The museum opened a new exhibition of modern art.",
    "Children were playing in the park while their parents talked.",
    "The software update fixes several bugs and improves performance.",
    "Please restart the computer and try again.",
    "The library is open from nine in the morning until eight at night.",
    "Naïve résumé façade: déjà vu in São Paulo and Köln.",
    "Smörgåsbord, crème brûlée, and piña colada are on the menu.",
    "日本の首都は東京です。京都は古い都市です。",
    "北京是中国的首都。上海是一个大城市。",
    "Email me at alice@example.com or call +1 (555) 123-4567!",
    "Prices rose 4.2% in March; wages grew only 2.1%.",
    "THE END IS NEAR, said the sign in LARGE letters.",
    "Batteries store energy in chemical form and release it as electricity.",
    "Renewable energy from wind and solar power is growing quickly.",
    "The factory will build thousands of electric cars each year.",
]

# ---------------------------------------------------------------------------------------------
# Models

SPECS = [
    {
        "name": "tiny-bert-rerank",
        "kind": "bert",
        "cls": BertForSequenceClassification,
        "num_labels": 1,
        "labels": None,
        "seed": 1234,
    },
    {
        "name": "tiny-bert-classify",
        "kind": "bert",
        "cls": BertForSequenceClassification,
        "num_labels": 3,
        "labels": ["negative", "neutral", "positive"],
        "seed": 2569,
    },
    {
        "name": "tiny-roberta-classify",
        "kind": "roberta",
        "cls": RobertaForSequenceClassification,
        "num_labels": 4,
        "labels": ["world", "sports", "business", "science"],
        "seed": 3728,
    },
    {
        "name": "tiny-xlm-roberta-rerank",
        "kind": "xlm-roberta",
        "cls": XLMRobertaForSequenceClassification,
        "num_labels": 1,
        "labels": None,
        "seed": 4567,
    },
]


def training_corpus():
    out = list(CORPUS) + [t for t in TEXTS if t not in HELD_OUT]
    for q, p in PAIRS:
        out += [q, p]
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers


def train_wordpiece_vocab(normalizer, pre_tokenizer, specials, size):
    """WordPiece vocabulary by BPE merges, like tokenizers' WordPieceTrainer, but deterministic.

    (tokenizers 0.23's WordPieceTrainer numbers the `##x` continuation symbols in hash-map order,
    so merge ties, and hence the vocabulary, change from run to run.) Ties go to the
    lexicographically smallest pair.
    """
    words = {}
    for sentence in training_corpus():
        for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)):
            words[w] = words.get(w, 0) + 1
    splits = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    vocab = list(specials) + sorted({sym for syms in splits.values() for sym in syms})
    seen = set(vocab)
    while len(vocab) < size:
        pairs = {}
        for w, syms in splits.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda ab: (-pairs[ab], ab))
        a, b = best
        merged = a + b[2:]
        for w, syms in splits.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = out
        if merged not in seen:
            seen.add(merged)
            vocab.append(merged)
    return {tok: i for i, tok in enumerate(vocab)}


def make_wordpiece():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    kw = dict(lowercase=True, strip_accents=None, clean_text=True, handle_chinese_chars=True)
    probe = BertWordPieceTokenizer(**kw)._tokenizer
    vocab = train_wordpiece_vocab(probe.normalizer, probe.pre_tokenizer, specials, VOCAB_SIZE)
    wp = BertWordPieceTokenizer(vocab=vocab, **kw)
    tok = wp._tokenizer
    ids = {t: tok.token_to_id(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
    assert ids == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}, ids
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    hf = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
        mask_token="[MASK]", do_lower_case=True, model_max_length=MAX_LEN,
    )
    return tok, hf


def make_byte_bpe():
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(
        training_corpus(),
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=specials,
        show_progress=False,
    )
    tok = bpe._tokenizer
    ids = {t: tok.token_to_id(t) for t in specials}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}, ids
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    hf = RobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", add_prefix_space=False, trim_offsets=True,
        model_max_length=MAX_LEN,
    )
    return tok, hf


def make_unigram():
    sp = SentencePieceUnigramTokenizer(replacement="▁", add_prefix_space=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    sp.train_from_iterator(
        training_corpus(),
        vocab_size=VOCAB_SIZE - 1,  # <mask> is added last, as in XLM-R
        show_progress=False,
        special_tokens=specials,
        unk_token="<unk>",
    )
    tok = topped_up_unigram(sp._tokenizer, VOCAB_SIZE - 1)
    tok.add_special_tokens(["<mask>"])
    ids = {t: tok.token_to_id(t) for t in specials + ["<mask>"]}
    assert ids["<s>"] == 0 and ids["<pad>"] == 1 and ids["</s>"] == 2 and ids["<unk>"] == 3, ids
    assert ids["<mask>"] == tok.get_vocab_size() - 1, (ids, tok.get_vocab_size())
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0",
        pair="<s>:0 $A:0 </s>:0 </s>:0 $B:0 </s>:0",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    hf = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", model_max_length=MAX_LEN,
    )
    return tok, hf


def topped_up_unigram(tok, target):
    """Add whole-word pieces to a trained Unigram tokenizer until it has `target` pieces.

    Unigram EM (the `tokenizers` trainer and the `sentencepiece` one alike) prunes nearly every
    piece seen only once or twice, so on a corpus of ~100 sentences it stops at ~510 pieces of
    mostly 1-3 characters (~2.7 pieces per word; the long query/passage pair would be 180 tokens,
    more than the 128 positions). A real XLM-R vocabulary has most common words as single
    `▁word` pieces, so add those: every Latin-letter word of the corpus (after the tokenizer's own
    normaliser and Metaspace pre-tokeniser), most frequent first, scored log(count / words).
    CJK and other scripts keep the trained pieces. The model stays a plain Unigram model.
    """
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    have = {p for p, _ in vocab}
    counts = {}
    total = 0
    for sentence in training_corpus():
        norm = tok.normalizer.normalize_str(sentence)
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
            total += 1
            w = re.match(r"▁[A-Za-zÀ-ɏ]+", word)
            if w and len(w.group(0)) <= 16:
                counts[w.group(0)] = counts.get(w.group(0), 0) + 1
    extra = sorted((p for p in counts if p not in have), key=lambda p: (-counts[p], p))
    extra = extra[: max(0, target - len(vocab))]
    n_special = sum(1 for p, sc in vocab if sc == 0.0 and p.startswith("<"))
    # The trainer's piece set is stable from run to run, but not its output order: it ends with
    # the required characters that EM dropped, appended in hash-set order with scores
    # min - k * 1e-4. Give that tail one common score, round the rest (their last bits vary with
    # the parallel sums), and sort by (score, piece) for a reproducible file.
    trained = [list(ps) for ps in vocab[n_special:]]
    tail = len(trained) - 1
    while tail > 0 and any(abs(trained[tail - 1][1] - trained[tail][1] - d) < 1e-6 for d in (1e-4, 0.0)):
        tail -= 1
    for ps in trained[tail:]:
        ps[1] = trained[tail][1]
    pieces = trained + [[p, math.log(counts[p] / total)] for p in extra]
    pieces = [[p, round(sc, 4)] for p, sc in pieces]
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    spec["model"]["vocab"] = vocab[:n_special] + pieces
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# Model construction


def make_config(spec, vocab_size):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=INIT_RANGE,
        layer_norm_eps=1e-12 if spec["kind"] == "bert" else 1e-5,
        num_labels=spec["num_labels"],
    )
    if spec["labels"] is not None:
        common["id2label"] = {i: l for i, l in enumerate(spec["labels"])}
        common["label2id"] = {l: i for i, l in enumerate(spec["labels"])}
    if spec["kind"] == "bert":
        return BertConfig(max_position_embeddings=128, type_vocab_size=2, pad_token_id=0, **common)
    cfg_cls = RobertaConfig if spec["kind"] == "roberta" else XLMRobertaConfig
    return cfg_cls(max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
                   bos_token_id=0, eos_token_id=2, **common)


def build_model(spec, vocab_size):
    cfg = make_config(spec, vocab_size)
    torch.manual_seed(spec["seed"])
    cfg._attn_implementation = ATTN
    model = spec["cls"](cfg)
    model.eval()
    model.float()
    return model


# ---------------------------------------------------------------------------------------------
# Forward helpers


def uses_type_ids(spec):
    return spec["kind"] == "bert"


def forward(spec, model, ids, type_ids, mask):
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if uses_type_ids(spec):
        kwargs["token_type_ids"] = type_ids
    base = model.base_model(**kwargs).last_hidden_state
    logits = model(**kwargs).logits
    m = mask.unsqueeze(-1).to(base.dtype)
    mean = (base * m).sum(1) / m.sum(1)
    cls = base[:, 0, :]
    return mean, cls, logits


def r7(x):
    return [float(f"{v:.7g}") for v in x]


def head_outputs(spec, logits):
    out = {"logits": r7(logits.tolist())}
    if spec["num_labels"] == 1:
        out["score"] = float(f"{torch.sigmoid(logits[0]).item():.7g}")
    else:
        probs = torch.softmax(logits, -1)
        out["probs"] = r7(probs.tolist())
        out["top1"] = spec["labels"][int(probs.argmax())]
    return out


# ---------------------------------------------------------------------------------------------


def check_tokenizer(name, hf_tok, raw_path, spec):
    raw = Tokenizer.from_file(str(raw_path))
    raw.no_padding()
    raw.no_truncation()
    for t in TEXTS:
        a = hf_tok(t, add_special_tokens=True)
        b = raw.encode(t, add_special_tokens=True)
        assert a["input_ids"] == b.ids, (name, t, a["input_ids"], b.ids)
        if "token_type_ids" in a:
            assert a["token_type_ids"] == b.type_ids, (name, t)
    for q, p in PAIRS:
        a = hf_tok(q, p, add_special_tokens=True)
        b = raw.encode(q, p, add_special_tokens=True)
        assert a["input_ids"] == b.ids, (name, q, p, a["input_ids"], b.ids)
        if "token_type_ids" in a:
            assert a["token_type_ids"] == b.type_ids, (name, q, p, a["token_type_ids"], b.type_ids)
    return raw


def run_spec(spec, raw_tok, hf_tok, out_dir, versions):
    name = spec["name"]
    d = out_dir / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    vocab_size = raw_tok.get_vocab_size(with_added_tokens=True)
    model = build_model(spec, vocab_size)
    model.save_pretrained(d, safe_serialization=True)
    hf_tok.save_pretrained(d)
    assert (d / "tokenizer.json").exists() and (d / "model.safetensors").exists()
    os.chmod(d / "model.safetensors", 0o644)  # safetensors writes it 0600

    # safetensors: float32 only
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            assert f.get_slice(k).get_dtype() == "F32", (name, k, f.get_slice(k).get_dtype())
        n_tensors = len(list(f.keys()))

    # tokenizers: reloaded transformers tokenizer == in-memory one == tokenizer.json
    loaded_tok = AutoTokenizer.from_pretrained(d)
    raw = check_tokenizer(name, loaded_tok, d / "tokenizer.json", spec)
    check_tokenizer(name + " (in-memory)", hf_tok, d / "tokenizer.json", spec)

    # model reload
    loaded, info = AutoModelForSequenceClassification.from_pretrained(
        d, output_loading_info=True, attn_implementation=ATTN
    )
    loaded.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (name, k, info.get(k))
    assert type(loaded) is spec["cls"], (name, type(loaded))
    sd1, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd1) == set(sd2), (name, set(sd1) ^ set(sd2))
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), (name, "reloaded weight differs", k)

    # encode every item with the tokenizer.json tokenizer (what the Rust side uses)
    items = []
    for t in TEXTS:
        e = raw.encode(t)
        items.append(("text", t, None, e.ids, e.type_ids))
    for q, p in PAIRS:
        e = raw.encode(q, p)
        items.append(("pair", q, p, e.ids, e.type_ids))
    for it in items:
        assert len(it[3]) <= MAX_LEN, (name, it[1], len(it[3]))

    def model_type_ids(tids):
        # RoBERTa-family models have type_vocab_size 1: they are always fed zeros.
        return tids if uses_type_ids(spec) else [0] * len(tids)

    # one at a time
    singles = []
    reload_diff = 0.0
    with torch.no_grad():
        for kind, a, b, ids, tids in items:
            ids_t = torch.tensor([ids])
            tt = torch.tensor([model_type_ids(tids)])
            mask = torch.ones_like(ids_t)
            mean, cls, logits = forward(spec, model, ids_t, tt, mask)
            mean2, cls2, logits2 = forward(spec, loaded, ids_t, tt, mask)
            reload_diff = max(reload_diff, (mean - mean2).abs().max().item(),
                              (cls - cls2).abs().max().item(), (logits - logits2).abs().max().item())
            singles.append((mean[0], cls[0], logits[0]))
    # The weights are bit-identical; outputs may differ in the last float bit because the
    # reloaded tensors live in differently aligned memory (other SIMD paths).
    print(f"{name}: reloaded-vs-in-memory max abs diff = {reload_diff:.3e}")
    assert reload_diff < 1e-6, (name, "reloaded model differs", reload_diff)

    # one padded batch
    pad_id = raw.token_to_id("[PAD]" if spec["kind"] == "bert" else "<pad>")
    L = max(len(it[3]) for it in items)
    ids_b, tt_b, mask_b = [], [], []
    for _, _, _, ids, tids in items:
        n = L - len(ids)
        ids_b.append(ids + [pad_id] * n)
        tt_b.append(model_type_ids(tids) + [0] * n)
        mask_b.append([1] * len(ids) + [0] * n)
    with torch.no_grad():
        mean_b, cls_b, logits_b = forward(spec, model, torch.tensor(ids_b), torch.tensor(tt_b),
                                          torch.tensor(mask_b))
    batch_diff = 0.0
    for i, (mean, cls, logits) in enumerate(singles):
        batch_diff = max(batch_diff, (mean - mean_b[i]).abs().max().item(),
                         (cls - cls_b[i]).abs().max().item(), (logits - logits_b[i]).abs().max().item())
    print(f"{name}: batch-vs-single max abs diff = {batch_diff:.3e}")
    assert batch_diff < 1e-5, (name, batch_diff)

    # spread checks
    if spec["num_labels"] == 1:
        scores = [torch.sigmoid(s[2][0]).item() for s in singles]
        spread = max(scores) - min(scores)
        print(f"{name}: scores min {min(scores):.4f} max {max(scores):.4f} spread {spread:.4f}")
        assert spread >= 0.05, (name, "scores too close", scores)
    else:
        tops = []
        min_margin = 1.0
        for s in singles:
            p = torch.softmax(s[2], -1).sort(descending=True).values
            min_margin = min(min_margin, (p[0] - p[1]).item())
            tops.append(spec["labels"][int(s[2].argmax())])
        counts = {l: tops.count(l) for l in spec["labels"]}
        print(f"{name}: top-1 label counts {counts}, min top1-top2 prob margin {min_margin:.4f}")
        assert min_margin >= 0.01, (name, "top-1 margin too small", min_margin)
        assert len(set(tops)) > 1, (name, "all items have the same top-1 label", tops)

    # golden json
    golden = {
        "model_dir": name + "/",
        "architecture": spec["cls"].__name__,
        "generator": f"transformers {versions['transformers']} / torch {versions['torch']} / "
                     f"tokenizers {versions['tokenizers']}",
        "seed": spec["seed"],
    }
    if spec["labels"] is not None:
        golden["labels"] = spec["labels"]
    golden["texts"] = []
    golden["pairs"] = []
    for (kind, a, b, ids, tids), (mean, cls, logits) in zip(items, singles):
        if kind == "text":
            row = {"text": a, "input_ids": ids, "embedding_mean": r7(mean.tolist()),
                   "embedding_cls": r7(cls.tolist())}
            row.update(head_outputs(spec, logits))
            golden["texts"].append(row)
        else:
            row = {"query": a, "passage": b, "input_ids": ids,
                   "token_type_ids": model_type_ids(tids)}
            if model_type_ids(tids) != tids:
                row["tokenizer_type_ids"] = tids
            row.update(head_outputs(spec, logits))
            golden["pairs"].append(row)
    gpath = out_dir / f"{name}.json"
    with open(gpath, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
        f.write("\n")

    size = sum(p.stat().st_size for p in d.iterdir())
    return {
        "name": name, "dir_bytes": size, "json_bytes": gpath.stat().st_size, "vocab": vocab_size,
        "tensors": n_tensors, "batch_diff": batch_diff, "reload_diff": reload_diff, "files": sorted(p.name for p in d.iterdir()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "processor" / "tests" / "fixtures"))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                "python": sys.version.split()[0]}
    print("versions:", versions)

    toks = {"bert": make_wordpiece(), "roberta": make_byte_bpe(), "xlm-roberta": make_unigram()}
    results = []
    for spec in SPECS:
        raw_tok, hf_tok = toks[spec["kind"]]
        results.append(run_spec(spec, raw_tok, hf_tok, out_dir, versions))

    print()
    for r in results:
        print(f"{r['name']}/: {r['dir_bytes']} bytes ({', '.join(r['files'])}), vocab {r['vocab']}, "
              f"{r['tensors']} tensors; {r['name']}.json: {r['json_bytes']} bytes; "
              f"batch diff {r['batch_diff']:.3e}, reload diff {r['reload_diff']:.3e}")


if __name__ == "__main__":
    main()
