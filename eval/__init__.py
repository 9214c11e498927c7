"""Evaluation: LLaVA benchmark runners and scorers (`python -m eval.model_vqa ...`)."""
