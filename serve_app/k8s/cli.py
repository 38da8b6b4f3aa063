"""The command line, ``python -m serve_app.k8s``: ``render``, ``model-store``, ``podmonitor``,
``fetch-model`` and ``render-all [--check]`` (every manifest committed in k8s/, listed in
`MANIFESTS`); see the package's docstring.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from serve_app.config import ConfigError, load_config
from serve_app.k8s.manifests import dump_yaml, model_store_manifests, podmonitor_manifest, rayservice_manifest
from serve_app.k8s.options import RayServiceOptions, RenderError, resolve_config

__all__ = ["MANIFESTS", "REPO_ROOT", "TOKENIZER_FILES", "fetch_model", "main", "render", "render_all"]

DESCRIPTION = "Kubernetes manifests for the app, rendered from the same pydantic config the app runs with."
REPO_ROOT = Path(__file__).resolve().parents[2]
# Files the ingress (tokenizer and chat template) and build_app (max_position_embeddings) read from a
# model folder; newer Hub repos keep the chat template in a file of its own.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "config.json", "generation_config.json"]

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
    # the replicas scale on the tiers' SLOs (serve_app.ray_autoscaling) between 1 and 4 GPU pods
    "k8s/rayservice-gpu-autoscaling.yaml": [
        "render", "--config", "serve_app/configs/vllm-gpu.yaml", "--image", "tiered-llm-serve:0.1.0-gpu",
        "--name", "tiered-llm", "--hf-token-secret", "hf-token",
        "--set", "replicas.autoscaling={min_replicas: 1, max_replicas: 4, startup_s: 180}",
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
    p = argparse.ArgumentParser(prog="python -m serve_app.k8s", description=DESCRIPTION)
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
            upgrade_strategy=args.upgrade_strategy,
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
