"""Training data: LLaVA-format datasets with per-template label masking, packing, and the synthetic shapes set.

    from fastllava.data.dataset import SupervisedDataset, collate
    from fastllava.data.sampler import MicroBatchSampler
    python -m fastllava.data.synthetic --out DIR --seed 0 [--varied --n-robust 1000]

The embedded default model trained on the synthetic set is found by `fastllava.default_model.default_model_path()`;
`fastllava.data.asking` holds how people ask it (phrasings, order, suffixes) and its reply to everything else.
"""
