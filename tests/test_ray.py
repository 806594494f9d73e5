"""Ray Data (``vllmclient.integrations.ray``): a local Ray with 2 actors against the fake server over HTTP.

One local Ray per module (its start costs seconds). Needs the ``ray`` extra (``scripts/setup.sh`` installs
it): under CI a missing ray fails this module instead of skipping it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllmclient import ClientvLLM

from fake_vllm import FakeVLLM

if not os.environ.get("CI"):  # under CI a missing ray is an ImportError: this module fails, never skips
    pytest.importorskip("ray")
import ray
import ray.data

from vllmclient.integrations.ray import Generate, generate


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fake(tokenizer_dir: Path) -> Iterator[FakeVLLM]:
    with FakeVLLM(tokenizer_dir, latency=0.05) as server:  # answers take a while: batches overlap
        yield server


@pytest.fixture
def server(fake: FakeVLLM) -> FakeVLLM:
    """The module's fake, with no failure left from another test and its counts reset."""
    fake.clear_failures()
    fake.clear()
    return fake


def rows(count: int) -> list[dict[str, Any]]:
    """Chat rows as a dataset holds them (every message has the same fields, so Arrow makes them structs)."""
    return [{"id": 1000 + i, "conversation": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": f"[[q{1000 + i}]] tell me something"}]}
            for i in range(count)]


def test_a_dataset_of_conversations_becomes_one_of_results(local_ray, server, tokenizer_dir):
    server.fail_prompts_containing("[[q1013]]", message="this row is refused")
    client = ClientvLLM(base_url=server.base_url, tokenizer=str(tokenizer_dir), max_concurrency=8, max_retries=0)
    dataset = ray.data.from_items(rows(120))

    out = generate(dataset, client, actors=2, batch_size=10, id_column="id", max_new_tokens=4).take_all()

    assert sorted(row["id"] for row in out) == [1000 + i for i in range(120)]
    for row in out:
        assert list(row) == ["id", "conversation", "generations", "finish_reasons", "input_tokens",
                             "output_tokens", "request_id", "error", "error_type"]
        if row["id"] == 1013:  # only that row failed, named by its id
            assert row["error_type"] == "BadRequestError" and "this row is refused" in row["error"]
            assert row["error"].startswith("id=1013") and list(row["generations"]) == [None]
            continue
        assert row["error"] is None and row["generations"][0].startswith(f"q{row['id']}")
        assert row["finish_reasons"][0] in ("stop", "length") and row["output_tokens"][0] >= 1
        assert row["request_id"].startswith("vllmclient-")
    # The client's max_concurrency (8) is the job's: each of the 2 actors sends at most 4 at once.
    assert 1 <= server.max_in_flight_sequences <= 8


def test_resume_with_ray_datas_checkpoint_retries_the_failed_rows(local_ray, server, tmp_path):
    """Sync ``Generate`` by hand; ``keep_failed=False``: a failed row is not written, so Ray Data's checkpoint
    does not count it done and the same job run again sends that row only."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows(30)))
    client = ClientvLLM(base_url=server.base_url, tokenizer=None, max_concurrency=8, max_retries=0)
    context = ray.data.DataContext.get_current()
    context.checkpoint_config = ray.data.checkpoint.CheckpointConfig(
        id_column="id", checkpoint_path=str(tmp_path / "checkpoint"), delete_checkpoint_on_success=False)

    def job() -> None:
        ray.data.read_json(str(source)).map_batches(
            Generate, fn_constructor_args=(client,),
            fn_constructor_kwargs={"actors": 2, "id_column": "id", "keep_failed": False, "max_new_tokens": 4},
            compute=ray.data.ActorPoolStrategy(size=2), batch_size=8,
            num_cpus=0,  # actors waiting on HTTP: the 2 CPUs go to the read, the checkpoint filter and the write
        ).write_parquet(str(tmp_path / "out"))

    try:
        server.fail_prompts_containing("[[q1007]]", message="this row is refused")
        job()
        first = {row["id"] for row in written(tmp_path / "out")}
        server.clear_failures()
        server.clear()
        job()
    finally:
        context.checkpoint_config = None
    assert first == {1000 + i for i in range(30) if i != 7}
    sent = [request.body["messages"][-1]["content"] for request in server.requests_to("/v1/chat/completions")]
    assert sent == ["[[q1007]] tell me something"]
    rows_written = written(tmp_path / "out")
    assert sorted(row["id"] for row in rows_written) == [1000 + i for i in range(30)]
    assert all(row["error"] is None and row["generations"][0].startswith(f"q{row['id']}") for row in rows_written)
    assert all(list(row["conversation"])[1]["content"] == f"[[q{row['id']}]] tell me something"
               for row in rows_written)


def written(folder: Path) -> list[dict[str, Any]]:
    """The rows of a job's parquet files (read with pyarrow: a Ray read would go through the checkpoint filter)."""
    import pyarrow.parquet

    return pyarrow.parquet.read_table(folder).to_pylist()


def test_the_core_package_never_imports_ray():
    code = "import sys, vllmclient, vllmclient.client, vllmclient.checkpoint; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
