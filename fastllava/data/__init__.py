"""Training data: LLaVA-format datasets with per-template label masking, packing, and the synthetic shapes set.

    from fastllava.data.dataset import SupervisedDataset, collate
    from fastllava.data.sampler import MicroBatchSampler
    python -m fastllava.data.synthetic --out DIR --seed 0

The embedded default model trained on the synthetic set is found by `fastllava.default_model.default_model_path()`.
"""
