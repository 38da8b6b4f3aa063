"""The Kubernetes manifests in k8s/: rendered from the app config (and up to date), valid against
the RayService CRD and the Kubernetes core schemas (offline, `k8s_schemas`), and consistent with
what `serve_app.app.build_app` builds from the same config.  Table-driven over `MANIFESTS`."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

import k8s_schemas as ks
from serve_app import k8s
from serve_app.config import VLLMEngineConfig, load_config

REPO = k8s.REPO_ROOT
MANIFESTS = sorted(k8s.MANIFESTS)


def _docs(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((REPO / path).read_text(encoding="utf-8")) if d]


def _objects() -> list[tuple[str, int, str]]:
    out = []
    for path in MANIFESTS:
        if (REPO / path).is_file():
            for i, obj in enumerate(_docs(path)):
                out.append((path, i, obj.get("kind", "?")))
    return out


OBJECTS = _objects()
RAYSERVICES = [path for path, _, kind in OBJECTS if kind == "RayService"]


def _argv_opts(path: str):
    """The render flags of a committed manifest, parsed as the CLI parses them."""
    return k8s._parser().parse_args(k8s.MANIFESTS[path])


def _source_config(path: str):
    """The app config the manifest was rendered from, with its --set overrides (no environment)."""
    args = _argv_opts(path)
    return load_config(REPO / args.config, overrides=k8s._sets(args.sets), environ={})


def _serve(obj: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(obj["spec"]["serveConfigV2"])


def _ray_containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(role, pod spec, Ray container) for the head and every worker group."""
    rc = obj["spec"]["rayClusterConfig"]
    out = [("head", rc["headGroupSpec"]["template"]["spec"], rc["headGroupSpec"]["template"]["spec"]["containers"][0])]
    for g in rc["workerGroupSpecs"]:
        out.append((g["groupName"], g["template"]["spec"], g["template"]["spec"]["containers"][0]))
    return out


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {path: k8s.render(argv, base=REPO)[1] for path, argv in k8s.MANIFESTS.items()}


# ----------------------------------------------------------------------------- rendered, fresh

def test_every_manifest_in_k8s_is_rendered():
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "k8s").glob("*.yaml")}
    assert on_disk == set(MANIFESTS), "every YAML manifest in k8s/ comes from serve_app.k8s.MANIFESTS"
    assert {"k8s/rayservice-gpu.yaml", "k8s/rayservice-sim-cpu.yaml", "k8s/podmonitor.yaml"} <= on_disk


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_is_up_to_date(path, rendered):
    assert (REPO / path).read_text(encoding="utf-8") == rendered[path], (
        f"{path} differs from the renderer's output: run `python -m serve_app.k8s render-all`")


def test_render_all_check_passes():
    assert k8s.render_all(check=True) == []


# ------------------------------------------------------------------------------------ schemas

def test_vendored_crd_is_the_recorded_one():
    assert ks.crd_sha256() == ks.RAYSERVICE_CRD_SHA256
    crd = ks.rayservice_crd()
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == "RayService"
    assert ks.RAYSERVICE_CRD_SHA256 in (ks.DATA / "PROVENANCE.md").read_text()


@pytest.mark.parametrize(("path", "index", "kind"), OBJECTS, ids=[f"{p}#{i}-{k}" for p, i, k in OBJECTS])
def test_object_validates(path, index, kind):
    obj = _docs(path)[index]
    assert ks.validate_any(obj) == []


@pytest.mark.parametrize("path", RAYSERVICES)
def test_pod_templates_are_valid_core_pod_templates(path):
    obj = _docs(path)[0]
    rc = obj["spec"]["rayClusterConfig"]
    templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for t in templates:
        assert ks.core_definition_errors("io.k8s.api.core.v1.PodTemplateSpec", t) == []


def _sim_rayservice() -> dict[str, Any]:
    return _docs("k8s/rayservice-sim-cpu.yaml")[0]


