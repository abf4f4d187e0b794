"""The discharge note of one stay, written from its coded facts (never from its DRG).

Each coded CC/MCC is described in the hospital course by a synonym with labs or treatment; conditions that are NOT
coded appear only negated ("no evidence of pneumonia") or as past history, and there are distractors (family
history, incidental findings). No ICD code, no DRG number and no DRG title is written: after rendering, the stay's
own DRG title (full and MIMIC-abbreviated) and number are scrubbed should a phrase happen to coincide
(:func:`scrub`). The "Discharge Diagnosis:" section names the coded diagnoses in words, as real notes do; it lies
outside the Brief Hospital Course that the models read.

The note is assembled in a fixed order of draws from the stay's ``random.Random``: the hospital course (opening,
main problem, issues, day by day, transitional issues), then the sections around it.
"""

from __future__ import annotations

import math
import random
import re

from drg_llama.data.synthetic.sampling import Stay, weighted
from drg_llama.data.synthetic.vocabulary import fill, vocabulary
from drg_llama.drg import abbreviate_title

_BHC_HEADERS = (
    ("Brief Hospital Course:", 0.8),
    ("BRIEF HOSPITAL COURSE:", 0.08),
    ("Hospital Course:", 0.09),
    ("", 0.03),
)

# Phrases that happen to equal an unsplit DRG title, and what the scrubber writes instead.
_TITLE_PARAPHRASE = {
    "chest pain": "chest discomfort",
    "syncope and collapse": "syncope",
    "angina pectoris": "anginal symptoms",
    "psychoses": "psychotic symptoms",
    "dysequilibrium": "imbalance",
    "urethral stricture": "narrowing of the urethra",
    "coagulation disorders": "clotting abnormalities",
    "radiotherapy": "radiation treatment",
    "epistaxis": "nosebleed",
    "concussion": "mild traumatic brain injury",
    "seizures": "seizure activity",
    "headaches": "head pain",
    "cellulitis": "skin infection",
    "diabetes": "hyperglycemia",
    "hypertension": "high blood pressure",
    "osteomyelitis": "bone infection",
    "pneumothorax": "collapsed lung",
}

_ADMISSION_MEDS = (
    "Aspirin 81 mg PO DAILY",
    "Atorvastatin 40 mg PO QPM",
    "Lisinopril 10 mg PO DAILY",
    "Metformin 500 mg PO BID",
    "Omeprazole 20 mg PO DAILY",
    "Levothyroxine 50 mcg PO DAILY",
    "Amlodipine 5 mg PO DAILY",
    "Sertraline 50 mg PO DAILY",
    "Metoprolol succinate 25 mg PO DAILY",
)
_TRANSITIONAL = (
    "Repeat {BMP|CBC|LFTs} at follow-up in 1 week",
    "Follow up pending blood cultures",
    "Titrate diuretic to weight",
    "Outpatient PT",
    "Consider outpatient sleep study",
    "Follow-up imaging of incidental findings",
    "Medication changes reviewed with {him}",
)


def cap(text: str) -> str:
    """``text`` with its first letter in upper case."""
    return text[:1].upper() + text[1:] if text else text


class _Writer:
    """The stay's random stream and the patient's pronouns: templates filled in the patient's words."""

    def __init__(self, rng: random.Random, sex: str, age: int):
        male = sex == "M"
        self.rng = rng
        self.male = male
        self.ctx = {
            "he": "he" if male else "she",
            "He": "He" if male else "She",
            "his": "his" if male else "her",
            "His": "His" if male else "Her",
            "him": "him" if male else "her",
            "age": str(age),
            "pt": "Mr. ___" if male else "Ms. ___",
        }

    def expand(self, template: str) -> str:
        """The template filled in, as written."""
        return fill(template, self.rng, self.ctx)

    def sentence(self, template: str, name: str = "") -> str:
        """The template filled in and capitalised; ``name`` is the condition ``{n}``/``{N}`` stand for."""
        if name:
            self.ctx["n"], self.ctx["N"] = name, cap(name)
        return cap(fill(template, self.rng, self.ctx))


def word_target(rng: random.Random, severity: str) -> int:
    """Words of hospital course to write for a stay of this severity."""
    # MIMIC BHC lengths are roughly log-normal (median ~300 words, a tail past 1,500); sicker stays run longer.
    mu = math.log(255) + {"NONE": 0.0, "CC": 0.12, "MCC": 0.3}[severity]
    return int(rng.lognormvariate(mu, 0.62))


