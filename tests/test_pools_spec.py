"""The pools file: typed, and wrong shapes are refused before anything touches a server."""

import pytest
import yaml
from pydantic import ValidationError

from work_pools.spec import DEFAULT_POOLS_FILE, load_pools


def test_shipped_pools_file_declares_local_pool_with_three_priority_queues():
    pools = load_pools()
    local = next(p for p in pools.pools if p.name == "local")
    assert local.type == "process"
    assert [(q.name, q.priority) for q in local.queues] == [("urgent", 1), ("normal", 2), ("background", 3)]
    assert "job_configuration" in local.template() and "variables" in local.template()


def _write(tmp_path, data):
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "local.json").write_text(DEFAULT_POOLS_FILE.with_name("local.json").read_text())
    return path


@pytest.mark.parametrize(
    "queues, message",
    [
        ([{"name": "a", "priority": 1}, {"name": "a", "priority": 2}], "queue names repeat"),
        ([{"name": "a", "priority": 1}, {"name": "b", "priority": 1}], "priorities repeat"),
        ([{"name": "a", "priority": 0}], "greater than 0"),
        ([{"name": "a", "priority": 1, "weight": 3}], "Extra inputs"),
    ],
)
def test_bad_queue_definitions_are_rejected(tmp_path, queues, message):
    path = _write(tmp_path, {"pools": [{"name": "p", "type": "process", "base_job_template": "local.json",
                                        "queues": queues}]})
    with pytest.raises(ValidationError, match=message):
        load_pools(path)
