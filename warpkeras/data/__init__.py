"""Task distributions and data pipelines.

* :mod:`warpkeras.data.omniglot` - multi-shot Omniglot (one 20-way task per alphabet).
* :mod:`warpkeras.data.episodes` - few-shot N-way K-shot episodes from labelled arrays.
* :mod:`warpkeras.data.synthetic` - sine, continual sine and 2-D loss-surface tasks.
* :mod:`warpkeras.data.tasks` - :class:`ClassificationTask`, the common task container.
* :mod:`warpkeras.data.augment` - seeded random affine augmentation in TensorFlow ops.
"""

from warpkeras.data._cache import CorruptFileError, default_cache_dir, default_data_dir
from warpkeras.data.augment import affine_transform, random_affine
from warpkeras.data.episodes import Episode, EpisodeSampler, load_image_folder, rotate_classes
from warpkeras.data.omniglot import (
    OmniglotData,
    OmniglotNotFoundError,
    OmniglotTasks,
    default_omniglot_dir,
    load_omniglot,
)
from warpkeras.data.synthetic import (
    ContinualSineDistribution,
    ContinualSineTask,
    LossSurface,
    LossSurfaceDistribution,
    SineTask,
    SineTaskDistribution,
)
from warpkeras.data.tasks import ClassificationTask

__all__ = [
    "ClassificationTask",
    "ContinualSineDistribution",
    "ContinualSineTask",
    "CorruptFileError",
    "Episode",
    "EpisodeSampler",
    "LossSurface",
    "LossSurfaceDistribution",
    "OmniglotData",
    "OmniglotNotFoundError",
    "OmniglotTasks",
    "SineTask",
    "SineTaskDistribution",
    "affine_transform",
    "default_cache_dir",
    "default_data_dir",
    "default_omniglot_dir",
    "load_image_folder",
    "load_omniglot",
    "random_affine",
    "rotate_classes",
]