def render_note(rng: random.Random, stay: Stay, age: int, sex: str, status: int, los: int, target: int) -> str:
    """The discharge note of one stay, written from its coded facts; ``target``: words of hospital course."""
    w = _Writer(rng, sex, age)
    principal = stay.principal
    if principal is not None:
        complaint = rng.choice(principal["complaints"])
        service = principal["service"]
    else:
        tail = vocabulary().mdc_tail[stay.mdc_tail]
        complaint = rng.choice(tail["complaints"])
        service = tail["service"]
    chronic_names = [name for _, name, _ in stay.chronic if name]
    history = [w.expand(h) for h in stay.history]
    issue_names = [name for _, name, course in stay.sdx if course]
    course = _hospital_course(w, stay, age, status, los, target, complaint, chronic_names, history, issue_names)
    return _note(w, stay, age, sex, status, complaint, service, course, chronic_names, history, issue_names)


# --------------------------------------------------------------------------------------------------------------
# The Brief Hospital Course


def _hospital_course(
    w: _Writer,
    stay: Stay,
    age: int,
    status: int,
    los: int,
    target: int,
    complaint: str,
    chronic_names: list[str],
    history: list[str],
    issue_names: list[str],
) -> str:
    """The course: an opening line, the main problem, the issues, day-by-day filler up to ``target`` words."""
    rng = w.rng
    # Past-history mentions always reach the course (they are the point of the exercise); chronic names may not.
    pmh_items = rng.sample(chronic_names, min(3, len(chronic_names))) + history
    rng.shuffle(pmh_items)
    style = weighted(rng, (("prose", 0.45), ("problems", 0.42), ("daily", 0.13)))
    pmh_text = ", ".join(pmh_items) if pmh_items else "no significant past medical history"
    intro = (
        f"{w.ctx['pt']} is a {age} year old {'man' if w.male else 'woman'} with {pmh_text} who presented with "
        f"{complaint} and was found to have {stay.pdx_name}."
    )
    if rng.random() < 0.25:
        intro = f"{age}{'M' if w.male else 'F'} with {pmh_text} admitted with {stay.pdx_name}."
    paras: list[str] = [intro]

    negated = list(stay.negated)
    main = _main_problem(w, stay, negated, status, los)
    # A course sentence that does not name its condition gets the name in front: the coded CC/MCC must be
    # readable from the course, whatever the template.
    issues = [
        w.sentence(course if "{n}" in course.lower() else "{N}: " + course, name)
        for _, name, course in stay.sdx
        if course
    ]
    chronic = [(name, w.expand(plan)) for _, name, plan in stay.chronic if name]
    distractors = [w.sentence(d) for d in rng.sample(vocabulary().distractors, rng.choice((0, 1, 1, 2, 3)))]
    negated_text = [cap(n) + "." for n in negated]

    if style == "problems":
        use_sub = rng.random() < 0.5
        if use_sub:
            paras.append("ACUTE ISSUES:")
        paras.append(f"# {cap(stay.pdx_name)}: " + " ".join(main))
        for name, text in zip(issue_names, issues):
            paras.append(f"# {cap(name)}: {text}")
        if negated_text:
            paras[-1] += " " + " ".join(negated_text)
        if chronic:
            if use_sub:
                paras.append("CHRONIC ISSUES:")
            for name, plan in chronic:
                paras.append(f"# {cap(name)}: {cap(plan)}.")
    else:
        paras.append(" ".join(main))
        if issues:
            paras.append(" ".join(issues + negated_text))
        elif negated_text:
            paras[-1] += " " + " ".join(negated_text)
        if chronic:
            paras.append(" ".join(f"{cap(name)}: {plan}." for name, plan in chronic))
    if distractors:
        paras.append(" ".join(distractors))

    day_lines = _day_by_day(w, stay, style, los, target - sum(len(p.split()) for p in paras), issue_names)
    if day_lines:
        paras.insert(
            2 if style != "problems" else len(paras), "\n".join(day_lines) if style == "daily" else " ".join(day_lines)
        )
    if style == "problems" and rng.random() < 0.6:
        trans = [f"- {w.sentence(t)}" for t in rng.sample(_TRANSITIONAL, rng.randint(1, 3))]
        paras.append("TRANSITIONAL ISSUES:\n" + "\n".join(trans))
    if rng.random() < 0.005:  # a few notes with a bare-bones course, as in MIMIC (prepare drops them as too short)
        paras = [
            f"Admitted with {stay.pdx_name}"
            + (f" and {', '.join(issue_names)}" if issue_names else "")
            + ". Treated and improved. Discharged."
        ]
    return "\n\n".join(paras)


