"""The worker's block tables: the scheduler's deltas applied in place, and a batch's tables stacked, each against a
plain list."""
import numpy as np
from hypothesis import given, strategies as st

from engine.block_table import BlockTable, stack_tables

ids = st.lists(st.integers(0, 2**31 - 1), max_size=40)


@given(ids, st.lists(st.tuples(st.integers(0, 1000), ids), max_size=12))
def test_deltas_apply_as_on_a_list(first, deltas):
    table, reference = BlockTable(first), list(first)
    for offset, new in deltas:
        offset = offset % (len(reference) + 1)          # the worker refuses an offset beyond the table
        table.replace_from(offset, new)
        del reference[offset:]
        reference += new
        assert table.tolist() == reference and len(table) == len(reference)
        assert table.ids.dtype == np.int32


def test_a_copy_is_its_own():
    table = BlockTable([1, 2, 3])
    copy = table.copy()
    table.replace_from(1, [7])
    assert copy.tolist() == [1, 2, 3] and table.tolist() == [1, 7]


@given(st.lists(ids, max_size=9), st.integers(0, 3))
def test_stacked_rows_are_the_tables_zero_padded(tables, extra):
    width = max(map(len, tables), default=0) + extra
    out = np.full((len(tables), width), -5, np.int64)        # whatever a staging buffer held before
    stack_tables([BlockTable(t) for t in tables], out)
    expected = np.zeros_like(out)
    for b, t in enumerate(tables):
        expected[b, :len(t)] = t
    assert (out == expected).all()
