"""The app config: shipped configs load, every invalid case names the file, the line and the field."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from replica.tiers import TierMix, paper_tiers
from replica.policy import available_schedulers
from replica.sim.engine import PAPER_KV_BLOCKS
from serve_app.auth import KeyConfigError, KeyStore
from serve_app.config import (
    CONFIGS_DIR,
    DEFAULT_CONFIG_PATH,
    AppConfig,
    ConfigError,
    ServingTier,
    SimEngineConfig,
    VLLMEngineConfig,
    default_config,
    load_config,
)

MODEL_ENV = {"TIERED_MODEL_PATH": "/models/tiny"}


def write(tmp_path: Path, text: str, name: str = "app.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ shipped configs

@pytest.mark.parametrize("name", ["sim.yaml", "vllm-cpu-tiny.yaml", "vllm-gpu.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS_DIR / name, environ=MODEL_ENV)
    assert cfg.tier_names == ["premium", "free"]
    assert cfg.api_keys.env == "TIERED_API_KEYS" and cfg.api_keys.hashes == {}
    assert cfg.router.policy == "slo"


def test_sim_yaml_is_the_embedded_default() -> None:
    cfg = default_config()
    assert DEFAULT_CONFIG_PATH == CONFIGS_DIR / "sim.yaml"
    assert isinstance(cfg.engine, SimEngineConfig)
    assert cfg.replicas.num_replicas == 3
    assert (cfg.engine.cost_profile, cfg.engine.scheduler) == ("rtx6000ada-mistral7b", "slai-spf-dynamic")
    assert cfg.engine.kv_blocks == PAPER_KV_BLOCKS
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8000)
    # the paper's tiers, free shed first
    assert cfg.tier("premium").tbt_slo_s == 0.1 and cfg.tier("free").tbt_slo_s == 0.5
    assert cfg.strictest.name == "premium"
    assert cfg.shed_sequence == ["free", "premium"]
    assert cfg.tier_mix() == paper_tiers()


def test_vllm_cpu_tiny_takes_the_model_from_env_or_override() -> None:
    path = CONFIGS_DIR / "vllm-cpu-tiny.yaml"
    cfg = load_config(path, environ=MODEL_ENV)
    assert isinstance(cfg.engine, VLLMEngineConfig)
    assert cfg.engine.model == "/models/tiny" and cfg.replicas.gpus_per_replica == 0
    assert cfg.engine.enforce_eager and cfg.engine.kv_cache_memory_bytes
    assert cfg.engine.scheduler_cls == "replica.vllm_scheduler.SLAIScheduler"
    kwargs = cfg.engine.engine_kwargs()
    assert kwargs["model"] == "/models/tiny" and "backend" not in kwargs and "tokenizer" not in kwargs
    assert cfg.engine.log_engine_metrics and "log_engine_metrics" not in kwargs  # a stat logger, not an engine arg
    cfg = load_config(path, overrides={"engine.model": "/cli/model"}, environ={})
    assert cfg.engine.model == "/cli/model"
    with pytest.raises(ConfigError, match=r"vllm-cpu-tiny\.yaml, line \d+: engine\.model: environment "
                                          r"variable TIERED_MODEL_PATH is not set"):
        load_config(path, environ={})


def test_vllm_gpu() -> None:
    cfg = load_config(CONFIGS_DIR / "vllm-gpu.yaml", environ={})
    assert isinstance(cfg.engine, VLLMEngineConfig)
    assert cfg.replicas.gpus_per_replica == 1
    assert cfg.engine.kv_cache_memory_bytes is None
    assert "Mistral-7B" in cfg.engine.model
    assert cfg.model_name == "mistral-7b"


def test_defaults_and_schema() -> None:
    cfg = AppConfig()
    assert isinstance(cfg.engine, SimEngineConfig) and cfg.engine.backend == "sim"
    assert cfg.model_name == "sim-rtx6000ada-mistral7b"
    assert cfg.engine.kv_blocks == PAPER_KV_BLOCKS
    assert (cfg.router.policy, cfg.router.feedback_period_s) == ("slo", 1.0)
    schema = AppConfig.model_json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) >= {"tiers", "api_keys", "replicas", "engine", "router", "http",
                                         "model_name", "max_request_bytes", "default_max_tokens"}
    assert schema["additionalProperties"] is False
    # a config round-trips through its JSON dump
    assert AppConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_engine_backend_defaults_to_sim(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "engine: {time_scale: 0.5}\n"))
    assert isinstance(cfg.engine, SimEngineConfig) and cfg.engine.time_scale == 0.5


def test_every_scheduler_preset_is_accepted() -> None:
    for name in available_schedulers():
        assert AppConfig(engine={"scheduler": name}).engine.scheduler == name


# ----------------------------------------------------------------------------------------- tiers

def test_ranks_and_shed_order_derived_when_left_out() -> None:
    cfg = AppConfig(tiers=[{"name": "free", "tbt_slo_s": 0.5}, {"name": "gold", "tbt_slo_s": 0.05},
                           {"name": "silver", "tbt_slo_s": 0.1}])
    assert [t.rank for t in cfg.tiers] == [2, 0, 1]          # TierMix's rule: by tbt_slo_s
    assert cfg.shed_sequence == ["free", "silver", "gold"]   # most lenient shed first
    mix = cfg.tier_mix()                                       # no shares: uniform
    assert isinstance(mix, TierMix) and list(mix.shares) == pytest.approx([1 / 3] * 3)
    mix = cfg.tier_mix({"free": 0.8, "gold": 0.05, "silver": 0.15})
    assert mix.by_name("free").share == 0.8 and mix.by_name("gold").rank == 0
    with pytest.raises(ValueError, match="missing"):
        cfg.tier_mix({"free": 1.0})


def test_serving_tier_to_spec() -> None:
    t = ServingTier(name="premium", tbt_slo_s=0.1, rank=0, shed_order=1)
    spec = t.to_spec(0.25)
    assert (spec.name, spec.tbt_slo_s, spec.ttft_target_s, spec.share, spec.rank) == ("premium", 0.1, 0.5, 0.25, 0)
    with pytest.raises(ValidationError):
        ServingTier(name="pre mium", tbt_slo_s=0.1)  # key sources split on spaces, ':' and ','


# ------------------------------------------------------------------------------- invalid configs

TIERS = """
tiers:
  - {name: premium, tbt_slo_s: 0.1}
  - {name: free, tbt_slo_s: 0.5}
