"""Derive the `kubernetes-gpu` base job template from prefect-kubernetes' own default.

    python -m work_pools.kubernetes_template   # rewrites work_pools/kubernetes-gpu.json

The committed JSON is what the worker and `work_pools.apply` use; a test checks it still equals
what this derivation gives from the installed prefect-kubernetes, so an upgrade that changes the
default template shows up as a failing test instead of silently diverging.

Prefect's templating only substitutes values: it has no conditionals and cannot merge maps or
lists. Every addition is therefore written so that each value of its variable renders a valid
manifest on its own:

- `gpu_type` is a required node-affinity expression on NVIDIA GPU feature discovery's product
  label, so it always has a value (the pool is for GPU runs; CPU work uses the `local` pool).
- `spot` renders into a required node-affinity expression on the `oppen.io/spot` label: spot runs
  may only land on spot nodes, on-demand runs only on on-demand nodes, so the price a run was
  quoted is the node class it gets. Prefect writes the boolean as `True`/`False`, so node pools
  are labelled `oppen.io/spot=spot-True` or `oppen.io/spot=spot-False` (see infra/README.md).
  Tolerating the spot taint is unconditional: a toleration only allows, the affinity decides.
- `tolerations` is one list (the server refuses placeholders that are not variables, so lists
  cannot be spliced); its default holds the platform tolerations (GPU and spot taints), and
  `work_pools.job_variables` refuses a list that drops them, with the entries to keep.
- The default's `cpu_*` and `memory_*` variables are free strings: "2 cores" or "16GB" passes
  Prefect and fails only when Kubernetes refuses the Job. They get Kubernetes quantity patterns.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TEMPLATE_FILE = HERE / "kubernetes-gpu.json"

MAX_TOLERATIONS = 8
PRIORITY_CLASSES = ("oppen-urgent", "oppen-normal", "oppen-background")
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on every GPU node by NVIDIA GPU feature discovery
SPOT_LABEL = "oppen.io/spot"
DEFAULT_GPU_TYPE = "NVIDIA-L4"
RUN_METRICS_PORT_NAME = "oppen-metrics"  # infra/monitoring/scrape's PodMonitor scrapes the pods' port of this name
RUN_METRICS_PORT = 8781
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# GPU node pools are tainted so CPU pods stay off them; spot pools carry the spot taint too.
PLATFORM_TOLERATIONS = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    {"key": SPOT_LABEL, "operator": "Exists", "effect": "NoSchedule"},
]

TOLERATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string"},
        "operator": {"type": "string", "enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    },
}

# Kubernetes' resource.Quantity grammar, without a sign (a negative request is always a mistake):
# a number ("2", "0.5", "1.", ".5") and a suffix. apimachinery's own regex accepts any run of suffix
# letters and leaves the rest to its parser; these accept only the suffixes that parser knows.
_NUMBER = r"([0-9]+(\.[0-9]*)?|\.[0-9]+)"
# Cores or millicores. Other suffixes parse ("2k", "1Gi" CPUs), but no node has that many cores:
# on a CPU quantity they are a memory value pasted in the wrong place, and the pod would stay Pending.
CPU_QUANTITY_PATTERN = rf"^{_NUMBER}m?$"
# Bytes: decimal SI (k M G T P E), binary (Ki Mi Gi Ti Pi Ei) or a decimal exponent (1e9, 5E6).
# "m" (milli) parses too, but "500m" of memory is half a byte: someone meant 500M or 500Mi.
MEMORY_QUANTITY_PATTERN = rf"^{_NUMBER}([kMGTPE]|[KMGTPE]i|[eE][0-9]+)?$"
CPU_QUANTITY = "a Kubernetes CPU quantity: cores (2, 0.5, 1.5) or millicores (500m)"
MEMORY_QUANTITY = ("a Kubernetes memory quantity: bytes with a binary (128Mi, 16Gi) or decimal (512M, 1G) suffix, "
                   "an exponent (1e9) or none (2048)")
# variable: (what it sets, the pattern, the format in words)
RESOURCE_QUANTITIES = {
    "cpu_request": ("CPU request", CPU_QUANTITY_PATTERN, CPU_QUANTITY),
    "cpu_limit": ("CPU limit", CPU_QUANTITY_PATTERN, CPU_QUANTITY),
    "memory_request": ("memory request", MEMORY_QUANTITY_PATTERN, MEMORY_QUANTITY),
    "memory_limit": ("memory limit", MEMORY_QUANTITY_PATTERN, MEMORY_QUANTITY),
}

ADDED_VARIABLES: dict[str, dict[str, Any]] = {
    "gpu_count": {
        "title": "GPUs",
        "description": "nvidia.com/gpu limit of the flow-run container (and the GPU slots the run holds).",
        "type": "integer", "minimum": 1, "maximum": 16, "default": 1,
    },
    "gpu_type": {
        "title": "GPU type",
        "description": f"Value of the node label {GPU_PRODUCT_LABEL} the run must land on (e.g. NVIDIA-A100-SXM4-80GB).",
        "type": "string", "pattern": LABEL_VALUE_PATTERN, "minLength": 1, "maxLength": 63,
        "default": DEFAULT_GPU_TYPE,
    },
    "node_selector": {
        "title": "Node selector",
        "description": "Extra node labels the pod requires (the pod's nodeSelector).",
        "type": "object", "additionalProperties": {"type": "string"}, "default": {},
    },
    "tolerations": {
        "title": "Tolerations",
        "description": "The pod's tolerations. Keep the two defaults (GPU and spot taints) and add yours after them.",
        "type": "array", "items": TOLERATION_SCHEMA, "maxItems": MAX_TOLERATIONS, "default": PLATFORM_TOLERATIONS,
    },
    "priority_class_name": {
        "title": "Priority class",
        "description": "oppen-urgent preempts; oppen-background is preempted first (infra/base/priority-classes.yaml).",
        "type": "string", "enum": list(PRIORITY_CLASSES), "default": "oppen-normal",
    },
    "spot": {
        "title": "Spot",
        "description": f"Run on spot capacity: require {SPOT_LABEL}=spot-True nodes (on-demand runs require spot-False).",
        "type": "boolean", "default": False,
    },
    "shm_size": {
        "title": "Shared memory",
        "description": "Size of the memory-backed /dev/shm (PyTorch DataLoader workers pass batches through it).",
        "type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Mi|Gi)$", "default": "2Gi",
    },
    "checkpoint_claim": {
        "title": "Checkpoint PVC",
        "description": "PersistentVolumeClaim mounted for checkpoints, so a rescheduled pod resumes where the last one stopped.",
        "type": "string", "pattern": DNS_LABEL_PATTERN, "default": "oppen-checkpoints",
    },
    "checkpoint_mount_path": {
        "title": "Checkpoint mount path",
        "description": "Where the checkpoint volume is mounted; passed to training as OPPEN_CHECKPOINT_ROOT.",
        "type": "string", "pattern": r"^/[^\s]*$", "default": "/checkpoints",
    },
    "active_deadline_seconds": {
        "title": "Deadline (s)",
        "description": "Kubernetes kills the Job after this long: a hung run cannot bill forever.",
        "type": "integer", "minimum": 60, "default": 86400,
    },
}


def derive(default: dict[str, Any]) -> dict[str, Any]:
    """Our GPU template from prefect-kubernetes' default: all its variables kept, ours added."""
    template = copy.deepcopy(default)
    properties = template["variables"]["properties"]
    missing = {"env", "image", "backoff_limit", "namespace", *RESOURCE_QUANTITIES} - set(properties)
    if missing:
        raise ValueError(f"prefect-kubernetes' default template lacks variables this derivation needs: {sorted(missing)}")
    properties.update(copy.deepcopy(ADDED_VARIABLES))
    # 0: an eviction or spot reclaim must reschedule the flow run (SIGTERM → Prefect), not make
    # Kubernetes start a second pod for the same run while Prefect also retries it.
    properties["namespace"]["default"] = "ml-training"  # infra/base/namespace.yaml
    properties["service_account_name"]["default"] = "oppen-run"  # no Kubernetes API access
    properties["backoff_limit"].update({"default": 0, "maximum": 0,
                                        "description": "Always 0: Prefect reschedules interrupted runs, Kubernetes must not."})
    for name, (what, pattern, quantity) in RESOURCE_QUANTITIES.items():
        # Still nullable (null: none is set); the string branch's description is what
        # work_pools.job_variables quotes when a value does not match.
        properties[name]["anyOf"] = [{"type": "string", "pattern": pattern, "description": quantity}, {"type": "null"}]
        properties[name]["description"] = f"The flow-run container's {what}, as {quantity}. Null: no {what}."

    configuration = template["job_configuration"]
    # Fixed env under the user's: Prefect merges deployment env over this dict.
    # The run serves its Prometheus metrics on a fixed, named port on every interface of its pod.
    configuration["env"] = {"OPPEN_CHECKPOINT_ROOT": "{{ checkpoint_mount_path }}",
                            "OPPEN_METRICS_PORT": str(RUN_METRICS_PORT), "OPPEN_METRICS_HOST": "0.0.0.0"}
    job = configuration["job_manifest"]
    job["spec"]["activeDeadlineSeconds"] = "{{ active_deadline_seconds }}"
    pod = job["spec"]["template"]["spec"]
    # The default puts Job fields into the pod spec, where the API server rejects them (strict
    # field validation) or drops them; they belong to the Job.
    for job_field in ("completions", "parallelism"):
        if job_field in pod:
            job["spec"][job_field] = pod.pop(job_field)
    job["spec"]["template"]["metadata"] = {"labels": {"oppen.io/spot": "spot-{{ spot }}"}}
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["ports"] = [{"name": RUN_METRICS_PORT_NAME, "containerPort": RUN_METRICS_PORT, "protocol": "TCP"}]
    container["volumeMounts"] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "checkpoints", "mountPath": "{{ checkpoint_mount_path }}"},
    ]
    # Where MLflow, the ledger (PostgreSQL) and Prefect live comes from the namespace
    # (infra/base/runtime-config.yaml and the `oppen-runtime` Secret), never from a deployment.
    # Not optional: a pod without them would train, then record to a throwaway SQLite file.
    container["envFrom"] = [{"configMapRef": {"name": "oppen-runtime"}}, {"secretRef": {"name": "oppen-runtime"}}]
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                              "seccompProfile": {"type": "RuntimeDefault"}}
    pod["volumes"] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}},
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "{{ checkpoint_claim }}"}},
    ]
    pod["priorityClassName"] = "{{ priority_class_name }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": ["{{ gpu_type }}"]},
                            {"key": SPOT_LABEL, "operator": "In", "values": ["spot-{{ spot }}"]},
                        ]
                    }
                ]
            }
        }
    }
    return template


def prefect_kubernetes_default() -> dict[str, Any]:
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def render_json(template: dict[str, Any]) -> str:
    return json.dumps(template, indent=2, sort_keys=False) + "\n"


def main() -> None:
    TEMPLATE_FILE.write_text(render_json(derive(prefect_kubernetes_default())))
    print(f"wrote {TEMPLATE_FILE}")


if __name__ == "__main__":
    main()