@pytest.mark.parametrize(("mutate", "expect"), [
    (lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicaz=2), "replicaz"),
    (lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="1"), "is not of type"),
    (lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    (lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas=2 ** 31), "maximum"),
    (lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "is not of type"),
    (lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
     .append({"containerPort": 8080, "name": "metrics2"}), "duplicate"),
    (lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].update(memory="2 GB"), "does not match"),
    (lambda o: o["spec"]["rayClusterConfig"]["authOptions"].update(mode="password"), "is not one of"),
    (lambda o: o["spec"].update(serveConfigV2={"applications": []}), "is not of type"),
    (lambda o: o["spec"].update(managedBy="me"), "managedBy"),
    (lambda o: o["metadata"].update(name="Tiered_LLM"), "DNS-1123"),
    (lambda o: o.update(apiVersion="ray.io/v2"), "not served"),
])
def test_crd_validation_catches_mistakes(mutate, expect):
    obj = copy.deepcopy(_sim_rayservice())
    mutate(obj)
    errors = ks.validate_with_crd(obj)
    assert any(expect in e for e in errors), errors


@pytest.mark.parametrize(("obj", "expect"), [
    ({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tiered-api-keys"},
      "stringdata": {"api-keys": "k:premium"}}, "stringdata"),
    ({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "m"},
      "spec": {"accessModes": "ReadWriteMany"}}, "is not of type"),
    ({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "Bad_Name"}}, "DNS-1123"),
    ({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "m"},
      "spec": {"selector": {}, "podMetricsEndpoints": [{"path": "/metrics"}]}}, "is not valid under any"),
    ({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "m"},
      "spec": {"selector": {}, "podMetricsEndpoints": [{"port": "metrics", "interval": "15 s"}]}},
     "does not match"),
])
def test_core_and_podmonitor_validation_catch_mistakes(obj, expect):
    errors = ks.validate_any(obj)
    assert any(expect in e for e in errors), errors


def test_a_valid_secret_passes_the_core_schema():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tiered-api-keys"}, "type": "Opaque",
              "stringData": {"api-keys": "sha256:" + "0" * 64 + ":premium"}}
    assert ks.validate_core(secret) == []


# ------------------------------------------------------------ serveConfigV2 == what the app builds

@pytest.mark.parametrize("path", RAYSERVICES)
def test_serve_config_validates_with_ray_serve_schema(path):
    from ray.serve.schema import ServeDeploySchema

    serve = _serve(_docs(path)[0])
    schema = ServeDeploySchema.model_validate(serve)
    assert len(schema.applications) == 1
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    assert app.name == "default" and app.route_prefix == "/"
    assert serve["http_options"]["host"] == "0.0.0.0"


@pytest.mark.parametrize("path", RAYSERVICES)
def test_serve_args_rebuild_the_source_config(path):
    """The config build_app makes from the manifest's args is the source YAML's, except for the
    cluster's own values: the proxy on every interface, the model folder and key file in the pods."""
    obj = _docs(path)[0]
    app = _serve(obj)["applications"][0]
    in_cluster = k8s.app_config_from_serve_args(app["args"])
    source = _source_config(path)
    cluster_fields = {("http", "host"), ("engine", "model"), ("api_keys", "file")}
    got, want = in_cluster.model_dump(mode="json"), source.model_dump(mode="json")
    for section, name in cluster_fields:
        got[section].pop(name, None)
        want[section].pop(name, None)
    if isinstance(source.engine, VLLMEngineConfig):  # served under the source's name (model_name is set)
        assert in_cluster.model_name == source.model_name
    assert got == want
    assert in_cluster.http.host == "0.0.0.0"
    assert _serve(obj)["http_options"]["port"] == in_cluster.http.port


