"""Service tiers: validation, the paper's mix, parsing (compact and files), assignment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from replica.tiers import TierError, TierMix, TierSpec, paper_tiers, parse_tiers


def spec(name: str, tbt_slo_s: float, share: float, **kw: object) -> TierSpec:
    return TierSpec(name=name, tbt_slo_s=tbt_slo_s, share=share, **kw)


# ----------------------------------------------------------------------------------- models

def test_paper_tiers() -> None:
    mix = paper_tiers()
    assert mix.names == ["premium", "free"]
    premium, free = mix.by_name("premium"), mix.by_name("free")
    assert (premium.tbt_slo_s, premium.share, premium.rank) == (0.100, 0.05, 0)
    assert (free.tbt_slo_s, free.share, free.rank) == (0.500, 0.95, 1)
    assert premium.ttft_target_s == free.ttft_target_s == 0.5
    assert mix.strictest is premium
    np.testing.assert_allclose(mix.shares, [0.05, 0.95])


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tbt_slo_s": 0.0}, "tbt_slo_s"),
    ({"tbt_slo_s": -0.1}, "tbt_slo_s"),
    ({"tbt_slo_s": float("nan")}, "tbt_slo_s"),
    ({"ttft_target_s": 0.0}, "ttft_target_s"),
    ({"share": 0.0}, "share"),
    ({"share": 1.01}, "share"),
    ({"rank": -1}, "rank"),
    ({"name": "  "}, "name"),
    ({"tbt_ms": 100}, "tbt_ms"),  # extra="forbid"
])
def test_tierspec_rejects(kwargs: dict, field: str) -> None:
    values = {"name": "t", "tbt_slo_s": 0.1, "share": 1.0} | kwargs
    with pytest.raises(ValidationError) as info:
        TierSpec(**values)
    assert info.value.errors()[0]["loc"] == (field,)


def test_tierspec_is_frozen() -> None:
    with pytest.raises(ValidationError):
        spec("a", 0.1, 1.0).share = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(("tiers", "fragment"), [
    ([spec("a", 0.1, 0.5), spec("a", 0.2, 0.5)], "duplicate tier name(s): a"),
    ([spec("a", 0.1, 0.5), spec("b", 0.2, 0.4)], "shares sum to 0.9"),
    ([spec("a", 0.1, 0.6), spec("b", 0.2, 0.6)], "shares sum to 1.2"),
    ([spec("a", 0.1, 0.5, rank=0), spec("b", 0.2, 0.5)], "every tier or for none"),
    ([spec("a", 0.1, 0.5, rank=1), spec("b", 0.2, 0.5, rank=1)], "ranks must be unique"),
    ([], "at least 1"),
])
def test_tiermix_rejects(tiers: list[TierSpec], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        TierMix(tiers=tiers)


def test_shares_within_tolerance_are_accepted() -> None:
    mix = TierMix(tiers=[spec("a", 0.1, 1 / 3), spec("b", 0.2, 1 / 3), spec("c", 0.3, 1 / 3 + 5e-7)])
    assert mix.shares.sum() == pytest.approx(1.0, abs=1e-15)


def test_default_ranks_follow_tbt_slo() -> None:
    mix = TierMix(tiers=[spec("free", 0.5, 0.7), spec("premium", 0.1, 0.1), spec("standard", 0.2, 0.2)])
    assert [t.rank for t in mix.tiers] == [2, 0, 1]
    assert mix.strictest.name == "premium"


def test_explicit_ranks_win_over_tbt_order() -> None:
    mix = TierMix(tiers=[spec("a", 0.5, 0.5, rank=0), spec("b", 0.1, 0.5, rank=3)])
    assert mix.strictest.name == "a"


def test_by_name_and_index() -> None:
    mix = paper_tiers()
    assert mix.index("free") == 1
    with pytest.raises(KeyError, match="unknown tier 'gold'; tiers are premium, free"):
        mix.by_name("gold")


# ------------------------------------------------------------------------------- assignment

@pytest.mark.parametrize("shares", [(0.05, 0.95), (0.5, 0.5), (0.2, 0.3, 0.5), (1.0,)])
def test_assignment_proportions(shares: tuple[float, ...]) -> None:
    mix = TierMix(tiers=[spec(f"t{i}", 0.1 * (i + 1), s) for i, s in enumerate(shares)])
    n = 100_000
    idx = mix.assign(n, seed=0)
    assert idx.dtype == np.int64 and len(idx) == n
    counts = np.bincount(idx, minlength=len(shares))
    for share, count in zip(shares, counts):
        sd = np.sqrt(n * share * (1 - share))
        assert abs(count - n * share) <= 5 * sd + 1


def test_assignment_deterministic_per_seed() -> None:
    mix = paper_tiers()
    np.testing.assert_array_equal(mix.assign(1000, seed=1), mix.assign(1000, seed=1))
    assert not np.array_equal(mix.assign(1000, seed=1), mix.assign(1000, seed=2))
    assert len(mix.assign(0, seed=1)) == 0
    with pytest.raises(ValueError):
        mix.assign(-1, seed=1)


# ----------------------------------------------------------------------------- compact form

def test_parse_compact_matches_paper() -> None:
    mix = parse_tiers("premium:0.1:0.05, free:0.5:0.95")
    assert mix == paper_tiers()


def test_parse_compact_with_ttft_target() -> None:
    mix = parse_tiers("gold:0.05:0.1:0.2,free:0.5:0.9")
    assert mix.by_name("gold").ttft_target_s == 0.2
    assert mix.by_name("free").ttft_target_s == 0.5


@pytest.mark.parametrize(("text", "fragment"), [
    ("premium:0.1", "tier 1 'premium:0.1': expected name:tbt_slo_s:share[:ttft_target_s], got 2"),
    ("premium:0.1:0.05,free:0.5:0.95:1:2", "tier 2 'free:0.5:0.95:1:2': expected"),
    ("premium:fast:0.05,free:0.5:0.95", "tier 1 'premium:fast:0.05': tbt_slo_s: Input should be a valid number"),
    ("premium:0.1:0.05,free:0.5:lots", "tier 2 'free:0.5:lots': share:"),
    ("premium:0.1:0.05,free:0:0.95", "tier 2 'free:0:0.95': tbt_slo_s: Input should be greater than 0"),
    ("premium:0.1:1.5", "tier 1 'premium:0.1:1.5': share: Input should be less than or equal to 1"),
    ("premium:0.1:0.05,free:0.5:0.95:-1", "tier 2 'free:0.5:0.95:-1': ttft_target_s"),
    (":0.1:1", "tier 1 ':0.1:1': name"),
    ("a:0.1:0.5,a:0.2:0.5", "tier 2 'a:0.2:0.5': duplicate tier name 'a'"),
    ("premium:0.1:0.05,free:0.5:0.90", "shares sum to 0.95"),
    ("premium:0.1:0.05,free:0.5:0.95,", "tier 3 '': expected"),
    ("", "empty tier specification"),
])
def test_parse_compact_errors_name_the_part(text: str, fragment: str) -> None:
    with pytest.raises(TierError) as info:
        parse_tiers(text)
    assert fragment in str(info.value)


# -------------------------------------------------------------------------------- files

PAPER_YAML = """\
# the paper's two tiers
tiers:
  - name: premium
    tbt_slo_s: 0.1
    share: 0.05
    rank: 0
  - name: free
    tbt_slo_s: 0.5
    share: 0.95
    rank: 1
