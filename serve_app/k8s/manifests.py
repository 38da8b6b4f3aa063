"""The manifests: a KubeRay ``RayService`` (its ``serveConfigV2`` is Ray Serve's own dump of the
deployments `serve_app.app.build_app` makes from the inline config), a Prometheus Operator
``PodMonitor`` for the Ray pods' metrics port, and a model store (a PVC and a Job that fills it
from the Hub); `dump_yaml` writes them out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from serve_app.config import AppConfig, VLLMEngineConfig
from serve_app.k8s.options import (
    API_KEYS_DIR,
    MODELS_ROOT,
    RayServiceOptions,
    RenderError,
    app_config_from_serve_args,
    hub_repo,
    inline_args,
    model_path,
)

__all__ = [
    "APP_IMPORT_PATH",
    "APP_LABEL",
    "APP_LABEL_VALUE",
    "APP_NAME",
    "HAPROXY_ENV",
    "KUBERAY_VERSION",
    "METRICS_PORT",
    "RAY_VERSION",
    "dump_yaml",
    "model_store_manifests",
    "podmonitor_manifest",
    "rayservice_manifest",
    "runtime_env",
    "serve_config",
]

RAY_VERSION = "2.60.0"          # pyproject's ray[serve] pin (a test checks they agree)
KUBERAY_VERSION = "1.7.0"       # the operator release the vendored RayService CRD belongs to
APP_IMPORT_PATH = "serve_app.app:build_app"
APP_NAME = "default"            # as `python -m serve_app` names it
METRICS_PORT = 8080             # Ray's metrics export port (docs/metrics.md)
APP_LABEL = "app.kubernetes.io/name"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # Ray 2.60: HAProxy instead of Serve's Python HTTP proxy (ingress.haproxy)
APP_LABEL_VALUE = "tiered-llm-serve"


# ------------------------------------------------------------------------------- serveConfigV2

def termination_grace_period_s(config: AppConfig) -> int:
    """Kubernetes' grace period for a pod: Serve's graceful shutdown of the replicas
    (`serve_app.app.replica_graceful_shutdown_timeout_s`, the longest of the deployments': with
    autoscaling, a removed replica's drain) and 15 s more for Ray to stop."""
    from serve_app.app import replica_graceful_shutdown_timeout_s

    return math.ceil(replica_graceful_shutdown_timeout_s(config) + 15)


def serve_config(config: AppConfig, runtime_env: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Serve config (``serveConfigV2``) for ``config``; validated with Ray's schema."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.deployment import deployment_to_schema
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import build_app

    args = inline_args(config)
    rebuilt = app_config_from_serve_args(args)
    if rebuilt != config:  # pragma: no cover - a bug in inline_args, not a user error
        raise RuntimeError("the inline config does not rebuild the same AppConfig")
    built = build_serve_app(build_app(args), name=APP_NAME)
    deployments = [deployment_to_schema(d).model_dump(mode="json", exclude_unset=True) for d in built.deployments]
    app: dict[str, Any] = {"name": APP_NAME, "route_prefix": "/", "import_path": APP_IMPORT_PATH}
    if runtime_env:
        app["runtime_env"] = dict(runtime_env)
    app["args"] = args
    app["deployments"] = deployments
    out = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http.host, "port": config.http.port,
                         "request_timeout_s": config.http.request_timeout_s},
        "applications": [app],
    }
    ServeDeploySchema.model_validate(out)
    return out


# --------------------------------------------------------------------------------- the manifest

