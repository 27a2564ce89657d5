"""The one table of scoring methods (anomaly.methods.registry): each family's example parses to
the spec written out by hand below, numbers out of bounds and unknown names end in one sentence,
a --methods list is case-insensitive without duplicates, and no other module holds a second
method table or a method-name pattern."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from anomaly.methods import registry
from anomaly.methods.registry import MethodSpec
from stylegan.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Each family's example and its spec, written out by hand (not derived from the table).
EXPECTED = {
    "izif": MethodSpec("izif", "izif", "classic", needs_rec=True, needs_features=True),
    "torch-euclidean": MethodSpec("torch-euclidean", "torch-euclidean", "classic",
                                  needs_rec=True),
    "latent": MethodSpec("latent", "latent", "classic", needs_latents=True),
    "sklearn:cosine": MethodSpec("sklearn:cosine", "sklearn", "classic", metric="cosine",
                                 needs_rec=True),
    "residual:smax:2": MethodSpec("residual:smax:2", "residual", "detector", agg="smax",
                                  sigma=2.0, needs_rec=True),
    "lesion:edge": MethodSpec("lesion:edge", "lesion", "detector", agg="lesion-edge",
                              needs_rec=True),
    "izif:0.5:b16": MethodSpec("izif:0.5:b16", "izif-kappa", "detector", agg="mean", kappa=0.5,
                               layers=("b16",), needs_rec=True, needs_features=True),
    "izif-areafree:1": MethodSpec("izif-areafree:1", "izif-areafree", "detector", agg="mean",
                                  kappa=1.0, needs_rec=True, needs_features=True),
    "dfeat-res:b8+b16": MethodSpec("dfeat-res:b8+b16", "dfeat-res", "detector",
                                   layers=("b8", "b16"), needs_rec=True, needs_features=True),
    "knn-latent:5": MethodSpec("knn-latent:5", "knn-latent", "detector", space="latent", k=5,
                               needs_latents=True),
    "maha-latent": MethodSpec("maha-latent", "maha-latent", "detector", space="latent",
                              needs_latents=True),
    "knn-dfeat:b16:5": MethodSpec("knn-dfeat:b16:5", "knn-dfeat", "detector",
                                  space="dfeat:b16", layers=("b16",), k=5, needs_features=True),
    "maha-dfeat:b16": MethodSpec("maha-dfeat:b16", "maha-dfeat", "detector", space="dfeat:b16",
                                 layers=("b16",), needs_features=True),
}
# (density, spread layers, needs a bank) of the same examples.
BANK = {"dfeat-res:b8+b16": ("", ("b8", "b16"), True), "knn-latent:5": ("knn", (), True),
        "maha-latent": ("maha", (), True), "knn-dfeat:b16:5": ("knn", (), True),
        "maha-dfeat:b16": ("maha", (), True), "izif-areafree:1": ("", (), True)}


def test_every_family_example_parses_to_its_spec():
    assert len(registry.FAMILIES) == 13
    assert {f.example: f.name for f in registry.FAMILIES} == {
        name: spec.family for name, spec in EXPECTED.items()}
    for family in registry.FAMILIES:
        spec = registry.parse(family.example.upper())  # names are case-insensitive
        assert spec == EXPECTED[family.example], family.name
        assert spec.system == family.system and family.description
        assert (spec.density, spec.spread_layers, spec.needs_bank) == \
            BANK.get(family.example, ("", (), False))


def test_parameters_the_examples_leave_out():
    assert registry.parse("residual:smax").sigma == 2.0  # SIGMA defaults to 2 px
    assert registry.parse("residual:mean").sigma == 0.0
    assert registry.parse("izif:0").needs_features is False  # kappa 0: no feature term
    assert registry.parse("izif:1e-3").layers == ()  # the model's layer
    assert registry.parse(" knn-latent:05 ").name == "knn-latent:05"


@pytest.mark.parametrize("name, words", [
    ("residual:smax:1e7", "SIGMA 1e+07 must lie in (0, 64] pixels"),
    ("knn-latent:0", "K 0 must lie in [1, 1000] neighbours"),
    ("izif:1e9", "kappa 1e+09 must lie in [0, 1e+06]"),
    ("dfeat-res:b8+b16+b8", "it names 3 layers; give at most 8, each once"),
    ("maha-dfeat:b4", "the layer b4 is not a D block b8 to b4096"),
    ("sklearn:mahalanobis", "needs a covariance estimated over a whole data set"),
])
def test_out_of_bounds_is_one_sentence(name, words):
    with pytest.raises(UserError) as refused:
        registry.parse(name)
    text = str(refused.value)
    assert words in text and text.endswith(".") and text.count(". ") == 0, text


def test_an_unknown_name_lists_every_family():
    with pytest.raises(UserError) as refused:
        registry.parse("Residual:Median", where="--methods")
    text = str(refused.value)
    assert text.startswith("Unknown scoring method 'Residual:Median' in --methods; use one of: ")
    assert text.count(". ") == 0 and text.endswith(".")
    for family in registry.FAMILIES:
        assert family.form in text and family.example in text, family.name
    for bad in ("lesion", "izif:", "maha-latent:3", "residual:mean:3", "knn-dfeat:b8", "", "izif,"):
        with pytest.raises(UserError, match="Unknown scoring method"):
            registry.parse(bad)


def test_a_methods_list_is_lower_case_without_duplicates():
    specs = registry.parse_list(" IZIF, knn-latent:5,izif ,KNN-LATENT:5,, Sklearn:L1")
    assert [s.name for s in specs] == ["izif", "knn-latent:5", "sklearn:l1"]
    assert [s.system for s in specs] == ["classic", "detector", "classic"]
    with pytest.raises(UserError, match="^--methods is empty"):
        registry.parse_list(" , ")
    with pytest.raises(UserError, match="'bogus' in --grid"):
        registry.parse_list("izif,bogus", where="--grid")


# ------------------------------------------------------------------------------ one table


HEADS = sorted({re.split(r"[:\s]", f.form)[0] for f in registry.FAMILIES}, key=len, reverse=True)
_HEAD = re.compile(r"^(%s)(?![\w-])" % "|".join(map(re.escape, HEADS)))


def _strings(tree: ast.AST) -> list[str]:
    """The strings of `tree`, docstrings left out; an f-string with '{}' for each field."""
    docs, parts = set(), set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            docs.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}"
                               for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docs | parts:
            out.append(node.value)
    return out


# Regular-expression syntax: (?..., \d-like escapes, .* or .+, (a|b, a|b, [:
_REGEX = re.compile(r"\(\?|\\[dDwWsS]|\.[*+]|\([^()\s]*\||\w\|\w|\[:")


def _is_method_word(text: str) -> bool:
    """A family head (izif, sklearn, knn-latent, ...) or a name the registry accepts."""
    if text in HEADS:
        return True
    try:
        registry.parse(text)
    except UserError:
        return False
    return True


def offences(source: str) -> set[str]:
    """What makes `source` a second method system: 'pattern' for a string starting with a
    family head that holds regular-expression syntax, 'table' for a literal tuple, list, set or
    dict (keys) of 3 or more method names or family heads."""
    tree = ast.parse(source)
    found = set()
    if any(_HEAD.match(text) and _REGEX.search(text) for text in _strings(tree)):
        found.add("pattern")
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and items:
            words = {i.value for i in items if isinstance(i, ast.Constant)
                     and isinstance(i.value, str) and _is_method_word(i.value)}
            if len(words) >= 3:
                found.add("table")
    return found


def test_the_check_finds_a_second_table_and_pattern():
    old_router = ('def is_detector_method(name):\n'
                  '    return name.split(":")[0] in ("residual", "lesion", "knn-latent")\n')
    old_table = 'METHODS = {"izif": 1, "torch-euclidean": 2, "latent": 3}\n'
    old_parser = 'import re\nmatch = re.fullmatch(r"knn-latent:(\\d+)", text)\n'
    old_fstring = 'match = re.fullmatch(rf"izif:{_NUM}(?::(b\\d+))?", text)\n'
    assert offences(old_router) == offences(old_table) == {"table"}
    assert offences(old_parser) == offences(old_fstring) == {"pattern"}
    assert offences('"""residual:(mean|p99) in a docstring."""\nx = ("izif", "a", "b")\n') \
        == set()


def test_only_the_registry_holds_method_names_as_patterns_or_tables():
    files = sorted((REPO / "anomaly").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))
    assert len(files) > 20
    found = {p.relative_to(REPO).as_posix(): offences(p.read_text(encoding="utf-8"))
             for p in files}
    assert {p: o for p, o in found.items() if o} == {"anomaly/methods/registry.py": {"pattern"}}