def _main_problem(w: _Writer, stay: Stay, negated: list[str], status: int, los: int) -> list[str]:
    """Sentences about the principal problem: workup, treatment, response, procedures, and how the stay ended.

    Takes the first negated mention off ``negated`` (it is placed among these sentences).
    """
    rng = w.rng
    principal = stay.principal
    main: list[str] = []
    if principal is not None:
        for key in ("workup", "treatment", "response"):
            main.extend(w.sentence(t) for t in rng.sample(principal[key], min(len(principal[key]), rng.randint(1, 2))))
    else:
        tail = vocabulary().mdc_tail[stay.mdc_tail]
        main.append(w.sentence(rng.choice(tail["workup"])))
        main.append(w.sentence(rng.choice(tail["treatment"])))
        main.append(
            w.sentence(
                rng.choice(
                    (
                        "{He} improved with treatment.",
                        "Symptoms improved over the admission.",
                        "{He} was stable for discharge on hospital day {2-6}.",
                    )
                )
            )
        )
    if negated:
        main.insert(min(1, len(main)), cap(negated.pop(0)) + ".")
    for _, words in stay.procs:
        day = rng.randint(1, max(1, min(los - 1, 4)))
        template = rng.choice(
            (
                "On hospital day {d}, {he} underwent {w}.",
                "{He} was taken for {w} on ___, without complications.",
                "{W} was performed on hospital day {d}.",
            )
        )
        main.insert(
            min(2, len(main)),
            w.sentence(template.replace("{d}", str(day)).replace("{w}", words).replace("{W}", cap(words))),
        )
    if status == 7:
        main.append(w.sentence(f"{{He}} left against medical advice on hospital day {los}, understanding the risks."))
    if status == 20:
        main.append(
            w.sentence(
                "Despite maximal therapy {he} continued to decline. After a family meeting {he} was made "
                f"comfort measures only and expired peacefully on hospital day {los}."
            )
        )
    return main


def _day_by_day(w: _Writer, stay: Stay, style: str, los: int, words_left: int, issue_names: list[str]) -> list[str]:
    """Day-by-day lines until the course reaches its target length (``words_left`` more words)."""
    rng = w.rng
    fillers = [f["text"] for f in vocabulary().filler if not f["contradicts"] & stay.concepts]
    problems = [stay.pdx_name] + issue_names
    lines: list[str] = []
    written, day = 0, 1
    while written < words_left:
        # Spread the remaining words over the stay: longer courses write more per day, not more days than the
        # stay has (days past the length of stay are written as dates, masked "___" as in MIMIC).
        per_day = max(1, min(6, math.ceil((words_left - written) / 10 / max(1, los - day + 1))))
        picked = [w.sentence(s) for s in rng.sample(fillers, min(per_day, len(fillers)))]
        if rng.random() < 0.35:
            at = rng.randint(0, len(picked))  # drawn before the sentence: the order of draws is the corpus
            picked.insert(at, w.sentence(rng.choice(vocabulary().problem_updates), rng.choice(problems)))
        sentences = " ".join(picked)
        if style == "daily" and day <= los:
            line = f"HD{day}: {sentences}"
        elif day <= los and rng.random() < 0.5:
            line = f"On hospital day {day}, {sentences[0].lower()}{sentences[1:]}"
        else:
            line = f"On ___, {sentences[0].lower()}{sentences[1:]}"
        lines.append(line)
        written += len(line.split())
        day += 1
    return lines


# --------------------------------------------------------------------------------------------------------------
# The rest of the note


