"""Submission files: MMBench (``.xlsx`` for the OpenCompass server) and SEED-Bench (jsonl + local accuracy).

    python -m eval.submission mmbench --annotation-file mmbench_dev_20230712.tsv --result-file answers.jsonl \
        --output answers_upload/llava.xlsx
    python -m eval.submission seed --annotation-file SEED-Bench.json --result-file merge.jsonl \
        --output answers_upload/llava.jsonl

MMBench (LLaVA's ``convert_mmbench_for_submission.py``): the annotation table without ``hint, category, source,
image, comment, l2-category``, with a ``prediction`` column inserted as the 7th; the round-0 answer of each index
is its prediction. The workbook is written with the standard library (no openpyxl needed).

SEED (``convert_seed_for_submission.py``): accuracy per question type, overall and per data type (image / video)
by exact match of the answer text with the letter; the upload file has one ``{"question_id", "prediction"}`` per
question.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

from .answers import read_jsonl

MMBENCH_DROP = ("hint", "category", "source", "image", "comment", "l2-category")


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a tab-separated file with a header (MMBench's cells hold whole base64 images)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ----------------------------------------------------------------------------------------------- xlsx
_ILLEGAL_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _col(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def _cell(ref: str, value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<c r="{ref}"><v>{value}</v></c>'
    text = escape(_ILLEGAL_XML.sub("", "" if value is None else str(value)))
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def write_xlsx(path: str | Path, header: list[str], rows: list[list]) -> None:
    """A one-sheet workbook (inline strings, numbers as numbers)."""
    sheet_rows = []
    for r, row in enumerate([header, *rows], start=1):
        cells = "".join(_cell(f"{_col(c)}{r}", v) for c, v in enumerate(row))
        sheet_rows.append(f'<row r="{r}">{cells}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    files = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            "</Types>"
        ),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
        ),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook {ns} xmlns:r="{rel}">'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
        ),
        "xl/_rels/workbook.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
        ),
        "xl/worksheets/sheet1.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet {ns}><sheetData>'
            + "".join(sheet_rows)
            + "</sheetData></worksheet>"
        ),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)


def read_xlsx(path: str | Path) -> list[list[str]]:
    """Cell texts of the first sheet of a workbook written by ``write_xlsx`` (for checks and tests)."""
    import xml.etree.ElementTree as ET

    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(path) as z:
        root = ET.fromstring(z.read("xl/worksheets/sheet1.xml"))
    out = []
    for row in root.iterfind(".//m:row", ns):
        vals = []
        for c in row.iterfind("m:c", ns):
            t = c.find(".//m:t", ns)
            v = c.find("m:v", ns)
            vals.append(t.text or "" if t is not None else (v.text if v is not None else ""))
        out.append(vals)
    return out


# -------------------------------------------------------------------------------------------- MMBench
def mmbench_submission(annotation_file: str | Path, result_file: str | Path, output: str | Path) -> int:
    """Write the MMBench upload workbook; returns how many rows have a prediction."""
    rows = read_tsv(annotation_file)
    header = [h for h in rows[0] if h not in MMBENCH_DROP] if rows else []
    header.insert(6, "prediction")
    preds: dict[str, str] = {}
    for a in read_jsonl(result_file):
        if a.get("round_id", 0) == 0:
            preds[str(a["question_id"])] = a["text"]
    out_rows = []
    for r in rows:
        vals = []
        for h in header:
            if h == "prediction":
                vals.append(preds.get(str(r["index"])))
            elif h == "index":
                vals.append(int(r[h]) if r[h].lstrip("-").isdigit() else r[h])
            else:
                vals.append(r[h])
        out_rows.append(vals)
    write_xlsx(output, header, out_rows)
    return sum(str(r["index"]) in preds for r in rows)


# ----------------------------------------------------------------------------------------------- SEED
def _qid(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return x


def seed_scores(data: dict, results: dict, data_type: str | None = None) -> dict:
    """Accuracy (%) per question type name, and in total, over ``data["questions"]`` of ``data_type``."""
    names = {v: k for k, v in data["question_type"].items()}
    counts: dict[int, int] = {}
    right: dict[int, int] = {}
    for q in data["questions"]:
        if data_type is not None and q.get("data_type") != data_type:
            continue
        t = q["question_type_id"]
        counts[t] = counts.get(t, 0) + 1
        r = results.get(_qid(q["question_id"]))
        right[t] = right.get(t, 0) + int(r is not None and r["text"] == q["answer"])
    per_type = {names.get(t, str(t)): 100.0 * right[t] / counts[t] for t in sorted(counts)}
    total = sum(counts.values())
    return {"per_type": per_type, "accuracy": 100.0 * sum(right.values()) / total if total else 0.0, "count": total}


def seed_submission(annotation_file: str | Path, result_file: str | Path, output: str | Path) -> dict:
    data = json.loads(Path(annotation_file).read_text())
    results = {_qid(r["question_id"]): r for r in read_jsonl(result_file)}
    summary = {"benchmark": "seed", **seed_scores(data, results)}
    summary["image"] = seed_scores(data, results, "image")["accuracy"]
    summary["video"] = seed_scores(data, results, "video")["accuracy"]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for q in data["questions"]:
            r = results.get(_qid(q["question_id"]))
            f.write(json.dumps({"question_id": q["question_id"], "prediction": r["text"] if r else ""}) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("mmbench", "seed"))
    p.add_argument("--annotation-file", required=True)
    p.add_argument("--result-file", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--metrics", default=None, help="seed: also write the accuracies as JSON here")
    a = p.parse_args(argv)
    if a.task == "mmbench":
        n = mmbench_submission(a.annotation_file, a.result_file, a.output)
        print(f"wrote {a.output} ({n} predictions)")
    else:
        s = seed_submission(a.annotation_file, a.result_file, a.output)
        for name, acc in s["per_type"].items():
            print(f"{name}: {acc:.2f}%")
        print(f"Total accuracy: {s['accuracy']:.2f}%")
        print(f"image accuracy: {s['image']:.2f}%\nvideo accuracy: {s['video']:.2f}%")
        if a.metrics:
            Path(a.metrics).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
