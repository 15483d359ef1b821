from __future__ import annotations

import re

import pytest

from edgekif.config import Config, apply_overrides, dump_default_toml, load_config, overrides_toml
from edgekif.errors import ConfigError


def test_defaults_match_the_paper_and_code():
    c = Config()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 32, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # Q=2, M=1 where the paper has 8 and 4: the three-seed comparison in docs/benchmarks.md
    assert (c.kif.inner_steps, c.kif.outer_steps, c.kif.mask_quantile) == (2, 1, 0.8)
    assert (c.kif.w_both_in, c.kif.w_both_out, c.kif.w_neither_in, c.kif.w_neither_out) == (0.4, 0.6, 0.5, 0.5)


def test_toml_then_overrides(tmp_path):
    p = tmp_path / "edgekif.toml"
    p.write_text('data_dir = "/tmp/x"\n[train]\nlr = 0.01\nstrategy = "replay"\n[lora]\ntarget_modules = ["q_proj"]\n')
    c = load_config(p, ["train.lr=0.002", "kif.inner_steps=4", "train.deterministic=true", "lora.target_modules=q_proj,k_proj"])
    assert c.data_dir == "/tmp/x" and c.train.lr == 0.002 and c.train.strategy == "replay"
    assert c.kif.inner_steps == 4 and c.train.deterministic is True
    assert c.lora.target_modules == ["q_proj", "k_proj"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("[train]\nlrr = 1\n", "unknown option train.lrr"),
        ("[nope]\nx = 1\n", "unknown section"),
        ("[train]\nbatch_size = 'big'\n", "expected an integer"),
        ("[train]\nstrategy = 'magic'\n", "train.strategy"),
        ("[train\n", "edgekif.toml"),
        ("[eval]\nmax_prompt_tokens = -1\n", "eval.max_prompt_tokens"),
        ("[eval]\nmax_new_tokens = 0\n", "eval.max_new_tokens"),
        ("[eval]\ncompute_dtype = 'fp16'\n", "eval.compute_dtype must be one of fp32, bf16"),
        ("[train]\ncompute_dtype = 'int8'\n", "train.compute_dtype must be one of fp32, bf16"),
        ("[train]\ngeneration_lr_scale = 0\n", "train.generation_lr_scale must be positive"),
        ("[train]\ngeneration_lr_scale = -0.5\n", "train.generation_lr_scale must be positive"),
        # values no option can mean: TOML's true is an int to Python, nan and inf are floats
        ("[replay]\ncapacity = true\n", "capacity: expected an integer, got True"),
        ("[train]\nlr = inf\n", "lr: expected a finite number, got inf"),
        ("[replay]\nfraction = nan\n", "fraction: expected a finite number, got nan"),
        ("[replay]\nmin_per_task = -3\n", "replay.min_per_task must be >= 0"),
        ("[service]\nlog_backups = 0\n", "0 would never rotate the log"),
        ("[service]\ngeneration_holdout_max = 0\n", "service.generation_holdout_max must be at least 1"),
        ("[service]\nholdout_fraction = 0\n", re.escape("service.holdout_fraction must be in (0, 1)")),
        ("[data]\nmax_records = -1\n", re.escape("data.max_file_bytes, data.max_records, data.max_line_bytes and data.max_field_chars must be positive")),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, match):
    p = tmp_path / "edgekif.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_config_with_a_utf8_bom_loads(tmp_path):
    """Editors on Windows save a byte-order mark; sidecars and task files accept one, so does the config."""
    p = tmp_path / "edgekif.toml"
    p.write_bytes(b"\xef\xbb\xbf" + b'[replay]\ncapacity = 10\n[train]\nlr = 0.01\n')
    c = load_config(p)
    assert c.replay.capacity == 10 and c.train.lr == 0.01


