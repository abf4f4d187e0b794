"""The Brief Hospital Course of a discharge summary: where it starts, where it ends, and which header opened it.

``prepare`` trains on this section and ``predict`` reads the same section out of a MIMIC discharge file, so both call
:func:`extract_bhc` here::

    from drg_llama.data.hospital_course import extract_bhc
    extract_bhc("...\nBrief Hospital Course:\nAdmitted with sepsis ...\nMedications on Admission:\n...").text

Rules (DRG-LLaMA's choices, where ours differ, are named):

* **Section.** The course starts at a "Brief Hospital Course:" header, else at a "Hospital Course:" header (any case,
  any spacing, CRLF, text on the header line kept) and ends at the next section header.
* **Fallback** when neither header exists: any other course header at the start of a line ("ICU Course:", "MICU
  COURSE:", "Summary of course:"), recorded as rule ``course_header_fallback``. DRG-LLaMA's broad fallback regex
  never fires (a whitespace bug); with no course header at all ``prepare`` drops the admission rather than feeding
  the whole note.

Pure text in, text out: nothing here logs or raises on a note's content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SP = r"[^\S\n]"  # whitespace that is not a newline (spaces, tabs, NBSP)
_HEADER_RE = re.compile(
    rf"^{_SP}*(?P<brief>brief{_SP}+)?hospital{_SP}+course"
    rf"(?:{_SP}+by{_SP}+(?:problems?|systems?|issues?))?{_SP}*(?::|$)",
    re.IGNORECASE | re.MULTILINE,
)
# Fallback opening: any header naming a course ("ICU Course:", "MICU COURSE:", "Summary of course:").
_FALLBACK_RE = re.compile(rf"^{_SP}*(?:[A-Za-z][A-Za-z/ ]{{0,40}}{_SP})?course{_SP}*:", re.IGNORECASE | re.MULTILINE)
# A candidate "Name:" at the start of a line; whether it ends the course is decided by _ends_course.
_LINE_HEADER_RE = re.compile(rf"^{_SP}*(?P<name>[A-Za-z][A-Za-z0-9/&,'()\- \t]{{0,79}}?){_SP}*:(?P<rest>[^\n]*)$", re.M)

# Sections that follow the course in MIMIC discharge summaries; they end it even with text on the header line.
_END_SECTIONS = frozenset(
    {
        "medications on admission",
        "discharge medications",
        "discharge disposition",
        "discharge diagnosis",
        "discharge diagnoses",
        "discharge condition",
        "condition at discharge",
        "discharge instructions",
        "followup instructions",
        "follow-up instructions",
        "follow up instructions",
    }
)
# Sub-headings that organise the course itself ("ACTIVE ISSUES:", "MICU Course:", "CODE STATUS:").
_IN_COURSE_WORDS = frozenset({"course", "issue", "issues", "problem", "problems"})
_IN_COURSE_HEADINGS = frozenset({"code status", "code", "contact", "emergency contact", "communication"})
_CONNECTIVES = frozenset({"of", "on", "at", "to", "and", "or", "for", "the", "in", "with", "by", "a", "an", "&", "/"})


@dataclass(frozen=True)
class BHC:
    """An extracted Brief Hospital Course.

    Attributes:
        text: The section body, line endings normalised to LF, trailing spaces and runs of blank lines collapsed.
            May be empty when the header is followed directly by the next section.
        rule: Which header opened it: "brief_hospital_course", "hospital_course" or "course_header_fallback".
        ended_by: The section header that closed it (lower-cased), or None when it runs to the end of the note.
    """

    text: str
    rule: str
    ended_by: str | None


def _ends_course(name: str, rest: str) -> bool:
    """Whether a "name: rest" line header is the next section rather than part of the course."""
    key = " ".join(name.lower().split())
    if key in _END_SECTIONS:
        return True
    # Generic headers end the course only when alone on their line, as MIMIC lays out sections; problem headers
    # inside a course ("Atrial fibrillation: rate controlled ...") carry text after the colon.
    if rest.strip() or key in _IN_COURSE_HEADINGS:
        return False
    words = name.split()
    if not 1 <= len(words) <= 6 or _IN_COURSE_WORDS.intersection(key.split()):
        return False
    return words[0][0].isupper() and all(
        w[0].isupper() or not w[0].isalpha() or w.lower() in _CONNECTIVES for w in words[1:]
    )


def _clean_section(section: str) -> str:
    text = "\n".join(line.rstrip() for line in section.split("\n")).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def extract_bhc(text: str) -> BHC | None:
    """Extract the Brief Hospital Course section of a discharge summary.

    The section opens at the first "Brief Hospital Course" header or, when there is none, the first "Hospital
    Course" header (also "... by problem"), matched at the start of a line in any case, with any spacing, an
    optional space before the colon, or no colon when the header is alone on its line. Text on the header line
    belongs to the course. The section closes at the next section header:

    * a known post-course section ("Medications on Admission:", "Discharge Medications:", "Discharge Disposition:",
      "CONDITION AT DISCHARGE:", ...), even with text after the colon;
    * any other Title Case or UPPER CASE phrase of at most six words followed by a colon and nothing else on the
      line — except sub-headings of the course itself (lines starting with "#", and phrases containing "course",
      "issues" or "problems", e.g. "ACTIVE ISSUES:", "MICU Course:").

    With neither header, the first other course header ("ICU Course:", "MICU COURSE:") opens it instead
    (rule ``course_header_fallback``). MIMIC's PHI masks (``___``) are kept as they are.

    Args:
        text: Full note text (CRLF, CR and LF line endings are all accepted).

    Returns:
        The section, or None when the note has no course header of any kind.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = None
    for match in _HEADER_RE.finditer(text):
        if match.group("brief"):
            start = match
            break
        if start is None:
            start = match
    if start is not None:
        rule = "brief_hospital_course" if start.group("brief") else "hospital_course"
    else:
        start, rule = _FALLBACK_RE.search(text), "course_header_fallback"
    if start is None:
        return None
    end, ended_by = len(text), None
    for match in _LINE_HEADER_RE.finditer(text, start.end()):
        if match.start() > start.end() and _ends_course(match.group("name"), match.group("rest")):
            end, ended_by = match.start(), " ".join(match.group("name").lower().split())
            break
    return BHC(_clean_section(text[start.end() : end]), rule, ended_by)
