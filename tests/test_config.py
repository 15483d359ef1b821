from __future__ import annotations

import pytest

from edgekif.config import Config, dump_default_toml, load_config
from edgekif.errors import ConfigError


def test_defaults_match_the_paper_and_code():
    c = Config()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 32, 0.05, ["q_proj", "v_proj"])
    assert (c.kif.inner_steps, c.kif.outer_steps, c.kif.mask_quantile) == (8, 4, 0.8)
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
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, match):
    p = tmp_path / "edgekif.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_default_toml_roundtrips(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text(dump_default_toml())
    assert load_config(p).to_dict() == Config().to_dict()
