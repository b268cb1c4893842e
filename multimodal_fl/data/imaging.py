"""Linking image files to patients (no transforms: those live in ``encoders``).

Linking rules, tried in this order; the first that links an image to a patient wins
and later rules never override it (one image per patient: the latest acquired, else the
first by path):

1. ``images.csv`` (``patient_id,path[,modality,view,acquired]``): ``path`` is relative to
   the site directory (e.g. ``images/p001.png``).
2. **ImagingStudy**: ``ImagingStudy.subject`` names the patient (``Patient/<id>`` or
   ``urn:uuid:<id>``); the file is the site-relative path held in an
   ``ImagingStudy.identifier`` whose ``system`` is ``urn:mmfl:image-path``::

       {"resourceType": "ImagingStudy", "id": "img-p001", "status": "available",
        "subject": {"reference": "Patient/p001"},
        "started": "2020-03-01T10:00:00Z",
        "identifier": [{"system": "urn:mmfl:image-path", "value": "images/p001.dcm"}]}

   ``started`` dates the image (an image started after the feature cut-off is not used).
3. **DICOM PatientID**: every ``.dcm`` file under ``images/`` not linked by rules 1-2 is
   read header-only (``pydicom.dcmread(stop_before_pixels=True)``) and linked by its
   ``PatientID`` tag (0010,0020) equal to the FHIR ``Patient.id``; ``StudyDate`` /
   ``AcquisitionDate`` date it when present.

Paths that lead outside the site directory (``..``, absolute paths, symlinks escaping)
are refused and reported, never read. A linked image must be readable at header level
(DICOM header, NIfTI header, PNG/JPEG header via Pillow); an unreadable image counts as
absent and is reported.
"""
