"""Datasets: the users' folder format, the built-in synthetic set and the public toy set.

    epure data synth --out data/synth --n 200 && epure data check data/synth
"""

from epure.data.dataset import ConditionNormalizer, DatasetError, Split, load_split
from epure.data.sources import DataBundle, load_data, resolve_root

__all__ = ["ConditionNormalizer", "DataBundle", "DatasetError", "Split", "load_data", "load_split", "resolve_root"]
