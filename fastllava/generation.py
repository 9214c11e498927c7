"""``model.generate(...)``: LLaVA's and transformers' padded generate, a thin adapter over the engine.

As vLLM's ``LLM.generate`` is over ``LLMEngine``: the padded batch is split into one request per row (masked
columns dropped, images given to rows in order: ``LlavaModel.split_padded``), every request is queued at once
in an engine sized for this call (all prompts prefill in the first step, the KV cache holds every row to its
last token, so nothing is chunked or preempted and every running row decodes one token per step), and the
engine runs to completion. The decode itself (paged KV cache, batched decode, sampling) is the engine's.

What transformers' loop does between steps and the engine does not is done here, per step: ``streamer.put`` of
one token per row, stop strings (LLaVA's ``KeywordsStoppingCriteria`` rule) and ``stopping_criteria``; a row
they stop is aborted in the engine. Rows that finished are padded with ``pad_token_id`` in the output.

The model package never imports the engine (it sits above the model); importing ``fastllava`` installs this
module's ``llava_generate`` as ``LlavaModel.generate``.
"""

from __future__ import annotations

import math

import torch

from fastllava.engine import EngineConfig, EngineImage, LLMEngine, SamplingParams
from fastllava.mm_utils import StopStrings
from fastllava.model.llava import LlavaModel
from fastllava.packing import ImageInput, expand_image_tokens, image_token_count


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    """transformers' order: the argument, else the tokenizer's EOS, else the model config's; ``[]``: none."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos_token_id is None:
            eos_token_id = model.config.text.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def engine_for(
    model, prompts: list[list[int]], images: list[list[ImageInput]], max_new_tokens: int, block_size: int = 16
) -> LLMEngine:
    """An engine sized for one static batch (``prompts`` with image placeholders, each one's ``images``): every
    prompt prefills in one step, the KV cache holds every row's prompt + ``max_new_tokens`` (no preemption), no
    prefix cache and no CUDA graphs (built for one call), no overlap (outputs arrive in the step that sampled
    them)."""
    cfg = model.config
    counts = [[image_token_count(cfg, im.size_hw) for im in imgs] for imgs in images]
    lens = [len(expand_image_tokens(ids, c, cfg.image_token_index)[0]) for ids, c in zip(prompts, counts, strict=True)]
    config = EngineConfig(
        block_size=block_size,
        num_blocks=sum(math.ceil((n + max_new_tokens) / block_size) for n in lens),
        max_num_seqs=len(lens),
        max_num_batched_tokens=max(sum(lens), 1),
        max_waiting_requests=len(lens),
        max_waiting_tokens=max(sum(lens), 1),
        enable_prefix_caching=False,
        encoder_cache_rows=max(sum(map(sum, counts)), 1),
        # transformers' generate does not stop at the context length either
        max_model_len=max(cfg.text.max_position_embeddings, max(lens) + max_new_tokens),
        cuda_graphs=False,
        overlap_scheduling=False,
    )
    return LLMEngine(model, None, config)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    images=None,
    image_sizes=None,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    streamer=None,
    num_beams: int = 1,
    block_size: int = 16,
    pixel_values=None,
    stopping_criteria=None,
    **unused,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` for every prompt of a padded batch; returns the new ids ``[B, n]``
    (rows that finished early are padded with ``pad_token_id``, default the first EOS id or 0).

    Stops a row at EOS or when its decoded text contains one of ``stop_strings`` (needs ``tokenizer``).
    ``temperature == 0`` or ``do_sample=False`` is greedy; ``seed`` (default: drawn from torch's generator, so
    ``torch.manual_seed`` makes a call reproducible) seeds every row. ``images`` + ``image_sizes`` as (W, H) is
    LLaVA's call, ``pixel_values`` + (H, W) transformers'. ``stopping_criteria`` (transformers' / LLaVA's
    ``KeywordsStoppingCriteria``) are called as transformers calls them: with prompt + generated ids
    ``[B, L + n]`` and the step's logits ``[B, V]`` (zeros for rows that finished), returning a bool or a ``[B]``
    bool tensor. ``streamer`` gets ``put(prompt ids)``, ``put(token [B])`` per step and ``end()``, as
    transformers' streamers expect. ``use_cache``, ``position_ids`` and the other keywords transformers' generate
    takes are ignored; ``num_beams`` other than 1 is an error (beam search is not supported).
    """
    if num_beams != 1:
        raise ValueError("beam search is not supported; use num_beams=1 (LLaVA's default)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to decode the generated text")
    rows = model.split_padded(input_ids, attention_mask, images, image_sizes, pixel_values=pixel_values)
    B = len(rows.ids)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    greedy = not do_sample or temperature == 0
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=0.0 if greedy else float(temperature),
        top_p=float(top_p) if top_p is not None else 1.0,
        top_k=int(top_k) if top_k else 0,
        seed=int(seed),
        stop_token_ids=eos,
    )
    was_training = model.training
    engine = engine_for(model, rows.ids, rows.images, max_new_tokens, block_size)
    engine.runner.keep_logits = bool(stopping_criteria)
    for b, (ids, imgs) in enumerate(zip(rows.ids, rows.images, strict=True)):
        # content hashes need only tell this call's images apart (the engine lives for this call)
        images_b = [EngineImage(im.pixel_values, im.size_hw, f"{b}.{j}") for j, im in enumerate(imgs)]
        engine.add_request(str(b), ids, images_b, params)
    try:
        out = _run(engine, input_ids, B, pad, stop_strings, tokenizer, streamer, stopping_criteria)
    finally:
        model.train(was_training)  # the engine puts the model in eval mode
    return torch.tensor(out, dtype=torch.long, device=model.device).T.contiguous()  # (B, n)


