"""Bad multi-process setups fail fast with typed errors, in real processes.

Each case starts small Python processes that call
`gs.distributed.initialize` with a short timeout and report the exception
they got; every case must finish well within its bound (a hang is killed
and fails). Argument and mesh checks run in this process.
"""

from __future__ import annotations

import json
import time

import jax
import pytest
from helpers.processes import free_port, launch, wait_all

import gemma_surgery as gs
from gemma_surgery import errors

PROBE = """
import json, sys, time
start = time.monotonic()
import gemma_surgery as gs
address, count, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
  info = gs.distributed.initialize(address, count, pid, timeout_s=4)
  result = {"ok": True, "processes": info.process_count}
except gs.GemmaSurgeryError as e:
  result = {"error": type(e).__name__, "message": str(e)}
result["seconds"] = time.monotonic() - start
print("RESULT " + json.dumps(result), flush=True)
"""


def test_bad_setups_raise_distributed_error_within_the_timeout(tmp_path):
  """All cases at once (one port each): unreachable coordinator, counts that
  disagree, a process that never comes, a duplicate id."""
  cases = {
    "unreachable": [(2, 1)],
    "inconsistent": [(2, 0), (3, 1)],
    "missing": [(2, 0)],
    "duplicate": [(3, 0), (3, 1), (3, 1)],
  }
  start = time.monotonic()
  ports = {name: free_port() for name in cases}
  address = {}
  procs, logs = [], []
  for name, calls in cases.items():
    address[name] = f"127.0.0.1:{ports[name]}"
    for i, (count, pid) in enumerate(calls):
      logs.append(tmp_path / f"{name}{i}.log")
      procs.append(
        launch(["-c", PROBE, address[name], str(count), str(pid)], 1, logs[-1])
      )
  codes = wait_all(procs, 90)
  assert time.monotonic() - start < 90
  text = "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in logs)
  assert codes == [0] * len(procs), f"exit codes {codes}\n{text}"
  results: dict[str, list[dict]] = {name: [] for name in cases}
  for log in logs:
    line = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")][-1]
    results[log.stem.rstrip("0123456789")].append(json.loads(line[7:]))
  for name, got in results.items():
    for result in got:
      assert result.get("error") == "DistributedError", (name, result)
      # Bounded: the 4 s timeout plus imports and the final answer.
      assert result["seconds"] < 40, (name, result)
  assert "could not reach the coordinator" in results["unreachable"][0]["message"]
  assert address["unreachable"] in results["unreachable"][0]["message"]
  for result in results["inconsistent"]:
    assert "Inconsistent process counts" in result["message"]
    assert "num_processes=2" in result["message"]
    assert "num_processes=3" in result["message"]
  assert "missing process id(s) [1]" in results["missing"][0]["message"]
  assert any("distinct" in r["message"] for r in results["duplicate"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2}, "process id"),
    ({"num_processes": 2, "process_id": 0}, "coordinator address"),
    (
      {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2},
      r"not in 0\.\.1",
    ),
    ({"num_processes": 0, "process_id": 0}, "must be >= 1"),
    (
      {"coordinator_address": "no-port", "num_processes": 2, "process_id": 1},
      "HOST:PORT",
    ),
    # This process has computed already (pytest ran JAX): too late to join.
    (
      {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1},
      "already run computations",
    ),
  ],
)
def test_bad_arguments(kwargs, match, monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  jax.devices()  # JAX has started in this process (as it has under pytest).
  with pytest.raises(errors.DistributedError, match=match):
    gs.distributed.initialize(**kwargs, timeout_s=2)


def test_environment_variables_are_read(monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(errors.DistributedError, match="JAX_NUM_PROCESSES"):
    gs.distributed.initialize()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "5")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  with pytest.raises(errors.DistributedError, match=r"process_id=5 is not in 0\.\.1"):
    gs.distributed.initialize()


def test_one_process_needs_nothing(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  info = gs.distributed.initialize()
  assert (info.process_index, info.process_count, info.device_count) == (0, 1, 8)
  assert gs.distributed.initialize(num_processes=1).process_count == 1
  assert gs.distributed.is_primary()


@pytest.mark.parametrize(
  "shape, match",
  [
    ("data=3,model=2", "6 slots but there are 8"),
    ("data=2,model=3", "6 slots but there are 8"),
    ("data=-1,model=3", "positive integers"),
    ("data=2;model=4", "NAME=SIZE"),
    ("data=2,data=4", "distinct names"),
    ("data=two", "NAME=SIZE"),
    ({"data": 0, "model": 8}, "positive integers"),
  ],
)
def test_mesh_shapes_that_dont_fit_the_devices(shape, match):
  with pytest.raises(errors.ShardingError, match=match):
    gs.distributed.make_mesh(shape)


def test_make_mesh_orders_devices_and_infers_one_size():
  mesh = gs.distributed.make_mesh("data=-1,model=4")
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  ids = [d.id for d in mesh.devices.reshape(-1)]
  assert ids == sorted(ids)
  assert dict(gs.distributed.make_mesh().shape) == {"data": 1, "model": 8}


def test_check_mesh_reports_what_would_be_replicated():
  config = gs.preset("gemma2_2b")  # 8 query heads in 4 kv groups
  gs.distributed.check_mesh(config, gs.distributed.make_mesh("data=2,model=4"))
  with pytest.raises(errors.ShardingError, match=r"head_groups=4.*model.*size 8"):
    gs.distributed.check_mesh(config, gs.distributed.make_mesh("data=1,model=8"))
