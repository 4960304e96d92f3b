"""The sandboxed execution appliance: signed jobs in, sealed results out."""

__version__ = "0.1.0"
