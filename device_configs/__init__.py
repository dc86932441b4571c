"""Hardware classes of the fleet: one YAML profile per class, validated by ``schema.py``.

See docs/device-profiles.md for the fields, the sources rule and how to add a class.
"""
