"""Fast tests of oppen.api.resources and of the pure parts of oppen.api.forecasting (no Prefect server, no training).

There is no Kubernetes cluster here. The local branch is tested on this machine as it is (no CUDA
device on this CPU-only torch). The Kubernetes branch is tested twice without a cluster: against a
kube config naming a closed port (an error, never a silent fall back to the local machine), and
against a stand-in API server on loopback that answers the three list calls with fixed objects, so
the kubernetes client's own deserialisation and our arithmetic run end to end. Neither is a cluster.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest
import torch

from oppen.api import resources
from oppen.api.errors import Unavailable
from oppen.api.forecasting import RunFigures, work_ahead
from oppen.api.resources import check_pool_request, get_gpu_availability, gpu_type_rows, kube_config_file
from oppen.cost.speed import SpeedEstimate
from work_pools.gpu_capacity import NodeGpus

L4, A100 = "NVIDIA-L4", "NVIDIA-A100-SXM4-80GB"


@pytest.fixture
def no_kube(monkeypatch, tmp_path):
    """No KUBECONFIG and a home without ~/.kube/config: this machine is where runs go."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        yield


def _kube_config(tmp_path, server: str):
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
    }))
    return path


# --- this machine ------------------------------------------------------------------------------


def test_without_a_kube_context_it_describes_this_machine(no_kube):
    found = get_gpu_availability()
    assert found.source == "local" and found.kube_context is None and found.gpu_types == []
    assert found.cpu_cores == psutil.cpu_count(logical=True)
    assert 0 < found.memory_available_gib <= found.memory_total_gib
    assert len(found.devices) == torch.cuda.device_count()  # 0 on this CPU-only build
    if not found.devices:
        assert "no CUDA device" in found.summary


def test_without_a_prefect_server_the_run_limits_are_left_out_with_a_note(no_kube):
    found = get_gpu_availability()
    assert found.pools == [] and found.gpu_slots is None
    assert any(note.startswith("run limits not read: no Prefect server is set") for note in found.notes)


def test_the_kube_config_is_found_when_asked_not_at_import(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert kube_config_file() is None
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("{}")
    assert kube_config_file() == str(tmp_path / ".kube" / "config")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{tmp_path / '.kube' / 'config'}")
    assert kube_config_file() == str(tmp_path / ".kube" / "config")  # only the files that exist
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert kube_config_file() is None


# --- a kube context --------------------------------------------------------------------------


def test_a_kube_context_whose_cluster_does_not_answer_is_unavailable_not_local(no_kube, monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("KUBECONFIG", str(_kube_config(tmp_path, f"http://127.0.0.1:{port}")))
    with pytest.raises(Unavailable, match="did not answer.*unset KUBECONFIG"):
        get_gpu_availability()


def _node(name, gpus, product, spot):
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product, "oppen.io/spot": f"spot-{spot}"}},
            "spec": {}, "status": {"allocatable": {"cpu": "94", "nvidia.com/gpu": str(gpus)},
                                   "conditions": [{"type": "Ready", "status": "True"}]}}


def _pod(name, node, gpus):
    return {"metadata": {"name": name, "namespace": "ml-training"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i", "resources": {
                "requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": "Running"}}


STAND_IN = {
    "/api/v1/nodes": [_node("l4-a", 4, L4, False), _node("l4-b", 8, L4, False), _node("a100-spot", 8, A100, True)],
    "/api/v1/pods": [_pod("p1", "l4-a", 3), _pod("p2", "a100-spot", 8)],
    "/api/v1/resourcequotas": [{"metadata": {"name": "gpus", "namespace": "ml-training"},
                                "status": {"hard": {"requests.nvidia.com/gpu": "8"},
                                           "used": {"requests.nvidia.com/gpu": "3"}}}],
}