def test_default_toml_roundtrips(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text(dump_default_toml())
    assert load_config(p).to_dict() == Config().to_dict()


def test_overrides_toml_holds_just_the_overrides_and_loads_back(tmp_path):
    overrides = ["data.max_length=128", "lora.target_modules=q_proj, k_proj,o_proj", "kif.beta1=0.55",
                 "service.quiet_seconds=1", "lora.dropout=0.1", "data.max_length=64", "data_dir=/srv/ek"]
    text = overrides_toml(overrides)
    # only what was given, by section in file order (the strategy's after [train]); the last
    # value of a key given twice; data_dir before any table, as TOML needs
    assert text == ('data_dir = "/srv/ek"\n\n[lora]\ntarget_modules = ["q_proj", "k_proj", "o_proj"]\ndropout = 0.1\n\n'
                    "[data]\nmax_length = 64\n\n[kif]\nbeta1 = 0.55\n\n[service]\nquiet_seconds = 1.0\n")
    p = tmp_path / "edgekif.toml"
    p.write_text(text)
    assert load_config(p).to_dict() == apply_overrides(Config(), overrides).to_dict()
    assert overrides_toml([]) == ""
    with pytest.raises(ConfigError, match="unknown option lora.rank"):
        overrides_toml(["lora.rank=8"])


# ------------------------------------------------------------------ where the files are (XDG)


@pytest.fixture()
def xdg_env(tmp_path, monkeypatch):
    """An isolated HOME with XDG variables pointing inside tmp_path; EDGEKIF_* unset."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("EDGEKIF_DATA_DIR", "EDGEKIF_CACHE_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


def _cli_config(*argv):
    from edgekif.cli import _config, build_parser

    return _config(build_parser().parse_args(["config", *argv]))


def test_config_file_precedence_explicit_then_data_dir_then_xdg_then_defaults(tmp_path, xdg_env, monkeypatch):
    from edgekif.config import find_config, xdg_config_file

    data = tmp_path / "data"
    data.mkdir()
    # Nothing anywhere: defaults.
    assert find_config([f"data_dir={data}"]) is None
    assert _cli_config("--data-dir", str(data)).train.lr == Config().train.lr
    # The user's XDG file (default location ~/.config/edgekif/config.toml).
    assert xdg_config_file() == xdg_env / ".config" / "edgekif" / "config.toml"
    xdg_config_file().parent.mkdir(parents=True)
    xdg_config_file().write_text("[train]\nlr = 0.5\nbatch_size = 3\n")
    assert _cli_config("--data-dir", str(data)).train.lr == 0.5
    # $XDG_CONFIG_HOME moves it.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert _cli_config("--data-dir", str(data)).train.lr == Config().train.lr
    (tmp_path / "cfg" / "edgekif").mkdir(parents=True)
    (tmp_path / "cfg" / "edgekif" / "config.toml").write_text("[train]\nlr = 0.25\nbatch_size = 3\n")
    assert _cli_config("--data-dir", str(data)).train.lr == 0.25
    # The data dir's own file takes the XDG file's place (not merged: batch_size is the default again).
    (data / "edgekif.toml").write_text("[train]\nlr = 0.125\n")
    assert find_config([f"data_dir={data}"]) == data / "edgekif.toml"
    c = _cli_config("--data-dir", str(data))
    assert (c.train.lr, c.train.batch_size) == (0.125, Config().train.batch_size)
    # Found through $EDGEKIF_DATA_DIR too.
    monkeypatch.setenv("EDGEKIF_DATA_DIR", str(data))
    assert _cli_config().train.lr == 0.125
    # An explicit --config wins over both; --set over the file.
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[train]\nlr = 0.0625\n")
    assert _cli_config("--config", str(explicit)).train.lr == 0.0625
    assert _cli_config("--config", str(explicit), "--set", "train.lr=0.03").train.lr == 0.03


def test_relative_xdg_variables_are_ignored_as_the_spec_says(xdg_env, monkeypatch):
    from edgekif.config import default_data_dir, xdg_config_file

    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/cfg")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    assert xdg_config_file() == xdg_env / ".config" / "edgekif" / "config.toml"
    assert default_data_dir() == xdg_env / ".local" / "share" / "edgekif"


def test_cache_root_precedence_env_then_existing_data_dir_cache_then_xdg(tmp_path, xdg_env, monkeypatch):
    from edgekif.workflow import cache_root

    cfg = load_config(None, [f"data_dir={tmp_path / 'data'}"])
    assert cache_root(cfg) == xdg_env / ".cache" / "edgekif"  # a new install: the user's cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdgcache"))
    assert cache_root(cfg) == tmp_path / "xdgcache" / "edgekif"
    (tmp_path / "data" / "cache").mkdir(parents=True)  # made by an earlier version: kept, not converted again
    assert cache_root(cfg) == tmp_path / "data" / "cache"
    monkeypatch.setenv("EDGEKIF_CACHE_DIR", str(tmp_path / "shared"))
    assert cache_root(cfg) == tmp_path / "shared"


def test_serve_hands_the_found_file_to_the_daemon_for_sighup(tmp_path, xdg_env, monkeypatch):
    import service.daemon
    from service.cli import main

    seen = {}

    def fake_run_daemon(cfg, *, config_path=None, overrides=None):
        seen.update(lr=cfg.train.lr, config_path=config_path)
        return 0

    monkeypatch.setattr(service.daemon, "run_daemon", fake_run_daemon)
    data = tmp_path / "data"
    xdg = xdg_env / ".config" / "edgekif" / "config.toml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("[train]\nlr = 0.5\n")
    assert main(["serve", "--data-dir", str(data)]) == 0
    assert seen == {"lr": 0.5, "config_path": xdg}


def test_common_options_go_before_or_after_the_command(tmp_path, xdg_env, monkeypatch):
    """`edgekif --data-dir D status` as git and docker take theirs; after the command they
    override; --set before and after add up; serve hands the daemon the same overrides."""
    import service.daemon
    from edgekif.cli import _config, build_parser
    from service.cli import add_daemon_commands, main

    parse = build_parser(add_daemon_commands).parse_args
    a, b = tmp_path / "a", tmp_path / "b"
    assert _config(parse(["--data-dir", str(a), "status"])).data_path == a
    assert _config(parse(["--data-dir", str(a), "status", "--data-dir", str(b)])).data_path == b
    c = _config(parse(["-s", "train.lr=0.5", "--set", "train.batch_size=3", "config", "-s", "train.lr=0.25"]))
    assert (c.train.lr, c.train.batch_size) == (0.25, 3)
    args = parse(["-v", "status"])
    assert args.verbose is True and parse(["status"]).verbose is False
    assert (args.config, args.data_dir, args.set) == (None, None, [])
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[train]\nlr = 0.0625\n")
    assert _config(parse(["-c", str(explicit), "status"])).train.lr == 0.0625

    seen = {}

    def fake_run_daemon(cfg, *, config_path=None, overrides=None):
        seen.update(data=cfg.data_path, lr=cfg.train.lr, config_path=config_path, overrides=overrides)
        return 0

    monkeypatch.setattr(service.daemon, "run_daemon", fake_run_daemon)
    assert main(["--data-dir", str(a), "-s", "train.lr=0.5", "serve", "-s", "train.lr=0.25"]) == 0
    assert seen == {"data": a, "lr": 0.25, "config_path": None, "overrides": [f"data_dir={a}", "train.lr=0.5", "train.lr=0.25"]}


def test_replay_strategy_has_its_own_section_with_kifs_schedule(tmp_path):
    """[experience_replay] configures the replay strategy; [kif] (old files too) only Recurrent-KIF."""
    c = Config()
    assert (c.experience_replay.inner_steps, c.experience_replay.outer_steps, c.experience_replay.replay_batch_size) == (c.kif.inner_steps, c.kif.outer_steps, c.kif.replay_batch_size)
    p = tmp_path / "edgekif.toml"
    p.write_text("[kif]\ninner_steps = 4\n[experience_replay]\nreplay_batch_size = 2\n")
    c = load_config(p)
    assert c.kif.inner_steps == 4 and c.experience_replay.inner_steps == 2 and c.experience_replay.replay_batch_size == 2
    assert "[experience_replay]" in dump_default_toml()
    with pytest.raises(ConfigError, match="experience_replay.inner_steps"):
        load_config(None, ["experience_replay.inner_steps=0"])

