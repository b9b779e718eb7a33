"""The HDF5 store: one file of first layers, patch bases, energy profiles, failures and
trainer runs (each also kept as a model of source ``trainer``).

The file (default ``zoo.h5``, or ``$ZOOSCAN_STORE``) is plain HDF5 that any HDF5
tool reads; ``docs/store.md`` documents every group, dataset and attribute.

Modules, each importing only those listed before it:

- :mod:`~zooscan.store.naming`: reversible escaping of names into HDF5 links;
- :mod:`~zooscan.store.files`: fsync, write-then-rename, atomic replace, space
  reservation, the writer lock;
- :mod:`~zooscan.store.codec`: records as HDF5 attributes and back;
- :mod:`~zooscan.store.views`: :class:`StoredModel` and :class:`ModelSummary`;
- :mod:`~zooscan.store.schema`: the root attributes and the schema version check;
- :mod:`~zooscan.store.journal`: the checksummed journal entries and their directory;
- :mod:`~zooscan.store.entries`: records as validated journal entries;
- :mod:`~zooscan.store.runs`: trainer runs as journal entries and ``/runs`` groups;
- :mod:`~zooscan.store.overlay`: the journal's effect merged on top of the main file;
- :mod:`~zooscan.store.compaction`: folding the overlay into a new main file;
- :mod:`~zooscan.store.store`: the :class:`Store` class;
- :mod:`~zooscan.store.check`: reading a main file object by object for damage (what
  ``zooscan fsck`` runs, see :mod:`zooscan.fsck`).
"""

from zooscan.store.files import TMP_INFIX as TMP_INFIX
from zooscan.store.naming import escape_name, unescape_name
from zooscan.store.runs import RUN_SOURCE
from zooscan.store.schema import FORMAT, SCHEMA_VERSION
from zooscan.store.store import (
    DAMAGED,
    DEFAULT_STORE,
    STORE_ENV,
    Store,
    default_store_path,
)
from zooscan.store.store import JOURNAL_SUFFIX as JOURNAL_SUFFIX
from zooscan.store.store import LOCK_SUFFIX as LOCK_SUFFIX
from zooscan.store.views import ModelSummary, StoredModel

__all__ = [
    "DAMAGED",
    "DEFAULT_STORE",
    "FORMAT",
    "RUN_SOURCE",
    "SCHEMA_VERSION",
    "STORE_ENV",
    "ModelSummary",
    "Store",
    "StoredModel",
    "default_store_path",
    "escape_name",
    "unescape_name",
]
