"""The model store's error tree.

ModelStoreError
├── InvalidModel       a file that is not a loadable ONNX/TFLite model, or a bad name
└── VersionConflict    NAME:VERSION already exists with different bytes
"""


class ModelStoreError(Exception):
    """Base of everything the model store raises on purpose."""


class InvalidModel(ModelStoreError):
    """The file cannot be used as a model; the message says why."""


class VersionConflict(ModelStoreError):
    """Versions are immutable: the same NAME:VERSION cannot name different bytes."""
