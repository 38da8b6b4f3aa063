"""The Serve application: ``serve run serve_app.app:build_app [config=PATH] [KEY.PATH=VALUE ...]``.

`build_app(args)` reads the app config (``config``, default `serve_app/configs/sim.yaml`), applies
dotted-path overrides (``engine.time_scale=0.05`` on the command line, or ``overrides: {...}``
from Python), and binds:

- ``LLMReplica`` (`replica.deployment`) with the config's replica options and the tier-aware
  router (`router.ray_router.TierAwareRouter`, the config's policy and feedback period):
  ``replicas.num_replicas`` replicas, or with ``replicas.autoscaling`` Serve's autoscaling
  running the tier-aware policy (`serve_app.ray_autoscaling`);
- ``Ingress`` (`serve_app.ingress`), the OpenAI-compatible HTTP front door, holding a handle to
  the replicas: ``ingress.num_replicas`` replicas of it, or Serve's autoscaling between
  ``ingress.min_replicas`` and ``ingress.max_replicas`` (the config's ``ingress`` section; each
  ingress enforces its share of the admission bounds, `serve_app.admission`).  API keys are read
  at ingress start (`KeyStore.from_config`; by default the environment variable
  ``TIERED_API_KEYS``).

Bounded queues (the config's ``admission`` section, `serve_app.admission`): the replica
deployment's ``max_queued_requests`` bounds the requests waiting at the ingress's handle for a
replica slot (Serve raises BackPressureError beyond it; the ingress answers 429), and the ingress
deployment's bounds the requests the HTTP proxy holds for a busy ingress (Serve answers 429 with
``Retry-After`` itself); the ingress's own admission policy sheds tiers before either fills.

Other args: ``max_context_tokens`` (prompt + completion limit the ingress enforces; default
`model_context_tokens`: vllm's ``max_model_len``, else the model's, else 8192) and ``ingress_num_cpus``
(the same as the override ``ingress.num_cpus``, which the config holds; default 0).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from replica.deployment import LLMReplica
from serve_app.admission import ingress_max_queued_requests, replica_max_queued_requests
from serve_app.config import (DEFAULT_CONFIG_PATH, SERVE_DEFAULT_ROUTER, AppConfig, ConfigError, SimEngineConfig,
                              VLLMEngineConfig, load_config)
from serve_app.ingress import DEFAULT_MAX_CONTEXT_TOKENS, Ingress
from serve_app.ray_autoscaling import replica_autoscaling_config

__all__ = ["build_app", "build_app_from_config", "ingress_replica_options"]

logger = logging.getLogger(__name__)

ROUTER_CLASS = "router.ray_router.TierAwareRouter"
_ARGS = {"config", "overrides", "max_context_tokens", "ingress_num_cpus"}


def cli_value(value: Any) -> Any:
    """``serve run`` passes every arg as a string: read it as YAML (numbers, booleans, lists)."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """The application for ``serve run serve_app.app:build_app``; see the module docstring."""
    args = dict(args or {})
    unknown = sorted(k for k in args if k not in _ARGS and "." not in k)
    if unknown:
        raise ValueError(f"unknown build_app argument(s) {', '.join(unknown)}; use "
                         f"{', '.join(sorted(_ARGS))} or dotted config overrides like engine.time_scale=0.05")
    overrides = dict(args.get("overrides") or {})
    if "ingress_num_cpus" in args:  # the older spelling of ingress.num_cpus
        overrides["ingress.num_cpus"] = cli_value(args["ingress_num_cpus"])
    overrides.update({k: cli_value(v) for k, v in args.items() if "." in k})
    config = load_config(args.get("config") or DEFAULT_CONFIG_PATH, overrides=overrides)
    ctx = args.get("max_context_tokens")
    return build_app_from_config(config, max_context_tokens=int(ctx) if ctx is not None else None)


def model_context_tokens(engine: SimEngineConfig | VLLMEngineConfig) -> int:
    """The context length the ingress enforces: vLLM's ``max_model_len`` if set, else the model
    folder's ``max_position_embeddings`` (config.json), else `DEFAULT_MAX_CONTEXT_TOKENS`."""
    if not isinstance(engine, VLLMEngineConfig):
        return DEFAULT_MAX_CONTEXT_TOKENS
    if engine.max_model_len is not None:
        return engine.max_model_len
    config_json = Path(engine.model or "") / "config.json"
    if config_json.is_file():
        try:
            value = json.loads(config_json.read_text()).get("max_position_embeddings")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{config_json}: cannot read the model config: {e}") from e
        if isinstance(value, int) and value > 0:
            return value
    logger.warning("engine.max_model_len is not set and %s gives no max_position_embeddings: the ingress "
                   "accepts up to %d tokens per request", config_json, DEFAULT_MAX_CONTEXT_TOKENS)
    return DEFAULT_MAX_CONTEXT_TOKENS