@pytest.mark.parametrize("path", RAYSERVICES)
def test_deployments_are_what_build_app_sets(path):
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.deployment import deployment_to_schema

    from serve_app.app import build_app

    app = _serve(_docs(path)[0])["applications"][0]
    built = build_serve_app(build_app(app["args"]), name="default")
    want = [deployment_to_schema(d).model_dump(mode="json", exclude_unset=True) for d in built.deployments]
    assert app["deployments"] == want
    config = k8s.app_config_from_serve_args(app["args"])
    deps = {d["name"]: d for d in app["deployments"]}
    replica, ingress = deps["LLMReplica"], deps["Ingress"]
    if config.replicas.autoscaling is not None:
        from serve_app.ray_autoscaling import replica_autoscaling_config

        assert "num_replicas" not in replica
        assert replica["autoscaling_config"] == replica_autoscaling_config(config)
    else:
        assert replica["num_replicas"] == config.replicas.num_replicas and "autoscaling_config" not in replica
    assert replica["max_ongoing_requests"] == config.replicas.max_ongoing_requests
    assert replica["ray_actor_options"]["num_cpus"] == config.replicas.cpus_per_replica
    assert replica["ray_actor_options"].get("num_gpus", 0) == config.replicas.gpus_per_replica
    assert replica["request_router_config"]["request_router_kwargs"]["policy"] == config.router.policy
    assert replica["request_router_config"]["request_routing_stats_period_s"] == config.router.feedback_period_s
    assert ingress["max_ongoing_requests"] == config.http.max_ongoing_requests
    assert ingress["ray_actor_options"]["num_cpus"] == config.ingress.num_cpus
    if config.ingress.autoscaling:
        assert "num_replicas" not in ingress
        assert ingress["autoscaling_config"] == config.ingress.autoscaling_config(config.http.max_ongoing_requests)
    else:
        assert ingress["num_replicas"] == config.ingress.num_replicas and "autoscaling_config" not in ingress


# --------------------------------------------------------------------------- the Ray cluster

