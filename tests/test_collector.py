"""engine/collector.py: the heap frozen for a model loop, and given back to the collector after it."""
import gc

from engine.collector import frozen_heap


def test_the_heap_is_frozen_inside_and_collected_again_after():
    before = gc.get_freeze_count()
    alive = [[] for _ in range(100)]                 # tracked objects that exist when the loop starts
    with frozen_heap():
        assert gc.get_freeze_count() >= before + len(alive)
    assert gc.get_freeze_count() == 0


def test_a_failing_loop_unfreezes_the_heap_too():
    try:
        with frozen_heap():
            raise RuntimeError("the loop broke")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
