"""Site data: site directory -> per-patient cohort table (FHIR, images, notes, labels, tasks).

Knows FHIR, files and tasks; knows no models. Entry points: :func:`build_cohort`,
:func:`build_cohorts`, :class:`SiteCohort`, :class:`DataError`, and the scikit-learn
transformer :class:`~multimodal_fl.data.featurizer.FHIRFeaturizer`
(``from multimodal_fl.data import FHIRFeaturizer``).
"""

from multimodal_fl.data.cohort import SiteCohort, build_cohort, build_cohorts
from multimodal_fl.data.errors import DataError, Skip
from multimodal_fl.data.featurizer import FHIRFeaturizer
from multimodal_fl.data.tasks import feature_names

__all__ = [
    "DataError",
    "FHIRFeaturizer",
    "SiteCohort",
    "Skip",
    "build_cohort",
    "build_cohorts",
    "feature_names",
]