class _StandIn(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        items = STAND_IN.get(self.path.split("?")[0])
        body = json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}).encode()
        self.send_response(200 if items is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_api(no_kube, monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("KUBECONFIG", str(_kube_config(tmp_path, f"http://127.0.0.1:{server.server_port}")))
    yield
    server.shutdown()


def test_with_a_kube_context_it_reports_the_clusters_gpus_per_type_and_capacity(stand_in_api):
    found = get_gpu_availability()
    assert found.source == "kubernetes" and found.kube_context == "stand-in" and found.devices == []
    rows = {(row.gpu_type, row.capacity): row for row in found.gpu_types}
    l4 = rows[(L4, "on-demand")]
    assert (l4.nodes, l4.allocatable, l4.used, l4.free, l4.largest_node, l4.largest_free) == (2, 12, 3, 9, 8, 8)
    assert rows[(A100, "spot")].free == 0
    assert [(q.namespace, q.hard, q.used, q.left) for q in found.quotas] == [("ml-training", 8, 3, 5)]
    assert [row.capacity for row in get_gpu_availability(spot=True).gpu_types] == ["spot"]


def test_a_kubernetes_pool_request_gets_the_clusters_verdict(stand_in_api):
    priced = {"cost": {"resources": {"gpus": 8, "gpu_type": L4, "cpu_cores": 4}}}
    waits = check_pool_request("kubernetes-gpu", "normal", {"gpu_count": 8, "gpu_type": L4, "image": "i:1",
                                                            "priority_class_name": "oppen-normal"}, priced)
    assert waits.problems == [] and waits.cluster is not None and waits.cluster.free_on_one_node == 8
    # 8 L4s free on one node, but the namespace's quota has 5 left: it waits in its queue.
    assert not waits.cluster.starts_now and "quota" in waits.notes[0]
    too_big = {"cost": {"resources": {"gpus": 16, "gpu_type": L4, "cpu_cores": 4}}}
    never = check_pool_request("kubernetes-gpu", "normal", {"gpu_count": 16, "gpu_type": L4, "image": "i:1",
                                                            "priority_class_name": "oppen-normal"}, too_big)
    assert never.problems and "largest on-demand NVIDIA-L4 node has 8" in never.problems[0]


# --- requests against their pool (no cluster involved) -----------------------------------------


def test_a_local_pool_request_for_gpus_this_machine_lacks_cannot_run_here():
    found = check_pool_request("local", "normal", {}, {"cost": {"resources": {"gpus": torch.cuda.device_count() + 1}}})
    assert not found.runs_here and "GPU(s) but this machine has" in found.problems[0]
    assert check_pool_request("local", "normal", {}, {}).problems == []


def test_pool_findings_name_unknown_queues_and_mispriced_pods(no_kube):
    assert "unknown queue 'fast'" in check_pool_request("local", "fast", {}, {}).problems[0]
    mispriced = check_pool_request("kubernetes-gpu", "normal", {"gpu_count": 1, "gpu_type": L4, "image": "i:1",
                                                                "priority_class_name": "oppen-normal"},
                                   {"cost": {"resources": {"gpus": 0}}})
    assert "priced as gpus=0" in mispriced.problems[0]
    unchecked = check_pool_request("kubernetes-gpu", "normal", {"gpu_count": 1, "gpu_type": L4, "image": "i:1",
                                                                "priority_class_name": "oppen-normal"},
                                   {"cost": {"resources": {"gpus": 1, "gpu_type": L4}}})
    assert unchecked.problems == [] and unchecked.cluster is None and "no kube context" in unchecked.notes[0]


def test_gpu_type_rows_keep_spot_and_on_demand_apart():
    nodes = [NodeGpus("a", L4, False, 4, 1, True), NodeGpus("b", L4, True, 4, 0, True),
             NodeGpus("c", L4, True, 2, 0, False)]
    rows = gpu_type_rows(nodes)
    assert [(r.capacity, r.nodes, r.free, r.largest_free) for r in rows] == [("on-demand", 1, 3, 3), ("spot", 2, 4, 4)]


def test_run_async_works_inside_a_running_event_loop():
    import asyncio

    async def answer():
        return 42

    async def inside():
        return resources.run_async(answer)

    assert resources.run_async(answer) == 42 and asyncio.run(inside()) == 42


# --- the forecast's arithmetic ------------------------------------------------------------------

SPEED = SpeedEstimate(seconds_per_sample=0.001, epoch_overhead_seconds=2.0, fixed_overhead_seconds=5.0,
                      tail_seconds=1.0, source="history", observations=1, spread=0.0)


def _figures(status="FINISHED", steps_done=30, epochs=1, max_steps=30):
    return RunFigures(status=status, batch_size=100, epochs=epochs, max_steps=max_steps, steps_per_epoch=400,
                      steps_done=steps_done, accrued_usd=0.01, step_seconds=0.1, step_source="test",
                      epoch_overhead_s=2.0, fixed_overhead_s=5.0, tail_s=1.0)


def test_n_more_epochs_of_an_ended_run_pay_each_epoch_and_one_restart():
    work = work_ahead(_figures(), SPEED, 2)
    assert work.epoch_seconds == pytest.approx(400 * 0.1 + 2.0)
    assert work.training_seconds == pytest.approx(2 * work.epoch_seconds)
    assert work.overhead_seconds == pytest.approx(5.0 + 1.0)  # loading again, then the test pass and logging


def test_a_finished_run_has_nothing_left_of_its_plan():
    work = work_ahead(_figures(), SPEED, None)
    assert (work.epochs, work.training_seconds, work.overhead_seconds) == (0.0, 0.0, 0.0)


def test_a_running_run_pays_the_rest_of_its_plan_with_the_meters_formula_and_its_tail():
    work = work_ahead(_figures(status="RUNNING", steps_done=500, epochs=3, max_steps=None), SPEED, None)
    # 700 steps left, and two epoch ends (at 800 and 1200): the first one is behind it.
    assert work.training_seconds == pytest.approx(700 * 0.1 + 2 * 2.0)
    assert work.overhead_seconds == pytest.approx(1.0) and work.epochs == pytest.approx(700 / 400)
