"""The LLaVA model: vision tower, projector, language model, and checkpoint loading."""
