"""Evaluation: LLaVA's benchmark runners and scorers, with LLaVA's file formats, answered in batches.

Runners (LLaVA's arguments, answers jsonl out; resumable, chunked, batched through the engine):
    python -m eval.model_vqa | model_vqa_loader | model_vqa_science | model_vqa_mmbench  --model-path DIR ...
    python -m eval.answers merge --output merge.jsonl chunk_0.jsonl chunk_1.jsonl ...
    python -m eval.embedded [--model-path DIR | --server-url URL]   # the held-out synthetic split, scored

Scorers: ``eval.pope``, ``eval.science_qa``, ``eval.vqa_eval`` (TextVQA, VQAv2), ``eval.gqa``, ``eval.mme``,
``eval.submission`` (MMBench xlsx, SEED), ``eval.gpt_review`` (LLaVA-Bench, MM-Vet; any OpenAI-compatible judge).
Results: ``eval.summary`` (markdown/JSON table per run, a chart comparing runs).

Modules: ``answers`` (answers files, chunks, resume, merge), ``questions`` (the three question formats),
``runner`` (``answer_all`` and its engine / generate / server backends).
"""
