"""What a rendering needs beside the config, and the app config as it will run in the cluster.

`RayServiceOptions` (the flags of ``render``), `RenderError`, and `resolve_config`: the config file
with the cluster's overrides (the proxy on every interface, the model as the mounted folder, the key
file as the mounted Secret), read without the shell's environment.  `inline_args` carries that
config whole in ``serveConfigV2``; `app_config_from_serve_args` rebuilds it from there as
`serve_app.app.build_app` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from serve_app.config import DEFAULT_CONFIG_PATH, AppConfig, ConfigError, VLLMEngineConfig, _is_path, load_config

__all__ = [
    "API_KEYS_DIR",
    "MODELS_ROOT",
    "RayServiceOptions",
    "RenderError",
    "app_config_from_serve_args",
    "hub_repo",
    "inline_args",
    "k8s_overrides",
    "model_path",
    "resolve_config",
]

MODELS_ROOT = "/models"
API_KEYS_DIR = "/etc/tiered-api-keys"


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
        # with a placeholder model: any other mistake in the config is reported as itself
        base = load_config(config_path, overrides={**sets, "engine.model": f"{MODELS_ROOT}/unset"}, environ={})
        if not (opts.model_dir or opts.hf_repo):
            raise RenderError("engine.model has no value without the environment: give --model-dir (PVC) or "
                              "--hf-repo (Hub download), or --set engine.model=...") from None
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
