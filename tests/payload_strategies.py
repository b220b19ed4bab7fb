"""Hypothesis strategies for tests/test_fuzz_payloads.py: car messages and the outcome the contract gives each.

The contract's field table is copied here on purpose, not imported from the
gateway, so that a mistake in the gateway's table cannot hide itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.fleet import load_fleet
from gateway.ids import VEHICLE_ID
from tests.helpers import REPO

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
KNOWN = sorted(FLEET.vehicles)
N_MESSAGES = 1500
CAP = 16 * 1024  # the contract's payload limit: larger is rejected
DAY_MS = 86_400_000

Expect = Literal["accept", "reject", "either"]

# The contract's table (CONTRACT.md, "MQTT: car → gateway"), written out here rather than imported from
# the gateway, so that a validator that drifts from the contract is caught: (field, required, type, low, high).
CONTRACT_FIELDS: dict[str, tuple[tuple[str, bool, str, float | None, float | None], ...]] = {
    "battery": (
        ("soc_pct", True, "num", 0, 100),
        ("range_km", False, "num", 0, None),
        ("charging", False, "bool", None, None),
        ("plugged", False, "bool", None, None),
        ("temp_c", False, "num", -40, 85),
    ),
    "location": (
        ("lat", True, "num", -90, 90),
        ("lon", True, "num", -180, 180),
        ("speed_kmh", False, "num", 0, 250),
        ("heading_deg", False, "num", 0, 360),
        ("odometer_km", False, "num", 0, None),
    ),
    "doors": (("locked", True, "bool", None, None), ("closed", False, "bool", None, None)),
    "status": (("online", True, "bool", None, None), ("firmware", False, "str", None, None)),
}

# ---- values: each strategy yields (value, ok) -------------------------------------------------


@dataclass(frozen=True)
class Ts:
    """A timestamp relative to the moment of publishing, rendered in one of the contract's forms (or not)."""

    offset_ms: int
    form: str  # int | Z | z | lower | offset | frac3 | frac6 | naive | date | space
    tz_quarters: int = 0  # the UTC offset of the "offset" form, in quarter hours

    def render(self, now_ms: int) -> int | str:
        ms = now_ms + self.offset_ms
        if self.form == "int":
            return ms
        dt = datetime.fromtimestamp(ms / 1000, UTC)
        if self.form == "offset":
            return dt.astimezone(timezone(timedelta(minutes=15 * self.tz_quarters))).isoformat(timespec="milliseconds")
        if self.form == "naive":
            return dt.replace(tzinfo=None).isoformat()
        if self.form == "date":
            return dt.date().isoformat()
        spec = {"frac6": "microseconds", "Z": "seconds"}.get(self.form, "milliseconds")
        s = dt.isoformat(timespec=spec).replace("+00:00", "Z")
        if self.form == "lower":
            s = s.replace("T", "t").replace("Z", "z")
        if self.form == "space":
            s = s.replace("T", " ")
        return s


def _in_range_offsets() -> st.SearchStrategy[int]:
    # Well inside the window (future ≤ 5 min, age ≤ 7 days), so the time it takes to publish cannot matter.
    return st.one_of(st.integers(-6 * DAY_MS, 60_000), st.just(0), st.integers(-5000, 5000))


def _far_future() -> st.SearchStrategy[int]:
    return st.integers(10 * 60_000, 7000 * 365 * DAY_MS)


def _far_past() -> st.SearchStrategy[int]:
    return st.integers(-50 * 365 * DAY_MS, -8 * DAY_MS)


GOOD_FORMS = ("int", "Z", "z", "lower", "offset", "offset", "frac3", "frac6")


