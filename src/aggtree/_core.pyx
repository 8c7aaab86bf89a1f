# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""aggtree._core: the native Aggregate, Cython glue over the C core.

Reading order: README -> python/aggtree/__init__.py (public names) -> this
file (the map below) -> aggtree.h / core/*.c (the counted B+tree; start at core/internal.h).

Where things are
----------------
This file holds no code of its own: it imports and includes, in this order,

  _aggtree.pxd    the C declarations of aggtree.h (cimported by _core.pxd)
  _core.pxd       the cdef classes _Tree and Aggregate: attributes, cdef
                  methods, and the contract of those another Cython module
                  (aggtree._event_ops) may call
  keycodec.pxi    the byte encoding of general keys (and its test hooks)
  _errors.pxi     C status -> exception, and the one function that words
                  every DuplicateItemError / MissingItemError
  _scalars.pxi    scalar conversion: key kinds, values, FAST and GENERAL keys,
                  Items
  _trees.pxi      tree access: _Tree, the two accessors of its C tree (_tt;
                  _bulk_begin / _bulk_end), reading items, widening, _find
  _bounds.pxi     bounds: _gap, _range, cursors
  _aggregate.pxi  the Aggregate class: every public method
  _numpy.pxi      the numpy paths: the cdef bodies of the array methods and
                  their helpers
  _snapshot.pxi   snapshots: dumps / loads / save / load and pickling in the
                  format of docs/SNAPSHOT.md (python/aggtree/snapshot.py is
                  its pure-Python twin and parses the envelope)
  _testing.pxi    test-only helpers (failure injection, tree inspection)

How a Python call becomes a tree walk
-------------------------------------
* An Aggregate is a dict ``namespace -> _Tree``; a _Tree owns one C tree.
  Empty namespaces are removed at once, so they hold no memory.
* Each tree has a *kind* chosen by its first item and widened on demand:
    K_FLOAT   every key is a float, every id an int64: C FAST keys
              (head = sortable double, rest = sortable id).
    K_INT     every key is an int with |key| <= 2**53, every id an int64:
              also FAST keys (ints that size are exact doubles); the kind only
              records that keys read back as ints.
    K_NONE    every key is None, every id an int64 (pure counters, Convex's
              "sortKey: null"): FAST keys with the head of 0.0, read back as
              None; bound keys other than None fall after every item.
    K_GENERAL anything else: keys are the memcmp-ordered byte encoding of
              keycodec.pxi.
  An item that does not fit a FAST tree converts it to GENERAL first (read
  out, re-encode, bulk build: O(n), once).  The conversion preserves order,
  since both encodings are order-preserving images of the same order.
* Every bound form becomes a *gap*: the number of items before a point of the
  key order (``_gap``).  A range is then a half-open index interval
  ``[lo, hi)`` and count / sum / at / min / max / paginate are walks by index.
  For FAST trees a bound key of another type is placed by the cross-type
  order (None before all numbers, str / bytes / tuple after them), and
  integers that are not exact doubles fall in the gap between two doubles.
* Errors: C statuses map to exceptions in ``_raise_status``, and every
  DuplicateItemError / MissingItemError is worded by ``_item_error``
  (_errors.pxi).  Everything is
  validated (keys encoded, values converted, targets looked up) before the
  first C call that mutates, and the C core itself never half-applies an
  operation, so a failed call leaves the aggregate unchanged.

Threads
-------
Per-item calls hold the GIL for the whole call, so they are atomic with
respect to each other.  Every writer takes the aggregate's lock too.
Vectorised read loops release the GIL; they hold the aggregate's lock while
they run, so such a reader sees the state before or after a write, never a
torn one.  The bulk writes of FAST keys (insert_many, delete_many) release
the GIL for the C write, holding the lock; per-item reads do not take the
lock, so the written namespace's _Tree is marked busy meanwhile, and every
C call made with the GIL held reaches the tree through _tt(tree), which
waits (without the GIL) until the write has ended.  Other namespaces, and
Python code that does not touch this aggregate, run on.  This is kept by
structure: the C tree pointer is reached only through _tt and _bulk_begin
(_trees.pxi), never read from the _Tree elsewhere.
"""


from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, UINT64_MAX
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, memcmp
from libc.math cimport isnan, isfinite, floor, nextafter, INFINITY
from cpython.float cimport PyFloat_Check, PyFloat_CheckExact, PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_CheckExact, PyLong_AsLongLongAndOverflow, PyLong_FromLongLong
from cpython.bool cimport PyBool_Check
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_acquire_lock,
                               PyThread_release_lock, PyThread_get_thread_ident,
                               WAIT_LOCK)
from cpython.ref cimport PyObject, Py_INCREF
from cpython.object cimport PyTypeObject
from cpython.tuple cimport PyTuple_SET_ITEM
from cpython.dict cimport PyDict_GetItemWithError

cimport numpy as cnp
import numpy as np

import base64 as _base64
import binascii as _binascii
import operator as _operator
import random as _random_module

from aggtree._types import Bound, DuplicateItemError, Item, MissingItemError, Page

cnp.import_array()

include "keycodec.pxi"
include "_errors.pxi"
include "_scalars.pxi"
include "_trees.pxi"
include "_bounds.pxi"
include "_aggregate.pxi"
include "_numpy.pxi"
include "_snapshot.pxi"

include "_testing.pxi"
