"""Two seeds never share an id: names that meet once made safe and shortened are refused
at discovery, and a plan whose rollout ids would repeat is refused too."""

from __future__ import annotations

import pytest

from pipeline.contracts.errors import UserError
from pipeline.contracts.plan import make_plan
from pipeline.contracts.sources import SeedRef
from pipeline.contracts.storage import MAX_SEGMENT_CHARS, safe_segment
from pipeline.driver.discovery import discover_seeds

LONG = "level-" + "x" * 120  # longer than a segment: shortened, with a hash of the name


@pytest.mark.parametrize("name", [LONG, "boss fight"])
def test_seed_names_that_meet_as_ids_are_refused(tmp_path, name):
    # the second file is named exactly like the first one's id (already a safe name)
    taken = safe_segment(name)
    assert taken != name and len(taken) <= MAX_SEGMENT_CHARS
    for stem in (name, taken):
        (tmp_path / f"{stem}.png").write_bytes(b"png")
    with pytest.raises(UserError) as caught:
        discover_seeds(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path / f"{name}.png") in message
    assert str(tmp_path / f"{taken}.png") in message
    assert repr(taken) in message and "seeds.source" in message


def test_distinct_names_keep_distinct_ids(tmp_path):
    for stem in (LONG, LONG + "y", "a", "a_b", "a b"):
        (tmp_path / f"{stem}.png").write_bytes(b"png")
    refs = discover_seeds(str(tmp_path))
    assert len({r.seed_id for r in refs}) == 5


def test_a_manifest_row_may_not_take_another_seeds_id(tmp_path):
    (tmp_path / "seeds.csv").write_text(f"uri,seed_id\n{LONG}.png,\n"
                                        f"other.png,{safe_segment(LONG)}\n")
    with pytest.raises(UserError, match="rows 1 and 2 both give seed id"):
        discover_seeds(str(tmp_path / "seeds.csv"), format="manifest")


def test_a_plan_refuses_repeated_rollout_ids():
    a, b = SeedRef(seed_id="s1", uri="/seeds/a.png"), SeedRef(seed_id="s1", uri="/seeds/b.png")
    with pytest.raises(UserError, match="seeds /seeds/a.png and /seeds/b.png both get the "
                                        "seed id 's1'.*share the id 's1-r000'"):
        make_plan([a, b], run_seed=0, per_seed=2, unit_size=4)
    with pytest.raises(UserError, match="seed /seeds/a.png is listed twice"):
        make_plan([a, a], run_seed=0, per_seed=1, unit_size=4)
    assert len(make_plan([a], run_seed=0, per_seed=3, unit_size=4)[0].items) == 3
