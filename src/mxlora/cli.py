"""The ``mxlora`` command line.

Each subcommand names the function that runs it as ``"module:function"``; the module is only
imported when that subcommand runs, so ``mxlora --help`` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mxlora import __version__


class _Parser(argparse.ArgumentParser):
    """Options and positionals (``key=value`` overrides) parse in any order, as users expect.

    A subcommand's own parser uses argparse's intermixed parsing, so ``mxlora train CONFIG
    train.lr=1e-4 --overwrite data.select=8`` works; parsers with subcommands of their own
    (which intermixed parsing does not support) parse as usual.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back in here
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing {what}; the old one is kept until the new one is complete",
    )


def _add(sub: argparse._SubParsersAction, name: str, target: str, help: str, description: str):
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(_target=target)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mxlora",
        description="LoRA fine-tuning for gpt-oss (20b/120b) with MXFP4 experts. "
        "Takes Hugging Face Hub ids or local folders/files.",
    )
    # The running code's version (a test keeps it equal to pyproject.toml's).
    parser.add_argument("--version", action="version", version=f"mxlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(
        sub,
        "make-tokenizer",
        "mxlora.model.tokenizer:cli_main",
        "build the gpt-oss (o200k_harmony) tokenizer offline",
        "Build the gpt-oss tokenizer (o200k_harmony) from what installed packages ship: the o200k "
        "ranks from quicktok-v1, the 21 Harmony special tokens at the Hub ids and gpt-oss's chat "
        "template. The output folder loads with AutoTokenizer.from_pretrained offline; its "
        "tokenizer.json is byte-identical to the Hub's openai/gpt-oss-20b one.",
    )
    p.add_argument("out", help="output folder")

    p = _add(
        sub,
        "make-tiny",
        "mxlora.model.tiny:cli_main",
        "build a tiny gpt-oss checkpoint in the exact Hub layout",
        "Write a small random gpt-oss checkpoint in the Hub layout (config.json, safetensors with "
        "the real tensor names, MXFP4 *_blocks/*_scales experts with --mxfp4, "
        "generation_config.json and the real tokenizer). Deterministic from --seed.",
    )
    p.add_argument("out", help="output folder (must not exist yet, unless --overwrite)")
    _overwrite(p, "output folder")
    p.add_argument(
        "--layers", type=int, default=24, help="decoder layers (default 24, the demo's model)"
    )
    p.add_argument("--experts", type=int, default=4, help="local experts per layer (default 4)")
    p.add_argument("--experts-per-token", type=int, default=2, help="router top-k (default 2)")
    p.add_argument(
        "--hidden", type=int, default=64, help="hidden size, a multiple of 32 (default 64)"
    )
    p.add_argument(
        "--intermediate", type=int, default=64, help="expert width, multiple of 32 (default 64)"
    )
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--head-dim", type=int, default=16, help="head dimension (default 16)")
    p.add_argument("--sliding-window", type=int, default=128, help="sliding window (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument(
        "--mxfp4", dest="mxfp4", action="store_true", default=True, help="MXFP4 experts (default)"
    )
    fmt.add_argument(
        "--bf16",
        dest="mxfp4",
        action="store_false",
        help="plain bf16 expert tensors (gate_up_proj/down_proj), holding exactly the values the "
        "--mxfp4 checkpoint of the same seed dequantizes to",
    )

    p = _add(
        sub,
        "compare",
        "mxlora.recipes.compare:cli_main",
        "compare training runs: table and overlaid loss curves",
        "Read the report.json and metrics.jsonl of each run folder written by `mxlora train` and "
        "write comparison.md (peak allocated/reserved memory, peak RSS, trained tokens/s, train "
        "and wall time, steps, final train/eval loss, trainable parameters, tokens trained), "
        "comparison.png (train loss solid, eval loss dashed, all runs overlaid) and "
        "comparison.json (the exact numbers). Prints the table.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `mxlora train`")
    p.add_argument(
        "--out", default=None, help="output folder (default: the runs' common parent folder)"
    )

    p = _add(
        sub,
        "merge",
        "mxlora.recipes.merge:cli_main",
        "merge a LoRA adapter into its base model (safetensors + tokenizer)",
        "Load the base (an MXFP4 checkpoint is dequantized, as the seed does), apply the PEFT "
        "adapter (attention and expert LoRA) and fold it into the weights. The output folder "
        "loads plainly with AutoModelForCausalLM: safetensors weights, config.json without "
        "quantization_config, generation_config.json, tokenizer, and mxlora_merge.json (what was "
        "merged). Refuses to overwrite an existing --out and to merge an adapter into a model it "
        "is already merged into.",
    )
    p.add_argument("--base", required=True, help="base model: Hub id, folder or tiny[:key=value]")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (a run's adapter/)")
    p.add_argument(
        "--out", required=True, help="output folder (must not exist yet, unless --overwrite)"
    )
    _overwrite(p, "--out folder")
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="weight dtype to merge and save in (auto: bfloat16 on a bf16 GPU, else float32)",
    )

    p = _add(
        sub,
        "export",
        "mxlora.recipes.export:cli_main",
        "merge a LoRA adapter into an MXFP4 gpt-oss and keep it MXFP4 (Hub layout)",
        "Fold the adapter into the base and write the result as the Hub serves gpt-oss: the same "
        "shards, tensor names, dtypes and model.safetensors.index.json, config.json with its "
        "mxfp4 quantization_config, tokenizer, chat template and generation config. Tensors the "
        "adapter does not touch keep their exact bytes; attention LoRA is merged in the weights' "
        "dtype as PEFT merges it; adapted experts are dequantized, updated in float32 and "
        "re-quantized (OCP MX scale, ties to even). Streams tensor by tensor. Prints and writes "
        "export.json: per adapted expert weight |ΔW|, the share of it the MXFP4 weights keep and "
        "its cosine with ΔW, and (small models by default) logit agreement with the bf16 merge. "
        "Refuses a non-empty --out unless --overwrite; the folder appears complete or not at "
        "all. See docs/EXPORT.md.",
    )
    p.add_argument("--base", required=True, help="MXFP4 gpt-oss: Hub id, folder or tiny[:...]")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (a run's adapter/)")
    p.add_argument("--out", required=True, help="output folder (must not exist yet, or be empty)")
    _overwrite(p, "output folder")
    p.add_argument(
        "--experts",
        choices=("merge", "keep-adapter"),
        default="merge",
        help="merge: expert LoRA re-quantized into the MXFP4 experts (default); keep-adapter: "
        "experts kept as in the base, their LoRA written to OUT/expert_adapter (PEFT format)",
    )
    p.add_argument(
        "--logit-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare the export's logits with the bf16 merge on a few rendered rows (default: "
        "on for checkpoints up to 2 GB; it holds the bf16 merge in memory)",
    )

    p = _add(
        sub,
        "chat",
        "mxlora.recipes.chat:cli_main",
        "generate with gpt-oss in Harmony; show analysis and final apart",
        "Render a Harmony prompt (system message with the pinned date and reasoning effort, "
        "'reasoning language: X' as developer instructions as in the seed notebook, the user "
        "message), generate until gpt-oss's stop tokens (<|return|>, <|call|>, <|endoftext|>) or "
        "--max-new-tokens, and parse the reply with openai-harmony into the analysis and final "
        "channels. Output that is not a complete Harmony answer is shown raw, with the reason. "
        "Without --prompt, reads one prompt per line from stdin (each a new conversation).",
    )
    p.add_argument("--model", required=True, help="model: Hub id, folder (e.g. a merge) or tiny")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to apply (not merged)")
    p.add_argument("--prompt", default=None, help="the user message (default: read stdin lines)")
    p.add_argument(
        "--reasoning-language",
        default=None,
        metavar="LANG",
        help="instruct 'reasoning language: LANG' (the seed checks German)",
    )
    p.add_argument(
        "--effort",
        choices=("low", "medium", "high"),
        default="medium",
        help="reasoning effort in the system message (default medium)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=512, help="generation limit (default 512, the seed's)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.6,
        help="sampling temperature; 0 decodes greedily (default 0.6, the seed's)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print each reply as one JSON line: analysis, final, raw, valid, reason, stop, "
        "new_tokens",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="print the raw Harmony completion token by token as it is generated, then the "
        "parsed analysis/final",
    )

    p = _add(
        sub,
        "eval",
        "mxlora.recipes.evaluate:cli_main",
        "held-out loss and final-answer exact match of a run or a model",
        "Evaluate a run folder (its base model + adapter, and its data settings) or a model on "
        "the rows of a data source, rendered as for training: the mean loss over the assistant "
        "tokens (and perplexity) and, for data with a final answer (GSM8K's `#### 72`), the "
        "exact match of the `final` channel of greedy generations against the reference "
        "answers.",
    )
    p.add_argument("target", metavar="RUN_OR_MODEL", help="run folder, Hub id, folder or tiny")
    p.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="source spec, e.g. ../shared/data/gsm8k_test.jsonl",
    )
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (default: the run's)")
    p.add_argument("--select", type=int, default=None, help="evaluate this many rows (seeded)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024,
        help="generation limit per answer (default 1024)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="rows per loss batch (default 4)")
    p.add_argument("--json", action="store_true", help="print the result (with answers) as JSON")

    p = _add(
        sub,
        "train",
        "mxlora.recipes.train:cli_main",
        "LoRA fine-tune gpt-oss from a YAML config (TRL SFTTrainer + PEFT)",
        "Fine-tune a gpt-oss model with LoRA (attention projections and the experts of chosen "
        "layers) on one data set, assistant tokens only, with the seed notebook's "
        "hyperparameters unless the config says otherwise. Writes the run folder "
        "<output.root>/<output.name>: config.yaml (resolved), environment.json, metrics.jsonl, "
        "checkpoints/, adapter/ (PEFT format), report.json, report.md and loss.png. "
        "Overrides key=value win over the YAML, e.g. `train.lr=1e-4 data.select=200`. An existing "
        "run folder of the same name is refused unless --overwrite. Ctrl-C (or SIGTERM) saves "
        "a checkpoint and prints the command that resumes it.",
    )
    p.add_argument(
        "config",
        nargs="?",
        help="training config YAML (e.g. configs/tiny/quotes.yaml); not with --resume",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-4"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its newest complete checkpoint, with the config "
        "it was started with (saved in RUN_DIR/config.yaml); KEY=VALUE may change only what "
        "does not change the math (e.g. train.logging_steps, train.save_steps). A finished "
        "run is left as it is.",
    )
    _overwrite(p, "run folder of the same name")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, data summary, parameter counts and a memory estimate "
        "(model on the meta device); train nothing, write nothing",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this host (one per GPU; gloo on the CPU), re-launched "
        "under torchrun; train.batch_size stays the global rows per step (default 1)",
    )

    p = _add(
        sub,
        "run",
        "mxlora.recipes.run:cli_main",
        "the whole seed flow: train each data set, merge, chat check, compare",
        "Run a run config (e.g. configs/tiny/seed.yaml, configs/gpt-oss-20b/seed.yaml): train "
        "each listed training config in its own child process (own memory scope and peak), "
        "merge the chosen run's adapter into the base model, ask the merged model the chat "
        "question (reasoning language as configured; reply parsed into analysis and final), and "
        "compare the runs. Writes <output.root>/<output.name>/ (one folder per run, merged/, "
        "chat.json, compare/, run.json) and prints where the comparison report is.",
    )
    p.add_argument("config", help="run config YAML (e.g. configs/tiny/seed.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="run config overrides, e.g. chat.prompt=Hi",
    )
    _overwrite(p, "output folder")

    data = sub.add_parser(
        "data",
        help="look at training data before training on it",
        description="Training data tools. See docs/DATA.md for source specs, adapters, "
        "rendering and the reasons rows are dropped.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _add(
        data_sub,
        "inspect",
        "mxlora.data.inspect:cli_main",
        "rows kept/dropped, token lengths, loss share, rendered examples",
        "Read a data source the way `mxlora train` does (adapter, checks, Harmony rendering, "
        "max_len) and print: rows read, selected, kept and dropped by reason with row numbers; "
        "p50/p95/max token lengths of the prompt and of the completion (the tokens under "
        "loss); the share of tokens under loss; and N rendered examples with the loss-carrying "
        "tokens marked (green on a terminal, [[...]] otherwise). SPEC is a source spec "
        "(a .jsonl/.json/.parquet/.csv file, example:NAME, or a Hub id OWNER/NAME[:CONFIG]:SPLIT) "
        "or a training config YAML, whose data: block and train.max_len are used.",
    )
    p.add_argument("spec", help="source spec or training config YAML")
    p.add_argument(
        "--adapter",
        choices=("quotes", "messages", "fields", "chat"),
        help="row -> conversation mapping (default: guessed from the columns, or the YAML's)",
    )
    p.add_argument(
        "--render", choices=("harmony", "chat-template"), help="renderer (default harmony)"
    )
    p.add_argument("--select", type=int, help="inspect this many rows of the seeded shuffle")
    p.add_argument(
        "--max-len", type=int, help="longest row in tokens (default: the YAML's, else 2048)"
    )
    p.add_argument("--show", type=int, default=2, help="rendered examples to print (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON only")

    p = _add(
        sub,
        "make-random",
        "mxlora.model.random:cli_main",
        "write a full-size gpt-oss checkpoint with random weights (Hub layout)",
        "Write a gpt-oss checkpoint of the real size with random weights, in the exact layout of "
        "the Hub's: sharded safetensors (model-0000i-of-0000N.safetensors) with "
        "model.safetensors.index.json, MXFP4 experts (uint8 *_blocks and e8m0 *_scales, quantized "
        "by mxlora.mxfp4 from weights with a random gain per 32-value block, so scales vary as "
        "real ones do), every other tensor bf16, config.json, generation_config.json and the real "
        "tokenizer. Speed and memory do not depend on weight values: `mxlora bench` measures on "
        "it. Generated on --device one layer at a time and written shard by shard (host memory "
        "about one 5 GB shard); on a GPU gpt-oss-20b takes minutes.",
    )
    p.add_argument("out", help="output folder (must not exist yet, unless --overwrite)")
    _overwrite(p, "output folder")
    p.add_argument(
        "--config",
        required=True,
        help="20b, 120b (the embedded gpt-oss configs) or the path of a gpt-oss config.json",
    )
    p.add_argument("--device", default=None, help="where to generate (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = _add(
        sub,
        "bench",
        "mxlora.recipes.bench:cli_main",
        "measure training speed and memory of configuration variants",
        "For each variant of the bench config, in a fresh child process: load the checkpoint "
        "through the loader `mxlora train` uses, attach the LoRA targets, and time real training "
        "steps (TRL SFTTrainer: forward, backward, AdamW) after warm-up, on each workload "
        "(fixed-length random tokens, and real data sets rendered as training rows and padded as "
        "the trainer pads). Reports per variant and workload: trained (non-pad) tokens/s, step "
        "time, peak allocated and reserved memory, load time, MFU (6 x active parameters x "
        "tokens over the device's measured matmul rate) and the ratio to the first variant. "
        "Writes <results>/<name>.json and .md and prints the table. A missing checkpoint is "
        "first built with make-random when the config says so.",
    )
    p.add_argument("config", help="bench config YAML (e.g. bench/configs/gpt-oss-20b.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="bench config overrides, e.g. steps=2 model=/data/gpt-oss-20b",
    )
    p.add_argument(
        "--only", default=None, help="comma-separated variant names to run (default: all)"
    )

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module_name, func_name = args._target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
