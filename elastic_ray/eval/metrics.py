"""The scores: corpus perplexity, ROUGE-L F1 (the `rouge-score` package), and task accuracy."""

import math

from rouge_score import rouge_scorer

from elastic_ray.data.shapes import answer_match, caption_exact_match, object_f1

_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def perplexity(logprobs: list[list[float]]) -> float:
    """Corpus-level: exp of the mean negative log-likelihood over every token of every sample."""
    tokens = [lp for sample in logprobs for lp in sample]
    if not tokens:
        raise ValueError("perplexity of no tokens")
    return math.exp(-sum(tokens) / len(tokens))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 of each prediction against its reference."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("rouge_l needs equally many predictions and references, at least one")
    return sum(_ROUGE.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)) / len(predictions)


def shapes_accuracy(kinds: list[str], predictions: list[str], references: list[str]) -> dict:
    """Scores against the shapes ground truth: caption exact match and object F1 on captions,
    exact match on descriptions (demo-v2), answer accuracy on questions, and `accuracy`, the share
    of samples answered exactly."""
    def of(kind: str) -> list[tuple[str, str]]:
        return [(p, r) for k, p, r in zip(kinds, predictions, references) if k == kind]

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    captions, descriptions, answers = of("caption"), of("description"), of("vqa")
    exact = {kind: [caption_exact_match(p, r) for p, r in pairs]
             for kind, pairs in (("caption", captions), ("description", descriptions))}
    exact["vqa"] = [answer_match(p, r) for p, r in answers]
    scores = {
        "accuracy": mean([hit for hits in exact.values() for hit in hits]),
        "caption_exact_match": mean(exact["caption"]),
        "object_f1": mean([object_f1(p, r) for p, r in captions]),
        "vqa_accuracy": mean(exact["vqa"]),
    }
    if descriptions:
        scores["description_exact_match"] = mean(exact["description"])
    return scores
