"""zprovd: a provisioning server for VoIP phones."""

__version__ = "0.1.0"