"""

# (id, YAML text, fragments the error must contain: file name is checked for every case)
INVALID = [
    ("unknown top-level key", "num_replica: 4\n", ["line 1", "num_replica", "unknown field"]),
    ("unknown nested key", "replicas:\n  num_replicas: 2\n  gpu_per_replica: 1\n",
     ["line 3", "replicas.gpu_per_replica", "unknown field"]),
    ("unknown engine key", "engine:\n  backend: sim\n  profile: a100-mistral7b\n",
     ["line 3", "engine.profile", "unknown field"]),
    ("duplicate tier", TIERS + "  - {name: premium, tbt_slo_s: 0.2}\n",
     ["line 4", "tiers.2.name", "duplicate tier name 'premium'"]),
    ("duplicate rank", "tiers:\n  - {name: a, tbt_slo_s: 0.1, rank: 0}\n  - {name: b, tbt_slo_s: 0.5, rank: 0}\n",
     ["line 3", "tiers.1.rank", "duplicate rank 0"]),
    ("rank for some tiers only", "tiers:\n  - {name: a, tbt_slo_s: 0.1, rank: 0}\n  - {name: b, tbt_slo_s: 0.5}\n",
     ["line 3", "tiers.1.rank", "every tier or for none"]),
    ("duplicate shed_order",
     "tiers:\n  - {name: a, tbt_slo_s: 0.1, shed_order: 1}\n  - {name: b, tbt_slo_s: 0.5, shed_order: 1}\n",
     ["tiers.1.shed_order", "duplicate shed_order 1"]),
    ("shares not summing to 1",
     "tiers:\n  - {name: a, tbt_slo_s: 0.1, share: 0.5}\n  - {name: b, tbt_slo_s: 0.5, share: 0.6}\n",
     ["line 1", "tiers:", "sum to"]),
    ("negative tbt", "tiers:\n  - {name: a, tbt_slo_s: -1}\n", ["line 2", "tiers.0.tbt_slo_s", "greater than 0"]),
    ("no tiers", "tiers: []\n", ["line 1", "tiers"]),
    ("vllm without model", "engine:\n  backend: vllm\n  enforce_eager: true\n  kv_cache_memory_bytes: 1000000\n",
     ["line 1", "engine.model", "requires a model path"]),
    ("vllm on CPU without kv_cache_memory_bytes",
     "engine:\n  backend: vllm\n  model: /m\n  enforce_eager: true\n",
     ["engine.kv_cache_memory_bytes", "required for vllm on CPU"]),
    ("vllm on CPU without enforce_eager",
     "engine:\n  backend: vllm\n  model: /m\n  kv_cache_memory_bytes: 1000000\n",
     ["engine.enforce_eager", "must be true"]),
    ("unknown backend", "engine:\n  backend: tgi\n", ["line 2", "engine.backend", "'sim' or 'vllm'"]),
    ("unknown scheduler", "engine:\n  scheduler: slai-magic\n",
     ["line 2", "engine.scheduler", "unknown scheduler 'slai-magic'", "slai-spf-dynamic"]),
    ("unknown cost profile", "engine:\n  cost_profile: tpu-v5\n",
     ["line 2", "engine.cost_profile", "unknown cost profile"]),
    ("missing cost profile file", "engine:\n  cost_profile: profiles/nope.json\n",
     ["line 2", "engine.cost_profile", "does not exist"]),
    ("bad scheduler_cls", "replicas: {gpus_per_replica: 1}\nengine:\n  backend: vllm\n  model: /m\n"
     "  scheduler_cls: not a class\n", ["line 5", "engine.scheduler_cls"]),
    ("unknown router policy", "router:\n  policy: random\n", ["line 2", "router.policy", "'random'", "pow2", "slo"]),
    ("zero replicas", "replicas:\n  num_replicas: 0\n", ["line 2", "replicas.num_replicas"]),
    ("negative gpus", "replicas:\n  gpus_per_replica: -1\n", ["line 2", "replicas.gpus_per_replica"]),
    ("bad port", "http:\n  port: 70000\n", ["line 2", "http.port"]),
    ("zero ingress replicas", "ingress:\n  num_replicas: 0\n", ["line 2", "ingress.num_replicas"]),
    ("ingress min without max", "ingress:\n  min_replicas: 2\n",
     ["ingress.min_replicas", "autoscaling setting", "ingress.max_replicas"]),
    ("ingress target without max", "ingress:\n  target_ongoing_requests: 64\n",
     ["ingress.target_ongoing_requests", "autoscaling setting"]),
    ("ingress min over max", "ingress:\n  min_replicas: 3\n  max_replicas: 2\n",
     ["ingress.min_replicas", "3 is over max_replicas (2)"]),
    ("ingress num under min", "ingress:\n  num_replicas: 1\n  min_replicas: 2\n  max_replicas: 4\n",
     ["ingress.num_replicas", "min_replicas (2) <= num_replicas <= max_replicas (4)"]),
    ("ingress num over max", "ingress:\n  num_replicas: 5\n  max_replicas: 4\n",
     ["ingress.num_replicas", "outside the autoscaling bounds"]),
    ("ingress negative cpus", "ingress:\n  num_cpus: -1\n", ["line 2", "ingress.num_cpus"]),
    ("ingress unknown key", "ingress:\n  replicas: 2\n", ["line 2", "ingress.replicas", "unknown field"]),
    ("max_in_flight over what the ingresses take",
     "http: {max_ongoing_requests: 10}\ningress: {num_replicas: 2}\nadmission: {max_in_flight: 21}\n",
     ["admission.max_in_flight", "x the most ingress replicas (2)"]),
    ("plaintext key field", "api_keys:\n  keys:\n    sk-secret-123: premium\n",
     ["line 1", "api_keys", "never given in the config", "keys"]),
    ("plaintext key list", "api_keys:\n  - sk-secret-123:premium\n", ["api_keys", "never given in the config"]),
    ("plaintext key at top level", "api_key: sk-secret-123\n", ["line 1", "api_key", "unknown field"]),
    ("key hash that is a key", "api_keys:\n  hashes:\n    sk-secret-123: premium\n",
     ["api_keys.hashes", "SHA-256 hex digests"]),
    ("key hash for unknown tier", TIERS + "api_keys:\n  hashes:\n    " + "ab" * 32 + ": gold\n",
     ["api_keys.hashes", "unknown tier 'gold'"]),
    ("bad env var name", "api_keys:\n  env: 'MY KEYS'\n", ["line 2", "api_keys.env"]),
    ("no key source", "api_keys:\n  env: null\n", ["line 1", "api_keys", "no API key source"]),
    ("bad YAML line", "tiers:\n  - {name: premium, tbt_slo_s: 0.1}\nrouter:\n  policy: slo\n   port: 3\n",
     ["line 5", "malformed YAML"]),
    ("bad YAML flow", "replicas: {num_replicas: 2\n", ["line 2", "malformed YAML"]),
    ("duplicate YAML key", "replicas:\n  num_replicas: 2\nreplicas:\n  num_replicas: 3\n",
     ["line 3", "duplicate key 'replicas'", "first at line 1"]),
    ("not a mapping", "- a\n- b\n", ["must be a mapping"]),
    ("empty file", "", ["empty config"]),
    ("unset env var", "model_name: ${NO_SUCH_VAR_FOR_TEST}\n", ["line 1", "model_name", "NO_SUCH_VAR_FOR_TEST"]),
]


@pytest.mark.parametrize("text,fragments", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_configs_name_file_line_and_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text, name="bad-config.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    msg = str(info.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert "sk-secret-123" not in msg and (info.value.__cause__ is None)


def test_errors_report_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "replicas:\n  num_replicas: 0\nhttp:\n  port: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 2
    assert "line 2: replicas.num_replicas" in info.value.problems[0]
    assert "line 4: http.port" in info.value.problems[1]


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, "replicas:\n  num_replicas: 2\n")
    assert load_config(path, overrides={"replicas.num_replicas": "4"}).replicas.num_replicas == 4
    with pytest.raises(ConfigError, match=r"replicas\.num_replicas \(override replicas\.num_replicas\)"):
        load_config(path, overrides={"replicas.num_replicas": 0})
    with pytest.raises(ConfigError, match="no list item"):
        load_config(path, overrides={"tiers.5.name": "x"})


def test_env_expansion_with_default(tmp_path: Path) -> None:
    path = write(tmp_path, "model_name: ${NAME:-fallback}\nhttp: {port: '${PORT}'}\n")
    cfg = load_config(path, environ={"PORT": "9000"})
    assert (cfg.model_name, cfg.http.port) == ("fallback", 9000)
    assert load_config(path, environ={"PORT": "1", "NAME": "x"}).model_name == "x"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    profile = Path(__file__).resolve().parents[2] / "replica/cost/profiles/a100-mistral7b.json"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.json").write_text(profile.read_text())
    path = write(tmp_path, "api_keys: {file: secrets/keys}\nengine: {cost_profile: profiles/mine.json}\n")
    cfg = load_config(path)
    assert cfg.api_keys.file == tmp_path / "secrets" / "keys"
    assert Path(cfg.engine.cost_profile) == tmp_path / "profiles" / "mine.json"


# ---------------------------------------------------------------------- key files (via KeyStore)

KEY_FILE_CASES = [
    ("bad tier in key file", "dev-key-0001 premium\ndev-key-0002 gold\n", "line 2", "unknown tier 'gold'"),
    ("malformed line", "# comment\n\ndev-key-0001 premium extra\n", "line 3", "expected 'KEY TIER'"),
    ("bad hash", "sha256:abc premium\n", "line 1", "SHA-256 hex digest"),
    ("bad key chars", "dev\"key premium\n", "line 1", "Bearer token"),
    ("conflicting tiers", "dev-key-0001 premium\ndev-key-0001:free\n", "line 2", "also given for tier 'premium'"),
]


@pytest.mark.parametrize("text,line,fragment", [c[1:] for c in KEY_FILE_CASES], ids=[c[0] for c in KEY_FILE_CASES])
def test_bad_key_files_name_file_and_line(tmp_path: Path, text: str, line: str, fragment: str) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(text)
    cfg = load_config(write(tmp_path, TIERS + "api_keys: {env: null, file: keys.txt}\n"))
    with pytest.raises(KeyConfigError) as info:
        KeyStore.from_config(cfg, environ={})
    msg = str(info.value)
    assert f"{keys}, {line}" in msg and fragment in msg
    assert "dev-key" not in msg


def test_the_slo_router_is_told_the_tiers_slos_and_the_token_budget():
    from router.ray_router import TierAwareRouter
    from serve_app.app import router_kwargs

    def built(config: AppConfig):  # the policy the Serve router builds from these kwargs
        router = TierAwareRouter.__new__(TierAwareRouter)
        router.initialize_state(**json.loads(json.dumps(router_kwargs(config))))  # JSON-ready
        return router.policy

    config = load_config(CONFIGS_DIR / "vllm-gpu.yaml", overrides={"engine.model": "/models/m"})
    slo = built(config)
    assert slo.name == "slo"
    assert (slo.config.tier_tbt_slo_s, slo.config.token_budget) == ({"premium": 0.1, "free": 0.5}, 512)
    sim = built(AppConfig())
    assert sim.config.token_budget == 512 and sim.config.tier_tbt_slo_s == {"premium": 0.1, "free": 0.5}
    assert built(AppConfig(router={"policy": "pow2"})).name == "pow2"


def test_the_routers_prefix_block_defaults_to_128_tokens_and_0_turns_prefix_hashing_off():
    assert AppConfig().router.prefix_block_tokens == 128
    assert AppConfig(router={"prefix_block_tokens": 0}).router.prefix_block_tokens == 0
    for bad in (-1, 1.5, "64x"):
        with pytest.raises(ValidationError):
            AppConfig(router={"prefix_block_tokens": bad})
    gpu = load_config(CONFIGS_DIR / "vllm-gpu.yaml", overrides={"engine.model": "/models/m"})
    assert gpu.engine.enable_prefix_caching is True and gpu.router.prefix_block_tokens == 128


def test_a_hub_model_id_without_network_fails_with_a_message_naming_it(monkeypatch):
    from serve_app.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="mistralai/Mistral-7B-Instruct-v0.2"):
        load_tokenizer("mistralai/Mistral-7B-Instruct-v0.2")


# (ingress section, (min, max) ingress replicas, Serve's options for the Ingress deployment)
INGRESS = [
    ({}, (1, 1), {"num_replicas": 1}),
    ({"num_replicas": 3}, (3, 3), {"num_replicas": 3}),
    ({"max_replicas": 4}, (1, 4), {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                                          "target_ongoing_requests": 50.0}}),
    ({"num_replicas": 2, "min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 8},
     (2, 2), {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2,
                                     "target_ongoing_requests": 8}}),
]


@pytest.mark.parametrize("section,counts,options", INGRESS, ids=[str(c[0]) for c in INGRESS])
def test_the_ingress_section_gives_serve_its_replicas(section, counts, options) -> None:
    from serve_app.app import ingress_replica_options

    cfg = AppConfig.model_validate({"ingress": section, "http": {"max_ongoing_requests": 100}})
    assert (cfg.ingress.min_count, cfg.ingress.max_count) == counts
    assert ingress_replica_options(cfg) == options
    assert not cfg.ingress.haproxy and cfg.ingress.num_cpus == 0


def test_ingress_num_cpus_keeps_its_old_launcher_spelling() -> None:
    from serve_app.app import build_app

    app = build_app({"ingress_num_cpus": "0.5"})
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0.5
    app = build_app({"ingress.num_cpus": "0.25", "ingress.num_replicas": "2"})
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0.25 and app._bound_deployment.num_replicas == 2
