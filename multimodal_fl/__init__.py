"""multimodal_fl: federated multimodal learning for hospital consortia.

Image, FHIR-tabular and clinical-text encoders feed a fusion model trained with
federated averaging; federated PCA compresses and analyses features across sites;
every run ends in a per-site fairness report.
"""

__version__ = "0.1.0"
