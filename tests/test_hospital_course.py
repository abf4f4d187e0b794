"""The Brief Hospital Course extractor: hand-written examples and header/ending properties (hypothesis).

    pytest tests/test_hospital_course.py

Where the sections of real-looking notes start and end is checked on the MIMIC fixture in ``tests/test_mimic.py``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drg_llama.data.hospital_course import extract_bhc


def test_extract_bhc_examples():
    assert extract_bhc("Chief Complaint:\nfever\n\nDischarge Medications:\nnone") is None
    bhc = extract_bhc("Hospital Course:\nfoo bar\nDischarge Disposition: Home\n")
    assert (bhc.text, bhc.rule, bhc.ended_by) == ("foo bar", "hospital_course", "discharge disposition")
    # "Brief Hospital Course" wins over an earlier plain "Hospital Course" header.
    bhc = extract_bhc("HOSPITAL COURSE\nold text\n\nBrief Hospital Course:\nnew text\n\nFacility:\n___")
    assert (bhc.text, bhc.rule, bhc.ended_by) == ("new text", "brief_hospital_course", "facility")
    # Problem headers with text after the colon and "#" lines stay inside; a lone Title Case header ends it.
    bhc = extract_bhc("Brief Hospital Course:\nAtrial Fibrillation: rate control.\n# CHF:\nlasix\nPending Labs:\nx")
    assert bhc.text == "Atrial Fibrillation: rate control.\n# CHF:\nlasix" and bhc.ended_by == "pending labs"
    assert extract_bhc("Brief Hospital Course:\n\n\nMedications on Admission:\nnone").text == ""
    assert extract_bhc("Hospital course was uneventful.") is None  # not a header: text follows without a colon
    # Fallback: another course header when neither hospital-course header exists; it never overrides them.
    bhc = extract_bhc("HPI:\nx\nMICU COURSE:\nintubated\n\nDischarge Medications:\nnone")
    assert (bhc.text, bhc.rule) == ("intubated", "course_header_fallback")
    assert extract_bhc("Brief Hospital Course:\nA\nICU Course:\nB\nFacility:\nx").rule == "brief_hospital_course"


_SAFE_WORD = st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda w: w not in {"brief", "hospital", "course"})
_WORD = _SAFE_WORD | st.sampled_from(["___", "2.1", "(EF", "25%)", "mg/dL", "->", "I", "Dr.", "CHF"])
_SPACE = st.sampled_from([" ", "  ", "\t", " \t ", "\u00a0"])
_END_HEADERS = [
    "Medications on Admission:",
    "Discharge Medications:",
    "DISCHARGE MEDICATIONS:",
    "Discharge Disposition:",
    "CONDITION AT DISCHARGE:",
    "Followup Instructions:",
    "Discharge Diagnosis: Sepsis",
    "Pending Results at Discharge:",
    "OUTPATIENT PLAN:",
]


@st.composite
def _note(draw):
    def cased(word: str) -> str:
        style = draw(st.sampled_from(["lower", "upper", "title", "mixed"]))
        if style == "mixed":
            return "".join(c.upper() if draw(st.booleans()) else c for c in word)
        return getattr(word, style)()

    brief = draw(st.booleans())
    words = (["brief"] if brief else []) + ["hospital", "course"]
    header = draw(st.sampled_from(["", " ", "  "])) + "".join(
        cased(w) + (draw(_SPACE) if i < len(words) - 1 else "") for i, w in enumerate(words)
    )
    header += draw(st.sampled_from([":", " :", ":  "]))
    lines = draw(st.lists(st.lists(_WORD, min_size=1, max_size=12), min_size=1, max_size=8))
    body = [" ".join(line) for line in lines]
    for _ in range(draw(st.integers(0, 3))):  # "# Problem:" paragraphs and course sub-headings stay inside
        extra = draw(st.sampled_from(["# Acute Kidney Injury:", "#CHF:", "ACTIVE ISSUES:", "ICU Course:"]))
        body.insert(draw(st.integers(0, len(body))), extra)
    end = draw(st.sampled_from([*_END_HEADERS, None]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    blank = draw(st.sampled_from(["", " ", " \t"]))
    parts = ["Chief Complaint:", "fever", blank, "History of Present Illness:", "Mr. ___ is unwell.", blank, header]
    parts += body + [blank] + ([end, "Some text after."] if end else [])
    return newline.join(parts), body, brief, end


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_note())
def test_extract_bhc_property_header_variants(case):
    note, body, brief, end = case
    bhc = extract_bhc(note)
    assert bhc is not None
    assert bhc.text.split() == " ".join(body).split()
    assert bhc.rule == ("brief_hospital_course" if brief else "hospital_course")
    assert bhc.ended_by == (None if end is None else end.split(":")[0].lower())
    assert "\r" not in bhc.text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(_WORD, min_size=1, max_size=10), max_size=10), st.sampled_from(["\n", "\r\n"]))
def test_extract_bhc_property_no_header_is_none(lines, newline):
    note = newline.join(["Chief Complaint:", *(" ".join(line) for line in lines), "Discharge Medications:", "x"])
    assert extract_bhc(note) is None