def _quantity(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{int(round(x * 1000))}m"


@dataclass(frozen=True)
class _Layout:
    gpu: bool
    gpus_per_pod: int
    workers: int
    min_workers: int
    max_workers: int
    worker_ray_cpus: int
    worker_cpu: str
    worker_cpu_limit: str
    worker_memory: str
    head_cpu: str
    head_cpu_limit: str
    head_memory: str
    shm_size: str | None


def _layout(config: AppConfig, opts: RayServiceOptions) -> _Layout:
    r = config.replicas
    gpu = r.gpus_per_replica > 0
    if gpu:
        if not float(r.gpus_per_replica).is_integer():
            raise RenderError(f"replicas.gpus_per_replica is {r.gpus_per_replica}: one vLLM engine per pod needs a "
                              "whole number of GPUs")
        gpus = int(r.gpus_per_replica)
        ray_cpus = opts.worker_ray_cpus if opts.worker_ray_cpus is not None else math.ceil(r.cpus_per_replica)
        if ray_cpus < r.cpus_per_replica:
            raise RenderError(f"--worker-ray-cpus {ray_cpus} is less than replicas.cpus_per_replica "
                              f"{r.cpus_per_replica}: no replica would fit on a worker")

        def pods(replicas: int) -> int:
            return replicas  # one replica per pod

        worker_cpu = opts.worker_cpu or _quantity(ray_cpus + 1)                  # + raylet, proxy, agent
        worker_limit, worker_memory, head_cpu, head_limit, head_memory, shm = worker_cpu, "48Gi", "2", "2", "8Gi", "8Gi"
    else:
        gpus = 0
        ray_cpus = opts.worker_ray_cpus if opts.worker_ray_cpus is not None else 2

        def pods(replicas: int) -> int:
            return max(1, math.ceil(replicas * r.cpus_per_replica / max(ray_cpus, 1)))

        # small requests (a kind/minikube laptop), limits that let Ray use its CPUs when they are free
        worker_cpu = opts.worker_cpu or "500m"
        worker_limit = opts.worker_cpu or str(ray_cpus)
        worker_memory, head_cpu, head_limit, head_memory, shm = "2Gi", "500m", "1", "3Gi", None
    # the worker group follows the replicas: their autoscaling bounds, when set, bound the pods
    workers = opts.workers if opts.workers is not None else pods(r.initial_count)
    lo = opts.min_workers if opts.min_workers is not None else min(workers, pods(r.min_count))
    hi = opts.max_workers if opts.max_workers is not None else max(workers, lo, pods(r.max_count))
    if not 0 <= lo <= workers <= hi:
        raise RenderError(f"worker bounds must satisfy 0 <= min ({lo}) <= workers ({workers}) <= max ({hi})")
    return _Layout(gpu=gpu, gpus_per_pod=gpus, workers=workers, min_workers=lo, max_workers=hi,
                   worker_ray_cpus=ray_cpus, worker_cpu=worker_cpu, worker_cpu_limit=worker_limit,
                   worker_memory=opts.worker_memory or worker_memory, head_cpu=opts.head_cpu or head_cpu,
                   head_cpu_limit=opts.head_cpu or head_limit,
                   head_memory=opts.head_memory or head_memory,
                   shm_size=opts.shm_size if opts.shm_size is not None else shm)


def _labels(opts: RayServiceOptions) -> dict[str, str]:
    return {APP_LABEL: APP_LABEL_VALUE, "app.kubernetes.io/instance": opts.name}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _fetch_init_container(opts: RayServiceOptions, repo: str, path: str, *, tokenizer_only: bool) -> dict[str, Any]:
    cmd = ["python", "-m", "serve_app.k8s", "fetch-model", "--repo", repo, "--dir", path]
    if tokenizer_only:
        cmd.append("--tokenizer-only")
    return {
        "name": "fetch-model",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": cmd,
        "env": [_secret_env("HF_TOKEN", opts.hf_token_secret, opts.hf_token_secret_key)],  # type: ignore[arg-type]
        "volumeMounts": [{"name": "models", "mountPath": MODELS_ROOT}],
    }


def _pod_template(config: AppConfig, opts: RayServiceOptions, lay: _Layout, *, head: bool) -> dict[str, Any]:
    port = config.http.port
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}] if head else []
    ports += [{"containerPort": port, "name": "serve"}, {"containerPort": METRICS_PORT, "name": "metrics"}]
    cpu, limit, memory = ((lay.head_cpu, lay.head_cpu_limit, lay.head_memory) if head
                          else (lay.worker_cpu, lay.worker_cpu_limit, lay.worker_memory))
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": limit, "memory": memory}}
    if lay.gpu and not head:
        for part in ("requests", "limits"):
            resources[part]["nvidia.com/gpu"] = str(lay.gpus_per_pod)
    env: list[dict[str, Any]] = []
    if config.ingress.haproxy:  # Ray 2.60 reads it in every Ray process of every node (serve_app.config.IngressConfig)
        env.append({"name": HAPROXY_ENV, "value": "1"})
    if opts.api_keys == "env":
        env.append(_secret_env(config.api_keys.env, opts.api_keys_secret, opts.api_keys_secret_key))  # type: ignore[arg-type]
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    init: list[dict[str, Any]] = []
    if opts.api_keys == "file":
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": opts.api_keys_secret,
                                                        "items": [{"key": opts.api_keys_secret_key,
                                                                   "path": opts.api_keys_secret_key}]}})
    if isinstance(config.engine, VLLMEngineConfig) and "engine.model" not in opts.sets:
        if opts.model_pvc is not None:
            mounts.append({"name": "models", "mountPath": MODELS_ROOT, "readOnly": True})
            volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": opts.model_pvc, "readOnly": True}})
        else:
            mounts.append({"name": "models", "mountPath": MODELS_ROOT})
            size = "1Gi" if head else opts.model_cache_size
            volumes.append({"name": "models", "emptyDir": {"sizeLimit": size}})
            # the head hosts no engine: it needs the tokenizer (for an ingress placed there) only
            init.append(_fetch_init_container(opts, hub_repo(config, opts), model_path(config, opts),
                                              tokenizer_only=head))
    if lay.shm_size and not head:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": lay.shm_size}})
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "ports": ports,
        "resources": resources,
    }
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {}
    if init:
        spec["initContainers"] = init
    spec["containers"] = [container]
    # the pod outlives the ingress's drain and Serve's graceful shutdown (serve_app.app)
    spec["terminationGracePeriodSeconds"] = termination_grace_period_s(config)
    if volumes:
        spec["volumes"] = volumes
    if lay.gpu and not head:
        if opts.node_selector:
            spec["nodeSelector"] = dict(opts.node_selector)
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": _labels(opts)}, "spec": spec}


