"""The plain types the data modules pass between them: a tokenized sample and a task's report.

Encoding makes both, assembly and batching read them; they live apart so that those modules need
not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n], 1 where the token is a training target
    task_id: int


@dataclass
class TaskReport:
    path: str = ""
    formats: dict[str, int] = field(default_factory=dict)  # usable records per detected format
    records: int = 0  # read, good and bad
    bad_records: int = 0  # unreadable, or found bad when rendering the train or valid split
    train_records: int = 0  # parsed records per split (rendering may still find some bad)
    valid_records: int = 0
    test_records: int = 0
    dropped_overlength: int = 0  # of the train and valid splits
    truncated: int = 0  # of the train and valid splits
    train_samples: int = 0
    valid_samples: int = 0
    test_samples: int = 0
    weight: float = 1.0
    epoch_samples: int = 0  # train samples drawn per epoch, after the sampling weight
    tokens: int = 0  # of the train and valid samples
    supervised_tokens: int = 0
    fill_rate: float | None = None  # pack and concat: train tokens / the row capacity they take (see packing)
    bad_examples: list[str] = field(default_factory=list)
    dropped_examples: list[str] = field(default_factory=list)
    truncated_examples: list[str] = field(default_factory=list)
    # The test split is counted apart, so that the counts above, those of the data training uses, are
    # the same with or without one.
    test_bad: int = 0
    test_dropped: int = 0
    test_truncated: int = 0
