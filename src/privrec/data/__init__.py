"""Datasets -> interaction tables, key-value records, samples, protocol splits, augmentation."""

from privrec.data.movielens import Dataset, Item, User, load_dataset
from privrec.data.samples import (KV_FIELDS, Sample, Splits, View, augment, build_splits, sample_id,
                                  windows)

__all__ = ["Dataset", "Item", "User", "load_dataset", "KV_FIELDS", "Sample", "Splits", "View", "augment",
           "build_splits", "sample_id", "windows"]
