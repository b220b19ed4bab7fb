"""Everything durable on the booking side, behind one protocol.

``base.py`` is the :class:`Store` protocol; ``sqlite.py`` the embedded
backend, ``postgres.py`` the networked one (``store.url``), each with its
versioned migrations. Every backend passes the same contract suite,
``tests/test_store_contract.py``.
"""

from gateway.store.base import Store

__all__ = ["Store"]
