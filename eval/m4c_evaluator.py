"""LLaVA's ``llava/eval/m4c_evaluator.py`` names (from MMF), over ``eval.vqa_eval``'s one implementation of the
EvalAI answer processor and the 10-annotator accuracy.

    from eval.m4c_evaluator import TextVQAAccuracyEvaluator
    acc = TextVQAAccuracyEvaluator().eval_pred_list([{"pred_answer": "two", "gt_answers": [...10 answers]}])

``TextCapsBleu4Evaluator`` needs ``pycocoevalcap`` (and Java), as LLaVA's does; it is checked when built.
Difference from LLaVA: ``TextVQAAccuracyEvaluator`` does not assert exactly 10 human answers (the leave-one-out
mean is defined for any number; with 10, the scores are LLaVA's).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastllava.optional import HAS_PYCOCOEVALCAP

from .vqa_eval import answer_scores, normalize_answer


class EvalAIAnswerProcessor:
    """``processor(answer)`` -> the normalised answer (``eval.vqa_eval.normalize_answer``)."""

    def __call__(self, item: str) -> str:
        return normalize_answer(item)

    def word_tokenize(self, word: str) -> str:
        return word.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def _mean(scores: list[float]) -> float:
    return sum(scores) / len(scores)


class TextVQAAccuracyEvaluator:
    """Mean soft accuracy (a fraction, not %) of ``[{"pred_answer", "gt_answers"}]``."""

    def __init__(self) -> None:
        self.answer_processor = EvalAIAnswerProcessor()

    def _compute_answer_scores(self, raw_answers: Sequence[str]) -> dict[str, float]:
        return answer_scores(raw_answers)

    def eval_pred_list(self, pred_list: list[dict]) -> float:
        return _mean([answer_scores(e["gt_answers"]).get(normalize_answer(e["pred_answer"]), 0.0) for e in pred_list])


class STVQAAccuracyEvaluator:
    """Exact match of the normalised prediction with any normalised human answer."""

    def __init__(self) -> None:
        self.answer_processor = EvalAIAnswerProcessor()

    def eval_pred_list(self, pred_list: list[dict]) -> float:
        return _mean(
            [
                float(normalize_answer(e["pred_answer"]) in {normalize_answer(a) for a in e["gt_answers"]})
                for e in pred_list
            ]
        )


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (what LLaVA takes from the ``editdistance`` package)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class STVQAANLSEvaluator:
    """ANLS: per question the best ``1 - edit distance / longer length`` over the human answers, 0 below 0.5."""

    def get_edit_distance(self, s1: str, s2: str) -> int:
        return edit_distance(s1, s2)

    def get_anls(self, s1: str, s2: str) -> float:
        s1, s2 = s1.lower().strip(), s2.lower().strip()
        iou = 1 - self.get_edit_distance(s1, s2) / max(len(s1), len(s2))
        return iou if iou >= 0.5 else 0.0

    def eval_pred_list(self, pred_list: list[dict]) -> float:
        return _mean([max(self.get_anls(e["pred_answer"], gt) for gt in e["gt_answers"]) for e in pred_list])


class TextCapsBleu4Evaluator:
    """BLEU-4 of the predictions against the human captions, through ``pycocoevalcap`` (PTB tokenizer, Java)."""

    def __init__(self) -> None:
        if not HAS_PYCOCOEVALCAP:
            raise ImportError(
                "TextCapsBleu4Evaluator needs pycocoevalcap and Java: "
                "pip install git+https://github.com/ronghanghu/coco-caption.git@python23"
            )
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self.tokenizer = PTBTokenizer()
        self.scorer = Bleu(4)

    def eval_pred_list(self, pred_list: list[dict]) -> float:
        gts = {i: [{"caption": a} for a in e["gt_answers"]] for i, e in enumerate(pred_list)}
        res = {i: [{"caption": e["pred_answer"]}] for i, e in enumerate(pred_list)}
        score, _ = self.scorer.compute_score(self.tokenizer.tokenize(gts), self.tokenizer.tokenize(res))
        return score[3]
