"""VQA-style answer normalisation and the 10-annotator accuracy (TextVQA, VQAv2, VizWiz), as LLaVA scores them.

    python -m eval.vqa_eval textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers.jsonl
    python -m eval.vqa_eval vqav2 --annotation-file v2_mscoco_val2014_annotations.json --result-file answers.jsonl
    python -m eval.vqa_eval vqav2-submission --question-file llava_vqav2_mscoco_test2015.jsonl \
        --result-file merge.jsonl --output answers_upload/test.json

``normalize_answer`` is the EvalAI answer processor (the one in LLaVA's ``m4c_evaluator.py``, from MMF): lower
case, ``,``/``?`` dropped, ``'s`` split off, punctuation removed or spaced, periods not inside numbers stripped,
number words to digits, articles dropped, missing apostrophes of contractions restored. Its quirks are kept on
purpose (published numbers depend on them): the period pattern's ``(?!<=\\d)`` is a lookahead, not the
lookbehind it was meant to be, and ``re.UNICODE`` lands in ``sub``'s *count* slot, so at most 32 periods go.

The accuracy of an answer against 10 human answers is the mean, over the 10 ways of leaving one annotator out,
of ``min(1, #matching remaining annotators / 3)``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .answers import read_jsonl

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=digit", i.e. no lookbehind at all
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # removed when it touches a space (or the text has a digit,digit), else turned into a space
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: count=re.UNICODE (32), as in the EvalAI code


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The EvalAI/MMF answer processor (``EvalAIAnswerProcessor.__call__``)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Score of every distinct (normalised) human answer: the leave-one-annotator-out mean of min(1, n/3)."""
    answers = [normalize_answer(a) for a in gt_answers]
    scores = {}
    for cand in set(answers):
        accs = []
        for left_out in range(len(answers)):
            n = sum(1 for j, a in enumerate(answers) if j != left_out and a == cand)
            accs.append(min(1.0, n / 3))
        scores[cand] = sum(accs) / len(accs)
    return scores


def vqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers (0 when it matches none)."""
    return answer_scores(gt_answers).get(normalize_answer(pred), 0.0)


def mean_accuracy(pairs: Iterable[tuple[str, Sequence[str]]]) -> tuple[float, int]:
    """(accuracy in %, number of questions) over (prediction, human answers) pairs."""
    scores = [vqa_accuracy(p, gts) for p, gts in pairs]
    if not scores:
        raise ValueError("no answers to score")
    return 100.0 * sum(scores) / len(scores), len(scores)


# ------------------------------------------------------------------------------------------------- TextVQA
def textvqa_question_from_prompt(prompt: str) -> str:
    """The question inside a TextVQA prompt, as LLaVA's ``eval_textvqa.prompt_processor`` finds it."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError(f"cannot find the question in OCR prompt {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"unrecognised TextVQA prompt layout: {prompt!r}")
    return question.lower()


def score_textvqa(annotation_file: str | Path, result_file: str | Path) -> dict:
    """TextVQA accuracy: answers are matched to annotations by (image id, question text from the prompt)."""
    data = json.loads(Path(annotation_file).read_text())["data"]
    by_key = {(a["image_id"], a["question"].lower()): a for a in data}
    pairs = []
    for r in read_jsonl(result_file):
        ann = by_key[(r["question_id"], textvqa_question_from_prompt(r["prompt"]))]
        pairs.append((r["text"], ann["answers"]))
    acc, n = mean_accuracy(pairs)
    return {"benchmark": "textvqa", "samples": n, "accuracy": acc}


# --------------------------------------------------------------------------------------------------- VQAv2
def score_vqav2(annotation_file: str | Path, result_file: str | Path) -> dict:
    """VQAv2 (val / test-dev style annotations ``{"annotations": [{"question_id", "answer_type", "answers"}]}``):
    overall accuracy and accuracy per answer type (yes/no, number, other). Missing answers count as wrong."""
    anns = {a["question_id"]: a for a in json.loads(Path(annotation_file).read_text())["annotations"]}
    preds = {r["question_id"]: r["text"] for r in read_jsonl(result_file)}
    per_type: dict[str, list[float]] = {}
    scores = []
    for qid, ann in anns.items():
        gts = [a["answer"] if isinstance(a, dict) else a for a in ann["answers"]]
        s = vqa_accuracy(preds.get(qid, ""), gts) if qid in preds else 0.0
        scores.append(s)
        per_type.setdefault(ann.get("answer_type", "all"), []).append(s)
    out = {"benchmark": "vqav2", "samples": len(scores), "accuracy": 100.0 * sum(scores) / len(scores)}
    out["per_answer_type"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_type.items())}
    return out


def vqav2_submission(question_file: str | Path, result_file: str | Path, output: str | Path) -> dict:
    """EvalAI upload file (LLaVA's ``convert_vqav2_for_submission``): every test question, its processed answer
    or ``""`` when it has none. Unparseable answer lines are counted and skipped."""
    results, errors = {}, 0
    for line in Path(result_file).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            errors += 1
            continue
        results[r["question_id"]] = r["text"]
    split = read_jsonl(question_file)
    upload = [
        {"question_id": q["question_id"], "answer": normalize_answer(results[q["question_id"]])}
        if q["question_id"] in results
        else {"question_id": q["question_id"], "answer": ""}
        for q in split
    ]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(upload))
    return {"results": len(results), "split": len(split), "error_lines": errors}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("textvqa", "vqav2", "vqav2-submission"))
    p.add_argument("--annotation-file")
    p.add_argument("--question-file")
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", help="vqav2-submission: the upload file")
    p.add_argument("--metrics", default=None, help="also write the metrics as JSON here (for eval.summary)")
    a = p.parse_args(argv)
    if a.task == "textvqa":
        r = score_textvqa(a.annotation_file, a.result_file)
        print(f"Samples: {r['samples']}\nAccuracy: {r['accuracy']:.2f}%")
    elif a.task == "vqav2":
        r = score_vqav2(a.annotation_file, a.result_file)
        print(json.dumps(r, indent=1))
    else:
        r = vqav2_submission(a.question_file, a.result_file, a.output)
        print(f"total results: {r['results']}, total split: {r['split']}, error_line: {r['error_lines']}")
        return
    if a.metrics:
        Path(a.metrics).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