"""


@pytest.mark.parametrize(("name", "text"), [
    ("tiers.yaml", PAPER_YAML),
    ("tiers.yml", "- {name: premium, tbt_slo_s: 0.1, share: 0.05}\n- {name: free, tbt_slo_s: 0.5, share: 0.95}\n"),
    ("tiers.json", '{"tiers": [{"name": "premium", "tbt_slo_s": 1e-1, "share": 0.05},'
                   ' {"name": "free", "tbt_slo_s": 0.5, "share": 0.95}]}'),
])
def test_parse_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert parse_tiers(path) == paper_tiers()
    assert parse_tiers(str(path)) == paper_tiers()


@pytest.mark.parametrize(("text", "line", "fragment"), [
    (PAPER_YAML.replace("share: 0.95", "share: 2"), 9, "tier 1 (free): share: Input should be less than or equal to 1"),
    (PAPER_YAML.replace("tbt_slo_s: 0.1", "tbt_slo_s: quick"), 4, "tier 0 (premium): tbt_slo_s: Input should be a valid number"),
    (PAPER_YAML.replace("    rank: 1\n", "    rnak: 1\n"), 10, "tier 1 (free): rnak: Extra inputs are not permitted"),
    (PAPER_YAML.replace("    tbt_slo_s: 0.5\n", ""), 7, "tier 1 (free): tbt_slo_s: Field required"),
    (PAPER_YAML.replace("name: free", "name: premium"), 7, "tier 1: duplicate tier name 'premium'"),
    (PAPER_YAML.replace("share: 0.95", "share: 0.9"), 3, "shares sum to 0.95"),
    (PAPER_YAML.split("  - name: free")[0] + "  - free\n", 7, "tier 1: expected a mapping, got str"),
    ("tiers:\n  - name: premium\n   bad indent: 1\n", 3, "malformed YAML"),
    ("tiers: []\n", 1, "expected a non-empty list of tiers"),
])
def test_yaml_errors_name_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    with pytest.raises(TierError) as info:
        parse_tiers(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}: "), message
    assert fragment in message


@pytest.mark.parametrize(("text", "fragment"), [
    ("tiers: []\nextra: 1\n", "mapping with only 'tiers'"),
    ("42\n", "expected a non-empty list of tiers"),
])
def test_yaml_shape_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    with pytest.raises(TierError, match=fragment):
        parse_tiers(path)


def test_malformed_json_file(tmp_path: Path) -> None:
    path = tmp_path / "tiers.json"
    path.write_text('[{"name": "a",\n "share": }]')
    with pytest.raises(TierError, match=rf"^{path}, line 2, column 11: malformed JSON"):
        parse_tiers(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(TierError, match=f"{path}: cannot read tier file"):
        parse_tiers(str(path))


def test_tier_error_is_value_error() -> None:
    assert issubclass(TierError, ValueError)


def test_inline_json_round_trips_a_mix_with_its_ranks():
    mix = TierMix(tiers=[TierSpec(name="gold", tbt_slo_s=0.5, share=0.5, rank=0),
                         TierSpec(name="free", tbt_slo_s=0.1, share=0.5, rank=1)])
    assert parse_tiers(mix.model_dump_json()) == mix
    assert parse_tiers(json.dumps([t.model_dump() for t in mix.tiers])) == mix


@pytest.mark.parametrize("text, fragment", [
    ('{"tiers": [', "malformed JSON"),
    ('[{"name": "a", "tbt_slo_s": -1, "share": 1}]', "tbt_slo_s"),
])
def test_bad_inline_json_is_a_tier_error_naming_the_problem(text, fragment):
    with pytest.raises(TierError, match=fragment):
        parse_tiers(text)