def ts_values(mode: str) -> st.SearchStrategy[tuple[Any, bool | None]]:
    """mode: "good" (valid or absent), "bad" (invalid, or open), "mix" (any)."""
    forms = st.sampled_from(GOOD_FORMS)
    zone = st.integers(-48, 56)  # UTC-12:00 … UTC+14:00
    good = st.builds(Ts, _in_range_offsets(), forms, zone).map(lambda t: (t, True))
    skew = st.builds(Ts, _far_future(), forms, zone).map(lambda t: (t, False))
    old = st.builds(Ts, _far_past(), forms, zone).map(lambda t: (t, False))
    # Not RFC 3339 (no offset, no time): invalid. A space for the T is allowed by RFC 3339's note: open.
    no_offset = st.builds(Ts, _in_range_offsets(), st.sampled_from(("naive", "date"))).map(lambda t: (t, False))
    space = st.builds(Ts, _in_range_offsets(), st.just("space")).map(lambda t: (t, None))
    wrong = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),  # not integer ms
        st.booleans(),
        st.integers(-(2**80), -(2**64)),  # huge negative: too old, or a float once parsed
        st.integers(2**63, 2**80),  # huge: far future
        st.text(max_size=30).filter(lambda s: s.strip() == s and not s[:1].isdigit()),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
        st.sampled_from(["yesterday", "2026-13-01T00:00:00Z", "2026-11-26T25:00:00Z", "", "T", "Z", "now"]),
    ).map(lambda v: (v, False))
    absent = st.just((None, True))  # missing (or null) ts means "now"
    if mode == "good":
        return st.one_of(good, good, good, absent)
    if mode == "bad":
        return st.one_of(skew, old, no_offset, wrong, wrong, space)
    return st.one_of(good, good, good, skew, old, no_offset, space, wrong, absent)


def _number(low: float | None, high: float | None) -> st.SearchStrategy[Any]:
    lo = -1e300 if low is None else low
    hi = 1e300 if high is None else high
    ints = st.integers(math.ceil(lo), math.floor(hi)) if high is not None else st.integers(int(lo), 2**70)
    return st.one_of(st.floats(lo, hi, allow_nan=False, allow_infinity=False), ints)


def good_value(typ: str, low: float | None, high: float | None) -> st.SearchStrategy[Any]:
    if typ == "num":
        return _number(low, high)
    if typ == "bool":
        return st.booleans()
    return st.text(max_size=64)


def bad_value(typ: str, low: float | None, high: float | None) -> st.SearchStrategy[tuple[Any, bool | None]]:
    """A value the contract forbids for this field (verdict False), or one it is silent on (None)."""
    wrong_shape = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.booleans()))
    if typ == "num":
        out: list[st.SearchStrategy[Any]] = []
        if low is not None:  # out of range, just or far (twice as likely as each wrong type)
            out += [st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False)] * 2
            out += [st.integers(max_value=math.ceil(low) - 1)] * 2
        if high is not None:
            out += [st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False)] * 2
            out += [st.integers(min_value=math.floor(high) + 1)] * 2
            out.append(st.integers(2**1030, 2**1100))  # out of range, and more than a double can hold
        out += [
            st.booleans(),
            st.text(max_size=8),
            wrong_shape,
            st.sampled_from([math.nan, math.inf, -math.inf]),  # NaN / Infinity literals: not JSON
        ]
        # sampled_from spreads the draws evenly; one_of would mostly pick its first branches.
        return st.sampled_from(out).flatmap(lambda s: s).map(lambda v: (v, False))
    if typ == "bool":
        wrong = st.one_of(st.integers(0, 1), st.sampled_from(["true", "false", "1"]), wrong_shape)
        return wrong.map(lambda v: (v, False))
    # A long firmware string: the contract sets no limit, the gateway does (64); either outcome is allowed.
    long_text = st.text(min_size=65, max_size=90).map(lambda v: (v, None))
    return st.one_of(st.one_of(st.integers(), st.booleans(), wrong_shape).map(lambda v: (v, False)), long_text)


