"""Training: `torchrun train/train.py --packing ...`."""
