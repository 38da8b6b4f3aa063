"""Kubernetes manifests for the app, rendered from the same pydantic config the app runs with.

``python -m serve_app.k8s render --config serve_app/configs/vllm-gpu.yaml --image IMAGE
--hf-token-secret hf-token --out k8s/rayservice-gpu.yaml`` writes a KubeRay ``RayService``
(``ray.io/v1``):

- ``serveConfigV2``: one Serve application, ``import_path: serve_app.app:build_app``, whose
  ``args`` carry the **whole validated config inline** (``args.overrides``: every top-level
  section, which `serve_app.app.build_app` lays over its built-in default config, so nothing in the
  image's copy of a config file matters), plus the Kubernetes overrides (``http.host: 0.0.0.0``,
  the model folder, the key file).  Its ``deployments`` are Ray Serve's own dump
  (`ray.serve.deployment.deployment_to_schema`, as ``serve build`` writes it) of the deployments
  `build_app` makes from those args, so replica counts, actor resources, ``max_ongoing_requests``
  and the tier-aware router config are exactly what the code sets.  The result is validated
  with `ray.serve.schema.ServeDeploySchema` before it is written.
- ``rayClusterConfig``: a CPU head (``num-cpus: 0``, ``num-gpus: 0``: the Serve controller and
  HTTP proxy only, no replica fits there) and one worker group: for a GPU config one pod per
  replica with ``nvidia.com/gpu: gpus_per_replica`` and ``num-cpus: cpus_per_replica`` (one
  vLLM engine each), for a CPU config (the simulated engine) small CPU pods.  ``replicas`` is
  ``replicas.num_replicas`` (GPU); ``minReplicas``/``maxReplicas`` bound the Ray autoscaler,
  which is enabled when they differ.  Ray's metrics export port (8080, docs/metrics.md) is set and
  exposed as the container port ``metrics`` on every Ray pod (what the PodMonitor scrapes).
  Ray token authentication is on (``authOptions.mode: token``: KubeRay makes the token Secret).
- API keys: ``TIERED_API_KEYS`` from a Secret (``--api-keys env``, default) or the Secret
  mounted as the key file (``--api-keys file``: ``api_keys.file`` points at it).
- Model weights (vllm backend): from a PersistentVolumeClaim mounted at ``/models``
  (``--model-pvc``), or downloaded by an init container from the Hugging Face Hub with
  ``HF_TOKEN`` from a Secret (``--hf-token-secret``); either way ``engine.model`` becomes the local
  folder, which the ingress also needs (it tokenizes with the model's ``tokenizer.json``).
- Readiness: KubeRay's own probes (the raylet, and on workers the Serve proxy's ``/-/healthz``)
  decide which pods the ``<name>-serve-svc`` Service sends traffic to; the RayService's
  ``serviceUnhealthySecondThreshold``/``deploymentUnhealthySecondThreshold`` are deprecated and
  ignored by KubeRay (>= 1.1), so they are not set; ``upgradeStrategy`` picks how cluster changes
  roll out (``NewCluster``: a new cluster, traffic switched when it is ready; ``None``).

Other commands: ``podmonitor`` (a Prometheus Operator PodMonitor for the Ray pods' metrics port),
``model-store`` (a PVC and a Job that fills it from the Hub), ``fetch-model`` (what the init
containers and that Job run), and ``render-all [--check]`` (re-render every manifest committed in
k8s/, listed in `MANIFESTS`; ``--check`` only compares).

Rendering never reads the shell's environment: ``${VAR:-default}`` in a config renders with its
default, so a manifest is the same wherever it is rendered; give values with ``--set KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from serve_app.config import DEFAULT_CONFIG_PATH, AppConfig, ConfigError, VLLMEngineConfig, _is_path, load_config

__all__ = [
    "APP_IMPORT_PATH",
    "KUBERAY_VERSION",
    "MANIFESTS",
    "RAY_VERSION",
    "RayServiceOptions",
    "app_config_from_serve_args",
    "main",
    "rayservice_manifest",
    "render",
]

RAY_VERSION = "2.60.0"          # pyproject's ray[serve] pin (a test checks they agree)
KUBERAY_VERSION = "1.7.0"       # the operator release the vendored RayService CRD belongs to
APP_IMPORT_PATH = "serve_app.app:build_app"
APP_NAME = "default"            # as `python -m serve_app` names it
METRICS_PORT = 8080             # Ray's metrics export port (docs/metrics.md)
APP_LABEL = "app.kubernetes.io/name"
APP_LABEL_VALUE = "tiered-llm-serve"
MODELS_ROOT = "/models"
API_KEYS_DIR = "/etc/tiered-api-keys"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Files the ingress (tokenizer) and build_app (max_position_embeddings) read from a model folder.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "generation_config.json"]

# Every manifest committed in k8s/ and the command that renders it (paths relative to the repo
# root).  `render-all` re-renders them; tests/k8s checks the files are up to date.
MANIFESTS: dict[str, list[str]] = {
    "k8s/rayservice-sim-cpu.yaml": [
        "render", "--config", "serve_app/configs/sim.yaml", "--image", "tiered-llm-serve:0.1.0-cpu",
        "--name", "tiered-llm-sim",
        # 0.5 Ray CPU per simulated replica: the head offers none, so the replicas go to the worker
        "--set", "replicas.cpus_per_replica=0.5",
    ],
    "k8s/rayservice-gpu.yaml": [
        "render", "--config", "serve_app/configs/vllm-gpu.yaml", "--image", "tiered-llm-serve:0.1.0-gpu",
        "--name", "tiered-llm", "--hf-token-secret", "hf-token",
    ],
    "k8s/rayservice-gpu-pvc.yaml": [
        "render", "--config", "serve_app/configs/vllm-gpu.yaml", "--image", "tiered-llm-serve:0.1.0-gpu",
        "--name", "tiered-llm", "--model-pvc", "tiered-llm-models", "--api-keys", "file",
        "--max-workers", "2",
    ],
    "k8s/model-store.yaml": [
        "model-store", "--config", "serve_app/configs/vllm-gpu.yaml", "--image", "tiered-llm-serve:0.1.0-gpu",
        "--pvc", "tiered-llm-models", "--hf-token-secret", "hf-token",
    ],
    "k8s/podmonitor.yaml": ["podmonitor"],
}


class RenderError(ValueError):
    """The config and flags cannot make a working manifest; the message says what to change."""


# ------------------------------------------------------------------------------------ options

@dataclass(frozen=True)
class RayServiceOptions:
    """What `rayservice_manifest` needs beside the config (the CLI flags of ``render``)."""

    image: str
    name: str = "tiered-llm"
    namespace: str | None = None
    image_pull_policy: str = "IfNotPresent"
    sets: Mapping[str, Any] = field(default_factory=dict)   # dotted config overrides (--set)
    api_keys: str = "env"                                      # env | file | none
    api_keys_secret: str = "tiered-api-keys"
    api_keys_secret_key: str = "api-keys"
    model_pvc: str | None = None
    hf_token_secret: str | None = None
    hf_token_secret_key: str = "hf-token"
    hf_repo: str | None = None            # default: the config's engine.model when it is a hub id
    model_dir: str | None = None          # folder name under /models (default: the repo's last part)
    model_cache_size: str = "40Gi"        # emptyDir for a Hub download
    head_cpu: str | None = None
    head_memory: str | None = None
    worker_cpu: str | None = None         # pod CPU request/limit
    worker_ray_cpus: int | None = None    # Ray's num-cpus on a worker
    worker_memory: str | None = None
    shm_size: str | None = None
    workers: int | None = None            # worker group replicas
    min_workers: int | None = None
    max_workers: int | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    upgrade_strategy: str = "NewCluster"
    ray_auth: str = "token"
    runtime_env_vars: Mapping[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------- the app config

def _hub_id(model: str | None) -> bool:
    return bool(model) and not model.startswith(("/", ".", "~")) and model.count("/") == 1  # type: ignore[union-attr]


def k8s_overrides(config: AppConfig, opts: RayServiceOptions) -> dict[str, Any]:
    """The config overrides the cluster needs, on top of ``opts.sets``: the proxy listens on every
    interface, the model is the mounted folder, the key file is the mounted Secret."""
    out: dict[str, Any] = {"http.host": "0.0.0.0"}
    eng = config.engine
    if isinstance(eng, VLLMEngineConfig) and "engine.model" not in opts.sets:
        out["engine.model"] = model_path(config, opts)
    if opts.api_keys == "file":
        out["api_keys.file"] = f"{API_KEYS_DIR}/{opts.api_keys_secret_key}"
    return out


def model_path(config: AppConfig, opts: RayServiceOptions) -> str:
    """The model folder inside the pods (vllm backend)."""
    eng = config.engine
    assert isinstance(eng, VLLMEngineConfig)
    if opts.model_pvc is None and opts.hf_token_secret is None:
        raise RenderError("the vllm backend needs the model inside the pods: give --model-pvc CLAIM (weights on a "
                          "volume, mounted at /models) or --hf-token-secret SECRET (downloaded from the Hugging Face "
                          "Hub by an init container), or --set engine.model=/path/in/the/image")
    if opts.model_pvc is not None and opts.hf_token_secret is not None:
        raise RenderError("give --model-pvc or --hf-token-secret, not both (with a PVC, fill it with `model-store`)")
    name = opts.model_dir or PurePosixPath(hub_repo(config, opts) if opts.hf_token_secret else (eng.model or "model")).name
    if not name or "/" in name or name in (".", ".."):
        raise RenderError(f"--model-dir must be one folder name under {MODELS_ROOT}, got {name!r}")
    return f"{MODELS_ROOT}/{name}"


def hub_repo(config: AppConfig, opts: RayServiceOptions) -> str:
    repo = opts.hf_repo or getattr(config.engine, "model", None)
    if not _hub_id(repo):
        raise RenderError(f"engine.model is {repo!r}, not a Hugging Face repo id (OWNER/NAME): give --hf-repo")
    return repo  # type: ignore[return-value]


def resolve_config(config_path: str | Path,
                   opts: RayServiceOptions) -> tuple[AppConfig, dict[str, Any], RayServiceOptions]:
    """The config as it will run in the cluster, the overrides that made it from the file, and
    ``opts`` with the model's Hub repo and folder name filled in (vllm).

    The environment is not read (``${VAR:-default}`` takes its default): the manifest must not
    depend on the shell that rendered it."""
    sets = dict(opts.sets)
    try:
        base = load_config(config_path, overrides=sets, environ={})
    except ConfigError:
        # e.g. `model: ${TIERED_MODEL_PATH}` with no default: the pods get their own model folder
        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        eng = raw.get("engine") if isinstance(raw, dict) else None
        if not (isinstance(eng, dict) and eng.get("backend") == "vllm" and "engine.model" not in sets):
            raise
        if not (opts.model_dir or opts.hf_repo):
            raise RenderError("engine.model has no value without the environment: give --model-dir (PVC) or "
                              "--hf-repo (Hub download), or --set engine.model=...") from None
        base = load_config(config_path, overrides={**sets, "engine.model": f"{MODELS_ROOT}/unset"}, environ={})
    if isinstance(base.engine, VLLMEngineConfig) and "engine.model" not in sets:
        path = model_path(base, opts)
        opts = replace(opts, model_dir=PurePosixPath(path).name,
                       hf_repo=hub_repo(base, opts) if opts.hf_token_secret else opts.hf_repo)
    overrides = {**sets, **k8s_overrides(base, opts)}
    config = load_config(config_path, overrides=overrides, environ={})
    _check_portable(config, overrides)
    return config, overrides, opts


def _check_portable(config: AppConfig, overrides: Mapping[str, Any]) -> None:
    """Paths the config file names on this machine do not exist in the pods: refuse them unless an
    override put them there."""
    def given(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in overrides)

    if config.api_keys.file is not None and not given("api_keys.file"):
        raise RenderError("the config names an API key file, which is not in the pods: use --api-keys file "
                          "(the Secret mounted as the key file) or --set api_keys.file=/path/in/the/pods")
    eng = config.engine
    if isinstance(eng, VLLMEngineConfig) and not str(eng.model).startswith("/"):
        raise RenderError(f"engine.model is {eng.model!r}: in the pods it must be a local folder (the ingress reads "
                          "its tokenizer.json); use --model-pvc or --hf-token-secret")
    if getattr(eng, "tokenizer", None) is not None and not given("engine.tokenizer"):
        raise RenderError("engine.tokenizer is a path on this machine: --set engine.tokenizer=/path/in/the/pods")
    if not isinstance(eng, VLLMEngineConfig) and _is_path(eng.cost_profile) and not given("engine.cost_profile"):
        raise RenderError("engine.cost_profile is a file on this machine: use a profile name, or "
                          "--set engine.cost_profile=/path/in/the/image")


def inline_args(config: AppConfig) -> dict[str, Any]:
    """``build_app`` args that rebuild exactly ``config``: every top-level field as an override of
    the built-in default config (each section replaced whole, so the default file's content never
    leaks through)."""
    return {"overrides": config.model_dump(mode="json")}


def app_config_from_serve_args(args: Mapping[str, Any]) -> AppConfig:
    """The AppConfig `serve_app.app.build_app` makes from these args (its own argument handling:
    ``config`` path, ``overrides`` and dotted keys), without the environment."""
    args = dict(args)
    overrides = dict(args.get("overrides") or {})
    overrides.update({k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in args.items() if "." in k})
    return load_config(args.get("config") or DEFAULT_CONFIG_PATH, overrides=overrides, environ={})


# ------------------------------------------------------------------------------- serveConfigV2

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
        "http_options": {"host": config.http.host, "port": config.http.port},
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
        workers = opts.workers if opts.workers is not None else r.num_replicas   # one replica per pod
        worker_cpu = opts.worker_cpu or _quantity(ray_cpus + 1)                  # + raylet, proxy, agent
        worker_limit, worker_memory, head_cpu, head_limit, head_memory, shm = worker_cpu, "48Gi", "2", "2", "8Gi", "8Gi"
    else:
        gpus = 0
        ray_cpus = opts.worker_ray_cpus if opts.worker_ray_cpus is not None else 2
        need = r.num_replicas * r.cpus_per_replica
        workers = opts.workers if opts.workers is not None else max(1, math.ceil(need / max(ray_cpus, 1)))
        # small requests (a kind/minikube laptop), limits that let Ray use its CPUs when they are free
        worker_cpu = opts.worker_cpu or "500m"
        worker_limit = opts.worker_cpu or str(ray_cpus)
        worker_memory, head_cpu, head_limit, head_memory, shm = "2Gi", "500m", "1", "3Gi", None
    lo = opts.min_workers if opts.min_workers is not None else workers
    hi = opts.max_workers if opts.max_workers is not None else max(workers, lo)
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
    if opts.ray_auth != "disabled":
        cluster["authOptions"] = {"mode": opts.ray_auth}
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


def _document(objs: Sequence[dict[str, Any]], argv: Sequence[str], config: str | None) -> str:
    src = f" from {config}" if config else ""
    head = (f"# Generated{src} by:\n#   python -m serve_app.k8s {shlex.join(argv)}\n"
            "# Do not edit: change the config or the flags and render again "
            "(`python -m serve_app.k8s render-all` re-renders everything in k8s/).\n")
    return head + "---\n".join(dump_yaml(o) for o in objs)


# ----------------------------------------------------------------------------------------- CLI

def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve_app.k8s", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, *, config: bool = True) -> None:
        if config:
            sp.add_argument("--config", required=True, help="the app config YAML (serve_app/configs/...)")
            sp.add_argument("--set", dest="sets", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                            help="a dotted config override (value read as YAML), e.g. replicas.num_replicas=2")
        sp.add_argument("--out", help="write here (default: stdout)")
        sp.add_argument("--namespace", help="metadata.namespace (default: none, use kubectl -n)")

    r = sub.add_parser("render", help="a RayService for the config")
    common(r)
    r.add_argument("--image", required=True, help="the image with this project installed (k8s/Dockerfile)")
    r.add_argument("--name", default="tiered-llm", help="RayService name (the Service is NAME-serve-svc)")
    r.add_argument("--image-pull-policy", default="IfNotPresent")
    r.add_argument("--api-keys", choices=["env", "file", "none"], default="env",
                   help="env: the config's api_keys.env variable from the Secret; file: the Secret mounted as "
                        "api_keys.file; none: only the config's api_keys.hashes")
    r.add_argument("--api-keys-secret", default="tiered-api-keys")
    r.add_argument("--api-keys-secret-key", default="api-keys")
    r.add_argument("--model-pvc", help="vllm: a PVC holding the weights, mounted read-only at /models")
    r.add_argument("--hf-token-secret", help="vllm: download the weights from the Hub (HF_TOKEN from this Secret)")
    r.add_argument("--hf-token-secret-key", default="hf-token")
    r.add_argument("--hf-repo", help="the Hub repo (default: the config's engine.model)")
    r.add_argument("--model-dir", help="the model's folder name under /models (default: the repo's name)")
    r.add_argument("--model-cache-size", default="40Gi", help="emptyDir size for a Hub download")
    r.add_argument("--head-cpu", help="head pod CPU request and limit")
    r.add_argument("--head-memory")
    r.add_argument("--worker-cpu", help="worker pod CPU request and limit")
    r.add_argument("--worker-ray-cpus", type=int, help="Ray's num-cpus on a worker")
    r.add_argument("--worker-memory")
    r.add_argument("--shm-size", help="/dev/shm on GPU workers (default 8Gi; '' for none)")
    r.add_argument("--workers", type=int, help="worker pods (default: one per replica on GPUs)")
    r.add_argument("--min-workers", type=int, help="autoscaler lower bound (default: --workers)")
    r.add_argument("--max-workers", type=int, help="autoscaler upper bound (default: --workers); "
                                                   "the Ray autoscaler runs when min != max")
    r.add_argument("--node-selector", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="GPU workers' nodeSelector, e.g. cloud.google.com/gke-accelerator=nvidia-l4")
    r.add_argument("--upgrade-strategy", choices=["NewCluster", "None"], default="NewCluster",
                   help="how RayService rolls out rayClusterConfig changes (NewCluster needs 2x the GPUs meanwhile)")
    r.add_argument("--ray-auth", choices=["token", "disabled"], default="token")
    r.add_argument("--runtime-env-var", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="an env var for the Serve app's runtime_env")

    m = sub.add_parser("model-store", help="a PVC for the weights and a Job filling it from the Hub")
    common(m)
    m.add_argument("--image", required=True)
    m.add_argument("--pvc", required=True, help="the PVC's name (render with --model-pvc NAME)")
    m.add_argument("--size", default="40Gi")
    m.add_argument("--storage-class")
    m.add_argument("--access-mode", default="ReadWriteMany",
                   help="ReadWriteMany lets pods on several nodes mount it; ReadWriteOnce on a one-node cluster")
    m.add_argument("--hf-token-secret", default="hf-token")
    m.add_argument("--hf-token-secret-key", default="hf-token")
    m.add_argument("--hf-repo")
    m.add_argument("--model-dir")

    pm = sub.add_parser("podmonitor", help="a PodMonitor for the Ray pods' metrics port")
    common(pm, config=False)
    pm.add_argument("--release-label", default="prometheus",
                    help="the `release` label kube-prometheus-stack selects monitors by ('' for none)")
    pm.add_argument("--interval", default="15s")

    ra = sub.add_parser("render-all", help="re-render every manifest committed in k8s/")
    ra.add_argument("--check", action="store_true", help="only report manifests that differ (exit 1)")

    f = sub.add_parser("fetch-model", help="download a model folder from the Hub (HF_TOKEN from the env)")
    f.add_argument("--repo", required=True)
    f.add_argument("--dir", required=True)
    f.add_argument("--revision")
    f.add_argument("--tokenizer-only", action="store_true", help="only the tokenizer and config files")
    return p


def _sets(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {k: yaml.safe_load(v) for k, v in pairs}


def render(argv: Sequence[str], base: Path | None = None) -> tuple[Path | None, str]:
    """Run a rendering command (``render``, ``model-store``, ``podmonitor``); returns where it
    writes (``--out``, resolved against ``base``, default the working directory) and the text."""
    args = _parser().parse_args(list(argv))
    base = Path.cwd() if base is None else base
    out = (base / args.out) if getattr(args, "out", None) else None
    shown = [a for a in argv]
    if "--out" in shown:  # the header names the command without its output file
        i = shown.index("--out")
        del shown[i:i + 2]
    config_arg = getattr(args, "config", None)
    if args.command == "podmonitor":
        obj = podmonitor_manifest(release=args.release_label or None, namespace=args.namespace,
                                  interval=args.interval)
        return out, _document([obj], shown, None)
    if args.command not in ("render", "model-store"):
        raise SystemExit(f"{args.command} renders nothing")
    opts_kwargs: dict[str, Any] = dict(image=args.image, namespace=args.namespace, sets=_sets(args.sets),
                                       hf_token_secret=args.hf_token_secret,
                                       hf_token_secret_key=args.hf_token_secret_key, hf_repo=args.hf_repo,
                                       model_dir=args.model_dir)
    if args.command == "render":
        opts = RayServiceOptions(
            **opts_kwargs, name=args.name, image_pull_policy=args.image_pull_policy, api_keys=args.api_keys,
            api_keys_secret=args.api_keys_secret, api_keys_secret_key=args.api_keys_secret_key,
            model_pvc=args.model_pvc, model_cache_size=args.model_cache_size, head_cpu=args.head_cpu,
            head_memory=args.head_memory, worker_cpu=args.worker_cpu, worker_ray_cpus=args.worker_ray_cpus,
            worker_memory=args.worker_memory, shm_size=args.shm_size, workers=args.workers,
            min_workers=args.min_workers, max_workers=args.max_workers, node_selector=dict(args.node_selector),
            upgrade_strategy=args.upgrade_strategy, ray_auth=args.ray_auth,
            runtime_env_vars=dict(args.runtime_env_var))
        config, _, opts = resolve_config(base / config_arg, opts)
        objs = [rayservice_manifest(config, opts)]
        if not config.replicas.cpus_per_replica and not config.replicas.gpus_per_replica:
            print("python -m serve_app.k8s: warning: the replicas reserve no CPU or GPU, so Ray may place them on "
                  "the head; e.g. --set replicas.cpus_per_replica=0.5 keeps them on the workers", file=sys.stderr)
    else:
        opts = RayServiceOptions(**opts_kwargs)
        config = load_config(base / config_arg, overrides=dict(opts.sets), environ={})
        objs = model_store_manifests(config, opts, pvc=args.pvc, size=args.size, storage_class=args.storage_class,
                                     access_mode=args.access_mode)
    return out, _document(objs, shown, config_arg)


def render_all(check: bool = False) -> list[str]:
    """Re-render (or, with ``check``, compare) every manifest in `MANIFESTS`; returns the stale
    files (with ``check``) or the written ones."""
    done = []
    for path, argv in MANIFESTS.items():
        _, text = render(argv, base=REPO_ROOT)
        target = REPO_ROOT / path
        if check:
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                done.append(path)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            done.append(path)
    return done


def fetch_model(repo: str, directory: str, *, tokenizer_only: bool = False, revision: str | None = None) -> str:
    """Download ``repo`` from the Hugging Face Hub into ``directory`` (``HF_TOKEN`` from the
    environment, as huggingface_hub reads it); ``tokenizer_only``: just the tokenizer and config."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=repo, local_dir=directory, revision=revision,
                             allow_patterns=list(TOKENIZER_FILES) if tokenizer_only else None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "render-all":
            files = render_all(check=args.check)
            if args.check:
                for f in files:
                    print(f"{f}: out of date (python -m serve_app.k8s render-all)", file=sys.stderr)
                return 1 if files else 0
            print("\n".join(files))
            return 0
        if args.command == "fetch-model":
            print(fetch_model(args.repo, args.dir, tokenizer_only=args.tokenizer_only, revision=args.revision))
            return 0
        out, text = render(argv)
    except (RenderError, ConfigError) as e:
        print(f"python -m serve_app.k8s: {e}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
