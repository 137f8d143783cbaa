from hypothesis import given, strategies as st
import pytest

from zprovd.mac import InvalidMAC, format_mac, normalize_mac, oui


@pytest.mark.parametrize(
    "spelling",
    ["001565aabbcc", "001565AABBCC", "00:15:65:aa:bb:cc", "00:15:65:AA:BB:CC", "00-15-65-AA-BB-CC", "0015.65aa.bbcc", " 00:15:65:aa:bb:cc\n"],
)
def test_every_usual_spelling_normalises(spelling):
    assert normalize_mac(spelling) == "001565aabbcc"


@pytest.mark.parametrize(
    "text", ["", "001565aabbc", "001565aabbccd", "00:15:65:aa:bb", "00:15-65:aa:bb:cc", "gg1565aabbcc", "00::15:65:aa:bb:cc"]
)
def test_invalid_macs_are_refused_with_a_message(text):
    with pytest.raises(InvalidMAC, match="is not a MAC address"):
        normalize_mac(text)


def test_vendor_spellings():
    assert format_mac("00:15:65:aa:bb:cc", "upper") == "001565AABBCC"
    assert format_mac("001565aabbcc", "COLON") == "00:15:65:AA:BB:CC"
    assert format_mac("001565aabbcc", "dash") == "00-15-65-aa-bb-cc"
    assert oui("001565AABBCC") == "00:15:65"
    with pytest.raises(ValueError):
        format_mac("001565aabbcc", "dotted")


@given(st.binary(min_size=6, max_size=6), st.sampled_from(["lower", "upper", "colon", "COLON", "dash", "DASH"]))
def test_any_spelling_round_trips(raw, style):
    canonical = raw.hex()
    assert normalize_mac(format_mac(canonical, style)) == canonical


@given(st.text(max_size=40))
def test_arbitrary_text_only_raises_invalid_mac(text):
    try:
        result = normalize_mac(text)
    except InvalidMAC:
        return
    assert len(result) == 12 and all(c in "0123456789abcdef" for c in result)