def _run(engine: LLMEngine, input_ids, B: int, pad: int, stop_strings, tokenizer, streamer, stopping_criteria):
    """Step the engine to completion; returns the columns of new ids (one per step, ``pad`` for finished rows)."""
    device = engine.model.device
    stops = StopStrings(stop_strings, tokenizer) if stop_strings else None
    finished = [False] * B
    columns: list[list[int]] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if len(outputs) != finished.count(False):  # engine_for's sizing keeps the rows in lockstep
            raise RuntimeError(f"{len(outputs)} rows produced a token for {finished.count(False)} running rows")
        column = [pad] * B
        for o in outputs:
            b = int(o.request_id)
            column[b] = o.new_token_ids[0]
            finished[b] = o.finished
        columns.append(column)
        if streamer is not None:
            streamer.put(torch.tensor(column))
        stop = [False] * B
        if stops is not None:  # decodes a short tail per row
            stop = [not finished[b] and stops.check([c[b] for c in columns]) for b in range(B)]
        if stopping_criteria:
            full = torch.cat([input_ids.to(device), torch.tensor(columns, device=device).T], 1)  # (B, L + n)
            scores = _step_logits(engine, B)
            for criterion in stopping_criteria:
                hit = torch.as_tensor(criterion(full, scores), dtype=torch.bool).expand(B).tolist()
                stop = [s or h for s, h in zip(stop, hit, strict=True)]
        for b in range(B):
            if stop[b] and not finished[b]:
                engine.abort_request(str(b))
                finished[b] = True
    if streamer is not None:
        streamer.end()
    return columns


def _step_logits(engine: LLMEngine, B: int) -> torch.Tensor:
    """The last step's logits ``[B, V]`` in row order (zeros for rows that did not run)."""
    requests, logits = engine.runner.last_logits
    scores = logits.new_zeros(B, logits.shape[-1])
    scores[[int(r.request_id) for r in requests]] = logits
    return scores


def llava_generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs) -> torch.Tensor:
    """Generate new tokens; returns only the new ids ``[B, n]`` (LLaVA passes embeddings to HF ``generate``, so it
    too returns only new tokens). ``inputs`` is LLaVA's name for the prompt ids (``input_ids=`` works too). See
    ``fastllava.generation.generate`` for the keywords."""
    if inputs is None:
        inputs = kwargs.pop("input_ids", None)
    if inputs is None:
        raise ValueError("generate needs the prompt ids (inputs= or input_ids=); inputs_embeds is not supported")
    return generate(self, inputs, images=images, image_sizes=image_sizes, **kwargs)


LlavaModel.generate = llava_generate