# Unknown extra fields are ignored: shallow, JSON-representable, never NaN.
EXTRA = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@st.composite
def telemetry(draw: st.DrawFn, kind: str, vehicle_id: str, fault: str) -> tuple[dict[str, Any], bool | None]:
    """A contract-shaped object for `kind`; ok is False if any part was drawn bad, None if the contract is silent.

    `fault` says what to break: "field" (one field wrong or a required one missing), "ts", "claim" (the
    vehicle id in the payload), "mix" (anything, independently), anything else: nothing.
    """
    spec = CONTRACT_FIELDS[kind]
    doc: dict[str, Any] = {}
    ok: bool | None = True
    broken = draw(st.integers(0, len(spec) - 1)) if fault == "field" else -1
    for i, (name, required, typ, low, high) in enumerate(spec):
        if i == broken:
            choice = draw(st.sampled_from(["bad", "bad", "bad", "absent", "null"] if required else ["bad"]))
        elif fault == "mix":
            choice = draw(st.sampled_from(["good"] * 8 + ["absent", "bad", "bad", "null"]))
        else:
            choice = "good" if required else draw(st.sampled_from(["good", "good", "absent", "null"]))
        if choice == "good":
            doc[name] = draw(good_value(typ, low, high))
        elif choice == "bad":
            doc[name], verdict = draw(bad_value(typ, low, high))
            ok = _and(ok, verdict)
        elif choice == "null":
            doc[name] = None  # null is treated as absent
            if required:
                ok = False
        elif required:
            ok = False
    ts, ts_ok = draw(ts_values({"ts": "bad", "mix": "mix"}.get(fault, "good")))
    if ts is not None or draw(st.booleans()):
        doc["ts"] = ts
    ok = _and(ok, ts_ok)
    claims = {"claim": ["other", "number"], "mix": ["none", "same", "null", "other", "number"]}
    claim = draw(st.sampled_from(claims.get(fault, ["none", "none", "same", "null"])))
    if claim == "same":
        doc["vehicle_id"] = vehicle_id
    elif claim == "other":
        doc["vehicle_id"] = draw(st.sampled_from(KNOWN).filter(lambda v: v != vehicle_id))
        ok = False
    elif claim == "null":
        doc["vehicle_id"] = None
    elif claim == "number":
        doc["vehicle_id"] = draw(st.integers())
        ok = False
    for key, value in draw(st.dictionaries(st.text(max_size=12), EXTRA, max_size=3)).items():
        if key not in doc and key not in {n for n, *_ in spec} and key not in ("ts", "vehicle_id"):
            doc[key] = value
    return doc, ok


def _and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


# ---- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    suffix: str | None  # topic after the prefix and a slash; None for the prefix itself
    body: Any  # bytes, or a JSON tree (with Ts) rendered at publish time
    ok: bool | None  # is the body valid for the topic (ignoring size)?
    topic_ok: bool
    qos: int
    pad_to: int = 0  # pad the rendered object to this many bytes
    ascii: bool = True
    mangle: str = ""  # "" | "latin1" | "utf16" | "bom" | "deep:N"

    def render(self, now_ms: int) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        data = json.dumps(
            self.body, default=lambda o: o.render(now_ms), ensure_ascii=self.ascii, allow_nan=True
        ).encode()
        if self.mangle.startswith("deep:"):
            depth = int(self.mangle[5:])
            data = _add_member(data, b'"deep": ' + b"[" * depth + b"]" * depth)
        if self.pad_to:
            room = self.pad_to - len(_add_member(data, b'"pad": ""'))
            data = _add_member(data, b'"pad": "' + b"x" * max(room, 0) + b'"')
        if self.mangle == "latin1":
            data = _add_member(data, b'"note": "caf\xe9 \xff\xfe"')
        elif self.mangle == "utf16":
            data = data.decode().encode("utf-16")
        elif self.mangle == "bom":
            data = b"\xef\xbb\xbf" + data
        return data

    def expect(self, payload: bytes) -> Expect:
        if not self.topic_ok or len(payload) > CAP:
            return "reject"
        if self.mangle in ("latin1", "utf16"):
            return "reject"
        if self.mangle == "bom" or (self.mangle.startswith("deep:") and int(self.mangle[5:]) > 500):
            # RFC 8259 lets a parser ignore a BOM and limit nesting; the contract does not say.
            return "reject" if self.ok is False else "either"
        if self.ok is None:
            return "either"
        return "accept" if self.ok else "reject"


# Characters Mosquitto accepts in a topic (no control characters, surrogates or non-characters),
# minus the level separator and the wildcards a publish topic may not contain.
TOPIC_CHAR = st.characters(exclude_categories=("Cc", "Cs", "Cn"), exclude_characters="/+#")
TOPIC_TEXT = st.text(TOPIC_CHAR, max_size=40)


def odd_vehicle_ids() -> st.SearchStrategy[str]:
    return st.one_of(
        st.from_regex(VEHICLE_ID.body, fullmatch=True).filter(lambda v: v not in FLEET.vehicles),
        st.sampled_from(KNOWN).map(str.lower),
        st.sampled_from(KNOWN).map(lambda v: v + " "),
        st.sampled_from(KNOWN).map(lambda v: v + "\u200b"),  # zero-width space
        st.from_regex(r"[A-Z0-9][A-Z0-9-]{32,150}", fullmatch=True),  # too long
        st.just(""),
        TOPIC_TEXT.filter(lambda v: v not in FLEET.vehicles),
    )


