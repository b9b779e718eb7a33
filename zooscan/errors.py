"""Error types. A :class:`ZooscanError` reaches the user as one clear line."""

from __future__ import annotations


class ZooscanError(Exception):
    """Base class for every error zooscan reports to the user without a traceback."""


class UserError(ZooscanError):
    """Bad input from the user: an unknown name, a missing file, a bad option."""


class PluginError(ZooscanError):
    """A plugin is broken or does not follow the hook contract."""


class StoreError(ZooscanError):
    """The store cannot be opened, read or written."""


class ModelError(ZooscanError):
    """One model cannot be scanned (recorded as a failure; the scan goes on)."""


class CheckpointError(ModelError):
    """A checkpoint is missing, corrupt, or does not hold the tensor we need."""


class FirstLayerNotFound(ModelError):
    """No first layer (conv or linear patch embedding consuming the image) was found."""


class UnsupportedModel(ModelError):
    """The model is known but zooscan cannot analyse it (the reason says why)."""


class DatasetError(UserError):
    """A patch dataset cannot be opened (unknown name, no images, offline and not on disk)."""