def router_kwargs(config: AppConfig) -> dict[str, Any]:
    """The TierAwareRouter's kwargs (`router.ray_router`): the policy name and what a router may
    know of the deployment (`AppConfig.routing_context`: each tier's TBT SLO, the replicas'
    token budget when the config sets it), JSON-ready."""
    return {"policy": config.router.policy, "context": config.routing_context().as_dict()}


def graceful_shutdown_timeout_s(config: AppConfig) -> float:
    """Serve's graceful shutdown of a replica: the ingress's drain (``http.drain_timeout_s``, in
    which streams may finish) and 5 s for the last events to go out."""
    return config.http.drain_timeout_s + 5.0


def replica_graceful_shutdown_timeout_s(config: AppConfig) -> float:
    """The engine replicas' graceful shutdown: the ingress's (`graceful_shutdown_timeout_s`),
    or with autoscaling ``replicas.autoscaling.drain_timeout_s`` if longer (a replica removed by a
    scale-down finishes the requests it holds)."""
    a = config.replicas.autoscaling
    base = graceful_shutdown_timeout_s(config)
    return base if a is None else max(base, a.drain_timeout_s)


def replica_count_options(config: AppConfig) -> dict[str, Any]:
    """The engine replicas' count: ``num_replicas``, or Serve's ``autoscaling_config`` running the
    tier-aware policy (``replicas.autoscaling``, `serve_app.ray_autoscaling`)."""
    autoscaling = replica_autoscaling_config(config)
    if autoscaling is not None:
        return {"autoscaling_config": autoscaling}
    return {"num_replicas": config.replicas.num_replicas}


def ingress_replica_options(config: AppConfig) -> dict[str, Any]:
    """The Ingress deployment's replica count: ``num_replicas``, or Serve's ``autoscaling_config``
    (the config's ``ingress`` section)."""
    autoscaling = config.ingress.autoscaling_config(config.http.max_ongoing_requests)
    if autoscaling is not None:
        return {"autoscaling_config": autoscaling}
    return {"num_replicas": config.ingress.num_replicas}


def build_app_from_config(config: AppConfig, *, max_context_tokens: int | None = None) -> Application:
    eng = config.engine
    if max_context_tokens is None:
        max_context_tokens = model_context_tokens(eng)
    if max_context_tokens <= 0:
        raise ValueError(f"max_context_tokens must be positive, got {max_context_tokens}")
    r = config.replicas
    actor_options: dict[str, Any] = {"num_cpus": r.cpus_per_replica}
    if r.gpus_per_replica:
        actor_options["num_gpus"] = r.gpus_per_replica
    router_options: dict[str, Any] = {}
    if config.router.policy != SERVE_DEFAULT_ROUTER:
        router_options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs=router_kwargs(config),
            request_routing_stats_period_s=config.router.feedback_period_s,
            request_routing_stats_timeout_s=config.router.feedback_timeout_s,
        )
    backpressure = BackpressureConfig(status_code=429, retry_after_s=config.admission.min_retry_after_s)
    replicas = serve.deployment(LLMReplica, name="LLMReplica").options(
        **replica_count_options(config),
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=replica_max_queued_requests(config),
        graceful_shutdown_timeout_s=replica_graceful_shutdown_timeout_s(config),
        ray_actor_options=actor_options,
        **router_options,
    )
    tiers = [t.facts() for t in config.tiers]
    if isinstance(eng, VLLMEngineConfig):
        replica_app = replicas.bind(backend="vllm", scheduler=eng.scheduler, tiers=tiers,
                                    engine_kwargs=eng.engine_kwargs(), log_engine_metrics=eng.log_engine_metrics)
    else:
        replica_app = replicas.bind(backend="sim", scheduler=eng.scheduler, cost_profile=eng.cost_profile,
                                    kv_blocks=eng.kv_blocks, time_scale=eng.time_scale, tiers=tiers)
    ingress = Ingress.options(max_ongoing_requests=config.http.max_ongoing_requests,
                              max_queued_requests=ingress_max_queued_requests(config),
                              backpressure_config=backpressure,
                              graceful_shutdown_timeout_s=graceful_shutdown_timeout_s(config),
                              ray_actor_options={"num_cpus": config.ingress.num_cpus},
                              **ingress_replica_options(config))
    return ingress.bind(replica_app, config.model_dump(mode="json"), max_context_tokens)