@st.composite
def topics(draw: st.DrawFn, clean: bool) -> tuple[str | None, str, str, bool]:
    """(suffix, kind, vehicle_id, topic_ok); never the gateway's own `commands` topic."""
    good_vid = draw(st.sampled_from(KNOWN))
    kind = draw(st.sampled_from(["battery", "location", "doors", "status"]))
    odd = ["vid", "kind", "extra", "ack", "bare", "prefix"]
    shape = "good" if clean else draw(st.sampled_from(["good"] * 4 + odd))
    if shape == "good":
        return f"{good_vid}/{kind}", kind, good_vid, True
    if shape == "vid":
        vid = draw(odd_vehicle_ids())
        return f"{vid}/{kind}", kind, vid, False
    if shape == "kind":
        name = draw(st.one_of(st.sampled_from(["Battery", "BATTERY", "wheels", "", "ack", "command"]), TOPIC_TEXT))
        name = name if name not in ("battery", "location", "doors", "status", "commands") else name + "x"
        return f"{good_vid}/{name}", kind, good_vid, False
    if shape == "extra":
        levels = draw(st.lists(TOPIC_TEXT, min_size=1, max_size=4))
        return "/".join([good_vid, kind, *levels]), kind, good_vid, False
    if shape == "ack":  # an ack for a command nobody sent
        return f"{good_vid}/commands/ack", kind, good_vid, False
    if shape == "bare":
        return draw(st.sampled_from([f"{good_vid}", "", f"{good_vid}/"])), kind, good_vid, False
    return None, kind, good_vid, False  # the prefix itself, without a trailing slash


@st.composite
def messages(draw: st.DrawFn) -> Msg:
    # About 40 % drawn valid; the rest have one thing wrong (or several, for "mix").
    fault = draw(st.sampled_from(["none"] * 4 + ["topic", "field", "field", "ts", "claim", "body", "body", "mix"]))
    clean = fault not in ("body", "mix")
    suffix, kind, vid, topic_ok = draw(topics(fault not in ("topic", "mix")))
    qos = draw(st.sampled_from([1, 1, 1, 0]))
    shapes = ["object"] * 8 + ["big", "deep"]
    odd = ["bytes", "not_object", "empty", "mangled", "big", "deep"]
    shape = draw(st.sampled_from({"body": odd, "mix": shapes + odd}.get(fault, shapes)))
    if shape == "bytes":
        raw = draw(st.binary(max_size=300))
        return Msg(suffix, raw, _bytes_ok(raw), topic_ok, qos)
    if shape == "not_object":
        value = draw(st.one_of(st.lists(EXTRA, max_size=3), st.text(max_size=10), st.integers(), st.none()))
        return Msg(suffix, json.dumps(value).encode(), False, topic_ok, qos)
    if shape == "empty":
        return Msg(suffix, b"", False, topic_ok, qos)
    doc, ok = draw(telemetry(kind, vid, fault))
    ascii_ = draw(st.booleans())
    if shape == "mangled":
        return Msg(
            suffix, doc, ok, topic_ok, qos, ascii=ascii_, mangle=draw(st.sampled_from(["latin1", "utf16", "bom"]))
        )
    if shape == "big":
        # Around the cap: up to 16 KiB is fine, one byte more is not.
        near = st.integers(CAP - 300, CAP)
        over = st.one_of(st.integers(CAP + 1, CAP + 300), st.integers(CAP, 200_000))
        size = draw(near if clean else st.one_of(near, over, over))
        return Msg(suffix, doc, ok, topic_ok, qos, pad_to=size, ascii=ascii_)
    if shape == "deep":
        shallow = st.integers(1, 400)
        depth = draw(shallow if clean else st.one_of(shallow, st.integers(1000, 10_000), st.just(10_000)))
        return Msg(suffix, doc, ok, topic_ok, qos, ascii=ascii_, mangle=f"deep:{depth}")
    return Msg(suffix, doc, ok, topic_ok, qos, ascii=ascii_)


def _add_member(obj: bytes, member: bytes) -> bytes:
    """`{...}` with one more member before the closing brace."""
    return obj[:-1] + (b", " if obj != b"{}" else b"") + member + b"}"


def _bytes_ok(raw: bytes) -> bool | None:
    """Random bytes are invalid unless they happen to be a JSON object (then the contract decides: leave open)."""
    try:
        return None if isinstance(json.loads(raw), dict) else False
    except ValueError:
        return False


def draw_batch(n: int) -> list[Msg]:
    """`n` messages from the strategy, the same ones on every run."""
    out: list[Msg] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(messages())
    def collect(m: Msg) -> None:
        out.append(m)

    collect()
    return out
