"""Datasets -> interaction tables, key-value records, samples, protocol splits, augmentation."""

from privrec.data.movielens import Dataset, Item, User, load_dataset
from privrec.data.samples import KV_FIELDS, Sample, Splits, View, augment, build_splits, sample_id, windows

__all__ = [
                                  "KV_FIELDS",
                                  "Dataset",
                                  "Item",
                                  "Sample",
                                  "Splits",
                                  "User",
                                  "View",
                                  "augment",
                                  "build_splits",
                                  "load_dataset",
                                  "sample_id",
                                  "windows",
]
