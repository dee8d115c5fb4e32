"""Every stage's command line is built from its config dataclass by trainer.clip.flags: help for every flag,
--print-config, presets, validation errors as usage errors (exit 2), and flat <-> nested configs."""
import json

import pytest

from indexing.build import IndexConfig
from indexing.embed import EmbedConfig
from indexing.report import ReportConfig
from indexing.search import SearchConfig
from indexing.serve import ServeConfig
from pipeline import cli
from pipeline.crawl import CrawlConfig
from pipeline.demo import DemoConfig
from pipeline.filter import FilterConfig
from pipeline.stats import StatsConfig
from pipeline.sampleweb import BuildCommand, ServeCommand
from pipeline.shard import ShardConfig
from trainer.clip.flags import CLI, flat, leaves, with_flags
from trainer.config import TrainConfig
from trainer.evaluate import EvalRunConfig
from trainer.ray_launch import RayLaunchConfig
from trainer.train import parse_args

CONFIGS = [TrainConfig, RayLaunchConfig, EvalRunConfig, CrawlConfig, FilterConfig, ShardConfig, StatsConfig,
           DemoConfig,
           BuildCommand, ServeCommand, EmbedConfig, IndexConfig, SearchConfig, ReportConfig, ServeConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_flag_has_help_and_a_default_config_builds(cls):
    parser = CLI(cls, prog="x").parser
    missing = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
    assert not missing, missing
    flags = [leaf.flag for leaf in leaves(cls) if not leaf.meta["positional"]]
    assert len(flags) == len(set(flags))


# (argv, a key of the printed JSON and its value) for each `clipforge <command> ... --print-config`
PRINTED = {
    "sample-web": (["out", "--tiny", "--port", "9"], lambda c: c["web"]["port"] == 9 and c["web"]["max_emoji"] == 120),
    "serve-web": (["out"], lambda c: c["port"] is None),
    "heldout": (["h", "--tiny", "--image-size", "96"], lambda c: c["image_size"] == 96 and c["max_emoji"] == 90),
    "crawl": (["u.parquet", "c", "--ignore-opt-out", "--save-additional-columns", "a", "b"],
              lambda c: c["fetch"]["ignore_opt_out"] and c["save_additional_columns"] == ["a", "b"]),
    "filter": (["c", "f", "--demo", "--no-exact-pair", "--languages"],
               lambda c: c["dedup"]["exact_pair"] is False and c["dedup"]["near_dup"] and c["rules"]["languages"] == []),
    "shard": (["f", "s", "--samples-per-shard", "7"], lambda c: c["samples_per_shard"] == 7),
    "embed": (["s", "--checkpoint", "c", "--out", "e", "--batch-size", "7", "--no-reuse", "--max-shard-retry", "4"],
              lambda c: c["batch_size"] == 7 and c["reuse"] is False and c["distribute"]["max_shard_retry"] == 4),
    "stats": (["f", "--top", "5", "--plots", "p"], lambda c: c["top"] == 5 and c["plots"] == "p"),
    "train": (["--shards", "a", "b", "--out", "r", "--tiny", "--epochs", "3", "--no-grad-checkpointing"],
              lambda c: c["data"]["shards"] == ["a", "b"] and c["optim"]["steps"] == 0 and c["optim"]["epochs"] == 3
              and c["checkpointing"]["enabled"] is False and c["model"]["name"] == "tiny"),
    "train-ray": (["--num-workers", "3", "--print-config", "--", "--shards", "a", "--out", "r"],
                  lambda c: c["num_workers"] == 3),
    "eval": (["--checkpoint", "c", "--retrieval", "r", "--lp-cs", "1", "2"], lambda c: c["lp_cs"] == [1.0, 2.0]),
    "index": (["e", "--out", "o", "--tiny", "--memory-budget", "512MB"],
              lambda c: c["embeddings"] == "e" and c["tune_queries"] == 64 and c["memory_budget"] == "512MB"),
    "search": (["a red apple", "a dog", "--k", "3"], lambda c: c["queries"] == ["a red apple", "a dog"]),
    "serve": (["idx", "--port", "9000", "--max-k", "7"],
              lambda c: c["index_dir"] == "idx" and c["port"] == 9000 and c["max_k"] == 7 and c["host"] == "127.0.0.1"),
    "demo": (["--tiny", "--query", "x", "--query", "y"], lambda c: c["queries"] == ["x", "y"] and c["steps"] == 6),
}


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_print_config_of_every_command(command, capsys):
    argv, check = PRINTED[command]
    if "--print-config" not in argv:
        argv = argv + ["--print-config"]
    assert cli.main([command, *argv]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert check(printed), printed


def test_usage_and_validation_errors_exit_2(capsys):
    assert cli.main(["shard", "f", "s", "--samples-per-shard", "0"]) == 2
    assert "--samples-per-shard must be >= 1" in capsys.readouterr().err
    assert cli.main(["train", "--shards", "a", "--out", "r", "--steps", "3", "--epochs", "2"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["train", "--shards", "a", "--out", "r", "--compile", "--zero", "3"]) == 2
    assert "--compile does not work with --zero 3" in capsys.readouterr().err
    assert cli.main(["search", "q", "--no-such-flag"]) == 2
    assert cli.main(["filter", "--help"]) == 0


def test_flat_and_nested_configs_round_trip():
    cfg = parse_args(["--shards", "a", "--out", "r", "--batch-size", "4", "--checkpoint-chunks", "2",
                      "--aug-scale", "0.5", "1", "--eval-every", "5"])
    assert cfg.optim.batch_size == 4 and cfg.checkpointing.chunks == 2 and cfg.eval.every == 5
    assert cfg.data.aug_scale == (0.5, 1.0)
    f = flat(cfg)
    assert f["batch_size"] == 4 and f["checkpoint_chunks"] == 2 and f["aug_scale"] == [0.5, 1.0]
    assert with_flags(TrainConfig(), **f) == cfg
    assert TrainConfig.tiny(zero=3).zero == 3 and TrainConfig.tiny().model.name == "tiny"
    with pytest.raises(TypeError, match="no options"):
        with_flags(cfg, no_such_option=1)
    with pytest.raises(ValueError, match="need --grad-checkpointing"):
        TrainConfig.tiny(grad_checkpointing=False, checkpoint_chunks=2)