@pytest.mark.parametrize("path", RAYSERVICES)
def test_head_runs_no_engine_and_replicas_fit_the_workers(path):
    obj = _docs(path)[0]
    rc = obj["spec"]["rayClusterConfig"]
    config = k8s.app_config_from_serve_args(_serve(obj)["applications"][0]["args"])
    r = config.replicas
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res["requests"] and "nvidia.com/gpu" not in head_res["limits"]
    assert r.cpus_per_replica > 0 or r.gpus_per_replica > 0, "a replica needing nothing could land on the head"
    [group] = rc["workerGroupSpecs"]
    params, container = group["rayStartParams"], group["template"]["spec"]["containers"][0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert rc.get("enableInTreeAutoscaling", False) == (group["minReplicas"] != group["maxReplicas"])
    ray_cpus, ray_gpus = float(params["num-cpus"]), float(params["num-gpus"])
    if r.gpus_per_replica:
        assert group["replicas"] == r.num_replicas, "one GPU worker pod per replica"
        gpus = str(int(r.gpus_per_replica))
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert ray_gpus == r.gpus_per_replica and ray_cpus >= r.cpus_per_replica
        assert ray_gpus // r.gpus_per_replica == 1, "one vLLM engine per worker pod"
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"] and ray_gpus == 0
        assert group["replicas"] * ray_cpus >= r.num_replicas * r.cpus_per_replica
        assert container["resources"]["requests"]["cpu"] in ("500m", "1"), "small CPU requests for kind/minikube"
    for _, _, c in _ray_containers(obj):
        assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("path", RAYSERVICES)
def test_metrics_and_serve_ports_are_exposed(path):
    obj = _docs(path)[0]
    rc = obj["spec"]["rayClusterConfig"]
    port = _serve(obj)["http_options"]["port"]
    for params in [rc["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in rc["workerGroupSpecs"]]:
        assert params["metrics-export-port"] == str(k8s.METRICS_PORT)
    monitor = _docs("k8s/podmonitor.yaml")[0]
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    rc_templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for t in rc_templates:
        labels = t["metadata"]["labels"]
        assert selector.items() <= labels.items(), "the PodMonitor selects every Ray pod"
        ports = {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == k8s.METRICS_PORT
        assert ports["serve"] == port


@pytest.mark.parametrize("path", RAYSERVICES)
def test_api_keys_come_from_the_secret(path):
    obj = _docs(path)[0]
    config = k8s.app_config_from_serve_args(_serve(obj)["applications"][0]["args"])
    opts = _argv_opts(path)
    for role, spec, c in _ray_containers(obj):
        if opts.api_keys == "env":
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env[config.api_keys.env]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": opts.api_keys_secret, "key": opts.api_keys_secret_key}, role
        else:
            key_file = PurePosixPath(str(config.api_keys.file))
            [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == str(key_file.parent)]
            [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
            assert vol["secret"]["secretName"] == opts.api_keys_secret
            assert {"key": opts.api_keys_secret_key, "path": key_file.name} in vol["secret"]["items"]


@pytest.mark.parametrize("path", RAYSERVICES)
def test_the_model_folder_is_in_every_pod(path):
    obj = _docs(path)[0]
    config = k8s.app_config_from_serve_args(_serve(obj)["applications"][0]["args"])
    if not isinstance(config.engine, VLLMEngineConfig):
        assert all("initContainers" not in spec for _, spec, _ in _ray_containers(obj))
        return
    model = config.engine.model
    opts = _argv_opts(path)
    runtime_env = _serve(obj)["applications"][0]["runtime_env"]["env_vars"]
    assert runtime_env["HF_HUB_OFFLINE"] == "1"
    for role, spec, c in _ray_containers(obj):
        [mount] = [m for m in c["volumeMounts"] if model.startswith(m["mountPath"] + "/")]
        [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        if opts.model_pvc:
            assert vol["persistentVolumeClaim"] == {"claimName": opts.model_pvc, "readOnly": True}
            assert mount["readOnly"] is True
        else:
            [init] = spec["initContainers"]
            assert init["command"][init["command"].index("--dir") + 1] == model
            assert init["env"] == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": opts.hf_token_secret, "key": opts.hf_token_secret_key}}}]
            assert ("--tokenizer-only" in init["command"]) == (role == "head")
            assert "emptyDir" in vol


def test_model_store_fills_the_folder_the_pvc_manifest_serves():
    pvc_obj = _docs("k8s/rayservice-gpu-pvc.yaml")[0]
    config = k8s.app_config_from_serve_args(_serve(pvc_obj)["applications"][0]["args"])
    claim, job = _docs("k8s/model-store.yaml")
    assert claim["metadata"]["name"] == _argv_opts("k8s/rayservice-gpu-pvc.yaml").model_pvc
    pod = job["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--dir") + 1] == config.engine.model
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


@pytest.mark.parametrize("path", RAYSERVICES)
def test_versions_agree(path):
    import ray

    obj = _docs(path)[0]
    assert obj["spec"]["rayClusterConfig"]["rayVersion"] == k8s.RAY_VERSION == ray.__version__
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"ray[serve]=={k8s.RAY_VERSION}" in deps
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"rayproject/ray:{k8s.RAY_VERSION}-py311" in dockerfile
    assert obj["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "None")
    assert obj["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_readme_installs_the_matching_kuberay():
    readme = (REPO / "k8s" / "README.md").read_text()
    assert f"--version {k8s.KUBERAY_VERSION}" in readme
    for path in MANIFESTS:
        assert Path(path).name in readme


# -------------------------------------------------------------------------------- the renderer

def test_render_cli_writes_a_valid_manifest(tmp_path, capsys):
    out = tmp_path / "gpu.yaml"
    rc = k8s.main(["render", "--config", str(REPO / "serve_app/configs/vllm-gpu.yaml"), "--image", "img:1",
                   "--hf-token-secret", "hf", "--set", "replicas.num_replicas=3", "--min-workers", "1",
                   "--max-workers", "4", "--node-selector", "cloud.google.com/gke-accelerator=nvidia-l4",
                   "--namespace", "llm", "--out", str(out)])
    assert rc == 0
    [obj] = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert ks.validate_any(obj) == []
    assert obj["metadata"]["namespace"] == "llm"
    rc_ = obj["spec"]["rayClusterConfig"]
    [group] = rc_["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 3, 4)
    assert rc_["enableInTreeAutoscaling"] is True
    assert group["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    deps = {d["name"]: d for d in _serve(obj)["applications"][0]["deployments"]}
    assert deps["LLMReplica"]["num_replicas"] == 3
    assert "--out" not in out.read_text().splitlines()[1], "the header shows the command without --out"


@pytest.mark.parametrize("sets,replicas,haproxy", [
    ([], {"num_replicas": 1}, False),
    (["ingress.num_replicas=2", "ingress.haproxy=true"], {"num_replicas": 2}, True),
    (["ingress.min_replicas=2", "ingress.max_replicas=6", "ingress.num_replicas=2",
      "ingress.target_ongoing_requests=32"],
     {"autoscaling_config": {"min_replicas": 2, "max_replicas": 6, "initial_replicas": 2,
                             "target_ongoing_requests": 32.0}}, False),
])
def test_the_ingress_section_renders_its_replicas_and_haproxy(sets, replicas, haproxy):
    argv = ["render", "--config", "serve_app/configs/vllm-gpu.yaml", "--image", "img:1", "--hf-token-secret", "hf"]
    _, text = k8s.render(argv + [a for kv in sets for a in ("--set", kv)], base=REPO)
    [obj] = [d for d in yaml.safe_load_all(text) if d]
    assert ks.validate_any(obj) == []
    serve = _serve(obj)
    deps = {d["name"]: d for d in serve["applications"][0]["deployments"]}
    assert {k: deps["Ingress"][k] for k in ("num_replicas", "autoscaling_config") if k in deps["Ingress"]} == replicas
    for role, _, container in _ray_containers(obj):  # the head and every worker: every Ray process reads it
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert (env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1") == haproxy, (role, env)
        assert "TIERED_API_KEYS" in env
    assert serve["http_options"]["host"] == "0.0.0.0"  # HAProxy on other pods reaches the ingress ports


def test_render_a_vllm_cpu_config_with_an_unset_model_variable():
    # vllm-cpu-tiny.yaml's model is ${TIERED_MODEL_PATH} with no default: the PVC names the folder
    _, text = k8s.render(["render", "--config", "serve_app/configs/vllm-cpu-tiny.yaml", "--image", "img:1",
                          "--model-pvc", "tiny", "--model-dir", "tiny-llama"], base=REPO)
    [obj] = [d for d in yaml.safe_load_all(text) if d]
    assert ks.validate_any(obj) == []
    config = k8s.app_config_from_serve_args(_serve(obj)["applications"][0]["args"])
    assert config.engine.model == "/models/tiny-llama"
    [group] = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu" and "nvidia.com/gpu" not in group["template"]["spec"]["containers"][0][
        "resources"]["limits"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--config", "serve_app/configs/vllm-gpu.yaml"], "needs the model inside the pods"),
    (["--config", "serve_app/configs/vllm-gpu.yaml", "--model-pvc", "m", "--hf-token-secret", "h"], "not both"),
    (["--config", "serve_app/configs/vllm-gpu.yaml", "--hf-token-secret", "h", "--set", "engine.model=/local/m"],
     None),
    (["--config", "serve_app/configs/vllm-cpu-tiny.yaml", "--model-pvc", "m"], "--model-dir"),
    (["--config", "serve_app/configs/sim.yaml", "--api-keys", "none"], "api_keys.hashes"),
    (["--config", "serve_app/configs/sim.yaml", "--min-workers", "3"], "worker bounds"),
    (["--config", "serve_app/configs/sim.yaml", "--set", "api_keys.file=keys.txt", "--set",
      "replicas.cpus_per_replica=1"], None),
    (["--config", "serve_app/configs/vllm-gpu.yaml", "--model-pvc", "m", "--set", "replicas.gpus_per_replica=0.5"],
     "whole number of GPUs"),
    (["--config", "serve_app/configs/sim.yaml", "--set", "replicas.num_replica=2"], "unknown field"),
    (["--config", "serve_app/configs/vllm-gpu.yaml", "--set", "engine.model=org/model"], "local folder"),
    (["--config", "serve_app/configs/sim.yaml"], None),  # renders, with a warning about the head
])
def test_render_refuses_what_cannot_work(argv, message, capsys):
    rc = k8s.main(["render", "--image", "img:1", *[str(REPO / a) if a.endswith(".yaml") else a for a in argv]])
    err = capsys.readouterr().err
    if message is None:
        assert rc == 0, err
    else:
        assert rc == 2 and message in err, err


def test_a_config_naming_a_local_key_file_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text((REPO / "serve_app/configs/sim.yaml").read_text().replace(
        "api_keys:\n  env: TIERED_API_KEYS", "api_keys:\n  env: TIERED_API_KEYS\n  file: keys.txt"))
    rc = k8s.main(["render", "--config", str(cfg), "--image", "img:1"])
    assert rc == 2 and "--api-keys file" in capsys.readouterr().err
    assert k8s.main(["render", "--config", str(cfg), "--image", "img:1", "--api-keys", "file",
                     "--out", str(tmp_path / "o.yaml")]) == 0


def test_rendering_ignores_the_shell_environment(monkeypatch):
    argv = k8s.MANIFESTS["k8s/rayservice-gpu.yaml"]
    monkeypatch.setenv("TIERED_MODEL_PATH", "someone/else")
    _, text = k8s.render(argv, base=REPO)
    assert text == (REPO / "k8s/rayservice-gpu.yaml").read_text(encoding="utf-8")


def test_fetch_model_downloads_into_the_folder(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or kw["local_dir"])
    assert k8s.main(["fetch-model", "--repo", "o/m", "--dir", "/models/m", "--tokenizer-only"]) == 0
    assert k8s.main(["fetch-model", "--repo", "o/m", "--dir", "/models/m"]) == 0
    assert calls[0]["repo_id"] == "o/m" and calls[0]["local_dir"] == "/models/m"
    assert "tokenizer.json" in calls[0]["allow_patterns"] and "config.json" in calls[0]["allow_patterns"]
    assert calls[1]["allow_patterns"] is None


def test_headers_name_the_command_and_no_local_paths():
    for path in MANIFESTS:
        text = (REPO / path).read_text(encoding="utf-8")
        assert text.startswith("# Generated")
        assert str(REPO) not in text and not re.search(r"/(home|tmp|work)/", text)


@pytest.mark.parametrize("autoscaling,pods", [
    ("{min_replicas: 2, max_replicas: 6}", (2, 2, 6)),  # the config's num_replicas (1) is below: refused
    ("{min_replicas: 1, max_replicas: 4, startup_s: 180}", (1, 1, 4)),
])
def test_replica_autoscaling_renders_the_policy_and_bounds_the_gpu_pods(autoscaling, pods):
    argv = ["render", "--config", "serve_app/configs/vllm-gpu.yaml", "--image", "img:1", "--hf-token-secret", "hf",
            "--set", f"replicas.autoscaling={autoscaling}"]
    if pods[0] > 1:
        with pytest.raises(Exception, match="outside the autoscaling bounds"):
            k8s.render(argv, base=REPO)
        argv += ["--set", f"replicas.num_replicas={pods[1]}"]
    _, text = k8s.render(argv, base=REPO)
    [obj] = [d for d in yaml.safe_load_all(text) if d]
    assert ks.validate_any(obj) == []
    rc_ = obj["spec"]["rayClusterConfig"]
    [group] = rc_["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == pods  # one GPU replica per pod
    assert rc_["enableInTreeAutoscaling"] is True
    deps = {d["name"]: d for d in _serve(obj)["applications"][0]["deployments"]}
    auto = deps["LLMReplica"]["autoscaling_config"]
    assert "num_replicas" not in deps["LLMReplica"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (pods[0], pods[2])
    assert auto["policy"]["policy_function"] == "serve_app.ray_autoscaling:TierAwareServePolicy"
    # the pods outlive a scale-down's drain (replicas.autoscaling.drain_timeout_s, 600 s by default)
    assert group["template"]["spec"]["terminationGracePeriodSeconds"] >= 600
