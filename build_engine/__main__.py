"""python -m build_engine: prepare | quantize | build | verify."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from build_engine import calibration, presets
from build_engine.manifest import DEMO_ARTIFACTS as SMOL
from common import cli
from common.cli import example, program


EXAMPLES = """examples:
  python -m build_engine quantize --model smollm2-135m-instruct --output artifacts/smollm2-135m-instruct/checkpoint
  python -m build_engine build --checkpoint artifacts/smollm2-135m-instruct/checkpoint \\
      --output artifacts/smollm2-135m-instruct/engine-cpu --target cpu
  python -m build_engine build --checkpoint ckpt --output engine --target gpu --dry-run
  python -m build_engine build --checkpoint artifacts/tiny-hermes/checkpoint --output artifacts/tiny-hermes/engine-h100 \\
      --target synthetic --gpu h100 --size-as nous-hermes-2-mistral-7b-dpo
"""


def _prepare(args) -> int:
    from build_engine import sources

    path = sources.prepare(args.model, Path(args.output)) if args.output else sources.resolve(args.model).path
    print(path)
    return 0


def _quantize(args) -> int:
    from build_engine import quantize

    quantize.run(args.model, Path(args.output), preset=args.preset, group_size=args.group_size, algorithm=args.algorithm,
                 calib_dataset=args.calib_dataset, calib_text=args.calib_text, calib_size=args.calib_size,
                 calib_seq_len=args.calib_seq_len, seed=args.seed, tp_size=args.tp_size)
    return 0


def _build(args) -> int:
    if args.target == "gpu":
        from build_engine import trtllm

        cmd = trtllm.build(Path(args.checkpoint), Path(args.output), dry_run=args.dry_run)
        if args.dry_run:
            print(shlex.join(cmd))
        return 0
    if args.target == "synthetic":
        from build_engine import synthetic

        if args.dry_run:
            print(f"would write a synthetic engine ({args.schedule}) to {args.output}")
            return 0
        synthetic.build(Path(args.checkpoint), Path(args.output), schedule=args.schedule, gpu=args.gpu,
                        tokens_per_s=args.tokens_per_s, efficiency=args.efficiency, size_as=args.size_as)
        print(synthetic.describe(Path(args.output)))
        return 0
    from build_engine.cpu import graph

    if args.dry_run:
        print(f"would write a CPU engine (ONNX INT4, accuracy level {args.accuracy_level}) to {args.output}")
        return 0
    graph.build(Path(args.checkpoint), Path(args.output), accuracy_level=args.accuracy_level, lm_head=args.lm_head)
    return 0


def _verify(args) -> int:
    from build_engine import verify

    verify.run(Path(args.checkpoint), Path(args.engine), Path(args.report), original=args.original,
               compare=tuple(Path(d) for d in args.compare_engine or ()))
    return 0


def parser() -> argparse.ArgumentParser:
    p, sub = program("build_engine", __doc__, EXAMPLES)

    s = sub.add_parser("prepare", help="materialize a model as a local Hugging Face folder",
                       **example("python -m build_engine prepare --model smollm2-135m-instruct"))
    s.add_argument("--model", required=True, help="tiny-hermes | smollm2-135m-instruct | hub id | folder")
    s.add_argument("--output", help="folder to write (default: the cache)")
    s.set_defaults(handler=_prepare)

    s = sub.add_parser("quantize", help="INT4-AWQ calibration and TensorRT-LLM checkpoint export",
                       **example("python -m build_engine quantize --model smollm2-135m-instruct --output "
                                 "artifacts/smollm2-135m-instruct/checkpoint"))
    s.add_argument("--model", required=True, help="built-in name, preset source, hub id or local HF folder")
    s.add_argument("--output", required=True)
    s.add_argument("--preset", help=f"settings to use (default: the model's own); one of {', '.join(presets.names())}")
    s.add_argument("--group-size", type=int, help="AWQ group size, 64 or 128 (default: the preset's)")
    s.add_argument("--algorithm", choices=("awq_lite", "awq_full"))
    g = s.add_mutually_exclusive_group()
    g.add_argument("--calib-text", help="a UTF-8 text file to calibrate on (documents split by blank lines)")
    g.add_argument("--calib-dataset", choices=calibration.DATASETS)
    s.add_argument("--calib-size", type=int, help="number of calibration samples")
    s.add_argument("--calib-seq-len", type=int, help="tokens per calibration sample")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tp-size", type=int, default=1, choices=(1, 2, 4, 8),
                   help="tensor parallelism: one rank file per GPU (default: 1)")
    s.set_defaults(handler=_quantize)

    s = sub.add_parser("build", help="build an engine from a TensorRT-LLM checkpoint",
                       **example("python -m build_engine build --checkpoint artifacts/smollm2-135m-instruct/checkpoint "
                                 "--output artifacts/smollm2-135m-instruct/engine-cpu --target cpu"))
    s.add_argument("--checkpoint", required=True, help="a checkpoint folder written by `quantize`")
    s.add_argument("--output", required=True, help="the engine folder (an older one is replaced when the build succeeds)")
    s.add_argument("--target", choices=("gpu", "cpu", "synthetic"), required=True,
                   help="gpu: trtllm-build (needs the TensorRT-LLM container); cpu: the onnxruntime engine; "
                        "synthetic: no compute, tokens at a GPU's pace (load tests without a GPU)")
    s.add_argument("--dry-run", action="store_true", help="print what would run and stop")
    s.add_argument("--accuracy-level", type=int, choices=(1, 4), default=4,
                   help="CPU engine: 1 = fp32 compute, 4 = int8 activations (faster)")
    s.add_argument("--lm-head", choices=("fp32", "int8", "int4"), default="fp32",  # = cpu.graph.LM_HEADS (tested)
                   help="CPU engine: fp32 = exact (the checkpoint's), int8 / int4 = faster; `verify` reports the cost")
    g = s.add_argument_group("synthetic engine")
    g.add_argument("--schedule", choices=("roofline", "rate", "max"), default="roofline",
                   help="roofline: step times from the GPU's bandwidth and flops; rate: --tokens-per-s per stream; "
                        "max: as fast as it goes (default: %(default)s)")
    g.add_argument("--gpu", default="h100", help="roofline: the GPU to model (default: %(default)s)")
    g.add_argument("--efficiency", type=float, default=0.7,
                   help="roofline: share of the datasheet bandwidth and flops reached (default: %(default)s)")
    g.add_argument("--tokens-per-s", type=float, help="rate: tokens per second per stream")
    g.add_argument("--size-as", metavar="PRESET",
                   help="roofline: size the model as this preset's (e.g. nous-hermes-2-mistral-7b-dpo) instead of "
                        "the checkpoint's own tensors")
    s.set_defaults(handler=_build)

    s = sub.add_parser("verify", help="CPU engine vs an independent reference; quantized vs original",
                       **example(f"python -m build_engine verify --checkpoint {SMOL}/checkpoint --engine "
                                 f"{SMOL}/engine-cpu --report {SMOL}/verify.json"))
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--engine", required=True, help="a CPU engine folder built from that checkpoint")
    s.add_argument("--report", required=True, help="where to write the JSON report")
    s.add_argument("--original", help="the original HF model (default: the checkpoint manifest's source)")
    s.add_argument("--compare-engine", action="append", metavar="DIR",
                   help="another CPU engine of the same checkpoint (e.g. --lm-head int8) to report beside it")
    s.set_defaults(handler=_verify)
    return p


main = cli.entry(parser)


if __name__ == "__main__":
    sys.exit(main())
