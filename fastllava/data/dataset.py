"""LLaVA's supervised dataset, lazily loaded, with a bad-data policy, and its collation into packed batches.

    ds = SupervisedDataset("train.json", tokenizer, model.config, image_folder="images",
                           image_processor=proc, template="llava_v1", max_tokens=2048, on_bad_sample="error")
    ds.lengths[i], ds.is_multimodal[i]   # exact token counts (image slots included), known before training
    batch, n_targets = collate([ds[i] for i in bin], model.config)   # -> PackedBatch (+ target row index)

A first pass over the JSON tokenizes every conversation (text only: fast) to learn its exact packed length and
to find bad samples -- a missing image file, a conversation without a target, a tokenization mismatch, a sample
longer than the token budget. Each is reported with its index and ``id``; ``on_bad_sample="error"`` (default)
stops with the list, ``"skip"`` drops them and reports the counts. Images are decoded only in ``__getitem__``;
an image that fails to decode there is handled by the same policy (``None`` is returned and counted).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastllava.config import LlavaConfig
from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastllava.data.preprocess import SampleError, Tokenized, normalize_record, preprocess
from fastllava.image_io import ImageLoadError, load_image
from fastllava.mm_utils import process_images
from fastllava.packing import ImageInput, PackedBatch, image_token_count, pack, shifted_targets

log = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")


class BadDataError(ValueError):
    """Raised when bad samples are found and the policy is ``error``."""


@dataclass
class Sample:
    index: int
    input_ids: list[int]  # with IMAGE_TOKEN_INDEX placeholders
    labels: list[int]
    images: list[ImageInput]
    length: int  # packed length (image slots expanded)


@dataclass
class BadSample:
    index: int
    id: str
    kind: str  # missing_image | no_target | mismatch | too_long | format | image_decode
    message: str

    def __str__(self) -> str:
        return f"sample {self.index} (id={self.id!r}): {self.kind}: {self.message}"


@dataclass
class DataReport:
    n_total: int = 0
    bad: list[BadSample] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(b.kind for b in self.bad))

    def summary(self) -> str:
        if not self.bad:
            return f"{self.n_total} samples, none bad"
        shown = "\n  ".join(str(b) for b in self.bad[:10])
        more = f"\n  ... and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
        return f"{len(self.bad)} bad of {self.n_total} samples {self.counts}:\n  {shown}{more}"


def load_records(path: str | Path) -> list[dict]:
    """A LLaVA ``.json`` list or a ``.jsonl`` file (one record a line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    return data


class SupervisedDataset(torch.utils.data.Dataset):
    """LLaVA's ``LazySupervisedDataset``: records from JSON, images decoded on access, labels masked per
    template. Bad samples are found up front (see the module docstring); ``indices`` are the usable ones."""

    def __init__(
        self,
        data_path: str | Path | list[dict],
        tokenizer,
        config: LlavaConfig,
        image_folder: str | Path | None = None,
        image_processor=None,
        template: str = "llava_v1",
        max_tokens: int | None = None,
        on_bad_sample: str = "error",
        image_aspect_ratio: str | None = None,
        mm_use_im_start_end: bool = False,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        self.records = data_path if isinstance(data_path, list) else load_records(data_path)
        self.tokenizer = tokenizer
        self.config = config
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.image_processor = image_processor
        self.template = template
        self.max_tokens = max_tokens
        self.policy = on_bad_sample
        self.image_aspect_ratio = image_aspect_ratio or config.image_aspect_ratio
        self.mm_use_im_start_end = mm_use_im_start_end
        self.report = DataReport(n_total=len(self.records))
        self.runtime_bad: Counter = Counter()
        self.lengths: list[int] = [0] * len(self.records)
        self.n_targets: list[int] = [0] * len(self.records)
        self.is_multimodal: list[bool] = [False] * len(self.records)
        self._scan()

    # ---------------------------------------------------------------- the up-front pass

    def _sample_id(self, i: int) -> str:
        rec = self.records[i]
        return str(rec.get("id", i)) if isinstance(rec, dict) else str(i)

    def _image_path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() or self.image_folder is None else self.image_folder / p

    def _tokenize(self, i: int) -> tuple[Tokenized, list[str]]:
        turns, images, system = normalize_record(self.records[i])
        tok = preprocess(
            turns,
            self.tokenizer,
            self.template,
            bool(images),
            system=system,
            mm_use_im_start_end=self.mm_use_im_start_end,
            keep_image_position=bool(self.records[i].get("keep_image_position", False)),
        )
        n_placeholders = sum(1 for t in tok.input_ids if t == IMAGE_TOKEN_INDEX)
        if n_placeholders != len(images):
            raise SampleError(
                "format", f"{len(images)} image(s) but {n_placeholders} <image> placeholder(s) in the text"
            )
        return tok, images

    def _image_tokens(self, path: Path) -> int:
        if not self.config.is_anyres:
            return self.config.tokens_per_tile
        from PIL import Image

        with Image.open(path) as im:  # header only: the anyres token count depends on the size
            w, h = im.size
        return image_token_count(self.config, (h, w))

    def _scan(self) -> None:
        usable = []
        for i in range(len(self.records)):
            try:
                tok, images = self._tokenize(i)
                n_img_tokens = 0
                for name in images:
                    path = self._image_path(name)
                    if not path.is_file():
                        raise SampleError("missing_image", f"image file {str(path)!r} does not exist")
                    n_img_tokens += self._image_tokens(path)
                length = len(tok.input_ids) - len(images) + n_img_tokens
                if self.max_tokens is not None and length > self.max_tokens:
                    raise SampleError(
                        "too_long", f"{length} tokens (image slots included) exceed the budget of {self.max_tokens}"
                    )
            except SampleError as exc:
                self.report.bad.append(BadSample(i, self._sample_id(i), exc.kind, str(exc)))
                continue
            except (KeyError, TypeError, AttributeError) as exc:
                self.report.bad.append(BadSample(i, self._sample_id(i), "format", f"malformed record: {exc!r}"))
                continue
            self.lengths[i] = length
            self.n_targets[i] = tok.n_targets
            self.is_multimodal[i] = bool(images)
            usable.append(i)
        self.indices = usable
        if self.report.bad:
            if self.policy == "error":
                raise BadDataError(
                    self.report.summary()
                    + "\n(pass --on_bad_sample skip to drop them and train on the rest; the counts are reported)"
                )
            log.warning("skipping bad samples: %s", self.report.summary())
        if not usable:
            raise BadDataError(f"no usable samples in the data ({self.report.summary()})")

    # ---------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample | None:
        """The sample with decoded images; ``None`` (counted) when an image fails to decode under ``skip``."""
        tok, names = self._tokenize(i)
        inputs: list[ImageInput] = []
        if names:
            try:
                pil = [load_image(str(self._image_path(n))) for n in names]
            except (ImageLoadError, OSError) as exc:
                bad = BadSample(i, self._sample_id(i), "image_decode", str(exc))
                if self.policy == "error":
                    raise BadDataError(str(bad)) from exc
                self.runtime_bad["image_decode"] += 1
                log.warning("skipping %s", bad)
                return None
            aspect = type("Cfg", (), {"image_aspect_ratio": self.image_aspect_ratio})()
            if self.config.is_anyres:
                aspect.image_grid_pinpoints = self.config.image_grid_pinpoints
            pixels = process_images(pil, self.image_processor, aspect)
            for im, px in zip(pil, pixels, strict=True):
                inputs.append(ImageInput(px if px.dim() == 4 else px.unsqueeze(0), (im.height, im.width)))
        return Sample(i, tok.input_ids, tok.labels, inputs, self.lengths[i])


# ------------------------------------------------------------------------------------ collation


@dataclass
class TrainBatch:
    """One micro-batch: the packed model input and the stream rows whose next-token target is real."""

    packed: PackedBatch
    target_rows: torch.Tensor  # (N,) rows of the stream with a target
    targets: torch.Tensor  # (N,) their target token ids
    n_targets: int
    n_tokens: int  # tokens run through the model (padding included when padded)
    sample_indices: list[int]


def collate(
    samples: list[Sample | None], config: LlavaConfig, pad_to: int | None = None, pad_id: int = 0
) -> TrainBatch | None:
    """Pack samples into one ``TrainBatch``. ``pad_to`` (padded baseline): every sequence is right-padded with
    ``pad_id`` to that many tokens (labels IGNORE), as a padded [B, L] batch would run; causal attention keeps
    real tokens from seeing the padding, so losses equal the packed ones. ``None`` when no sample is left."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    seqs, labels, images = [], [], []
    for s in samples:
        ids, lab = list(s.input_ids), list(s.labels)
        if pad_to is not None and s.length < pad_to:
            extra = pad_to - s.length
            ids += [pad_id] * extra
            lab += [IGNORE_INDEX] * extra
        seqs.append(ids)
        labels.append(lab)
        images.append(s.images)
    packed = pack(seqs, images, config, labels=labels)
    targets = shifted_targets(packed.labels, packed.cu_seqlens)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return TrainBatch(
        packed=packed,
        target_rows=rows,
        targets=targets[rows],
        n_targets=int(rows.numel()),
        n_tokens=packed.num_tokens,
        sample_indices=[s.index for s in samples],
    )