def runtime_env(config: AppConfig, opts: RayServiceOptions) -> dict[str, Any]:
    env: dict[str, str] = {}
    if isinstance(config.engine, VLLMEngineConfig):
        # the weights are a local folder in every pod: never reach for the Hub at serve time
        env.update({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
    env.update(opts.runtime_env_vars)
    return {"env_vars": env} if env else {}


def rayservice_manifest(config: AppConfig, opts: RayServiceOptions) -> dict[str, Any]:
    """The RayService object for ``config`` (already resolved with `resolve_config`)."""
    if opts.api_keys not in ("env", "file", "none"):
        raise RenderError(f"--api-keys must be env, file or none, got {opts.api_keys!r}")
    if opts.api_keys == "env" and config.api_keys.env is None:
        raise RenderError("--api-keys env, but the config sets no api_keys.env variable")
    if opts.api_keys == "none" and not config.api_keys.hashes:
        raise RenderError("--api-keys none, but the config has no api_keys.hashes: no request could authenticate")
    if opts.upgrade_strategy not in ("NewCluster", "None"):
        raise RenderError(f"--upgrade-strategy must be NewCluster or None, got {opts.upgrade_strategy!r}")
    lay = _layout(config, opts)
    head_params = {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0",
                   "metrics-export-port": str(METRICS_PORT)}
    worker_params = {"num-cpus": str(lay.worker_ray_cpus), "num-gpus": str(lay.gpus_per_pod),
                     "metrics-export-port": str(METRICS_PORT)}
    group = {
        "groupName": "gpu" if lay.gpu else "cpu",
        "replicas": lay.workers,
        "minReplicas": lay.min_workers,
        "maxReplicas": lay.max_workers,
        "rayStartParams": worker_params,
        "template": _pod_template(config, opts, lay, head=False),
    }
    cluster: dict[str, Any] = {"rayVersion": RAY_VERSION}
    if lay.min_workers != lay.max_workers:
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {
            "upscalingMode": "Default", "idleTimeoutSeconds": 300,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                          "limits": {"cpu": "500m", "memory": "512Mi"}},
        }
    cluster["authOptions"] = {"mode": "token"}  # Ray's token authentication, always (KubeRay makes the Secret)
    cluster["headGroupSpec"] = {"rayStartParams": head_params, "template": _pod_template(config, opts, lay, head=True)}
    cluster["workerGroupSpecs"] = [group]
    metadata: dict[str, Any] = {"name": opts.name}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    metadata["labels"] = _labels(opts)
    serve = serve_config(config, runtime_env(config, opts))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": {"type": opts.upgrade_strategy},
            "serveConfigV2": dump_yaml(serve),
            "rayClusterConfig": cluster,
        },
    }


