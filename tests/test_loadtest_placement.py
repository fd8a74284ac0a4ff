"""A run's prefix-cache hit rate and placements per worker, from two scrapes of /metrics as the server writes them
(services/metrics.py's own exposition): the differences, nothing from before the run, nothing from a server without
the counters."""
from __future__ import annotations

from loadtest import placement
from services.metrics import Counter, exposition, scheduler_metrics


def scrape(queries: int | None, hits: int | None, placed: dict[tuple[str, str], int] | None,
           migrated: int | None = None) -> str:
    """What the gateway's /metrics holds: the scheduler's stats hash as metrics, the placements counter, and
    other metrics around them."""
    stats = {"running": "3", "kv_usage": "0.5"}
    if queries is not None:
        stats |= {"prefix_cache_queries": str(queries), "prefix_cache_hits": str(hits),
                  "prefix_cache_hit_rate": str(hits / queries if queries else 0.0)}
    if migrated is not None:
        stats["migrated"] = str(migrated)
    metrics = scheduler_metrics(stats)
    requests = Counter("pagestream_requests_total", "Requests by outcome.", ["status"])
    requests.inc(7, status="200")
    metrics.append(requests)
    if placed is not None:
        counter = Counter(placement.PLACED, "Requests placed, by worker and reason.", ["worker", "reason"])
        for (worker, reason), n in placed.items():
            counter.inc(n, worker=worker, reason=reason)
        metrics.append(counter)
    return exposition(metrics)


def test_the_runs_figures_are_the_differences():
    before = scrape(1000, 200, {("w0", "prefix"): 10, ("w1", "load"): 4, ("w1", "prefix"): 6}, migrated=2)
    after = scrape(3000, 1700, {("w0", "prefix"): 30, ("w0", "migrated"): 1, ("w1", "load"): 4, ("w1", "prefix"): 6,
                                ("w1", "round_robin"): 0}, migrated=3)
    figures = placement.figures(before, after)
    assert figures["prefix_cache"] == {"queries": 2000, "hits": 1500, "hit_rate": 0.75}
    # w1 placed nothing in the run: listed, with no reasons; reasons of no requests are left out.
    assert figures["placements"] == {"w0": {"migrated": 1, "prefix": 20}, "w1": {}}
    assert figures["migrated"] == 1                          # pagestream_requests_migrated_total's difference
    assert placement.placements_text(figures["placements"]) == "w0 21 (migrated 1, prefix 20), w1 0"
    text = placement.format_figures(figures)
    assert "Prefix cache hit rate (tokens)" in text and "75.0%" in text and "1500/2000" in text
    assert [line.split()[4] for line in text.splitlines() if line.startswith("Requests placed on")] == ["21", "0"]
    assert [line.split()[-1] for line in text.splitlines() if line.startswith("Requests moved")] == ["1"]
    assert "Requests moved" not in placement.format_figures(dict(figures, migrated=0))


def test_a_server_that_starts_counting_during_the_run():
    # Counters that first appear after the run started count from zero (a worker's first placement, say).
    figures = placement.figures(scrape(None, None, None), scrape(50, 10, {("w0", "round_robin"): 2}))
    assert figures == {"prefix_cache": {"queries": 50, "hits": 10, "hit_rate": 0.2},
                       "placements": {"w0": {"round_robin": 2}}}


def test_a_counter_reset_during_the_run_counts_from_zero():
    # w1 was lost and came back: its placement counts start again from zero, below those before the run.
    figures = placement.figures(scrape(None, None, {("w0", "load"): 10, ("w1", "load"): 9}, migrated=0),
                                scrape(None, None, {("w0", "load"): 12, ("w0", "migrated"): 4, ("w1", "load"): 1},
                                       migrated=4))
    assert figures == {"placements": {"w0": {"load": 2, "migrated": 4}, "w1": {"load": 1}}, "migrated": 4}


def test_lookups_of_a_worker_lost_during_the_run_leave_the_rate_unknown():
    # The server's sum over its workers went down: a lost worker took its lookups with it.
    assert placement.figures(scrape(1000, 400, None), scrape(900, 500, None)) == {}


def test_no_lookups_no_rate():
    figures = placement.figures(scrape(100, 40, None), scrape(100, 40, None))
    assert figures == {"prefix_cache": {"queries": 0, "hits": 0, "hit_rate": None}}
    assert "n/a" in placement.format_figures(figures) and "placed" not in placement.format_figures(figures)


def test_a_server_without_the_counters_has_no_figures():
    assert placement.figures(scrape(None, None, None), scrape(None, None, None)) == {}
    assert placement.figures("", "") == {}
    assert placement.figures("<html>not found</html>", "<html>not found</html>") == {}
    assert placement.format_figures({}) == ""
