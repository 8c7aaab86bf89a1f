"""Tests of TableAggregate: document writes, triggers, index_of_doc, reads.

Each test runs against both Aggregate implementations (the ``impl`` fixture
of conftest.py), passed in through ``TableAggregate(aggregate=...)``.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from aggtree import Bound, DuplicateItemError, MissingItemError, TableAggregate
from aggtree.table import Change


def doc(id, score, game="chess", points=0.0):
    return {"_id": id, "score": score, "game": game, "points": points}


@pytest.fixture
def table(impl):
    return TableAggregate(
        sort_key=lambda d: d["score"],
        id=lambda d: d["_id"],
        namespace=lambda d: d["game"],
        sum_value=lambda d: d["points"],
        aggregate=impl(node_size=4),
    )


def items(table, ns):
    return [tuple(it) for it in table.iter(namespace=ns)]


def test_insert_delete_and_reads(table):
    table.insert(doc(1, 120, points=1.5))
    table.insert(doc(2, 90, points=2.0))
    table.insert(doc(3, 90, game="go"))
    assert len(table) == 3
    assert table.count(namespace="chess") == 2
    assert table.count(namespace="chess", lower=Bound(90, inclusive=False)) == 1
    assert table.sum(namespace="chess") == 3.5
    assert table.at(0, namespace="chess") == (90, 2, 2.0)
    assert table.min(namespace="chess").id == 2
    assert table.max(namespace="chess").id == 1
    assert sorted(table.namespaces()) == ["chess", "go"]
    with pytest.raises(DuplicateItemError):
        table.insert(doc(1, 120))
    table.delete(doc(1, 120))
    with pytest.raises(MissingItemError):
        table.delete(doc(1, 120))
    assert items(table, "chess") == [(90, 2, 2.0)]
    table.check()


def test_documents_may_be_objects(impl):
    @dataclasses.dataclass
    class Row:
        id: int
        at: int

    t = TableAggregate(sort_key=lambda r: r.at, id=lambda r: r.id, aggregate=impl())
    t.insert(Row(1, 10))
    t.insert(Row(2, 5))
    assert [it.id for it in t.iter()] == [2, 1]
    assert t.count() == 2 and t.sum() == 0.0


def test_replace_moves_key_namespace_and_value(table):
    table.insert(doc(1, 10, points=1.0))
    table.replace(doc(1, 10), doc(1, 20, game="go", points=4.0))
    assert table.count(namespace="chess") == 0
    assert items(table, "go") == [(20, 1, 4.0)]
    with pytest.raises(MissingItemError):
        table.replace(doc(1, 10), doc(1, 30))
    with pytest.raises(ValueError):
        table.replace(doc(1, 20, game="go"), doc(2, 20, game="go"))
    assert items(table, "go") == [(20, 1, 4.0)]


def test_idempotent_forms(table):
    assert table.upsert(doc(1, 10, points=1.0)) is True
    assert table.upsert(doc(1, 10, points=2.0)) is False
    assert table.sum(namespace="chess") == 2.0
    assert table.delete_if_exists(doc(1, 10)) is True
    assert table.delete_if_exists(doc(1, 10)) is False
    assert table.replace_or_insert(doc(5, 1), doc(5, 2)) is False
    assert table.replace_or_insert(doc(5, 2), doc(5, 3)) is True
    assert items(table, "chess") == [(3, 5, 0.0)]


def test_triggers(table):
    apply = table.trigger()
    apply(Change("insert", None, doc(1, 10)))
    apply({"operation": "update", "old_doc": doc(1, 10), "new_doc": doc(1, 15)})
    assert items(table, "chess") == [(15, 1, 0.0)]
    with pytest.raises(DuplicateItemError):
        apply(Change("insert", new_doc=doc(1, 15)))
    apply(Change("delete", old_doc=doc(1, 15)))
    assert len(table) == 0
    with pytest.raises(MissingItemError):
        apply(Change("delete", old_doc=doc(1, 15)))
    with pytest.raises(ValueError):
        apply(Change("upsert", new_doc=doc(1, 15)))
    with pytest.raises(TypeError):
        apply(42)


def test_idempotent_trigger_tolerates_replays(table):
    apply = table.idempotent_trigger()
    changes = [
        Change("insert", None, doc(1, 10)),
        Change("update", doc(1, 10), doc(1, 12)),
        Change("insert", None, doc(2, 7)),
        Change("delete", doc(2, 7), None),
    ]
    for change in changes + changes:  # everything twice
        apply(change)
    assert items(table, "chess") == [(12, 1, 0.0)]
    # An update of a document the aggregate never saw inserts it.
    apply(Change("update", doc(9, 1), doc(9, 2)))
    assert items(table, "chess") == [(2, 9, 0.0), (12, 1, 0.0)]


def test_index_of_doc_is_exact_rank(table):
    for i, score in enumerate([5, 5, 5, 7, 3]):
        table.insert(doc(i, score))
    ordered = sorted(((s, i) for i, s in enumerate([5, 5, 5, 7, 3])))
    for rank, (score, i) in enumerate(ordered):
        assert table.index_of_doc(doc(i, score)) == rank
        assert table.index_of_doc(doc(i, score), order="desc") == len(ordered) - 1 - rank
    # Absent documents get the position where they would go.
    assert table.index_of_doc(doc(100, 6)) == 4
    assert table.index_of_doc(doc(0, 5), lower=5) == 0


def test_failing_extractor_changes_nothing(impl):
    def key(d):
        if d.get("boom"):
            raise RuntimeError("extractor failed")
        return d["k"]

    t = TableAggregate(sort_key=key, id=lambda d: d["id"], aggregate=impl())
    t.insert({"id": 1, "k": 1})
    for call in (
        lambda: t.insert({"id": 2, "k": 2, "boom": True}),
        lambda: t.replace({"id": 1, "k": 1}, {"id": 1, "k": 3, "boom": True}),
        lambda: t.replace_or_insert({"id": 1, "k": 1, "boom": True}, {"id": 1, "k": 3}),
        lambda: t.delete({"id": 1, "k": 1, "boom": True}),
    ):
        with pytest.raises(RuntimeError):
            call()
        assert [tuple(it) for it in t.iter()] == [(1, 1, 0.0)]
    with pytest.raises(TypeError):
        t.insert(None)
    with pytest.raises(TypeError):
        TableAggregate(sort_key=1, id=lambda d: d)


def test_random_documents_match_a_model(impl):
    """Random inserts / updates / deletes through the idempotent trigger
    against a dict model of the table."""
    rng = random.Random(5)
    t = TableAggregate(
        sort_key=lambda d: d["k"], id=lambda d: d["id"], namespace=lambda d: d["ns"],
        aggregate=impl(node_size=4),
    )
    apply = t.idempotent_trigger()
    table: dict = {}
    for _ in range(400):
        i = rng.randrange(40)
        new = {"id": i, "k": rng.randrange(10), "ns": rng.randrange(3)}
        old = table.get(i)
        if old is None:
            apply(Change("insert", None, new))
            table[i] = new
        elif rng.random() < 0.3:
            apply(Change("delete", old, None))
            del table[i]
        else:
            apply(Change("update", old, new))
            table[i] = new
    t.check()
    for ns in range(3):
        want = sorted((d["k"], d["id"]) for d in table.values() if d["ns"] == ns)
        assert [(it.key, it.id) for it in t.iter(namespace=ns)] == want
        for rank, (k, i) in enumerate(want):
            assert t.index_of_doc({"id": i, "k": k, "ns": ns}) == rank
