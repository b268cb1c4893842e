"""Site specifications: size, prevalence, and which routes of the site contract each uses."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from multimodal_fl.sample_data._images import Acquisition

__all__ = ["PROFILES", "SCALE_IMAGE_SIZE", "SCALE_PATIENTS", "SCALE_SITES", "SiteSpec",
           "scale_sites", "sites_for"]

FhirLayout = Literal["transaction", "collection", "ndjson", "single"]
ImageLink = Literal["dicom", "imagingstudy", "csv"]
NotesRoute = Literal["docref_data", "docref_url", "diagreport", "notes_csv", "none"]


@dataclass(frozen=True)
class SiteSpec:
    """One generated site: its cohort and the routes of the site contract it uses.

    Parameters
    ----------
    name
        Site directory name (``site_a`` ...).
    n
        Number of patients written.
    prevalence
        Share of positives (24 h label for COVID-19; prevalent disease for Alzheimer's).
    fhir
        ``transaction``: one transaction Bundle per patient; ``collection``: collection
        Bundles of up to 50 patients; ``ndjson``: Bulk Data export, one file per type;
        ``single``: each Patient a single-resource JSON file, the rest in searchset Bundles.
    refs
        ``urn`` (UUID ids, ``urn:uuid:`` references) or ``relative`` (``Patient/<id>``).
    tz_hours
        UTC offset the site writes its dateTimes in.
    image_link
        How images are linked: DICOM PatientID, ImagingStudy identifier, or images.csv.
    image_size
        Pixels (2D) or voxels (3D) per side.
    image_missing
        Share of patients without an image.
    acquisition
        The site's acquisition shift.
    notes
        Where notes are written (or ``none``: a site without notes).
    units
        Feature name -> the UCUM unit this site writes instead of the canonical one.
    alt_codes
        Use the alternative LOINC code of features that have two (SpO2 2708-6, ...).
    labels_csv
        Write labels.csv (research-cohort route); the label condition is then not in FHIR.
    discharge_trap
        Also write a discharge note dated after the index (it must never be a feature).
    no_encounter_ref
        Share of COVID-19 Conditions written without an encounter reference.
    """

    name: str
    n: int
    prevalence: float
    fhir: FhirLayout
    refs: Literal["urn", "relative"]
    image_link: ImageLink
    image_size: int
    image_missing: float
    acquisition: Acquisition
    notes: NotesRoute
    tz_hours: int = 0
    units: dict[str, str] = field(default_factory=dict)
    alt_codes: bool = False
    labels_csv: bool = False
    discharge_trap: bool = False
    no_encounter_ref: float = 0.0


COVID_SITES = (
    SiteSpec("site_a", 220, 0.20, "transaction", "urn", "dicom", 64, 0.10,
             Acquisition(gain=1.00, offset=0.00, gamma=1.00, noise=0.025, bias=0.05),
             "docref_data", discharge_trap=True),
    SiteSpec("site_b", 180, 0.28, "ndjson", "relative", "imagingstudy", 64, 0.15,
             Acquisition(gain=0.85, offset=0.08, gamma=1.15, noise=0.04, bias=0.10),
             "docref_url", tz_hours=1, units={"wbc": "10*9/L", "neutrophils": "10*9/L",
                                              "lymphocytes": "10*9/L"}),
    SiteSpec("site_c", 140, 0.15, "collection", "relative", "csv", 64, 0.12,
             Acquisition(gain=1.10, offset=-0.05, gamma=0.90, noise=0.03, bias=0.0),
             "diagreport", units={"temperature": "[degF]", "crp": "mg/dL"}, alt_codes=True,
             no_encounter_ref=0.3),
    SiteSpec("site_d", 80, 0.35, "transaction", "relative", "csv", 96, 0.20,
             Acquisition(gain=0.95, offset=0.04, gamma=1.05, noise=0.05, bias=0.15),
             "none", alt_codes=True),
)

ALZHEIMERS_SITES = (
    SiteSpec("site_a", 200, 0.25, "transaction", "urn", "imagingstudy", 32, 0.08,
             Acquisition(gain=1.00, offset=0.00, gamma=1.00, noise=0.03, bias=0.05),
             "docref_data"),
    SiteSpec("site_b", 160, 0.33, "ndjson", "relative", "csv", 32, 0.12,
             Acquisition(gain=0.85, offset=0.06, gamma=1.10, noise=0.04, bias=0.12),
             "notes_csv", tz_hours=-5),
    SiteSpec("site_c", 120, 0.20, "single", "relative", "imagingstudy", 32, 0.10,
             Acquisition(gain=1.12, offset=-0.04, gamma=0.92, noise=0.035, bias=0.0),
             "none", labels_csv=True, alt_codes=True),
    SiteSpec("site_d", 80, 0.30, "transaction", "relative", "csv", 36, 0.15,
             Acquisition(gain=0.92, offset=0.03, gamma=1.05, noise=0.05, bias=0.18),
             "docref_url", alt_codes=True),
)

#: profile -> (patients per site, or None for the default sizes; sites kept; image size);
#: ``scale`` takes its patients and sites from the caller (:func:`scale_sites`)
PROFILES: dict[str, tuple[int | None, int, int | None]] = {
    "default": (None, 4, None),
    "tiny": (20, 3, 16),
    "scale": (None, 20, None),
}
#: the ``scale`` profile's defaults: patients per task, sites per task
SCALE_PATIENTS = 1000
SCALE_SITES = 20
#: the ``scale`` profile's source image sizes: 128-pixel chest X-rays, 48-voxel brain volumes
SCALE_IMAGE_SIZE = {"covid_oxygen": 128, "alzheimers": 48}

TASK_SITES = {"covid_oxygen": COVID_SITES, "alzheimers": ALZHEIMERS_SITES}


def scale_sites(task: str, patients: int, sites: int) -> tuple[SiteSpec, ...]:
    """The ``scale`` profile's sites of ``task``: ``patients`` spread over ``sites`` sites.

    Site ``k`` (``site_001`` ...) takes the routes, prevalence, acquisition, units and notes
    of the default profile's site ``k mod 4``; sizes differ by at most one patient, and
    images are :data:`SCALE_IMAGE_SIZE` per side.

    Parameters
    ----------
    task
        Sample task name.
    patients
        Patients of the task, in all (at least one per site).
    sites
        Number of sites (1-999).

    Returns
    -------
    tuple of SiteSpec
        The sites, in order.

    Raises
    ------
    ValueError
        On a number of sites outside 1-999 or fewer patients than sites.
    """
    if not 1 <= sites <= 999:
        raise ValueError(f"--sites {sites}: expected 1 to 999 sites")
    if patients < sites:
        raise ValueError(f"--patients {patients} is fewer than --sites {sites}: every site "
                         "needs at least one patient")
    templates = TASK_SITES[task]
    base, extra = divmod(patients, sites)
    return tuple(replace(templates[k % len(templates)], name=f"site_{k + 1:03d}",
                         n=base + int(k < extra), image_size=SCALE_IMAGE_SIZE[task])
                 for k in range(sites))


def sites_for(task: str, profile: str, *, patients: int | None = None,
              sites: int | None = None) -> tuple[SiteSpec, ...]:
    """The site specifications of ``task`` (``covid_oxygen`` or ``alzheimers``) in ``profile``.

    Parameters
    ----------
    task
        Sample task name.
    profile
        ``default``, ``tiny`` (three sites of 20 patients, 16-voxel volumes and 32-pixel
        images) or ``scale`` (:func:`scale_sites`).
    patients, sites
        ``scale`` only: patients of the task and sites (default :data:`SCALE_PATIENTS` over
        :data:`SCALE_SITES`).

    Returns
    -------
    tuple of SiteSpec
        The sites, in order.
    """
    if task not in TASK_SITES:
        raise ValueError(f"unknown sample task '{task}'; expected one of {sorted(TASK_SITES)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}'; expected one of {sorted(PROFILES)}")
    if profile == "scale":
        return scale_sites(task, SCALE_PATIENTS if patients is None else patients,
                           SCALE_SITES if sites is None else sites)
    if patients is not None or sites is not None:
        raise ValueError(f"--patients and --sites are for the scale profile, not '{profile}'")
    n, keep, size = PROFILES[profile]
    sites_kept = TASK_SITES[task][:keep]
    if n is None:
        return sites_kept
    out = []
    for spec in sites_kept:
        img = spec.image_size if size is None else (size if task == "alzheimers" else 2 * size)
        out.append(replace(spec, n=n, image_size=img))
    return tuple(out)
