"""The appliance kernel shared by every role: settings, database, domain errors, ids, CLI."""

__version__ = "0.1.0"