def podmonitor_manifest(name: str = APP_LABEL_VALUE, release: str | None = "prometheus",
                        namespace: str | None = None, interval: str = "15s") -> dict[str, Any]:
    """A Prometheus Operator PodMonitor scraping every Ray pod of the app on its metrics port."""
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    labels = {APP_LABEL: APP_LABEL_VALUE}
    if release:
        labels["release"] = release  # kube-prometheus-stack selects monitors by its release label
    metadata["labels"] = labels
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {APP_LABEL: APP_LABEL_VALUE}},
            # keep the cluster and node type as labels (Ray's own dashboards filter on ray_io_cluster)
            "podTargetLabels": ["ray.io/cluster", "ray.io/node-type", "ray.io/group"],
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": interval}],
        },
    }


def model_store_manifests(config: AppConfig, opts: RayServiceOptions, *, pvc: str, size: str,
                          storage_class: str | None, access_mode: str) -> list[dict[str, Any]]:
    """A PVC for the weights and a Job that downloads them into it (``HF_TOKEN`` from a Secret)."""
    if not isinstance(config.engine, VLLMEngineConfig):
        raise RenderError("model-store is for the vllm backend (the config's engine.backend is sim)")
    fetch_opts = RayServiceOptions(image=opts.image, hf_token_secret=opts.hf_token_secret or "hf-token",
                                   hf_token_secret_key=opts.hf_token_secret_key, hf_repo=opts.hf_repo,
                                   model_dir=opts.model_dir, image_pull_policy=opts.image_pull_policy)
    claim_spec: dict[str, Any] = {"accessModes": [access_mode], "resources": {"requests": {"storage": size}}}
    if storage_class:
        claim_spec["storageClassName"] = storage_class
    labels = {APP_LABEL: APP_LABEL_VALUE}
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": pvc, "labels": labels}, "spec": claim_spec}
    init = _fetch_init_container(fetch_opts, hub_repo(config, fetch_opts), model_path(config, fetch_opts),
                                 tokenizer_only=False)
    init["resources"] = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{pvc}-fetch", "labels": labels},
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [init],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": pvc}}],
                },
            },
        },
    }
    for obj in (claim, job):
        if opts.namespace:
            obj["metadata"] = {"name": obj["metadata"]["name"], "namespace": opts.namespace,
                               "labels": obj["metadata"]["labels"]}
    return [claim, job]


# ------------------------------------------------------------------------------------ YAML out

class _Dumper(yaml.SafeDumper):
    """Block style, no anchors/aliases; multi-line strings (serveConfigV2) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)
