"""Datasets -> interaction tables, key-value records, samples, protocol splits, augmentation."""

from privrec.data.movielens import Dataset, load_dataset
from privrec.data.ranking import RankingSample, RankingSplits, build_ranking_splits, like_splits
from privrec.data.records import MOVIELENS, FieldInfo, Item, RecordSchema, User
from privrec.data.samples import KV_FIELDS, Sample, Splits, View, augment, build_splits, sample_id, windows
from privrec.data.stats import ItemStats

__all__ = [
    "KV_FIELDS",
    "MOVIELENS",
    "FieldInfo",
    "RecordSchema",
    "Dataset",
    "Item",
    "ItemStats",
    "RankingSample",
    "RankingSplits",
    "Sample",
    "Splits",
    "User",
    "View",
    "augment",
    "build_ranking_splits",
    "build_splits",
    "like_splits",
    "load_dataset",
    "sample_id",
    "windows",
]
