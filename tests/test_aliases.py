"""shared/aliases.py: recursive expansion, catch-all, de-duplication, loops (SPEC §8)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.aliases import MAX_DEPTH, AliasError, AliasTable, Expansion
from tests.support import PROPERTY_SETTINGS

DOMAINS = ("localhost", "mail.example.net")

# (case, table, recipients, expected [(original, target, via)]) - all without errors.
EXPANSIONS = [
    ("no-alias-local", {}, ["bob@localhost"], [("bob@localhost", "bob@localhost", None)]),
    ("remote-untouched", {"root": "ops@example.org"}, ["root@example.org"],
     [("root@example.org", "root@example.org", None)]),
    ("to-remote", {"root": "ops@example.org"}, ["root@localhost"],
     [("root@localhost", "ops@example.org", "root")]),
    ("every-local-domain", {"root": "ops@example.org"}, ["root@mail.example.net"],
     [("root@mail.example.net", "ops@example.org", "root")]),
    ("bare-target-is-mailbox-in-first-domain", {"root": "admin"}, ["root@mail.example.net"],
     [("root@mail.example.net", "admin@localhost", "root")]),
    ("local-address-target-written-as-is", {"root": "admin@mail.example.net"},
     ["root@localhost"], [("root@localhost", "admin@mail.example.net", "root")]),
    ("recursive", {"root": "admin", "admin": "ops", "ops": "ops@example.org"},
     ["root@localhost"], [("root@localhost", "ops@example.org", "root")]),
    ("local-address-target-resolves-again", {"root": "admin@mail.example.net",
                                             "admin": "x@example.org"},
     ["root@localhost"], [("root@localhost", "x@example.org", "root")]),
    ("list", {"root": ["a@example.org", "b", "c@example.com"]}, ["root@localhost"],
     [("root@localhost", "a@example.org", "root"), ("root@localhost", "b@localhost", "root"),
      ("root@localhost", "c@example.com", "root")]),
    ("self-means-mailbox-too", {"root": ["root", "ops@example.org"]}, ["root@localhost"],
     [("root@localhost", "root@localhost", "root"),
      ("root@localhost", "ops@example.org", "root")]),
    ("case-insensitive-keys", {"Root": "ops@example.org"}, ["ROOT@LocalHost"],
     [("ROOT@LocalHost", "ops@example.org", "root")]),
    ("remote-target-keeps-case", {"root": "Ops.Team@Example.org"}, ["root@localhost"],
     [("root@localhost", "Ops.Team@Example.org", "root")]),
    ("postmaster-default-root", {}, ["postmaster"],
     [("postmaster", "root@localhost", "postmaster")]),
    ("postmaster-default-then-root-alias", {"root": "ops@example.org"}, ["postmaster"],
     [("postmaster", "ops@example.org", "postmaster")]),
    ("postmaster-in-domain", {"root": "ops@example.org"}, ["PostMaster@localhost"],
     [("PostMaster@localhost", "ops@example.org", "postmaster")]),
    ("postmaster-configured", {"postmaster": "pm@example.org"}, ["postmaster"],
     [("postmaster", "pm@example.org", "postmaster")]),
    ("catch-all-unknown-name", {"*": "ops@example.org"}, ["nobody@localhost"],
     [("nobody@localhost", "ops@example.org", "*")]),
    ("catch-all-not-for-alias-keys", {"*": "ops@example.org", "root": "r@example.org"},
     ["root@localhost"], [("root@localhost", "r@example.org", "root")]),
    ("catch-all-not-for-remote", {"*": "ops@example.org"}, ["nobody@example.org"],
     [("nobody@example.org", "nobody@example.org", None)]),
    ("catch-all-target-is-mailbox-not-catch-all", {"*": "admin"}, ["x@localhost"],
     [("x@localhost", "admin@localhost", "*")]),
    ("catch-all-target-admin-itself", {"*": "admin"}, ["admin@localhost"],
     [("admin@localhost", "admin@localhost", "*")]),
    ("catch-all-through-alias", {"*": "admin", "admin": "ops@example.org"}, ["x@localhost"],
     [("x@localhost", "ops@example.org", "*")]),
    ("alias-target-never-caught", {"*": "ops@example.org", "root": "bob"}, ["root@localhost"],
     [("root@localhost", "bob@localhost", "root")]),
    ("dedup-brief-example", {"root": "admin", "admin": "admin@example.com"},
     ["root@localhost", "admin@localhost"],
     [("root@localhost", "admin@example.com", "root")]),
    ("dedup-alias-and-direct", {"root": "ops@example.org"},
     ["root@localhost", "ops@example.org"], [("root@localhost", "ops@example.org", "root")]),
    ("dedup-domain-case", {"root": "ops@example.org"},
     ["root@localhost", "ops@EXAMPLE.ORG"], [("root@localhost", "ops@example.org", "root")]),
    ("dedup-mailbox-across-domains", {}, ["bob@localhost", "Bob@mail.example.net"],
     [("bob@localhost", "bob@localhost", None)]),
    ("dedup-two-lists", {"a": ["x@example.org", "y@example.org"],
                         "b": ["y@example.org", "z@example.org"]},
     ["a@localhost", "b@localhost"],
     [("a@localhost", "x@example.org", "a"), ("a@localhost", "y@example.org", "a"),
      ("b@localhost", "z@example.org", "b")]),
    ("diamond-once", {"a": ["b", "c"], "b": "d", "c": "d", "d": "d@example.org"},
     ["a@localhost"], [("a@localhost", "d@example.org", "a")]),
    ("remote-local-part-case-kept-apart", {}, ["Bob@example.org", "bob@example.org"],
     [("Bob@example.org", "Bob@example.org", None), ("bob@example.org", "bob@example.org", None)]),
]


@pytest.mark.parametrize(("table", "recipients", "expected"),
                         [pytest.param(t, r, e, id=i) for i, t, r, e in EXPANSIONS])
def test_expansion(table, recipients, expected) -> None:
    aliases = AliasTable.from_config(table, DOMAINS)
    assert aliases.expand(recipients) == [Expansion(o, t, v) for o, t, v in expected]


def test_outside_target_of_a_remote_looking_key_is_relayed() -> None:
    aliases = AliasTable.from_config({"alerts": ["alerts@example.org", "pager@example.com"]},
                                     DOMAINS)
    targets = [e.target for e in aliases.expand(["alerts@localhost"])]
    assert targets == ["alerts@example.org", "pager@example.com"]


def test_no_local_domains_leaves_bare_names_bare() -> None:
    aliases = AliasTable.from_config({}, ())
    assert aliases.expand(["postmaster"]) == [Expansion("postmaster", "root", "postmaster")]


CONFIG_ERRORS = [
    ("empty-string", {"root": ""}, "'root' expands to nothing"),
    ("empty-list", {"root": []}, "'root' expands to nothing"),
    ("blank-entries", {"root": [" ", ""]}, "'root' expands to nothing"),
    ("two-step-loop", {"a": "b", "b": "a"}, "alias loop: a -> b -> a"),
    ("loop-via-local-address", {"a": "b@mail.example.net", "b": "a@localhost"},
     "alias loop: a -> b -> a"),
    ("loop-in-list", {"a": ["x@example.org", "b"], "b": ["c"], "c": "a"},
     "alias loop: a -> b -> c -> a"),
    ("postmaster-root-loop", {"root": "postmaster"}, "alias loop"),
    ("malformed-target", {"root": "ops@@example.org"}, "'root'"),
    ("space-in-target", {"root": "ops team@example.org"}, "'root'"),
    ("brackets-in-target", {"root": "<ops@example.org>"}, "'root'"),
    ("catch-all-as-target", {"root": "*"}, "'*' is not a target"),
    ("key-with-at", {"root@localhost": "ops@example.org"}, "'root@localhost'"),
    ("key-twice-by-case", {"root": "a@example.org", "ROOT": "b@example.org"}, "'ROOT' is given"),
    ("key-twice-both-upper", {"Root": "a@example.org", "ROOT": "b@example.org"}, "given twice"),
]


@pytest.mark.parametrize(("table", "named"),
                         [pytest.param(t, n, id=i) for i, t, n in CONFIG_ERRORS])
def test_config_error_is_one_line_naming_the_alias(table, named) -> None:
    with pytest.raises(AliasError) as failure:
        AliasTable.from_config(table, DOMAINS)
    assert named in str(failure.value)
    assert "\n" not in str(failure.value)


def test_too_deep_chain_is_a_config_error() -> None:
    chain = {f"a{i}": f"a{i + 1}" for i in range(MAX_DEPTH + 1)}
    with pytest.raises(AliasError, match="deeper than"):
        AliasTable.from_config(chain, DOMAINS)
    shorter = {f"a{i}": f"a{i + 1}" for i in range(MAX_DEPTH - 2)}
    target = [e.target for e in AliasTable.from_config(shorter, DOMAINS).expand(["a0"])]
    assert target == [f"a{MAX_DEPTH - 2}@localhost"]


def test_loop_at_run_time_is_an_error_result_next_to_good_targets() -> None:
    """A table nobody checked (as after a reload that skipped the check) never spins."""
    aliases = AliasTable({"a": ["ok@example.org", "b"], "b": "a", "c": "c@example.org"},
                         DOMAINS)
    result = aliases.expand(["a@localhost", "c@localhost"])
    assert result == [
        Expansion("a@localhost", "ok@example.org", "a"),
        Expansion("a@localhost", None, "a", "alias loop: a -> b -> a"),
        Expansion("c@localhost", "c@example.org", "c"),
    ]


def test_fan_out_is_bounded_by_the_table_not_exponential() -> None:
    """Every level points twice at the next: 2**30 paths, one walk per alias."""
    table = {f"l{i}": [f"l{i + 1}", f"l{i + 1}@localhost"] for i in range(MAX_DEPTH - 1)}
    result = AliasTable(table, DOMAINS).expand(["l0@localhost"])
    assert [e.target for e in result] == [f"l{MAX_DEPTH - 1}@localhost"]


def test_expand_keeps_recipient_order_and_unknown_remote_first_wins() -> None:
    aliases = AliasTable.from_config({"root": ["z@example.org", "a@example.org"]}, DOMAINS)
    result = aliases.expand(["a@example.org", "root@localhost"])
    assert [(e.original, e.target) for e in result] == [
        ("a@example.org", "a@example.org"), ("root@localhost", "z@example.org")]


_NAMES = st.sampled_from(["a", "b", "c", "root", "postmaster", "*"])
_TARGETS = st.one_of(
    _NAMES.filter(lambda n: n != "*"),
    _NAMES.filter(lambda n: n != "*").map(lambda n: f"{n}@mail.example.net"),
    st.sampled_from(["x@example.org", "X@Example.org", "y@example.com"]),
)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(st.dictionaries(_NAMES, st.lists(_TARGETS, max_size=3), max_size=6),
       st.lists(st.one_of(_TARGETS, st.just("*@localhost")), min_size=1, max_size=5))
def test_expand_never_raises_and_gives_each_mailbox_once(table, recipients) -> None:
    """Any table, loops and empty aliases included: expand answers, and the answer is sane."""
    aliases = AliasTable(table, DOMAINS)
    result = aliases.expand(recipients)
    targets = [e.target.rpartition("@") for e in result if e.target is not None]
    # a local mailbox is its name in any case; a remote local part keeps its case
    mailboxes = [(local.lower(), "local") if domain.lower() in DOMAINS else (local, domain.lower())
                 for local, _, domain in targets]
    assert len(mailboxes) == len(set(mailboxes))
    for expansion in result:
        assert (expansion.target is None) == (expansion.error is not None)
        assert expansion.original in recipients
    try:
        aliases.check()
    except AliasError:
        return
    assert all(e.error is None for e in result)  # a checked table never errs at run time
