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
- The ingress: ``ingress.num_replicas`` replicas, or Serve's ``autoscaling_config`` from
  ``ingress.min_replicas``/``max_replicas`` (in ``deployments``, as above); ``--set
  ingress.haproxy=true`` puts Ray 2.60's ``RAY_SERVE_ENABLE_HA_PROXY=1`` on the head's and the
  workers' Ray containers, so HAProxy serves port 8000 on every pod instead of Serve's Python proxy.
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

Modules: `serve_app.k8s.options` (`RayServiceOptions`, the config as it runs in the cluster),
`serve_app.k8s.manifests` (the RayService, PodMonitor and model-store objects, YAML out),
`serve_app.k8s.cli` (the commands, `MANIFESTS`); the public names are re-exported here.
"""

from serve_app.k8s.cli import MANIFESTS, REPO_ROOT, TOKENIZER_FILES, fetch_model, main, render, render_all
from serve_app.k8s.cli import _parser, _sets  # noqa: F401  (tests/k8s parse the MANIFESTS commands with them)
from serve_app.k8s.manifests import (
    APP_IMPORT_PATH,
    APP_LABEL,
    APP_LABEL_VALUE,
    APP_NAME,
    HAPROXY_ENV,
    KUBERAY_VERSION,
    METRICS_PORT,
    RAY_VERSION,
    dump_yaml,
    model_store_manifests,
    podmonitor_manifest,
    rayservice_manifest,
    runtime_env,
    serve_config,
)
from serve_app.k8s.options import (
    API_KEYS_DIR,
    MODELS_ROOT,
    RayServiceOptions,
    RenderError,
    app_config_from_serve_args,
    hub_repo,
    inline_args,
    k8s_overrides,
    model_path,
    resolve_config,
)

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