def _note(
    w: _Writer,
    stay: Stay,
    age: int,
    sex: str,
    status: int,
    complaint: str,
    service: str,
    course: str,
    chronic_names: list[str],
    history: list[str],
    issue_names: list[str],
) -> str:
    """The whole discharge summary in MIMIC's section layout around the hospital ``course``."""
    rng, words, principal = w.rng, vocabulary(), stay.principal
    header = weighted(rng, _BHC_HEADERS)
    proc_words = "\n".join(cap(text) for _, text in stay.procs) or "None"
    pmh_lines = "\n".join(f"- {cap(x)}" for x in chronic_names + history)
    hpi = " ".join(
        w.sentence(t)
        for t in (
            principal["hpi"] if principal else ("{He} presented with {c} for {1-10} days.".replace("{c}", complaint),)
        )
    )
    labs = _admission_labs(w, stay.concepts)
    admit_meds = [f"{i}. {m}" for i, m in enumerate(rng.sample(_ADMISSION_MEDS, rng.randint(0, 6)), 1)]
    disch = list(principal["meds"]) if principal else []
    disch_meds = [f"{i}. {w.sentence(m)}" for i, m in enumerate(rng.sample(disch, min(len(disch), 3)), 1)]
    disposition = rng.choice(words.dispositions.get(status, ("Home",)))
    diagnosis = f"PRIMARY DIAGNOSIS:\n{cap(stay.pdx_name)}"
    secondary = [cap(n) for n in issue_names] + [cap(n) for n in chronic_names]
    if secondary:
        diagnosis += "\n\nSECONDARY DIAGNOSES:\n" + "\n".join(secondary)
    reason = stay.pdx_name
    instructions = " ".join(
        w.sentence(t.replace("{reason}", reason)) for t in words.instructions[:1] + words.instructions[2:]
    )

    opening = f"{w.ctx['pt']} is a {age} y/o with the history below."
    activity = rng.choice(("Ambulatory - Independent", "Ambulatory - requires assistance or aid"))
    closing = (
        ""
        if status == 20  # no condition, instructions or follow-up for a patient who died
        else "Discharge Condition:\nMental Status: Clear and coherent.\nLevel of Consciousness: Alert and "
        f"interactive.\nActivity Status: {activity}.\n \n"
        f"Discharge Instructions:\nDear {w.ctx['pt']},\n\n{instructions}\n\nSincerely,\nYour ___ Team\n \n"
        "Followup Instructions:\n___\n"
    )
    parts = [
        " \nName:  ___                     Unit No:   ___\n \nAdmission Date:  ___              Discharge Date:   ___"
        f"\n \nDate of Birth:  ___             Sex:   {sex}\n \nService: {service}\n \n",
        f"Allergies: \n{rng.choice(words.allergies)}\n \nAttending: ___.\n \n",
        f"Chief Complaint:\n{cap(complaint)}\n \n",
        f"Major Surgical or Invasive Procedure:\n{proc_words}\n\n \n",
        f"History of Present Illness:\n{w.sentence(opening)} {hpi}\n \n",
        f"Past Medical History:\n{pmh_lines or 'None'}\n \n",
        "Social History:\n___\nFamily History:\n"
        + rng.choice(("Non-contributory", "Mother with hypertension", "Father with CAD", "No family history of cancer"))
        + "\n \n",
        f"Physical Exam:\nADMISSION PHYSICAL EXAM:\n{w.sentence(words.exams[0])}\n \n",
        f"Pertinent Results:\nADMISSION LABS:\n{labs}\n \n",
        (f"{header}\n" if header else "") + course + "\n \n",
        "Medications on Admission:\nThe Preadmission Medication list is accurate and complete.\n"
        + ("\n".join(admit_meds) or "None")
        + "\n \n",
        "Discharge Medications:\n" + ("\n".join(disch_meds) if status != 20 and disch_meds else "None") + "\n \n",
        f"Discharge Disposition:\n{disposition}\n \n",
        *(["Facility:\n___\n \n"] if disposition == "Extended Care" else []),
        f"Discharge Diagnosis:\n{diagnosis}\n\n \n",
        closing,
    ]
    return "".join(parts)


def _admission_labs(w: _Writer, c: set[str]) -> str:
    """Admission labs that agree with the coded problems (a coded AKI has a high creatinine, and only then)."""
    wbc = "{12.1-23.8}" if c & {"sepsis", "septic_shock", "pneumonia", "uti", "cellulitis"} else "{4.1-10.9}"
    hgb = "{6.4-9.4}" if c & {"anemia_acute", "gi_bleed", "pancytopenia"} else "{10.2-15.2}"
    creat = "{1.8-4.6}" if c & {"aki", "ckd"} else "{0.6-1.2}"
    sodium = "{119-130}" if "hyponatremia" in c else "{147-156}" if "hypernatremia" in c else "{134-144}"
    return w.sentence(
        f"___ 0{{4-9}}:{{10-59}}AM BLOOD WBC-{wbc} RBC-{{3.1-5.2}} Hgb-{hgb} Hct-{{24.1-45.9}} MCV-{{80-99}} "
        f"Plt-{{110-420}}\n___ 0{{4-9}}:{{10-59}}AM BLOOD Glucose-{{80-260}} UreaN-{{8-58}} Creat-{creat} "
        f"Na-{sodium} K-{{3.4-5.0}} Cl-{{95-108}} HCO3-{{18-29}}"
    )


def scrub(text: str, drg_code: int, title: str) -> str:
    """Remove the stay's own DRG number and title from the note, should a template have produced them."""
    for phrase in {title, abbreviate_title(title)}:
        if phrase.lower() in text.lower():
            text = re.sub(
                re.escape(phrase), _TITLE_PARAPHRASE.get(phrase.lower(), "the condition"), text, flags=re.IGNORECASE
            )
    if drg_code < 100:  # "3 units", "HR 64": one- and two-digit numbers are everywhere and say nothing of a DRG
        return text
    return re.sub(rf"(?<![\d.]){drg_code}(?![\d])", str(drg_code + 1), text)
