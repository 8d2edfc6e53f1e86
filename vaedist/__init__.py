"""vaedist: variational autoencoders trained on Ray, tracked in MLflow, turned into labelled Parquet data."""

__version__ = "0.1.0"
